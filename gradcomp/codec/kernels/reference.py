"""The eager reference of the exchange's kernels: plain torch ops, the definition of every result.

Every backend (:mod:`~gradcomp.codec.kernels.native` on CPU, :mod:`~gradcomp.codec.compiling`
on CUDA) must reproduce these bit for bit; the tests compare them. The kernels see rows of blocks
``(rows, block)`` and one uint8 code per value (2- and 4-bit codes are packed around them by
:func:`gradcomp.codec.packing.pack_rows_into`).

The arithmetic, per block (row):

1. ``c = x.float() + residual``;
2. ``scale = max|c| / qmax`` (fp32 division); a zero scale divides by 1 instead;
3. ``q = round_codes(c / scale)`` (fp32 division, then to nearest with ties to even, or
   ``floor(y + noise)``), clamped to ``[-qmax, qmax]``; a nan (a block holding a nan or inf) becomes
   code 0;
4. ``residual_out = c - q * scale`` (the product rounded to fp32 first; no fused multiply-add);
5. stored code ``q + qmax + 1``.

The owner's reduce sums the P dequantized copies in rank order (``acc = acc + (code - off) * scale``,
each product rounded first), divides by P and quantizes ``acc + residual`` the same way. Decoding is
``(code - off) * scale`` cast once to the output's dtype.
"""

from __future__ import annotations


import torch

from gradcomp.codec.core import round_codes

__all__ = [
    "quantize_into",
    "encode_kernel",
    "encode_kernel_inplace",
    "reduce_kernel",
    "reduce_kernel_inplace",
    "decode_kernel",
    "decode_sum_kernel",
    "KERNELS",
]


def quantize_into(c, res_out, codes_out, noise, qmax: int) -> torch.Tensor:
    """Quantize fp32 rows ``c`` symmetrically into uint8 codes ``codes_out`` (one per value); ``res_out = c - dequantized``.

    Returns the scales. They are returned, not written: they live in a byte buffer, and a compiled
    kernel cannot write through a view of another dtype.
    """
    scale = c.abs().amax(dim=1, keepdim=True) / qmax
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = c / safe
    y = round_codes(y, noise)
    # a nan row (non-finite scale) gets code 0 deterministically, whichever kernel ran
    q = torch.nan_to_num(torch.clamp(y, -qmax, qmax), nan=0.0)
    # the residual is stored before the codes: in the other order Inductor (torch 2.13, one OpenMP
    # thread, 2/4 bits) once dropped the residual store; the background compiler also checks the
    # fused kernels against the eager ones before using them
    if res_out is not None:
        res_out.copy_(c - q * scale)
    codes_out.copy_((q + (qmax + 1)).to(torch.uint8))
    return scale.squeeze(1)


def encode_kernel(x, res_in, res_out, codes_out, noise, qmax: int) -> torch.Tensor:
    """Error-feedback quantize rows of ``x`` (+ ``res_in``) straight into the given outputs; return the scales."""
    c = x.float()
    if res_in is not None:
        c = c + res_in
    return quantize_into(c, res_out, codes_out, noise, qmax)


def encode_kernel_inplace(x, res, codes_out, noise, qmax: int) -> torch.Tensor:
    """:func:`encode_kernel` with the residual updated in place (``res_in is res_out``)."""
    return quantize_into(x.float() + res, res, codes_out, noise, qmax)


def _sum_copies(codes, scale, qmax: int) -> torch.Tensor:
    """Dequantize P code copies (P, rows, block) with scales (P, rows) and sum them in order 0..P-1 (fp32)."""
    off = qmax + 1
    acc = (codes[0].float() - off) * scale[0].unsqueeze(1)
    for i in range(1, codes.shape[0]):  # a fixed order: every owner sums its blocks the same way
        acc = acc + (codes[i].float() - off) * scale[i].unsqueeze(1)
    return acc


def _mean_of_copies(codes, scale, qmax: int) -> torch.Tensor:
    """:func:`_sum_copies` divided by P."""
    return _sum_copies(codes, scale, qmax) / codes.shape[0]


def reduce_kernel(codes, scale, res_in, res_out, codes_out, noise, qmax: int) -> torch.Tensor:
    """Average P copies (:func:`_mean_of_copies`), add ``res_in`` and requantize into the outputs."""
    acc = _mean_of_copies(codes, scale, qmax)
    if res_in is not None:
        acc = acc + res_in
    return quantize_into(acc, res_out, codes_out, noise, qmax)


def reduce_kernel_inplace(codes, scale, res, codes_out, noise, qmax: int) -> torch.Tensor:
    """:func:`reduce_kernel` with the residual updated in place (``res_in is res_out``)."""
    return quantize_into(_mean_of_copies(codes, scale, qmax) + res, res, codes_out, noise, qmax)


def decode_kernel(codes, scale, out, qmax: int) -> None:
    """Dequantize uint8 codes (rows, block) with scales (rows,) into ``out`` (rows, block) of any float dtype."""
    out.copy_((codes.float() - (qmax + 1)) * scale.unsqueeze(1))



def decode_sum_kernel(codes, scale, out, divide: int, factor, qmax: int) -> None:
    """Sum P code copies (P, rows, block) in order 0..P-1, divide by ``divide``, times ``factor``, into ``out``."""
    acc = _sum_copies(codes, scale, qmax)
    if divide != 1:
        acc = acc / divide
    if factor is not None:
        acc = acc * factor
    out.copy_(acc)



KERNELS = (encode_kernel, encode_kernel_inplace, reduce_kernel, reduce_kernel_inplace, decode_kernel, decode_sum_kernel)
