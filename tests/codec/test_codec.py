"""Single-process properties of the codec: error bounds, rounding, packing, odd lengths, non-finite blocks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcomp import codec
from gradcomp.codec import packing

BITS = (2, 3, 4, 8)


def _tensor(seed: int, n: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float32) * scale).to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 3000),
    bits=st.sampled_from(BITS),
    block=st.sampled_from([1, 7, 8, 32, 100, 256]),
    symmetric=st.booleans(),
    log_scale=st.floats(-30, 30),
)
def test_round_to_nearest_error_is_at_most_half_a_scale(seed, n, bits, block, symmetric, log_scale):
    x = _tensor(seed, n, 10.0**log_scale)
    q = codec.quantize(x, bits, block, symmetric=symmetric)
    y = codec.dequantize(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    nb = q.scale.numel()
    assert nb == -(-n // block)
    err = (x - y).abs()
    padded = torch.zeros(nb * block)
    padded[:n] = err
    # half a scale, plus a few ulps of the scale arithmetic
    bound = q.scale * (0.5 + 1e-5) + 1e-45
    assert torch.all(padded.view(nb, block) <= bound.unsqueeze(1)), float((padded.view(nb, block) - bound.unsqueeze(1)).max())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_equals_quantize_then_dequantize(bits, symmetric):
    x = _tensor(1, 1001)
    assert torch.equal(codec.fake_quantize(x, bits, 64, symmetric=symmetric), codec.dequantize(codec.quantize(x, bits, 64, symmetric=symmetric)))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_is_unbiased_and_reproducible(bits):
    x = torch.full((256,), 0.3)
    x[0] = 1.0  # sets the scale: 1/qmax
    qmax = 2 ** (bits - 1) - 1
    reps = 4000
    means = torch.zeros(256)
    for s in range(reps):
        means += codec.fake_quantize(x, bits, 256, stochastic=True, seed=s)
    means /= reps
    scale = 1.0 / qmax
    # standard error of the mean is at most scale / (2 sqrt(reps))
    assert torch.allclose(means[1:], torch.full((255,), 0.3), atol=5 * scale / (2 * math.sqrt(reps)) + 1e-6)
    # round to nearest is biased on the same data unless 0.3 lies on the grid
    a = codec.fake_quantize(x, bits, 256, stochastic=True, seed=7)
    b = codec.fake_quantize(x, bits, 256, stochastic=True, seed=7)
    c = codec.fake_quantize(x, bits, 256, stochastic=True, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), bits=st.sampled_from(BITS), seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(n, bits, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    packed = codec.pack_codes(codes, bits)
    assert packed.numel() == codec.packed_nbytes(n, bits) == math.ceil(n * bits / 8) + (0 if bits != 3 else (-(-n // 8) * 3 - math.ceil(n * 3 / 8)))
    assert torch.equal(codec.unpack_codes(packed, bits, n), codes)


def test_int4_packs_two_per_byte_low_nibble_first():
    codes = torch.tensor([1, 2, 15, 0], dtype=torch.uint8)
    assert codec.pack_codes(codes, 4).tolist() == [0x21, 0x0F]
    assert codec.pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]


@pytest.mark.parametrize("bits", [4, 2])
def test_hook_packing_writes_the_wire_format_into_strided_views(bits):
    # the exchange kernels pack whole rows with integer folds; the bytes must be pack_codes' bytes
    g = torch.Generator().manual_seed(bits)
    rows, block, per = 37, 256, 8 // bits
    codes = torch.randint(0, 2**bits, (rows, block), generator=g, dtype=torch.uint8)
    codes[0] = 2**bits - 1  # every field full
    codes[1] = 0
    buf = torch.full((rows, block // per + 8), 0xAB, dtype=torch.uint8)  # a row of a message: strided
    out = buf[:, 3 : 3 + block // per]
    packing.pack_rows_into(codes, out, bits)
    assert torch.equal(out.reshape(-1), codec.pack_codes(codes.reshape(-1), bits))
    assert (buf[:, :3] == 0xAB).all() and (buf[:, 3 + block // per :] == 0xAB).all()  # nothing else written
    back = torch.full((2, rows, block), 0xCD, dtype=torch.uint8)
    packing.unpack_rows_into(torch.stack([out, out.flip(0)]), back, bits)  # (P, rows, bytes) of strided rows
    assert torch.equal(back[0], codes) and torch.equal(back[1], codes.flip(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
def test_half_precision_inputs(dtype, bits):
    x = _tensor(3, 999, dtype=dtype)
    q = codec.quantize(x, bits, 128)
    y = codec.dequantize(q)
    assert y.dtype == dtype
    assert codec.sqnr_db(x.float(), y.float()) > (35 if bits == 8 else 15)


@pytest.mark.parametrize("magnitude", [1e-30, 1e30, 3e38])
@pytest.mark.parametrize("bits", [4, 8])
def test_tiny_and_huge_magnitudes_survive(magnitude, bits):
    x = _tensor(4, 512)
    x = x / x.abs().max() * magnitude  # the largest element is exactly `magnitude`
    assert torch.isfinite(x).all()
    y = codec.fake_quantize(x, bits, 256)
    assert torch.isfinite(y).all()
    assert codec.sqnr_db(x.double(), y.double()) > (35 if bits == 8 else 15)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_nonfinite_block_dequantizes_nonfinite_and_leaves_other_blocks(bad, bits, symmetric):
    x = _tensor(5, 300)
    x[70] = bad
    y = codec.dequantize(codec.quantize(x, bits, 64, symmetric=symmetric))
    assert not torch.isfinite(y[64:128]).any()  # the whole block, never finite garbage
    assert torch.isfinite(y[:64]).all() and torch.isfinite(y[128:]).all()


def test_error_feedback_invariant():
    """original == transmitted + residual, for the exchange's own encode and decode kernels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=g)
    residual = torch.randn(40, 64, generator=g) * 0.01
    for bits in (2, 4, 8):
        new_res = torch.empty_like(residual)
        codes, scale = codec.encode_blocks(x, bits, residual=residual, residual_out=new_res)
        sent = codec.decode_blocks(codes, scale, bits)
        # up to fp32 rounding of one subtraction
        torch.testing.assert_close(sent + new_res, x + residual, rtol=0, atol=1e-6)
        assert new_res.abs().max() <= scale.max() / 2 * (1 + 1e-5)


