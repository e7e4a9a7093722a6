"""Tests of activation quantization (gradcomp.quant): observers, range searches, capture, fake quantization, STE, CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from gradcomp import codec
from gradcomp.quant import (
    OBSERVERS,
    ActivationCapture,
    ActivationQuantizer,
    ActQuantConfig,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PercentileObserver,
    PerChannelMinMaxObserver,
    PerTokenMinMaxObserver,
    RunningHistogram,
    analyze_activation_dynamics,
    convert_activation_quant_,
    fake_quantize_ste,
    fake_quantize_with_qparams,
    fold_abs_histogram,
    kl_threshold,
    make_observer,
    measure_activation_sqnr,
    mse_clip_range,
    prepare_activation_quant_,
    quantize_activations_,
    remove_activation_quant_,
)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def _tiny_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 8, generator=g) for _ in range(3)]


def _all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------------------------
# observers against hand-computed values


def test_minmax_observer_hand_computed():
    obs = MinMaxObserver(bits=8, symmetric=False)
    out = obs(torch.tensor([-1.0, 2.0]))
    assert torch.equal(out, torch.tensor([-1.0, 2.0]))
    obs(torch.tensor([0.0, 3.0]))
    scale, zp = obs.calculate_qparams()
    assert scale.item() == pytest.approx(4.0 / 255.0)
    assert zp.item() == 64.0  # round(1 / (4/255)) = round(63.75)
    sym = MinMaxObserver(bits=4, symmetric=True)
    sym(torch.tensor([-1.0, 3.5]))
    s, z = sym.calculate_qparams()
    assert z is None and s.item() == pytest.approx(3.5 / 7)


def test_moving_average_observer_hand_computed():
    obs = MovingAverageMinMaxObserver(bits=8, averaging_constant=0.5)
    obs(torch.tensor([-1.0, 1.0]))
    obs(torch.tensor([-3.0, 5.0]))
    assert obs.min_val.item() == -2.0 and obs.max_val.item() == 3.0


def test_per_channel_and_per_token_observers_hand_computed():
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    pc = PerChannelMinMaxObserver(bits=8, symmetric=True, axis=-1)
    pc(x)
    assert pc.min_val.tolist() == [1.0, -2.0] and pc.max_val.tolist() == [3.0, 4.0]
    s, _ = pc.calculate_qparams()
    assert torch.allclose(s, torch.tensor([3.0, 4.0]) / 127)
    with pytest.raises(ValueError, match="channels"):
        pc(torch.zeros(2, 3))
    pt = PerTokenMinMaxObserver(bits=8, symmetric=True)
    pt(x)
    s, _ = pt.calculate_qparams()
    assert s.shape == (2, 1)
    assert torch.allclose(s.reshape(-1), torch.tensor([2.0, 4.0]) / 127)


def test_percentile_observer_close_to_exact():
    x = torch.arange(10000, dtype=torch.float32)
    obs = PercentileObserver(bits=8, percentile=99.0, bins=1000)
    for chunk in x.split(1000):  # the range grows with every batch: exercises re-binning
        obs(chunk)
    lo, hi = obs.clip_range()
    width = 9999 / 1000
    assert abs(hi.item() - 9899.0) <= 2 * width
    assert abs(lo.item() - 100.0) <= 2 * width


def test_observer_empty_raises_and_ignores_nonfinite():
    with pytest.raises(ValueError, match="no finite data"):
        MinMaxObserver().calculate_qparams()
    obs = MinMaxObserver()
    obs(torch.tensor([1.0, float("inf"), -2.0, float("nan")]))
    assert obs.min_val.item() == -2.0 and obs.max_val.item() == 1.0
    with pytest.raises(TypeError):
        obs(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="bits"):
        MinMaxObserver(bits=5)
    with pytest.raises(ValueError, match="observer must be one of"):
        make_observer("median")


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_observer_state_dict_round_trip(name):
    torch.manual_seed(0)
    kwargs = {"bins": 256} if name in ("percentile", "mse", "kl") else {}
    obs = make_observer(name, bits=8, **kwargs)
    for _ in range(3):
        obs(torch.randn(4, 6, 5) * 3)
    fresh = make_observer(name, bits=8)  # default bins: the stored histogram's size wins
    fresh.load_state_dict(copy.deepcopy(obs.state_dict()))
    s1, z1 = obs.calculate_qparams()
    s2, z2 = fresh.calculate_qparams()
    assert torch.equal(s1, s2)
    assert (z1 is None and z2 is None) or torch.equal(z1, z2)
    fresh.reset()
    with pytest.raises(ValueError, match="no finite data"):
        fresh.calculate_qparams()


# --------------------------------------------------------------------------------------------
# running histogram and statistics


def test_running_histogram_percentiles_within_bound():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(5000, generator=g) * (1 + i) + i for i in range(6)]
    h = RunningHistogram(bins=512)
    for c in chunks:
        h.update(c)
    allx = torch.cat(chunks)
    assert h.total == pytest.approx(allx.numel())
    qs = torch.tensor([0.001, 0.01, 0.5, 0.99, 0.999], dtype=torch.float64)
    est = h.quantile(qs)
    exact = torch.quantile(allx.double(), qs)
    width = (float(h.hi) - float(h.lo)) / 512
    assert float((est - exact).abs().max()) <= 2 * width
    assert float(h.lo) == float(allx.min()) and float(h.hi) == float(allx.max())


def test_capture_statistics_equal_full_data():
    model = _tiny_model()
    batches = _tiny_batches()
    with ActivationCapture(model, inputs=True, outlier_sigma=2.0) as cap:
        assert cap.run(batches) == 3
    report = cap.report()
    assert set(report.layers) == {"0", "0:input", "2", "2:input"}
    with torch.no_grad():
        h = model[0](torch.cat(batches))
    st = report.layers["0"]
    flat = h.reshape(-1).double()
    assert st.count == flat.numel() and st.batches == 3
    assert st.mean == pytest.approx(float(flat.mean()), rel=1e-9)
    assert st.std == pytest.approx(float(flat.std(unbiased=False)), rel=1e-9)
    centered = flat - flat.mean()
    kurt = float((centered**4).mean() / (centered**2).mean() ** 2)
    assert st.kurtosis == pytest.approx(kurt, rel=1e-9)
    assert st.min == float(h.min()) and st.max == float(h.max())
    assert st.channel_min == h.amin(dim=0).tolist()
    # per-batch outlier share: beyond 2 batch std of the batch mean
    per_batch = []
    for b in batches:
        y = model[0](b).detach().double().reshape(-1)
        per_batch.append(float(((y - y.mean()).abs() > 2 * y.std(unbiased=False)).sum()))
    assert st.outlier_share == pytest.approx(sum(per_batch) / flat.numel())
    json.dumps(report.to_dict())  # JSON-ready
    assert {"absmax_cv", "range_drift", "range_use"} <= set(report.dynamics_rows()[0])


def test_hooks_removed_after_error_and_selection():
    model = _tiny_model()
    before = _all_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationCapture(model):
            model(torch.randn(2, 8))
            assert _all_hooks(model) == before + 2
            raise RuntimeError("boom")
    assert _all_hooks(model) == before
    # an error inside the forward pass (wrong input width) also leaves no hook behind
    with pytest.raises(RuntimeError):
        analyze_activation_dynamics(model, [torch.randn(2, 3)])
    assert _all_hooks(model) == before
    with pytest.raises(ValueError, match="no module"):
        ActivationCapture(model, names="nothing")
    with pytest.raises(ValueError, match="regular expression"):
        ActivationCapture(model, names="re:(")
    rep = analyze_activation_dynamics(model, _tiny_batches(), types=(nn.Module,), names="1")
    assert list(rep.layers) == ["1"]


# --------------------------------------------------------------------------------------------
# MSE and KL searches against brute force


def _small_hist(seed: int, bins: int = 24, lo: float = -2.0, hi: float = 9.0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    centers = np.linspace(lo, hi, bins)
    counts = np.round(1000 * np.exp(-0.5 * (centers / 1.2) ** 2)) + (g.random(bins) < 0.3) * g.integers(1, 4, bins)
    return torch.tensor(counts, dtype=torch.float64)


def _objective(counts, edges, a, b, bits, symmetric):
    """Naive per-bin expected error of clipping to [a, b] (mass uniform in each bin)."""
    qmin, qmax, _ = codec.qrange(bits, symmetric)
    step = (max(-a, b) / qmax) if symmetric else (b - a) / (qmax - qmin)
    err = 0.0
    for i in range(len(counts)):
        lo, hi = float(edges[i]), float(edges[i + 1])
        c, w, n = 0.5 * (lo + hi), hi - lo, float(counts[i])
        if lo >= b:
            err += n * ((c - b) ** 2 + w * w / 12)
        elif hi <= a:
            err += n * ((c - a) ** 2 + w * w / 12)
        else:
            err += n * step * step / 12
    return err / float(counts.sum())


def _real_mse(counts, edges, a, b, bits, symmetric, per_bin=100):
    """MSE of the codec's fake quantization of dense samples, weighted by the histogram."""
    offs = (torch.arange(per_bin, dtype=torch.float64) + 0.5) / per_bin
    x = (edges[:-1, None] + (edges[1:] - edges[:-1])[:, None] * offs).reshape(-1).float()
    wts = torch.repeat_interleave(counts, per_bin)
    s, z = codec.choose_qparams(torch.tensor(a), torch.tensor(b), bits, symmetric)
    y = fake_quantize_with_qparams(x, s, z, bits)
    return float((wts * (x.double() - y.double()) ** 2).sum() / wts.sum())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bits", [2, 4])
