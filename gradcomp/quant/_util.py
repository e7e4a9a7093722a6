"""Small tensor helpers shared by the quantization modules (argument checks live in :mod:`gradcomp.checks`)."""

from __future__ import annotations

import math
from typing import Tuple

import torch



def finite_flat(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` flattened as fp32 without its non-finite entries (statistics ignore inf/nan)."""
    flat = x.detach().reshape(-1).float()
    finite = torch.isfinite(flat)
    if bool(finite.all()):
        return flat
    return flat[finite]


def interp(xq: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``fp(xp)`` at ``xq`` (``xp`` non-decreasing), clamped at the ends."""
    n = xp.numel()
    idx = torch.searchsorted(xp, xq, right=True).clamp(1, n - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    dx = x1 - x0
    t = torch.where(dx > 0, (xq - x0) / torch.where(dx > 0, dx, torch.ones_like(dx)), torch.ones_like(dx))
    out = f0 + t.clamp(0.0, 1.0) * (f1 - f0)
    out = torch.where(xq <= xp[0], fp[0].expand_as(out), out)
    return torch.where(xq >= xp[-1], fp[-1].expand_as(out), out)


def channel_minmax(x: torch.Tensor, axis: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` over every axis but ``axis`` (non-finite values ignored)."""
    xf = x.detach().float().movedim(axis, 0).reshape(x.shape[axis], -1)
    finite = torch.isfinite(xf)
    if bool(finite.all()):
        return torch.aminmax(xf, dim=1)
    lo = torch.where(finite, xf, torch.full_like(xf, math.inf)).amin(dim=1)
    hi = torch.where(finite, xf, torch.full_like(xf, -math.inf)).amax(dim=1)
    return lo, hi


def norm_axis(axis: int, ndim: int) -> int:
    """Return ``axis`` as a non-negative index into ``ndim`` dims, or raise ValueError."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dims")
    return axis % ndim
