"""Activation-aware clipping: per group, the range that minimises the layer's output error on real inputs.

Round-to-nearest takes each group's scale from its min and max, so one large weight stretches the grid
for all the others. Shrinking the range (clipping that weight) makes the grid finer for the rest; the
best amount depends on which inputs are large, which only calibration data shows. This is the range
search of AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization", 2023, its ``auto_clip``
step), scored with the input Hessian instead of stored activations. AWQ's other step, scaling input
channels by activation magnitude, needs the inverse scale folded into the previous operation, which a
format-preserving drop-in module cannot hold, so it is not done here.

Steps:
    1. ``H = X^T X`` over calibration inputs, plus 1% of its mean diagonal on the diagonal (inputs
       absent from calibration still count); take its diagonal blocks ``H_g`` (one per group of
       columns; the whole matrix for per-channel and per-tensor scales).
    2. For each ratio ``r`` in ``linspace(1, min_ratio, grid)``: quantize every group with the range
       ``[r * min, r * max]`` and score it by ``e H_g e^T`` with ``e`` the group's error (the output
       error of that group's inputs, cross-group terms left out, as in AWQ).
    3. Keep, per (row, group), the ratio with the smallest score (``r = 1``, round-to-nearest, is a
       candidate, so no group gets worse on its own score).

Example: a group ``[1.0, 0.1, 0.12, -0.09]`` at int2 symmetric has the grid ``{-1, 0, 1}`` and rounds
the three small weights to 0; if their inputs are much larger than the first one's, a ratio near 0.12
keeps them and clips the 1.0 instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradcomp.quant.algorithms.common import QuantResult, column_qparams, hessian_matrix_view, quantize_columns, stored_qparams
from gradcomp.quant.configs import WeightQuantConfig

__all__ = ["ActivationAwareClip", "clip_search_quantize", "clip_search_ratios"]


@dataclass(frozen=True)
class ActivationAwareClip:
    """Options of :func:`clip_search_quantize`.

    Attributes:
        grid: ratios tried, evenly spaced from 1 down to ``min_ratio``.
        min_ratio: the strongest clipping tried, in (0, 1].
    """

    grid: int = 20
    min_ratio: float = 0.5

    name = "awq_clip"

    def __post_init__(self) -> None:
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"grid must be a positive int, got {self.grid!r}")
        if not isinstance(self.min_ratio, (int, float)) or isinstance(self.min_ratio, bool) or not 0.0 < self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in (0, 1], got {self.min_ratio!r}")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor, config: WeightQuantConfig) -> QuantResult:
        """Quantize ``weight`` with these options (see :func:`clip_search_quantize`)."""
        return clip_search_quantize(weight, hessian, config, grid=self.grid, min_ratio=self.min_ratio)


def _search(weight: torch.Tensor, hessian: torch.Tensor, config: WeightQuantConfig, grid: int, min_ratio: float):
    """Run the search; return (blocks (n_rows * groups, block), best ratio per block, layout, n_rows, n_groups, block)."""
    w, lay = hessian_matrix_view(weight, hessian, config)
    rows, cols = w.shape
    h = hessian.to(device=w.device, dtype=torch.float32).clone()
    # inputs never seen in calibration still count as weights (as round-to-nearest weighs them): a
    # floor on the diagonal keeps the search from clipping them for free
    diag = torch.diagonal(h)
    floor = 0.01 * float(diag.mean()) if bool((diag > 0).any()) else 1.0
    h += floor * torch.eye(cols, dtype=h.dtype, device=h.device)
    if config.granularity == "per_tensor":
        blocks = w.reshape(1, rows * cols)  # one block, scored with the full H on every row
        n_rows, n_groups, block = 1, 1, rows * cols
    else:
        block = lay.block
        n_groups = lay.groups
        pad = n_groups * block - cols
        blocks = F.pad(w, (0, pad)).reshape(rows * n_groups, block)
        n_rows = rows
        hp = F.pad(h, (0, pad, 0, pad))
        hb = torch.stack([hp[g * block:(g + 1) * block, g * block:(g + 1) * block] for g in range(n_groups)])  # (G, B, B)
    best_err = torch.full((blocks.shape[0],), float("inf"))
    best_ratio = torch.ones(blocks.shape[0])
    for r in torch.linspace(1.0, float(min_ratio), grid).tolist():
        ratio = torch.full((blocks.shape[0],), r)
        s, z = column_qparams(blocks, config, ratio)
        _, q = quantize_columns(blocks, s, z, config.bits)
        e = q - blocks
        if config.granularity == "per_tensor":
            e2 = e.reshape(rows, cols)
            err = ((e2 @ h) * e2).sum().reshape(1)
        else:
            e3 = e.reshape(n_rows, n_groups, block)
            err = torch.einsum("rgb,gbc,rgc->rg", e3, hb, e3).reshape(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, ratio, best_ratio)
    return blocks, best_ratio, lay, n_rows, n_groups, block


def clip_search_ratios(
    weight: torch.Tensor, hessian: torch.Tensor, config: WeightQuantConfig, *, grid: int = 20, min_ratio: float = 0.5
) -> torch.Tensor:
    """Return the clipping ratio the search picks for every block of the weight's layout, ``(rows * groups,)``.

    The range of block ``i`` is ``[ratio[i] * min, ratio[i] * max]`` (one block for per-tensor scales);
    :class:`gradcomp.quant.algorithms.AutoRound` starts from these ranges with ``init="awq_clip"``.
    """
    return _search(weight, hessian, config, grid, min_ratio)[1]


def clip_search_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, config: WeightQuantConfig, *, grid: int = 20, min_ratio: float = 0.5
) -> QuantResult:
    """Quantize a 2-D ``(out, in)`` weight with the per-group range that minimises the output error.

    Args:
        weight: the Linear weight.
        hessian: ``X^T X`` (in, in) over calibration inputs.
        config: the target format.
        grid, min_ratio: see :class:`ActivationAwareClip`.

    Returns:
        A :class:`QuantResult` in the stored layout.
    """
    blocks, best_ratio, lay, n_rows, n_groups, block = _search(weight, hessian, config, grid, min_ratio)
    rows, cols = weight.shape
    s, z = column_qparams(blocks, config, best_ratio)
    codes, _ = quantize_columns(blocks, s, z, config.bits)
    if config.granularity != "per_tensor":
        codes = codes.reshape(rows, n_groups * block)[:, :cols]
    s_out, z_out = stored_qparams(s.reshape(n_rows, -1), None if z is None else z.reshape(n_rows, -1), lay)
    return QuantResult(codes.reshape(lay.rows, lay.row_len).contiguous(), s_out, z_out, lay)