def test_mse_search_matches_brute_force_asymmetric(seed, bits):
    counts = _small_hist(seed)
    lo, hi = -2.0, 9.0
    edges = torch.linspace(lo, hi, counts.numel() + 1, dtype=torch.float64)
    a, b, err = mse_clip_range(counts, lo, hi, bits, symmetric=False, refine=0)
    cands = [(float(ea), float(eb)) for ea in edges if ea <= 0 for eb in edges if eb >= 0]
    brute = {c: _objective(counts, edges, c[0], c[1], bits, False) for c in cands}
    best = min(brute, key=brute.get)
    assert err == pytest.approx(brute[best], rel=1e-9)
    assert (a, b) == pytest.approx(best)
    # with re-ranking, the chosen clip is the best by the real quantization error (dense samples
    # through the codec), up to the quadrature error, and beats min-max
    ra, rb, _ = mse_clip_range(counts, lo, hi, bits, symmetric=False)
    real = {c: _real_mse(counts, edges, c[0], c[1], bits, False) for c in cands}
    chosen = real[min(real, key=lambda c: abs(c[0] - ra) + abs(c[1] - rb))]
    assert chosen <= 1.03 * min(real.values())
    assert chosen < real[(lo, hi)]


@pytest.mark.parametrize("bits", [3, 8])
def test_mse_search_matches_brute_force_symmetric(bits):
    counts = _small_hist(5, bins=32, lo=0.0, hi=12.0)
    edges = torch.linspace(0.0, 12.0, 33, dtype=torch.float64)
    a, t, err = mse_clip_range(counts, 0.0, 12.0, bits, symmetric=True, refine=0)
    brute = {float(e): _objective(counts, edges, -float(e), float(e), bits, True) for e in edges[1:]}
    best = min(brute, key=brute.get)
    assert t == pytest.approx(best) and a == -t
    assert err == pytest.approx(brute[best], rel=1e-9)
    _, rt, _ = mse_clip_range(counts, 0.0, 12.0, bits, symmetric=True)
    real = {e: _real_mse(counts, edges, -e, e, bits, True) for e in brute}
    assert real[min(real, key=lambda e: abs(e - rt))] <= 1.03 * min(real.values())


