"""Bit packing of codes: 8 bits one per byte, 4 bits two per byte, 2 bits four per byte, 3 bits eight per three bytes.

Codes are packed little-end first: the first code of a byte sits in its lowest bits. Worked example
(4 bits): codes ``[1, 2, 15, 0]`` pack to bytes ``[0x21, 0x0F]``.

Two families live here:

* :func:`pack_codes` / :func:`unpack_codes`: flat tensors of any length (weights, files);
* :func:`pack_rows_into` / :func:`unpack_rows_into`: whole rows of 2- or 4-bit codes written into a
  given buffer with a few vectorised integer passes (the eager exchange kernels' packing), using a
  per-thread scratch (:func:`scratch`) so that nothing is allocated per call.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Tuple

import torch

from gradcomp.checks import check_bits as _check_bits

__all__ = ["packed_nbytes", "pack_codes", "unpack_codes", "pack_kernel", "pack_rows_into", "unpack_rows_into", "scratch"]


def pack_kernel(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack flat uint8 codes (length a multiple of ``8 // bits``) for bits in (2, 4, 8), first code lowest."""
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



_LITTLE_ENDIAN = sys.byteorder == "little"
_LOCAL = threading.local()


def scratch(slot: int, shape: Tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A contiguous tensor of ``shape`` from this thread's reusable buffer ``slot`` (grown, never shrunk).

    The hook calls the kernels chunk after chunk with the same sizes: after the first chunk nothing
    is allocated. Per thread, so that the communication thread, the training thread and the
    compiler never share one.
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


def pack_rows_into(codes: torch.Tensor, out: torch.Tensor, bits: int) -> None:
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
    t = scratch(1, tuple(v.shape), torch.int16, codes.device)
    torch.bitwise_right_shift(v, 4 if bits == 4 else 6, out=t)
    torch.add(v, t, alpha=-15 if bits == 4 else -63, out=t)
    if bits == 2:
        w = t.view(torch.int32)
        u = scratch(2, tuple(w.shape), torch.int32, codes.device)
        torch.bitwise_right_shift(w, 12, out=u)
        torch.add(w, u, alpha=-4095, out=u)
        t = u
    out.copy_(t)


def unpack_rows_into(packed: torch.Tensor, codes: torch.Tensor, bits: int) -> None:
    """Unpack ``(..., bytes)`` of 2- or 4-bit codes into contiguous uint8 ``codes`` ``(..., bytes * 8 / bits)``.

    The inverse of :func:`pack_rows_into`. 4 bits: every byte ``w = c0 + 16 c1`` widened to int16,
    ``w + 240 (w >> 4) = c0 + 256 c1``. 2 bits: every byte ``w = p0 + 16 p1`` (``p = c + 4 c'``)
    widened to int32, ``w + 65520 (w >> 4) = p0 + 65536 p1``; then per int16 ``x = c0 + 4 c1``:
    ``x + 252 (x >> 2) = c0 + 256 c1``. Read back as bytes, those are the codes in order.
    """
    if not _LITTLE_ENDIAN:  # pragma: no cover - no big-endian machine to test on
        codes.copy_(_split_codes(packed, bits).reshape(codes.shape))
        return
    w = codes.view(torch.int16 if bits == 4 else torch.int32)
    w.copy_(packed)
    t = scratch(1, tuple(w.shape), w.dtype, codes.device)
    torch.bitwise_right_shift(w, 4, out=t)
    w.add_(t, alpha=240 if bits == 4 else 65520)
    if bits == 2:
        x = codes.view(torch.int16)
        t = scratch(1, tuple(x.shape), torch.int16, codes.device)
        torch.bitwise_right_shift(x, 2, out=t)
        x.add_(t, alpha=252)



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
    return pack_kernel(flat, bits)


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

