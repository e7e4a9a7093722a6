"""Straight-through gradients at the edges of the code range, and observers on channels never seen."""

from __future__ import annotations

import math

import pytest
import torch

from gradcomp import codec
from gradcomp.quant import (
    ActQuantConfig,
    PerChannelMinMaxObserver,
    PerTokenMinMaxObserver,
    fake_quantize_ste,
    fake_quantize_with_qparams,
    quantize_activations_,
)


def _ste_grad(x, scale, zp, bits, axis=None):
    x = x.clone().requires_grad_(True)
    fake_quantize_ste(x, scale, zp, bits, axis).sum().backward()
    return x.grad


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_ste_passes_gradient_at_every_row_extreme(symmetric, bits):
    # Per-token scales from each row's own range: the forward never clips a value of its own row, so
    # every element, the row's min and max included, must get the gradient (PyTorch's rule: the code
    # round(x / s) + zp lies inside [qmin, qmax]).
    torch.manual_seed(0)
    x = torch.randn(1000, 64)
    obs = PerTokenMinMaxObserver(bits=bits, symmetric=symmetric)
    obs(x)
    scale, zp = obs.calculate_qparams()
    g = _ste_grad(x, scale, zp, bits)
    assert int((g == 0).sum()) == 0
    assert torch.equal(g, torch.ones_like(x))


def test_ste_mask_is_the_code_range_per_tensor_and_per_channel():
    torch.manual_seed(1)
    x = torch.randn(50, 16) * torch.linspace(0.1, 3.0, 16)
    for axis in (None, -1):
        if axis is None:
            lo, hi = x.min(), x.max()
        else:
            lo, hi = x.amin(0), x.amax(0)
        # a range narrower than the data: some values are clipped and must get no gradient
        scale, zp = codec.choose_qparams(lo * 0.5, hi * 0.5, 8, False)
        g = _ste_grad(x, scale, zp, 8, axis)
        shape = [1, -1] if axis is not None else []
        s = scale.reshape(shape) if shape else scale
        z = zp.float().reshape(shape) if shape else zp.float()
        code = torch.round(x / s) + z
        want = ((code >= 0) & (code <= 255)).float()
        assert torch.equal(g, want)
        assert 0 < int(want.sum()) < x.numel()
        # the forward is untouched
        y = fake_quantize_ste(x.clone().requires_grad_(True), scale, zp, 8, axis)
        assert torch.equal(y.detach(), fake_quantize_with_qparams(x, scale, zp, 8, axis))


def test_ste_value_half_a_step_outside_the_range_keeps_gradient():
    # symmetric 8 bits, scale 1/127: 1.003 rounds to code 127 (kept by the forward, so it gets the
    # gradient); 1.0045 rounds to 128 and is clipped (no gradient).
    scale = torch.tensor(1.0 / 127)
    g = _ste_grad(torch.tensor([1.003, 1.0045, -1.003, -1.0045]), scale, None, 8)
    assert g.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_per_channel_observer_unseen_channel_keeps_a_safe_range():
    obs = PerChannelMinMaxObserver(bits=8, symmetric=False, axis=-1)
    x = torch.tensor([[1.0, -2.0, math.nan], [3.0, 4.0, math.inf]])
    obs(x)
    lo, hi = obs.clip_range()
    assert lo.tolist()[:2] == [1.0, -2.0] and hi.tolist()[:2] == [3.0, 4.0]
    # the channel never seen finite gets the widest range seen on any channel, not [0, 0]
    assert lo[2].item() == -2.0 and hi[2].item() == 4.0
    assert obs.unseen_channels.tolist() == [2]
    assert "unseen_channels=1" in repr(obs)
    scale, zp = obs.calculate_qparams()
    assert float(scale[2]) > 0
    y = fake_quantize_with_qparams(torch.tensor([[0.0, 0.0, 3.5]]), scale, zp, 8, axis=-1)
    assert abs(float(y[0, 2]) - 3.5) < float(scale[2])


def test_static_per_channel_quantizer_does_not_zero_a_channel_missing_from_calibration():
    lin = torch.nn.Sequential(torch.nn.Linear(4, 3))
    torch.manual_seed(2)
    calib = torch.randn(32, 4)
    calib[:, 3] = math.nan   # channel 3 (an element absent from calibration) is never seen finite
    quantize_activations_(lin, ActQuantConfig(bits=8, observer="per_channel"), [calib])
    q = lin[0].input_quantizer
    x = torch.randn(8, 4).clamp(-1.5, 1.5)
    y = q(x)
    # before: channel 3 had the range [0, 0] and came out as all zeros
    assert torch.count_nonzero(y[:, 3]) > 0
    assert float((y[:, 3] - x[:, 3]).abs().max()) <= float(q.scale[3])
