"""Tests of gradcomp.analysis.sensitivity: trials restore the model exactly, scores mean what they say."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcomp.analysis.sensitivity import (
    SensitivityConfig,
    SensitivityReport,
    candidate_from_dict,
    candidate_key,
    candidate_to_dict,
    find_layers,
    hutchinson_trace,
    measure_sensitivity,
    quantized_layer,
)
from gradcomp.quant import ActQuantConfig
from gradcomp.examples.tasks import TinyGPT
from gradcomp.quant import CastConfig, WeightQuantConfig, fake_quantize_weight


pytestmark = pytest.mark.usefixtures("one_thread")


class _Classifier(nn.Sequential):
    """An MLP that, given labels too, returns ``(logits, cross-entropy)`` (the batch convention of gradcomp.batches)."""

    def forward(self, x, y=None):
        logits = super().forward(x)
        return logits if y is None else (logits, F.cross_entropy(logits, y))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _Classifier(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))


def _mlp_batches(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _gpt(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(block_size=16, n_layer=1, n_head=2, n_embd=32)


def _gpt_batches(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 256, (4, 16), generator=g)
        out.append((x, torch.roll(x, -1, dims=1)))
    return out


def _snapshot(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_identical(model: nn.Module, snap) -> None:
    state = model.state_dict()
    assert state.keys() == snap.keys()
    for k, v in state.items():
        assert torch.equal(v, snap[k]), f"{k} changed"
        assert v.dtype == snap[k].dtype


CANDS = (
    WeightQuantConfig(bits=2, granularity="per_channel"),
    WeightQuantConfig(bits=4, granularity="per_group", group_size=16),
    WeightQuantConfig(bits=8, granularity="per_tensor"),
    CastConfig(dtype="bf16"),
)


def test_model_restored_exactly_after_every_trial():
    model = _gpt()
    model.train()  # the mode must come back too
    snap = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []

    def check(layer, key):
        _assert_identical(model, snap)
        assert all(p.grad is None for p in model.parameters())
        seen.append((layer, key))

    cfg = SensitivityConfig(candidates=CANDS, hessian=True, hutchinson_samples=1, activations=ActQuantConfig(bits=8, dynamic=True))
    report = measure_sensitivity(model, _gpt_batches(), cfg, trial_callback=check)
    layers = find_layers(model)
    assert len(seen) == len(layers) * len(CANDS) == len(report.entries)
    _assert_identical(model, snap)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_restored_when_a_trial_raises():
    model = _mlp()
    snap = _snapshot(model)
    calls = {"n": 0}

    def forward(m, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # inside a trial: a weight is quantized at this point
            raise RuntimeError("boom")
        return m(batch[0])

    with pytest.raises(RuntimeError, match="boom"):
        measure_sensitivity(model, _mlp_batches(), SensitivityConfig(candidates=CANDS[:2], metrics=("mse",)), forward=forward)
    _assert_identical(model, snap)


def test_quantized_layer_context_manager():
    lin = nn.Linear(16, 8)
    w0 = lin.weight.detach().clone()
    cfg = WeightQuantConfig(bits=4, granularity="per_channel")
    with quantized_layer(lin, cfg) as saved:
        assert torch.equal(saved, w0)
        assert torch.equal(lin.weight, fake_quantize_weight(w0, cfg))
        assert not torch.equal(lin.weight, w0)
    assert torch.equal(lin.weight, w0)


def test_tied_weights_are_one_layer_with_alias():
    model = _gpt()
    layers = {l.name: l for l in find_layers(model)}
    assert "wte" in layers and "lm_head" not in layers
    assert layers["wte"].aliases == ("lm_head",)
    # every distinct weight appears once
    assert len(layers) == len({id(p) for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2})


def test_fewer_bits_do_more_damage():
    model = _mlp()
    cands = tuple(WeightQuantConfig(bits=b, granularity="per_channel") for b in (2, 4, 8))
    report = measure_sensitivity(model, _mlp_batches(), SensitivityConfig(candidates=cands))
    for layer in report.layers:
        for metric in ("mse", "kl", "fisher", "weight_mse"):
            s = [report.score(layer.name, f"int{b}-channel", metric) for b in (2, 4, 8)]
            assert s[0] > s[1] > s[2] >= 0, (layer.name, metric, s)


def test_scores_match_a_direct_computation():
    model = _mlp()
    batches = _mlp_batches(2)
    cfg8 = WeightQuantConfig(bits=3, granularity="per_channel")
    report = measure_sensitivity(model, batches, SensitivityConfig(candidates=(cfg8,)))
    target = model[2]
    w0 = target.weight.detach().clone()
    mse = kl = loss = fisher = 0.0
    for x, y in batches:
        # reference: layer output y1 and dL/dy1
        h = model[1](model[0](x))
        y1 = target(h).detach().requires_grad_(True)
        out = model[4](model[3](y1))
        ref_loss = F.cross_entropy(out, y)
        (g,) = torch.autograd.grad(ref_loss, y1)
        with torch.no_grad():
            wq = fake_quantize_weight(w0, cfg8)
            y1q = F.linear(h, wq, target.bias)
            outq = model[4](model[3](y1q))
            mse += float(torch.mean((outq.double() - out.double()) ** 2))
            p = F.log_softmax(out, -1)
            kl += float((p.exp() * (p - F.log_softmax(outq, -1))).sum(-1).mean())
            loss += float(F.cross_entropy(outq, y)) - float(ref_loss)
            fisher += float(((g.double() * (y1q.double() - y1.double())) ** 2).sum())
    got = report.entries[[e.layer for e in report.entries].index("2")].metrics
    assert got["mse"] == pytest.approx(mse / 2, rel=1e-5)
    assert got["kl"] == pytest.approx(kl / 2, rel=1e-4)
    assert got["loss"] == pytest.approx(loss / 2, rel=1e-4, abs=1e-7)
    assert got["fisher"] == pytest.approx(fisher / 2, rel=1e-4)


def test_hutchinson_trace_of_a_quadratic_is_exact():
    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return (1.5 * self.w**2).sum().reshape(1, 1) + 0 * x

    m = Quad()
    tr = hutchinson_trace(m, [torch.zeros(1, 1)], [m.w], samples=3, loss_fn=lambda mod, b: mod(b).sum())
    assert tr[0] == pytest.approx(3.0 * 12)
    assert m.w.grad is None


def test_hawq_score_uses_trace_and_weight_error():
    model = _mlp()
    cfg = WeightQuantConfig(bits=4, granularity="per_channel")
    batches = _mlp_batches(1)
    report = measure_sensitivity(model, batches, SensitivityConfig(candidates=(cfg,), metrics=("weight_mse",), hessian=True, hutchinson_samples=2, seed=3))
    trace = hutchinson_trace(model, batches, [model[0].weight], samples=2, seed=3)
    # same seed, but the report draws vectors for all layers at once; recompute with all layers
    ws = [model[i].weight for i in (0, 2, 4)]
    traces = hutchinson_trace(model, batches, ws, samples=2, seed=3)
    w0 = model[0].weight.detach()
    dw2 = float(((fake_quantize_weight(w0, cfg).double() - w0.double()) ** 2).sum())
    assert report.score("0", "int4-channel", "hawq") == pytest.approx(traces[0] / w0.numel() * dw2, rel=1e-6)
    assert math.isfinite(trace[0])


def test_activation_trial_adds_damage():
    model = _mlp()
    cfg = (WeightQuantConfig(bits=8, granularity="per_channel"),)
    a = measure_sensitivity(model, _mlp_batches(), SensitivityConfig(candidates=cfg, metrics=("mse",)))
    b = measure_sensitivity(model, _mlp_batches(), SensitivityConfig(candidates=cfg, metrics=("mse",), activations=ActQuantConfig(bits=2, dynamic=True, granularity="per_tensor")))
    for layer in a.layers:
        assert b.score(layer.name, "int8-channel", "mse") > a.score(layer.name, "int8-channel", "mse")


def test_no_labels_skips_loss_and_fisher():
    model = _mlp()
    xs = [b[0] for b in _mlp_batches()]
    report = measure_sensitivity(model, xs, SensitivityConfig(candidates=CANDS[:1]))
    assert set(report.metrics) == {"mse", "rel_mse", "kl", "weight_mse"}
    assert "loss" not in report.baseline


def test_report_round_trip_and_table(tmp_path):
    model = _gpt()
    report = measure_sensitivity(model, _gpt_batches(1), SensitivityConfig(candidates=CANDS))
    path = tmp_path / "scores.json"
    report.to_json(path)
    again = SensitivityReport.from_json(path)
    assert again.to_dict() == json.loads(path.read_text())
    assert again.layers == report.layers and again.entries == report.entries
    rows = report.rows("kl")
    assert [r["kl"] for r in rows] == sorted((r["kl"] for r in rows), reverse=True)
    text = report.to_csv(tmp_path / "scores.csv", metric="mse")
    assert text.splitlines()[0].startswith("layer,candidate,bits_per_param,numel")
    assert len(text.strip().splitlines()) == len(report.entries) + 1
    assert report.other_bytes == sum(p.numel() * 4 for n, p in model.named_parameters() if not n.endswith("weight") or p.dim() == 1)


def test_bad_input_is_rejected_and_changes_nothing(tmp_path):
    model = _mlp()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="not quantizable layers"):
        measure_sensitivity(model, _mlp_batches(), layers=["nope"])
    with pytest.raises(ValueError, match="at least one calibration batch"):
        measure_sensitivity(model, [])
    with pytest.raises(ValueError, match="metrics must be"):
        SensitivityConfig(metrics=("accuracy",))
    with pytest.raises(ValueError, match="dynamic"):
        SensitivityConfig(activations=ActQuantConfig(bits=8))
    with pytest.raises(TypeError, match="WeightQuantConfig or a CastConfig"):
        SensitivityConfig(candidates=(4,))
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a gradcomp sensitivity file"):
        SensitivityReport.from_json(bad)
    _assert_identical(model, snap)


def test_candidate_serialisation():
    for c in CANDS + (None, WeightQuantConfig(bits=3, granularity="per_group", group_size=64, symmetric=False)):
        assert candidate_from_dict(candidate_to_dict(c)) == c
    assert candidate_key(WeightQuantConfig(bits=3, granularity="per_group", group_size=64, symmetric=False)) == "int3-g64-asym"
    assert candidate_key(None) == "fp32"


def toy_task():
    """A (model, batches) callable for the CLI test: ``--model test_sensitivity:toy_task``."""
    return _mlp(), _mlp_batches(2)


def test_cli_sensitivity_then_plan(tmp_path, capsys):
    from gradcomp.cli import main

    scores = tmp_path / "s.json"
    rc = main(["sensitivity", "--model", "test_sensitivity:toy_task", "--candidates", "int2-channel,int4-channel,int8-channel",
               "--out", str(scores), "--csv", str(tmp_path / "s.csv"), "--no-progress", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["rows"]) == 9 and doc["sorted_by"] == "kl"
    assert [r["kl"] for r in doc["rows"]] == sorted((r["kl"] for r in doc["rows"]), reverse=True)
    rc = main(["plan", "--scores", str(scores), "--avg-bits", "5", "--json", "--pareto", str(tmp_path / "p.csv")])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["avg_bits"] <= 5 and plan["method"] == "exact" and len(plan["layers"]) == 3
    rc = main(["plan", "--scores", str(scores), "--rule", "0=int8-channel", "--rule", "*=int2-channel"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "int8-channel" in out and "rules:first" in out
    assert main(["plan", "--scores", str(scores), "--avg-bits", "0.5"]) == 2  # infeasible budget: bad input
    assert main(["sensitivity", "--model", "nomodule"]) == 2


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    from gradcomp.analysis.mixed_precision import pareto_front
    from gradcomp.plots.sensitivity import plot_pareto, plot_sensitivity

    report = measure_sensitivity(_mlp(), _mlp_batches(1), SensitivityConfig(candidates=CANDS[:3], metrics=("kl",)))
    plot_sensitivity(report, tmp_path / "s.png")
    rows = [{"avg_bits": p.avg_bits, "predicted": p.predicted, "measured": p.predicted * 1.1} for p in pareto_front(report)]
    plot_pareto(rows, tmp_path / "p.png", baselines=[{"avg_bits": 4.0, "measured": 0.01, "label": "uniform"}])
    for name in ("s.png", "p.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
