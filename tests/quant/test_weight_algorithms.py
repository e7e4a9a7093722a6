"""Data-aware weight quantization (GPTQ, activation-aware clipping) on the packed format of round-to-nearest."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gradcomp.quant as q
from gradcomp.quant.algorithms import (
    GPTQ,
    HQQ,
    AWQScale,
    AutoRound,
    autoround_quantize,
    ActivationAwareClip,
    clip_search_quantize,
    collect_input_hessians,
    gptq_quantize,
    hqq_quantize,
    layer_output_error,
    resolve_method,
)
from gradcomp.examples.tasks import GPTConfig, get_batch, pretrained_tiny_gpt

G32 = q.WeightQuantConfig(bits=4, granularity="per_group", group_size=32)
CONFIGS = [
    G32,
    q.WeightQuantConfig(bits=3, granularity="per_group", group_size=24, symmetric=False),  # 64 = 24 + 24 + 16
    q.WeightQuantConfig(bits=4),
    q.WeightQuantConfig(bits=8, scale_dtype="fp32"),
    q.WeightQuantConfig(bits=2, granularity="per_tensor"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TinyGPT trained for a few seconds on the stdlib corpus: real weights and real inputs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=64)
    model, train, val = pretrained_tiny_gpt(tmp_path_factory.mktemp("gpt"), steps=150, config=cfg, batch_size=16, max_bytes=1 << 18)
    g = torch.Generator().manual_seed(0)
    calib = [get_batch(train, 8, 32, g)[0] for _ in range(4)]
    held_out = [get_batch(val, 8, 32, g)[0] for _ in range(4)]
    yield model, calib, held_out
    torch.set_num_threads(before)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


@pytest.mark.parametrize("method", [GPTQ(), GPTQ(act_order=True), ActivationAwareClip(), AWQScale()],
                         ids=["gptq", "gptq-act-order", "awq_clip", "awq_scale"])
@pytest.mark.parametrize("config", [G32, q.WeightQuantConfig(bits=3, granularity="per_group", group_size=32, symmetric=False)], ids=lambda c: c.name)
def test_each_method_beats_round_to_nearest_on_held_out_layer_output(trained, method, config):
    model, calib, held_out = trained
    layers = _linears(model)
    h_cal = collect_input_hessians(model, layers, calib)
    h_test = collect_input_hessians(model, layers, held_out)   # judged on inputs the method never saw
    for name, m in layers.items():
        w = m.weight.detach()
        rtn = layer_output_error(w, q.fake_quantize_weight(w, config), h_test[name])
        got = layer_output_error(w, method.quantize(w, h_cal[name], config).dequantize(config.bits), h_test[name])
        assert got < 0.7 * rtn, (name, got, rtn)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_results_pack_into_the_round_to_nearest_format(config):
    torch.manual_seed(0)
    w = torch.randn(40, 64)
    x = torch.randn(500, 64) @ torch.randn(64, 64)
    h = x.T.double() @ x.double()
    ref = q.PackedWeight.from_weight(w, config)
    for method in (GPTQ(act_order=True), GPTQ(block_size=16), ActivationAwareClip(grid=5)):
        r = method.quantize(w, h, config)
        p = q.PackedWeight.from_codes(r.codes, r.scale, r.zero_point, config, w.shape, w.dtype)
        assert p.qweight.shape == ref.qweight.shape and p.scale.dtype == ref.scale.dtype and p.scale.shape == ref.scale.shape
        assert (p.zero_point is None) == (ref.zero_point is None)
        assert torch.equal(p.dequantize(), r.dequantize(config.bits))


@pytest.mark.parametrize("config", [G32, q.WeightQuantConfig(bits=4), q.WeightQuantConfig(bits=3, granularity="per_group", group_size=24, symmetric=False)], ids=lambda c: c.name)
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(config):
    # H diagonal: rounding one column's error never moves another column, so GPTQ == RTN bit for bit
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    h = torch.diag(torch.rand(64, dtype=torch.float64) + 0.5)
    r = gptq_quantize(w, h, config, damp=0.0)
    assert torch.equal(r.dequantize(config.bits), q.fake_quantize_weight(w, config))


def test_gptq_worked_example():
    # docstring of gradcomp.quant.algorithms.gptq: int2 symmetric on a fixed grid of step 1
    w = torch.tensor([[0.4, 0.4, 1.0]])      # the third weight fixes the scale at 1 (int2: codes -1, 0, 1)
    h = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    cfg = q.WeightQuantConfig(bits=2, scale_dtype="fp32")
    assert q.fake_quantize_weight(w, cfg).tolist() == [[0.0, 0.0, 1.0]]
    got = gptq_quantize(w, h, cfg, damp=0.0).dequantize(2)
    assert got.tolist() == [[0.0, 1.0, 1.0]]
    assert layer_output_error(w, got, h) < layer_output_error(w, q.fake_quantize_weight(w, cfg), h) / 6


def test_quantize_with_a_method_saves_and_loads_like_rtn(tmp_path, trained):
    model, calib, held_out = trained
    import copy

    rtn = q.quantize_(copy.deepcopy(model), G32, filter_fn=lambda m, n: n != "lm_head")
    gq = q.quantize_(copy.deepcopy(model), G32, filter_fn=lambda m, n: n != "lm_head", method="gptq", calibration=calib)
    assert [type(m) for m in rtn.modules()] == [type(m) for m in gq.modules()]
    assert q.model_size_bytes(rtn) == q.model_size_bytes(gq)
    q.save_quantized(gq, tmp_path / "g.safetensors")
    again = q.load_quantized(copy.deepcopy(model), tmp_path / "g.safetensors")
    for (n, a), (_, b) in zip(gq.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        ref = torch.cat([model(x)[0] for x in held_out])
        e_rtn = float(((torch.cat([rtn(x)[0] for x in held_out]) - ref) ** 2).mean())
        e_gq = float(((torch.cat([again(x)[0] for x in held_out]) - ref) ** 2).mean())
    assert e_gq < e_rtn


def test_bad_input_is_rejected_and_changes_nothing():
    model = nn.Sequential(nn.Linear(8, 4))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="needs calibration batches"):
        q.quantize_(model, G32, method="gptq")
    with pytest.raises(ValueError, match="method must be one of"):
        q.quantize_(model, G32, method="hqq2", calibration=[torch.randn(2, 8)])
    with pytest.raises(ValueError, match="no batch"):
        q.quantize_(model, G32, method="gptq", calibration=[])
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(torch.randn(4, 8), torch.eye(7), G32)
    with pytest.raises(ValueError, match="inf or nan"):
        gptq_quantize(torch.randn(4, 8), torch.full((8, 8), float("nan")), G32)
    with pytest.raises(ValueError, match="hessian must be"):
        clip_search_quantize(torch.randn(4, 8), torch.eye(9), G32)
    with pytest.raises(ValueError, match="damp"):
        GPTQ(damp=-1.0)
    with pytest.raises(ValueError, match="min_ratio"):
        ActivationAwareClip(min_ratio=0.0)
    with pytest.raises(ValueError, match="codes must be uint8"):
        q.PackedWeight.from_codes(torch.zeros(4, 7, dtype=torch.uint8), torch.ones(4, dtype=torch.float16), None,
                                  q.WeightQuantConfig(bits=4), (4, 8))
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, before)
    assert resolve_method("rtn") is None and resolve_method("gptq") == GPTQ()


@pytest.mark.parametrize("method", [GPTQ(), GPTQ(act_order=True), ActivationAwareClip()], ids=["gptq", "gptq-act-order", "awq_clip"])
def test_inputs_absent_from_calibration_keep_their_weights(method):
    # like per-element reference energies: inputs 5..9 never occur in calibration; their weights must
    # still be quantized as weights (not zeroed, not clipped for free), since later inputs use them
    torch.manual_seed(3)
    w = torch.randn(8, 10) * 5
    x = torch.randn(200, 10)
    x[:, 5:] = 0.0
    h = x.T.double() @ x.double()
    cfg = q.WeightQuantConfig(bits=4, granularity="per_group", group_size=5)
    got = method.quantize(w, h, cfg).dequantize(4)
    rtn = q.fake_quantize_weight(w, cfg)
    assert float(got[:, 5:].abs().min()) > 0 or float(w[:, 5:].abs().min()) < float(rtn[:, 5:].abs().max()) / 16
    assert float(((got[:, 5:] - w[:, 5:]) ** 2).mean()) <= float(((rtn[:, 5:] - w[:, 5:]) ** 2).mean()) * 1.01


@pytest.mark.parametrize("config", [G32, q.WeightQuantConfig(bits=3, granularity="per_group", group_size=32, symmetric=False),
                                    q.WeightQuantConfig(bits=4)], ids=lambda c: c.name)
def test_hqq_beats_round_to_nearest_on_held_out_layer_output(trained, config):
    model, calib, held_out = trained
    layers = _linears(model)
    h_test = collect_input_hessians(model, layers, held_out)
    tot_rtn = tot_hqq = 0.0
    for name, m in layers.items():
        w = m.weight.detach()
        rtn = layer_output_error(w, q.fake_quantize_weight(w, config), h_test[name])
        got = layer_output_error(w, HQQ().quantize(w, None, config).dequantize(config.bits), h_test[name])   # no data
        assert got < 1.1 * rtn, (name, got, rtn)   # data-free: it fits the weights, not the inputs
        tot_rtn, tot_hqq = tot_rtn + rtn, tot_hqq + got
    assert tot_hqq < 0.95 * tot_rtn, (tot_hqq, tot_rtn)


def test_hqq_worked_example_and_needs_no_data():
    # docstring of gradcomp.quant.algorithms.hqq: the fitted step clips the outlier 1.0
    w = torch.tensor([[1.0, 0.6, 0.55, -0.5]])
    cfg = q.WeightQuantConfig(bits=2, scale_dtype="fp32")
    assert q.fake_quantize_weight(w, cfg).tolist() == [[1.0, 1.0, 1.0, 0.0]]
    got = hqq_quantize(w, cfg, p=2.0).dequantize(2)
    assert torch.allclose(got, torch.tensor([[0.6625, 0.6625, 0.6625, -0.6625]]))
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 8))
    q.quantize_(model, G32, method="hqq")     # data-free: no calibration needed, Embedding included
    assert isinstance(model[0], q.QuantizedEmbedding) and isinstance(model[1], q.QuantizedLinear)
    with pytest.raises(ValueError, match="iters"):
        HQQ(iters=-1)


class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_sequential_collects_each_hessian_on_the_quantized_prefix():
    import copy

    model = _Chain()
    x = torch.randn(64, 16) @ torch.randn(16, 16)
    calib = [x[:32], x[32:]]
    cfg = q.WeightQuantConfig(bits=4, granularity="per_group", group_size=16)
    seq = q.quantize_(copy.deepcopy(model), cfg, method=GPTQ(damp=0.1), calibration=calib, sequential=True)
    # by hand: a on the fp32 inputs; b with a quantized; c with a and b quantized
    ref = copy.deepcopy(model)
    for name in ("a", "b", "c"):
        lin = getattr(model, name)
        h = collect_input_hessians(ref, {name: getattr(ref, name)}, calib)[name]
        r = GPTQ(damp=0.1).quantize(lin.weight, h, cfg)
        setattr(ref, name, q.QuantizedLinear(q.PackedWeight.from_codes(r.codes, r.scale, r.zero_point, cfg, lin.weight.shape), lin.bias))
        assert torch.equal(getattr(seq, name).packed.qweight, getattr(ref, name).packed.qweight), name
    # one stage is the plain (non-sequential) mode; with two stages c sees a and b quantized
    plain = q.quantize_(copy.deepcopy(model), cfg, method=GPTQ(damp=0.1), calibration=calib)
    one = q.quantize_(copy.deepcopy(model), cfg, method=GPTQ(damp=0.1), calibration=calib, sequential=1)
    assert all(torch.equal(getattr(plain, n).packed.qweight, getattr(one, n).packed.qweight) for n in "abc")
    assert not torch.equal(plain.c.packed.qweight, seq.c.packed.qweight)
    with pytest.raises(ValueError, match="sequential"):
        q.quantize_(copy.deepcopy(model), cfg, sequential=True)
    with pytest.raises(ValueError, match="sequential"):
        q.quantize_(copy.deepcopy(model), cfg, method="gptq", calibration=calib, sequential=0)
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.c.weight[0, 0] = float("nan")
    with pytest.raises(ValueError):
        q.quantize_(bad, cfg, method="gptq", calibration=calib, sequential=True)
    assert all(type(getattr(bad, n)) is nn.Linear for n in "abc")    # put back: nothing changed


def test_awq_scale_beats_rtn_and_stores_its_input_scale(tmp_path, trained):
    import copy

    model, calib, held_out = trained
    layers = _linears(model)
    h_cal = collect_input_hessians(model, layers, calib)
    h_test = collect_input_hessians(model, layers, held_out)
    scaled = total_scale = total_rtn = 0
    for name, m in layers.items():
        w = m.weight.detach()
        r = AWQScale(clip=False).quantize(w, h_cal[name], G32)
        scaled += r.input_scale is not None
        rtn = layer_output_error(w, q.fake_quantize_weight(w, G32), h_test[name])
        assert layer_output_error(w, r.dequantize(4), h_test[name]) < rtn, name      # scaling alone beats RTN
        total_scale += layer_output_error(w, r.dequantize(4), h_test[name])
        total_rtn += rtn
    assert scaled >= len(layers) // 2 and total_scale < 0.95 * total_rtn   # scaling alone; with clip see above
    # the packed layer: input_scale stored, counted in the size, applied, saved and loaded bit-exactly
    sel = lambda m, n: n != "lm_head"
    aq = q.quantize_(copy.deepcopy(model), G32, filter_fn=sel, method="awq_scale", calibration=calib)
    rtn = q.quantize_(copy.deepcopy(model), G32, filter_fn=sel)
    with_s = [m for m in aq.modules() if isinstance(m, q.QuantizedLinear) and m.packed.input_scale is not None]
    assert with_s
    assert q.model_size_bytes(aq) == q.model_size_bytes(rtn) + sum(4 * m.in_features for m in with_s)
    # predicted before quantizing: exact for round-to-nearest, an upper bound (every Linear scaled) for awq_scale
    every = sum(4 * m.in_features for m in aq.modules() if isinstance(m, q.QuantizedLinear))
    assert q.predict_model_size_bytes(model, G32, filter_fn=sel) == q.model_size_bytes(rtn)
    bound = q.predict_model_size_bytes(model, G32, filter_fn=sel, method="awq_scale")
    assert bound == q.model_size_bytes(rtn) + every and q.model_size_bytes(aq) <= bound
    lin = with_s[0]
    x = torch.randn(5, lin.in_features)
    want = x @ lin.packed.dequantize().T + lin.bias
    assert torch.allclose(lin(x), want, atol=1e-5)
    lin.compute_dtype = torch.bfloat16          # the bf16 kernel multiplies by the codes of W diag(s): x / s first
    with torch.no_grad():
        got = lin(x)
    lin.compute_dtype = None
    assert float((got - want).norm() / want.norm()) < 0.02
    q.save_quantized(aq, tmp_path / "a.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata()["format_version"] == "3" and any(k.endswith(".input_scale") for k in f.keys())
    q.save_quantized(rtn, tmp_path / "r.safetensors")
    with safe_open(str(tmp_path / "r.safetensors"), "pt") as f:
        assert f.metadata()["format_version"] == "2"          # files without input scales stay readable by older code
    again = q.load_quantized(copy.deepcopy(model), tmp_path / "a.safetensors")
    for (n, a), (_, b) in zip(aq.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        assert all(torch.equal(again(t)[0], aq(t)[0]) for t in held_out)
    with pytest.raises(ValueError, match="input_scale must hold finite positive"):
        q.PackedWeight.from_codes(torch.zeros(lin.out_features, lin.in_features, dtype=torch.uint8), lin.packed.scale, None,
                                  G32, lin.packed.shape, input_scale=-torch.ones(lin.in_features))


def _model_rel_mse(model, quantized, batches):
    """Mean over batches of the logits' squared error over their power: the output error AutoRound trains on."""
    with torch.no_grad():
        errs = [float(((quantized(x)[0] - model(x)[0]) ** 2).sum() / (model(x)[0] ** 2).sum()) for x in batches]
    return sum(errs) / len(errs)


