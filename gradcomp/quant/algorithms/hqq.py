"""HQQ: half-quadratic fitting of each group's scale and zero point, no calibration data needed.

Badri and Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023). Round-to-nearest
takes a group's grid from its min and max; HQQ instead fits the grid to the weights with a sparsity-
promoting ``l_p`` loss (``p < 1``): a few outliers are left to an explicit error term ``W_e`` and the
grid fits the bulk of the weights. The split into a quadratic part and a shrinkage part (half-quadratic
splitting) gives closed-form steps, run for every group at once.

The stored format is the one round-to-nearest writes (one scale per group, and an integral zero point
per group when asymmetric), so only the values of the scales and zero points change. The paper fits a
float zero point with the scale fixed; here both are fitted (a weighted least-squares line through the
codes), because the format holds integral zero points and a symmetric grid has none.

Steps (``s``, ``z`` per group; errors measured in units of the group's step ``s`` so that ``beta`` does
not depend on the weights' magnitude):
    1. Start from round-to-nearest: ``s, z`` from the group's min and max.
    2. Repeat ``iters`` times: codes ``q = clamp(round(w / s + z))``; error ``e = (w - s (q - z)) / s``;
       outlier part ``W_e = s * shrink_p(e, beta)`` with ``shrink_p(x) = sign(x) max(|x| - |x|^(p-1) / beta, 0)``;
       new ``s, z`` = weighted least squares of ``w - W_e`` on ``q`` (symmetric: through the origin);
       ``beta *= kappa``.
    3. Round ``z`` to an integer in the code range, refit ``s`` with ``z`` fixed, store ``s`` in
       ``scale_dtype`` and make the codes with that stored scale.
    4. Per group, keep the fit or round-to-nearest, whichever has the smaller weighted squared error
       (so no group gets worse by the measure the format is judged on).

Column weights: 1 without data; with an input Hessian ``H`` (calibration data), ``H_jj`` plus 1% of
its mean, so weights on large inputs are fitted more closely (inputs never seen still count).

Worked example (int2 symmetric: codes -1, 0, 1): the group ``[1.0, 0.6, 0.55, -0.5]`` gets the step
``s = 1`` from its absmax and rounds to ``[1, 1, 1, 0]`` (``-0.5`` ties to 0), squared error ``0.61``;
the least-squares step for the codes ``[1, 1, 1, -1]`` is ``s = 0.6625``, error ``0.16``, 4x less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from gradcomp.codec import choose_qparams, qrange, quantize_codes_with_qparams, dequantize_codes
from gradcomp.quant.algorithms.common import QuantResult, matrix_view, stored_qparams
from gradcomp.quant.configs import WeightQuantConfig
from gradcomp.quant.layout import _store_scale

__all__ = ["HQQ", "hqq_quantize"]


@dataclass(frozen=True)
class HQQ:
    """Options of :func:`hqq_quantize`.

    Attributes:
        iters: half-quadratic iterations.
        p: the ``l_p`` norm of the error (``p < 1`` promotes sparse outliers; ``p = 2`` turns the
            shrinkage off and the fit is plain alternating least squares).
        beta, kappa: the shrinkage's penalty and its growth per iteration.
        use_data: weigh columns by the input Hessian's diagonal when calibration data is given.
    """

    iters: int = 20
    p: float = 0.7
    beta: float = 1.0
    kappa: float = 1.05
    use_data: bool = True

    name = "hqq"
    needs_data = False

    def __post_init__(self) -> None:
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"iters must be a non-negative int, got {self.iters!r}")
        for key, lo in (("p", 0.0), ("beta", 0.0), ("kappa", 1.0)):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v) or v <= lo and not (key == "kappa" and v == lo):
                raise ValueError(f"{key} must be a number {'>=' if key == 'kappa' else '>'} {lo}, got {v!r}")
        if not isinstance(self.use_data, bool):
            raise TypeError(f"use_data must be a bool, got {type(self.use_data).__name__}")

    def quantize(self, weight: torch.Tensor, hessian: Optional[torch.Tensor], config: WeightQuantConfig) -> QuantResult:
        """Quantize ``weight`` with these options (see :func:`hqq_quantize`)."""
        return hqq_quantize(weight, config, hessian=hessian if self.use_data else None, iters=self.iters, p=self.p,
                            beta=self.beta, kappa=self.kappa)


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft threshold of the ``l_p`` proximal step: ``sign(x) max(|x| - |x|^(p-1) / beta, 0)``."""
    if p >= 2.0:
        return torch.zeros_like(x)
    a = x.abs()
    return torch.sign(x) * F.relu(a - a.clamp_min(1e-12).pow(p - 1.0) / beta)


