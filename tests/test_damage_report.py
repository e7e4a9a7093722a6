"""The weight report with data: per-layer output error, and flags where SQNR looks safe but the output is not."""

from __future__ import annotations

import json
import math

import torch
import torch.nn as nn

from gradcomp.weights import WeightQuantConfig, analyze_weights

INT8 = WeightQuantConfig(bits=8)


class Ref(nn.Module):
    """A big layer with ordinary inputs and a reference-energy-like layer whose second input dominates."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(64, 64)
        self.ref = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.ref.weight.copy_(torch.tensor([[1.0, 0.0105]]))

    def forward(self, x):
        counts = torch.stack([x[:, 0].abs(), 1000.0 * x[:, 0].abs()], dim=1)   # second input 1000x the first
        return self.body(x).sum(1, keepdim=True) + self.ref(counts)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 64, generator=g) for _ in range(3)]


def test_output_error_matches_a_direct_measurement_and_flags_the_hidden_damage():
    model = Ref()
    report = analyze_weights(model, [INT8], calibration=_batches())
    assert report.data_driven and "output_snr" in report.note
    q = report.quality["ref.weight"]["int8-channel"] if "ref.weight" in report.quality else report.quality["ref"]["int8-channel"]
    # by hand: the layer's inputs over the batches, the quantized weight's output error
    xs = torch.cat([torch.stack([b[:, 0].abs(), 1000.0 * b[:, 0].abs()], 1) for b in _batches()]).double()
    from gradcomp.weights import fake_quantize_weight

    w = model.ref.weight.detach().double()
    d = fake_quantize_weight(model.ref.weight.detach(), INT8).double() - w
    snr = 10 * math.log10(float((xs @ w.T).pow(2).sum()) / float((xs @ d.T).pow(2).sum()))
    assert abs(q.output_snr_db - snr) < 1e-6
    assert q.sqnr_db > 40 and q.output_snr_db < 25
    flagged = {f["layer"] for f in report.flags}
    assert any(name.startswith("ref") for name in flagged) and not any(name.startswith("body") for name in flagged)
    row = [r for r in report.rows() if r["layer"].startswith("ref")][0]
    assert "out_snr[int8-channel]" in row
    doc = report.to_json()
    json.dumps(doc)
    assert doc["flags"] and doc["data_driven"]


def test_without_data_the_report_says_sqnr_is_a_proxy():
    report = analyze_weights(Ref().state_dict(), [INT8])
    assert not report.data_driven and not report.flags
    assert "proxy" in report.note and "proxy" in report.to_json()["note"]
    assert math.isnan(next(iter(report.quality.values()))["int8-channel"].output_snr_db)
