"""Tests of weight quantization (gradcomp.quant): configs, the quantizer on weight layouts, packed modules, quantize_,
size accounting, save/load, quality metrics, and the ``gradcomp weights`` command."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcomp import codec
from gradcomp.cli import main as cli_main
from gradcomp.quant import (
    CastConfig,
    PackedWeight,
    QuantizedConv2d,
    QuantizedEmbedding,
    QuantizedLinear,
    WeightQuantConfig,
    analyze_weights,
    config_name,
    fake_quantize_weight,
    layer_quality,
    load_quantized,
    load_quantized_state_dict,
    load_tensor_file,
    model_size_bytes,
    parse_config,
    predict_model_size_bytes,
    quantize_,
    quantize_state_dict,
    resolve_config,
    save_quantized,
    save_quantized_state_dict,
    size_table,
    weight_bits_per_param,
    weight_nbytes,
    weight_stats,
)

ALL_CONFIGS = [
    WeightQuantConfig(bits=b, granularity=g, group_size=gs, symmetric=sym, scale_dtype=sd)
    for b in (2, 3, 4, 8)
    for g, gs in (("per_tensor", 128), ("per_channel", 128), ("per_group", 32))
    for sym in (True, False)
    for sd in ("fp16", "fp32")
]


def _w(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


class Net(nn.Module):
    """Embedding + conv + linears, with named submodules for rule tests."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.blocks = nn.ModuleList(
            [nn.ModuleDict({"attn": nn.Linear(32, 32), "mlp": nn.Linear(32, 64, bias=False)}) for _ in range(2)]
        )
        self.head = nn.Linear(32, 50, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx, img):
        h = self.emb(idx)
        for b in self.blocks:
            h = h + b["attn"](h)
            h = h + b["mlp"](h)[..., :32]
        c = self.conv(img).mean(dim=(1, 2, 3))
        return self.head(h) + c[:, None, None]


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (3, 5), generator=g), torch.randn(3, 2, 6, 6, generator=g)


def _net(tied=False, seed=0):
    torch.manual_seed(seed)
    return Net(tied)


