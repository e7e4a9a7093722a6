"""What the weight-quantization algorithms share: per-column grids, the result type, the layer error.

Every algorithm returns a :class:`QuantResult`: codes in the codec's stored form (unsigned, with the
symmetric offset), stored scales and zero points in the layout of :mod:`gradcomp.quant.layout`, so
:meth:`gradcomp.quant.modules.PackedWeight.from_codes` packs them into the very modules and files that
round-to-nearest produces. Only the choice of codes and scales differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from gradcomp.codec import choose_qparams, dequantize_codes, quantize_codes_with_qparams
from gradcomp.quant.configs import WeightQuantConfig
from gradcomp.quant.layout import _dequantize_rows, _Layout, _layout, _store_scale

__all__ = ["QuantResult", "layer_output_error", "input_hessian_of"]


@dataclass
class QuantResult:
    """Codes and scales of one weight in the stored layout.

    Attributes:
        codes: uint8 ``(layout.rows, layout.row_len)`` stored codes.
        scale: ``(layout.rows * layout.groups,)`` scales in the config's ``scale_dtype``.
        zero_point: ``(layout.rows * layout.groups,)`` fp32 integral zero points, or None (symmetric).
        layout: the weight's layout.
        input_scale: None, or the per-input-channel scale ``s`` the codes were made with (they hold
            ``W diag(s)``; see :class:`gradcomp.quant.modules.PackedWeight`).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    layout: _Layout
    input_scale: Optional[torch.Tensor] = None

    def dequantize(self, bits: int) -> torch.Tensor:
        """Return the reconstructed weight (divided by ``input_scale`` when there is one), fp32, shaped ``layout.shape``."""
        out = _dequantize_rows(self.codes, self.scale, self.zero_point, self.layout, bits).reshape(self.layout.shape)
        return out if self.input_scale is None else out / self.input_scale.float()


def column_qparams(cols: torch.Tensor, config: WeightQuantConfig, shrink: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Return stored ``(scale, zero_point)`` per row of ``cols`` (rows, n) from each row's range.

    ``shrink`` (rows,) scales the range down (a clipping ratio in (0, 1]); zeros are always inside the
    range, as the codec widens it to contain 0.
    """
    lo, hi = cols.amin(dim=1), cols.amax(dim=1)
    if shrink is not None:
        lo, hi = lo * shrink, hi * shrink
    scale, zp = choose_qparams(lo, hi, config.bits, config.symmetric)
    return _store_scale(scale, config.scale_dtype), zp


def quantize_columns(w: torch.Tensor, scale: torch.Tensor, zp: Optional[torch.Tensor], bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (rows, n) with one scale per row; return (stored codes uint8, dequantized fp32)."""
    s = scale.reshape(-1)
    z = None if zp is None else zp.reshape(-1)
    codes = quantize_codes_with_qparams(w, s, z, bits)
    return codes, dequantize_codes(codes, s.float(), z, bits)


def matrix_view(weight: torch.Tensor, config: WeightQuantConfig) -> Tuple[torch.Tensor, _Layout]:
    """Return the weight as an fp32 ``(out, in)`` matrix (the input-side columns of a Linear) and its layout."""
    if weight.dim() != 2:
        raise ValueError(f"data-aware weight quantization takes a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    return weight.detach().float().clone(), _layout(weight.shape, config)


def hessian_matrix_view(weight: torch.Tensor, hessian: torch.Tensor, config: WeightQuantConfig) -> Tuple[torch.Tensor, _Layout]:
    """Check a weight, its input Hessian ``X^T X`` and the config; return :func:`matrix_view` of the weight.

    Raises:
        TypeError: ``config`` is not a :class:`WeightQuantConfig`.
        ValueError: the weight is not 2-D, or the Hessian is not ``(in, in)`` for it.
    """
    if not isinstance(config, WeightQuantConfig):
        raise TypeError(f"config must be a WeightQuantConfig, got {type(config).__name__}")
    w, lay = matrix_view(weight, config)
    cols = w.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be ({cols}, {cols}) for a weight of shape {tuple(weight.shape)}, got {tuple(hessian.shape)}")
    return w, lay


def group_bounds(lay: _Layout, cols: int, config: WeightQuantConfig):
    """Return ``[(start, stop)]`` column ranges that share a scale in each output row."""
    if config.granularity == "per_group":
        return [(g * lay.block, min((g + 1) * lay.block, cols)) for g in range(lay.groups)]
    return [(0, cols)]


def stored_qparams(scales: torch.Tensor, zps: Optional[torch.Tensor], lay: _Layout) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Flatten per-(out row, group) qparams to the layout's ``(rows * groups,)`` (per-tensor keeps one)."""
    if lay.rows == 1 and scales.shape[0] != 1:  # per_tensor: every row holds the same one scale
        scales = scales[:1]
        zps = None if zps is None else zps[:1]
    return scales.reshape(-1).contiguous(), None if zps is None else zps.reshape(-1).contiguous()


def input_hessian_of(x: torch.Tensor) -> torch.Tensor:
    """Return ``X^T X`` (fp64) of the inputs ``x`` (..., in) of a Linear layer (sum over every row)."""
    x2 = x.detach().reshape(-1, x.shape[-1]).double()
    return x2.T @ x2


def layer_output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Return the layer-output error ``trace(D H D^T) / trace(W H W^T)`` with ``D = approx - weight``.

    With ``H = X^T X`` over calibration inputs ``X`` this is ``||X D^T||^2 / ||X W^T||^2``: the squared
    error of the layer's output (bias aside) relative to the output's own energy.

    Example: ``W = [[1, 0]]``, ``approx = [[1.1, 0]]``, ``H = I`` -> ``0.01 / 1 = 0.01``.
    """
    h = hessian.double()
    w = weight.detach().reshape(weight.shape[0], -1).double()
    d = approx.detach().reshape(w.shape).double() - w
    num = float(((d @ h) * d).sum())
    den = float(((w @ h) * w).sum())
    return num / den if den > 0 else num
