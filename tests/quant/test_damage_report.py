"""The weight report with data: per-layer output error, and flags where SQNR looks safe but the output is not."""

from __future__ import annotations

import json
import math

import torch
import torch.nn as nn

from gradcomp.quant import WeightQuantConfig, analyze_weights

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
    from gradcomp.quant import fake_quantize_weight

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


class RefEnergy(nn.Module):
    """A small network plus a per-element reference-energy lookup (94 values up to 16 in size), as in
    interatomic potentials: energy = body(features) + sum over elements of fraction * reference energy."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body1, self.body2 = nn.Linear(32, 64), nn.Linear(64, 1)
        self.comp = nn.Linear(94, 1, bias=False)
        with torch.no_grad():
            self.comp.weight.copy_(-torch.rand(1, 94, generator=g) * 14.0 - 2.0)   # -16 .. -2 eV

    def forward(self, feats, frac):
        return 0.1 * self.body2(torch.tanh(self.body1(feats))) + self.comp(frac)


def _structures(n_batches=3, size=16):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n_batches):
        frac = torch.zeros(size, 94)
        idx = torch.randint(0, 94, (size, 2), generator=g)
        frac.scatter_(1, idx, 0.5)                 # binary compounds, half of each element (or one element)
        frac = frac / frac.sum(1, keepdim=True)
        out.append((torch.randn(size, 32, generator=g), frac))
    return out


def test_model_output_share_flags_the_reference_energy_layer_that_output_snr_misses():
    model = RefEnergy()
    batches = _structures()
    report = analyze_weights(model, [INT8], calibration=batches, propagate=True)
    comp = report.quality["comp"]["int8-channel"]
    # the case of the issue: SQNR and relative output SNR both look fine, so the output-SNR flag stays silent
    assert comp.sqnr_db > 35 and abs(comp.output_snr_db - comp.sqnr_db) < 10
    assert not [f for f in report.flags if f["kind"] == "output_snr" and f["layer"] == "comp"]
    # ... but quantized alone it causes nearly all of the model's error
    flagged = {f["layer"] for f in report.flags if f["kind"] == "model_output"}
    assert flagged == {"comp"}, report.flags
    assert comp.model_error_share > 0.8
    assert all(report.quality[n]["int8-channel"].model_error_share < 0.25 for n in ("body1", "body2"))
    # the share is the measured model-output error: check it by hand
    from gradcomp.quant import fake_quantize_weight

    with torch.no_grad():
        ref = torch.cat([model(*b) for b in batches]).double()
        w = model.comp.weight.detach().clone()
        model.comp.weight.copy_(fake_quantize_weight(w, INT8))
        alone = torch.cat([model(*b) for b in batches]).double()
        model.comp.weight.copy_(w)
    by_hand = float(((alone - ref) ** 2).mean() / (ref ** 2).mean())
    assert abs(comp.model_rel_mse - by_hand) <= 1e-9 * max(by_hand, 1e-30) and comp.model_error_output == "output"
    assert torch.equal(model.comp.weight, w)                 # weights put back
    assert report.propagated and "model_share[int8-channel]" in report.rows()[0]
    assert "model_output" in report.note and json.dumps(report.to_json())


def test_propagate_needs_data_and_a_valid_share():
    import pytest

    with pytest.raises(ValueError, match="propagate"):
        analyze_weights(RefEnergy(), [INT8], propagate=True)
    with pytest.raises(ValueError, match="flag_share"):
        analyze_weights(RefEnergy(), [INT8], calibration=_structures(1), propagate=True, flag_share=2.0)


class TwoHeads(RefEnergy):
    """Energy (big offset from the reference layer) and a second head whose relative error is much larger."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(64, 3)

    def forward(self, feats, frac):
        h = torch.tanh(self.body1(feats))
        return {"e": 0.1 * self.body2(h) + self.comp(frac), "m": self.head(h)}


def test_share_is_per_output_so_a_second_head_does_not_hide_the_energy_layer():
    torch.manual_seed(0)
    report = analyze_weights(TwoHeads(), [INT8], calibration=_structures(), propagate=True)
    comp = report.quality["comp"]["int8-channel"]
    per = report.model_rel_mse_per_output["int8-channel"]
    assert per["m"] > per["e"]
    # a share of the error summed over the outputs would stay under the flag (the second head dominates) ...
    assert comp.model_rel_mse / report.model_rel_mse["int8-channel"] < 0.25
    # ... while on the energy this layer causes nearly all of it
    assert comp.model_error_output == "e" and comp.model_error_share > 0.8
    assert "comp" in {f["layer"] for f in report.flags if f["kind"] == "model_output"}