# --------------------------------------------------------------------------------------------
# configs


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\), got 5"):
        WeightQuantConfig(bits=5)
    with pytest.raises(TypeError, match="bits must be an int"):
        WeightQuantConfig(bits=True)
    with pytest.raises(ValueError, match="granularity must be one of"):
        WeightQuantConfig(granularity="per_row")
    with pytest.raises(ValueError, match="group_size must be a positive int, got 0"):
        WeightQuantConfig(group_size=0)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        WeightQuantConfig(symmetric=1)
    with pytest.raises(ValueError, match="scale_dtype must be one of"):
        WeightQuantConfig(scale_dtype="fp8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        CastConfig("fp8")
    cfg = WeightQuantConfig()
    with pytest.raises(Exception):
        cfg.bits = 4  # frozen


@pytest.mark.parametrize("cfg", ALL_CONFIGS[::5] + [CastConfig("fp16"), CastConfig("bf16"), None])
def test_config_name_round_trip(cfg):
    assert parse_config(config_name(cfg)) == cfg


def test_parse_config_errors():
    with pytest.raises(ValueError, match="unknown part 'g'"):
        parse_config("int4-g")
    with pytest.raises(ValueError, match="must start with int2/int3/int4/int8"):
        parse_config("float4")
    with pytest.raises(ValueError, match="bits must be one of"):
        parse_config("int5")
    assert parse_config("int4-g128-asym") == WeightQuantConfig(4, "per_group", 128, False)


# --------------------------------------------------------------------------------------------
# the quantizer on weight layouts


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("sym", (True, False))
@pytest.mark.parametrize("gran,block", (("per_tensor", None), ("per_channel", 96), ("per_group", 32)))
def test_fp32_scales_equal_the_codec(bits, sym, gran, block):
    w = _w(12, 96)
    cfg = WeightQuantConfig(bits=bits, granularity=gran, group_size=32, symmetric=sym, scale_dtype="fp32")
    ref = codec.fake_quantize(w, bits, block or w.numel(), symmetric=sym)
    assert torch.equal(fake_quantize_weight(w, cfg), ref)


@pytest.mark.parametrize("cfg", ALL_CONFIGS)
def test_packing_round_trip_every_config(cfg):
    """Packed codes dequantize to exactly what fake quantization gives, on an odd shape."""
    w = _w(7, 45, seed=cfg.bits)  # 45 is not a multiple of 32 nor of any packing group
    packed = PackedWeight.from_weight(w, cfg)
    assert torch.equal(packed.dequantize(), fake_quantize_weight(w, cfg))
    assert packed.nbytes == weight_nbytes(cfg, w.shape)
    assert packed.qweight.dtype == torch.uint8 and packed.qweight.numel() == codec.packed_nbytes(w.numel(), cfg.bits)
    # every code fits in its bits: unpacking + re-packing reproduces the bytes
    codes = codec.unpack_codes(packed.qweight, cfg.bits, w.numel())
    assert int(codes.max()) < (1 << cfg.bits)
    assert torch.equal(codec.pack_codes(codes, cfg.bits), packed.qweight)


def test_int4_two_per_byte_int2_four_per_byte():
    w = _w(16, 256)
    assert PackedWeight.from_weight(w, WeightQuantConfig(bits=4)).qweight.numel() == 16 * 256 // 2
    assert PackedWeight.from_weight(w, WeightQuantConfig(bits=2)).qweight.numel() == 16 * 256 // 4
    assert PackedWeight.from_weight(w, WeightQuantConfig(bits=3)).qweight.numel() == 16 * 256 * 3 // 8


def test_group_not_dividing_row_is_a_shorter_last_group():
    """Rows of 45 with groups of 32: groups [0, 32) and [32, 45), each with its own scale."""
    w = _w(5, 45)
    cfg = WeightQuantConfig(bits=4, granularity="per_group", group_size=32, scale_dtype="fp32")
    padded = torch.nn.functional.pad(w, (0, 64 - 45))
    ref = codec.fake_quantize(padded, 4, 32)[:, :45]
    assert torch.equal(fake_quantize_weight(w, cfg), ref)
    packed = PackedWeight.from_weight(w, cfg)
    assert packed.scale.shape == (5, 2)
    assert torch.allclose(packed.scale[:, 1], w[:, 32:].abs().amax(dim=1) / 7)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9), cols=st.integers(1, 70), bits=st.sampled_from((2, 3, 4, 8)),
    gs=st.sampled_from((8, 16, 32, 64)), sym=st.booleans(), scale=st.floats(1e-6, 1e3),
)
def test_error_bound_half_a_step(rows, cols, bits, gs, sym, scale):
    """No clipping with fp16 scales rounded up: every error is at most half a quantization step."""
    w = _w(rows, cols, seed=rows * 100 + cols) * scale
    cfg = WeightQuantConfig(bits=bits, granularity="per_group", group_size=gs, symmetric=sym)
    p = PackedWeight.from_weight(w, cfg)
    fq = fake_quantize_weight(w, cfg)
    assert torch.equal(p.dequantize(), fq)  # packing round trip on any shape
    err = (fq - w).abs()
    step = p.scale.float().repeat_interleave(gs, dim=1)[:, :cols]
    assert bool((err <= step * 0.5 * (1 + 1e-5) + 1e-12).all())


def test_fp16_scale_rounds_up_and_underflow_is_lifted():
    w = torch.full((1, 8), 1e-9)
    p = PackedWeight.from_weight(w, WeightQuantConfig(bits=8, scale_dtype="fp16"))
    assert float(p.scale) > 0 and float(p.scale) >= 1e-9 / 127
    w = _w(4, 64)
    p = PackedWeight.from_weight(w, WeightQuantConfig(bits=8, scale_dtype="fp16"))
    exact = w.abs().amax(dim=1, keepdim=True) / 127
    assert bool((p.scale.float() >= exact).all())
    with pytest.raises(ValueError, match="overflows scale_dtype='fp16'"):
        PackedWeight.from_weight(torch.full((2, 4), 1e8), WeightQuantConfig(bits=8))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float64))
