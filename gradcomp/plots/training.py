"""Pictures of training runs: loss curves of several runs on one set of axes."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from gradcomp.plots import require_matplotlib

__all__ = ["plot_loss_curves"]

PathLike = Union[str, Path]
Curve = Tuple[Sequence[float], Sequence[float]]


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    if window <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.minimum(np.arange(1, y.size + 1), window)
    return (c[1:] - c[np.arange(1, y.size + 1) - n]) / n


def plot_loss_curves(
    train: Mapping[str, Curve],
    path: PathLike,
    *,
    val: Optional[Mapping[str, Curve]] = None,
    smooth: int = 20,
    title: str = "Training loss",
    ylabel: str = "cross-entropy (nats/byte)",
) -> Path:
    """Draw each run's training loss (smoothed) and, optionally, its validation loss; write a PNG.

    Args:
        train: run label -> (steps, losses) of the training loss.
        path: output PNG path (parent directories are created).
        val: run label -> (steps, losses) of the validation loss, drawn as markers in the run's colour.
        smooth: trailing moving-average window for the training curves (1: raw).
        title, ylabel: text of the figure.

    Returns:
        The path written.
    """
    if not train:
        raise ValueError("train must hold at least one run, got none")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    for label, (steps, losses) in train.items():
        if len(steps) != len(losses):
            raise ValueError(f"run {label!r}: {len(steps)} steps but {len(losses)} losses")
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for i, (label, (steps, losses)) in enumerate(train.items()):
            color = f"C{i % 10}"
            ax.plot(np.asarray(steps), _smooth(np.asarray(losses, dtype=float), smooth), color=color, lw=1.4, label=f"{label} (train)")
            if val and label in val:
                vs, vl = val[label]
                ax.plot(np.asarray(vs), np.asarray(vl, dtype=float), "o--", color=color, ms=3, lw=0.8, alpha=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title + (f" (train: {smooth}-step moving average; dashed: validation)" if val else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out