def _fit(t: torch.Tensor, q: torch.Tensor, d: torch.Tensor, z_fixed: Optional[torch.Tensor], s_old: torch.Tensor):
    """Weighted least squares ``t ~ s (q - z)`` per row: free ``z`` when ``z_fixed`` is None; return (s, z)."""
    sw = d.sum(1).clamp_min(1e-30)
    if z_fixed is None:
        mq = (d * q).sum(1) / sw
        mt = (d * t).sum(1) / sw
        var = (d * (q - mq[:, None]) ** 2).sum(1)
        cov = (d * (q - mq[:, None]) * (t - mt[:, None])).sum(1)
        ok = (var > 1e-12) & (cov > 0)
        s = torch.where(ok, cov / var.clamp_min(1e-12), s_old)
        z = torch.where(ok, mq - mt / s.clamp_min(1e-30), torch.zeros_like(s))
        return s, z
    c = q - z_fixed[:, None]
    den = (d * c * c).sum(1)
    num = (d * c * t).sum(1)
    ok = (den > 1e-12) & (num > 0)
    return torch.where(ok, num / den.clamp_min(1e-12), s_old), z_fixed


def hqq_quantize(
    weight: torch.Tensor,
    config: WeightQuantConfig,
    *,
    hessian: Optional[torch.Tensor] = None,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 1.0,
    kappa: float = 1.05,
) -> QuantResult:
    """Quantize a 2-D ``(out, in)`` weight with half-quadratic fitted scales and zero points.

    Args:
        weight: the Linear weight.
        config: the target format (any bits, granularity, symmetry, scale dtype).
        hessian: optional ``X^T X`` (in, in); its diagonal weighs the columns.
        iters, p, beta, kappa: see :class:`HQQ`.

    Returns:
        A :class:`QuantResult` in the layout that :func:`gradcomp.quant.quantize_` stores.
    """
    if not isinstance(config, WeightQuantConfig):
        raise TypeError(f"config must be a WeightQuantConfig, got {type(config).__name__}")
    w, lay = matrix_view(weight, config)
    rows, cols = w.shape
    if hessian is not None:
        if hessian.shape != (cols, cols):
            raise ValueError(f"hessian must be ({cols}, {cols}) for a weight of shape {tuple(weight.shape)}, got {tuple(hessian.shape)}")
        diag = torch.diagonal(hessian).double().clamp_min(0)
        if not bool(torch.isfinite(diag).all()):
            raise ValueError("the input Hessian holds inf or nan; the calibration inputs are not finite")
        mean = float(diag.mean())
        colw = (diag + 0.01 * mean if mean > 0 else torch.ones_like(diag)).float()
        colw = colw / colw.mean()
    else:
        colw = torch.ones(cols)
    if config.granularity == "per_tensor":
        blocks, d = w.reshape(1, -1), colw.expand(rows, cols).reshape(1, -1)
        n_rows = 1
    else:
        pad = lay.groups * lay.block - cols
        blocks = F.pad(w, (0, pad)).reshape(rows * lay.groups, lay.block)
        # padding is not a weight: zero column weight keeps it out of every fit
        d = F.pad(colw.expand(rows, cols), (0, pad)).reshape(rows * lay.groups, lay.block)
        n_rows = rows
    qmin, qmax, off = qrange(config.bits, config.symmetric)
    lo, hi = (qmin + off, qmax + off)   # stored code range
    s0, z0 = choose_qparams(blocks.amin(1), blocks.amax(1), config.bits, config.symmetric)
    live = s0 > 0
    s = torch.where(live, s0, torch.ones_like(s0))
    z = torch.full_like(s, float(off)) if z0 is None else z0.float()
    b = float(beta)
    for _ in range(iters):
        q = torch.clamp(torch.round(blocks / s[:, None] + z[:, None]), lo, hi)
        e = (blocks - s[:, None] * (q - z[:, None])) / s[:, None]
        we = s[:, None] * _shrink(e, b, p)
        s, z_new = _fit(blocks - we, q, d, None if z0 is not None else z, s)
        z = z_new
        b *= kappa
    if z0 is not None:
        z = torch.clamp(torch.round(z), lo, hi)
        q = torch.clamp(torch.round(blocks / s[:, None] + z[:, None]), lo, hi)
        s, _ = _fit(blocks, q, d, z, s)
    s = torch.where(live, s, s0)
    s_st = _store_scale(s.float(), config.scale_dtype)
    zz = None if z0 is None else z
    codes = quantize_codes_with_qparams(blocks, s_st, zz, config.bits)
    err = (d * (dequantize_codes(codes, s_st.float(), zz, config.bits) - blocks) ** 2).sum(1)
    # round-to-nearest, as the format stores it, is the fallback per group
    r_s = _store_scale(s0, config.scale_dtype)
    r_codes = quantize_codes_with_qparams(blocks, r_s, z0, config.bits)
    r_err = (d * (dequantize_codes(r_codes, r_s.float(), z0, config.bits) - blocks) ** 2).sum(1)
    keep = err < r_err
    codes = torch.where(keep[:, None], codes, r_codes)
    s_out = torch.where(keep, s_st, r_s)
    z_out = None if z0 is None else torch.where(keep, zz, z0)
    if config.granularity != "per_tensor":
        codes = codes.reshape(rows, lay.groups * lay.block)[:, :cols]
    s_out, z_out = stored_qparams(s_out.reshape(n_rows, -1), None if z_out is None else z_out.reshape(n_rows, -1), lay)
    return QuantResult(codes.reshape(lay.rows, lay.row_len).contiguous(), s_out, z_out, lay)
