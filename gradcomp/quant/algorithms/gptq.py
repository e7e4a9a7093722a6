"""GPTQ: quantize a Linear weight column by column, pushing each column's error onto the columns left.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(2022). The layer's output on calibration inputs ``X`` is ``X W^T``; the error to minimise is
``||X (Q - W)^T||^2 = trace((Q - W) H (Q - W)^T)`` with ``H = X^T X``, the input Hessian. Rows are
independent under it, so all rows are processed at once, one column after the other.

Steps:
    1. ``H = X^T X`` (collected by :func:`gradcomp.quant.algorithms.collect_input_hessians`); columns
       whose input was always 0 (``H_jj = 0``) keep their weights, get the mean ``H_jj`` and no cross
       terms, so they are rounded to nearest and no other column's error is pushed onto them.
    2. Optionally (``act_order``) visit columns by decreasing ``H_jj`` (most active input first).
    3. Dampen: ``H += damp * mean(diag H) * I``; take ``U`` = the upper Cholesky factor of ``H^-1``.
    4. For each column ``j`` (in blocks of ``block_size`` columns, the error of a block applied to the
       columns after it in one matrix product): ``q_j = quant(w_j)``, ``e_j = (w_j - q_j) / U_jj``,
       ``w_k -= e_j U_jk`` for every later column ``k``.
    5. Scales: per channel and per tensor from the original weight; per group, from the (already
       error-updated) columns of the group when the scan reaches the group's first column, or, with
       ``act_order``, from the original weight up front ("static groups"), so that every group keeps
       the layout's contiguous columns and the packed format does not change.

Worked example (one row, two inputs, ``H = [[1, 0.9], [0.9, 1]]``, int2 symmetric with a scale of 1): ``w = [0.4,
0.4]`` rounds to ``[0, 0]`` (output error ``0.4^2 * 3.8 = 0.61``); GPTQ rounds ``w_1 = 0.4 -> 0``, moves
``0.4 * 0.9 = 0.36`` onto ``w_2 = 0.76 -> 1`` and ends at ``[0, 1]`` with error ``0.088``, 7x less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradcomp.quant.algorithms.common import (
    QuantResult,
    column_qparams,
    group_bounds,
    hessian_matrix_view,
    quantize_columns,
    stored_qparams,
)
from gradcomp.quant.configs import SCALE_DTYPES, WeightQuantConfig

__all__ = ["GPTQ", "gptq_quantize"]


@dataclass(frozen=True)
class GPTQ:
    """Options of :func:`gptq_quantize`.

    Attributes:
        damp: diagonal damping relative to ``mean(diag H)`` (0.01 as in the paper).
        block_size: columns whose updates are applied lazily together (a speed knob; results do not
            depend on it beyond rounding).
        act_order: visit columns by decreasing input energy (``H_jj``); groups then use static scales.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False

    name = "gptq"

    def __post_init__(self) -> None:
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not 0.0 <= self.damp < 1.0 or math.isnan(self.damp):
            raise ValueError(f"damp must be a number in [0, 1), got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.act_order, bool):
            raise TypeError(f"act_order must be a bool, got {type(self.act_order).__name__}")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor, config: WeightQuantConfig) -> QuantResult:
        """Quantize ``weight`` with these options (see :func:`gptq_quantize`)."""
        return gptq_quantize(weight, hessian, config, damp=self.damp, block_size=self.block_size, act_order=self.act_order)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + lambda I)^-1``, raising the damping until ``H`` factors."""
    n = h.shape[0]
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    lam = damp * mean_diag if mean_diag > 0 else 1.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            up, info2 = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info2) == 0:
                return up
        lam = max(lam * 10.0, 1e-8 * max(mean_diag, 1.0))
    raise ValueError("the input Hessian could not be factored even with strong damping; are the calibration inputs finite?")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: WeightQuantConfig,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantResult:
    """Quantize a 2-D ``(out, in)`` weight with GPTQ against the input Hessian ``H = X^T X`` (in, in).

    Args:
        weight: the Linear weight.
        hessian: ``X^T X`` summed over calibration inputs (any positive multiple works).
        config: the target format (any bits, granularity, symmetry and scale dtype).
        damp, block_size, act_order: see :class:`GPTQ`.

    Returns:
        A :class:`QuantResult` in the layout that :func:`gradcomp.quant.quantize_` stores.
    """
    w, lay = hessian_matrix_view(weight, hessian, config)
    rows, cols = w.shape
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("the input Hessian holds inf or nan; the calibration inputs are not finite")
    h = hessian.to(device=w.device, dtype=torch.float64).clone()
    # Inputs never seen during calibration (H_jj = 0): their weights are rounded to nearest and take
    # no error from other columns (no cross terms in H). GPTQ's reference code zeroes them instead,
    # which breaks every later input that does use them (an element absent from calibration).
    dead = torch.diagonal(h) == 0
    h[dead, dead] = float(torch.diagonal(h)[~dead].mean()) if bool((~dead).any()) else 1.0

    bounds = group_bounds(lay, cols, config)
    per_group = config.granularity == "per_group"
    # column -> group index (in the layout's order)
    group_of = torch.zeros(cols, dtype=torch.long)
    for g, (a, b) in enumerate(bounds):
        group_of[a:b] = g
    n_groups = len(bounds)
    scales = torch.zeros(rows, n_groups, dtype=torch.float32)
    zps = None if config.symmetric else torch.zeros(rows, n_groups, dtype=torch.float32)
    static = (not per_group) or act_order
    if static:
        if config.granularity == "per_tensor":
            s, z = column_qparams(w.reshape(1, -1), config)
            scales[:] = s.float()
            if zps is not None:
                zps[:] = z
        else:
            for g, (a, b) in enumerate(bounds):
                s, z = column_qparams(w[:, a:b], config)
                scales[:, g] = s.float()
                if zps is not None:
                    zps[:, g] = z
    sdt = SCALE_DTYPES[config.scale_dtype]

    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols)
    w = w[:, perm].double()
    h = h[perm][:, perm]
    u = _inverse_cholesky(h, damp)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    done = torch.zeros(n_groups, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = int(group_of[col])
            if not static and not bool(done[g]):
                # dynamic group scales: from the group's columns as updated so far (natural order)
                a, b = bounds[g]
                cur = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, : b - a]
                s, z = column_qparams(cur.float(), config)
                scales[:, g] = s.float()
                if zps is not None:
                    zps[:, g] = z
                done[g] = True
            s = scales[:, g].to(sdt)
            z = None if zps is None else zps[:, g]
            c, q = quantize_columns(w1[:, i : i + 1].float(), s, z, config.bits)
            codes[:, col] = c[:, 0]
            e = (w1[:, i] - q[:, 0].double()) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    s_out, z_out = stored_qparams(scales.to(sdt), zps, lay)
    return QuantResult(codes.reshape(lay.rows, lay.row_len), s_out, z_out, lay)
