"""Per-layer quantization sensitivity: quantize one layer at a time and measure the damage.

Different layers tolerate quantization very differently: an embedding or the last projection often
loses far more accuracy at 4 bits than a wide MLP layer in the middle of the network. This module
measures that, one trial per (layer, candidate format):

1. Run the calibration batches through the unmodified model once and keep the reference outputs
   (and losses, when the model output carries one).
2. For every candidate layer and every candidate format (``WeightQuantConfig`` at some bits and
   granularity, or a ``CastConfig`` to fp16/bf16):

   a. save the layer's weight, overwrite it in place with ``fake_quantize_weight(weight, config)``
      (optionally also fake-quantize the layer's input activations),
   b. run the calibration batches and score the damage against the reference,
   c. copy the saved weight back bit for bit (in a ``finally``, so an exception cannot leave a
      quantized layer behind).

Scores (each averaged over the calibration batches):

* ``mse``: mean squared error of the model output against the reference output (with several
  outputs, the mean of their MSEs).
* ``rel_mse``: the MSE of each output divided by the mean square of its reference, averaged over
  the outputs: every head counts alike whatever its units, so none is starved (the default for
  regression outputs).
* ``kl``: ``KL(p_ref || p_q)`` of the softmax over the output's last dimension, in nats per position
  (the default for classification outputs; meaningless for regression outputs).
* ``loss``: increase of the loss (only when a loss is available: a model output that carries one, or a
  ``loss_fn``; see :mod:`gradcomp.batches`).
* ``fisher``: the Fisher / Taylor score of the layer's own output,
  ``sum((dL/dy * (y_q - y))**2)`` where ``y`` is the layer output, ``y_q`` its output with the
  quantized weight, and ``dL/dy`` the loss gradient at the unmodified model (the score NVIDIA
  ModelOpt's ``auto_quantize`` uses). Needs a loss.
* ``hawq`` (optional, ``hessian=True``): HAWQ-v2's ``Tr(H) / n * ||Q(W) - W||**2`` with the trace of
  the loss Hessian with respect to the layer weight estimated by Hutchinson's method,
  ``Tr(H) ~ mean_v v^T H v`` over Rademacher vectors ``v``.
* ``weight_mse``: mean squared error of the weight itself (free; a data-independent reference).

Worked example of the Fisher score: a layer output ``y = [1.0, -2.0]`` with gradient
``g = [0.5, 0.1]`` becomes ``y_q = [1.1, -2.0]`` at 4 bits; the score is ``(0.5 * 0.1)**2 + 0 = 0.0025``.

Outputs of any structure are scored (:func:`output_tensors`): the main tensor of the output when it
has one (a tensor, the first of a tuple, ``logits``; :mod:`gradcomp.batches`), else every floating
tensor of a dict, dataclass or named tuple (``{"energy": e, "forces": f}``). The kind of output
decides the default metric (``kl`` for classification, ``rel_mse`` for regression): one output of at
least 2 dims with at least 2 entries in its last is taken for logits; several outputs or a scalar /
single-column output are regression; ``SensitivityConfig.output_kind`` overrides it. The choice and its
reason are stated in the report's metadata and logged.

Adapter protocol (no wrapper module needed): ``forward(model, batch)`` runs the model on a batch of
any structure (graphs, dicts, dataclasses) and returns its outputs in any structure above; it may
turn autograd on inside (``with torch.enable_grad():``) for outputs that are gradients, such as
forces. ``loss_fn(model, batch)`` is only called when ``loss``, ``fisher`` or the Hessian score is
asked for.

Layers whose weight is shared (GPT's tied token embedding and output head) are one layer with
aliases: quantizing it changes both uses, and its weight is counted once.

Example::

    >>> from gradcomp.analysis.sensitivity import measure_sensitivity, SensitivityConfig
    >>> report = measure_sensitivity(model, batches, SensitivityConfig(bits=(4, 8)))
    >>> report.to_json("scores.json")                     # reusable: planning needs no model run
    >>> report.rows("kl")[:3]                             # the three most sensitive trials
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcomp.analysis.sensitivity_report import (
    DEFAULT_METRICS,
    METRICS,
    OUTPUT_KINDS,
    Candidate,
    LayerInfo,
    SensitivityConfig,
    SensitivityEntry,
    SensitivityReport,
    candidate_bits_per_param,
    candidate_from_dict,
    candidate_key,
    candidate_to_dict,
)
from gradcomp.batches import Batch, call_model, default_loss, output_loss, output_tensors, progress_bar
from gradcomp.quant import ActivationQuantizer, CastConfig, WeightQuantConfig, fake_quantize_weight, quantizable_layers

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "OUTPUT_KINDS",
    "output_tensors",
    "SensitivityConfig",
    "LayerInfo",
    "SensitivityEntry",
    "SensitivityReport",
    "Candidate",
    "candidate_key",
    "candidate_to_dict",
    "candidate_from_dict",
    "candidate_bits_per_param",
    "find_layers",
    "quantized_layer",
    "measure_sensitivity",
    "hutchinson_trace",
    "default_loss",
]

# --------------------------------------------------------------------------------------------
# layers and trials


def find_layers(
    model: nn.Module, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None
) -> List[LayerInfo]:
    """List the model's quantizable weights, one entry per distinct weight tensor.

    A layer is what ``weights.quantize_`` can quantize (``nn.Linear``, ``nn.Embedding``,
    ``nn.Conv2d``) with a floating weight.
    Modules that share one weight tensor (tied embeddings) become one layer whose ``aliases`` are
    the later modules.

    Args:
        model: the model.
        filter_fn: optional ``filter_fn(module, fqn) -> bool`` keeping only some modules.

    Returns:
        Layers in ``named_modules`` order.
    """
    by_weight: Dict[int, Tuple[str, List[str], nn.Module]] = {}
    order: List[int] = []
    for fqn, mod in quantizable_layers(model):
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            continue
        if filter_fn is not None and not filter_fn(mod, fqn):
            continue
        key = id(w)
        if key in by_weight:
            if fqn not in by_weight[key][1] and fqn != by_weight[key][0]:
                by_weight[key][1].append(fqn)
            continue
        by_weight[key] = (fqn, [], mod)
        order.append(key)
    layers = []
    for key in order:
        fqn, aliases, mod = by_weight[key]
        w = mod.weight
        layers.append(
            LayerInfo(fqn, tuple(aliases), type(mod).__name__, tuple(w.shape), w.numel(), torch.finfo(w.dtype).bits)
        )
    return layers


class quantized_layer:
    """Context manager: a layer's weight quantized in place, restored bit for bit on exit.

    The weight tensor keeps its identity (the same ``Parameter`` object and storage);
    only its values change, and a saved copy is written back in ``__exit__`` whatever happened inside.

    Example::

        >>> with quantized_layer(model.fc, WeightQuantConfig(bits=4)):
        ...     out = model(x)                 # fc runs with int4 weights
        >>> # model.fc.weight is exactly what it was
    """

    def __init__(self, module: nn.Module, config: Candidate):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"module must have a weight tensor, got {type(module).__name__}")
        if not isinstance(config, (WeightQuantConfig, CastConfig)):
            raise TypeError(f"config must be a WeightQuantConfig or a CastConfig, got {type(config).__name__}")
        self.weight = weight
        self.config = config
        self._saved: Optional[torch.Tensor] = None

    def __enter__(self) -> torch.Tensor:
        with torch.no_grad():
            saved = self.weight.detach().clone()
            q = fake_quantize_weight(saved, self.config)
            self._saved = saved
            self.weight.copy_(q)
        return self._saved

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            self.weight.copy_(self._saved)
        self._saved = None


# --------------------------------------------------------------------------------------------
# forward / loss conventions


def _output_and_loss(model: nn.Module, batch: Batch, forward, loss_fn, need_loss: bool) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Run one batch (the convention of :mod:`gradcomp.batches`); return the outputs and, if asked, the loss.

    Without ``loss_fn`` the loss is the one the model's output carries (None if it carries none),
    so the outputs and the loss come from one forward pass; ``loss_fn`` is only called when asked.
    """
    raw = (forward or call_model)(model, batch)
    out = output_tensors(raw)
    if not need_loss:
        return out, None
    return out, (output_loss(raw) if loss_fn is None else loss_fn(model, batch))


