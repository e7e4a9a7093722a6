"""Pictures of activation statistics: per-layer distributions, ranges across batches, observer SQNR."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

from gradcomp.plots import require_matplotlib

__all__ = ["plot_distributions", "plot_ranges", "plot_observer_sqnr"]

PathLike = Union[str, Path]


def _grid(n: int, cols: Optional[int] = None) -> Tuple[int, int]:
    # the grid grows with the layer count: 4 columns up to 16 panels, then about sqrt(n), at most 8
    if cols is None:
        cols = 4 if n <= 16 else min(8, int(math.ceil(math.sqrt(n))))
    cols = max(1, min(cols, n))
    return int(math.ceil(n / cols)), cols


def _pick(report, layers: Optional[Sequence[str]], max_layers: Optional[int]) -> List[str]:
    names = list(layers) if layers is not None else list(report.layers)
    unknown = [n for n in names if n not in report.layers]
    if unknown:
        raise ValueError(f"layers not in the report: {unknown[:5]}; it has {list(report.layers)[:8]}")
    if not names:
        raise ValueError("the report has no layer to plot")
    return names if max_layers is None else names[:max_layers]


def plot_distributions(
    report,
    path: PathLike,
    *,
    layers: Optional[Sequence[str]] = None,
    clips: Optional[Mapping[str, Mapping[str, Tuple[float, float]]]] = None,
    max_layers: Optional[int] = None,
    display_bins: int = 256,
) -> Path:
    """Draw each layer's histogram (log counts) with its min/max and, optionally, observer clip ranges.

    Args:
        report: an :class:`gradcomp.quant.ActivationReport`.
        path: PNG file to write.
        layers: which streams (default: all, in capture order).
        clips: ``{layer: {observer name: (lo, hi)}}`` drawn as dashed vertical lines.
        max_layers: at most this many panels (default: every layer; the grid grows to fit).
        display_bins: neighbouring bins are merged down to at most this many per panel.

    Returns:
        The path written.
    """
    plt = require_matplotlib()
    import numpy as np

    names = _pick(report, layers, max_layers)
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, names):
        st = report.layers[name]
        counts = np.asarray(st.histogram, dtype=float)
        if counts.size:
            # merge neighbouring bins down to at most `display_bins` so the shape stays readable
            factor = int(math.ceil(counts.size / display_bins))
            pad = (-counts.size) % factor
            merged = np.concatenate([counts, np.zeros(pad)]).reshape(-1, factor).sum(axis=1)
            lo, hi = st.histogram_range
            edges = lo + (hi - lo) / counts.size * factor * np.arange(merged.size + 1)
            edges[-1] = hi
            ax.stairs(np.where(merged >= 0.5, merged, 0.0), edges, fill=True, alpha=0.6)
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.5)
        for i, (obs, (clo, chi)) in enumerate(sorted((clips or {}).get(name, {}).items())):
            c = colors[(i + 1) % len(colors)]
            ax.axvline(clo, color=c, ls="--", lw=1, label=obs)
            ax.axvline(chi, color=c, ls="--", lw=1)
        ax.set_title(f"{name}\nkurtosis {st.kurtosis:.1f}, outliers {100 * st.outlier_share:.3f}%", fontsize=8)
        ax.tick_params(labelsize=7)
        if clips and name in clips:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"activation distributions over {report.batches} batches (log counts)", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_ranges(report, path: PathLike, *, layers: Optional[Sequence[str]] = None, max_layers: Optional[int] = None) -> Path:
    """Draw each layer's per-batch min/max band, mean ± std and absmax across batches.

    Args:
        report: an :class:`gradcomp.quant.ActivationReport`.
        path: PNG file to write.
        layers: which streams (default: all).
        max_layers: at most this many panels (default: every layer; the grid grows to fit).

    Returns:
        The path written.
    """
    plt = require_matplotlib()
    import numpy as np

    names = _pick(report, layers, max_layers)
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        st = report.layers[name]
        t = st.trace
        if not t.get("min"):
            ax.set_title(f"{name} (no data)", fontsize=8)
            continue
        b = np.arange(len(t["min"]))
        mn, mx = np.asarray(t["min"]), np.asarray(t["max"])
        me, sd = np.asarray(t["mean"]), np.asarray(t["std"])
        ax.fill_between(b, mn, mx, alpha=0.25, label="min..max")
        ax.fill_between(b, me - sd, me + sd, alpha=0.5, label="mean ± std")
        ax.plot(b, np.asarray(t["absmax"]), lw=1, color="k", label="absmax")
        d = st.dynamics()
        ax.set_title(f"{name}\nabsmax cv {d['absmax_cv']:.2f}, range use {d['range_use']:.2f}", fontsize=8)
        ax.set_xlabel("batch", fontsize=7)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("activation range across batches", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_observer_sqnr(sqnr: Mapping[str, Mapping[str, float]], path: PathLike, *, title: str = "") -> Path:
    """Draw grouped bars of per-layer SQNR (dB), one bar per observer.

    Args:
        sqnr: ``{observer: {layer: sqnr_db}}``; layers in the order of the first observer.
        path: PNG file to write.
        title: figure title.

    Returns:
        The path written.
    """
    plt = require_matplotlib()
    import numpy as np

    observers = list(sqnr)
    if not observers:
        raise ValueError("sqnr must name at least one observer")
    layers = list(next(iter(sqnr.values())))
    width = 0.8 / len(observers)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(layers) * len(observers) + 2), 5.0))
    x = np.arange(len(layers))
    for i, obs in enumerate(observers):
        vals = [sqnr[obs].get(layer, float("nan")) for layer in layers]
        vals = [v if math.isfinite(v) else float("nan") for v in vals]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=obs)
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("SQNR of the layer input (dB)")
    ax.legend(fontsize=7, ncol=min(4, len(observers)), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
