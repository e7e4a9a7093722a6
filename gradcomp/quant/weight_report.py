"""Weight analysis: distribution statistics of every layer weight and the error of each config on it."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from gradcomp.batches import progress_bar
from gradcomp.checks import check_number
from gradcomp.codec import cosine_similarity, mse, sqnr_db
from gradcomp.quant.configs import Config, _check_config, config_name
from gradcomp.quant.fake_quant import fake_quantize_weight
from gradcomp.quant.modules import _SUPPORTED, _QuantizedLayer
from gradcomp.quant.serialization import _is_weight_entry, _layer_name
from gradcomp.quant.sizes import weight_bits_per_param

__all__ = ["LayerQuality", "WeightStats", "layer_quality", "weight_stats", "WeightReport", "analyze_weights", "weight_tensors"]


@dataclass(frozen=True)
class LayerQuality:
    """Error of one quantized weight against the original.

    Attributes:
        name: layer name.
        config: config spec string (see :func:`config_name`).
        sqnr_db: ``10 log10(sum w^2 / sum (w - w_hat)^2)``.
        mse: mean squared error.
        cosine: cosine similarity of the flattened weights.
        max_abs_error: largest ``|w - w_hat|``.
        bits_per_weight: real cost with scales and zero points.
        output_snr_db: with calibration data, ``10 log10(||X W^T||^2 / ||X (W - W_hat)^T||^2)``: the
            signal-to-noise ratio of the layer's output on real inputs (NaN without data).
        output_rms_error: with calibration data, the RMS of the layer output's error, in the output's
            own units (NaN without data).
        model_rel_mse: with ``propagate=True``, the model-output error with only this layer quantized:
            the MSE of each model output against the unquantized model's, divided by that output's mean
            square, averaged over the outputs (NaN otherwise).
        model_error_share: per model output, this layer's error over the error with every analysed
            layer quantized with this config; the largest over the outputs (the share of the whole
            model's damage this one layer causes on the output it hurts most).
        model_error_output: the output of that largest share.
    """

    name: str
    config: str
    sqnr_db: float
    mse: float
    cosine: float
    max_abs_error: float
    bits_per_weight: float
    output_snr_db: float = math.nan
    output_rms_error: float = math.nan
    model_rel_mse: float = math.nan
    model_error_share: float = math.nan
    model_error_output: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """Return the fields as a JSON-friendly dict."""
        return dict(self.__dict__)


def layer_quality(weight: torch.Tensor, config: Optional[Config], name: str = "") -> LayerQuality:
    """Measure SQNR, MSE, cosine and max error of ``config`` on ``weight``.

    Example: a Gaussian ``(512, 512)`` weight at int8 per channel gives about 40 dB; int4 g128 about 20 dB.
    """
    approx = fake_quantize_weight(weight, config)
    w = weight.detach()
    return LayerQuality(
        name=name,
        config=config_name(config),
        sqnr_db=sqnr_db(w, approx),
        mse=mse(w, approx),
        cosine=cosine_similarity(w, approx),
        max_abs_error=float((w.double() - approx.double()).abs().max()),
        bits_per_weight=weight_bits_per_param(config, w.shape) if config is not None else 8.0 * w.element_size(),
    )


PERCENTILES = (0.1, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.9)


@dataclass(frozen=True)
class WeightStats:
    """Distribution statistics of one weight tensor.

    Attributes:
        name, shape, numel: which tensor.
        mean, std, min, max, absmax: moments and range.
        percentiles: ``{p: value}`` for ``PERCENTILES`` (nearest rank).
        kurtosis: excess kurtosis ``E[(x-mu)^4]/sigma^4 - 3`` (0 for a Gaussian; heavy tails are large).
        outlier_share: fraction of values with ``|x - mean| > outlier_sigma * std``.
        outlier_sigma: the threshold in standard deviations.
        hist_counts, hist_edges: a histogram over ``[min, max]``.
    """

    name: str
    shape: Tuple[int, ...]
    numel: int
    mean: float
    std: float
    min: float
    max: float
    absmax: float
    percentiles: Dict[str, float]
    kurtosis: float
    outlier_share: float
    outlier_sigma: float
    hist_counts: List[int] = field(repr=False)
    hist_edges: List[float] = field(repr=False)

    def to_dict(self, histogram: bool = False) -> Dict[str, Any]:
        """Return a JSON-friendly dict (the histogram only when asked)."""
        d = dict(self.__dict__)
        d["shape"] = list(self.shape)
        if not histogram:
            d.pop("hist_counts")
            d.pop("hist_edges")
        return d


def weight_stats(weight: torch.Tensor, name: str = "", *, outlier_sigma: float = 3.0, bins: int = 64) -> WeightStats:
    """Compute distribution statistics of a weight (vectorised, in fp64).

    Example: for a Gaussian weight kurtosis is about 0 and ``outlier_share`` about 0.0027 at 3 sigma.

    Args:
        weight: floating tensor.
        name: label.
        outlier_sigma: threshold of the outlier share, in standard deviations.
        bins: histogram bins.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.numel() == 0:
        raise TypeError(f"weight must be a non-empty floating tensor, got {type(weight).__name__}")
    check_number("outlier_sigma", outlier_sigma, low=0.0, low_open=True)
    x = weight.detach().reshape(-1).double()
    n = x.numel()
    mean = float(x.mean())
    c = x - mean
    var = float((c * c).mean())
    std = math.sqrt(var)
    kurt = float((c**4).mean()) / (var * var) - 3.0 if var > 0 else 0.0
    srt = torch.sort(x).values
    idx = torch.tensor([min(n - 1, max(0, math.ceil(p / 100.0 * n) - 1)) for p in PERCENTILES])
    pv = srt[idx].tolist()
    lo, hi = float(srt[0]), float(srt[-1])
    outl = float((c.abs() > outlier_sigma * std).double().mean()) if std > 0 else 0.0
    counts = torch.histc(x, bins=bins, min=lo, max=hi if hi > lo else lo + 1.0)
    edges = torch.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    return WeightStats(
        name=name, shape=tuple(weight.shape), numel=n, mean=mean, std=std, min=lo, max=hi,
        absmax=max(abs(lo), abs(hi)), percentiles={f"p{p:g}": v for p, v in zip(PERCENTILES, pv)},
        kurtosis=kurt, outlier_share=outl, outlier_sigma=float(outlier_sigma),
        hist_counts=[int(v) for v in counts.tolist()], hist_edges=[float(v) for v in edges.tolist()],
    )


def weight_tensors(source: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Return ``layer name -> weight`` of a model (its supported layers) or a state_dict (``*.weight``, 2+ dims).

    Quantized layers of a model give their dequantized weight; a weight shared by several layers
    (tied embeddings) is listed once, under its first name.
    """
    if isinstance(source, nn.Module):
        out = {}
        seen = set()
        for fqn, m in source.named_modules():
            held = m.packed if isinstance(m, _QuantizedLayer) else getattr(m, "weight", None)
            if not isinstance(m, (_QuantizedLayer,) + _SUPPORTED) or id(held) in seen:
                continue
            seen.add(id(held))
            out[fqn] = m.packed.dequantize() if isinstance(m, _QuantizedLayer) else m.weight.detach()
        return out
    if isinstance(source, Mapping):
        return {_layer_name(k): v for k, v in source.items() if _is_weight_entry(k, v)}
    raise TypeError(f"source must be an nn.Module or a state_dict mapping, got {type(source).__name__}")


@dataclass
class WeightReport:
    """Per-layer statistics and quantization quality for a list of configs.

    Attributes:
        configs: the config spec strings, in order.
        stats: one :class:`WeightStats` per layer.
        quality: ``quality[layer][config]`` -> :class:`LayerQuality`.
    """

    configs: List[str]
    stats: List[WeightStats]
    quality: Dict[str, Dict[str, LayerQuality]]
    data_driven: bool = False
    flags: List[Dict[str, Any]] = field(default_factory=list)
    propagated: bool = False
    model_rel_mse: Dict[str, float] = field(default_factory=dict)
    model_rel_mse_per_output: Dict[str, Dict[str, float]] = field(default_factory=dict)

    @property
    def note(self) -> str:
        """What the numbers mean: SQNR is a proxy; the output error (with data) is the damage."""
        if not self.data_driven:
            return ("SQNR measures each weight alone and is a proxy for damage: a layer whose few inputs are large "
                    "(or whose output feeds the result directly) can be hurt badly at a high SQNR. Give calibration "
                    "data (a model and batches) for each layer's output error on real inputs.")
        text = (f"output_snr is the layer's output signal-to-noise ratio on the calibration inputs; "
                f"{sum(f['kind'] == 'output_snr' for f in self.flags)} layer/config pairs look safe by weight SQNR but "
                "lose much more on their outputs (flags of kind 'output_snr').")
        if not self.propagated:
            return text + (" A relative output error does not show a layer whose output feeds the result directly "
                           "(per-element reference energies): propagate=True measures each layer's share of the "
                           "model-output error.")
        return text + (f" model_share is the model-output error with only that layer quantized over the error with "
                       f"every layer quantized; {sum(f['kind'] == 'model_output' for f in self.flags)} layer/config "
                       "pairs cause a large share of it alone (flags of kind 'model_output').")

    def summary(self) -> List[Dict[str, Any]]:
        """Per config: median / min / mean SQNR over layers, worst layer, and bits per weight over all layers."""
        rows = []
        numel = {s.name: s.numel for s in self.stats}
        total = sum(numel.values())
        for c in self.configs:
            q = [self.quality[s.name][c] for s in self.stats]
            worst = min(q, key=lambda x: x.sqnr_db)
            rows.append({
                "config": c,
                "layers": len(q),
                "median_sqnr_db": statistics.median(x.sqnr_db for x in q) if q else math.nan,
                "min_sqnr_db": worst.sqnr_db,
                "worst_layer": worst.name,
                "mean_cosine": float(torch.tensor([x.cosine for x in q], dtype=torch.float64).mean()) if q else math.nan,
                "bits_per_weight": sum(x.bits_per_weight * numel[x.name] for x in q) / total if total else math.nan,
            })
        return rows

    def rows(self) -> List[Dict[str, Any]]:
        """One flat row per layer: shape, std, kurtosis, outlier share, and SQNR per config."""
        out = []
        for s in self.stats:
            r = {"layer": s.name, "shape": "x".join(map(str, s.shape)), "std": s.std, "absmax": s.absmax,
                 "kurtosis": s.kurtosis, "outliers": s.outlier_share}
            for c in self.configs:
                r[f"sqnr[{c}]"] = self.quality[s.name][c].sqnr_db
                if self.data_driven:
                    r[f"out_snr[{c}]"] = self.quality[s.name][c].output_snr_db
                if self.propagated:
                    r[f"model_share[{c}]"] = self.quality[s.name][c].model_error_share
            out.append(r)
        return out

    def to_json(self, histogram: bool = False) -> Dict[str, Any]:
        """Return the whole report as a JSON-friendly dict."""
        return {
            "configs": list(self.configs),
            "data_driven": self.data_driven,
            "note": self.note,
            "flags": list(self.flags),
            "propagated": self.propagated,
            "model_rel_mse": dict(self.model_rel_mse),
            "model_rel_mse_per_output": {c: dict(v) for c, v in self.model_rel_mse_per_output.items()},
            "summary": self.summary(),
            "layers": [
                {"stats": s.to_dict(histogram), "quality": {c: self.quality[s.name][c].to_dict() for c in self.configs}}
                for s in self.stats
            ],
        }


def analyze_weights(
    source: Union[nn.Module, Mapping[str, torch.Tensor]],
    configs: Sequence[Optional[Config]],
    *,
    outlier_sigma: float = 3.0,
    progress: bool = False,
    calibration: Optional[Iterable[Any]] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    num_batches: Optional[int] = None,
    flag_gap_db: float = 10.0,
    propagate: bool = False,
    flag_share: float = 0.25,
) -> WeightReport:
    """Compute statistics and the quality of each config for every layer weight of a model or state_dict.

    With calibration data (``source`` a model), every Linear layer also gets its output error on real
    inputs: ``X`` its inputs over the batches, ``D = W_hat - W``, output SNR
    ``10 log10(||X W^T||^2 / ||X D^T||^2)`` and the RMS of ``X D^T``. A layer is flagged when its weight
    SQNR is at least the median over layers (it looks safe) but its output SNR is more than
    ``flag_gap_db`` below its SQNR: its error lands on the inputs that matter (a few large input
    features, as per-element reference energies have), which SQNR, weighing every weight alike, misses.

    A relative output error still misses a layer whose output goes straight into the result: a lookup
    of per-element reference energies (values up to 16 eV, one int8 scale) has an output SNR as good
    as its SQNR, yet its absolute error is the whole model's. With ``propagate=True`` the report
    measures the damage where it lands, at the model's outputs: for each config, the model-output
    error (``rel_mse``: each output's MSE over its own power) with every analysed layer quantized, and
    with each layer quantized alone; per output the ratio is the layer's share, and a layer whose
    share on some output is at least ``flag_share`` is flagged (kind ``model_output``). Shares are per
    output because a sum over outputs hides an output whose error is small next to its power (an
    energy with a large offset) while one layer causes all of it. Cost: ``(layers + 1) * configs`` passes over the calibration batches.

    Example: a weight ``[[1.0, 0.01]]`` whose second input is always 1000x the first loses almost
    nothing in SQNR if only ``0.01`` is rounded badly, but its output SNR drops by ~60 dB.

    Args:
        source: a model or a state_dict (see :func:`weight_tensors`).
        configs: configs to measure (e.g. int8 per channel, int4 g128 asym).
        outlier_sigma: threshold of the outlier share.
        progress: show a tqdm progress bar over the layers on stderr.
        calibration: batches for the output error (needs ``source`` to be a model).
        forward: ``forward(model, batch)`` for the batches (default ``model(batch)``).
        num_batches: use at most this many batches.
        flag_gap_db: SQNR minus output SNR above which a safe-looking layer is flagged.
        propagate: measure each layer's share of the model-output error (needs a model and data).
        flag_share: the share of the model-output error above which a layer is flagged.

    Returns:
        A :class:`WeightReport`.
    """
    if not configs:
        raise ValueError("configs must list at least one config")
    for c in configs:
        if c is not None:
            _check_config(c)
    names = [config_name(c) for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configs must be distinct, got {names}")
    if calibration is not None and not isinstance(source, nn.Module):
        raise TypeError(f"the output error needs the model (an nn.Module) with calibration data, got {type(source).__name__}")
    check_number("flag_share", flag_share, low=0.0, high=1.0)
    if propagate and calibration is None:
        raise ValueError("propagate=True measures model outputs: give the model and calibration batches")
    if calibration is not None:
        calibration = list(calibration)[: num_batches if num_batches is not None else None]
    weights = weight_tensors(source)
    if not weights:
        raise ValueError("found no layer weights to analyse (Linear/Embedding/Conv2d, or '*.weight' tensors with 2+ dims)")
    hessians: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    if calibration is not None:
        from gradcomp.quant.algorithms.calibration import collect_input_hessians

        linears = {n: m for n, m in source.named_modules() if isinstance(m, nn.Linear) and n in weights}
        hessians = collect_input_hessians(source, linears, calibration, forward=forward, num_batches=num_batches, counts=counts)
    stats, quality = [], {}
    items = list(weights.items())
    for name, w in progress_bar(items, progress, "analyze", unit="layer"):
        stats.append(weight_stats(w, name, outlier_sigma=outlier_sigma))
        quality[name] = {}
        for n, c in zip(names, configs):
            lq = layer_quality(w, c, name)
            if name in hessians:
                lq = _with_output_error(lq, w, c, hessians[name], counts[name])
            quality[name][n] = lq
    report = WeightReport(names, stats, quality, data_driven=bool(hessians))
    if hessians:
        for n in names:
            sq = [quality[s.name][n].sqnr_db for s in stats if s.name in hessians and math.isfinite(quality[s.name][n].sqnr_db)]
            if not sq:
                continue
            median = statistics.median(sq)
            for s in stats:
                lq = quality[s.name][n]
                if s.name in hessians and lq.sqnr_db >= median and lq.sqnr_db - lq.output_snr_db > flag_gap_db:
                    report.flags.append({
                        "kind": "output_snr", "layer": s.name, "config": n, "sqnr_db": lq.sqnr_db, "output_snr_db": lq.output_snr_db,
                        "output_rms_error": lq.output_rms_error,
                        "why": (f"weight SQNR {lq.sqnr_db:.1f} dB (median {median:.1f}) looks safe, but the output SNR on real "
                                f"inputs is {lq.output_snr_db:.1f} dB: the error sits on the inputs that carry the signal"),
                    })
    if propagate:
        _propagate(report, source, dict(zip(names, configs)), calibration, forward, flag_share, progress)
    return report


def _model_outputs(model: nn.Module, batches: Sequence[Any], forward) -> List[Dict[str, torch.Tensor]]:
    """Run the batches (eval mode, no autograd unless ``forward`` turns it on); return each one's outputs."""
    from gradcomp.batches import call_model, output_tensors

    call = forward or call_model
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [{k: v.double() for k, v in output_tensors(call(model, b)).items()} for b in batches]
    finally:
        model.train(was)


def _rel_mse(got: Sequence[Mapping[str, torch.Tensor]], ref: Sequence[Mapping[str, torch.Tensor]], power: Mapping[str, float]) -> Dict[str, float]:
    """Per output: its MSE over all batches divided by its power (mean square)."""
    out = {}
    for k, p in power.items():
        se = sum(float(((g[k] - r[k]) ** 2).sum()) for g, r in zip(got, ref))
        n = sum(r[k].numel() for r in ref)
        out[k] = (se / max(n, 1)) / (p if p > 0 else 1.0)
    return out


def _propagate(report: WeightReport, model: nn.Module, configs: Mapping[str, Optional[Config]], batches, forward,
               flag_share: float, progress: bool) -> None:
    """Fill ``model_rel_mse`` / ``model_error_share`` and add the ``model_output`` flags (see :func:`analyze_weights`)."""
    from dataclasses import replace

    params = {}
    for s in report.stats:
        try:
            m = model.get_submodule(s.name)
        except AttributeError:
            continue
        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.is_floating_point():
            params[s.name] = m.weight
    ref = _model_outputs(model, batches, forward)
    power = {k: sum(float((r[k] ** 2).sum()) for r in ref) / max(sum(r[k].numel() for r in ref), 1) for k in ref[0]}
    originals = {n: w.detach().clone() for n, w in params.items()}

    def run_with(quantized: Mapping[str, Optional[Config]]) -> Dict[str, float]:
        try:
            with torch.no_grad():
                for n, c in quantized.items():
                    params[n].copy_(fake_quantize_weight(originals[n], c).to(params[n].dtype))
            return _rel_mse(_model_outputs(model, batches, forward), ref, power)
        finally:
            with torch.no_grad():
                for n in quantized:
                    params[n].copy_(originals[n])

    steps = [(c, None) for c in configs] + [(c, n) for c in configs for n in params]
    totals: Dict[str, Dict[str, float]] = {}
    for cname, layer in progress_bar(steps, progress, "propagate", unit="trial"):
        cfg = configs[cname]
        if layer is None:
            totals[cname] = run_with({n: cfg for n in params})
            continue
        per = run_with({layer: cfg})
        err = sum(per.values()) / len(per)
        # the share per output: an output whose error is small next to its power (an energy with a
        # large offset) would vanish in a sum over outputs, yet this layer may cause all of it
        shares = {k: per[k] / totals[cname][k] if totals[cname][k] > 0 else math.nan for k in per}
        key = max(shares, key=lambda k: -math.inf if math.isnan(shares[k]) else shares[k])
        share = shares[key]
        lq = replace(report.quality[layer][cname], model_rel_mse=err, model_error_share=share, model_error_output=key)
        report.quality[layer][cname] = lq
        if share >= flag_share:
            median = statistics.median(q[cname].sqnr_db for q in report.quality.values())
            looks = "look safe" if lq.sqnr_db >= median else "are low too"
            report.flags.append({
                "kind": "model_output", "layer": layer, "config": cname, "sqnr_db": lq.sqnr_db, "output_snr_db": lq.output_snr_db,
                "output_rms_error": lq.output_rms_error, "model_rel_mse": err, "model_error_share": share, "model_output": key,
                "why": (f"quantized alone, this layer causes {share:.0%} of the error of output {key!r} with every layer "
                        f"quantized ({per[key]:.3g} vs {totals[cname][key]:.3g} rel. MSE), while its weight SQNR "
                        f"({lq.sqnr_db:.1f} dB) and output SNR ({lq.output_snr_db:.1f} dB) {looks}: its output feeds the "
                        "result with little averaging (e.g. per-element reference values), so its absolute error is the model's error"),
            })
    report.propagated = True
    report.model_rel_mse = {c: sum(t.values()) / len(t) for c, t in totals.items()}
    report.model_rel_mse_per_output = totals


def _with_output_error(lq: LayerQuality, w: torch.Tensor, config: Optional[Config], h: torch.Tensor, rows: int) -> LayerQuality:
    from dataclasses import replace

    approx = fake_quantize_weight(w, config).double().reshape(w.shape[0], -1)
    wd = w.detach().double().reshape(w.shape[0], -1)
    d = approx - wd
    noise = float(((d @ h) * d).sum())
    signal = float(((wd @ h) * wd).sum())
    snr = math.inf if noise == 0 else (-math.inf if signal == 0 else 10.0 * math.log10(signal / noise))
    return replace(lq, output_snr_db=snr, output_rms_error=math.sqrt(max(noise, 0.0) / max(rows * w.shape[0], 1)))
