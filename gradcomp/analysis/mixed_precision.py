"""Per-layer bit plans: rule-based plans and budgeted allocation from sensitivity scores.

A :class:`MixedPrecisionPlan` gives every quantizable layer one format (a ``WeightQuantConfig``, a
``CastConfig`` or ``None`` for full precision). It converts to the ordered rules list that
``gradcomp.quant.quantize_`` takes (:meth:`MixedPrecisionPlan.to_rules`), so
``apply_plan(model, plan)`` is one call.

Two ways to make a plan:

* **Rules** (:func:`plan_from_rules`): ``(pattern, config)`` pairs, where a pattern is an exact module
  name, a glob (``"blocks.*.mlp.*"``) or ``"re:<regex>"`` (full match). Two precedences, chosen
  explicitly: ``"first"`` (the first matching rule wins, exactly like ``quantize_``) or
  ``"specific"`` (the most specific matching rule wins: an exact name beats any glob, a glob beats
  any regex, among globs the one with more literal characters wins, and remaining ties go to the
  earlier rule).
* **Budgeted allocation** (:func:`allocate_bits`): choose one candidate per layer to minimise the
  sum of the layers' sensitivity scores subject to a budget in average bits per weight or in bytes,
  scale overhead included. This is a multiple-choice knapsack: item = layer, choice = format,
  cost = the layer's exact storage bits (an integer: ``numel * bits_per_param``), value = its score.

Solvers (``method``):

* ``"exact"``: dynamic programming over layers that keeps the Pareto frontier of
  (cost, score) partial plans: a partial plan is dropped only when another one costs no more and
  scores no worse, so the optimum is never lost. Costs are exact integers (bits), so there is no
  rounding at all. The final frontier *is* the Pareto curve (:func:`pareto_front`). It stays small
  in practice: 415 plans for a 10-layer GPT with 9 options per layer, 402 for the 36 Linear layers
  of MiniLM-L6 with 5 (solved in 6 ms and 24 ms for one budget).
* ``"bucketed"``: classic DP over the budget axis with costs rounded *up* to ``resolution`` bits,
  so every plan it returns truly fits; it is optimal for the rounded costs and its suboptimality is
  bounded by what ``len(layers) * resolution`` bits would buy. The resolution is reported.
* ``"greedy"``: for huge models: per layer the lower convex hull of its (cost, score) options,
  then upgrades in order of best score decrease per bit while the budget allows (the Lagrangian
  relaxation's solution, optimal on the hull points up to the last partial step).
* ``"auto"``: exact, falling back to bucketed when the frontier exceeds ``max_states`` states, and
  to greedy beyond 20,000 layers.

Worked example: two layers of 1000 weights, options (bits/weight, score) ``A: (4, 0.9), (8, 0.1)``
and ``B: (4, 0.2), (8, 0.15)``; with 6 bits per weight on average (12000 bits) only one layer can
have 8 bits: upgrading A saves 0.8, upgrading B 0.05, so the plan is A=8, B=4 with score 0.3.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from gradcomp.analysis.sensitivity import (
    Candidate,
    LayerInfo,
    SensitivityReport,
    candidate_bits_per_param,
    candidate_from_dict,
    candidate_key,
    find_layers,
)
from gradcomp.quant.configs import CastConfig, WeightQuantConfig
from gradcomp.quant.rules import _check_rule_config, match_pattern, normalize_rules, specificity

logger = logging.getLogger(__name__)
from gradcomp.analysis.bitplan import LayerAssignment, MixedPrecisionPlan, Rule
from gradcomp.analysis.mckp import pareto_frontier, solve_mckp
from gradcomp.analysis.targets import SCENARIOS, StrategyResult, Target, recommend
from gradcomp.quant import quantize_

__all__ = [
    "LayerAssignment",
    "MixedPrecisionPlan",
    "match_pattern",
    "plan_from_rules",
    "allocate_bits",
    "pareto_front",
    "uniform_plan",
    "random_plan",
    "apply_plan",
    "solve_mckp",
    "budget_bits",
    "Target",
    "SCENARIOS",
    "StrategyResult",
    "recommend",
    "smallest_plan_within",
]


def _layer_bits(info: LayerInfo, config: Optional[Candidate]) -> int:
    exact = info.numel * candidate_bits_per_param(config, info.shape, info.full_bits)
    # numel * bits_per_param is a whole number of bits; round away float noise, never round down real bits.
    r = round(exact)
    return int(r) if abs(exact - r) <= 1e-6 * max(1.0, exact) else int(math.ceil(exact))


# --------------------------------------------------------------------------------------------
# rules


def _check_rules(rules: Sequence[Rule]) -> List[Rule]:
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(f"rules must be a list of (pattern, config or None) pairs, got {type(rules).__name__}")
    return normalize_rules(rules, _check_rule_config)


def _layers_of(source: Union[SensitivityReport, nn.Module, Sequence[LayerInfo]]) -> List[LayerInfo]:
    if isinstance(source, SensitivityReport):
        return list(source.layers)
    if isinstance(source, nn.Module):
        return find_layers(source)
    layers = list(source)
    if not all(isinstance(l, LayerInfo) for l in layers):
        raise TypeError("layers must be a SensitivityReport, an nn.Module or a list of LayerInfo")
    return layers


def plan_from_rules(
    source: Union[SensitivityReport, nn.Module, Sequence[LayerInfo]],
    rules: Sequence[Rule],
    *,
    default: Optional[Candidate] = None,
    precedence: str = "first",
    metric: Optional[str] = None,
) -> MixedPrecisionPlan:
    """Resolve pattern rules to one format per layer.

    A rule matches a layer when its pattern matches the layer's name or one of its aliases.

    Precedence:
        * ``"first"``: the first matching rule in list order wins (``quantize_``'s own rule).
        * ``"specific"``: the most specific matching rule wins: exact name > glob > regex; among
          globs, more literal (non-wildcard) characters win; remaining ties go to the earlier rule.

    Example: rules ``[("blocks.*", int4), ("blocks.0.attn.c_attn", int8)]`` give
    ``blocks.0.attn.c_attn`` int4 with ``"first"`` and int8 with ``"specific"``.

    Args:
        source: a sensitivity report (scores are filled in), a model, or a list of layers.
        rules: ordered ``(pattern, config or None)`` pairs; ``None`` keeps full precision.
        default: format of layers no rule matches (None: full precision).
        precedence: ``"first"`` or ``"specific"``.
        metric: with a report, the metric whose scores to attach (default: the report's default).

    Returns:
        A :class:`MixedPrecisionPlan` (``method="rules:<precedence>"``).
    """
    if precedence not in ("first", "specific"):
        raise ValueError(f"precedence must be 'first' or 'specific', got {precedence!r}")
    if default is not None and not isinstance(default, (WeightQuantConfig, CastConfig)):
        raise TypeError(f"default must be a WeightQuantConfig, a CastConfig or None, got {type(default).__name__}")
    rules = _check_rules(rules)
    layers = _layers_of(source)
    report = source if isinstance(source, SensitivityReport) else None
    if report is not None:
        metric = metric or report.default_metric()
    chosen: Dict[str, Optional[Candidate]] = {}
    for info in layers:
        names = (info.name, *info.aliases)
        matches = [(i, p, c) for i, (p, c) in enumerate(rules) if any(match_pattern(p, n) for n in names)]
        if not matches:
            chosen[info.name] = default
        elif precedence == "first":
            chosen[info.name] = matches[0][2]
        else:
            best = max(matches, key=lambda m: (specificity(m[1]), -m[0]))
            chosen[info.name] = best[2]
    assignments = tuple(_assign(info, chosen[info.name], report, metric) for info in layers)
    return MixedPrecisionPlan(
        assignments, metric, f"rules:{precedence}", other_bytes=report.other_bytes if report is not None else 0
    )


def _assign(info: LayerInfo, cfg: Optional[Candidate], report: Optional[SensitivityReport], metric: Optional[str]) -> LayerAssignment:
    key = candidate_key(cfg)
    score = math.nan
    if cfg is None:
        score = 0.0
    elif report is not None and metric is not None:
        try:
            score = report.score(info.name, key, metric)
        except KeyError:
            score = math.nan
    return LayerAssignment(info.name, info.aliases, cfg, key, info.numel, _layer_bits(info, cfg), score)


def budget_bits(report: SensitivityReport, *, avg_bits: Optional[float] = None, max_bytes: Optional[float] = None) -> int:
    """Convert a budget to weight bits.

    ``avg_bits`` is bits per planned weight (scales included): ``floor(avg_bits * weights)``.
    ``max_bytes`` is the whole model (``other_bytes``, the unplanned rest, is subtracted first).

    Example: 1,000,000 planned weights at ``avg_bits=4.5`` give 4,500,000 bits.
    """
    if (avg_bits is None) == (max_bytes is None):
        raise ValueError("give exactly one budget: avg_bits or max_bytes")
    if avg_bits is not None:
        if not isinstance(avg_bits, (int, float)) or not avg_bits > 0:
            raise ValueError(f"avg_bits must be a positive number, got {avg_bits!r}")
        total = sum(l.numel for l in report.layers)
        return int(math.floor(avg_bits * total + 1e-9))
    if not isinstance(max_bytes, (int, float)) or not max_bytes > 0:
        raise ValueError(f"max_bytes must be a positive number, got {max_bytes!r}")
    left = max_bytes - report.other_bytes
    if left <= 0:
        raise ValueError(f"max_bytes={max_bytes} leaves no room for weights: the rest of the model already takes {report.other_bytes} bytes")
    return int(math.floor(left * 8))


def _options(
    report: SensitivityReport, metric: str, candidates: Optional[Sequence[str]], include_full_precision: bool
) -> List[List[Tuple[Optional[Candidate], str, int, float]]]:
    if metric not in report.metrics:
        raise ValueError(f"metric must be one of {report.metrics}, got {metric!r}")
    if candidates is not None:
        unknown = sorted(set(candidates) - set(report.candidates) - {"fp32"})
        if unknown:
            raise ValueError(f"candidates {unknown} were not measured; the report has {report.candidates}")
    per_layer: Dict[str, List[Tuple[Optional[Candidate], str, int, float]]] = {l.name: [] for l in report.layers}
    infos = {l.name: l for l in report.layers}
    for e in report.entries:
        if candidates is not None and e.candidate not in candidates:
            continue
        cfg = candidate_from_dict(e.config)
        per_layer[e.layer].append((cfg, e.candidate, _layer_bits(infos[e.layer], cfg), float(e.metrics[metric])))
    out = []
    for info in report.layers:
        opts = per_layer[info.name]
        if include_full_precision and (candidates is None or "fp32" in candidates):
            opts = opts + [(None, "fp32", _layer_bits(info, None), 0.0)]
        if not opts:
            raise ValueError(f"layer {info.name} has no candidate to choose from")
        out.append(opts)
    return out


def allocate_bits(
    report: SensitivityReport,
    *,
    avg_bits: Optional[float] = None,
    max_bytes: Optional[float] = None,
    metric: Optional[str] = None,
    candidates: Optional[Sequence[str]] = None,
    include_full_precision: bool = True,
    method: str = "auto",
    max_states: int = 1_000_000,
) -> MixedPrecisionPlan:
    """Choose a format per layer minimising the summed sensitivity under a size budget.

    Args:
        report: measured sensitivity (no model is needed).
        avg_bits: budget in average storage bits per planned weight, scale overhead included.
        max_bytes: budget in bytes of the whole model (weights as planned plus the unplanned rest).
        metric: which score to minimise (default: the report's default metric, ``kl`` if measured).
        candidates: candidate keys to allow (default: all measured, plus ``"fp32"``).
        include_full_precision: allow keeping a layer unquantized (score 0).
        method: solver, see the module docstring.
        max_states: exact frontier size at which ``"auto"`` falls back to the bucketed DP.

    Returns:
        The plan; its ``method`` and ``resolution_bits`` say how it was solved.
    """
    metric = metric or report.default_metric()
    budget = budget_bits(report, avg_bits=avg_bits, max_bytes=max_bytes)
    opts = _options(report, metric, candidates, include_full_precision)
    choice, used, resolution = solve_mckp(
        [[o[2] for o in layer] for layer in opts],
        [[o[3] for o in layer] for layer in opts],
        budget,
        method=method,
        max_states=max_states,
    )
    assignments = tuple(
        LayerAssignment(info.name, info.aliases, opts[i][j][0], opts[i][j][1], info.numel, opts[i][j][2], opts[i][j][3])
        for i, (info, j) in enumerate(zip(report.layers, choice))
    )
    plan = MixedPrecisionPlan(assignments, metric, used, budget, resolution, report.other_bytes)
    logger.info("plan (%s, %s): %.3f bits/weight, predicted %s=%.4g", used, metric, plan.avg_bits, metric, plan.predicted)
    return plan


def pareto_front(
    report: SensitivityReport,
    *,
    metric: Optional[str] = None,
    candidates: Optional[Sequence[str]] = None,
    include_full_precision: bool = True,
) -> List[MixedPrecisionPlan]:
    """Return every Pareto-optimal plan: no other plan is both smaller and less damaging.

    Uses the exact frontier DP with no budget; the plans come sorted by size, smallest first, with
    strictly decreasing predicted damage.
    """
    metric = metric or report.default_metric()
    opts = _options(report, metric, candidates, include_full_precision)
    costs = [np.array([o[2] for o in layer], dtype=np.int64) for layer in opts]
    scores = [np.array([o[3] for o in layer], dtype=np.float64) for layer in opts]
    fc, choices = pareto_frontier(costs, scores)
    plans = []
    for row, cost in zip(choices, fc):
        assignments = tuple(
            LayerAssignment(info.name, info.aliases, opts[i][j][0], opts[i][j][1], info.numel, opts[i][j][2], opts[i][j][3])
            for i, (info, j) in enumerate(zip(report.layers, row))
        )
        plans.append(MixedPrecisionPlan(assignments, metric, "exact", int(cost), 1, report.other_bytes))
    return plans


def uniform_plan(report: SensitivityReport, candidate: str, *, metric: Optional[str] = None) -> MixedPrecisionPlan:
    """Return the plan that gives every layer the same measured candidate (``"fp32"`` keeps all)."""
    metric = metric or report.default_metric()
    opts = _options(report, metric, None, True)
    assignments = []
    for info, layer in zip(report.layers, opts):
        match = [o for o in layer if o[1] == candidate]
        if not match:
            raise ValueError(f"candidate {candidate!r} was not measured for layer {info.name}; the report has {report.candidates}")
        o = match[0]
        assignments.append(LayerAssignment(info.name, info.aliases, o[0], o[1], info.numel, o[2], o[3]))
    return MixedPrecisionPlan(tuple(assignments), metric, "uniform", None, 1, report.other_bytes)


def random_plan(
    report: SensitivityReport,
    *,
    avg_bits: Optional[float] = None,
    max_bytes: Optional[float] = None,
    seed: int = 0,
    metric: Optional[str] = None,
    candidates: Optional[Sequence[str]] = None,
    include_full_precision: bool = False,
) -> MixedPrecisionPlan:
    """Return a random plan that fills the budget: a baseline that ignores sensitivity.

    Steps: start from every layer's cheapest option; then, in random order, move a random layer to
    a random more expensive option that still fits; stop when no move fits. The result uses about
    as many bits as the budget allows, like the knapsack plan, but chooses blindly.
    """
    metric = metric or report.default_metric()
    budget = budget_bits(report, avg_bits=avg_bits, max_bytes=max_bytes)
    opts = _options(report, metric, candidates, include_full_precision)
    rng = random.Random(seed)
    pick = [min(range(len(layer)), key=lambda j: layer[j][2]) for layer in opts]
    spent = sum(opts[i][pick[i]][2] for i in range(len(opts)))
    if spent > budget:
        raise ValueError(f"the budget of {budget} bits cannot be met: the cheapest plan takes {spent}")
    while True:
        moves = [
            (i, j)
            for i, layer in enumerate(opts)
            for j in range(len(layer))
            if layer[j][2] > layer[pick[i]][2] and spent - layer[pick[i]][2] + layer[j][2] <= budget
        ]
        if not moves:
            break
        i, j = rng.choice(moves)
        spent += opts[i][j][2] - opts[i][pick[i]][2]
        pick[i] = j
    assignments = tuple(
        LayerAssignment(info.name, info.aliases, opts[i][j][0], opts[i][j][1], info.numel, opts[i][j][2], opts[i][j][3])
        for i, (info, j) in enumerate(zip(report.layers, pick))
    )
    return MixedPrecisionPlan(assignments, metric, "random", budget, 1, report.other_bytes)


# --------------------------------------------------------------------------------------------
# apply


def apply_plan(model: nn.Module, plan: MixedPrecisionPlan) -> nn.Module:
    """Quantize ``model`` in place according to ``plan`` through ``weights.quantize_``.

    Every planned layer must exist in the model with the planned number of weights; this is checked
    before anything changes, so a plan for another model leaves this one untouched.

    Returns:
        The model (quantized in place).
    """
    if not isinstance(plan, MixedPrecisionPlan):
        raise TypeError(f"plan must be a MixedPrecisionPlan, got {type(plan).__name__}")
    modules = dict(model.named_modules(remove_duplicate=False))
    for a in plan.assignments:
        for name in (a.layer, *a.aliases):
            mod = modules.get(name)
            w = getattr(mod, "weight", None) if mod is not None else None
            if not isinstance(w, torch.Tensor):
                raise ValueError(f"the plan names layer {name!r}, which is not a module with a weight in this model")
            if w.numel() != a.numel:
                raise ValueError(f"layer {name!r} has {w.numel()} weights in the model but {a.numel} in the plan")
    quantize_(model, plan.to_rules())
    return model


def smallest_plan_within(
    report: SensitivityReport,
    max_damage: float,
    *,
    metric: Optional[str] = None,
    candidates: Optional[Sequence[str]] = None,
    include_full_precision: bool = True,
) -> MixedPrecisionPlan:
    """Return the smallest Pareto-optimal plan whose predicted damage is at most ``max_damage``.

    With ``metric="loss"`` the damage is a predicted loss increase (summed single-layer increases), so
    ``max_damage = 0.01 * baseline_loss`` asks for at most about 1% more loss.
    """
    front = pareto_front(report, metric=metric, candidates=candidates, include_full_precision=include_full_precision)
    fitting = [p for p in front if p.predicted <= max_damage]
    if not fitting:
        raise ValueError(f"no plan is predicted to stay within a damage of {max_damage}; the least damaging plan has {front[-1].predicted}")
    return fitting[0]
