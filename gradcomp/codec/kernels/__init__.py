"""The exchange's kernels behind one dispatch: encode, reduce, decode, decode-sum of rows of blocks.

The exchange (:mod:`gradcomp.comm.exchange`) calls only the four functions here; with ``fused=True``
(the default) each runs the fastest backend its tensors allow, otherwise the eager reference:

* **native** (:mod:`~gradcomp.codec.kernels.native`): C++ kernels built at install time, for CPU
  tensors; one pass over memory per kernel, ready from the first call (nothing compiles at run time);
* **compiled** (:mod:`~gradcomp.codec.kernels.compiled`): the reference through ``torch.compile``,
  for CUDA tensors, once :func:`prepare` compiled and checked them (before training starts);
* **eager** (:mod:`~gradcomp.codec.kernels.reference`): plain torch ops, the definition of every
  result (``fused=False``, and wherever the others cannot run).

All three give bit-identical results (tested), for every registered format. Rows are blocks: ``x``
is ``(rows, block)``, with one fp32 scale per row (``(rows,)``) or one e8m0 byte per 32 values
(``(rows, block / 32)``, :func:`scale_shape`); codes are packed by the format's width. Where the native kernels should run but are
not built (no C++ compiler at install), one warning says so and the eager reference runs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterable, Optional, Tuple, Union

import torch

from gradcomp.codec.compiling import compile_available
from gradcomp.codec.compiling import run as _run
from gradcomp.codec.formats import WireFormat, wire_format
from gradcomp.codec.kernels import compiled as _compiled
from gradcomp.codec.kernels import native
from gradcomp.codec.kernels import reference as ref
from gradcomp.codec.packing import pack_rows_into, scratch, unpack_rows_into

logger = logging.getLogger(__name__)

__all__ = [
    "encode_blocks",
    "reduce_blocks",
    "decode_blocks",
    "decode_sum_blocks",
    "backend",
    "prepare",
    "force",
    "compile_available",
    "scale_shape",
    "empty_scales",
    "scales_finite",
    "poison_scales_",
    "rotate_blocks",
]

Format = Union[WireFormat, str, int]
_WARNED = threading.Event()
_BACKENDS = ("native", "compiled", "eager")
_FORCED: Optional[str] = None  # force()'s backend, for every thread (the hook's kernels run on its own)


def backend(device: Union[str, torch.device] = "cpu", fused: bool = True) -> str:
    """The kernels that run for tensors on ``device``: ``"native (avx512)"``, ``"compiled"`` or ``"eager"``.

    Example: ``backend("cpu")`` is ``"native (avx512)"`` on a machine with AVX-512 where gradcomp was
    installed with a C++ compiler, ``"eager"`` where it was not.
    """
    device = torch.device(device)
    if not fused:
        return "eager"
    if device.type == "cpu":
        return f"native ({native.isa()})" if native.available() else "eager"
    return "compiled" if _compiled.ready(device) else "eager"


def prepare(device: Union[str, torch.device], dtypes: Iterable[torch.dtype] = (torch.float32,),
            formats: Iterable[Format] = ("int8",), block_size: int = 256, fused: bool = True) -> str:
    """Make the fused kernels for ``device`` ready before training starts; return :func:`backend`.

    CPU: nothing to compile; where the native kernels are not built, one warning says so. CUDA:
    compile the kernels with ``torch.compile`` now, on this thread, for the given bucket dtypes and
    formats, and check them bit for bit against the eager reference on sample blocks; if compiling
    fails or a result differs, one warning is logged and the eager kernels are used. Nothing ever
    compiles later, beside the training (a compile running on another thread changes what
    ``torch.compiler.is_compiling()`` tells the training thread, and with it the optimizer's numerics).
    """
    device = torch.device(device)
    if fused and device.type == "cpu" and not native.available():
        _warn_native_missing()
    elif fused and device.type == "cuda":
        _compiled.prepare(device, tuple(dtypes), tuple(wire_format(f) for f in formats), block_size)
    return backend(device, fused)


def _warn_native_missing() -> None:
    if not _WARNED.is_set():
        _WARNED.set()
        logger.warning(
            "gradcomp's native kernels are not built here (%s); the exchange runs the eager reference kernels, "
            "several times slower (identical results). Reinstall gradcomp where a C++ compiler is available "
            "(pip install --force-reinstall --no-deps .) to build them.", native.IMPORT_ERROR,
        )


@contextlib.contextmanager
def force(name: str):
    """Run every kernel call inside the ``with`` block on backend ``name``, whatever ``fused`` says.

    ``"native"`` (needs the built module; layouts it does not take still run eagerly), ``"compiled"``
    (``torch.compile`` on any device, compiling at the first call) or ``"eager"``. For comparisons
    and tests: the backends give bit-identical results, which is what the tests check this way.
    """
    global _FORCED
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    if name == "native" and not native.available():
        raise RuntimeError(f"the native kernels are not built here ({native.IMPORT_ERROR})")
    before, _FORCED = _FORCED, name
    try:
        yield
    finally:
        _FORCED = before


def _mode(t: torch.Tensor, fused: bool) -> str:
    """The backend a call on ``t`` runs: ``"native"``, ``"compiled"`` or ``"eager"``."""
    if _FORCED is not None:
        return _FORCED
    if not fused:
        return "eager"
    if t.device.type == "cpu":
        if native.available():
            return "native"
        _warn_native_missing()
        return "eager"
    return "compiled" if _compiled.ready(t.device) else "eager"


def _format(bits) -> WireFormat:
    return wire_format(bits, "bits")


def scale_shape(fmt: Format, rows: int, block: int) -> Tuple[int, ...]:
    """The shape of ``rows`` blocks' scales: ``(rows,)`` fp32, or ``(rows, block / group)`` uint8 (e8m0)."""
    fmt = _format(fmt)
    return (rows,) if fmt.scale == "fp32" else (rows, fmt.scales_per_block(block))


def empty_scales(fmt: Format, rows: int, block: int, device=None) -> torch.Tensor:
    """Uninitialised scales of ``rows`` blocks in ``fmt``'s layout (:func:`scale_shape`, fp32 or uint8)."""
    fmt = _format(fmt)
    return torch.empty(scale_shape(fmt, rows, block), dtype=getattr(torch, fmt.scale_dtype), device=device)


def scales_finite(scale: torch.Tensor, fmt: Format) -> torch.Tensor:
    """A 0-dim bool tensor: whether every scale is finite (fp32: not nan/inf; e8m0: no byte 255, the NaN scale).

    A block holding a nan or an inf always gets a non-finite scale (every format), so this is the
    exchange's finiteness check of everything the scales cover.
    """
    return ref.scales_finite(scale, _format(fmt))


def poison_scales_(scale: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Make every scale non-finite if any is (in place): a non-finite value anywhere then reaches every receiver."""
    fmt = _format(fmt)
    if fmt.scale == "fp32":
        return scale.add_(torch.where(torch.isfinite(scale).all(), 0.0, float("nan")))
    return scale.masked_fill_((scale == 255).any(), 255)


def rotate_blocks(x: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Rotate rows ``(rows, block)`` as every rotating format does before quantizing (``inverse``: back), in fp32, eagerly.

    A new tensor. For what the exchange's kernels do not need per step: the error measurements
    (the residuals of a rotated format live in the rotated space) and moving residuals between a
    rotated and a plain format. ``block`` must be a power of two >= 16.
    """
    t = ref.tables(wire_format("int8r"), x.shape[1], x.device)  # the rotation depends on the block alone
    return ref.unrotate(x.float(), t) if inverse else ref.rotate(x.float(), t)


def _packed(codes8: torch.Tensor, codes_out: torch.Tensor, bits: int) -> None:
    if bits != 8:
        pack_rows_into(codes8, codes_out, bits)


def encode_blocks(
    x: torch.Tensor,
    bits: Format,
    *,
    residual: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    codes_out: Optional[torch.Tensor] = None,
    scale_out: Optional[torch.Tensor] = None,
    fused: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows of blocks (with error feedback) into packed codes and scales, in place.

    Steps, per row (one block), as :mod:`~gradcomp.codec.kernels.reference` defines them: ``c = x``
    (rotated first by a rotating format) ``+ residual``; the scale of each scale group (fp32
    ``max|c| / max_code``, or an e8m0 power of two per 32 values); codes rounded to nearest, ties to
    even (or ``floor(c / scale + noise)``), saturated; packed first code lowest;
    ``residual_out = c - dequantized``. A group holding a nan or an inf gets a non-finite scale
    and zero codes.

    Example (int8): a row ``[1.27, -0.5]`` has scale ``0.01``, codes ``[255, 78]``, residual ``[0, 0]``.

    Args:
        x: ``(rows, block)`` fp32/fp16/bf16 (a view of a bucket is fine).
        bits: the wire format: a :class:`WireFormat`, its name, or 2, 4, 8 for the int formats.
        residual: fp32 ``(rows, block)`` added before quantizing (error feedback), or None.
        residual_out: fp32 ``(rows, block)`` receiving ``c - dequantized``; may be ``residual`` itself.
        noise: ``U[0, 1)`` ``(rows, block)`` for stochastic rounding, or None (to nearest, ties to even).
        codes_out: uint8 ``(rows, block * bits / 8)``, e.g. a view of a send buffer (allocated if None).
        scale_out: the scales, :func:`scale_shape` (fp32 ``(rows,)``; e8m0 uint8 ``(rows, block/32)``; allocated if None).
        fused: run the fused kernels (native on CPU, compiled on CUDA; bit-identical to the eager ones).

    Returns:
        ``(codes_out, scale_out)``.
    """
    fmt = _format(bits)
    bits = fmt.bits
    rows, block = x.shape
    if codes_out is None:
        codes_out = torch.empty(rows, block * bits // 8, dtype=torch.uint8, device=x.device)
    if scale_out is None:
        scale_out = empty_scales(fmt, rows, block, x.device)
    mode = _mode(x, fused)
    if mode == "native" and native.encode(x, residual, residual_out, noise, codes_out, scale_out, fmt):
        return codes_out, scale_out
    compiled = mode == "compiled"
    t = ref.tables(fmt, block, x.device)
    codes8 = codes_out if bits == 8 else scratch(0, (rows, block), torch.uint8, x.device)
    route = _residual_route(residual, residual_out)
    if route == "inplace":
        scale = _run(ref.encode_kernel_inplace, compiled, x, residual, codes8, noise, fmt, t)
    else:
        scale = _run(ref.encode_kernel, compiled and route != "overlap", x, residual, residual_out, codes8, noise, fmt, t)
    _packed(codes8, codes_out, bits)
    scale_out.copy_(scale)
    return codes_out, scale_out


def reduce_blocks(
    codes: torch.Tensor,
    scale: torch.Tensor,
    bits: Format,
    *,
    residual: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    codes_out: Optional[torch.Tensor] = None,
    scale_out: Optional[torch.Tensor] = None,
    fused: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Average P quantized copies of the same blocks and requantize the mean, in one pass.

    Steps: dequantize copy ``p`` (``value(code) * scale``), sum the copies in the order
    ``p = 0..P-1``, divide by ``P``, add ``residual``, quantize as :func:`encode_blocks` does (a
    rotating format stays in the rotated space: nothing is rotated here).

    Args:
        codes: uint8 ``(P, rows, block * bits / 8)``; rows of a received buffer (strided views are fine).
        scale: ``(P,) + scale_shape``: fp32 ``(P, rows)`` or e8m0 uint8 ``(P, rows, block/32)``.
        bits: the wire format (as in :func:`encode_blocks`).
        residual, residual_out, noise, codes_out, scale_out, fused: as in :func:`encode_blocks`.

    Returns:
        ``(codes_out, scale_out)`` of the mean.
    """
    fmt = _format(bits)
    bits = fmt.bits
    p, rows, nbytes = codes.shape
    block = nbytes * 8 // bits
    if codes_out is None:
        codes_out = torch.empty(rows, nbytes, dtype=torch.uint8, device=codes.device)
    if scale_out is None:
        scale_out = empty_scales(fmt, rows, block, codes.device)
    mode = _mode(codes, fused)
    if mode == "native" and native.reduce(codes, scale, residual, residual_out, noise, codes_out, scale_out, fmt):
        return codes_out, scale_out
    compiled = mode == "compiled"
    t = ref.tables(fmt, block, codes.device)
    if bits == 8:
        copies, codes8 = codes, codes_out
    else:
        copies = scratch(3, (p, rows, block), torch.uint8, codes.device)
        unpack_rows_into(codes, copies, bits)
        codes8 = scratch(0, (rows, block), torch.uint8, codes.device)
    route = _residual_route(residual, residual_out)
    if route == "inplace":
        mean_scale = _run(ref.reduce_kernel_inplace, compiled, copies, scale, residual, codes8, noise, fmt, t)
    else:
        mean_scale = _run(ref.reduce_kernel, compiled and route != "overlap", copies, scale, residual, residual_out, codes8, noise, fmt, t)
    _packed(codes8, codes_out, bits)
    scale_out.copy_(mean_scale)
    return codes_out, scale_out


def decode_blocks(
    codes: torch.Tensor, scale: torch.Tensor, bits: Format, *, out: Optional[torch.Tensor] = None, fused: bool = True
) -> torch.Tensor:
    """Dequantize packed rows ``(rows, block * bits / 8)`` with their scales (:func:`scale_shape`) into ``out``.

    ``out`` is ``(rows, block)`` of any float dtype (e.g. a view of the gradient bucket; fp32 if None);
    a rotating format's values are rotated back first. Rows with a non-finite scale come back non-finite.
    """
    fmt = _format(bits)
    bits = fmt.bits
    block = codes.shape[1] * 8 // bits
    if out is None:
        out = torch.empty(codes.shape[0], block, dtype=torch.float32, device=codes.device)
    mode = _mode(codes, fused)
    if mode == "native" and native.decode(codes, scale, out, fmt):
        return out
    compiled = mode == "compiled"
    if bits != 8:
        unpacked = scratch(0, (codes.shape[0], block), torch.uint8, codes.device)
        unpack_rows_into(codes, unpacked, bits)
        codes = unpacked
    _run(ref.decode_kernel, compiled, codes, scale, out, fmt, ref.tables(fmt, block, codes.device))
    return out


def decode_sum_blocks(
    codes: torch.Tensor,
    scale: torch.Tensor,
    bits: Format,
    *,
    out: Optional[torch.Tensor] = None,
    divide: int = 1,
    factor: Optional[torch.Tensor] = None,
    fused: bool = True,
) -> torch.Tensor:
    """Dequantize P quantized copies of the same blocks and sum them in rank order, without requantizing.

    Steps: dequantize copy ``p`` (``value(code) * scale``) in fp32, sum the copies in the
    order ``p = 0..P-1`` (the order :func:`reduce_blocks` sums them in), divide by ``divide``,
    multiply by ``factor``, rotate back (a rotating format), write into ``out`` (cast to its dtype
    once, at the end).

    Example (int8, P = 2, ``divide=2``): codes ``[[138], [118]]`` with scales ``[[0.5], [0.25]]``
    are ``5.0`` and ``-2.5``; their mean ``1.25`` is written.

    Args:
        codes: uint8 ``(P, rows, block * bits / 8)``; rows of a received buffer (strided views are fine).
        scale: ``(P,) + scale_shape``: fp32 ``(P, rows)`` or e8m0 uint8 ``(P, rows, block/32)``.
        bits: the wire format (as in :func:`encode_blocks`).
        out: ``(rows, block)`` of any float dtype (e.g. a view of an output shard; fp32 if None).
        divide: a positive int the sum is divided by (``P`` for a mean).
        factor: an fp32 0-dim tensor the result is multiplied by (FSDP's pre-multiplied sum), or None.
        fused: run the fused kernels (native on CPU, compiled on CUDA; bit-identical to the eager ones).

    Returns:
        ``out``. Rows with a non-finite scale in any copy come back non-finite.
    """
    fmt = _format(bits)
    bits = fmt.bits
    if isinstance(divide, bool) or not isinstance(divide, int) or divide < 1:
        raise ValueError(f"divide must be a positive int, got {divide!r}")
    if factor is not None and (not isinstance(factor, torch.Tensor) or factor.dim() != 0 or factor.dtype != torch.float32):
        raise TypeError(f"factor must be a 0-dim float32 tensor or None, got {factor!r}")
    p, rows, nbytes = codes.shape
    block = nbytes * 8 // bits
    if out is None:
        out = torch.empty(rows, block, dtype=torch.float32, device=codes.device)
    mode = _mode(codes, fused)
    if mode == "native" and native.decode_sum(codes, scale, out, divide, factor, fmt):
        return out
    compiled = mode == "compiled"
    if bits != 8:
        copies = scratch(3, (p, rows, block), torch.uint8, codes.device)
        unpack_rows_into(codes, copies, bits)
        codes = copies
    _run(ref.decode_sum_kernel, compiled, codes, scale, out, divide, factor, fmt, ref.tables(fmt, block, codes.device))
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

