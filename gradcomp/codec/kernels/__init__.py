"""The exchange's kernels behind one dispatch: encode, reduce, decode, decode-sum of rows of blocks.

The exchange (:mod:`gradcomp.comm.exchange`) calls only the four functions here; each picks a
backend for its tensors:

* the eager reference (:mod:`~gradcomp.codec.kernels.reference`): plain torch ops, the definition
  of every result;
* compiled (:mod:`~gradcomp.codec.compiling`): the same functions through ``torch.compile``,
  used with ``compiled=True`` (bit-identical; a failure to compile falls back to eager).

Rows are blocks: ``x`` is ``(rows, block)``, one scale per row. 2- and 4-bit codes are packed and
unpacked around the kernels by :func:`~gradcomp.codec.packing.pack_rows_into`, whole rows at a time.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from gradcomp.codec.formats import WireFormat, wire_format
from gradcomp.codec.kernels import reference as ref
from gradcomp.codec.compiling import BackgroundCompiler, compile_available
from gradcomp.codec.compiling import run as _run
from gradcomp.codec.packing import pack_rows_into, scratch, unpack_rows_into

__all__ = [
    "encode_blocks",
    "reduce_blocks",
    "decode_blocks",
    "decode_sum_blocks",
    "compile_available",
    "background_compiler",
]


def background_compiler() -> BackgroundCompiler:
    """A :class:`~gradcomp.codec.compiling.BackgroundCompiler` for the exchange's kernels."""
    return BackgroundCompiler(ref.KERNELS)


def _format(bits) -> WireFormat:
    return wire_format(bits, "bits")


