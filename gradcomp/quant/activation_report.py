"""Capture of activation statistics: running per-layer statistics over batches, and the report.

Forward hooks on chosen modules feed running per-layer statistics (min, max, mean, std, kurtosis,
percentiles, share of outliers, per-channel ranges, a per-batch trace) without keeping any
activation tensor. The result is an :class:`ActivationReport` (table rows, JSON, plots in
``gradcomp.plots.activations``).

Example::

    >>> report = analyze_activation_dynamics(model, batches)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from gradcomp.checks import check_int, check_number
from gradcomp.quant._util import channel_minmax, finite_flat, norm_axis
from gradcomp.quant.activation_quant import _channel_axis_for, _select_modules, run_batches
from gradcomp.quant.histogram import RunningHistogram

__all__ = ["LayerStats", "ActivationReport", "ActivationCapture", "capture_activations", "analyze_activation_dynamics"]


_PERCENTILES = (0.01, 0.1, 1.0, 50.0, 99.0, 99.9, 99.99)


class _Moments:
    """Count, mean and central moments M2..M4, merged batch by batch (Chan/Pébay), in fp64."""

    def __init__(self) -> None:
        self.n = 0.0
        self.mean = 0.0
        self.m2 = 0.0
        self.m3 = 0.0
        self.m4 = 0.0

    def update(self, flat: torch.Tensor) -> Tuple[float, float]:
        """Merge a batch; return its mean and std."""
        x = flat.double()
        nb = float(x.numel())
        mb = float(x.mean())
        d = x - mb
        d2 = d * d
        m2b = float(d2.sum())
        m3b = float((d2 * d).sum())
        m4b = float((d2 * d2).sum())
        na, ma = self.n, self.mean
        n = na + nb
        delta = mb - ma
        self.mean = ma + delta * nb / n
        self.m4 = (
            self.m4 + m4b
            + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6 * delta**2 * (na * na * m2b + nb * nb * self.m2) / n**2
            + 4 * delta * (na * m3b - nb * self.m3) / n
        )
        self.m3 = self.m3 + m3b + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * m2b - nb * self.m2) / n
        self.m2 = self.m2 + m2b + delta**2 * na * nb / n
        self.n = n
        return mb, math.sqrt(m2b / nb)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else math.nan

    @property
    def kurtosis(self) -> float:
        """Pearson kurtosis ``n M4 / M2^2`` (3 for a Gaussian)."""
        return self.n * self.m4 / (self.m2 * self.m2) if self.m2 > 0 else math.nan


class _Recorder:
    """Running statistics of one captured tensor stream."""

    def __init__(self, name: str, module_name: str, kind: str, channel_axis: int, bins: int, outlier_sigma: float):
        self.name = name
        self.module_name = module_name
        self.kind = kind
        self.channel_axis = channel_axis
        self.outlier_sigma = outlier_sigma
        self.hist = RunningHistogram(bins)
        self.moments = _Moments()
        self.min = math.inf
        self.max = -math.inf
        self.nonfinite = 0
        self.outliers = 0.0
        self.ch_min: Optional[torch.Tensor] = None
        self.ch_max: Optional[torch.Tensor] = None
        self.shape: Tuple[int, ...] = ()
        self.dtype = ""
        self.trace: Dict[str, List[float]] = {k: [] for k in ("min", "max", "mean", "std", "absmax", "outliers")}

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.shape = tuple(x.shape)
        self.dtype = str(x.dtype).replace("torch.", "")
        flat = finite_flat(x)
        self.nonfinite += x.numel() - flat.numel()
        if flat.numel() == 0:
            return
        lo, hi = torch.aminmax(flat)
        lo, hi = float(lo), float(hi)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        mean_b, std_b = self.moments.update(flat)
        out_b = float(((flat - mean_b).abs() > self.outlier_sigma * std_b).sum()) if std_b > 0 else 0.0
        self.outliers += out_b
        self.hist.update(flat)
        if x.dim() >= 2:
            ax = norm_axis(self.channel_axis, x.dim()) if -x.dim() <= self.channel_axis < x.dim() else x.dim() - 1
            cmin, cmax = channel_minmax(x, ax)
            if self.ch_min is None or self.ch_min.numel() != cmin.numel():
                self.ch_min, self.ch_max = cmin, cmax
            else:
                self.ch_min = torch.minimum(self.ch_min, cmin)
                self.ch_max = torch.maximum(self.ch_max, cmax)
        t = self.trace
        t["min"].append(lo)
        t["max"].append(hi)
        t["mean"].append(mean_b)
        t["std"].append(std_b)
        t["absmax"].append(max(abs(lo), abs(hi)))
        t["outliers"].append(out_b / flat.numel())

    def finish(self) -> "LayerStats":
        m = self.moments
        if m.n == 0:
            percentiles = {p: math.nan for p in _PERCENTILES}
            hist_counts: List[float] = []
            hist_range = (math.nan, math.nan)
        else:
            q = self.hist.quantile(torch.tensor(_PERCENTILES, dtype=torch.float64) / 100.0)
            percentiles = {p: float(v) for p, v in zip(_PERCENTILES, q)}
            hist_counts = self.hist.counts.tolist()
            hist_range = (float(self.hist.lo), float(self.hist.hi))
        ch_min = [] if self.ch_min is None else self.ch_min.tolist()
        ch_max = [] if self.ch_max is None else self.ch_max.tolist()
        return LayerStats(
            name=self.name,
            module=self.module_name,
            kind=self.kind,
            shape=self.shape,
            dtype=self.dtype,
            count=int(m.n),
            nonfinite=int(self.nonfinite),
            min=self.min if m.n else math.nan,
            max=self.max if m.n else math.nan,
            mean=m.mean if m.n else math.nan,
            std=m.std,
            kurtosis=m.kurtosis,
            outlier_share=self.outliers / m.n if m.n else math.nan,
            outlier_sigma=self.outlier_sigma,
            percentiles=percentiles,
            channel_axis=self.channel_axis,
            channel_min=ch_min,
            channel_max=ch_max,
            histogram=hist_counts,
            histogram_range=hist_range,
            trace={k: list(v) for k, v in self.trace.items()},
        )


def _first_float(obj: Any) -> Optional[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if isinstance(obj, (tuple, list)):
        for item in obj:
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                return item
    return None


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one captured stream (a module's output or input) over all batches.

    ``trace`` holds one value per forward call for ``min``, ``max``, ``mean``, ``std``, ``absmax``
    and ``outliers`` (share beyond ``outlier_sigma`` standard deviations of that call's mean).
    Percentiles (keys in percent) and the histogram come from the :class:`RunningHistogram`.
    """

    name: str
    module: str
    kind: str
    shape: Tuple[int, ...]
    dtype: str
    count: int
    nonfinite: int
    min: float
    max: float
    mean: float
    std: float
    kurtosis: float
    outlier_share: float
    outlier_sigma: float
    percentiles: Dict[float, float]
    channel_axis: int
    channel_min: List[float]
    channel_max: List[float]
    histogram: List[float]
    histogram_range: Tuple[float, float]
    trace: Dict[str, List[float]] = field(default_factory=dict)

    @property
    def batches(self) -> int:
        """Forward calls recorded."""
        return len(self.trace.get("min", []))

    @property
    def channel_range_ratio(self) -> float:
        """Widest channel range over the median channel range (how much per-channel scales would help)."""
        if not self.channel_min:
            return math.nan
        r = torch.tensor(self.channel_max) - torch.tensor(self.channel_min)
        med = float(r.median())
        return float(r.max()) / med if med > 0 else math.inf

    def dynamics(self) -> Dict[str, float]:
        """Summarise how the range and spread move across batches.

        Returns:
            ``absmax_mean``, ``absmax_cv`` (std / mean of the per-batch absmax), ``range_drift``
            (widest over narrowest per-batch range), ``std_cv``, ``range_use`` (mean per-batch range
            over the global range: what a static scale wastes on a typical batch), ``mean_drift``
            (std of the per-batch means over the global std).
        """
        t = self.trace
        if not t.get("min"):
            return {k: math.nan for k in ("absmax_mean", "absmax_cv", "range_drift", "std_cv", "range_use", "mean_drift")}
        mn, mx = torch.tensor(t["min"], dtype=torch.float64), torch.tensor(t["max"], dtype=torch.float64)
        am, sd, me = (torch.tensor(t[k], dtype=torch.float64) for k in ("absmax", "std", "mean"))
        rng = mx - mn
        glob = self.max - self.min

        def cv(v: torch.Tensor) -> float:
            mu = float(v.mean())
            return float(v.std(unbiased=False)) / mu if mu > 0 else math.nan

        return {
            "absmax_mean": float(am.mean()),
            "absmax_cv": cv(am),
            "range_drift": float(rng.max() / rng.min()) if float(rng.min()) > 0 else math.inf,
            "std_cv": cv(sd),
            "range_use": float(rng.mean()) / glob if glob > 0 else math.nan,
            "mean_drift": float(me.std(unbiased=False)) / self.std if self.std > 0 else math.nan,
        }

    def row(self) -> Dict[str, Any]:
        """A flat table row: range, spread, tails and dynamics."""
        d = self.dynamics()
        return {
            "layer": self.name,
            "shape": "x".join(str(s) for s in self.shape),
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
            "p0.01": self.percentiles.get(0.01, math.nan),
            "p99.99": self.percentiles.get(99.99, math.nan),
            "kurtosis": self.kurtosis,
            "outliers%": 100.0 * self.outlier_share,
            "ch_ratio": self.channel_range_ratio,
            "absmax_cv": d["absmax_cv"],
            "range_use": d["range_use"],
        }

    def to_dict(self, include_histogram: bool = True) -> Dict[str, Any]:
        """A JSON-ready dict (percentile keys as strings such as ``"p99.9"``)."""
        out: Dict[str, Any] = {
            "name": self.name,
            "module": self.module,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "batches": self.batches,
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
            "kurtosis": self.kurtosis,
            "outlier_share": self.outlier_share,
            "outlier_sigma": self.outlier_sigma,
            "percentiles": {f"p{p:g}": v for p, v in self.percentiles.items()},
            "channel_axis": self.channel_axis,
            "channel_range_ratio": self.channel_range_ratio,
            "dynamics": self.dynamics(),
            "trace": self.trace,
        }
        if include_histogram:
            out["channel_min"] = self.channel_min
            out["channel_max"] = self.channel_max
            out["histogram"] = {"range": list(self.histogram_range), "counts": self.histogram}
        return out