def _kl_reference(hist: np.ndarray, levels: int, eps: float = 1e-4):
    """Entropy calibration (TensorRT / MXNet, smoothing on counts), one candidate at a time."""

    def smooth(h):
        zeros = h == 0
        eps1 = eps * zeros.sum() / (~zeros).sum()
        return np.where(zeros, eps, h - eps1)

    out = []
    for i in range(levels, len(hist) + 1):
        sliced = hist[:i].astype(np.float64).copy()
        p = sliced.copy()
        p[i - 1] += hist[i:].sum()
        m = i // levels
        q = np.zeros(i)
        for g in range(levels):
            start, stop = g * m, (i if g == levels - 1 else (g + 1) * m)
            seg = sliced[start:stop]
            nonempty = seg > 0
            if nonempty.any():
                q[start:stop] = np.where(nonempty, seg.sum() / nonempty.sum(), 0.0)
        p, q = smooth(p), smooth(q)
        p, q = p / p.sum(), q / q.sum()
        out.append(float(np.sum(p * np.log(p / q))))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 3])
def test_kl_search_matches_brute_force(seed):
    g = np.random.default_rng(seed)
    hist = np.round(2000 * np.exp(-np.linspace(0, 6, 40))) + (g.random(40) < 0.2) * 2
    hist[25:33] = 0  # an empty stretch before a few outliers
    t, cand, kl = kl_threshold(torch.tensor(hist), amax=4.0, levels=8)
    ref = _kl_reference(hist, 8)
    assert cand.tolist() == list(range(8, 41))
    np.testing.assert_allclose(kl.numpy(), ref, rtol=1e-7, atol=1e-12)
    assert t == pytest.approx((8 + int(np.argmin(ref))) * 4.0 / 40)


