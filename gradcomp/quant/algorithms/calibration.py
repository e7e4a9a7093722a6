"""Input Hessians ``X^T X`` of Linear layers, summed over calibration batches in one pass."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import torch
import torch.nn as nn

from gradcomp.batches import run_batches

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
    """Run calibration batches through ``model`` and return ``{name: X^T X}`` (fp64) for each Linear.

    ``X`` stacks every input row the layer saw (all tokens, atoms or samples of every batch, every call).
    Batches are run as :func:`gradcomp.batches.run_batches` runs them (eval mode, no
    autograd unless ``forward`` turns it on, e.g. for models whose outputs are gradients).

    Args:
        model: the unquantized model.
        layers: ``{name: nn.Linear}`` whose inputs to record.
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
        def hook(_module, args):
            if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
                return None
            x = args[0].detach().reshape(-1, in_features).double()
            xtx = x.T @ x
            if order is not None and name not in sums:
                order.append(name)
            sums[name] = sums[name] + xtx if name in sums else xtx
            if counts is not None:
                counts[name] = counts.get(name, 0) + x.shape[0]
            return None

        return hook

    for name, m in layers.items():
        if not isinstance(m, nn.Linear):
            raise TypeError(f"layer {name!r}: input Hessians are collected for nn.Linear, got {type(m).__name__}")
        handles.append(m.register_forward_pre_hook(make_hook(name, m.in_features)))
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