@pytest.mark.parametrize("config", [G32, q.WeightQuantConfig(bits=3, granularity="per_group", group_size=32, symmetric=False)], ids=lambda c: c.name)
def test_autoround_beats_round_to_nearest_on_held_out_model_output(trained, config):
    import copy

    model, calib, held_out = trained
    rtn = q.quantize_(copy.deepcopy(model), config)
    ar = q.quantize_(copy.deepcopy(model), config, method=AutoRound(steps=40), calibration=calib)
    assert ar.wte.packed is ar.lm_head.packed   # tied weights: one offset tensor, one packed weight
    # judged on batches the method never saw, against the fp32 model's logits
    assert _model_rel_mse(model, ar, held_out) < 0.6 * _model_rel_mse(model, rtn, held_out)


@pytest.mark.parametrize("config", CONFIGS + [q.WeightQuantConfig(bits=4, granularity="per_group", group_size=5, scale_dtype="bf16")],
                         ids=lambda c: c.name)
def test_autoround_without_steps_is_its_starting_point_bit_for_bit(config):
    # v = 0 is round-to-nearest on the starting ranges: the packing path must reproduce the codes and scales
    # of round-to-nearest (init="rtn") and of awq_clip (init="awq_clip", the default) exactly
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 40), nn.Tanh(), nn.Linear(40, 7))
    model[1].weight.data[3, :8] = 0.0   # an all-zero group: zero scale
    cal = [torch.randint(0, 10, (4, 3)) for _ in range(2)]
    import copy

    for start, method in (("rtn", None), ("awq_clip", "awq_clip")):
        want = q.quantize_(copy.deepcopy(model), config, method=method, calibration=cal if method else None)
        ar = q.quantize_(copy.deepcopy(model), config, method=AutoRound(steps=0, init=start), calibration=cal)
        for (n, a), (_, b) in zip(want.state_dict().items(), ar.state_dict().items()):
            assert a.dtype == b.dtype and torch.equal(a, b), (start, n)