def test_fake_quantize_keeps_shape_and_dtype(dtype):
    w = _w(6, 3, 3, 3, dtype=dtype)
    for cfg in (WeightQuantConfig(bits=4, granularity="per_group", group_size=8), CastConfig("bf16"), None):
        out = fake_quantize_weight(w, cfg)
        assert out.shape == w.shape and out.dtype == dtype
    assert torch.equal(fake_quantize_weight(w, CastConfig("fp16")), w.to(torch.float16).to(dtype))


def test_fake_quantize_rejects_bad_input():
    with pytest.raises(TypeError, match="floating"):
        fake_quantize_weight(torch.ones(3, 3, dtype=torch.int64), WeightQuantConfig())
    with pytest.raises(TypeError, match="WeightQuantConfig or CastConfig"):
        fake_quantize_weight(torch.ones(3, 3), {"bits": 4})


def test_dequantize_rows_matches_full():
    w = _w(40, 48)
    for cfg in (WeightQuantConfig(bits=3, granularity="per_group", group_size=16, symmetric=False),
                WeightQuantConfig(bits=4), WeightQuantConfig(bits=2, granularity="per_tensor"), CastConfig("fp16")):
        p = PackedWeight.from_weight(w, cfg)
        idx = torch.tensor([[3, 0, 39], [7, 7, 1]])
        assert torch.equal(p.dequantize_rows(idx), p.dequantize()[idx])


# --------------------------------------------------------------------------------------------
# quantize_ and rules


def test_rules_first_match_glob_regex_exact_and_none():
    int4 = WeightQuantConfig(bits=4, granularity="per_group", group_size=16)
    int8 = WeightQuantConfig(bits=8)
    rules = [("blocks.1.mlp", None), ("re:blocks\\.\\d+\\.attn", int8), ("blocks.*", int4), ("emb", CastConfig("fp16"))]
    assert resolve_config("blocks.1.mlp", rules) == (True, None)
    assert resolve_config("blocks.0.attn", rules) == (True, int8)
    assert resolve_config("blocks.0.mlp", rules) == (True, int4)
    assert resolve_config("head", rules) == (False, None)
    assert resolve_config("blocks.0.mlp", dict(rules)) == (True, int4)  # a dict keeps its order
    assert resolve_config("a.b.c", [("a*c", int8)]) == (True, int8)  # glob * crosses dots
    assert resolve_config("blocks.0.attnx", rules) == (True, int4)  # regexes match the whole name
    m = _net()
    quantize_(m, rules)
    assert isinstance(m.blocks[0]["attn"], QuantizedLinear) and m.blocks[0]["attn"].config == int8
    assert isinstance(m.blocks[0]["mlp"], QuantizedLinear) and m.blocks[0]["mlp"].config == int4
    assert type(m.blocks[1]["mlp"]) is nn.Linear  # None: full precision
    assert type(m.head) is nn.Linear and type(m.conv) is nn.Conv2d  # no rule matched
    assert isinstance(m.emb, QuantizedEmbedding) and m.emb.config == CastConfig("fp16")


def test_filter_fn_and_single_config():
    m = _net()
    quantize_(m, WeightQuantConfig(bits=8), filter_fn=lambda mod, fqn: not isinstance(mod, nn.Embedding))
    assert type(m.emb) is nn.Embedding
    assert isinstance(m.conv, QuantizedConv2d) and isinstance(m.head, QuantizedLinear)