def test_kl_coarse_to_fine_matches_exhaustive():
    g = torch.Generator().manual_seed(0)
    h = RunningHistogram(bins=1024)
    x = torch.randn(100_000, generator=g)
    x[:30] = 40.0
    h.update(x)
    counts, amax = fold_abs_histogram(h)
    t_fast, cand, kl = kl_threshold(counts, amax, levels=128, max_candidates=64)
    t_all, cand_all, kl_all = kl_threshold(counts, amax, levels=128, max_candidates=2048)
    assert cand.numel() < 150 and cand_all.numel() == 1024 - 128 + 1
    # the two-pass search finds the exhaustive optimum or one within 2% of its divergence
    assert float(kl.min()) <= 1.02 * float(kl_all.min())
    assert abs(t_fast - t_all) <= 0.1 * t_all


def test_kl_and_mse_clip_gaussian_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g)
    x[:10] = 20.0
    kl = EntropyObserver(bits=8, symmetric=True, bins=1024)
    mse = HistogramObserver(bits=4, symmetric=True, bins=1024)
    for chunk in x.split(25_000):
        kl(chunk)
        mse(chunk)
    t_kl = kl.clip_range()[1].item()
    t_mse = mse.clip_range()[1].item()
    assert 2.5 < t_kl < 10.0
    assert 1.5 < t_mse < 5.0


def test_fold_abs_histogram_mass():
    h = RunningHistogram(bins=400)
    h.update(torch.linspace(-1.0, 3.0, 4001))
    counts, amax = fold_abs_histogram(h)
    assert amax == pytest.approx(3.0)
    assert float(counts.sum()) == pytest.approx(4001)
    inside_half = float(counts[: int(400 * 0.5 / 3.0)].sum())
    assert inside_half == pytest.approx(1000, rel=0.02)  # |x| < 0.5: 1000 of the 4001 points


# --------------------------------------------------------------------------------------------
# fake quantization equals the codec, STE gradient


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_equals_codec_bit_for_bit(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 7, 9, generator=g) * 3 + 0.5
    s, z = codec.choose_qparams(x.amin(), x.amax(), bits, symmetric)
    assert torch.equal(fake_quantize_with_qparams(x, s, z, bits), codec.fake_quantize(x, bits, block_size=x.numel(), symmetric=symmetric))
    # per token: one codec block per row of the last axis
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    s, z = codec.choose_qparams(lo, hi, bits, symmetric)
    assert torch.equal(fake_quantize_with_qparams(x, s, z, bits), codec.fake_quantize(x, bits, block_size=9, symmetric=symmetric))
    # per channel along axis 1: the codec on the channel-major layout
    xm = x.movedim(1, 0).contiguous()
    lo, hi = torch.aminmax(xm.reshape(7, -1), dim=1)
    s, z = codec.choose_qparams(lo, hi, bits, symmetric)
    ref = codec.fake_quantize(xm, bits, block_size=6 * 9, symmetric=symmetric).movedim(0, 1)
    assert torch.equal(fake_quantize_with_qparams(x, s, z, bits, axis=1), ref)