def encode_blocks(
    x: torch.Tensor,
    bits: int,
    *,
    residual: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    codes_out: Optional[torch.Tensor] = None,
    scale_out: Optional[torch.Tensor] = None,
    compiled: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows of blocks (with error feedback) into packed codes and fp32 scales, in place.

    Steps, per row (one block): ``c = x + residual``; ``scale = max|c| / qmax``; ``q = round(c / scale)``
    (or ``floor(c / scale + noise)``) clamped to ``[-qmax, qmax]``; codes ``q + 2**(bits-1)`` packed
    first code lowest; ``residual_out = c - q * scale``. A row holding a nan gets a nan scale and code 0.

    Example (8 bits): a row ``[1.27, -0.5]`` has scale ``0.01``, codes ``[255, 78]``, residual ``[0, 0]``.

    Args:
        x: ``(rows, block)`` fp32/fp16/bf16 (a view of a bucket is fine).
        bits: 2, 4 or 8.
        residual: fp32 ``(rows, block)`` added before quantizing (error feedback), or None.
        residual_out: fp32 ``(rows, block)`` receiving ``c - dequantized``; may be ``residual`` itself.
        noise: ``U[0, 1)`` ``(rows, block)`` for stochastic rounding, or None (to nearest, ties to even).
        codes_out: uint8 ``(rows, block * bits / 8)``, e.g. a view of a send buffer (allocated if None).
        scale_out: fp32 ``(rows,)`` (allocated if None).
        compiled: run the fused ``torch.compile`` kernel (bit-identical to the eager one).

    Returns:
        ``(codes_out, scale_out)``.
    """
    fmt = _format(bits)
    bits, qmax = fmt.bits, fmt.qmax
    rows, block = x.shape
    if codes_out is None:
        codes_out = torch.empty(rows, block * bits // 8, dtype=torch.uint8, device=x.device)
    if scale_out is None:
        scale_out = torch.empty(rows, dtype=torch.float32, device=x.device)
    codes8 = codes_out if bits == 8 else scratch(0, (rows, block), torch.uint8, x.device)
    route = _residual_route(residual, residual_out)
    if route == "inplace":
        scale = _run(ref.encode_kernel_inplace, compiled, x, residual, codes8, noise, qmax)
    else:
        scale = _run(ref.encode_kernel, compiled and route != "overlap", x, residual, residual_out, codes8, noise, qmax)
    if bits != 8:
        pack_rows_into(codes8, codes_out, bits)
    scale_out.copy_(scale)
    return codes_out, scale_out


def reduce_blocks(
    codes: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    *,
    residual: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    codes_out: Optional[torch.Tensor] = None,
    scale_out: Optional[torch.Tensor] = None,
    compiled: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Average P quantized copies of the same blocks and requantize the mean, in one pass.

    Steps: dequantize copy ``p`` (``(code - 2**(bits-1)) * scale``), sum the copies in the order
    ``p = 0..P-1``, divide by ``P``, add ``residual``, quantize as :func:`encode_blocks` does.

    Args:
        codes: uint8 ``(P, rows, block * bits / 8)``; rows of a received buffer (strided views are fine).
        scale: fp32 ``(P, rows)``.
        bits: 2, 4 or 8.
        residual, residual_out, noise, codes_out, scale_out, compiled: as in :func:`encode_blocks`.

    Returns:
        ``(codes_out, scale_out)`` of the mean.
    """
    fmt = _format(bits)
    bits, qmax = fmt.bits, fmt.qmax
    p, rows, nbytes = codes.shape
    if codes_out is None:
        codes_out = torch.empty(rows, nbytes, dtype=torch.uint8, device=codes.device)
    if scale_out is None:
        scale_out = torch.empty(rows, dtype=torch.float32, device=codes.device)
    if bits == 8:
        copies, codes8 = codes, codes_out
    else:
        block = nbytes * 8 // bits
        copies = scratch(3, (p, rows, block), torch.uint8, codes.device)
        unpack_rows_into(codes, copies, bits)
        codes8 = scratch(0, (rows, block), torch.uint8, codes.device)
    route = _residual_route(residual, residual_out)
    if route == "inplace":
        mean_scale = _run(ref.reduce_kernel_inplace, compiled, copies, scale, residual, codes8, noise, qmax)
    else:
        mean_scale = _run(ref.reduce_kernel, compiled and route != "overlap", copies, scale, residual, residual_out, codes8, noise, qmax)
    if bits != 8:
        pack_rows_into(codes8, codes_out, bits)
    scale_out.copy_(mean_scale)
    return codes_out, scale_out


def decode_blocks(
    codes: torch.Tensor, scale: torch.Tensor, bits: int, *, out: Optional[torch.Tensor] = None, compiled: bool = False
) -> torch.Tensor:
    """Dequantize packed rows ``(rows, block * bits / 8)`` with fp32 scales ``(rows,)`` into ``out``.

    ``out`` is ``(rows, block)`` of any float dtype (e.g. a view of the gradient bucket; fp32 if None).
    Rows with a non-finite scale come back non-finite.
    """
    fmt = _format(bits)
    bits, qmax = fmt.bits, fmt.qmax
    if out is None:
        out = torch.empty(codes.shape[0], codes.shape[1] * 8 // bits, dtype=torch.float32, device=codes.device)
    if bits != 8:
        unpacked = scratch(0, (codes.shape[0], codes.shape[1] * 8 // bits), torch.uint8, codes.device)
        unpack_rows_into(codes, unpacked, bits)
        codes = unpacked
    _run(ref.decode_kernel, compiled, codes, scale, out, qmax)
    return out


def decode_sum_blocks(
    codes: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    *,
    out: Optional[torch.Tensor] = None,
    divide: int = 1,
    factor: Optional[torch.Tensor] = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Dequantize P quantized copies of the same blocks and sum them in rank order, without requantizing.

    Steps: dequantize copy ``p`` (``(code - 2**(bits-1)) * scale``) in fp32, sum the copies in the
    order ``p = 0..P-1`` (the order :func:`reduce_blocks` sums them in), divide by ``divide``,
    multiply by ``factor``, write into ``out`` (cast to its dtype once, at the end).

    Example (8 bits, P = 2, ``divide=2``): codes ``[[138], [118]]`` with scales ``[[0.5], [0.25]]``
    are ``5.0`` and ``-2.5``; their mean ``1.25`` is written.

    Args:
        codes: uint8 ``(P, rows, block * bits / 8)``; rows of a received buffer (strided views are fine).
        scale: fp32 ``(P, rows)``.
        bits: 2, 4 or 8.
        out: ``(rows, block)`` of any float dtype (e.g. a view of an output shard; fp32 if None).
        divide: a positive int the sum is divided by (``P`` for a mean).
        factor: an fp32 0-dim tensor the result is multiplied by (FSDP's pre-multiplied sum), or None.
        compiled: run the fused ``torch.compile`` kernel (bit-identical to the eager one).

    Returns:
        ``out``. Rows with a non-finite scale in any copy come back non-finite.
    """
    fmt = _format(bits)
    bits, qmax = fmt.bits, fmt.qmax
    if isinstance(divide, bool) or not isinstance(divide, int) or divide < 1:
        raise ValueError(f"divide must be a positive int, got {divide!r}")
    if factor is not None and (not isinstance(factor, torch.Tensor) or factor.dim() != 0 or factor.dtype != torch.float32):
        raise TypeError(f"factor must be a 0-dim float32 tensor or None, got {factor!r}")
    p, rows, nbytes = codes.shape
    if out is None:
        out = torch.empty(rows, nbytes * 8 // bits, dtype=torch.float32, device=codes.device)
    if bits != 8:
        copies = scratch(3, (p, rows, nbytes * 8 // bits), torch.uint8, codes.device)
        unpack_rows_into(codes, copies, bits)
        codes = copies
    _run(ref.decode_sum_kernel, compiled, codes, scale, out, divide, factor, qmax)
    return out



def _residual_route(residual: Optional[torch.Tensor], residual_out: Optional[torch.Tensor]) -> str:
    """How a kernel must treat its residuals: ``"none"``, ``"inplace"``, ``"apart"`` or ``"overlap"``.

    A compiled kernel never gets two arguments that share memory: with an in-place update
    (``residual_out`` the very same view as ``residual``) the in-place variant gets the residual once;
    torch 2.13's Dynamo, after recompiling a kernel for another width with aliased residuals, reused
    that graph for residuals apart and wrote the new residual into the input instead of the output
    (one OpenMP thread, 4 bits). Other overlaps run eagerly (the eager kernels read the residual
    before they write any of it).
    """
    if residual is None or residual_out is None:
        return "none"
    if residual.untyped_storage().data_ptr() != residual_out.untyped_storage().data_ptr():
        return "apart"
    same = (
        residual.data_ptr() == residual_out.data_ptr()
        and residual.shape == residual_out.shape
        and residual.stride() == residual_out.stride()
        and residual.dtype == residual_out.dtype
    )
    return "inplace" if same else "overlap"

