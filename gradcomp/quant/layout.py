"""The codec on a weight's layout: rows of ``row_len`` values cut into blocks that each get one scale.

A weight is viewed as ``rows`` of ``row_len`` values (``rows = shape[0]``, the output channel of
``nn.Linear`` and ``nn.Conv2d``, the token of ``nn.Embedding``) and cut into blocks:

* ``per_tensor``: one block for the whole tensor;
* ``per_channel``: one block per row (``weight.reshape(out, -1)``);
* ``per_group``: blocks of ``group_size`` consecutive values along the input dimension of each row.
  When ``row_len`` is not a multiple of ``group_size`` the last group of every row is shorter (it is
  zero-padded for the scale computation only; padding is never stored). Conv2d rows are the
  flattened ``in/groups * kh * kw`` values.

Scales come from :func:`gradcomp.codec.choose_qparams` in fp32 and are then stored as
``scale_dtype`` (fp16 by default, like most int4 formats). A stored fp16/bf16 scale is rounded *up*
to the next representable value, so no value is clipped, and the codes are made with that very
stored scale (:func:`gradcomp.codec.quantize_codes_with_qparams`), so dequantization reproduces
exactly what was meant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from gradcomp.codec import choose_qparams, dequantize_codes, quantize_codes_with_qparams
from gradcomp.quant.configs import SCALE_DTYPES, WeightQuantConfig


@dataclass(frozen=True)
class _Layout:
    """How a weight of ``shape`` is cut into blocks: ``rows`` rows of ``row_len``, ``groups`` blocks of ``block`` per row."""

    shape: Tuple[int, ...]
    rows: int
    row_len: int
    block: int
    groups: int

    @property
    def numel(self) -> int:
        return self.rows * self.row_len

    @property
    def padded(self) -> bool:
        return self.groups * self.block != self.row_len


def _layout(shape: Sequence[int], config: WeightQuantConfig) -> _Layout:
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if numel == 0:
        raise ValueError(f"cannot quantize an empty weight of shape {shape}")
    if config.granularity == "per_tensor" or len(shape) < 2:
        rows = 1
    else:
        rows = shape[0]
    row_len = numel // rows
    if config.granularity == "per_group":
        block = config.group_size
        groups = -(-row_len // block)
    else:
        block, groups = row_len, 1
    return _Layout(shape, rows, row_len, block, groups)


def _store_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Cast fp32 scales to the storage dtype, rounding up so that no value gets clipped."""
    dtype = SCALE_DTYPES[scale_dtype]
    if dtype == torch.float32:
        return scale
    stored = scale.to(dtype)
    finite = torch.isfinite(scale)
    if scale.device.type != "meta" and bool((finite & ~torch.isfinite(stored)).any()):
        raise ValueError(
            f"a scale of {float(scale[finite].max()):.4g} overflows scale_dtype={scale_dtype!r}; use scale_dtype='fp32'"
        )
    # Positive finite floats are ordered like their bit patterns, so +1 on the bits is the next
    # representable value; this also lifts a scale that underflowed to 0 to the smallest subnormal.
    low = finite & (stored.float() < scale)
    bumped = (stored.view(torch.int16) + 1).view(dtype)
    return torch.where(low, bumped, stored)


def _quantize_weight(weight: torch.Tensor, config: WeightQuantConfig):
    """Return (codes (rows, groups*block) uint8, stored scale (rows*groups,), zero point or None, layout)."""
    lay = _layout(weight.shape, config)
    w = weight.detach().reshape(lay.rows, lay.row_len)
    if lay.padded:
        # Zeros never change a block's range: absmax ignores them and affine ranges always hold 0.
        w = F.pad(w, (0, lay.groups * lay.block - lay.row_len))
    xb = w.reshape(lay.rows * lay.groups, lay.block)
    scale, zp = choose_qparams(xb.amin(dim=1), xb.amax(dim=1), config.bits, config.symmetric)
    scale = _store_scale(scale, config.scale_dtype)
    codes = quantize_codes_with_qparams(xb, scale, zp, config.bits)
    return codes.view(lay.rows, lay.groups * lay.block), scale, zp, lay


def _dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zp: Optional[torch.Tensor], lay: _Layout, bits: int) -> torch.Tensor:
    """Dequantize codes ``(r, row_len)`` (or already padded) of ``r`` rows to fp32 ``(r, row_len)``."""
    r = codes.shape[0]
    full = lay.groups * lay.block
    if codes.shape[1] != full:
        codes = F.pad(codes, (0, full - codes.shape[1]))
    out = dequantize_codes(codes.reshape(r * lay.groups, lay.block), scale.reshape(-1).float(),
                           None if zp is None else zp.reshape(-1), bits)
    out = out.view(r, full)
    return out[:, : lay.row_len] if full != lay.row_len else out
