"""The eager reference of the exchange's kernels: plain torch ops, the definition of every result.

Every backend (:mod:`~gradcomp.codec.kernels.native` on CPU, :mod:`~gradcomp.codec.compiling`
on CUDA) must reproduce these bit for bit; the tests compare them. The kernels see rows of blocks
``(rows, block)`` and one uint8 code per value (2- and 4-bit codes are packed around them by
:func:`gradcomp.codec.packing.pack_rows_into`); ``fmt`` is the :class:`~gradcomp.codec.formats.WireFormat`
and ``t`` its :class:`Tables` (lookup tables and rotation signs, on the data's device).

The arithmetic, per block (row), all in fp32:

1. ``c = x`` (rotated formats: ``c = rotate(x)``, below), then ``c = c + residual``;
2. the scale of each scale group (the block, or 32 values for e8m0): ``fp32``: ``scale =
   amax / max_code`` (``amax = max|c|``), or ``rms_step * rms(c)`` for a format with a fitted step
   (:func:`rms_scale`, in a fixed order); a zero scale divides by 1 instead; ``e8m0``:
   ``k = E(amax) - emax_elem`` clamped to ``[0, 254]`` (``E``: the biased fp32 exponent of
   ``amax``), 255 when the group holds a nan or an inf; the divisor is ``2**(k - 127 - frac_bits)``
   (exact, denormals included);
3. ``y = c / scale``; integer codes: ``q = round_codes(y)`` (to nearest, ties to even, or
   ``floor(y + noise)``) clamped to ``[-qmax, qmax]``, a nan becoming 0; mid-rise integer codes:
   ``k = floor(y)`` (or ``floor((y - 1/2) + noise)``) clamped to ``[-qmax - 1, qmax]``, a nan
   becoming 0, ``q = k + 1/2``, stored code ``k + qmax + 1``; float codes: ``y`` clamped
   to ``[-max, max]`` (a nan becoming 0), ``a = |y|``, ``e = max(E(a) - 127, emin)``,
   ``step = 2**(e - mantissa_bits)``, ``m = round_codes(a / step)``, ``q = copysign(m * step, y)``,
   stored code ``sign << (bits - 1) | (e - emin) << mantissa_bits + m`` (the OCP bit pattern:
   ``m`` may reach the next binade, whose code is the next one);
4. ``residual_out = c - q * scale`` (the product rounded to fp32 first; no fused multiply-add);
5. stored integer code ``q + qmax + 1``.

The owner's reduce sums the P dequantized copies in rank order (``acc = acc + value(code) * scale``,
each product rounded first), divides by P and quantizes ``acc + residual`` the same way (in the
rotated space for rotated formats: nothing there rotates). Decoding is ``value(code) * scale``
(decode-sum: the rank-order sum, ``/ divide``, ``* factor``), then rotated back, cast once to the
output's dtype.

The rotation of a block of ``B`` values (``B`` a power of two): ``rotate(v) = fwht(v * signs) *
norm``, ``unrotate(v) = fwht(v) * (signs * norm)``, with ``signs`` the fixed random ``+-1`` of
:func:`rotation_signs`, ``norm = fp32(1 / sqrt(B))`` and :func:`fwht` the fast Walsh-Hadamard
transform in the order ``h = 1, 2, 4, ..., B/2`` (``(a, b) -> (a + b, a - b)`` for the pairs ``h``
apart). With ``B`` a power of 4 the norm is exact and ``unrotate(rotate(v)) == v`` up to the sums'
rounding; the transform is orthonormal, so error and residual norms read the same in either space.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch

from gradcomp.codec.core import round_codes
from gradcomp.codec.formats import ROTATION_SEED, WireFormat

__all__ = [
    "Tables",
    "tables",
    "rotation_signs",
    "element_values",
    "scale_values",
    "fwht",
    "rotate",
    "rms_scale",
    "unrotate",
    "quantize_into",
    "encode_kernel",
    "encode_kernel_inplace",
    "reduce_kernel",
    "reduce_kernel_inplace",
    "decode_kernel",
    "decode_sum_kernel",
    "scales_finite",
    "KERNELS",
]


class Tables(NamedTuple):
    """What a format's kernels look up, on one device (None where the format needs none).

    Attributes:
        values: fp32 ``(2**bits,)``: the number each float code stands for (None for integer codes).
        scales: fp32 ``(256,)``: the divisor each e8m0 scale byte stands for,
            ``2**(k - 127 - frac_bits)``, nan for 255 (None for fp32 scales).
        signs: fp32 ``(block,)``: the rotation's random signs (None without rotation).
        signed_norm: fp32 ``(block,)``: ``signs * fp32(1/sqrt(block))``, the inverse's last factor.
        norm: fp32 0-dim: ``fp32(1/sqrt(block))``.
    """

    values: Optional[torch.Tensor]
    scales: Optional[torch.Tensor]
    signs: Optional[torch.Tensor]
    signed_norm: Optional[torch.Tensor]
    norm: Optional[torch.Tensor]


@functools.lru_cache(maxsize=None)
def rotation_signs(block: int) -> torch.Tensor:
    """The rotation's random signs for blocks of ``block`` values: fp32 ``+-1``, from :data:`ROTATION_SEED`.

    The same tensor on every rank and in every run (a CPU generator with a fixed seed), so residuals
    kept in the rotated space stay meaningful across ranks, checkpoints and resumes. Do not write it.
    """
    g = torch.Generator().manual_seed(ROTATION_SEED)
    return (torch.randint(0, 2, (block,), generator=g) * 2 - 1).to(torch.float32)


def _float_values(fmt: WireFormat) -> torch.Tensor:
    """The number each code of a float element format stands for (OCP tables: nan and inf codes included)."""
    if fmt.code in ("e4m3", "e5m2"):
        dtype = torch.float8_e4m3fn if fmt.code == "e4m3" else torch.float8_e5m2
        return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).to(torch.float32)
    # E2M1 (4 bits, no inf or nan): sign, 2 exponent bits (bias 1), 1 mantissa bit
    codes = torch.arange(16)
    mag, sign = codes & 7, codes >> 3
    e, m = mag >> 1, (mag & 1).to(torch.float32)
    value = torch.where(e == 0, m * 0.5, (1 + m / 2) * torch.exp2((e - 1).to(torch.float32)))
    return torch.where(sign == 1, -value, value)


def element_values(fmt: WireFormat) -> Optional[torch.Tensor]:
    """fp32 ``(2**bits,)``: what each float code stands for; None for integer codes (``code - offset``)."""
    return _float_values(fmt) if fmt.is_float else None


def scale_values(fmt: WireFormat) -> Optional[torch.Tensor]:
    """fp32 ``(256,)``: the divisor each e8m0 byte ``k`` stands for, ``2**(k - 127 - frac_bits)`` (255: nan); None for fp32 scales."""
    if fmt.scale != "e8m0":
        return None
    # float64 powers of two are exact, and so is their cast to fp32 down to 2**-149
    out = torch.tensor([2.0 ** (k - 127 - fmt.frac_bits) for k in range(256)], dtype=torch.float64).to(torch.float32)
    out[255] = float("nan")
    return out


@functools.lru_cache(maxsize=None)
def _tables(fmt: WireFormat, block: int, device: str) -> Tables:
    signs = signed = norm = None
    if fmt.rotate:
        fmt.check_block_size(block)
        signs = rotation_signs(block).to(device)
        norm = torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32)
        signed = (signs * norm).to(device)
        norm = norm.to(device)
    values, scales = element_values(fmt), scale_values(fmt)
    return Tables(
        None if values is None else values.to(device), None if scales is None else scales.to(device), signs, signed, norm,
    )


def tables(fmt: WireFormat, block: int, device) -> Tables:
    """The :class:`Tables` of ``fmt`` for blocks of ``block`` values on ``device`` (built once, cached)."""
    return _tables(fmt, int(block), str(torch.device(device)))


# --------------------------------------------------------------------------------------------
# rotation


def fwht(v: torch.Tensor) -> torch.Tensor:
    """Fast Walsh-Hadamard transform of rows ``(rows, B)`` (``B`` a power of two), unnormalized, stages ``h = 1, 2, ..., B/2``.

    Each stage replaces the pairs ``(a, b)`` ``h`` apart (``a`` in the lower half of each ``2h``
    group) with ``(a + b, a - b)``. Example: ``fwht([[1, 2, 3, 4]])`` is ``[[10, -2, -4, 0]]``.
    """
    rows, B = v.shape
    h = 1
    while h < B:
        w = v.reshape(rows, B // (2 * h), 2, h)
        a, b = w[:, :, 0, :], w[:, :, 1, :]
        v = torch.stack((a + b, a - b), dim=2).reshape(rows, B)
        h *= 2
    return v


def rotate(v: torch.Tensor, t: Tables) -> torch.Tensor:
    """``fwht(v * signs) * norm``: the randomized Hadamard transform of each row."""
    return fwht(v * t.signs) * t.norm


def unrotate(v: torch.Tensor, t: Tables) -> torch.Tensor:
    """``fwht(v) * (signs * norm)``: the inverse of :func:`rotate` (to the sums' rounding)."""
    return fwht(v) * t.signed_norm


# --------------------------------------------------------------------------------------------
# quantizing


def _bits_of(a: torch.Tensor) -> torch.Tensor:
    return a.view(torch.int32)


def _pow2(biased: torch.Tensor) -> torch.Tensor:
    """``2**(biased - 127)`` as fp32, from an int32 biased exponent in [1, 254] (exact)."""
    return (biased << 23).view(torch.float32)


def rms_scale(c: torch.Tensor, amax: torch.Tensor, step: float) -> torch.Tensor:
    """``step * rms`` of each row of ``c`` ``(rows, B)``, ``B`` a multiple of 16, in a fixed order of operations.

    1. ``E`` = the biased exponent of the row's ``amax``, clamped to [1, 253]; ``u = c * 2**(127 - E)``
       (exact: ``|u| < 4``, so no square overflows, whatever the gradient's magnitude);
    2. ``ss``: the squares ``u * u`` added 16 lanes at a time, left to right over the row, then the
       16 lanes folded in halves (lane ``i`` plus lane ``i + 8``, then ``+ 4``, ``+ 2``, ``+ 1``);
    3. ``scale = (sqrt(ss * (1 / B)) * 2**(E - 127)) * step``, the square root correctly rounded.

    A row holding a nan or an inf gets a nan or inf scale; an all-zero row gets 0.
    """
    rows, B = c.shape
    e = torch.clamp((_bits_of(amax) >> 23) & 0xFF, 1, 253)
    u = c * _pow2(254 - e)
    sq = u * u
    acc = sq[:, 0:16]
    for j in range(16, B, 16):  # a fixed order: every backend adds the squares the same way
        acc = acc + sq[:, j : j + 16]
    for h in (8, 4, 2, 1):
        acc = acc[:, :h] + acc[:, h : 2 * h]
    # the correctly rounded fp32 square root (IEEE's, as C++ and CUDA give it): torch's fp32 sqrt on
    # CPU is off by an ulp for about 1 input in 6; the float64 root rounded to fp32 never is
    root = torch.sqrt((acc * (1.0 / B)).double()).float()
    return (root * _pow2(e)) * step


def _divisor(cg: torch.Tensor, fmt: WireFormat, t: Tables):
    """Per scale group (rows of ``cg``): ``(scale, divisor, stored scale)`` as the module docstring's step 2 says."""
    amax = cg.abs().amax(dim=1, keepdim=True)
    if fmt.scale == "fp32":
        scale = rms_scale(cg, amax, fmt.rms_step) if fmt.rms_step else amax / fmt.max_code
        return scale, torch.where(scale == 0, torch.ones_like(scale), scale), scale.squeeze(1)
    exp = (_bits_of(amax) >> 23) & 0xFF
    k = torch.where(torch.isfinite(amax), torch.clamp(exp - fmt.emax_elem, 0, 254), 255)
    div = t.scales[k.long()]
    return div, div, k.squeeze(1).to(torch.uint8)


def _float_codes(y: torch.Tensor, fmt: WireFormat, noise):
    """Round scaled values ``y`` to float elements: ``(value, stored code as int32)`` (step 3)."""
    mb, emin = fmt.mantissa_bits, fmt.min_exponent
    yc = torch.nan_to_num(torch.clamp(y, -fmt.max_code, fmt.max_code), nan=0.0)
    a = yc.abs()
    eb = torch.clamp((_bits_of(a) >> 23), min=emin + 127)  # biased exponent, subnormals at emin
    step = ((eb - mb) << 23).view(torch.float32)
    m = round_codes(a / step, noise)
    q = torch.copysign(m * step, yc)
    code = ((eb - (emin + 127)) << mb) + m.to(torch.int32) + ((_bits_of(yc) >> 31) & 1) * (1 << (fmt.bits - 1))
    return q, code


def quantize_into(c, res_out, codes_out, noise, fmt: WireFormat, t: Tables) -> torch.Tensor:
    """Quantize fp32 rows ``c`` into uint8 codes ``codes_out`` (one per value); ``res_out = c - dequantized``.

    Returns the scales (fp32 ``(rows,)``, or uint8 ``(rows, groups)`` for e8m0). They are returned,
    not written: they live in a byte buffer, and a compiled kernel cannot write through a view of
    another dtype.
    """
    rows, B = c.shape
    g = fmt.group or B
    cg = c.reshape(rows * (B // g), g)
    scale, div, stored = _divisor(cg, fmt, t)
    y = cg / div
    nz = None if noise is None else noise.reshape(cg.shape)
    if fmt.is_float:
        q, code = _float_codes(y, fmt, nz)
    elif fmt.midrise:
        half = fmt.qmax + 1
        # the level below y is the nearest one (levels k + 1/2); stochastically floor(y - 1/2 + u)
        k = torch.floor(y) if nz is None else torch.floor((y - 0.5) + nz)
        k = torch.nan_to_num(torch.clamp(k, -half, half - 1), nan=0.0)
        q = k + 0.5
        code = k + half
    else:
        qmax = fmt.qmax
        # a nan row (non-finite scale) gets code 0 deterministically, whichever kernel ran
        q = torch.nan_to_num(torch.clamp(round_codes(y, nz), -qmax, qmax), nan=0.0)
        code = q + (qmax + 1)
    # the residual is stored before the codes: in the other order Inductor (torch 2.13, one OpenMP
    # thread, 2/4 bits) once dropped the residual store; the background compiler also checks the
    # fused kernels against the eager ones before using them
    if res_out is not None:
        res_out.copy_((cg - q * scale).reshape(rows, B))
    codes_out.copy_(code.reshape(rows, B).to(torch.uint8))
    return stored if fmt.scale == "fp32" else stored.reshape(rows, B // g)


def _prepare(x, fmt: WireFormat, t: Tables) -> torch.Tensor:
    c = x.float()
    return rotate(c, t) if fmt.rotate else c


def encode_kernel(x, res_in, res_out, codes_out, noise, fmt: WireFormat, t: Tables) -> torch.Tensor:
    """Error-feedback quantize rows of ``x`` (rotated first, then + ``res_in``) straight into the given outputs; return the scales."""
    c = _prepare(x, fmt, t)
    if res_in is not None:
        c = c + res_in
    return quantize_into(c, res_out, codes_out, noise, fmt, t)


def encode_kernel_inplace(x, res, codes_out, noise, fmt: WireFormat, t: Tables) -> torch.Tensor:
    """:func:`encode_kernel` with the residual updated in place (``res_in is res_out``)."""
    return quantize_into(_prepare(x, fmt, t) + res, res, codes_out, noise, fmt, t)


# --------------------------------------------------------------------------------------------
# dequantizing


def _dequantize(codes, scale, fmt: WireFormat, t: Tables) -> torch.Tensor:
    """``value(code) * scale`` of uint8 codes ``(rows, B)`` with scales ``(rows,)`` / ``(rows, groups)``, in fp32."""
    if fmt.is_float:
        v = t.values[codes.long()]
    else:
        v = codes.float() - (fmt.qmax + 0.5 if fmt.midrise else fmt.qmax + 1)
    if fmt.scale == "fp32":
        return v * scale.unsqueeze(1)
    rows, B = codes.shape
    g = fmt.group
    return (v.reshape(-1, g) * t.scales[scale.long()].reshape(-1, 1)).reshape(rows, B)


def _sum_copies(codes, scale, fmt: WireFormat, t: Tables) -> torch.Tensor:
    """Dequantize P code copies (P, rows, block) with their scales and sum them in order 0..P-1 (fp32)."""
    acc = _dequantize(codes[0], scale[0], fmt, t)
    for i in range(1, codes.shape[0]):  # a fixed order: every owner sums its blocks the same way
        acc = acc + _dequantize(codes[i], scale[i], fmt, t)
    return acc


def _mean_of_copies(codes, scale, fmt: WireFormat, t: Tables) -> torch.Tensor:
    """:func:`_sum_copies` divided by P."""
    return _sum_copies(codes, scale, fmt, t) / codes.shape[0]


def reduce_kernel(codes, scale, res_in, res_out, codes_out, noise, fmt: WireFormat, t: Tables) -> torch.Tensor:
    """Average P copies (:func:`_mean_of_copies`), add ``res_in`` and requantize into the outputs (no rotation: all in the rotated space)."""
    acc = _mean_of_copies(codes, scale, fmt, t)
    if res_in is not None:
        acc = acc + res_in
    return quantize_into(acc, res_out, codes_out, noise, fmt, t)


def reduce_kernel_inplace(codes, scale, res, codes_out, noise, fmt: WireFormat, t: Tables) -> torch.Tensor:
    """:func:`reduce_kernel` with the residual updated in place (``res_in is res_out``)."""
    return quantize_into(_mean_of_copies(codes, scale, fmt, t) + res, res, codes_out, noise, fmt, t)


def decode_kernel(codes, scale, out, fmt: WireFormat, t: Tables) -> None:
    """Dequantize uint8 codes (rows, block) with their scales into ``out`` (rows, block) of any float dtype, rotated back."""
    v = _dequantize(codes, scale, fmt, t)
    out.copy_(unrotate(v, t) if fmt.rotate else v)


def decode_sum_kernel(codes, scale, out, divide: int, factor, fmt: WireFormat, t: Tables) -> None:
    """Sum P code copies (P, rows, block) in order 0..P-1, divide by ``divide``, times ``factor``, rotate back, into ``out``."""
    acc = _sum_copies(codes, scale, fmt, t)
    if divide != 1:
        acc = acc / divide
    if factor is not None:
        acc = acc * factor
    out.copy_(unrotate(acc, t) if fmt.rotate else acc)


def scales_finite(scale: torch.Tensor, fmt: WireFormat) -> torch.Tensor:
    """A 0-dim bool tensor: whether every scale is finite (fp32: ``isfinite``; e8m0: no byte 255)."""
    if fmt.scale == "fp32":
        return torch.isfinite(scale).all()
    return (scale != 255).all()


KERNELS = (encode_kernel, encode_kernel_inplace, reduce_kernel, reduce_kernel_inplace, decode_kernel, decode_sum_kernel)