@dataclass(frozen=True)
class ActivationReport:
    """Per-layer activation statistics from a capture, in capture order.

    Example::

        >>> report = analyze_activation_dynamics(model, batches)
        >>> print(format_table(report.rows()))            # gradcomp.cli._common.format_table
        >>> json.dump(report.to_dict(), fh)
    """

    layers: Dict[str, LayerStats]
    batches: int

    def rows(self) -> List[Dict[str, Any]]:
        """One table row per layer (see :meth:`LayerStats.row`)."""
        return [s.row() for s in self.layers.values()]

    def dynamics_rows(self) -> List[Dict[str, Any]]:
        """One row per layer with how its range and spread move across batches."""
        return [{"layer": s.name, "batches": s.batches, **s.dynamics()} for s in self.layers.values()]

    def to_dict(self, include_histogram: bool = True) -> Dict[str, Any]:
        """A JSON-ready dict: ``{"batches": n, "layers": {name: ...}}``."""
        return {"batches": self.batches, "layers": {k: v.to_dict(include_histogram) for k, v in self.layers.items()}}


class ActivationCapture:
    """Context manager that records running statistics of chosen modules' outputs (and inputs).

    Modules are chosen by class (``types``) and by name (``names``: exact name, glob or
    ``re:<regex>``, as in :mod:`gradcomp.quant.rules`); both must match when both are given.
    Hooks are registered on entry and always removed on exit, also when the block raises. Nothing but running statistics is kept.

    Example::

        >>> with ActivationCapture(model, types=(nn.Linear,), inputs=True) as cap:
        ...     cap.run(batches, progress=True)           # or call model yourself
        >>> report = cap.report()

    Args:
        model: the model.
        types: module classes; None: :func:`default_layer_types` (``(nn.Module,)`` for any class).
        names: pattern(s) the module name must match (exact name, glob or ``re:<regex>``).
        exclude: pattern(s) of names to skip.
        outputs: record module outputs (key: the module name).
        inputs: record the first input too (key: ``"<name>:input"``).
        bins: histogram bins per stream.
        outlier_sigma: distance from the batch mean, in batch standard deviations, beyond which a
            value counts as an outlier.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        types: Optional[Sequence[type]] = None,
        names: Union[None, str, Sequence[str]] = None,
        exclude: Union[None, str, Sequence[str]] = None,
        outputs: bool = True,
        inputs: bool = False,
        bins: int = 2048,
        outlier_sigma: float = 6.0,
    ):
        if not (outputs or inputs):
            raise ValueError("at least one of outputs and inputs must be recorded")
        check_int("bins", bins, 2)
        check_number("outlier_sigma", outlier_sigma, low=0.0, low_open=True)
        self.model = model
        self.modules = _select_modules(model, types, names, exclude)
        self.outputs = outputs
        self.inputs = inputs
        self.bins = bins
        self.outlier_sigma = float(outlier_sigma)
        self._recorders: Dict[str, _Recorder] = {}
        self._handles: List[Any] = []
        self._batches = 0

    def _recorder(self, key: str, module_name: str, kind: str, channel_axis: int) -> _Recorder:
        rec = self._recorders.get(key)
        if rec is None:
            rec = _Recorder(key, module_name, kind, channel_axis, self.bins, self.outlier_sigma)
            self._recorders[key] = rec
        return rec

    def __enter__(self) -> "ActivationCapture":
        if self._handles:
            raise RuntimeError("this capture is already active")
        try:
            for name, module in self.modules:
                axis = _channel_axis_for(module)
                if self.inputs:
                    self._recorder(f"{name}:input", name, "input", axis)
                if self.outputs:
                    self._recorder(name, name, "output", axis)
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        except BaseException:
            self.close()
            raise
        return self

    def _make_hook(self, name: str):
        def hook(module, args, output):
            if self.inputs and args:
                x = _first_float(args[0])
                if x is not None:
                    self._recorders[f"{name}:input"].update(x)
            if self.outputs:
                y = _first_float(output)
                if y is not None:
                    self._recorders[name].update(y)

        return hook

    def close(self) -> None:
        """Remove every hook (safe to call more than once)."""
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def run(
        self,
        batches: Iterable[Any],
        *,
        forward: Optional[Callable[[nn.Module, Any], Any]] = None,
        num_batches: Optional[int] = None,
        progress: bool = False,
    ) -> int:
        """Run batches through the model (see :func:`run_batches`); return how many ran."""
        if not self._handles:
            raise RuntimeError("run() must be called inside the `with` block")
        n = run_batches(self.model, batches, forward=forward, num_batches=num_batches, progress=progress, desc="capture")
        self._batches += n
        return n

    def report(self) -> ActivationReport:
        """Return the statistics gathered so far."""
        return ActivationReport({k: r.finish() for k, r in self._recorders.items()}, self._batches)


def capture_activations(model: nn.Module, **kwargs: Any) -> ActivationCapture:
    """Return an :class:`ActivationCapture` (use it in a ``with`` block); keyword arguments as there."""
    return ActivationCapture(model, **kwargs)


def analyze_activation_dynamics(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: Optional[int] = 10,
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    progress: bool = False,
    **capture_kwargs: Any,
) -> ActivationReport:
    """Capture per-layer statistics over ``num_batches`` batches and return the report.

    Args:
        model: the model (run in eval mode without gradients; its mode is restored).
        batches: iterable of batches (see :func:`run_batches`).
        num_batches: how many to use (None: all).
        forward: custom ``forward(model, batch)``.
        progress: tqdm bar on stderr.
        **capture_kwargs: ``types``, ``names``, ``exclude``, ``outputs``, ``inputs``, ``bins``,
            ``outlier_sigma`` of :class:`ActivationCapture`.
    """
    with ActivationCapture(model, **capture_kwargs) as cap:
        cap.run(batches, forward=forward, num_batches=num_batches, progress=progress)
    return cap.report()
