"""Data-aware methods on convolutions, through the unfolded matrix view, and which layers each method covers.

A Conv2d with weight ``(O, C/g, kh, kw)`` is, per group ``g`` of its output channels, a matrix
product: the input cut into patches (``F.unfold``: one row per output position, ``C/g * kh * kw``
columns in the order ``(channel, kh, kw)``, which is the order of the weight's flattened rows) times
the weight rows of the group, ``(O/g, C/g * kh * kw)``. The packed layout of a Conv2d weight is
exactly those rows (:mod:`gradcomp.quant.layout`), so a method that works on a Linear weight and its
input Hessian works on each group of a Conv2d: ``H_g = X_g^T X_g`` of the group's patches, the
method on the group's rows, and the rows put back together.

Steps (:func:`conv_patches`, :func:`quantize_module_weight`):
    1. Pad the input as the layer does (zeros, or its ``padding_mode``), unfold it with the layer's
       kernel size, dilation and stride: ``(N, C * kh * kw, L)``.
    2. Split the columns by group and stack the rows: ``X_g`` is ``(N * L, C/g * kh * kw)``;
       ``H_g = X_g^T X_g`` is summed over the calibration batches.
    3. Quantize the rows of each group with the method against ``H_g``; concatenate codes, scales
       and zero points in row order (the layout's order).

Worked example: a depthwise 3x3 conv on 8 channels has 8 groups of one output row with 9 columns;
``H_g`` is the 9 x 9 Gram matrix of channel ``g``'s 3x3 patches.

Which method covers which layer (:func:`uncovered_reason`): GPTQ, awq_clip and AutoRound cover
Linear and Conv2d; awq_scale covers Linear only (its per-column input scale would have to divide
the conv input per patch position, which a convolution cannot do); HQQ covers Linear, Embedding and
(data-free) Conv2d; per-tensor scales on a grouped convolution, and a group with more than
``MAX_HESSIAN_COLUMNS`` unfolded columns (its Hessian alone would take ``8 K^2`` bytes) are left to
round-to-nearest. :func:`gradcomp.quant.quantize_` warns with the names of the layers a method does
not cover, and raises with ``strict=True``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcomp.quant.algorithms.common import QuantResult
from gradcomp.quant.configs import CastConfig
from gradcomp.quant.layout import _layout

__all__ = ["MAX_HESSIAN_COLUMNS", "conv_patches", "uncovered_reason", "quantize_module_weight"]

MAX_HESSIAN_COLUMNS = 8192


def _group_columns(m: nn.Conv2d) -> int:
    return (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]


def conv_patches(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Return the unfolded input of a Conv2d per group: ``(groups, N * L, C/g * kh * kw)``.

    Example: ``Conv2d(4, 6, 3, groups=2)`` on ``x`` of shape ``(1, 4, 5, 5)`` gives ``(2, 9, 18)``.
    """
    if m.padding_mode != "zeros":
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        padding = 0
    else:
        padding = m.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same": the padding nn.Conv2d computes for stride 1
            x = F.pad(x, m._reversed_padding_repeated_twice)
            padding = 0
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)   # N, C*kh*kw, L
    n, k, l = cols.shape
    g = m.groups
    return cols.reshape(n, g, k // g, l).permute(1, 0, 3, 2).reshape(g, n * l, k // g)


def uncovered_reason(algorithm: Any, module: nn.Module, config: Any, with_data: bool) -> Optional[str]:
    """Return None if ``algorithm`` quantizes ``module`` itself, else why it falls back to round-to-nearest."""
    if isinstance(config, CastConfig):
        return None   # a cast has no codes to choose
    name = algorithm.name
    if getattr(algorithm, "whole_model", False):
        return None
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Embedding):
        return None if name == "hqq" else "an Embedding has no input Hessian"
    if isinstance(module, nn.Conv2d):
        if name == "awq_scale":
            return "a per-column input scale cannot divide a convolution's input (per channel only)"
        if name == "hqq":
            return None
        if config.granularity == "per_tensor" and module.groups > 1:
            return f"one per-tensor scale across {module.groups} conv groups"
        if with_data and _group_columns(module) > MAX_HESSIAN_COLUMNS:
            k = _group_columns(module)
            return (f"{k} unfolded columns per group (more than MAX_HESSIAN_COLUMNS = {MAX_HESSIAN_COLUMNS}; "
                    f"the Hessian would take {8 * k * k / 2**30:.1f} GiB)")
        return None
    return f"{type(module).__name__} is not supported"


def quantize_module_weight(algorithm: Any, module: nn.Module, hessian: Optional[torch.Tensor], config: Any) -> QuantResult:
    """Quantize a Linear, Embedding or Conv2d weight with ``algorithm`` (Conv2d: per group, on the unfolded view).

    Args:
        algorithm: a configured method (``.quantize(weight_2d, hessian, config)``).
        module: the layer.
        hessian: ``X^T X`` (Linear: ``(in, in)``; Conv2d: ``(groups, K, K)``), or None for data-free methods.
        config: the target format.

    Returns:
        A :class:`QuantResult` in the layout of the module's weight.
    """
    w = module.weight.detach()
    if not isinstance(module, nn.Conv2d):
        return algorithm.quantize(w, hessian, config)
    rows = w.reshape(w.shape[0], -1)
    g = module.groups
    per = w.shape[0] // g
    parts = []
    for i in range(g if hessian is not None else 1):
        sl = slice(i * per, (i + 1) * per) if hessian is not None else slice(None)
        parts.append(algorithm.quantize(rows[sl], None if hessian is None else hessian[i], config))
    lay = _layout(w.shape, config)
    if len(parts) == 1:
        r = parts[0]
        return QuantResult(r.codes, r.scale, r.zero_point, lay, r.input_scale)
    codes = torch.cat([p.codes for p in parts])
    scale = torch.cat([p.scale.reshape(-1) for p in parts])
    zp = None if parts[0].zero_point is None else torch.cat([p.zero_point.reshape(-1) for p in parts])
    return QuantResult(codes, scale, zp, lay)
