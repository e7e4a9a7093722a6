"""The native (C++) backend of the exchange's kernels, for CPU tensors.

The kernels (``gradcomp/codec/kernels/native/*.cpp``) are built once, when gradcomp is installed
(``pip install``, ``scripts/setup.sh``), into the module ``gradcomp.codec.kernels._native``. They
depend on no torch header (plain pointers, Python's stable ABI), so one build serves every torch
version. Each kernel reads its inputs once and writes its outputs once: a block's absmax, scale,
rounding, residual and 2/4-bit packing happen while the block is in cache. The instruction set is
picked at import (AVX-512, AVX2, or portable C++); results are bit-identical to the eager reference
(:mod:`gradcomp.codec.kernels.reference`) on every one, which the tests check.

Each function here returns False, touching nothing, when it cannot take the call (the module is not
built, a tensor is not on the CPU, a layout it does not handle); the dispatch then runs the eager
reference. The layouts it takes: rows of ``block`` values (``block % 16 == 0``; a power of two for a
rotating format) whose rows are contiguous, fp32 / fp16 / bf16 values, fp32 residuals and noise, the
format's scales (fp32 per row, or e8m0 bytes per group, each row's contiguous). Every registered
format runs here: its description (code kind, widths, scale kind, lookup tables, rotation signs)
travels to the kernels as one tuple per call.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from gradcomp.codec.formats import WireFormat
from gradcomp.codec.kernels.reference import element_values, tables

logger = logging.getLogger(__name__)

try:  # built at install time; absent where no C++ compiler was found
    from gradcomp.codec.kernels import _native
except ImportError as _exc:  # pragma: no cover - depends on the install
    _native = None
    IMPORT_ERROR: Optional[BaseException] = _exc
else:
    IMPORT_ERROR = None

__all__ = ["available", "isa", "isas", "use_isa", "threads", "set_threads", "encode", "reduce", "decode", "decode_sum"]

_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_THREADS: Optional[int] = None  # None: torch.get_num_threads() at each call


def available() -> bool:
    """Whether the native kernels are built and importable here."""
    return _native is not None


def isa() -> Optional[str]:
    """The instruction set the kernels run on (``"avx512"``, ``"avx2"``, ``"generic"``), or None if not built."""
    return None if _native is None else _native.isa()


def isas() -> tuple:
    """Every instruction set this CPU can run the kernels on, fastest first (empty if not built)."""
    return () if _native is None else tuple(_native.isas())


def use_isa(name: str) -> None:
    """Run the kernels on instruction set ``name`` (one of :func:`isas`; for tests and comparisons)."""
    if _native is None:
        raise RuntimeError(f"the native kernels are not built here ({IMPORT_ERROR})")
    _native.set_isa(name)


def threads() -> int:
    """Threads a large kernel call is split over: :func:`set_threads`'s value, else ``torch.get_num_threads()``."""
    return torch.get_num_threads() if _THREADS is None else _THREADS


def set_threads(n: Optional[int]) -> None:
    """Split large kernel calls over ``n`` threads (None: follow ``torch.get_num_threads()``)."""
    global _THREADS
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"threads must be a positive int or None, got {n!r}")
    _THREADS = n


def _rows_ok(t: Optional[torch.Tensor], rows: int, width: int, dtype: Optional[torch.dtype] = torch.float32) -> bool:
    """``t`` is None, or a CPU tensor of ``rows`` contiguous rows of ``width`` elements (of ``dtype``)."""
    if t is None:
        return True
    if t.device.type != "cpu" or (dtype is not None and t.dtype != dtype) or t.dim() != 2:
        return False
    if tuple(t.shape) != (rows, width):
        return False
    return t.stride(1) == 1 and (t.stride(0) == width or rows == 1)


def _vec_ok(t: Optional[torch.Tensor], n: int) -> bool:
    return t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 1 and t.shape[0] == n and t.stride(0) == 1)


