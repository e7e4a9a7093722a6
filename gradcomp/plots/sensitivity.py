"""Pictures of sensitivity reports and mixed-precision trade-offs (matplotlib, the ``plots`` extra)."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Sequence, Union

from gradcomp.plots import require_matplotlib

__all__ = ["plot_sensitivity", "plot_pareto"]


def plot_sensitivity(report: Any, path: Union[str, os.PathLike], metric: Optional[str] = None, title: Optional[str] = None) -> None:
    """Write a grouped bar chart: one group per layer, one bar per candidate format, log scale.

    Layers are sorted by their score at the most aggressive candidate (the one with the fewest bits
    per weight), most sensitive first, so the layers that need more bits stand out on the left.

    Args:
        report: a ``gradcomp.analysis.sensitivity.SensitivityReport``.
        path: PNG file to write.
        metric: the score to draw (default: the report's default metric).
        title: figure title.
    """
    plt = require_matplotlib()
    metric = metric or report.default_metric()
    cands = report.candidates
    bpp: Dict[str, float] = {}
    for e in report.entries:
        bpp[e.candidate] = min(bpp.get(e.candidate, math.inf), e.bits_per_param)
    cands = sorted(cands, key=lambda c: bpp[c])
    table = {(e.layer, e.candidate): e.metrics.get(metric, math.nan) for e in report.entries}
    layers = [l.name for l in report.layers]
    layers.sort(key=lambda n: -(table.get((n, cands[0]), 0.0) or 0.0))
    n, k = len(layers), len(cands)
    width = 0.8 / max(k, 1)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.15 * n * max(1, k) + 3)), 5.0))
    floor = min((v for v in table.values() if v > 0), default=1e-12) / 10
    for j, c in enumerate(cands):
        xs = [i + (j - (k - 1) / 2) * width for i in range(n)]
        ys = [max(table.get((name, c), math.nan), floor) for name in layers]
        ax.bar(xs, ys, width=width, label=c)
    ax.set_yscale("log")
    ax.set_xticks(range(n))
    ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (log scale)")
    ax.set_title(title or f"per-layer sensitivity ({metric}), one layer quantized at a time")
    ax.legend(fontsize=7, ncol=min(k, 4))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(
    rows: Sequence[Dict[str, Any]],
    path: Union[str, os.PathLike],
    *,
    x: str = "avg_bits",
    predicted: str = "predicted",
    measured: Optional[str] = "measured",
    baselines: Sequence[Dict[str, Any]] = (),
    ylabel: str = "damage (log scale)",
    title: Optional[str] = None,
) -> None:
    """Write the size vs damage curve: predicted and measured damage of Pareto plans on one log axis.

    Predicted (the summed single-layer scores) and measured damage should be in the same unit (for
    example KL in nats) so that the gap between the two curves is the prediction error.

    Args:
        rows: Pareto plans as dicts with keys ``x``, ``predicted`` and optionally ``measured``.
        path: PNG file to write.
        x: key of the size (bits per weight or bytes).
        predicted: key of the predicted damage.
        measured: key of the measured damage, or None to draw the prediction only.
        baselines: extra measured points with keys ``x``, ``measured`` and ``label`` (uniform or
            random plans).
        ylabel: label of the damage axis.
        title: figure title.
    """
    plt = require_matplotlib()
    pts = sorted(rows, key=lambda r: r[x])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pp = [r for r in pts if r[predicted] > 0]
    ax.plot([r[x] for r in pp], [r[predicted] for r in pp], "o-", ms=3, label="predicted (sum of single-layer scores)")
    if measured is not None:
        mp = [r for r in pts if r.get(measured) is not None and r[measured] > 0]
        if mp:
            ax.plot([r[x] for r in mp], [r[measured] for r in mp], "s--", ms=5, label="measured (knapsack plans)")
        markers = iter("^vDPX*")
        for b in baselines:
            if b[measured] > 0:
                ax.plot([b[x]], [b[measured]], next(markers, "x"), ms=8, label=f"measured: {b.get('label', 'baseline')}")
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    ax.set_title(title or "mixed-precision Pareto front")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