def test_autoround_keeps_the_best_step_and_packs_what_it_scored():
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16))
    batches = [torch.randn(32, 16) for _ in range(4)]
    cfg = q.WeightQuantConfig(bits=3, granularity="per_group", group_size=16)
    work = copy.deepcopy(model)
    layers = [([(n, m)], cfg) for n, m in work.named_children() if isinstance(m, nn.Linear)]
    res = autoround_quantize(work, layers, batches, AutoRound(steps=30, holdout=1, eval_every=5, init="rtn", ranges=True,
                                                                normalize="power"))
    assert [s for s, _ in res.history] == [0, 5, 10, 15, 20, 25, 30] and len(res.train_loss) == 30
    best = min(loss for _, loss in res.history)
    assert best < res.history[0][1] and dict(res.history)[res.best_step] == best
    got = copy.deepcopy(model)
    for n, p in res.packed.items():
        setattr(got, n, q.QuantizedLinear(p, getattr(model, n).bias))
    with torch.no_grad():   # the selection loss: the packed weights' error on the held-out batch over the training power
        out, ref = got(batches[-1]), model(batches[-1])
        power = sum(float((model(x) ** 2).sum()) for x in batches[:3]) / 3
    assert float(((out - ref) ** 2).sum()) / power == pytest.approx(best, rel=1e-5)
    assert all(p.requires_grad for p in work.parameters()) and not hasattr(work[0], "parametrizations")