def _loss(model: nn.Module, batch: Batch, forward, loss_fn) -> Optional[torch.Tensor]:
    if loss_fn is not None:
        return loss_fn(model, batch)
    return output_loss((forward or call_model)(model, batch))


def _log_softmax(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(1) if t.dim() == 0 else t
    return F.log_softmax(t.float().reshape(-1, t.shape[-1]), dim=-1)


def _kl(ref_logp: torch.Tensor, out: torch.Tensor) -> float:
    logq = _log_softmax(out)
    p = ref_logp.exp()
    return float((p * (ref_logp - logq)).sum(dim=-1).mean())


def _output_kind(requested: str, outs: Mapping[str, torch.Tensor]) -> Tuple[str, str]:
    """Return ``(kind, reason)``: whether the outputs are classification logits or regression values."""
    if requested != "auto":
        return requested, "set by output_kind"
    if len(outs) > 1:
        return "regression", f"the model gives {len(outs)} outputs ({', '.join(list(outs)[:6])})"
    (t,) = outs.values()
    if t.dim() >= 2 and t.shape[-1] >= 2:
        return "classification", f"one output of shape {tuple(t.shape)}, taken for logits over its last dim"
    return "regression", f"one output of shape {tuple(t.shape)}"


def _output_scores(outs: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], ref_logp: Mapping[str, torch.Tensor],
                   ref_power: Mapping[str, float], wanted) -> Dict[str, float]:
    """Score one batch's outputs against the reference: mse, rel_mse and kl, each averaged over the outputs."""
    if set(outs) != set(ref):
        raise RuntimeError(f"the model gave outputs {sorted(outs)} in a trial but {sorted(ref)} in the reference pass")
    scores: Dict[str, float] = {}
    wanted = set(wanted)
    if wanted & {"mse", "rel_mse"}:
        mses = {k: float(torch.mean((outs[k].double() - ref[k].double()) ** 2)) for k in ref}
        if "mse" in wanted:
            scores["mse"] = sum(mses.values()) / len(mses)
        if "rel_mse" in wanted:
            # an all-zero reference output: its plain MSE (nothing to normalise by)
            scores["rel_mse"] = sum(m / ref_power[k] if ref_power[k] > 0 else m for k, m in mses.items()) / len(mses)
    if "kl" in wanted:
        scores["kl"] = sum(_kl(ref_logp[k], outs[k]) for k in ref_logp) / len(ref_logp)
    return scores