def test_error_feedback_accumulates_to_the_truth():
    """Summed over many steps, what error feedback transmits differs from the true sum by one residual."""
    g = torch.Generator().manual_seed(1)
    residual = torch.zeros(8, 64)
    true_sum = torch.zeros(8, 64)
    sent_sum = torch.zeros(8, 64)
    for _ in range(200):
        x = torch.randn(8, 64, generator=g)
        codes, scale = codec.encode_blocks(x, 2, residual=residual, residual_out=residual)  # in place
        true_sum += x
        sent_sum += codec.decode_blocks(codes, scale, 2)
    torch.testing.assert_close(sent_sum + residual, true_sum, rtol=0, atol=1e-3)


def test_metrics():
    x = torch.tensor([3.0, 4.0])
    assert codec.mse(x, x) == 0.0 and codec.sqnr_db(x, x) == math.inf
    assert codec.mse(x, torch.tensor([3.0, 3.0])) == 0.5
    assert codec.sqnr_db(x, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0))
    assert codec.cosine_similarity(x, 2 * x) == pytest.approx(1.0)
    assert codec.cosine_similarity(x, -x) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same shape"):
        codec.mse(x, torch.zeros(3))


def test_choose_qparams_worked_example():
    scale, zp = codec.choose_qparams(torch.tensor([-1.0]), torch.tensor([3.0]), 8, symmetric=False)
    assert scale.item() == pytest.approx(4 / 255)
    assert zp.item() == 64
    scale, zp = codec.choose_qparams(torch.tensor([-1.0]), torch.tensor([2.54]), 8)
    assert scale.item() == pytest.approx(0.02) and zp is None


def test_bad_arguments_are_named():
    x = torch.randn(10)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\), got 5"):
        codec.quantize(x, 5)
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        codec.quantize(x, 8, 0)
    with pytest.raises(TypeError, match="floating"):
        codec.quantize(torch.arange(10), 8)
    with pytest.raises(ValueError, match="need 5 packed bytes"):
        codec.unpack_codes(torch.zeros(4, dtype=torch.uint8), 4, 10)


def test_sizes_count_scales():
    q = codec.quantize(torch.randn(1024), 4, 128)
    assert q.nbytes == 512 + 8 * 4
    assert q.bits_per_element == pytest.approx(4.25)


@pytest.mark.skipif(not codec.compile_available(), reason="torch.compile unavailable")
def test_compiled_kernels_match_eager_bitwise():
    x = _tensor(9, 4096 + 256)
    for bits in (2, 4, 8):
        qe = codec.quantize(x, bits, 256)
        qc = codec.quantize(x, bits, 256, compiled=True)
        assert torch.equal(qe.data, qc.data) and torch.equal(qe.scale, qc.scale)
        assert torch.equal(codec.dequantize(qe), codec.dequantize(qc, compiled=True))
