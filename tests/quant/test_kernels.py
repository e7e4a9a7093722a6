"""Fast CPU kernels of QuantizedLinear: same files, results within bf16 / fp32-sum tolerances of the dequantize path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import gradcomp.quant as q
from gradcomp.quant import kernels
from gradcomp.quant.activation_quant import prepare_activation_quant_
from gradcomp.quant.configs import ActQuantConfig

pytestmark = pytest.mark.skipif(not kernels.kernels_available(), reason="this PyTorch has no CPU int8/int4 kernels")

INT8 = q.WeightQuantConfig(bits=8)
FITS = [INT8, q.WeightQuantConfig(bits=8, granularity="per_tensor"),
        q.WeightQuantConfig(bits=4, granularity="per_group", group_size=32),
        q.WeightQuantConfig(bits=4, granularity="per_group", group_size=128, symmetric=False)]


def _model(out=64, inp=256, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inp, out))


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("config", FITS, ids=lambda c: c.name)
def test_weight_only_kernels_match_the_dequantize_path(config):
    m = q.quantize_(_model(), config)
    lin = m[0]
    assert kernels.weight_kernel(config, lin.packed.shape) in ("int8", "int4")
    x = torch.randn(5, 3, 256)
    with torch.no_grad():
        exact = lin(x)                                   # fp32 input: dequantize route, as before
        assert not lin._kernel_cache
        assert torch.equal(exact, nn.functional.linear(x, lin.packed.dequantize(), lin.bias))
        xb = x.bfloat16()
        ref_b = nn.functional.linear(xb.float(), lin.packed.dequantize(), lin.bias)
        got_b = lin(xb)                                  # bf16 input: the kernel
        assert lin._kernel_cache and got_b.dtype == torch.bfloat16 and got_b.shape == (5, 3, 64)
        assert _rel(got_b, ref_b) < 1e-2
        lin.compute_dtype = torch.bfloat16               # fp32 input computed in bf16
        got = lin(x)
        assert got.dtype == torch.float32 and _rel(got, exact) < 1e-2


@pytest.mark.parametrize("config", [q.WeightQuantConfig(bits=4, granularity="per_group", group_size=32, symmetric=False),
                                    q.WeightQuantConfig(bits=3, granularity="per_group", group_size=32),
                                    q.WeightQuantConfig(bits=8, symmetric=False)], ids=lambda c: c.name)
def test_formats_without_a_kernel_fall_back_exactly(config):
    m = q.quantize_(_model(out=31 if config.bits == 4 else 64), config)   # int4 needs out % 16 == 0
    lin = m[0]
    lin.compute_dtype = torch.bfloat16
    x = torch.randn(4, 256).bfloat16()
    with torch.no_grad():
        got = lin(x)
    assert not lin._kernel_cache
    assert torch.equal(got, nn.functional.linear(x, lin.packed.dequantize(torch.bfloat16), lin.bias.bfloat16()))


def test_kernels_leave_files_and_gradients_alone(tmp_path):
    m = q.quantize_(_model(), FITS[2])
    q.save_quantized(m, tmp_path / "a.safetensors")
    m[0].compute_dtype = torch.bfloat16
    with torch.no_grad():
        m(torch.randn(2, 256))
    assert m[0]._kernel_cache
    q.save_quantized(m, tmp_path / "b.safetensors")
    from safetensors import safe_open

    files = []
    for name in ("a", "b"):
        with safe_open(str(tmp_path / f"{name}.safetensors"), framework="pt") as f:
            files.append((f.metadata(), {k: f.get_tensor(k) for k in f.keys()}))
    (meta_a, ta), (meta_b, tb) = files
    assert meta_a == meta_b and set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert set(m.state_dict()) == {"0.bias", "0.packed.qweight", "0.packed.scale"}
    # with a gradient to compute, the differentiable dequantize route runs
    x = torch.randn(2, 256, requires_grad=True)
    m(x).sum().backward()
    assert torch.allclose(x.grad, m[0].packed.dequantize().sum(0).expand(2, -1))


def test_dynamic_w8a8_runs_int_mm_with_the_fake_quant_codes():
    m = q.quantize_(_model(out=96, inp=128), INT8)
    prepare_activation_quant_(m, ActQuantConfig(bits=8, dynamic=True, granularity="per_token", symmetric=True))
    ref = copy.deepcopy(m)
    ref[0].use_kernels = False
    x = torch.randn(40, 128) * torch.linspace(0.1, 4, 128)
    calls = []
    real = torch._int_mm
    try:
        torch._int_mm = lambda a, b: calls.append(1) or real(a, b)
        with torch.no_grad():
            got = m(x)
    finally:
        torch._int_mm = real
    with torch.no_grad():
        want = ref(x)                                      # fake-quantized x times the dequantized weight
    assert calls, "the int8 kernel did not run"
    assert _rel(got, want) < 1e-6
    # with a gradient: the fake-quant route with the straight-through estimator, identical to the reference
    xg = x.clone().requires_grad_(True)
    out = m(xg)
    assert torch.equal(out, ref(x))
    out.sum().backward()
    assert xg.grad is not None and bool((xg.grad != 0).all())
