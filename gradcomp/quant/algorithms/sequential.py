"""Sequential calibration: quantize Linear and Conv2d layers in execution order, each on already-quantized inputs.

GPTQ's reference implementation quantizes a network block by block and collects the Hessian of block
``k`` with blocks ``< k`` already quantized, so each layer's error compensation also absorbs the error
its inputs carry. :func:`sequential_quantize` does that for any model: the execution order comes from
the first calibration pass, the layers are cut into stages, and each stage costs one calibration pass.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch.nn as nn

from gradcomp.batches import progress_bar
from gradcomp.quant.algorithms.calibration import collect_input_hessians
from gradcomp.quant.packed import PackedWeight
from gradcomp.quant.algorithms.conv import quantize_module_weight

__all__ = ["sequential_quantize"]


def sequential_quantize(model, plan, aware, algorithm, calibration, stages: int, *, forward, num_batches, progress,
                        swap: Callable[[nn.Module, PackedWeight, str], nn.Module],
                        set_submodule: Callable[[nn.Module, str, nn.Module], None]) -> Dict[str, Any]:
    """Quantize the ``aware`` Linear layers stage by stage, each on inputs from the quantized earlier stages.

    The model is modified only while this runs: the quantized layers of earlier stages are swapped in
    for the next calibration pass and the original modules are put back before returning (also on
    error), so :func:`quantize_` swaps everything at once as usual. Returns ``{fqn: PackedWeight}``.
    ``swap(module, packed, fqn)`` builds a quantized layer and ``set_submodule(model, fqn, module)``
    puts a module in place (``quantize_`` passes its own).
    """

    batches = list(calibration)[: num_batches if num_batches is not None else None]
    cfg_of = {fqn: cfg for fqn, _, cfg in plan}
    order: List[str] = []
    first = collect_input_hessians(model, aware, batches, forward=forward, progress=False, order=order)
    n = len(order) if stages < 0 else min(stages, len(order))
    cuts = [round(i * len(order) / n) for i in range(n + 1)]
    groups = [order[cuts[i]:cuts[i + 1]] for i in range(n)]
    done: Dict[str, Any] = {}
    originals: Dict[str, nn.Module] = {}
    try:
        for i, names in enumerate(progress_bar(groups, progress, f"sequential {algorithm.name}", total=n, unit="stage")):
            hs = first if i == 0 else collect_input_hessians(model, {k: aware[k] for k in names}, batches, forward=forward)
            for fqn in names:
                m = aware[fqn]
                try:
                    r = quantize_module_weight(algorithm, m, hs[fqn], cfg_of[fqn])
                    done[fqn] = PackedWeight.from_codes(r.codes, r.scale, r.zero_point, cfg_of[fqn], m.weight.shape, m.weight.dtype,
                                                          r.input_scale)
                except ValueError as exc:
                    raise ValueError(f"layer {fqn!r}: {exc}") from exc
            for fqn in names:
                originals[fqn] = aware[fqn]
                set_submodule(model, fqn, swap(aware[fqn], done[fqn], fqn))
    finally:
        for fqn, m in originals.items():
            set_submodule(model, fqn, m)
    return done
