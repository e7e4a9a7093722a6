"""Targets and recommendations: which quantization strategy meets a deployment's limits.

:class:`Target` states the limits (loss increase, bytes, latency) and what to optimise;
:data:`SCENARIOS` names common ones; :class:`StrategyResult` holds one measured strategy and
:func:`recommend` picks among them, saying why. Import these from
:mod:`gradcomp.analysis.mixed_precision`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

__all__ = ["Target", "SCENARIOS", "StrategyResult", "recommend"]


# --------------------------------------------------------------------------------------------
# targets and recommendations


@dataclass(frozen=True)
class Target:
    """What a deployment needs: the limits a strategy must meet and what to optimise among those that do.

    Args:
        max_loss_increase: largest allowed relative increase of the measured loss (0.01 = 1%), or None;
            an absolute limit for a metric whose unquantized value is 0 (a deviation from fp32).
        max_bytes: largest allowed model size in bytes, or None.
        max_latency_ratio: largest allowed latency relative to the unquantized model, or None.
        objective: among the strategies that meet the limits, minimise ``"size"``, ``"latency"`` or
            ``"loss"``.

    Example: ``Target(max_loss_increase=0.02, objective="size")`` asks for the smallest model whose
    loss is at most 2% above the original.
    """

    max_loss_increase: Optional[float] = None
    max_bytes: Optional[float] = None
    max_latency_ratio: Optional[float] = None
    objective: str = "size"

    def __post_init__(self) -> None:
        if self.objective not in ("size", "latency", "loss"):
            raise ValueError(f"objective must be one of ('size', 'latency', 'loss'), got {self.objective!r}")
        for name in ("max_loss_increase", "max_bytes", "max_latency_ratio"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{name} must be None or a non-negative number, got {v!r}")


# The seed's five scenarios, expressed as requirements (inputs), not as answers: the answer is
# computed by :func:`recommend` from measurements of the model at hand.
SCENARIOS: Dict[str, Target] = {
    "cloud_inference": Target(max_loss_increase=0.01, objective="latency"),
    "edge_device": Target(max_loss_increase=0.05, objective="size"),
    "real_time": Target(max_loss_increase=0.02, max_latency_ratio=1.0, objective="latency"),
    "high_accuracy": Target(max_loss_increase=0.001, objective="size"),
    "storage_limited": Target(objective="loss"),  # give max_bytes: the tightest size the store allows
}


@dataclass(frozen=True)
class StrategyResult:
    """Measurements of one quantization strategy applied to one model.

    Attributes:
        name: strategy name, e.g. ``"int8-channel"`` or ``"knapsack 4.5 bits"``.
        model_bytes: measured bytes of the quantized model (``weights.model_size_bytes``).
        latency_s: measured seconds per forward pass of a fixed batch.
        loss: measured loss on held-out data.
        base_bytes, base_latency_s, base_loss: the same measurements of the unquantized model.
    """

    name: str
    model_bytes: float
    latency_s: float
    loss: float
    base_bytes: float
    base_latency_s: float
    base_loss: float

    @property
    def compression(self) -> float:
        """Size of the unquantized model over the size of this one."""
        return self.base_bytes / self.model_bytes

    @property
    def speedup(self) -> float:
        """Latency of the unquantized model over the latency of this one (below 1 means slower)."""
        return self.base_latency_s / self.latency_s

    @property
    def relative(self) -> bool:
        """Whether :attr:`loss_increase` is relative (the unquantized value is not 0)."""
        return self.base_loss != 0

    @property
    def loss_increase(self) -> float:
        """Loss increase over the unquantized model: relative (0.01 = 1%), or absolute when its value is 0.

        A metric measured as a deviation from the unquantized model (the MAE of a quantized model's
        outputs against fp32's) is 0 for the unquantized model itself; its increase is then the
        value itself, and a target's ``max_loss_increase`` is read as an absolute limit.

        Example: base 2.0, loss 2.1 -> 0.05; base 0.0, loss 0.013 -> 0.013 (absolute).
        """
        if self.base_loss == 0:
            return self.loss - self.base_loss
        return (self.loss - self.base_loss) / abs(self.base_loss)

    def _increase_text(self) -> str:
        if self.relative:
            return f"{100 * self.loss_increase:+.2f}%"
        return f"{self.loss_increase:+.4g} (absolute: the unquantized value is 0)"

    def row(self) -> Dict[str, Any]:
        """Return the trade-off table row of this strategy."""
        return {
            "strategy": self.name,
            "bytes": int(self.model_bytes),
            "compression": self.compression,
            "speedup": self.speedup,
            "loss": self.loss,
            "loss_increase_pct": 100.0 * self.loss_increase if self.relative else None,
            "loss_increase_abs": self.loss - self.base_loss,
        }


def recommend(results: Sequence[StrategyResult], target: Union[Target, str]) -> Tuple[Optional[StrategyResult], str]:
    """Pick the strategy that meets a target best, from measured results, and say why.

    Steps: keep the strategies within every limit of the target; among them minimise the
    objective (ties broken by smaller size, then lower loss). When none qualifies, return None and
    name the limit that ruled out the closest candidate.

    Args:
        results: measured strategies (:class:`StrategyResult`), including mixed-precision plans.
        target: a :class:`Target` or a scenario name from :data:`SCENARIOS`.

    Returns:
        ``(chosen strategy or None, reason)``.
    """
    if isinstance(target, str):
        if target not in SCENARIOS:
            raise ValueError(f"scenario must be one of {sorted(SCENARIOS)}, got {target!r}")
        target = SCENARIOS[target]
    if not isinstance(target, Target):
        raise TypeError(f"target must be a Target or a scenario name, got {type(target).__name__}")
    results = list(results)
    if not results:
        raise ValueError("results must hold at least one measured strategy")

    def violations(r: StrategyResult) -> List[str]:
        out = []
        if target.max_loss_increase is not None and r.loss_increase > target.max_loss_increase:
            limit = f"{100 * target.max_loss_increase:.2f}%" if r.relative else f"{target.max_loss_increase:.4g}"
            out.append(f"loss {r._increase_text()} > {limit}")
        if target.max_bytes is not None and r.model_bytes > target.max_bytes:
            out.append(f"{int(r.model_bytes)} bytes > {int(target.max_bytes)}")
        if target.max_latency_ratio is not None and r.latency_s > target.max_latency_ratio * r.base_latency_s:
            out.append(f"latency x{r.latency_s / r.base_latency_s:.2f} > x{target.max_latency_ratio:.2f}")
        return out

    ok = [r for r in results if not violations(r)]
    if not ok:
        closest = min(results, key=lambda r: len(violations(r)))
        return None, f"no measured strategy meets the target; e.g. {closest.name}: {'; '.join(violations(closest))}"
    key = {
        "size": lambda r: (r.model_bytes, r.loss),
        "latency": lambda r: (r.latency_s, r.model_bytes, r.loss),
        "loss": lambda r: (r.loss, r.model_bytes),
    }[target.objective]
    best = min(ok, key=key)
    reason = (
        f"{best.name}: {best.compression:.2f}x smaller, {best.speedup:.2f}x speed, loss {best._increase_text()}; "
        f"best {target.objective} among {len(ok)} of {len(results)} strategies within the target"
    )
    return best, reason
