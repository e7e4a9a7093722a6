"""Observers that generalise: unseen channels get a safe range with a warning; observer="auto" picks per layer on held-out data."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn

from gradcomp.quant import ActQuantConfig, load_quantized, quantize_activations_, save_quantized
from gradcomp.quant.activation_quant import calibrate_, convert_activation_quant_, prepare_activation_quant_
from gradcomp.quant.observer_selection import ObserverChoice, observer_choices

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_channel_that_was_always_zero_gets_the_tensors_range_and_a_warning(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    x = torch.randn(64, 6)
    x[:, 4] = 0.0                 # the one-hot feature of an element absent from calibration
    x[:, 5] = float("nan")        # never finite
    prepare_activation_quant_(model, ActQuantConfig(bits=8, observer="per_channel"))
    with caplog.at_level(logging.WARNING):
        quantize_activations_ = calibrate_(model, [x])
        convert_activation_quant_(model)
    msg = [r.getMessage() for r in caplog.records if "never held" in r.getMessage()]
    assert msg and msg[0].startswith("0: 2 of 6 input channels") and "[4, 5]" in msg[0]
    q = model[0].input_quantizer
    lo, hi = x[:, :4].min(), x[:, :4].max()
    wide = float(torch.maximum(-lo, hi))
    assert float(q.scale[4]) > 0 and float(q.scale[5]) > 0 and float(q.scale[4]) == pytest.approx(float(q.scale.max()))
    later = torch.zeros(2, 6)
    later[:, 4] = 0.5 * wide      # a held-out structure with that element: no longer clipped to 0
    with torch.no_grad():
        out = q(later)
    assert float(out[0, 4]) == pytest.approx(0.5 * wide, rel=0.02)


def _heavy(n, seed):
    """Inputs with rare large outliers on a Gaussian bulk: clipping ranges win on held-out data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    mask = torch.rand(n, 32, generator=g) < 0.001
    return x + mask * 12.0 * torch.randn(n, 32, generator=g).sign()


def test_auto_picks_the_observer_with_the_least_held_out_output_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [_heavy(256, s) for s in range(8)]
    cfg = ActQuantConfig(bits=4, observer="auto", candidates=("minmax", "mse", "percentile"))
    quantize_activations_(model, cfg, batches)
    got = observer_choices(model)
    assert set(got) == {"0", "2"}
    for name, rec in got.items():
        sq = rec["heldout_sqnr_db"]
        assert rec["observer"] == max(sq, key=sq.get)
    assert got["0"]["observer"] != "minmax"       # outliers: a clipping observer wins at 4 bits
    # the held-out batches were not observed: the minmax candidate saw the first 6 batches only
    obs = model[0].input_quantizer.observer
    assert isinstance(obs, ObserverChoice)
    seen = torch.cat(batches[:6])
    assert float(obs.candidates["minmax"].max_val) == pytest.approx(float(seen.max()))


def test_auto_with_one_batch_falls_back_with_a_warning(caplog):
    model = nn.Sequential(nn.Linear(8, 2))
    with caplog.at_level(logging.WARNING):
        quantize_activations_(model, ActQuantConfig(bits=8, observer="auto"), [torch.randn(16, 8)])
    assert observer_choices(model)["0"]["observer"] == "mse"
    assert any("no held-out" in r.getMessage() for r in caplog.records)


def test_auto_quantizers_save_and_load_with_their_choice(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = ActQuantConfig(bits=8, observer="auto", candidates=("minmax", "per_channel", "mse"))
    quantize_activations_(model, cfg, [_heavy(64, s) for s in range(4)])
    save_quantized(model, tmp_path / "a.safetensors")
    with torch.device("meta"):
        fresh = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    load_quantized(fresh, tmp_path / "a.safetensors")
    assert {n: r["observer"] for n, r in observer_choices(fresh).items()} == {n: r["observer"] for n, r in observer_choices(model).items()}
    x = _heavy(8, 99)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_candidates_are_validated():
    with pytest.raises(ValueError, match="candidates must be distinct"):
        ActQuantConfig(observer="auto", candidates=("minmax", "minmax"))
    with pytest.raises(ValueError, match="candidates must be distinct"):
        ActQuantConfig(observer="auto", candidates=("auto",))


def test_selecting_every_module_skips_the_auto_observers():
    model = nn.Sequential(nn.Linear(8, 4))
    quantize_activations_(model, ActQuantConfig(bits=8, observer="auto"), [torch.randn(8, 8) for _ in range(2)])
    with pytest.raises(ValueError, match="no module of Sequential matches"):   # the quantizer's insides are no layers
        prepare_activation_quant_(model, ActQuantConfig(bits=8, dynamic=True), types=(nn.Module,), exclude="0")
