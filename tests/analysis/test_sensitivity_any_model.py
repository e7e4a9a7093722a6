"""Sensitivity and recommendations on models that are not classifiers over tensor batches."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from gradcomp.analysis.mixed_precision import StrategyResult, Target, recommend
from gradcomp.analysis.sensitivity import SensitivityConfig, measure_sensitivity, output_tensors
from gradcomp.quant import WeightQuantConfig

INT2 = WeightQuantConfig(bits=2)


class Graph:
    """A batch that is not a tensor (like a crystal graph): positions and per-node features."""

    def __init__(self, n: int, gen: torch.Generator):
        self.pos = torch.randn(n, 3, generator=gen)
        self.feat = torch.randn(n, 8, generator=gen)


class TwoHeads(nn.Module):
    """A regression model with two heads of very different scales, returning a dict."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 16)
        self.energy = nn.Linear(16, 1)
        self.moment = nn.Linear(16, 1)

    def forward(self, g: Graph):
        h = torch.tanh(self.body(g.feat))
        return {"energy": 1000.0 * self.energy(h).sum(), "moment": self.moment(h).squeeze(-1)}


def _graphs(n=3):
    gen = torch.Generator().manual_seed(1)
    return [Graph(5 + i, gen) for i in range(n)]


def test_non_tensor_batches_and_dict_outputs_without_adapter():
    model = TwoHeads()

    def loss_fn(model, batch):  # never asked for: must not be called
        raise AssertionError("loss_fn called although no loss metric was asked for")

    report = measure_sensitivity(model, _graphs(), SensitivityConfig(candidates=(INT2,), metrics=("mse", "rel_mse")), loss_fn=loss_fn)
    assert set(report.metrics) == {"mse", "rel_mse"}
    # default metrics: no kl for regression outputs, and the choice is stated
    report = measure_sensitivity(model, _graphs(), SensitivityConfig(candidates=(INT2,)))
    assert report.metadata["output_kind"] == "regression"
    assert "2 outputs" in report.metadata["output_kind_reason"]
    assert report.metadata["outputs"] == ["energy", "moment"]
    assert "kl" not in report.metrics and report.default_metric() == "rel_mse"


def test_every_output_is_scored_each_normalised():
    model = TwoHeads()
    graphs = _graphs()
    report = measure_sensitivity(model, graphs, SensitivityConfig(candidates=(INT2,), metrics=("mse", "rel_mse")), layers=["moment"])
    # by hand: only the moment head changes; its error relative to its own power, averaged over 2 outputs
    with torch.no_grad():
        ref = [model(g) for g in graphs]
        w = model.moment.weight.detach().clone()
        from gradcomp.quant import fake_quantize_weight

        model.moment.weight.copy_(fake_quantize_weight(w, INT2))
        got = [model(g) for g in graphs]
        model.moment.weight.copy_(w)
    power = sum(float((r["moment"].double() ** 2).mean()) for r in ref) / len(ref)
    mse = sum(float(((a["moment"].double() - r["moment"].double()) ** 2).mean()) for a, r in zip(got, ref)) / len(ref)
    assert report.score("moment", INT2.name, "rel_mse") == pytest.approx(mse / power / 2, rel=1e-9)
    # the plain mse of the moment head alone is invisible next to the energy's units; rel_mse is not
    assert report.score("moment", INT2.name, "rel_mse") > 1e-3


def test_output_tensors_walks_structures():
    @dataclass
    class Out:
        energy: torch.Tensor
        extra: tuple

    out = output_tensors({"e": torch.ones(2), "f": [torch.zeros(2, 3), torch.ones(1, 3)], "n": torch.arange(3)})
    assert list(out) == ["e", "f"] and out["f"].shape == (9,)
    out = output_tensors(Out(torch.ones(2), None))
    assert list(out) == ["energy"]
    assert list(output_tensors((torch.ones(2, 3), torch.tensor(0.5)))) == ["output"]     # (logits, loss)
    with pytest.raises(TypeError, match="floating tensor"):
        output_tensors({"ids": torch.arange(3)})


def test_output_kind_is_detected_and_stated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    batches = [torch.randn(8, 4)]
    report = measure_sensitivity(model, batches, SensitivityConfig(candidates=(INT2,)))
    assert report.metadata["output_kind"] == "classification" and report.default_metric() == "kl"
    assert "logits" in report.metadata["output_kind_reason"]
    report = measure_sensitivity(nn.Sequential(nn.Linear(4, 1)), batches, SensitivityConfig(candidates=(INT2,)))
    assert report.metadata["output_kind"] == "regression" and report.default_metric() == "rel_mse"
    assert "kl" not in report.metrics
    report = measure_sensitivity(model, batches, SensitivityConfig(candidates=(INT2,), output_kind="regression"))
    assert report.default_metric() == "rel_mse" and report.metadata["output_kind_reason"] == "set by output_kind"
    with pytest.raises(ValueError, match="output_kind"):
        SensitivityConfig(output_kind="ranking")


def test_recommend_with_a_zero_baseline():
    # a deviation-from-fp32 metric is 0 for fp32 itself: the increase is absolute, not a division by 0
    results = [
        StrategyResult("int8", 1000, 1.0, 0.013, 4000, 1.0, 0.0),
        StrategyResult("int4", 600, 1.0, 0.40, 4000, 1.0, 0.0),
    ]
    best, why = recommend(results, Target(max_loss_increase=0.05, objective="size"))
    assert best is results[0] and "absolute" in why
    best, why = recommend(results, Target(max_loss_increase=0.001))
    assert best is None and "absolute" in why
    assert results[1].row()["loss_increase_pct"] is None and results[1].row()["loss_increase_abs"] == pytest.approx(0.40)