def _scales_ok(t: torch.Tensor, fmt: WireFormat, rows: int, block: int, copies: Optional[int] = None) -> bool:
    """``t`` holds ``rows`` blocks' scales of ``fmt`` on the CPU (``copies`` of them), each row's scales contiguous."""
    want = (rows,) if fmt.scale == "fp32" else (rows, block // fmt.group)
    if copies is not None:
        want = (copies,) + want
    if t.device.type != "cpu" or t.dtype != (torch.float32 if fmt.scale == "fp32" else torch.uint8) or tuple(t.shape) != want:
        return False
    lead = 0 if copies is None else 1
    if fmt.scale == "fp32":
        return t.stride(lead) == 1 or rows == 1
    return t.stride(lead + 1) == 1 and (t.stride(lead) == want[-1] or rows == 1)


def _copies_ok(codes: torch.Tensor) -> bool:
    """``codes`` ``(P, rows, bytes)`` uint8 with contiguous rows."""
    if codes.device.type != "cpu" or codes.dtype != torch.uint8 or codes.dim() != 3:
        return False
    p, rows, nbytes = codes.shape
    return rows > 0 and codes.stride(2) == 1 and (codes.stride(1) == nbytes or rows == 1)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _specials(fmt: WireFormat) -> tuple:
    """``(first special magnitude code, whether it is inf)`` of a float element format (256, 0: none), from its value table."""
    if not fmt.is_float:
        return 256.0, 0
    values = element_values(fmt)[: 1 << (fmt.bits - 1)]  # the positive half
    bad = (~torch.isfinite(values)).nonzero()
    if bad.numel() == 0:
        return 256.0, 0
    first = int(bad[0])
    return float(first), int(bool(torch.isinf(values[first])))


@functools.lru_cache(maxsize=None)
def _fmt(fmt: WireFormat, block: int) -> Optional[tuple]:
    """The format tuple the module parses (module.cpp ``parse_fmt``), or None for a block the kernels cannot rotate."""
    if fmt.rotate and (block < 16 or block & (block - 1)):
        return None
    t = tables(fmt, block, "cpu")  # cached: the pointers stay valid
    return (fmt.bits, int(fmt.is_float), fmt.mantissa_bits if fmt.is_float else 0, fmt.min_exponent if fmt.is_float else 0,
            fmt.max_code, fmt.rms_step, int(fmt.midrise), 0.0 if fmt.is_float else float(fmt.qmax), fmt.group or block,
            int(fmt.scale == "e8m0"), fmt.emax_elem, *_specials(fmt), _ptr(t.values), _ptr(t.scales), _ptr(t.signs), _ptr(t.signed_norm), float(t.norm) if t.norm is not None else 0.0)


def encode(x, residual, residual_out, noise, codes_out, scale_out, fmt: WireFormat) -> bool:
    """Quantize rows ``x`` (+ ``residual``) into packed ``codes_out`` and ``scale_out``; ``residual_out`` gets the rest.

    ``residual_out`` may be ``residual`` itself (the same view); any other overlap is refused.
    Returns whether it ran.
    """
    if _native is None or x.dim() != 2:
        return False
    rows, block = x.shape
    bits = fmt.bits
    if rows == 0 or block % 16 or x.dtype not in _KINDS or (fmt.group and block % fmt.group):
        return False
    if not (_rows_ok(x, rows, block, None) and _rows_ok(residual, rows, block) and _rows_ok(residual_out, rows, block)
            and _rows_ok(noise, rows, block) and _rows_ok(codes_out, rows, block * bits // 8, torch.uint8)
            and _scales_ok(scale_out, fmt, rows, block)):
        return False
    if residual is not None and residual_out is not None and not _same_or_apart(residual, residual_out):
        return False
    f = _fmt(fmt, block)
    if f is None:
        return False
    _native.encode(x.data_ptr(), _KINDS[x.dtype], rows, block, _ptr(residual), _ptr(residual_out), _ptr(noise),
                   codes_out.data_ptr(), scale_out.data_ptr(), f, threads())
    return True


def reduce(codes, scale, residual, residual_out, noise, codes_out, scale_out, fmt: WireFormat) -> bool:
    """Average ``P`` copies ``codes`` ``(P, rows, bytes)`` / ``scale`` ``(P, rows[, groups])``, add ``residual``, requantize.

    Returns whether it ran.
    """
    if _native is None or not _copies_ok(codes):
        return False
    p, rows, nbytes = codes.shape
    block = nbytes * 8 // fmt.bits
    if block % 16 or (fmt.group and block % fmt.group) or not _scales_ok(scale, fmt, rows, block, p):
        return False
    if not (_rows_ok(residual, rows, block) and _rows_ok(residual_out, rows, block) and _rows_ok(noise, rows, block)
            and _rows_ok(codes_out, rows, nbytes, torch.uint8) and _scales_ok(scale_out, fmt, rows, block)):
        return False
    if residual is not None and residual_out is not None and not _same_or_apart(residual, residual_out):
        return False
    f = _fmt(fmt, block)
    if f is None:
        return False
    _native.reduce(codes.data_ptr(), codes.stride(0), scale.data_ptr(), scale.stride(0), p, rows, block, _ptr(residual),
                   _ptr(residual_out), _ptr(noise), codes_out.data_ptr(), scale_out.data_ptr(), f, threads())
    return True


def decode(codes, scale, out, fmt: WireFormat) -> bool:
    """Dequantize packed rows ``codes`` with ``scale`` into ``out`` (fp32 / fp16 / bf16 rows). Returns whether it ran."""
    if _native is None or codes.dim() != 2 or out.dim() != 2:
        return False
    rows, nbytes = codes.shape
    block = nbytes * 8 // fmt.bits
    if rows == 0 or block % 16 or out.dtype not in _KINDS or (fmt.group and block % fmt.group):
        return False
    if not (_rows_ok(codes, rows, nbytes, torch.uint8) and _rows_ok(out, rows, block, None) and _scales_ok(scale, fmt, rows, block)):
        return False
    f = _fmt(fmt, block)
    if f is None:
        return False
    _native.decode(codes.data_ptr(), scale.data_ptr(), rows, block, out.data_ptr(), _KINDS[out.dtype], f, threads())
    return True


def decode_sum(codes, scale, out, divide: int, factor: Optional[torch.Tensor], fmt: WireFormat) -> bool:
    """Sum ``P`` copies in rank order, divide by ``divide``, times ``factor``, rotate back, into ``out``. Returns whether it ran."""
    if _native is None or not _copies_ok(codes) or out.dim() != 2 or out.dtype not in _KINDS:
        return False
    p, rows, nbytes = codes.shape
    block = nbytes * 8 // fmt.bits
    if block % 16 or (fmt.group and block % fmt.group) or not _rows_ok(out, rows, block, None) or not _scales_ok(scale, fmt, rows, block, p):
        return False
    if factor is not None and (factor.device.type != "cpu" or factor.dtype != torch.float32 or factor.numel() != 1):
        return False
    f = _fmt(fmt, block)
    if f is None:
        return False
    _native.decode_sum(codes.data_ptr(), codes.stride(0), scale.data_ptr(), scale.stride(0), p, rows, block, out.data_ptr(),
                       _KINDS[out.dtype], int(divide), _ptr(factor), f, threads())
    return True


def _same_or_apart(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The very same view (an in-place update, row by row) or memory that does not overlap."""
    if a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride():
        return True
    a0, a1 = a.data_ptr(), a.data_ptr() + a.numel() * a.element_size()
    b0, b1 = b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()
    return a1 <= b0 or b1 <= a0
