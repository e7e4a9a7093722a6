"""Pictures of the gradient experiments: error drift over steps, per-layer error, error against bits."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

from gradcomp.plots import require_matplotlib, save_figure

__all__ = ["plot_drift", "plot_layer_errors", "plot_error_summary"]


def _finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def plot_drift(curves: Dict[str, Dict[str, List[float]]], path: "str | os.PathLike", title: str = "") -> str:
    """Plot the relative error of the accumulated update (drift) and the per-step error against the step.

    Args:
        curves: ``GradExpResult.curves``: ``{config: {"rel_error": [...], "drift": [...]}}``.
        path: the PNG to write.
        title: the figure title.

    Returns:
        The path written.
    """
    if not curves:
        raise ValueError("curves must hold at least one config")
    plt = require_matplotlib()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12.5, 4.4))
    cmap = plt.get_cmap("tab10")
    for i, (name, c) in enumerate(curves.items()):
        ls = "-" if name.endswith(" ef") else "--"
        steps = list(range(1, len(c["drift"]) + 1))
        a1.plot(steps, [v if _finite(v) else float("nan") for v in c["drift"]], ls, color=cmap(i % 10), label=name)
        a2.plot(steps, [v if _finite(v) else float("nan") for v in c["rel_error"]], ls, color=cmap(i % 10), label=name)
    a1.set_title("drift: ||sum out - sum g|| / ||sum g||", fontsize=9)
    a2.set_title("per-step relative error ||out - g|| / ||g||", fontsize=9)
    for a in (a1, a2):
        a.set_yscale("log")
        a.set_xlabel("step")
        a.grid(True, which="both", alpha=0.3)
    a1.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    a1.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    handles, labels = a1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_layer_errors(
    per_layer: Sequence[dict], path: "str | os.PathLike", configs: Optional[Sequence[str]] = None, title: str = ""
) -> str:
    """Draw each layer's relative error as grouped horizontal bars, one colour per config (log scale).

    Args:
        per_layer: ``GradExpResult.per_layer`` rows (``config``, ``layer``, ``rel_error``).
        path: the PNG to write.
        configs: the configs to show (default: all, in their order of appearance).
        title: the figure title.

    Returns:
        The path written.
    """
    if not per_layer:
        raise ValueError("per_layer must hold at least one row")
    plt = require_matplotlib()
    order: List[str] = []
    layers: List[str] = []
    for r in per_layer:
        if r["config"] not in order:
            order.append(r["config"])
        if r["layer"] not in layers:
            layers.append(r["layer"])
    shown = list(configs) if configs else order
    table = {(r["config"], r["layer"]): r["rel_error"] for r in per_layer}
    height = 0.8 / max(1, len(shown))
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.28 * len(layers) * max(1, len(shown)) ** 0.5 + 1.5)))
    cmap = plt.get_cmap("tab10")
    for j, cfg in enumerate(shown):
        ys = [i + j * height for i in range(len(layers))]
        xs = [table.get((cfg, name), float("nan")) for name in layers]
        xs = [x if _finite(x) else float("nan") for x in xs]
        ax.barh(ys, xs, height=height, color=cmap(j % 10), label=cfg)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(layers))])
    ax.set_yticklabels(layers, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("relative error ||out - g|| / ||g|| (rms over steps)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path, dpi=120)


def plot_error_summary(summary: Sequence[dict], path: "str | os.PathLike", title: str = "") -> str:
    """Plot relative error and final drift against bits, one line per rounding, feedback and block size.

    Args:
        summary: ``GradExpResult.summary`` rows.
        path: the PNG to write.
        title: the figure title.

    Returns:
        The path written.
    """
    if not summary:
        raise ValueError("summary must hold at least one row")
    plt = require_matplotlib()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    groups: Dict[str, List[dict]] = {}
    for r in summary:
        key = f"b{r['block_size']} {r['rounding']} {'ef' if r['error_feedback'] else 'no-ef'}"
        groups.setdefault(key, []).append(r)
    for key, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["bits"])
        bits = [r["bits"] for r in rows]
        ls = "-" if key.endswith(" ef") else "--"
        a1.plot(bits, [r["rel_error"] if _finite(r["rel_error"]) else float("nan") for r in rows], ls, marker="o", label=key)
        a2.plot(bits, [r["drift"] if _finite(r["drift"]) else float("nan") for r in rows], ls, marker="o", label=key)
    a1.set_ylabel("mean per-step relative error")
    a2.set_ylabel("drift after the last step")
    for a in (a1, a2):
        a.set_xlabel("bits")
        a.set_yscale("log")
        a.set_xticks(sorted({r["bits"] for r in summary}))
        a.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=120)