def test_autoround_saves_and_loads_bit_identical(tmp_path, trained):
    import copy

    model, calib, _ = trained
    ar = q.quantize_(copy.deepcopy(model), G32, method="autoround", calibration=calib[:2],
                     forward=lambda m, x: m(x)[0], num_batches=2)
    rtn = q.quantize_(copy.deepcopy(model), G32)
    assert q.model_size_bytes(ar) == q.model_size_bytes(rtn)
    q.save_quantized(ar, tmp_path / "a.safetensors")
    again = q.load_quantized(copy.deepcopy(model), tmp_path / "a.safetensors")
    for (n, a), (_, b) in zip(ar.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(ar(calib[3])[0], again(calib[3])[0])


def test_autoround_bad_options_and_inputs_change_nothing():
    for kw, match in [({"steps": -1}, "steps"), ({"steps": 2.0}, "steps"), ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"),
                      ({"optimizer": "sgd"}, "optimizer"), ({"min_ratio": 1.5}, "min_ratio"), ({"init": "gptq"}, "init"),
                      ({"holdout": -1}, "holdout"), ({"eval_every": 0}, "eval_every"), ({"normalize": "max"}, "normalize")]:
        with pytest.raises(ValueError, match=match):
            AutoRound(**kw)
    with pytest.raises(TypeError, match="ranges"):
        AutoRound(ranges=1)
    assert resolve_method("autoround") == AutoRound()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal = [torch.randn(4, 8) for _ in range(2)]
    with pytest.raises(ValueError, match="needs calibration batches"):
        q.quantize_(model, G32, method="autoround")
    with pytest.raises(ValueError, match="holdout=2 needs at least 3"):
        q.quantize_(model, G32, method=AutoRound(steps=2, holdout=2), calibration=cal)
    with pytest.raises(ValueError, match="do not depend on the quantized weights"):
        q.quantize_(model, G32, method=AutoRound(steps=2), calibration=cal, forward=lambda m, x: m(x).detach())
    with pytest.raises(ValueError, match="sequential"):
        q.quantize_(model, G32, method="autoround", calibration=cal, sequential=2)
    assert all(type(m) in (nn.Linear, nn.Tanh) for m in model) and not hasattr(model[0], "parametrizations")
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _TwoHeads(nn.Module):
    """Two outputs of different size: AutoRound's loss takes both unless weights say otherwise."""

    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4), nn.Linear(32, 12)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return {"a": self.a(h), "b": self.b(h)}