# --------------------------------------------------------------------------------------------
# Hessian trace


def hutchinson_trace(
    model: nn.Module,
    batches: Sequence[Batch],
    weights: Sequence[torch.Tensor],
    *,
    samples: int = 4,
    seed: int = 0,
    forward: Optional[Callable[[nn.Module, Batch], Any]] = None,
    loss_fn: Optional[Callable[[nn.Module, Batch], torch.Tensor]] = None,
) -> List[float]:
    """Estimate ``Tr(d2L/dW2)`` for several weight tensors at once with Hutchinson's method.

    Steps (HAWQ-v2): for each batch, ``g = dL/dW`` with a graph; for each of ``samples`` Rademacher
    vectors ``v`` (entries +-1), ``Hv = d(g . v)/dW`` by a second backward; ``v . Hv`` is an unbiased
    estimate of the trace. The estimates are averaged over samples and batches.

    Example: for ``L = 0.5 * 3 * w**2`` summed over 4 weights, ``H = 3 I`` and every ``v^T H v = 12``
    exactly, so the estimate is 12 with any number of samples.

    Args:
        model: the model (not modified; parameter ``.grad`` fields are not touched).
        batches: calibration batches whose model output carries a loss (or give ``loss_fn``).
        weights: the weight tensors (parameters of ``model``).
        samples: Rademacher vectors per batch.
        seed: seed of the vectors.
        forward, loss_fn: as in :func:`measure_sensitivity`.

    Returns:
        One trace estimate per weight tensor.
    """
    gen = torch.Generator().manual_seed(seed)
    weights = list(weights)
    totals = torch.zeros(len(weights), dtype=torch.float64)
    flags = [w.requires_grad for w in weights]
    count = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        # The math attention kernel supports double backward; fused kernels may not.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            for batch in batches:
                loss = _loss(model, batch, forward, loss_fn)
                if loss is None:
                    raise ValueError("the Hessian trace needs a loss: a model output that carries one, or a loss_fn(model, batch)")
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                for _ in range(samples):
                    vs = [torch.randint(0, 2, w.shape, generator=gen).to(w.dtype).mul_(2).sub_(1) for w in weights]
                    hv = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True)
                    totals += torch.stack([(h.double() * v.double()).sum() for h, v in zip(hv, vs)])
                    count += 1
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
    return (totals / max(count, 1)).tolist()


