"""The one quantizer of gradcomp: block-wise scales, quantize, dequantize, bit packing, error metrics.

Gradients, weights and activations all go through this module. It is pure tensor math: no
``torch.distributed``, no ``nn.Module``, no I/O.

A tensor is flattened and cut into blocks of ``block_size`` consecutive elements (the last block is
zero-padded; padding never reaches the output). Each block gets its own scale:

* **symmetric** (absmax): ``scale = max|x| / qmax`` with ``qmax = 2**(bits-1) - 1``; codes are
  ``round(x / scale)`` in ``[-qmax, qmax]`` and are stored with an offset of ``2**(bits-1)`` so they
  fit an unsigned field of ``bits`` bits.
* **asymmetric** (affine): ``scale = (max - min) / (2**bits - 1)`` over a range that always contains 0,
  and an integer zero point ``zp = round(-min / scale)``; codes are ``round(x / scale) + zp`` in
  ``[0, 2**bits - 1]``.

Worked example (symmetric, 8 bits): a block with values in ``[-0.5, 2.54]`` has ``max|x| = 2.54``,
so ``scale = 2.54 / 127 = 0.02``; ``x = 1.0`` becomes ``round(50.0) = 50`` (stored as 178) and
dequantizes back to ``50 * 0.02 = 1.0``; the error of any element is at most ``scale / 2 = 0.01``.

Scales are fp32 and the very scales that are stored are the ones used to quantize, so the receiver
reconstructs exactly what the sender meant. fp32 scales cover magnitudes from about 1e-36 to 3e38
without underflow or overflow. A block that holds an inf or a nan gets a non-finite scale and
dequantizes to non-finite values only, never to finite garbage.

Codes are packed little-end first: 8 bits one per byte, 4 bits two per byte, 2 bits four per byte,
3 bits eight values in three bytes.

The hot kernels can be fused with ``torch.compile`` (``compiled=True``), which makes a quantize +
dequantize round trip cost about as much as one ``clone()``; where compilation is unavailable the
same functions run eagerly with identical results.
"""

from __future__ import annotations

import atexit
import logging
import math
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from gradcomp.checks import GRADIENT_BITS, SUPPORTED_BITS, check_int
from gradcomp.checks import check_bits as _check_bits

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_codes",
    "dequantize_codes",
    "pack_codes",
    "unpack_codes",
    "packed_nbytes",
    "choose_qparams",
    "qrange",
    "error_feedback_step",
    "dequantize_sum",
    "dequantize_packed",
    "mse",
    "sqnr_db",
    "cosine_similarity",
    "compile_available",
    "quantize_codes_with_qparams",
    "encode_blocks",
    "reduce_blocks",
    "decode_blocks",
    "decode_sum_blocks",
    "BackgroundCompiler",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------
# validation (the checks and the widths live in gradcomp.checks)


def _check_block(block_size: int) -> None:
    check_int("block_size", block_size)