def test_bad_input_changes_nothing():
    m = _net()
    with torch.no_grad():
        m.blocks[1]["attn"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'blocks.1.attn': the weight holds inf or nan"):
        quantize_(m, WeightQuantConfig(bits=4))
    # layers before the bad one were not swapped either
    assert all(type(x) in (nn.Linear, nn.Embedding, nn.Conv2d) for x in (m.emb, m.conv, m.head, m.blocks[0]["attn"]))
    m = _net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(TypeError, match=r"rule 1: pattern must be a non-empty str"):
        quantize_(m, [("head", None), (3, WeightQuantConfig())])
    with pytest.raises(ValueError, match="invalid regular expression"):
        quantize_(m, [("re:([", WeightQuantConfig())])
    with pytest.raises(TypeError, match="config_or_rules must be"):
        quantize_(m, 8)
    assert {k: v for k, v in m.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("spec,min_db", (("int8-channel", 30.0), ("int4-g16-asym", 14.0), ("fp16", 50.0), ("bf16", 35.0)))
def test_forward_stays_close(spec, min_db):
    m = _net()
    idx, img = _inputs()
    with torch.no_grad():
        ref = m(idx, img)
        quantize_(m, parse_config(spec))
        out = m(idx, img)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert codec.sqnr_db(ref, out) > min_db
    # the forward uses exactly the dequantized weights
    for fqn, mod in m.named_modules():
        if isinstance(mod, QuantizedLinear):
            x = torch.randn(2, mod.in_features)
            assert torch.equal(mod(x), nn.functional.linear(x, mod.weight, mod.bias))


def test_quantized_layers_run_in_half_precision_inputs():
    lin = nn.Sequential(nn.Linear(64, 16))
    quantize_(lin, WeightQuantConfig(bits=4, granularity="per_group", group_size=32))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert lin(x).dtype == torch.bfloat16


def test_tied_weights_share_one_packed_weight():
    m = _net(tied=True)
    cfg = WeightQuantConfig(bits=4, granularity="per_group", group_size=16)
    predicted = predict_model_size_bytes(m, cfg)
    quantize_(m, cfg)
    assert m.emb.packed is m.head.packed
    assert model_size_bytes(m) == predicted


def test_root_layer_refused():
    with pytest.raises(ValueError, match="wrap it in a container"):
        quantize_(nn.Linear(4, 4), WeightQuantConfig())


# --------------------------------------------------------------------------------------------
# size accounting


def test_bits_per_param_exact():
    g128 = WeightQuantConfig(bits=4, granularity="per_group", group_size=128)
    assert weight_bits_per_param(g128, (4096, 4096)) == 4.125
    assert weight_bits_per_param(WeightQuantConfig(4, "per_group", 128, False), (4096, 4096)) == 4.15625
    assert weight_bits_per_param(WeightQuantConfig(8, scale_dtype="fp32"), (4096, 4096)) == 8 + 32 / 4096
    assert weight_bits_per_param(WeightQuantConfig(2, "per_group", 64, False), (64, 64)) == 2 + 16 / 64 + 2 / 64
    assert weight_bits_per_param(CastConfig("bf16"), (3, 3)) == 16.0
    assert weight_bits_per_param(WeightQuantConfig(3, "per_tensor"), (8, 8)) == 3 + 16 / 64


def test_size_table_for_n_params():
    rows = {r["config"]: r for r in size_table(7_000_000_000)}
    assert rows["fp32"]["bytes"] == 28_000_000_000 and rows["fp16"]["bytes"] == 14_000_000_000
    assert rows["int4-g128"]["bits_per_weight"] == 4.125
    assert rows["int4-g128"]["bytes"] == 7_000_000_000 * 4.125 / 8
    with pytest.raises(ValueError, match="num_params must be a positive number"):
        size_table(0)


@pytest.mark.parametrize("spec", ("int8-channel", "int4-g16", "int4-g16-asym", "int2-g16-asym", "int3-tensor", "fp16"))
def test_model_size_exact_and_matches_disk(tmp_path, spec):
    m = _net()
    cfg = parse_config(spec)
    predicted = predict_model_size_bytes(m, cfg)
    quantize_(m, cfg)
    held = model_size_bytes(m)
    assert held == predicted
    manual = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert held == manual  # no sharing in this model
    path = tmp_path / "m.safetensors"
    save_quantized(m, path)
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    assert os.path.getsize(path) - 8 - header == held


def test_model_size_counts_a_linear_by_hand():
    lin = nn.Sequential(nn.Linear(256, 64))
    assert model_size_bytes(lin) == (256 * 64 + 64) * 4
    quantize_(lin, WeightQuantConfig(bits=4, granularity="per_group", group_size=128))
    assert model_size_bytes(lin) == 256 * 64 // 2 + 64 * 2 * 2 + 64 * 4


# --------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("tied", (False, True))
def test_save_load_round_trip_on_meta(tmp_path, tied):
    m = _net(tied)
    rules = [("blocks.0.*", WeightQuantConfig(bits=3, granularity="per_group", group_size=16, symmetric=False)),
             ("conv", CastConfig("bf16")), ("blocks.1.mlp", None), ("*", WeightQuantConfig(bits=4, granularity="per_group", group_size=16))]
    quantize_(m, rules)
    idx, img = _inputs()
    out = m(idx, img)
    path = tmp_path / "q.safetensors"
    save_quantized(m, path)
    with torch.device("meta"):
        fresh = Net(tied)
    load_quantized(fresh, path)
    sd_a, sd_b = m.state_dict(), fresh.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) and sd_a[k].dtype == sd_b[k].dtype for k in sd_a)
    assert torch.equal(fresh(idx, img), out)
    if tied:
        assert fresh.emb.packed is fresh.head.packed
    assert model_size_bytes(fresh) == model_size_bytes(m)
    meta = json.loads(_metadata(path)["quantization_map"])
    assert meta["layers"]["blocks.0.attn"]["config"]["bits"] == 3


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_file_holds_plain_tensors_named_by_layer(tmp_path):
    from safetensors.torch import load_file

    m = nn.Sequential(nn.Linear(32, 8))
    quantize_(m, WeightQuantConfig(bits=4, granularity="per_group", group_size=16, symmetric=False))
    save_quantized(m, tmp_path / "a.safetensors")
    t = load_file(str(tmp_path / "a.safetensors"))
    assert set(t) == {"0.qweight", "0.scale", "0.zero_point", "0.bias"}
    assert t["0.qweight"].dtype == torch.uint8 and t["0.qweight"].numel() == 128
    assert t["0.scale"].dtype == torch.float16 and t["0.scale"].shape == (8, 2)