# --------------------------------------------------------------------------------------------
# the measurement


def _modules_by_name(model: nn.Module) -> Dict[str, nn.Module]:
    return dict(model.named_modules(remove_duplicate=False))


def _input_quant_hook(config: Any):
    quantizer = ActivationQuantizer(config)

    def hook(module, args):
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None  # embedding indices and the like stay as they are
        return (quantizer(args[0]),) + tuple(args[1:])

    return hook


def _other_bytes(model: nn.Module, layers: Sequence[LayerInfo], modules: Mapping[str, nn.Module]) -> int:
    skip = {id(modules[l.name].weight) for l in layers}
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in skip or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def measure_sensitivity(
    model: nn.Module,
    batches: Sequence[Batch],
    config: Optional[SensitivityConfig] = None,
    *,
    layers: Optional[Union[Sequence[str], Callable[[nn.Module, str], bool]]] = None,
    forward: Optional[Callable[[nn.Module, Batch], Any]] = None,
    loss_fn: Optional[Callable[[nn.Module, Batch], torch.Tensor]] = None,
    progress: bool = False,
    trial_callback: Optional[Callable[[str, str], None]] = None,
) -> SensitivityReport:
    """Quantize each candidate layer alone with each candidate format and score the damage.

    Steps:
        1. Reference pass: outputs (and their log-softmax for KL) and losses of the unmodified model.
        2. Optional Hutchinson trace of every layer's weight Hessian (``config.hessian``).
        3. For each layer: if Fisher is asked for, one forward/backward per batch keeps the layer's
           own outputs ``y`` and loss gradients ``dL/dy``; then for each candidate, the weight is
           quantized in place (:class:`quantized_layer`), the batches run again, the scores are
           computed, and the weight is copied back bit for bit.

    The model runs in eval mode and under ``no_grad`` except for the gradient passes; its
    train/eval mode, weights, ``requires_grad`` flags and ``.grad`` fields are as before afterwards.

    Args:
        model: the model to analyse (fp32/fp16/bf16 weights).
        batches: calibration batches, called as :mod:`gradcomp.batches` says (``(inputs, targets)`` tuples for a model that returns ``(logits, loss)``).
        config: candidates and metrics (default :class:`SensitivityConfig`).
        layers: layer names to analyse (module FQNs, aliases allowed) or a ``filter_fn(module, fqn)``;
            default every Linear/Embedding/Conv2d weight.
        forward: ``forward(model, batch) -> output``; default :func:`gradcomp.batches.call_model`.
            The output's main tensor is compared (:func:`gradcomp.batches.output_tensor`).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: the loss the output carries
            (:func:`gradcomp.batches.output_loss`), taken from the same forward pass; without one the
            ``loss``, ``fisher`` and Hessian scores are skipped.
        progress: show a tqdm progress bar over layers (on stderr).
        trial_callback: called as ``trial_callback(layer, candidate_key)`` after every trial,
            once the weight is restored (used by tests to check the restoration).

    Returns:
        A :class:`SensitivityReport`.
    """
    config = config or SensitivityConfig()
    if not isinstance(config, SensitivityConfig):
        raise TypeError(f"config must be a SensitivityConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one calibration batch, got none")

    modules = _modules_by_name(model)
    if layers is None or callable(layers):
        infos = find_layers(model, layers)
    else:
        all_infos = find_layers(model)
        wanted = list(layers)
        known = {n for l in all_infos for n in (l.name, *l.aliases)}
        missing = [n for n in wanted if n not in known]
        if missing:
            raise ValueError(f"layers {missing} are not quantizable layers of the model; choose from {sorted(known)}")
        infos = [l for l in all_infos if l.name in wanted or set(l.aliases) & set(wanted)]
    if not infos:
        raise ValueError("the model has no quantizable layer (Linear, Embedding, Conv2d) to analyse")

    was_training = model.training
    model.eval()
    try:
        return _measure(model, batches, config, infos, modules, forward, loss_fn, progress, trial_callback)
    finally:
        model.train(was_training)


