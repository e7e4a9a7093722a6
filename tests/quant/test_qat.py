"""Quantization-aware fine-tuning of weights: learned scales, straight-through gradients, exported by save_quantized."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import gradcomp.quant as q
from gradcomp.quant.fake_quant import fake_quantize_weight
from gradcomp.quant.qat import LearnedWeightQuant, convert_qat_, prepare_qat_, qat_layers

pytestmark = pytest.mark.usefixtures("one_thread")

INT4 = q.WeightQuantConfig(bits=4, granularity="per_group", group_size=16)
INT4_ASYM = q.WeightQuantConfig(bits=4, granularity="per_channel", symmetric=False)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


@pytest.mark.parametrize("cfg", [INT4, INT4_ASYM, q.WeightQuantConfig(bits=8, granularity="per_tensor")], ids=lambda c: c.name)
def test_the_start_is_round_to_nearest_and_gradients_reach_weights_and_scales(cfg):
    m = _net()
    ref = copy.deepcopy(m)
    names = prepare_qat_(m, cfg)
    assert names == ["0", "3"]
    for name in names:
        assert torch.equal(m.get_submodule(name).weight, fake_quantize_weight(ref.get_submodule(name).weight, cfg))
    x = torch.randn(4, 3, 8, 8)
    m(x).square().mean().backward()
    fq = qat_layers(m)["3"]
    assert fq.scale.grad is not None and bool((fq.scale.grad != 0).any())
    assert m[3].parametrizations.weight.original.grad is not None


def test_fine_tuning_lowers_the_loss_and_the_export_computes_the_same(tmp_path):
    torch.manual_seed(0)
    teacher = _net()
    data = [torch.randn(16, 3, 8, 8) for _ in range(8)]
    student = copy.deepcopy(teacher)
    rtn = q.quantize_(copy.deepcopy(teacher), q.WeightQuantConfig(bits=2, granularity="per_channel"))
    prepare_qat_(student, q.WeightQuantConfig(bits=2, granularity="per_channel"))
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)

    def loss_of(model):
        with torch.no_grad():
            return sum(float((model(x) - teacher(x)).square().mean()) for x in data)

    start = loss_of(student)
    assert start == pytest.approx(loss_of(rtn), rel=1e-5)
    for step in range(150):
        x = data[step % len(data)]
        loss = (student(x) - teacher(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned = loss_of(student)
    assert tuned < 0.7 * start
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        want = student(x)
    convert_qat_(student)
    assert isinstance(student[0], q.QuantizedConv2d) and isinstance(student[3], q.QuantizedLinear)
    with torch.no_grad():
        assert torch.allclose(student(x), want, rtol=1e-5, atol=1e-6)
    q.save_quantized(student, tmp_path / "qat.safetensors")
    fresh = q.load_quantized(_net(), tmp_path / "qat.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), student(x))


def test_qat_starts_from_any_method_and_keeps_activation_quantizers():
    teacher = _net()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    m = q.quantize_(copy.deepcopy(teacher), INT4, method="gptq", calibration=calib)
    q.quantize_activations_(m, q.ActQuantConfig(bits=8, observer="minmax"), calib)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        before = m(x)
    prepare_qat_(m)                                            # no rules: the quantized layers, each its own config
    with torch.no_grad():
        assert torch.allclose(m(x), before, atol=1e-6)         # GPTQ's codes and scales are the start
    assert isinstance(m[0].input_quantizer, q.ActivationQuantizer)
    convert_qat_(m)
    with torch.no_grad():
        assert torch.allclose(m(x), before, atol=1e-6)


def test_bad_selections_change_nothing():
    m = _net()
    with pytest.raises(ValueError, match="QAT learns integer formats"):
        prepare_qat_(m, [("0", q.WeightQuantConfig(bits=4, granularity="per_channel")), ("3", q.CastConfig("fp16"))])
    assert not qat_layers(m) and type(m[0]) is nn.Conv2d
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        prepare_qat_(m, [("nothing", INT4)])
    with pytest.raises(ValueError, match="prepare_qat_ first"):
        convert_qat_(m)
    with pytest.raises(TypeError):
        LearnedWeightQuant(q.CastConfig("fp16"), (2, 2), torch.ones(1), None)