def test_load_into_plain_cpu_model_and_into_quantized_model(tmp_path):
    m = _net()
    quantize_(m, WeightQuantConfig(bits=8))
    save_quantized(m, tmp_path / "q.safetensors")
    idx, img = _inputs()
    for fresh in (_net(seed=5), quantize_(_net(seed=6), WeightQuantConfig(bits=8))):
        load_quantized(fresh, tmp_path / "q.safetensors")
        assert torch.equal(fresh(idx, img), m(idx, img))


def test_load_mismatch_names_the_layer_and_changes_nothing(tmp_path):
    m = _net()
    quantize_(m, WeightQuantConfig(bits=4, granularity="per_group", group_size=16))
    save_quantized(m, tmp_path / "q.safetensors")

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.blocks[0]["mlp"] = nn.Linear(32, 72, bias=False)

    other = Wider()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'blocks.0.mlp' has a weight of shape \(64, 32\) in the file but \(72, 32\)"):
        load_quantized(other, tmp_path / "q.safetensors")
    assert type(other.blocks[0]["mlp"]) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())

    smaller = nn.Module()
    smaller.emb = nn.Embedding(50, 32)
    with pytest.raises(ValueError, match=r"layer '(conv|blocks.0.attn)' of the file does not exist in the model"):
        load_quantized(smaller, tmp_path / "q.safetensors")

    swapped = Net()
    swapped.head = nn.Embedding(50, 32)
    with pytest.raises(ValueError, match=r"layer 'head' is a linear in the file but a Embedding in the model"):
        load_quantized(swapped, tmp_path / "q.safetensors")

    extra = Net()
    extra.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"the file lacks 2 tensors of the model, e\.g\. \['extra.bias', 'extra.weight'\]"):
        load_quantized(extra, tmp_path / "q.safetensors")

    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="is not a gradcomp quantized file"):
        load_quantized(Net(), tmp_path / "plain.safetensors")


