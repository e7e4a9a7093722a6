"""GPTQ, awq_clip and HQQ on Conv2d through the unfolded view (groups included); warnings and strict for what a method skips."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradcomp.quant as q
from gradcomp.quant.algorithms import collect_input_hessians
from gradcomp.quant.algorithms.conv import conv_patches

pytestmark = pytest.mark.usefixtures("one_thread")

INT4 = q.WeightQuantConfig(bits=4, granularity="per_group", group_size=32)


def _images(n, c=8, size=14, seed=0):
    """Correlated inputs (smoothed noise with a few strong channels), as real feature maps are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g)
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    return x * torch.linspace(0.2, 3.0, c).reshape(1, c, 1, 1)


def _net(groups=1, **kw):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=groups, **kw), nn.ReLU(), nn.Conv2d(16, 8, 3, groups=groups))


def _out_error(model, ref, batches):
    num = den = 0.0
    with torch.no_grad():
        for x in batches:
            a, b = model[0](x), ref[0](x)
            num += float(((a - b) ** 2).sum())
            den += float((b ** 2).sum())
    return num / den


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_the_conv_hessian_is_the_gram_matrix_of_the_unfolded_patches(groups):
    m = _net(groups)
    x = _images(3)
    h = collect_input_hessians(m, {"0": m[0]}, [x])["0"]
    k = (8 // groups) * 9
    assert h.shape == (groups, k, k)
    cols = F.unfold(x, 3, padding=1)                       # N, 8*9, L
    for g in range(groups):
        xg = cols[:, g * k:(g + 1) * k, :].permute(0, 2, 1).reshape(-1, k).double()
        assert torch.allclose(h[g], xg.T @ xg, rtol=1e-4, atol=1e-3)
    assert conv_patches(m[0], x).shape == (groups, 3 * 14 * 14, k)


@pytest.mark.parametrize("method", ["gptq", "awq_clip"])
@pytest.mark.parametrize("groups", [1, 2])
def test_data_aware_methods_beat_round_to_nearest_on_convolutions(method, groups):
    ref = _net(groups)
    calib, held = [_images(4, seed=s) for s in range(4)], [_images(4, seed=10 + s) for s in range(2)]
    rtn = q.quantize_(copy.deepcopy(ref), INT4, filter_fn=lambda m, n: n == "0")
    aware = q.quantize_(copy.deepcopy(ref), INT4, filter_fn=lambda m, n: n == "0", method=method, calibration=calib)
    e_rtn, e_aware = _out_error(rtn, ref, held), _out_error(aware, ref, held)
    assert e_aware < (0.7 if method == "gptq" else 0.9) * e_rtn, (e_aware, e_rtn)
    assert isinstance(aware[0], q.QuantizedConv2d) and aware[0].packed.config == INT4


def test_depthwise_and_padding_modes_are_covered():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(8, 8, (3, 5), padding=(1, 2), groups=8, padding_mode="reflect", bias=False))
    calib = [_images(4, seed=s) for s in range(3)]
    cfg = q.WeightQuantConfig(bits=3, granularity="per_channel")
    rtn = q.quantize_(copy.deepcopy(ref), cfg)
    g = q.quantize_(copy.deepcopy(ref), cfg, method="gptq", calibration=calib)
    held = [_images(4, seed=20)]
    assert _out_error(g, ref, held) < _out_error(rtn, ref, held)


def test_a_method_names_the_layers_it_does_not_cover_and_strict_refuses(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"does not cover 1 layers \(strict=True\): '0' \(a per-column input scale"):
        q.quantize_(model, INT4, method="awq_scale", calibration=calib, strict=True)
    assert isinstance(model[0], nn.Conv2d) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with caplog.at_level(logging.WARNING, logger="gradcomp.quant.modules"):
        q.quantize_(model, INT4, method="awq_scale", calibration=calib)
    assert any("'0'" in r.getMessage() and "round-to-nearest" in r.getMessage() for r in caplog.records)
    assert isinstance(model[0], q.QuantizedConv2d) and isinstance(model[2], q.QuantizedLinear)
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="'0' \\(an Embedding has no input Hessian\\)"):
        q.quantize_(emb, q.WeightQuantConfig(bits=4, granularity="per_channel"), method="gptq",
                    calibration=[torch.randint(0, 10, (4, 3))], strict=True)


def test_gptq_on_conv_needs_no_warning_and_saves_like_rtn(tmp_path, caplog):
    ref = _net(2)
    with caplog.at_level(logging.WARNING, logger="gradcomp.quant.modules"):
        m = q.quantize_(copy.deepcopy(ref), INT4, method="gptq", calibration=[_images(4, seed=s) for s in range(2)], strict=True)
    assert not [r for r in caplog.records if "does not cover" in r.getMessage()]
    q.save_quantized(m, tmp_path / "g.safetensors")
    fresh = q.load_quantized(_net(2), tmp_path / "g.safetensors")
    x = _images(2, seed=5)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_hqq_fits_conv_weights_without_data():
    ref = _net()
    cfg = q.WeightQuantConfig(bits=3, granularity="per_group", group_size=24, symmetric=False)
    rtn = q.quantize_(copy.deepcopy(ref), cfg)
    h = q.quantize_(copy.deepcopy(ref), cfg, method="hqq", strict=True)
    w = ref[0].weight
    e = lambda m: float(((m[0].packed.dequantize() - w) ** 2).sum())
    assert e(h) < e(rtn)


def test_sequential_gptq_covers_convolutions():
    ref = _net()
    calib = [_images(4, seed=s) for s in range(3)]
    m = q.quantize_(copy.deepcopy(ref), INT4, method="gptq", calibration=calib, sequential=True, strict=True)
    assert all(isinstance(m[i], q.QuantizedConv2d) for i in (0, 2))