def _check_float(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be a floating tensor (fp32, fp16, bf16 or fp64), got {x.dtype}")


def qrange(bits: int, symmetric: bool) -> Tuple[int, int, int]:
    """Return ``(qmin, qmax, offset)`` of the unsigned code range for ``bits``.

    Symmetric codes span ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` and are stored with the offset
    ``2**(bits-1)``; asymmetric codes span ``[0, 2**bits - 1]`` with a per-block zero point.

    Example:
        >>> qrange(8, True)
        (-127, 127, 128)
        >>> qrange(4, False)
        (0, 15, 0)
    """
    _check_bits(bits)
    if symmetric:
        half = 1 << (bits - 1)
        return -(half - 1), half - 1, half
    return 0, (1 << bits) - 1, 0


# --------------------------------------------------------------------------------------------
# scales


def choose_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    bits: int,
    symmetric: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Compute fp32 scales (and integer zero points) from observed ranges.

    Steps:
        1. Widen the range to contain 0, so that 0 is exactly representable.
        2. Symmetric: ``scale = max(|min|, |max|) / qmax``; no zero point.
           Asymmetric: ``scale = max/n - min/n`` with ``n = 2**bits - 1`` (divided before the
           subtraction so that ranges near 3e38 cannot overflow), ``zp = clamp(round(-min/scale), 0, n)``.
        3. A zero scale (an all-zero range) stays zero; quantization maps it to code 0 exactly.

    Example: ``min=-1, max=3, bits=8, symmetric=False`` -> ``scale = 4/255 = 0.01569``,
    ``zp = round(1 / 0.01569) = 64``.

    Args:
        min_val: observed minimum, any shape (one entry per block, channel or tensor).
        max_val: observed maximum, same shape as ``min_val``.
        bits: code width, one of ``SUPPORTED_BITS``.
        symmetric: absmax scales without zero point, or affine scales with one.

    Returns:
        ``(scale, zero_point)``: fp32 tensors of the input shape; ``zero_point`` is ``None`` when
        symmetric, else holds integral values.
    """
    _check_bits(bits)
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val and max_val must have the same shape, got {tuple(min_val.shape)} and {tuple(max_val.shape)}")
    lo = torch.clamp(min_val.float(), max=0.0)
    hi = torch.clamp(max_val.float(), min=0.0)
    qmin, qmax, _ = qrange(bits, symmetric)
    if symmetric:
        return torch.maximum(-lo, hi) / qmax, None
    n = float(qmax - qmin)
    scale = hi / n - lo / n
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / safe), qmin, qmax)
    zp = torch.where(torch.isfinite(zp), zp, torch.zeros_like(zp))
    return scale, zp


# --------------------------------------------------------------------------------------------
# kernels: plain tensor functions that run eagerly or fused by torch.compile


def _sym_quantize_kernel(xb: torch.Tensor, qmax: int, noise: Optional[torch.Tensor]):
    """Quantize rows of ``xb`` (blocks, block_size) symmetrically; return (codes uint8, scale fp32)."""
    x = xb.float()
    scale = x.abs().amax(dim=1, keepdim=True) / qmax
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = x / safe
    y = torch.round(y) if noise is None else torch.floor(y + noise)
    codes = (torch.clamp(y, -qmax, qmax) + (qmax + 1)).to(torch.uint8)
    return codes, scale.squeeze(1)


def _ef_quantize_kernel(xb: torch.Tensor, residual: torch.Tensor, qmax: int, noise: Optional[torch.Tensor]):
    """Error-feedback quantize: corrected = x + residual; return codes, scale, corrected - dequantized."""
    x = xb.float() + residual
    scale = x.abs().amax(dim=1, keepdim=True) / qmax
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = x / safe
    y = torch.round(y) if noise is None else torch.floor(y + noise)
    q = torch.clamp(y, -qmax, qmax)
    codes = (q + (qmax + 1)).to(torch.uint8)
    new_residual = x - q * scale
    return codes, scale.squeeze(1), new_residual


def _pack_kernel(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (length a multiple of 8 // bits) for bits in (2, 4, 8)."""
    flat = codes.reshape(-1)
    if bits == 8:
        return flat
    per = 8 // bits
    out = flat[0::per]
    for i in range(1, per):
        out = out | (flat[i::per] << (bits * i))
    return out


def _split_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Split uint8 bytes of ``8 // bits`` codes each (bits in (2, 4)) into a trailing axis, first code lowest."""
    mask = (1 << bits) - 1
    return torch.stack([(packed >> (bits * i)) & mask for i in range(8 // bits)], dim=-1)


def _unpack_kernel(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack uint8 bytes into uint8 codes for bits in (2, 4, 8)."""
    if bits == 8:
        return packed
    return _split_codes(packed, bits).reshape(-1)


def _sym_dequantize_kernel(packed: torch.Tensor, scale: torch.Tensor, bits: int, offset: int):
    """Dequantize packed symmetric codes of ``scale.numel()`` blocks into fp32 (blocks, block_size)."""
    if bits == 8:
        q = packed.reshape(scale.shape[0], -1).float() - offset
        return q * scale.unsqueeze(1)
    per = 8 // bits
    mask = (1 << bits) - 1
    pb = packed.reshape(scale.shape[0], -1)
    s = scale.unsqueeze(1)
    parts = [(((pb >> (bits * i)) & mask).float() - offset) * s for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(scale.shape[0], -1)


def _sym_dequantize_sum_kernel(packed: torch.Tensor, scale: torch.Tensor, bits: int, offset: int):
    """Dequantize P packed messages (P, bytes) with scales (P, blocks) and sum them in order 0..P-1."""
    p = packed.shape[0]
    nb = scale.shape[1]
    deq = _sym_dequantize_kernel(packed.reshape(p * nb, -1), scale.reshape(-1), bits, offset)
    return deq.reshape(p, nb, -1).sum(dim=0)


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (rows, block) row by row into (rows, block * bits / 8) bytes, first code lowest."""
    if bits == 8:
        return codes
    per = 8 // bits
    c = codes.reshape(codes.shape[0], -1, per)
    out = c[:, :, 0]
    for i in range(1, per):
        out = out | (c[:, :, i] << (bits * i))
    return out


def _quantize_into(c, res_out, codes_out, noise, qmax: int) -> torch.Tensor:
    """Quantize fp32 rows ``c`` symmetrically into uint8 codes ``codes_out`` (one per value); ``res_out = c - dequantized``.

    Returns the scales. They are returned, not written: they live in a byte buffer, and a compiled
    kernel cannot write through a view of another dtype.
    """
    scale = c.abs().amax(dim=1, keepdim=True) / qmax
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = c / safe
    y = torch.round(y) if noise is None else torch.floor(y + noise)
    # a nan row (non-finite scale) gets code 0 deterministically, whichever kernel ran
    q = torch.nan_to_num(torch.clamp(y, -qmax, qmax), nan=0.0)
    # the residual is stored before the codes: in the other order Inductor (torch 2.13, one OpenMP
    # thread, 2/4 bits) once dropped the residual store; the background compiler also checks the
    # fused kernels against the eager ones before using them
    if res_out is not None:
        res_out.copy_(c - q * scale)
    codes_out.copy_((q + (qmax + 1)).to(torch.uint8))
    return scale.squeeze(1)


# The kernels below see one uint8 code per value, stored contiguously: 2- and 4-bit codes are packed
# and unpacked around them by :func:`_pack_into` / :func:`_unpack_into`, whole rows at a time with a
# few vectorised integer passes. Packing inside a compiled kernel made Inductor gather every pair of
# values with scalar, strided loads (int4 encode cost 1.8x the int8 one, decode 4x).


def _encode_kernel(x, res_in, res_out, codes_out, noise, qmax: int) -> torch.Tensor:
    """Error-feedback quantize rows of ``x`` (+ ``res_in``) straight into the given outputs; return the scales."""
    c = x.float()
    if res_in is not None:
        c = c + res_in
    return _quantize_into(c, res_out, codes_out, noise, qmax)


def _encode_kernel_inplace(x, res, codes_out, noise, qmax: int) -> torch.Tensor:
    """:func:`_encode_kernel` with the residual updated in place (``res_in is res_out``)."""
    return _quantize_into(x.float() + res, res, codes_out, noise, qmax)


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


def _reduce_kernel(codes, scale, res_in, res_out, codes_out, noise, qmax: int) -> torch.Tensor:
    """Average P copies (:func:`_mean_of_copies`), add ``res_in`` and requantize into the outputs."""
    acc = _mean_of_copies(codes, scale, qmax)
    if res_in is not None:
        acc = acc + res_in
    return _quantize_into(acc, res_out, codes_out, noise, qmax)


def _reduce_kernel_inplace(codes, scale, res, codes_out, noise, qmax: int) -> torch.Tensor:
    """:func:`_reduce_kernel` with the residual updated in place (``res_in is res_out``)."""
    return _quantize_into(_mean_of_copies(codes, scale, qmax) + res, res, codes_out, noise, qmax)


def _decode_kernel(codes, scale, out, qmax: int) -> None:
    """Dequantize uint8 codes (rows, block) with scales (rows,) into ``out`` (rows, block) of any float dtype."""
    out.copy_((codes.float() - (qmax + 1)) * scale.unsqueeze(1))


_LITTLE_ENDIAN = sys.byteorder == "little"
_LOCAL = threading.local()


def _scratch(slot: int, shape: Tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A contiguous tensor of ``shape`` from this thread's reusable buffer ``slot`` (grown, never shrunk).

    The hook calls the kernels chunk after chunk with the same sizes: after the first chunk nothing
    is allocated. Per thread, so that the communication thread, the training thread and the
    background compiler never share one.
    """
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    nbytes = math.prod(shape) * dtype.itemsize
    key = (slot, torch.device(device))
    buf = bufs.get(key)
    if buf is None or buf.numel() < nbytes:
        buf = bufs[key] = torch.empty(max(nbytes, 64), dtype=torch.uint8, device=device)
    return buf[:nbytes].view(dtype).view(shape)


def _pack_into(codes: torch.Tensor, out: torch.Tensor, bits: int) -> None:
    """Pack contiguous uint8 codes ``(..., block)`` (values below ``2**bits``) into ``out`` ``(..., block * bits / 8)``.

    Little-endian machines read neighbouring codes as one wider integer and fold them with a shift
    and a scaled subtraction (exact integer arithmetic, no value ever over 255 at the narrowing copy).
    4 bits, per pair ``v = c0 + 256 c1`` (int16): ``t = v >> 4 = 16 c1`` and ``v - 15 t = c0 + 16 c1``.
    2 bits, per pair of bytes ``v = c0 + 256 c1``: ``v - 63 (v >> 6) = c0 + 4 c1`` (< 16), then per
    pair of those ``w = p0 + 65536 p1`` (int32): ``w - 4095 (w >> 12) = p0 + 16 p1``. That is the wire
    format of :func:`pack_codes`, first code lowest.
    """
    if not _LITTLE_ENDIAN:  # pragma: no cover - no big-endian machine to test on
        out.copy_(_pack_rows(codes.reshape(-1, codes.shape[-1]), bits).view(out.shape))
        return
    v = codes.view(torch.int16)
    t = _scratch(1, tuple(v.shape), torch.int16, codes.device)
    torch.bitwise_right_shift(v, 4 if bits == 4 else 6, out=t)
    torch.add(v, t, alpha=-15 if bits == 4 else -63, out=t)
    if bits == 2:
        w = t.view(torch.int32)
        u = _scratch(2, tuple(w.shape), torch.int32, codes.device)
        torch.bitwise_right_shift(w, 12, out=u)
        torch.add(w, u, alpha=-4095, out=u)
        t = u
    out.copy_(t)


def _unpack_into(packed: torch.Tensor, codes: torch.Tensor, bits: int) -> None:
    """Unpack ``(..., bytes)`` of 2- or 4-bit codes into contiguous uint8 ``codes`` ``(..., bytes * 8 / bits)``.

    The inverse of :func:`_pack_into`. 4 bits: every byte ``w = c0 + 16 c1`` widened to int16,
    ``w + 240 (w >> 4) = c0 + 256 c1``. 2 bits: every byte ``w = p0 + 16 p1`` (``p = c + 4 c'``)
    widened to int32, ``w + 65520 (w >> 4) = p0 + 65536 p1``; then per int16 ``x = c0 + 4 c1``:
    ``x + 252 (x >> 2) = c0 + 256 c1``. Read back as bytes, those are the codes in order.
    """
    if not _LITTLE_ENDIAN:  # pragma: no cover - no big-endian machine to test on
        codes.copy_(_split_codes(packed, bits).reshape(codes.shape))
        return
    w = codes.view(torch.int16 if bits == 4 else torch.int32)
    w.copy_(packed)
    t = _scratch(1, tuple(w.shape), w.dtype, codes.device)
    torch.bitwise_right_shift(w, 4, out=t)
    w.add_(t, alpha=240 if bits == 4 else 65520)
    if bits == 2:
        x = codes.view(torch.int16)
        t = _scratch(1, tuple(x.shape), torch.int16, codes.device)
        torch.bitwise_right_shift(x, 2, out=t)
        x.add_(t, alpha=252)


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


def _decode_sum_kernel(codes, scale, out, divide: int, factor, qmax: int) -> None:
    """Sum P code copies (P, rows, block) in order 0..P-1, divide by ``divide``, times ``factor``, into ``out``."""
    acc = _sum_copies(codes, scale, qmax)
    if divide != 1:
        acc = acc / divide
    if factor is not None:
        acc = acc * factor
    out.copy_(acc)


_COMPILE_LOCK = threading.Lock()
_COMPILED: dict = {}
_COMPILE_FAILED: set = set()


def compile_available() -> bool:
    """Return whether ``torch.compile`` can be used here (a compiler and a supported platform)."""
    try:
        import torch._dynamo  # noqa: F401
        import torch._inductor  # noqa: F401
    except Exception:  # pragma: no cover - depends on the torch build
        return False
    return hasattr(torch, "compile")


_WARNED = []


def _warn_compile_failure(what: str, exc: BaseException) -> None:
    """Log a compilation failure once per process (later failures are logged at debug level)."""
    if _WARNED:
        logger.debug("torch.compile of %s failed (%s: %s)", what, type(exc).__name__, exc)
        return
    _WARNED.append(True)
    logger.warning("torch.compile of %s failed (%s: %s); the eager kernels are used (identical results)", what, type(exc).__name__, exc)


def _kernel_context():
    """Compile the kernels as plain functions even while a DDP forward runs on another thread.

    Dynamo hands every graph it compiles during a DDP forward to its DDPOptimizer (which splits
    graphs at DDP's bucket boundaries and refuses small ``bucket_cap_mb``); the kernels have no
    parameters, so it is turned off for them. Duck sizing is turned off too: the kernels get views
    at many storage offsets, and an offset that happens to equal another (an int8 code byte offset
    equals its fp32 residual's element offset) would otherwise become a guard, and every new
    offset a recompilation (config patches are thread-local). The kernels run without autograd
    (they write into given buffers): otherwise a call from a forward pass (grad mode on) and one
    from a backward hook (grad mode off) each need their own graph, and a training step ends up
    recompiling. A few graphs per kernel remain (with and without a residual, per dtype, offset 0
    or not), more than Dynamo's default limit of 8 allows, so the limit is raised for them.
    """
    import contextlib
    import importlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    options = (("torch._dynamo.config", "optimize_ddp", False), ("torch._dynamo.config", "recompile_limit", 64),
               ("torch.fx.experimental._config", "use_duck_shape", False))
    for module, name, value in options:
        try:
            stack.enter_context(importlib.import_module(module).patch(**{name: value}))
        except Exception:  # pragma: no cover - a torch without the option
            pass
    return stack


def _run(fn: Callable, compiled: bool, *args):
    """Run ``fn(*args)`` through its ``torch.compile`` version when asked, else eagerly.

    Compilation happens once per kernel with dynamic shapes. If it fails (no C++ compiler, an
    unsupported platform, a torch without Inductor), the failure is logged once and the eager
    function runs from then on: results are identical either way.
    """
    if not compiled or fn in _COMPILE_FAILED:
        return fn(*args)
    try:
        cfn = _COMPILED.get(fn)
        if cfn is None:
            with _COMPILE_LOCK:
                cfn = _COMPILED.get(fn)
                if cfn is None:
                    cfn = torch.compile(fn, dynamic=True)
                    _COMPILED[fn] = cfn
        with _kernel_context():
            return cfn(*args)
    except Exception as exc:  # compilation problems surface at the first call
        _COMPILE_FAILED.add(fn)
        _warn_compile_failure(fn.__name__, exc)
        return fn(*args)


# --------------------------------------------------------------------------------------------
# packing


def packed_nbytes(numel: int, bits: int) -> int:
    """Return the bytes that ``numel`` codes of ``bits`` bits occupy once packed.

    Example: 1000 int4 codes take 500 bytes; 1000 int3 codes take ceil(1000 / 8) * 3 = 375 bytes.
    """
    _check_bits(bits)
    if bits == 3:
        return -(-numel // 8) * 3
    per = 8 // bits
    return -(-numel // per)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (uint8, values < 2**bits) into a flat uint8 tensor.

    Steps: flatten; pad with zeros to a whole number of packing groups (8 // bits codes per byte, or
    8 codes per 3 bytes for 3 bits); combine each group into bytes, first code in the lowest bits.

    Example: int4 codes ``[1, 2, 15, 0]`` pack to bytes ``[0x21, 0x0F]``.

    Args:
        codes: uint8 tensor of any shape.
        bits: code width, one of ``SUPPORTED_BITS``.

    Returns:
        uint8 tensor of ``packed_nbytes(codes.numel(), bits)`` bytes.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if bits == 3:
        groups = -(-n // 8)
        padded = torch.zeros(groups * 8, dtype=torch.int32, device=flat.device)
        padded[:n] = flat
        shifts = torch.arange(8, device=flat.device, dtype=torch.int32) * 3
        words = (padded.view(groups, 8) << shifts).sum(dim=1, dtype=torch.int32)
        byte_shifts = torch.arange(3, device=flat.device, dtype=torch.int32) * 8
        return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    per = 8 // bits
    if n % per:
        flat = torch.cat([flat, flat.new_zeros(per - n % per)])
    return _pack_kernel(flat, bits)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Unpack ``numel`` codes from bytes made by :func:`pack_codes`.

    Args:
        packed: flat uint8 tensor.
        bits: code width used when packing.
        numel: how many codes to return (the packing padding is dropped).

    Returns:
        uint8 tensor of shape ``(numel,)``.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    need = packed_nbytes(numel, bits)
    if packed.numel() != need:
        raise ValueError(f"{numel} codes of {bits} bits need {need} packed bytes, got {packed.numel()}")
    flat = packed.reshape(-1)
    if bits == 3:
        b = flat.view(-1, 3).to(torch.int32)
        words = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        shifts = torch.arange(8, device=flat.device, dtype=torch.int32) * 3
        codes = ((words.unsqueeze(1) >> shifts) & 7).to(torch.uint8).reshape(-1)
        return codes[:numel]
    return _unpack_kernel(flat, bits)[:numel]


# --------------------------------------------------------------------------------------------
# quantize / dequantize


@dataclass(frozen=True)
class QuantizedTensor:
    """A block-quantized tensor: packed codes plus one fp32 scale (and zero point) per block.

    Attributes:
        data: flat uint8 tensor of packed codes.
        scale: fp32 tensor of shape ``(num_blocks,)``.
        zero_point: fp32 tensor of integral zero points ``(num_blocks,)`` when asymmetric, else None.
        bits: code width.
        block_size: elements per block.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (dequantization returns it by default).
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    bits: int
    block_size: int
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def symmetric(self) -> bool:
        """Whether the codes are symmetric (no zero point)."""
        return self.zero_point is None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and zero points (stored as uint8)."""
        zp = 0 if self.zero_point is None else self.zero_point.numel()
        return self.data.numel() + self.scale.numel() * 4 + zp

    @property
    def bits_per_element(self) -> float:
        """Bytes held per original element, in bits (the real cost, scale overhead included)."""
        return 8.0 * self.nbytes / max(1, self.numel)


def _blocks(x: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, int]:
    """View ``x`` as (blocks, block_size), zero-padding the tail; return (blocks, numel)."""
    flat = x.reshape(-1)
    n = flat.numel()
    nb = max(1, -(-n // block_size))
    if nb * block_size != n:
        flat = torch.cat([flat, flat.new_zeros(nb * block_size - n)])
    return flat.view(nb, block_size), n


def _noise(shape, device, seed: Optional[int], generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else int(seed))
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


def quantize_codes(
    x: torch.Tensor,
    bits: int = 8,
    block_size: int = 256,
    *,
    symmetric: bool = True,
    stochastic: bool = False,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    compiled: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Quantize ``x`` block-wise to unpacked unsigned codes.

    Returns ``(codes, scale, zero_point)`` with ``codes`` uint8 of shape ``(blocks, block_size)``
    (padded tail included), ``scale`` fp32 ``(blocks,)``, ``zero_point`` fp32 ``(blocks,)`` or None.
    Arguments are those of :func:`quantize`.
    """
    _check_float(x)
    _check_bits(bits)
    _check_block(block_size)
    xb, _ = _blocks(x, block_size)
    noise = _noise(xb.shape, xb.device, seed, generator) if stochastic else None
    if symmetric:
        _, qmax, _ = qrange(bits, True)
        codes, scale = _run(_sym_quantize_kernel, compiled, xb, qmax, noise)
        return codes, scale, None
    xf = xb.float()
    scale, zp = choose_qparams(xf.amin(dim=1), xf.amax(dim=1), bits, symmetric=False)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).unsqueeze(1)
    y = xf / safe
    y = torch.round(y) if noise is None else torch.floor(y + noise)
    qmin, qmax, _ = qrange(bits, False)
    codes = torch.clamp(y + zp.unsqueeze(1), qmin, qmax)
    codes = torch.where(torch.isfinite(codes), codes, torch.zeros_like(codes)).to(torch.uint8)
    return codes, scale, zp


def quantize(
    x: torch.Tensor,
    bits: int = 8,
    block_size: int = 256,
    *,
    symmetric: bool = True,
    stochastic: bool = False,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    compiled: bool = False,
) -> QuantizedTensor:
    """Quantize a floating tensor block-wise and pack its codes.

    Steps:
        1. Flatten ``x`` and cut it into blocks of ``block_size`` (the tail block is zero-padded).
        2. Compute one fp32 scale per block (absmax, or min/max with a zero point).
        3. Divide by the scale and round: to nearest (ties to even), or stochastically
           (``floor(y + u)``, ``u ~ U[0, 1)``, unbiased: ``E[q] = y``), reproducible from ``seed``
           or ``generator``.
        4. Clamp to the code range and pack the codes (see module docstring).

    Example: ``quantize(torch.tensor([0.5, -1.0, 0.25]), bits=4, block_size=4)`` has scale
    ``1/7``, codes ``round([3.5, -7, 1.75]) = [4, -7, 2]`` (ties to even), error at most ``1/14``.

    Args:
        x: fp32, fp16, bf16 or fp64 tensor of any shape and length.
        bits: 2, 3, 4 or 8.
        block_size: elements sharing one scale; use ``x.numel()`` for one scale per tensor and the
            row length for one scale per row.
        symmetric: absmax scales (default) or affine scales with a zero point.
        stochastic: unbiased stochastic rounding instead of round-to-nearest.
        seed: seed of the stochastic rounding noise when no ``generator`` is given (default 0).
        generator: a ``torch.Generator`` on ``x``'s device for the noise.
        compiled: run the fused ``torch.compile`` kernels (falls back to eager where unavailable).

    Returns:
        A :class:`QuantizedTensor`.
    """
    codes, scale, zp = quantize_codes(
        x, bits, block_size, symmetric=symmetric, stochastic=stochastic, seed=seed, generator=generator, compiled=compiled
    )
    if bits == 3 or (codes.numel() % (8 // bits)):
        data = pack_codes(codes, bits)
    else:
        data = _run(_pack_kernel, compiled, codes, bits)
    return QuantizedTensor(data, scale, zp, bits, block_size, tuple(x.shape), x.dtype)


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], bits: int
) -> torch.Tensor:
    """Map unpacked codes ``(blocks, block_size)`` back to fp32 values of the same shape.

    Symmetric: ``(code - 2**(bits-1)) * scale``; asymmetric: ``(code - zero_point) * scale``.
    """
    _check_bits(bits)
    q = codes.reshape(scale.shape[0], -1).float()
    if zero_point is None:
        q = q - qrange(bits, True)[2]
    else:
        q = q - zero_point.unsqueeze(1)
    return q * scale.unsqueeze(1)


def dequantize(
    q: QuantizedTensor,
    *,
    dtype: Optional[torch.dtype] = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Reconstruct a tensor of ``q.shape`` from a :class:`QuantizedTensor`.

    Args:
        q: the quantized tensor.
        dtype: result dtype; defaults to the dtype that was quantized.
        compiled: use the fused ``torch.compile`` kernel for symmetric 2/4/8-bit codes.

    Returns:
        A tensor of shape ``q.shape``; blocks whose scale is non-finite come back non-finite.
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    nb = q.scale.numel()
    dtype = q.dtype if dtype is None else dtype
    if q.symmetric and q.bits != 3 and (q.block_size * q.bits) % 8 == 0:
        out = _run(_sym_dequantize_kernel, compiled, q.data, q.scale, q.bits, qrange(q.bits, True)[2])
    else:
        codes = unpack_codes(q.data, q.bits, nb * q.block_size)
        out = dequantize_codes(codes, q.scale, q.zero_point, q.bits)
    return out.reshape(-1)[: q.numel].reshape(q.shape).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    bits: int = 8,
    block_size: int = 256,
    *,
    symmetric: bool = True,
    stochastic: bool = False,
    seed: Optional[int] = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Quantize and dequantize ``x`` in one go (same shape and dtype), skipping the packing.

    Equal, element for element, to ``dequantize(quantize(x, ...))``.
    """
    codes, scale, zp = quantize_codes(
        x, bits, block_size, symmetric=symmetric, stochastic=stochastic, seed=seed, compiled=compiled
    )
    out = dequantize_codes(codes, scale, zp, bits)
    return out.reshape(-1)[: x.numel()].reshape(x.shape).to(x.dtype)


def error_feedback_step(
    x: torch.Tensor,
    residual: torch.Tensor,
    bits: int,
    block_size: int,
    *,
    noise: Optional[torch.Tensor] = None,
    compiled: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x + residual`` symmetrically and return what the quantization left behind.

    The error-feedback invariant holds up to fp32 rounding:
    ``x + residual == dequantize(codes, scale) + new_residual``.

    Args:
        x: values, shape ``(blocks, block_size)``, any float dtype.
        residual: fp32 residual of the same shape.
        bits: 2, 4 or 8.
        block_size: must equal ``x.shape[1]``.
        noise: optional ``U[0, 1)`` noise of the same shape for stochastic rounding.
        compiled: use the fused kernel.

    Returns:
        ``(packed codes, scale (blocks,), new_residual (blocks, block_size))``.
    """
    _check_bits(bits, GRADIENT_BITS)
    if x.dim() != 2 or x.shape[1] != block_size or residual.shape != x.shape:
        raise ValueError(
            f"x and residual must both have shape (blocks, {block_size}), got {tuple(x.shape)} and {tuple(residual.shape)}"
        )
    _, qmax, _ = qrange(bits, True)
    codes, scale, new_res = _run(_ef_quantize_kernel, compiled, x, residual, qmax, noise)
    return _run(_pack_kernel, compiled, codes, bits), scale, new_res


def dequantize_sum(packed: torch.Tensor, scale: torch.Tensor, bits: int, *, compiled: bool = False) -> torch.Tensor:
    """Dequantize P symmetric messages and sum them in rank order.

    Args:
        packed: uint8 ``(P, packed bytes)``.
        scale: fp32 ``(P, blocks)``.
        bits: 2, 4 or 8.

    Returns:
        fp32 ``(blocks, block_size)``: ``sum_p dequantize(packed[p], scale[p])``.
    """
    return _run(_sym_dequantize_sum_kernel, compiled, packed, scale, bits, qrange(bits, True)[2])


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, bits: int, *, compiled: bool = False) -> torch.Tensor:
    """Dequantize packed symmetric codes of ``scale.numel()`` blocks to fp32 ``(blocks, block_size)``."""
    return _run(_sym_dequantize_kernel, compiled, packed, scale, bits, qrange(bits, True)[2])


# --------------------------------------------------------------------------------------------
# the exchange's kernels: rows of blocks in, results written where the caller says (out=)


def _check_hook_bits(bits: int) -> int:
    _check_bits(bits)
    if bits == 3:
        raise ValueError("bits must be one of (2, 4, 8) for the exchange kernels, got 3")
    return qrange(bits, True)[1]


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
    qmax = _check_hook_bits(bits)
    rows, block = x.shape
    if codes_out is None:
        codes_out = torch.empty(rows, block * bits // 8, dtype=torch.uint8, device=x.device)
    if scale_out is None:
        scale_out = torch.empty(rows, dtype=torch.float32, device=x.device)
    codes8 = codes_out if bits == 8 else _scratch(0, (rows, block), torch.uint8, x.device)
    route = _residual_route(residual, residual_out)
    if route == "inplace":
        scale = _run(_encode_kernel_inplace, compiled, x, residual, codes8, noise, qmax)
    else:
        scale = _run(_encode_kernel, compiled and route != "overlap", x, residual, residual_out, codes8, noise, qmax)
    if bits != 8:
        _pack_into(codes8, codes_out, bits)
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
    qmax = _check_hook_bits(bits)
    p, rows, nbytes = codes.shape
    if codes_out is None:
        codes_out = torch.empty(rows, nbytes, dtype=torch.uint8, device=codes.device)
    if scale_out is None:
        scale_out = torch.empty(rows, dtype=torch.float32, device=codes.device)
    if bits == 8:
        copies, codes8 = codes, codes_out
    else:
        block = nbytes * 8 // bits
        copies = _scratch(3, (p, rows, block), torch.uint8, codes.device)
        _unpack_into(codes, copies, bits)
        codes8 = _scratch(0, (rows, block), torch.uint8, codes.device)
    route = _residual_route(residual, residual_out)
    if route == "inplace":
        mean_scale = _run(_reduce_kernel_inplace, compiled, copies, scale, residual, codes8, noise, qmax)
    else:
        mean_scale = _run(_reduce_kernel, compiled and route != "overlap", copies, scale, residual, residual_out, codes8, noise, qmax)
    if bits != 8:
        _pack_into(codes8, codes_out, bits)
    scale_out.copy_(mean_scale)
    return codes_out, scale_out


def decode_blocks(
    codes: torch.Tensor, scale: torch.Tensor, bits: int, *, out: Optional[torch.Tensor] = None, compiled: bool = False
) -> torch.Tensor:
    """Dequantize packed rows ``(rows, block * bits / 8)`` with fp32 scales ``(rows,)`` into ``out``.

    ``out`` is ``(rows, block)`` of any float dtype (e.g. a view of the gradient bucket; fp32 if None).
    Rows with a non-finite scale come back non-finite.
    """
    qmax = _check_hook_bits(bits)
    if out is None:
        out = torch.empty(codes.shape[0], codes.shape[1] * 8 // bits, dtype=torch.float32, device=codes.device)
    if bits != 8:
        unpacked = _scratch(0, (codes.shape[0], codes.shape[1] * 8 // bits), torch.uint8, codes.device)
        _unpack_into(codes, unpacked, bits)
        codes = unpacked
    _run(_decode_kernel, compiled, codes, scale, out, qmax)
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
    qmax = _check_hook_bits(bits)
    if isinstance(divide, bool) or not isinstance(divide, int) or divide < 1:
        raise ValueError(f"divide must be a positive int, got {divide!r}")
    if factor is not None and (not isinstance(factor, torch.Tensor) or factor.dim() != 0 or factor.dtype != torch.float32):
        raise TypeError(f"factor must be a 0-dim float32 tensor or None, got {factor!r}")
    p, rows, nbytes = codes.shape
    if out is None:
        out = torch.empty(rows, nbytes * 8 // bits, dtype=torch.float32, device=codes.device)
    if bits != 8:
        copies = _scratch(3, (p, rows, nbytes * 8 // bits), torch.uint8, codes.device)
        _unpack_into(codes, copies, bits)
        codes = copies
    _run(_decode_sum_kernel, compiled, codes, scale, out, divide, factor, qmax)
    return out


class BackgroundCompiler:
    """Compile kernels with ``torch.compile`` on a background thread; say when they are ready.

    ``start(warmup)`` runs ``warmup()`` (which calls the kernels with ``compiled=True`` on sample data
    shaped like the real calls) on a daemon thread. Until it has finished, :attr:`ready` is False
    and callers run the eager kernels, so that no step waits for a compilation. If compiling fails
    (no C++ compiler, an unsupported platform), one warning is logged, :attr:`failed` is set and the
    eager kernels stay in use; results are bit-identical either way.
    """

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._done = threading.Event()
        self._stop = threading.Event()
        self.ready = False
        self.failed = False

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called."""
        return self._thread is not None

    @property
    def done(self) -> bool:
        """Whether compiling has ended: ready, failed (or rejected by the self-check) or stopped."""
        return self._done.is_set()

    def start(self, warmup: Callable[[threading.Event], None]) -> None:
        """Start compiling (once); return at once.

        ``warmup(stop)`` should return early once the event ``stop`` is set (checked between kernels).
        At interpreter exit the compilation is stopped and waited for (a thread inside the compiler
        at exit would abort the process).
        """
        if self._thread is not None:
            return
        if not compile_available():
            self._fail(RuntimeError("torch.compile is unavailable in this torch build"))
            return
        self._thread = threading.Thread(target=self._work, args=(warmup,), name="gradcomp-compile", daemon=True)
        atexit.register(self.stop)
        self._thread.start()

    def stop(self, timeout: float = 300.0) -> None:
        """Ask the compilation to stop after the kernel in progress and wait for it (at most ``timeout`` s)."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def _work(self, warmup: Callable[[threading.Event], None]) -> None:
        try:
            warmup(self._stop)
            kernels = (_encode_kernel, _encode_kernel_inplace, _reduce_kernel, _reduce_kernel_inplace, _decode_kernel, _decode_sum_kernel)
            failed = [fn.__name__ for fn in kernels if fn in _COMPILE_FAILED]
            if failed:
                raise RuntimeError(f"compilation of {', '.join(failed)} failed")
            self.ready = not self._stop.is_set()
        except Exception as exc:  # a failure to compile never stops training
            self._fail(exc)
        finally:
            self._done.set()

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        self._done.set()
        _warn_compile_failure("the exchange kernels", exc)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until compilation finished or failed; return :attr:`ready`."""
        self._done.wait(timeout)
        return self.ready


# --------------------------------------------------------------------------------------------
# error metrics


def mse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean squared error between two tensors of the same shape, computed in fp64."""
    _same_shape(reference, approx)
    return float(torch.mean((reference.detach().double() - approx.detach().double()) ** 2))


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB.

    Returns ``inf`` for an exact reconstruction and ``-inf`` for an all-zero reference with error.
    """
    _same_shape(reference, approx)
    r = reference.detach().double()
    signal = float(torch.sum(r * r))
    noise = float(torch.sum((r - approx.detach().double()) ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine_similarity(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors (1.0 when both are zero)."""
    _same_shape(reference, approx)
    a = reference.detach().double().reshape(-1)
    b = approx.detach().double().reshape(-1)
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(torch.dot(a, b)) / (na * nb)


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"tensors must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


# --------------------------------------------------------------------------------------------
# quantization with given scales


def quantize_codes_with_qparams(
    xb: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], bits: int
) -> torch.Tensor:
    """Quantize blocks ``(blocks, block_size)`` to unsigned codes with scales chosen beforehand.

    The rounding is that of :func:`quantize_codes` (to nearest, ties to even, then clamped), so with
    the scales :func:`quantize_codes` would choose the codes are identical. Use it when the stored
    scale differs from the computed one (e.g. rounded to fp16 for storage) so that the codes are
    made with the very scale that dequantizes them, or for static scales from a calibration.

    Example: ``xb = [[0.5, -1.0]]``, ``scale = [1/7]``, 4 bits symmetric -> ``round([3.5, -7]) =
    [4, -7]``, stored with offset 8 as ``[12, 1]``.

    Args:
        xb: floating tensor of shape ``(blocks, block_size)``.
        scale: ``(blocks,)`` scales of any float dtype (used in fp32); a zero scale maps its block to 0.
        zero_point: ``(blocks,)`` integral zero points for asymmetric codes, or None for symmetric.
        bits: code width, one of ``SUPPORTED_BITS``.

    Returns:
        uint8 codes of shape ``(blocks, block_size)``; non-finite inputs give code 0.
    """
    _check_float(xb, "xb")
    _check_bits(bits)
    if xb.dim() != 2 or scale.shape != (xb.shape[0],):
        raise ValueError(f"xb must be (blocks, block_size) with scale (blocks,), got {tuple(xb.shape)} and {tuple(scale.shape)}")
    if zero_point is not None and zero_point.shape != scale.shape:
        raise ValueError(f"zero_point must have the shape of scale {tuple(scale.shape)}, got {tuple(zero_point.shape)}")
    s = scale.float().unsqueeze(1)
    y = torch.round(xb.float() / torch.where(s == 0, torch.ones_like(s), s))
    if zero_point is None:
        qmin, qmax, offset = qrange(bits, True)
        y = torch.clamp(y, qmin, qmax) + offset
    else:
        qmin, qmax, _ = qrange(bits, False)
        y = torch.clamp(y + zero_point.float().unsqueeze(1), qmin, qmax)
    return torch.where(torch.isfinite(y), y, torch.zeros_like(y)).to(torch.uint8)