def test_corrupt_packed_tensor_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    m = nn.Sequential(nn.Linear(32, 8))
    quantize_(m, WeightQuantConfig(bits=4))
    save_quantized(m, tmp_path / "q.safetensors")
    t = load_file(str(tmp_path / "q.safetensors"))
    t["0.qweight"] = t["0.qweight"][:-1].clone()
    save_file(t, str(tmp_path / "bad.safetensors"), metadata=_metadata(tmp_path / "q.safetensors"))
    with pytest.raises(ValueError, match=r"tensor '0.qweight' is uint8 of shape \(127,\) in the file but uint8 of shape \(128,\) in its map"):
        load_quantized(nn.Sequential(nn.Linear(32, 8)), tmp_path / "bad.safetensors")


def test_state_dict_quantization_round_trip(tmp_path):
    sd = _net().state_dict()
    packed, plain = quantize_state_dict(sd, [("head", None), ("*", WeightQuantConfig(bits=8))])
    assert set(packed) == {"emb", "conv", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"}
    assert "head.weight" in plain and "conv.bias" in plain
    save_quantized_state_dict(packed, plain, tmp_path / "s.safetensors")
    back, configs = load_quantized_state_dict(tmp_path / "s.safetensors")
    assert back.keys() == sd.keys()
    assert torch.equal(back["conv.weight"], fake_quantize_weight(sd["conv.weight"], WeightQuantConfig(bits=8)))
    # the same file loads into a model ("tensor" entries fit any supported layer of that shape)
    m = _net(seed=3)
    load_quantized(m, tmp_path / "s.safetensors")
    assert isinstance(m.conv, QuantizedConv2d) and torch.equal(m.conv.weight, back["conv.weight"])


def test_load_tensor_file_reads_torch_checkpoints(tmp_path):
    sd = _net().state_dict()
    torch.save({"model": sd, "step": 3}, tmp_path / "ckpt.pt")
    got = load_tensor_file(tmp_path / "ckpt.pt")
    assert got.keys() == sd.keys()
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state_dict"):
        load_tensor_file(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError):
        load_tensor_file(tmp_path / "missing.pt")


# --------------------------------------------------------------------------------------------
# quality metrics and statistics


def test_layer_quality_metrics():
    w = _w(64, 256)
    q8 = layer_quality(w, WeightQuantConfig(bits=8), "a")
    q4 = layer_quality(w, WeightQuantConfig(bits=4, granularity="per_group", group_size=128, symmetric=False), "a")
    assert 38 < q8.sqnr_db < 45 and 17 < q4.sqnr_db < 23
    assert q8.mse < q4.mse and q8.cosine > q4.cosine > 0.99
    approx = fake_quantize_weight(w, WeightQuantConfig(bits=8))
    assert q8.max_abs_error == pytest.approx(float((w - approx).abs().max()))
    assert layer_quality(w, None).sqnr_db == math.inf


def test_weight_stats_on_known_distributions():
    g = _w(400, 500)
    s = weight_stats(g, "g")
    assert abs(s.kurtosis) < 0.1 and abs(s.std - 1) < 0.01
    assert s.outlier_share == pytest.approx(0.0027, abs=0.0006)
    assert s.percentiles["p50"] == pytest.approx(0.0, abs=0.01)
    assert s.percentiles["p99"] == pytest.approx(2.326, abs=0.03)
    assert sum(s.hist_counts) == g.numel()
    heavy = g.clone()
    heavy[0, :20] = 60.0
    h = weight_stats(heavy)
    assert h.kurtosis > 50 and h.max == 60.0
    x = torch.arange(1.0, 101.0)
    sx = weight_stats(x)
    assert sx.percentiles["p1"] == 1.0 and sx.percentiles["p50"] == 50.0 and sx.percentiles["p99.9"] == 100.0


def test_analyze_weights_report_and_plot(tmp_path):
    m = _net()
    cfgs = [WeightQuantConfig(bits=8), parse_config("int4-g16-asym")]
    r = analyze_weights(m, cfgs)
    assert [s.name for s in r.stats] == ["emb", "conv", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "head"]
    summ = {row["config"]: row for row in r.summary()}
    assert summ["int8-channel"]["median_sqnr_db"] > summ["int4-g16-asym"]["median_sqnr_db"]
    js = json.loads(json.dumps(r.to_json()))
    assert js["layers"][0]["quality"]["int8-channel"]["bits_per_weight"] > 8
    with pytest.raises(ValueError, match="configs must be distinct"):
        analyze_weights(m, [cfgs[0], cfgs[0]])
    pytest.importorskip("matplotlib")
    from gradcomp.plots.weights import plot_weight_report

    out = plot_weight_report(r, str(tmp_path / "r.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# command line


def test_cli_analyze_quantize_size(tmp_path, capsys):
    sd = _net().state_dict()
    src = tmp_path / "model.pt"
    torch.save(sd, src)
    assert cli_main(["weights", "analyze", str(src), "--json", "--config", "int8", "--config", "int4-g16-asym"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["configs"] == ["int8-channel", "int4-g16-asym"] and len(out["layers"]) == 7

    dst = tmp_path / "q.safetensors"
    rc = cli_main(["weights", "quantize", str(src), str(dst), "--bits", "4", "--granularity", "per_group",
                   "--group-size", "16", "--asymmetric", "--skip", "head", "--rule", "re:.*attn=int8", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["quantized_layers"] == 6
    cfg = {r["layer"]: r["config"] for r in out["layers"]}
    assert cfg["blocks.0.attn"] == "int8-channel" and cfg["blocks.0.mlp"] == "int4-g16-asym"
    m = _net(seed=9)
    load_quantized(m, dst)
    assert type(m.head) is nn.Linear and isinstance(m.blocks[0]["attn"], QuantizedLinear)

    assert cli_main(["weights", "quantize", str(src), str(dst)]) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err
    assert cli_main(["weights", "quantize", str(src), str(tmp_path / "x.pt")]) == 2

    assert cli_main(["weights", "size", str(src), "--json", "--config", "fp32", "--config", "int4-g16-asym"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert all(r["match"] for r in rows) and rows[1]["held_bytes"] < rows[0]["held_bytes"]

    assert cli_main(["weights", "size", "--params", "7e9", "--json"]) == 0
    rows = {r["config"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["int4-g128"]["bits_per_weight"] == 4.125
    assert cli_main(["weights", "analyze", str(tmp_path / "nope.pt")]) == 2


def test_dtype_conversion_keeps_stored_representation():
    m = _net()
    quantize_(m, [("emb", CastConfig("fp16")), ("*", WeightQuantConfig(bits=4, granularity="per_group", group_size=16))])
    size = model_size_bytes(m)
    scales = m.head.packed.scale.clone()
    m.to(torch.bfloat16)
    assert m.head.packed.scale.dtype == torch.float16 and torch.equal(m.head.packed.scale, scales)
    assert m.emb.packed.qweight.dtype == torch.float16
    # only the unquantized tensors (biases, and nothing else here) shrank
    biases = sum(p.numel() for n, p in m.named_parameters() if n.endswith("bias"))
    assert model_size_bytes(m) == size - 2 * biases
    idx, img = _inputs()
    out = m(idx, img.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_matches_cpu(tmp_path):
    m = _net(tied=True)
    quantize_(m, WeightQuantConfig(bits=4, granularity="per_group", group_size=16, symmetric=False))
    idx, img = _inputs()
    ref = m(idx, img)
    g = m.to("cuda")
    assert g.emb.packed is g.head.packed and g.head.packed.qweight.is_cuda
    out = g(idx.cuda(), img.cuda()).cpu()
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
    save_quantized(g, tmp_path / "g.safetensors")
    with torch.device("meta"):
        fresh = Net(tied=True)
    load_quantized(fresh, tmp_path / "g.safetensors", device="cuda")
    assert torch.equal(fresh(idx.cuda(), img.cuda()), g(idx.cuda(), img.cuda()))


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("sym", (True, False))
def test_codec_quantize_with_qparams_matches_quantize_codes(bits, sym):
    """The codec function added for stored scales gives the codes of quantize_codes for its own scales."""
    x = _w(6, 32, seed=bits) * 3
    codes, scale, zp = codec.quantize_codes(x, bits, 32, symmetric=sym)
    assert torch.equal(codec.quantize_codes_with_qparams(x, scale, zp, bits), codes)
    with pytest.raises(ValueError, match="xb must be"):
        codec.quantize_codes_with_qparams(x, scale[:-1], zp, bits)


def test_quantize_on_meta_builds_an_exact_skeleton(tmp_path):
    """quantize_ on a meta model allocates nothing, sizes exactly, and load_quantized fills it."""
    cfg = WeightQuantConfig(bits=3, granularity="per_group", group_size=16, symmetric=False)
    m = _net()
    quantize_(m, cfg)
    save_quantized(m, tmp_path / "q.safetensors")
    with torch.device("meta"):
        skel = Net()
    predicted = predict_model_size_bytes(skel, cfg)
    quantize_(skel, cfg)
    assert skel.head.packed.qweight.device.type == "meta"
    assert model_size_bytes(skel) == predicted == model_size_bytes(m)
    load_quantized(skel, tmp_path / "q.safetensors")
    idx, img = _inputs()
    assert torch.equal(skel(idx, img), m(idx, img))


@pytest.mark.parametrize("kw", ({"padding": "same", "padding_mode": "circular", "dilation": 2},
                                {"padding": (1, 2), "padding_mode": "replicate", "stride": 2},
                                {"padding": "valid", "groups": 2}))
def test_conv2d_variants_match_fake_quantized_reference(kw):
    conv = nn.Conv2d(4, 6, (3, 2), **kw)
    x = torch.randn(2, 4, 9, 8)
    cfg = WeightQuantConfig(bits=4, granularity="per_group", group_size=8)
    ref_conv = nn.Conv2d(4, 6, (3, 2), **kw)
    ref_conv.load_state_dict(conv.state_dict())
    with torch.no_grad():
        ref_conv.weight.copy_(fake_quantize_weight(conv.weight, cfg))
    m = nn.Sequential(conv)
    quantize_(m, cfg)
    assert torch.allclose(m(x), ref_conv(x), atol=1e-6)


def test_bf16_scales():
    w = _w(8, 64) * 1e-3
    cfg = WeightQuantConfig(bits=4, granularity="per_group", group_size=32, symmetric=False, scale_dtype="bf16")
    p = PackedWeight.from_weight(w, cfg)
    assert p.scale.dtype == torch.bfloat16 and p.nbytes == weight_nbytes(cfg, w.shape) == 8 * 64 // 2 + 16 * 2 + 8
    assert torch.equal(p.dequantize(), fake_quantize_weight(w, cfg))
    step = p.scale.float().repeat_interleave(32, dim=1)
    assert bool(((p.dequantize() - w).abs() <= step * 0.5 * (1 + 1e-5)).all())
