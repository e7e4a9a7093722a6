"""What each wire format's codes and scales mean: fp8 against torch's float8 dtypes, the OCP MX scale rule,
E2M1's rounding, the rotation, the fitted step, and the error-feedback invariant of every format."""

from __future__ import annotations

import math

import pytest
import torch

from gradcomp import codec
from gradcomp.codec import kernels
from gradcomp.codec.formats import FORMATS, format_names, wire_format
from gradcomp.codec.kernels import reference as ref

B = 256


def _encode(x, fmt, **kw):
    with kernels.force("eager"):
        return codec.encode_blocks(x, fmt, **kw)


def _decode(codes, scale, fmt):
    with kernels.force("eager"):
        return codec.decode_blocks(codes, scale, fmt)


@pytest.mark.parametrize("name,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_codes_are_torchs_float8_conversion_with_saturation(name, dtype):
    """With a block whose absmax is the format's max (scale 1), the codes are torch's float8 bits:
    round to nearest even, subnormals included; what rounds past the max saturates instead of a nan."""
    fmt = wire_format(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, B, generator=g) * torch.logspace(-14, 4, 400).unsqueeze(1)
    x = x.clamp(-fmt.max_code, fmt.max_code)
    x[:, 0] = fmt.max_code
    # exact ties between neighbouring codes and the smallest subnormals
    vals = ref.element_values(fmt)
    finite = vals[torch.isfinite(vals) & (vals >= 0)].sort().values
    mids = (finite[1:] + finite[:-1]) / 2
    x[0, 1 : 1 + mids.numel()] = mids[: B - 1]
    codes, scale = _encode(x, fmt)
    assert torch.all(scale == 1.0)
    assert torch.equal(codes, x.to(dtype).view(torch.uint8))
    # the block's absmax divided by its scale may land an ulp above the max: it saturates, never a nan code
    g = torch.Generator().manual_seed(1)
    y = torch.rand(2000, B, generator=g) * torch.logspace(-3, 3, 2000).unsqueeze(1)
    codes, scale = _encode(y, fmt)
    out = _decode(codes, scale, fmt)
    assert torch.isfinite(out).all() and torch.allclose(out.abs().amax(1), y.amax(1), rtol=1e-6)


def test_e2m1_rounds_to_nearest_even_and_saturates_at_6():
    fmt = wire_format("mxfp4")
    # one group of 32 whose absmax 7 gives X = 2**(2 - 2) = 1: the values are the elements themselves
    x = torch.zeros(1, 32)
    pairs = [(7.0, 6.0), (0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),
             (-5.5, -6.0), (0.2, 0.0), (-0.3, -0.5), (2.9, 3.0)]
    for i, (v, _) in enumerate(pairs):
        x[0, i] = v
    codes, scale = _encode(x, fmt)
    assert scale.tolist() == [[127]]
    out = _decode(codes, scale, fmt)
    assert out[0, : len(pairs)].tolist() == [w for _, w in pairs]


@pytest.mark.parametrize("name", ["mxint8", "mxfp8", "mxfp4"])
def test_mx_shared_exponent_is_the_ocp_choice(name):
    """X = 2**(floor(log2(amax)) - emax_elem), the byte k = E(amax) - emax_elem; zero and denormal groups k = 0;
    a group with a nan or an inf k = 255 (NaN) and decodes to nan; the other groups are untouched."""
    fmt = wire_format(name)
    x = torch.zeros(1, 7 * 32)
    g = torch.Generator().manual_seed(1)
    for j, amax in enumerate((1.0, 3.0, 1e-30, 6e4)):
        x[0, 32 * j : 32 * (j + 1)] = torch.rand(32, generator=g) * amax
        x[0, 32 * j] = amax
    x[0, 4 * 32 : 5 * 32] = 1e-40  # fp32 denormals
    x[0, 5 * 32 + 3] = float("nan")
    x[0, 6 * 32 + 5] = float("-inf")
    codes, scale = _encode(x, fmt)
    ks = scale[0].tolist()
    want = [127 + math.floor(math.log2(a)) - fmt.emax_elem for a in (1.0, 3.0, 1e-30, 6e4)]
    assert ks == want + [0, 255, 255]
    out = _decode(codes, scale, fmt)
    assert torch.isnan(out[0, 5 * 32 :]).all() and torch.isfinite(out[0, : 5 * 32]).all()
    # a zero group: byte 0 and zero codes
    zc, zs = _encode(torch.zeros(1, 32), fmt)
    assert zs.tolist() == [[0]] and zc.eq(fmt.zero_byte).all()
    # relative error of the elements: the element format's resolution, never more
    rel = ((out[0, :128] - x[0, :128]).abs() / x[0, :128].abs().clamp_min(1e-38))
    big = x[0, :128].abs() >= x[0, :128].view(4, 32).abs().amax(1).repeat_interleave(32) / 4
    # half a step at the smallest such value, or the saturation above the element's max (E4M3 448 of up to 512)
    bound = {"mxint8": 2.0 ** -5, "mxfp8": 2.0 ** -4, "mxfp4": 0.25}[name]
    assert rel[big].max() <= bound


def test_rotation_is_an_orthonormal_randomized_hadamard_transform_fixed_for_every_run():
    assert ref.fwht(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).tolist() == [[10.0, -2.0, -4.0, 0.0]]
    s1, s2 = ref.rotation_signs(256), ref.rotation_signs(256)
    assert torch.equal(s1, s2) and set(s1.unique().tolist()) == {-1.0, 1.0} and not s1.eq(s1[0]).all()
    x = torch.randn(50, 256, generator=torch.Generator().manual_seed(2))
    for block in (16, 64, 256, 512):
        xb = x.reshape(-1, block)
        y = kernels.rotate_blocks(xb)
        assert torch.allclose(y.norm(dim=1), xb.norm(dim=1), rtol=1e-5)
        assert torch.allclose(kernels.rotate_blocks(y, inverse=True), xb, atol=1e-5)
    # one outlier spreads over the whole block: the absmax falls from 100 to 100/16
    spike = torch.zeros(1, 256)
    spike[0, 7] = 100.0
    assert torch.allclose(kernels.rotate_blocks(spike).abs(), torch.full((1, 256), 100.0 / 16))


def test_a_fitted_step_is_step_times_rms_without_overflow():
    fmt = wire_format("int2r")
    x = torch.randn(64, B, generator=torch.Generator().manual_seed(3))
    c = kernels.rotate_blocks(x)
    _, scale = _encode(x, fmt)
    rms = c.pow(2).mean(1).sqrt()
    assert torch.allclose(scale, rms * fmt.rms_step, rtol=1e-5)
    # 1e30 squared would overflow fp32: the prescale by a power of two keeps it finite and exact
    # (around 1e36 the rotation's own sums would overflow: the block is then reported non-finite)
    _, big = _encode(x * 1e30, fmt)
    assert torch.isfinite(big).all() and torch.allclose(big, scale * 1e30, rtol=1e-5)
    _, zero = _encode(torch.zeros(2, B), fmt)
    assert zero.eq(0).all()
    # Gaussian blocks: the fitted step's SQNR is the 3-level optimum (about 7.2 dB), absmax gives about 1.9
    codes, scale = _encode(x, fmt)
    err = _decode(codes, scale, fmt) - x
    assert 10 * math.log10(float(x.pow(2).sum() / err.pow(2).sum())) > 6.8


@pytest.mark.parametrize("name", format_names())
def test_error_feedback_invariant_of_every_format(name):
    """What is sent plus the new residual is what was to be sent: ``c == dequantized + residual`` (rotated space
    for a rotated format), and every value decodes finite; the bytes are the format's."""
    fmt = wire_format(name)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, B, generator=g) * torch.logspace(-6, 2, 12).unsqueeze(1)
    r_in = torch.randn(12, B, generator=g) * 1e-3
    r_out = torch.empty_like(r_in)
    codes, scale = _encode(x, fmt, residual=r_in, residual_out=r_out)
    assert codes.shape == (12, B * fmt.bits // 8) and scale.shape == kernels.scale_shape(fmt, 12, B)
    out = _decode(codes, scale, fmt)
    c = (kernels.rotate_blocks(x) if fmt.rotate else x) + r_in
    sent = kernels.rotate_blocks(out) if fmt.rotate else out
    assert torch.allclose(sent + r_out, c, rtol=1e-5, atol=1e-6 * float(c.abs().max()))
    assert torch.isfinite(out).all() and bool(kernels.scales_finite(scale, fmt))
    rel = float((sent - c).norm() / c.norm())
    assert rel < {8: 0.08, 4: 0.25, 2: 0.9}[fmt.bits], rel


@pytest.mark.parametrize("name", format_names())
def test_a_nonfinite_value_makes_its_block_nonfinite_and_is_never_saturated(name):
    """A nan or an inf in a group (a rotated format: the block) makes every value of it decode non-finite."""
    fmt = wire_format(name)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(3, B, generator=torch.Generator().manual_seed(5))
        x[1, 17] = bad
        codes, scale = _encode(x, fmt)
        assert not bool(kernels.scales_finite(scale, fmt))
        out = _decode(codes, scale, fmt)
        group = fmt.group or B
        first = 0 if fmt.rotate or not fmt.group else 17 // group * group
        blk = out[1, first : (first + group) if not fmt.rotate else B]
        # nan everywhere, or inf where a mid-rise level times an infinite scale is: never finite
        assert not torch.isfinite(blk).any(), f"{name}: a {bad} did not make its group non-finite"
        assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
        poisoned = scale.clone()
        kernels.poison_scales_(poisoned, fmt)
        assert not bool(kernels.scales_finite(poisoned[:1], fmt))


def test_every_registered_format_has_kernels_on_this_machine():
    """A new registry entry without kernels fails here: every format encodes, reduces and decodes on every backend."""
    from gradcomp.codec.kernels import native

    x = torch.randn(4, B)
    for fmt in FORMATS.values():
        c = torch.empty(4, B * fmt.bits // 8, dtype=torch.uint8)
        s = kernels.empty_scales(fmt, 4, B)
        if native.available():
            assert native.encode(x, None, None, None, c, s, fmt), f"the native kernels refused {fmt.name}"