def test_dynamic_per_token_quantizer_equals_codec():
    model = _tiny_model()
    prepare_activation_quant_(model, ActQuantConfig(bits=8, dynamic=True, granularity="per_token", symmetric=True))
    x = torch.randn(3, 5, 8)
    assert torch.equal(model[0].input_quantizer(x), codec.fake_quantize(x, 8, block_size=8))


def test_straight_through_gradient():
    x = torch.tensor([-3.0, -0.5, 0.26, 1.0, 2.0], requires_grad=True)
    scale = torch.tensor(1.0 / 127)  # representable range [-1, 1]
    y = fake_quantize_ste(x, scale, None, 8)
    assert torch.equal(y.detach(), fake_quantize_with_qparams(x.detach(), scale, None, 8))
    (y * torch.arange(1.0, 6.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]
    # asymmetric: representable range [(0 - zp) s, (255 - zp) s]
    xa = torch.tensor([-0.2, 0.0, 0.5, 1.1], requires_grad=True)
    s, z = codec.choose_qparams(torch.tensor(-0.1), torch.tensor(1.0), 8, False)
    fake_quantize_ste(xa, s, z, 8).sum().backward()
    assert xa.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


# --------------------------------------------------------------------------------------------
# static / dynamic quantization of layer inputs


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "per_channel", "percentile", "mse", "kl"])
def test_static_quantization_applies_observer_qparams(observer):
    model = _tiny_model()
    ref = copy.deepcopy(model)
    batches = _tiny_batches()
    names = quantize_activations_(model, ActQuantConfig(bits=8, observer=observer, bins=256), batches)
    assert names == ["0", "2"]
    x = torch.randn(4, 8)
    q = model[0].input_quantizer
    axis = -1 if observer == "per_channel" else None
    zp = q.zero_point
    expected_in = fake_quantize_with_qparams(x, q.scale, zp, 8, axis)
    with torch.no_grad():
        got = model[0](x)
        want = ref[0](expected_in)
    assert torch.equal(got, want)
    sq = measure_activation_sqnr(model, batches)
    assert set(sq) == {"0", "2"} and all(10 < v < 80 for v in sq.values())
    # state_dict round trip restores the frozen quantizers
    clone = _tiny_model()
    prepare_activation_quant_(clone, ActQuantConfig(bits=8, observer=observer, bins=256))
    clone.load_state_dict(model.state_dict())
    assert not clone[0].input_quantizer.calibrating
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


def test_bad_input_changes_nothing():
    model = _tiny_model()
    prepare_activation_quant_(model, ActQuantConfig())
    hooks = _all_hooks(model)
    with pytest.raises(ValueError, match="already have"):
        prepare_activation_quant_(model, ActQuantConfig())
    assert _all_hooks(model) == hooks
    # only the first layer sees data: conversion refuses and freezes nothing
    model[0].input_quantizer(torch.randn(2, 8))
    with pytest.raises(ValueError, match="saw no calibration data"):
        convert_activation_quant_(model)
    assert model[0].input_quantizer.calibrating
    assert remove_activation_quant_(model) == ["0", "2"]
    assert _all_hooks(model) == 0 and not hasattr(model[0], "input_quantizer")
    with pytest.raises(ValueError, match="observer must be one of"):
        ActQuantConfig(observer="median")
    with pytest.raises(ValueError, match="bits"):
        ActQuantConfig(bits=6)
    with pytest.raises(ValueError, match="calibration batches"):
        quantize_activations_(model, ActQuantConfig(), None)
    assert _all_hooks(model) == 0


