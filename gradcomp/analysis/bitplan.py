"""A mixed-precision plan: one format per quantizable layer, as rules ``quantize_`` takes, saved as JSON.

Made by :mod:`gradcomp.analysis.mixed_precision` (from rules or a budgeted allocation); import
:class:`MixedPrecisionPlan` from there.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from gradcomp.analysis.sensitivity_report import Candidate, candidate_from_dict, candidate_to_dict

logger = logging.getLogger(__name__)

__all__ = ["Rule", "LayerAssignment", "MixedPrecisionPlan"]

#: ``(pattern, config)``: a module name, glob or ``re:`` regex, and its format (None: full precision).
Rule = Tuple[str, Optional[Candidate]]


# --------------------------------------------------------------------------------------------
# plans


@dataclass(frozen=True)
class LayerAssignment:
    """The format chosen for one layer.

    Attributes:
        layer: layer (module) name; ``aliases`` share its weight and get the same format.
        aliases: tied modules.
        config: the format, ``None`` for full precision.
        candidate: ``candidate_key(config)``.
        numel: weights in the layer.
        bits: exact storage bits of the layer's weight in this format (scales included).
        score: predicted damage of this choice (its sensitivity score), NaN when not measured.
    """

    layer: str
    aliases: Tuple[str, ...]
    config: Optional[Candidate]
    candidate: str
    numel: int
    bits: int
    score: float


@dataclass(frozen=True)
class MixedPrecisionPlan:
    """One format per layer, with its size and its predicted damage.

    Attributes:
        assignments: one :class:`LayerAssignment` per layer, in model order.
        metric: the sensitivity metric the scores come from (None for a rule plan without scores).
        method: how the plan was made (``"rules:first"``, ``"exact"``, ``"bucketed"``, ``"greedy"``,
            ``"uniform"``, ``"random"``).
        budget_bits: the budget it was solved for, in weight bits (None without one).
        resolution_bits: cost resolution of the solver (1 = exact bits).
        other_bytes: bytes of the rest of the model (biases, norms, buffers), for whole-model sizes.
    """

    assignments: Tuple[LayerAssignment, ...]
    metric: Optional[str] = None
    method: str = ""
    budget_bits: Optional[int] = None
    resolution_bits: int = 1
    other_bytes: int = 0

    @property
    def total_bits(self) -> int:
        """Storage bits of all planned weights."""
        return sum(a.bits for a in self.assignments)

    @property
    def weight_count(self) -> int:
        """Number of planned weights."""
        return sum(a.numel for a in self.assignments)

    @property
    def avg_bits(self) -> float:
        """Average storage bits per planned weight, scale overhead included."""
        return self.total_bits / max(self.weight_count, 1)

    @property
    def weight_bytes(self) -> float:
        """Bytes of the planned weights (``total_bits / 8``)."""
        return self.total_bits / 8

    @property
    def model_bytes(self) -> float:
        """Predicted bytes of the whole model: planned weights plus everything else."""
        return self.weight_bytes + self.other_bytes

    @property
    def predicted(self) -> float:
        """Predicted damage: the sum of the chosen scores (the knapsack objective)."""
        return float(sum(a.score for a in self.assignments))

    def bits_by_layer(self) -> Dict[str, str]:
        """Return ``{layer: candidate key}``."""
        return {a.layer: a.candidate for a in self.assignments}

    def to_rules(self) -> List[Rule]:
        """Return the ordered ``(exact module name, config or None)`` rules for ``weights.quantize_``.

        Every layer and every alias gets its own exact-name rule, so the order does not matter and
        no other module is touched.
        """
        rules: List[Rule] = []
        for a in self.assignments:
            for name in (a.layer, *a.aliases):
                rules.append((name, a.config))
        return rules

    def rows(self) -> List[Dict[str, Any]]:
        """Return one table row per layer: layer, candidate, numel, bits_per_param, score."""
        return [
            {
                "layer": a.layer,
                "candidate": a.candidate,
                "numel": a.numel,
                "bits_per_param": a.bits / a.numel,
                "score": a.score,
            }
            for a in self.assignments
        ]

    def summary(self) -> Dict[str, Any]:
        """Return the plan's totals as a dict (JSON-able)."""
        return {
            "method": self.method,
            "metric": self.metric,
            "avg_bits": self.avg_bits,
            "weight_bytes": self.weight_bytes,
            "model_bytes": self.model_bytes,
            "predicted": self.predicted,
            "budget_bits": self.budget_bits,
            "resolution_bits": self.resolution_bits,
        }

    def to_dict(self) -> Dict[str, Any]:
        """Return a JSON-able dict that :meth:`from_dict` reads back."""
        return {
            "format": "gradcomp-plan",
            "version": 1,
            **self.summary(),
            "other_bytes": self.other_bytes,
            "layers": [
                {
                    "layer": a.layer,
                    "aliases": list(a.aliases),
                    "config": candidate_to_dict(a.config),
                    "candidate": a.candidate,
                    "numel": a.numel,
                    "bits": a.bits,
                    "score": a.score if math.isfinite(a.score) else str(a.score),
                }
                for a in self.assignments
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MixedPrecisionPlan":
        """Rebuild a plan from :meth:`to_dict` output."""
        if not isinstance(data, Mapping) or data.get("format") != "gradcomp-plan":
            raise ValueError("not a gradcomp plan: expected a JSON object with format 'gradcomp-plan'")
        try:
            assignments = tuple(
                LayerAssignment(
                    str(l["layer"]),
                    tuple(l.get("aliases", ())),
                    candidate_from_dict(l["config"]),
                    str(l["candidate"]),
                    int(l["numel"]),
                    int(l["bits"]),
                    float(l["score"]),
                )
                for l in data["layers"]
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed plan: {type(exc).__name__}: {exc}") from exc
        return cls(
            assignments,
            data.get("metric"),
            str(data.get("method", "")),
            data.get("budget_bits"),
            int(data.get("resolution_bits", 1)),
            int(data.get("other_bytes", 0)),
        )

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        """Write the plan as JSON."""
        tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "MixedPrecisionPlan":
        """Read a plan written by :meth:`to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))
