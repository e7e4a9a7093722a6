"""Input Hessians ``X^T X`` of Linear and Conv2d layers, summed over calibration batches in one pass.

A Conv2d's Hessian is per group of its output channels, over the unfolded input patches
(:func:`gradcomp.quant.algorithms.conv.conv_patches`): ``(groups, K, K)`` with ``K = C/g * kh * kw``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import torch
import torch.nn as nn

from gradcomp.batches import run_batches
from gradcomp.quant.algorithms.conv import conv_patches

__all__ = ["collect_input_hessians"]


def collect_input_hessians(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    num_batches: Optional[int] = None,
    progress: bool = False,
    counts: Optional[Dict[str, int]] = None,
    order: Optional[List[str]] = None,
) -> Dict[str, torch.Tensor]:
    """Run calibration batches through ``model`` and return ``{name: X^T X}`` (fp64) for each Linear and Conv2d.

    ``X`` stacks every input row the layer saw (all tokens, atoms or samples of every batch, every call);
    for a Conv2d the rows are the input patches of every output position, one Hessian per group
    (``(groups, K, K)``; each batch's product is taken in fp32, as the patch matrices are large, and
    summed in fp64).
    Batches are run as :func:`gradcomp.batches.run_batches` runs them (eval mode, no
    autograd unless ``forward`` turns it on, e.g. for models whose outputs are gradients).

    Args:
        model: the unquantized model.
        layers: ``{name: nn.Linear or nn.Conv2d}`` whose inputs to record.
        batches: calibration batches.
        forward: ``forward(model, batch)``; default :func:`gradcomp.batches.call_model`.
        num_batches: stop after this many.
        progress: tqdm progress bar.
        counts: if given, filled with ``{name: rows of X}`` (input rows seen per layer).
        order: if given, filled with the layer names in the order of their first call (execution order).

    Raises:
        ValueError: no batch came, a layer never ran, or an input held inf/nan.
    """
    sums: Dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str, in_features: int):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
                return None
            if isinstance(module, nn.Conv2d):
                x = conv_patches(module, args[0].detach().float())
                xtx = torch.bmm(x.transpose(1, 2), x).double()
                rows = x.shape[1]
            else:
                x = args[0].detach().reshape(-1, in_features).double()
                xtx = x.T @ x
                rows = x.shape[0]
            if order is not None and name not in sums:
                order.append(name)
            sums[name] = sums[name] + xtx if name in sums else xtx
            if counts is not None:
                counts[name] = counts.get(name, 0) + rows
            return None

        return hook

    for name, m in layers.items():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"layer {name!r}: input Hessians are collected for nn.Linear and nn.Conv2d, got {type(m).__name__}")
        handles.append(m.register_forward_pre_hook(make_hook(name, getattr(m, "in_features", 0))))
    try:
        n = run_batches(model, batches, forward=forward, num_batches=num_batches, progress=progress, desc="calibration")
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("calibration got no batch; data-aware quantization needs calibration batches")
    missing = [name for name in layers if name not in sums]
    if missing:
        raise ValueError(f"layers {missing[:5]} never ran on the calibration batches; give batches that reach them or leave them to rtn")
    bad = [name for name, h in sums.items() if not bool(torch.isfinite(h).all())]
    if bad:
        raise ValueError(f"the calibration inputs of {bad[:5]} hold inf or nan")
    return sums