def test_autoround_output_weights_scale_each_output_in_loss_and_score():
    import copy

    torch.manual_seed(0)
    model = _TwoHeads()
    batches = [torch.randn(16, 16) for _ in range(3)]
    cfg = q.WeightQuantConfig(bits=3, granularity="per_group", group_size=16)
    opts = dict(steps=12, holdout=1, eval_every=3, init="rtn")

    def run(options, forward=None):
        work = copy.deepcopy(model)
        layers = [([(n, m)], cfg) for n, m in work.named_children()]
        return autoround_quantize(work, layers, batches, options, forward=forward)

    # weight 0 on "b": exactly the run that never sees "b" (same losses, same scores, same codes)
    only_a = run(AutoRound(**opts), forward=lambda m, x: {"a": m(x)["a"]})
    zero_b = run(AutoRound(weights={"b": 0.0}, **opts))
    both = run(AutoRound(**opts))
    assert zero_b.train_loss == only_a.train_loss and zero_b.history == only_a.history
    assert all(torch.equal(zero_b.packed[n].qweight, only_a.packed[n].qweight) for n in only_a.packed)
    assert both.train_loss != only_a.train_loss
    # weights {a: 3, b: 1}: the score is (3 e_a + e_b) / 4 of the normalised errors (of the same starting point)
    only_b = run(AutoRound(**opts), forward=lambda m, x: {"b": m(x)["b"]})
    w31 = run(AutoRound(weights={"a": 3, "b": 1}, **opts))
    assert w31.history[0][1] == pytest.approx((3 * only_a.history[0][1] + only_b.history[0][1]) / 4, rel=1e-6)
    assert both.history[0][1] == pytest.approx((only_a.history[0][1] + only_b.history[0][1]) / 2, rel=1e-6)
    assert AutoRound(weights={"b": 0, "a": 2}).weights == (("a", 2.0), ("b", 0.0))
    assert AutoRound(weights={"a": 1}) == AutoRound(weights=[("a", 1.0)])
    with pytest.raises(ValueError, match=r"weights name outputs \['c'\]"):
        run(AutoRound(weights={"c": 1.0}, **opts))
    with pytest.raises(ValueError, match="every output weight 0"):
        run(AutoRound(weights={"a": 0, "b": 0}, **opts))
    for bad, err in [({"a": -1.0}, ValueError), ({"a": float("inf")}, ValueError), ({"a": True}, ValueError),
                     ({1: 1.0}, TypeError), (3.0, TypeError)]:
        with pytest.raises(err, match="weight"):
            AutoRound(weights=bad)


def test_autoround_counts_passes_over_the_training_batches_and_warns_on_reuse(caplog):
    import copy
    import logging

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    batches = [torch.randn(8, 16) for _ in range(5)]
    cfg = q.WeightQuantConfig(bits=4, granularity="per_group", group_size=16)

    def run(steps):
        work = copy.deepcopy(model)
        layers = [([(n, m)], cfg) for n, m in work.named_children() if isinstance(m, nn.Linear)]
        with caplog.at_level(logging.WARNING, logger="gradcomp.quant.algorithms.autoround"):
            caplog.clear()
            res = autoround_quantize(work, layers, batches, AutoRound(steps=steps, holdout=1, init="rtn"))
        return res, [r.getMessage() for r in caplog.records]

    res, msgs = run(8)   # 4 training batches, each used twice: no warning
    assert res.passes == 2.0 and not msgs
    res, msgs = run(9)
    assert res.passes == 2.25 and len(msgs) == 1 and "9 steps over 4 training batches" in msgs[0]