def _measure(model, batches, config, infos, modules, forward, loss_fn, progress, trial_callback) -> SensitivityReport:
    explicit = config.metrics is not None
    metrics = set(config.metrics if explicit else DEFAULT_METRICS)
    need_loss = bool(metrics & {"loss", "fisher"}) or config.hessian
    # 1. reference pass
    ref_out: List[Dict[str, torch.Tensor]] = []
    ref_loss: List[Optional[float]] = []
    with torch.no_grad():
        for b in batches:
            out, lo = _output_and_loss(model, b, forward, loss_fn, need_loss)
            ref_out.append(out)
            ref_loss.append(None if lo is None else float(lo))
    kind, why = _output_kind(config.output_kind, ref_out[0])
    logger.info("outputs %s scored as %s (%s)", sorted(ref_out[0]), kind, why)
    if kind == "regression" and not explicit:
        metrics.discard("kl")
    ref_logp = [{k: _log_softmax(t) for k, t in outs.items()} for outs in ref_out] if "kl" in metrics else [{} for _ in ref_out]
    ref_power = {k: sum(float(torch.mean(o[k].double() ** 2)) for o in ref_out) / len(ref_out) for k in ref_out[0]}
    has_loss = need_loss and all(l is not None for l in ref_loss)
    if not has_loss:
        for m in ("loss", "fisher"):
            if m in metrics:
                logger.info("no loss available (the output carries none and no loss_fn): skipping the %s score", m)
                metrics.discard(m)
    want_hawq = config.hessian
    if want_hawq and not has_loss:
        logger.info("no loss available: skipping the Hessian (HAWQ) score")
        want_hawq = False
    base_loss = sum(ref_loss) / len(ref_loss) if has_loss else None  # type: ignore[arg-type]

    # 2. Hessian traces, all layers at once
    traces: Dict[str, float] = {}
    if want_hawq:
        ws = [modules[l.name].weight for l in infos]
        tr = hutchinson_trace(
            model, batches, ws, samples=config.hutchinson_samples, seed=config.seed, forward=forward, loss_fn=loss_fn
        )
        traces = {l.name: t for l, t in zip(infos, tr)}

    act_hook = _input_quant_hook(config.activations) if config.activations is not None else None
    entries: List[SensitivityEntry] = []
    for info in progress_bar(infos, progress, "sensitivity", total=len(infos), unit="layer"):
        mods = [modules[info.name]] + [modules[a] for a in info.aliases]
        # 3a. per-layer outputs and gradients for the Fisher score
        fisher_ref: List[Tuple[List[torch.Tensor], List[torch.Tensor]]] = []
        if "fisher" in metrics:
            fisher_ref = _layer_grads(model, batches, mods, forward, loss_fn)
        for cand in config.candidates:
            key = candidate_key(cand)
            scores: Dict[str, float] = {}
            sums = {m: 0.0 for m in metrics if m != "weight_mse"}
            handles = []
            captured: List[torch.Tensor] = []
            if act_hook is not None:
                handles += [m.register_forward_pre_hook(act_hook) for m in mods]
            if "fisher" in metrics:
                handles += [m.register_forward_hook(lambda _m, _a, o: captured.append(o.detach())) for m in mods]
            try:
                with quantized_layer(mods[0], cand) as original, torch.no_grad():
                    if "weight_mse" in metrics:
                        scores["weight_mse"] = float(torch.mean((mods[0].weight.double() - original.double()) ** 2))
                    if want_hawq:
                        dw2 = float(((mods[0].weight.double() - original.double()) ** 2).sum())
                        scores["hawq"] = traces[info.name] / info.numel * dw2
                    for i, b in enumerate(batches):
                        captured.clear()
                        out, lo = _output_and_loss(model, b, forward, loss_fn, "loss" in sums)
                        for m, v in _output_scores(out, ref_out[i], ref_logp[i], ref_power, sums).items():
                            sums[m] += v
                        if "loss" in sums:
                            sums["loss"] += float(lo) - ref_loss[i]
                        if "fisher" in sums:
                            ys, gs = fisher_ref[i]
                            if len(captured) != len(ys):
                                raise RuntimeError(
                                    f"layer {info.name} ran {len(captured)} times in a trial but {len(ys)} times in the reference pass"
                                )
                            sums["fisher"] += sum(
                                float(((g.double() * (yq.double() - y.double())) ** 2).sum()) for yq, y, g in zip(captured, ys, gs)
                            )
            finally:
                for h in handles:
                    h.remove()
            for m, s in sums.items():
                scores[m] = s / len(batches)
            entries.append(
                SensitivityEntry(
                    info.name, key, candidate_to_dict(cand), candidate_bits_per_param(cand, info.shape, info.full_bits), scores
                )
            )
            if trial_callback is not None:
                trial_callback(info.name, key)
        logger.debug("sensitivity of %s done", info.name)

    baseline: Dict[str, Any] = {"num_batches": len(batches)}
    if base_loss is not None:
        baseline["loss"] = base_loss
    metadata = {
        "model": type(model).__name__,
        "candidates": [candidate_key(c) for c in config.candidates],
        "metrics": sorted(set(metrics) | ({"hawq"} if want_hawq else set())),
        "outputs": sorted(ref_out[0]),
        "output_kind": kind,
        "output_kind_reason": why,
        "activations": None if config.activations is None else config.activations.label,
        "hutchinson_samples": config.hutchinson_samples if want_hawq else None,
    }
    return SensitivityReport(infos, entries, baseline, _other_bytes(model, infos, modules), metadata)


def _layer_grads(model, batches, mods, forward, loss_fn):
    """Return, per batch, the layer's outputs and the loss gradients at them (one entry per call)."""
    result = []
    for b in batches:
        outs: List[torch.Tensor] = []

        def hook(_m, _a, o):
            # A fresh leaf: the gradient stops here, so nothing upstream (no parameter .grad) is touched.
            leaf = o.detach().requires_grad_(True)
            outs.append(leaf)
            return leaf

        handles = [m.register_forward_hook(hook) for m in mods]
        try:
            with torch.enable_grad():
                loss = _loss(model, b, forward, loss_fn)
                grads = torch.autograd.grad(loss, outs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        grads = [torch.zeros_like(o) if g is None else g.detach() for o, g in zip(outs, grads)]
        result.append(([o.detach() for o in outs], grads))
    return result
