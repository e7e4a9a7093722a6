"""Pictures of the communication cost model: step time against worker count or bandwidth."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

from gradcomp.plots import require_matplotlib, save_figure

__all__ = ["plot_cost_sweep", "plot_validation"]


def plot_cost_sweep(
    curves: Dict[str, List[float]],
    over: str,
    path: "str | os.PathLike",
    title: str = "",
    break_even: Optional[Dict[str, float]] = None,
) -> str:
    """Plot each scheme's step communication time against workers or bandwidth (log-log) as a PNG.

    Args:
        curves: the output of :func:`gradcomp.analysis.costmodel.sweep`: ``{"x": [...], scheme: [seconds...]}``.
        over: ``"workers"`` or ``"bandwidth"`` (x in bytes per second, drawn in Gbit/s).
        path: the PNG to write.
        title: the figure title.
        break_even: optional ``{scheme: bytes per second}`` drawn as dotted vertical lines in the
            scheme's colour when ``over`` is ``"bandwidth"`` (finite positive values only).

    Returns:
        The path written.
    """
    if over not in ("workers", "bandwidth"):
        raise ValueError(f"over must be 'workers' or 'bandwidth', got {over!r}")
    if "x" not in curves or len(curves) < 2:
        raise ValueError("curves must hold an 'x' list and at least one scheme")
    plt = require_matplotlib()
    x = list(curves["x"])
    xs = [v * 8 / 1e9 for v in x] if over == "bandwidth" else x
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"ring": "-", "tree": "-.", "twophase": "--", "allgather": ":", "hier": (0, (5, 1, 1, 1))}
    cmap = plt.get_cmap("tab20")
    names = [n for n in curves if n != "x"]
    colors = {n: cmap(i % 20) for i, n in enumerate(names)}
    for name in names:
        ls = styles.get(name.split("-")[0], "-")
        ax.plot(xs, curves[name], linestyle=ls, marker="o", markersize=3, label=name, color=colors[name])
    if break_even and over == "bandwidth":
        # a thin vertical line in the scheme's colour where it starts to beat ring-fp32
        for name, bw in break_even.items():
            if 0 < bw < math.inf and name in colors:
                ax.axvline(bw * 8 / 1e9, color=colors[name], linewidth=1.0, linestyle=":", alpha=0.9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("main-link bandwidth (Gbit/s)" if over == "bandwidth" else "workers")
    ax.set_ylabel("communication time per step (s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path, dpi=120)


def plot_validation(rows: Sequence[dict], path: "str | os.PathLike", title: str = "") -> str:
    """Scatter predicted against measured times (log-log) with the y = x line and a +-25% band.

    Args:
        rows: dicts with ``predicted_s``, ``measured_s`` and ``kind`` (a label per collective).
        path: the PNG to write.
        title: the figure title.

    Returns:
        The path written.
    """
    if not rows:
        raise ValueError("rows must hold at least one measurement")
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    kinds = sorted({r["kind"] for r in rows})
    for k in kinds:
        pts = [r for r in rows if r["kind"] == k]
        ax.scatter([r["predicted_s"] for r in pts], [r["measured_s"] for r in pts], label=k, s=18)
    vals = [r["predicted_s"] for r in rows] + [r["measured_s"] for r in rows]
    lo, hi = min(vals) * 0.7, max(vals) * 1.4
    ax.plot([lo, hi], [lo, hi], color="k", linewidth=0.8)
    ax.fill_between([lo, hi], [lo * 0.75, hi * 0.75], [lo * 1.25, hi * 1.25], color="grey", alpha=0.2, label="+-25%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted (s)")
    ax.set_ylabel("measured (s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path, dpi=120)
