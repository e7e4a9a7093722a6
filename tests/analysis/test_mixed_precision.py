"""Tests of gradcomp.analysis.mixed_precision: the knapsack against brute force, rule precedence, applying plans."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from gradcomp.analysis.mixed_precision import (
    MixedPrecisionPlan,
    allocate_bits,
    apply_plan,
    budget_bits,
    match_pattern,
    pareto_front,
    plan_from_rules,
    random_plan,
    solve_mckp,
    uniform_plan,
)
from gradcomp.analysis.sensitivity import (
    LayerInfo,
    SensitivityConfig,
    SensitivityEntry,
    SensitivityReport,
    candidate_to_dict,
    measure_sensitivity,
)
from gradcomp.quant import CastConfig, WeightQuantConfig, fake_quantize_weight, model_size_bytes, weight_bits_per_param


pytestmark = pytest.mark.usefixtures("one_thread")

INT = {b: WeightQuantConfig(bits=b, granularity="per_group", group_size=16) for b in (2, 3, 4, 8)}


def _brute(costs, scores, budget):
    best, arg = math.inf, None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[j] for c, j in zip(costs, combo))
        if cost <= budget:
            s = sum(sc[j] for sc, j in zip(scores, combo))
            if s < best - 1e-12:
                best, arg = s, combo
    return best, arg


def _random_instance(rng, n_layers, n_opts):
    costs, scores = [], []
    for _ in range(n_layers):
        c = rng.integers(1, 60, size=n_opts)
        s = rng.random(n_opts) * rng.choice([0.01, 1.0, 100.0])
        costs.append(c.tolist())
        scores.append(s.tolist())
    return costs, scores


def test_exact_knapsack_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(150):
        n_layers, n_opts = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        costs, scores = _random_instance(rng, n_layers, n_opts)
        lo = sum(min(c) for c in costs)
        hi = sum(max(c) for c in costs)
        budget = int(rng.integers(lo, hi + 1))
        best, _ = _brute(costs, scores, budget)
        choice, method, res = solve_mckp(costs, scores, budget, method="exact")
        assert method == "exact" and res == 1
        assert sum(c[j] for c, j in zip(costs, choice)) <= budget
        got = sum(s[j] for s, j in zip(scores, choice))
        assert got == pytest.approx(best, rel=1e-12, abs=1e-12), (trial, costs, scores, budget)
        # the bucketed DP at resolution 1 is exact too; coarser ones stay within the budget
        ch1, _, _ = solve_mckp(costs, scores, budget, method="bucketed", resolution=1)
        assert sum(s[j] for s, j in zip(scores, ch1)) == pytest.approx(best, rel=1e-12, abs=1e-12)
        try:
            ch7, _, r = solve_mckp(costs, scores, budget, method="bucketed", resolution=7)
        except ValueError:
            pass  # rounding costs up may leave no feasible plan; it must then say so
        else:
            assert r == 7 and sum(c[j] for c, j in zip(costs, ch7)) <= budget
        # greedy: always feasible, never better than the optimum
        chg, _, _ = solve_mckp(costs, scores, budget, method="greedy")
        assert sum(c[j] for c, j in zip(costs, chg)) <= budget
        assert sum(s[j] for s, j in zip(scores, chg)) >= best - 1e-9


def test_auto_falls_back_to_bucketed_when_the_frontier_is_too_big():
    rng = np.random.default_rng(1)
    costs, scores = _random_instance(rng, 5, 4)
    budget = sum(max(c) for c in costs) // 2 + sum(min(c) for c in costs) // 2
    choice, method, res = solve_mckp(costs, scores, budget, method="auto", max_states=2)
    assert method == "bucketed" and res >= 1
    assert sum(c[j] for c, j in zip(costs, choice)) <= budget


def test_knapsack_worked_example_and_infeasible_budget():
    assert solve_mckp([[4, 8], [4, 8]], [[0.9, 0.1], [0.2, 0.15]], 12)[0] == [1, 0]
    with pytest.raises(ValueError, match="cannot be met"):
        solve_mckp([[4, 8], [4, 8]], [[0.9, 0.1], [0.2, 0.15]], 7)
    with pytest.raises(ValueError, match="method must be"):
        solve_mckp([[1]], [[0.0]], 1, method="ilp")


def _synthetic_report(n_layers=4, seed=0) -> SensitivityReport:
    rng = np.random.default_rng(seed)
    layers = [LayerInfo(f"l{i}", (), "Linear", (16 * (i + 1), 32), 16 * (i + 1) * 32, 32) for i in range(n_layers)]
    entries = []
    for l in layers:
        base = float(rng.random() * 10 + 0.1)
        for b, cfg in INT.items():
            entries.append(
                SensitivityEntry(l.name, cfg.name, candidate_to_dict(cfg), weight_bits_per_param(cfg, l.shape), {"kl": base * 4.0 ** (-b)})
            )
    return SensitivityReport(layers, entries, {"loss": 1.0}, other_bytes=100)


def test_allocation_is_optimal_over_all_plans_and_within_budget():
    report = _synthetic_report()
    for avg in (3.2, 4.0, 4.5, 6.0):
        plan = allocate_bits(report, avg_bits=avg, include_full_precision=False)
        assert plan.avg_bits <= avg + 1e-12
        # brute force over every assignment of the measured candidates
        opts = [(k, cfg) for k, cfg in ((c.name, c) for c in INT.values())]
        best = math.inf
        for combo in itertools.product(range(len(opts)), repeat=len(report.layers)):
            bits = sum(round(l.numel * weight_bits_per_param(opts[j][1], l.shape)) for l, j in zip(report.layers, combo))
            if bits <= budget_bits(report, avg_bits=avg):
                best = min(best, sum(report.score(l.name, opts[j][0], "kl") for l, j in zip(report.layers, combo)))
        assert plan.predicted == pytest.approx(best, rel=1e-12)
    by_bytes = allocate_bits(report, max_bytes=100 + sum(l.numel for l in report.layers) * 4.5 / 8, include_full_precision=False)
    assert by_bytes.model_bytes <= 100 + sum(l.numel for l in report.layers) * 4.5 / 8


def test_pareto_front_is_exactly_the_non_dominated_set():
    report = _synthetic_report(3, seed=2)
    front = pareto_front(report, include_full_precision=True)
    sizes = [p.total_bits for p in front]
    preds = [p.predicted for p in front]
    assert sizes == sorted(sizes) and all(a > b for a, b in zip(preds, preds[1:]))
    keys = [c.name for c in INT.values()] + ["fp32"]
    pts = []
    for combo in itertools.product(keys, repeat=3):
        plan = plan_from_rules(report, [(l.name, None if k == "fp32" else INT[int(k[3])]) for l, k in zip(report.layers, combo)])
        pts.append((plan.total_bits, plan.predicted))
    nondom = sorted({(c, s) for c, s in pts if not any((c2 <= c and s2 < s) or (c2 < c and s2 <= s) for c2, s2 in pts)})
    # keep only the cheapest of equal-score points, as the frontier does
    assert [(p.total_bits, pytest.approx(p.predicted, rel=1e-12)) for p in front] == [(c, s) for c, s in nondom]


def test_rule_precedence_first_vs_most_specific():
    layers = [LayerInfo(n, (), "Linear", (8, 8), 64, 32) for n in ("blocks.0.attn.c_attn", "blocks.0.mlp.c_fc", "blocks.1.mlp.c_fc", "head")]
    rules = [
        ("re:blocks\\.\\d+\\..*", INT[2]),
        ("blocks.*", INT[3]),
        ("blocks.*.mlp.c_fc", INT[4]),
        ("blocks.0.mlp.c_fc", INT[8]),
    ]
    first = plan_from_rules(layers, rules, precedence="first").bits_by_layer()
    assert first == {"blocks.0.attn.c_attn": "int2-g16", "blocks.0.mlp.c_fc": "int2-g16", "blocks.1.mlp.c_fc": "int2-g16", "head": "fp32"}
    spec = plan_from_rules(layers, rules, precedence="specific", default=CastConfig("fp16")).bits_by_layer()
    assert spec == {"blocks.0.attn.c_attn": "int3-g16", "blocks.0.mlp.c_fc": "int8-g16", "blocks.1.mlp.c_fc": "int4-g16", "head": "fp16"}
    # ties in specificity go to the earlier rule
    tie = plan_from_rules(layers, [("blocks.0.*", INT[2]), ("blocks.*.0", INT[8]), ("*attn*", INT[4])], precedence="specific")
    assert tie.bits_by_layer()["blocks.0.attn.c_attn"] == "int2-g16"
    with pytest.raises(ValueError, match="precedence"):
        plan_from_rules(layers, rules, precedence="last")
    with pytest.raises(ValueError, match="invalid regular expression"):
        plan_from_rules(layers, [("re:(", None)])
    assert match_pattern("head", "head") and not match_pattern("hea", "head")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 50))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 50, (8, 6), generator=g), torch.randint(0, 50, (8, 6), generator=g)) for _ in range(2)]


def test_apply_plan_quantizes_as_planned_and_predicts_the_size():
    model = _model()
    ref = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    inputs = [x for x, _ in _batches()]
    report = measure_sensitivity(model, inputs, SensitivityConfig(candidates=tuple(INT.values()) + (CastConfig("fp16"),), metrics=("kl",)))
    plan = allocate_bits(report, avg_bits=4.5)
    assert len({a.candidate for a in plan.assignments}) >= 1
    apply_plan(model, plan)
    for a in plan.assignments:
        mod = model.get_submodule(a.layer)
        assert torch.equal(mod.weight, fake_quantize_weight(ref[a.layer], a.config)), a.layer
    assert model_size_bytes(model) == pytest.approx(plan.model_bytes, abs=1)
    # the plan survives JSON
    assert MixedPrecisionPlan.from_dict(plan.to_dict()) == plan


def test_applied_plan_output_matches_the_trial_outputs():
    # One layer at int2: the applied model must give the very output the trial measured.
    model = _model()
    batches = _batches()
    report = measure_sensitivity(model, [x for x, _ in batches], SensitivityConfig(candidates=(INT[2],), metrics=("mse", "kl")))
    plan = plan_from_rules(report, [("1", INT[2])])
    with torch.no_grad():
        ref = [model(x) for x, _ in batches]
    apply_plan(model, plan)
    with torch.no_grad():
        mse = sum(float(torch.mean((model(x).double() - r.double()) ** 2)) for (x, _), r in zip(batches, ref)) / len(batches)
    assert mse == pytest.approx(report.score("1", INT[2].name, "mse"), rel=1e-6)
    assert plan.predicted == report.score("1", INT[2].name, "kl")


def test_bad_plan_leaves_the_model_untouched():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = _synthetic_report()
    plan = uniform_plan(report, INT[4].name)
    with pytest.raises(ValueError, match="not a module with a weight"):
        apply_plan(model, plan)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(type(m) in (nn.Sequential, nn.Embedding, nn.Linear, nn.ReLU) for m in model.modules())


def test_uniform_and_random_plans():
    report = _synthetic_report()
    u = uniform_plan(report, INT[4].name)
    assert {a.candidate for a in u.assignments} == {INT[4].name}
    for seed in range(5):
        r = random_plan(report, avg_bits=4.5, seed=seed)
        assert r.total_bits <= budget_bits(report, avg_bits=4.5)
        assert r.predicted >= allocate_bits(report, avg_bits=4.5, include_full_precision=False).predicted - 1e-12
    with pytest.raises(ValueError, match="exactly one budget"):
        allocate_bits(report)
    with pytest.raises(ValueError, match="leaves no room"):
        allocate_bits(report, max_bytes=50)
    with pytest.raises(ValueError, match="were not measured"):
        allocate_bits(report, avg_bits=4, candidates=["int5"])


def test_recommendation_is_computed_from_measurements():
    from gradcomp.analysis.mixed_precision import SCENARIOS, StrategyResult, Target, recommend, smallest_plan_within

    def r(name, size, lat, loss):
        return StrategyResult(name, size, lat, loss, 1000.0, 1.0, 2.0)

    results = [r("fp32", 1000, 1.0, 2.0), r("fp16", 500, 0.9, 2.0002), r("int8", 260, 1.1, 2.004), r("int4", 140, 1.3, 2.08), r("mixed", 150, 1.2, 2.01)]
    best, why = recommend(results, Target(max_loss_increase=0.01, objective="size"))
    assert best.name == "mixed" and "best size" in why  # int4 is smaller but loses 4%
    assert recommend(results, Target(max_loss_increase=0.05, objective="size"))[0].name == "int4"
    assert recommend(results, Target(max_loss_increase=0.01, objective="latency"))[0].name == "fp16"
    assert recommend(results, Target(max_bytes=300, objective="loss"))[0].name == "int8"
    assert recommend(results, "high_accuracy")[0].name == "fp16"
    none, why = recommend(results, Target(max_bytes=100))
    assert none is None and "no measured strategy" in why
    # changing the measurements changes the answer: nothing is hard-coded
    results[2] = r("int8", 260, 0.5, 2.004)
    assert recommend(results, "cloud_inference")[0].name == "int8"
    assert set(SCENARIOS) == {"cloud_inference", "edge_device", "real_time", "high_accuracy", "storage_limited"}
    with pytest.raises(ValueError, match="objective"):
        Target(objective="speed")
    with pytest.raises(ValueError, match="scenario"):
        recommend(results, "mobile")
    report = _synthetic_report()
    plan = smallest_plan_within(report, 0.01)
    assert plan.predicted <= 0.01
    assert all(p.predicted > 0.01 for p in pareto_front(report) if p.total_bits < plan.total_bits)