def test_quantization_aware_finetuning_steps():
    torch.manual_seed(0)
    model = _tiny_model()
    batches = _tiny_batches()
    quantize_activations_(model, ActQuantConfig(bits=4, observer="mse", bins=128), batches)
    target = torch.randn(5, 4)
    losses = []
    model.train()
    for _ in range(15):
        loss = ((model(batches[0]) - target) ** 2).mean()
        model.zero_grad()
        loss.backward()
        assert model[0].weight.grad is not None and float(model[0].weight.grad.abs().sum()) > 0
        with torch.no_grad():  # plain SGD (torch.optim would import torch._dynamo, seconds on a busy machine)
            for p in model.parameters():
                p -= 0.05 * p.grad
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_w8a8_with_weight_quantization():
    from gradcomp import quant as weights

    model = _tiny_model()
    batches = _tiny_batches()
    with torch.no_grad():
        ref = torch.cat([model(b) for b in batches])
    weights.quantize_(model, weights.WeightQuantConfig(bits=8))
    names = quantize_activations_(model, ActQuantConfig(bits=8, observer="minmax"), batches)
    assert names == ["0", "2"] and isinstance(model[0].input_quantizer, ActivationQuantizer)
    with torch.no_grad():
        out = torch.cat([model(b) for b in batches])
    assert codec.sqnr_db(ref, out) > 25


# --------------------------------------------------------------------------------------------
# command line


def test_cli_calibrate_json(tmp_path, capsys):
    from gradcomp.cli import main

    rc = main([
        "calibrate", "--model", "test_activations:_tiny_model", "--data", "test_activations:_tiny_batches",
        "--observer", "kl", "--batches", "3", "--json", "--out", str(tmp_path), "--no-plots",
    ])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["observer"] == "kl" and doc["batches"] == 3
    assert {row["layer"] for row in doc["layers"]} == {"0", "2"}
    assert all("sqnr_db" in row and "scale" in row for row in doc["layers"])
    assert (tmp_path / "activations.json").exists() and (tmp_path / "activations.md").exists()
    rc = main(["calibrate", "--model", "test_activations:nothing_here", "--data", "test_activations:_tiny_batches"])
    assert rc == 2


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    from gradcomp.plots.activations import plot_distributions, plot_observer_sqnr, plot_ranges

    report = analyze_activation_dynamics(_tiny_model(), _tiny_batches(), inputs=True)
    a = plot_distributions(report, tmp_path / "d.png", clips={"0:input": {"mse": (-1.0, 1.0)}})
    b = plot_ranges(report, tmp_path / "r.png", layers=["0", "2"])
    c = plot_observer_sqnr({"minmax": {"0": 30.0, "2": 35.0}, "kl": {"0": 33.0, "2": 34.0}}, tmp_path / "s.png")
    for p in (a, b, c):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not in the report"):
        plot_ranges(report, tmp_path / "x.png", layers=["nope"])


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.other = nn.Linear(4, 4)

    def forward(self, x):
        return self.other(self.used(x))


def test_failed_calibration_removes_only_its_own_quantizers():
    model = _Unused()
    prepare_activation_quant_(model, ActQuantConfig(dynamic=True), names="other")
    with pytest.raises(ValueError, match="saw no calibration data"):
        quantize_activations_(model, ActQuantConfig(), [torch.randn(2, 4)], names="*used")
    assert not hasattr(model.used, "input_quantizer") and not hasattr(model.unused, "input_quantizer")
    assert isinstance(model.other.input_quantizer, ActivationQuantizer)
    assert _all_hooks(model) == 1


def test_isolated_sqnr_uses_fp32_inputs():
    model = _tiny_model()
    ref = copy.deepcopy(model)
    batches = _tiny_batches()
    quantize_activations_(model, ActQuantConfig(bits=4, observer="minmax"), batches)
    iso = measure_activation_sqnr(model, batches)
    chained = measure_activation_sqnr(model, batches, isolated=False)
    q2 = model[2].input_quantizer
    with torch.no_grad():
        h = torch.cat([ref[1](ref[0](b)) for b in batches])  # layer 2's fp32 input
    hq = fake_quantize_with_qparams(h, q2.scale, q2.zero_point, 4)
    assert iso["2"] == pytest.approx(codec.sqnr_db(h, hq), rel=1e-6)
    assert iso["0"] == pytest.approx(chained["0"], rel=1e-9)  # the first layer sees fp32 either way
    assert iso["2"] != pytest.approx(chained["2"], rel=1e-6)
    assert not q2.passthrough and not q2.track_error
