"""Pictures of a weight report (:class:`gradcomp.quant.WeightReport`): one PNG readable at a glance."""

from __future__ import annotations

import math
from typing import Optional

from gradcomp.plots import require_matplotlib


def _short(name: str, parts: int = 4) -> str:
    bits = name.split(".")
    return ".".join(bits[-parts:]) if len(bits) > parts else name


def plot_weight_report(report, path: str, *, title: Optional[str] = None, max_histograms: int = 3) -> str:
    """Draw a weight report as one PNG with three panels and return ``path``.

    Panels:
        1. Quantization SQNR (dB) per layer for every config, with each config's median as a dashed line.
        2. Box plots of every layer's weights in units of its standard deviation (box p25..p75, median,
           whiskers p0.1..p99.9, a dot at max |x|/std): heavy tails stand out.
        3. Histograms (log counts, std units) of the layers with the heaviest and the lightest tails
           (highest and lowest kurtosis), against a Gaussian of the same width.

    Args:
        report: a :class:`gradcomp.quant.WeightReport`.
        path: output PNG file.
        title: figure title.
        max_histograms: how many heavy-tailed layers to draw in panel 3 (plus the lightest one).

    Returns:
        ``path``.
    """
    plt = require_matplotlib()
    stats = report.stats
    if not stats:
        raise ValueError("the report holds no layers to plot")
    n = len(stats)
    labels = [_short(s.name) for s in stats]
    width = max(8.0, min(24.0, 0.28 * n + 4))
    fig, axes = plt.subplots(3, 1, figsize=(width, 12), gridspec_kw={"height_ratios": [1.0, 1.3, 1.0]},
                             constrained_layout=True)
    xs = list(range(n))

    ax = axes[0]
    for i, c in enumerate(report.configs):
        ys = [report.quality[s.name][c].sqnr_db for s in stats]
        finite = [y for y in ys if math.isfinite(y)]
        line = ax.plot(xs, [y if math.isfinite(y) else float("nan") for y in ys], marker="o", ms=3, lw=1, label=c)[0]
        if finite:
            med = sorted(finite)[len(finite) // 2]
            ax.axhline(med, color=line.get_color(), ls="--", lw=0.8)
            ax.annotate(f"median {med:.1f} dB", xy=(0.995, med), xycoords=("axes fraction", "data"),
                        color=line.get_color(), fontsize=8, ha="right", va="bottom")
    ax.set_ylabel("SQNR (dB), higher is better")
    ax.set_title("quantization error per layer")
    ax.set_xticks(xs)
    ax.set_xticklabels([])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")

    ax = axes[1]
    boxes = []
    for s in stats:
        sd = s.std if s.std > 0 else 1.0
        p = s.percentiles
        boxes.append({
            "med": (p["p50"] - s.mean) / sd, "q1": (p["p25"] - s.mean) / sd, "q3": (p["p75"] - s.mean) / sd,
            "whislo": (p["p0.1"] - s.mean) / sd, "whishi": (p["p99.9"] - s.mean) / sd, "fliers": [],
        })
    ax.bxp(boxes, positions=xs, showfliers=False, widths=0.6)
    ax.plot(xs, [(s.max - s.mean) / (s.std or 1.0) for s in stats], "v", color="tab:red", ms=4, label="max / std")
    ax.plot(xs, [(s.min - s.mean) / (s.std or 1.0) for s in stats], "^", color="tab:red", ms=4, label="min / std")
    # symlog keeps the boxes readable next to outliers a hundred standard deviations out.
    ax.set_yscale("symlog", linthresh=3.0)
    lo = min((s.min - s.mean) / (s.std or 1.0) for s in stats)
    hi = max((s.max - s.mean) / (s.std or 1.0) for s in stats)
    ticks = [t for t in (-300, -100, -30, -10, -3, -1, 0, 1, 3, 10, 30, 100, 300) if lo * 1.5 <= t <= hi * 1.5]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:g}" for t in ticks])
    ax.axhline(3, color="grey", lw=0.6, ls=":")
    ax.axhline(-3, color="grey", lw=0.6, ls=":")
    ax.set_ylabel("(w - mean) / std  (symlog)")
    ax.set_title("weight distributions (box p25-p75, whiskers p0.1-p99.9; dotted: 3 std)")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[2]
    order = sorted(stats, key=lambda s: s.kurtosis)
    chosen = order[::-1][:max_histograms] + ([order[0]] if len(order) > max_histograms else [])
    for s in chosen:
        sd = s.std if s.std > 0 else 1.0
        edges = [(e - s.mean) / sd for e in s.hist_edges]
        ax.stairs(s.hist_counts, edges, label=f"{_short(s.name)} (kurtosis {s.kurtosis:.1f}, {100 * s.outlier_share:.2f}% > {s.outlier_sigma:g} std)")
    # A Gaussian of the same count and bin width shows what tails would look like without outliers.
    ref = chosen[0]
    bw = (ref.hist_edges[1] - ref.hist_edges[0]) / (ref.std or 1.0)
    gx = [-6 + 12 * i / 200 for i in range(201)]
    ax.plot(gx, [ref.numel * bw * math.exp(-x * x / 2) / math.sqrt(2 * math.pi) for x in gx], "k:", lw=1,
            label=f"Gaussian with the count of {_short(ref.name)}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)
    ax.set_xlabel("(w - mean) / std")
    ax.set_ylabel("count (log)")
    ax.set_title("histograms: heaviest and lightest tails")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
