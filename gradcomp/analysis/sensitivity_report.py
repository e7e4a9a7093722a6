"""What a sensitivity run produces and reads back: the candidates, the config, the report.

* candidates (``WeightQuantConfig`` / ``CastConfig``) and their stable keys, dicts and sizes;
* :class:`SensitivityConfig`: what to measure;
* :class:`LayerInfo`, :class:`SensitivityEntry`, :class:`SensitivityReport`: the trials' scores,
  saved as JSON or CSV and loaded back without the model (planning needs no model run).

The measurement itself is :func:`gradcomp.analysis.sensitivity.measure_sensitivity`; import these
names from :mod:`gradcomp.analysis.sensitivity` too.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from gradcomp.checks import check_int
from gradcomp.quant import ActQuantConfig, CastConfig, WeightQuantConfig, config_name, weight_bits_per_param

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "DEFAULT_METRICS",
    "OUTPUT_KINDS",
    "SensitivityConfig",
    "LayerInfo",
    "SensitivityEntry",
    "SensitivityReport",
    "Candidate",
    "candidate_key",
    "candidate_to_dict",
    "candidate_from_dict",
    "candidate_bits_per_param",
]

METRICS = ("mse", "rel_mse", "kl", "loss", "fisher", "hawq", "weight_mse")
OUTPUT_KINDS = ("auto", "classification", "regression")
DEFAULT_METRICS = ("mse", "rel_mse", "kl", "loss", "fisher", "weight_mse")
_FORMAT_VERSION = 1

Candidate = Union[WeightQuantConfig, CastConfig]


# --------------------------------------------------------------------------------------------
# candidates


def candidate_key(config: Optional[Candidate]) -> str:
    """Return the short stable name of a candidate format, used as a key in score files.

    It is ``gradcomp.quant.config_name``: ``None`` (keep full precision) is ``"fp32"``, casts are
    ``"fp16"``/``"bf16"``, weight quantization is ``int<bits>-<tensor|channel|g<group>>`` plus
    ``-asym`` and ``-s<scale dtype>`` when not the defaults; ``weights.parse_config`` reads it back.

    Example:
        >>> candidate_key(WeightQuantConfig(bits=4, granularity="per_group", group_size=128))
        'int4-g128'
    """
    if config is not None and not isinstance(config, (WeightQuantConfig, CastConfig)):
        raise TypeError(f"candidate must be a WeightQuantConfig, a CastConfig or None, got {type(config).__name__}")
    return config_name(config)


def candidate_to_dict(config: Optional[Candidate]) -> Optional[Dict[str, Any]]:
    """Serialise a candidate to a JSON-able dict (``{"type": "weight"|"cast", ...}``; None stays None)."""
    if config is None:
        return None
    if isinstance(config, CastConfig):
        return {"type": "cast", "dtype": config.dtype}
    if isinstance(config, WeightQuantConfig):
        return {
            "type": "weight",
            "bits": config.bits,
            "granularity": config.granularity,
            "group_size": config.group_size,
            "symmetric": config.symmetric,
            "scale_dtype": config.scale_dtype,
        }
    raise TypeError(f"candidate must be a WeightQuantConfig, a CastConfig or None, got {type(config).__name__}")


def candidate_from_dict(data: Optional[Mapping[str, Any]]) -> Optional[Candidate]:
    """Rebuild a candidate from :func:`candidate_to_dict` output (validated by the config classes)."""
    if data is None:
        return None
    if not isinstance(data, Mapping) or data.get("type") not in ("weight", "cast"):
        raise ValueError(f"a candidate must be a dict with type 'weight' or 'cast', got {data!r}")
    if data["type"] == "cast":
        return CastConfig(dtype=data["dtype"])
    return WeightQuantConfig(
        bits=int(data["bits"]),
        granularity=str(data["granularity"]),
        group_size=int(data["group_size"]),
        symmetric=bool(data["symmetric"]),
        scale_dtype=str(data.get("scale_dtype", "fp16")),
    )


def candidate_bits_per_param(config: Optional[Candidate], shape: Sequence[int], full_bits: int = 32) -> float:
    """Return the real storage bits per weight of a candidate for a weight of ``shape``.

    Scale overhead is included (``weight_bits_per_param``); a cast costs its dtype's 16 bits and
    ``None`` (kept as is) costs ``full_bits``.

    Example: 4-bit groups of 128 with one fp16 scale per group cost ``4 + 16/128 = 4.125`` bits.
    """
    if config is None:
        return float(full_bits)
    if isinstance(config, CastConfig):
        return 16.0
    return float(weight_bits_per_param(config, tuple(shape)))


# --------------------------------------------------------------------------------------------
# configuration and results


def _default_candidates() -> Tuple[Candidate, ...]:
    return tuple(WeightQuantConfig(bits=b, granularity="per_group", group_size=128) for b in (2, 3, 4, 8))


@dataclass(frozen=True)
class SensitivityConfig:
    """What to measure.

    Args:
        candidates: formats to try on every layer (``WeightQuantConfig`` or ``CastConfig``);
            default int2/int3/int4/int8 with groups of 128.
        metrics: scores to compute, a subset of ``("mse", "rel_mse", "kl", "loss", "fisher",
            "weight_mse")``, or None (default): all of them, but ``kl`` only for classification
            outputs. ``loss`` and ``fisher`` are skipped (with a log line) when no loss is available.
        output_kind: ``"auto"`` (detect, see the module docstring), ``"classification"`` or
            ``"regression"``; decides the default metric of plans.
        hessian: also estimate the HAWQ score (Hutchinson trace; needs a loss and double backward).
        hutchinson_samples: Rademacher vectors per calibration batch for the trace.
        activations: when set, also fake-quantize the floating input of the layer under trial with
            this ``gradcomp.quant.ActQuantConfig``; it must be dynamic (scales from each
            input), since a single-layer trial has no calibration pass of its own.
        seed: seed of the Hutchinson vectors.
    """

    candidates: Tuple[Candidate, ...] = field(default_factory=_default_candidates)
    metrics: Optional[Tuple[str, ...]] = None
    output_kind: str = "auto"
    hessian: bool = False
    hutchinson_samples: int = 4
    activations: Optional[Any] = None
    seed: int = 0

    def __post_init__(self) -> None:
        cands = tuple(self.candidates)
        if not cands:
            raise ValueError("candidates must hold at least one WeightQuantConfig or CastConfig, got none")
        for c in cands:
            if not isinstance(c, (WeightQuantConfig, CastConfig)):
                raise TypeError(f"every candidate must be a WeightQuantConfig or a CastConfig, got {type(c).__name__}")
        keys = [candidate_key(c) for c in cands]
        if len(set(keys)) != len(keys):
            raise ValueError(f"candidates must be distinct, got {keys}")
        object.__setattr__(self, "candidates", cands)
        if self.metrics is not None:
            if isinstance(self.metrics, str):
                raise TypeError(f"metrics must be a tuple of metric names or None, got the string {self.metrics!r}")
            metrics = tuple(self.metrics)
            bad = [m for m in metrics if m not in METRICS or m == "hawq"]
            if bad or not metrics:
                raise ValueError(f"metrics must be a non-empty subset of {DEFAULT_METRICS} (or None for the default), got {metrics}")
            object.__setattr__(self, "metrics", metrics)
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        check_int("hutchinson_samples", self.hutchinson_samples)
        if self.activations is not None:
            if not isinstance(self.activations, ActQuantConfig):
                raise TypeError(f"activations must be None or an ActQuantConfig, got {type(self.activations).__name__}")
            if not self.activations.dynamic:
                raise ValueError(
                    "activations must be a dynamic ActQuantConfig (dynamic=True): a single-layer trial has no calibration pass, "
                    f"got {self.activations.label}"
                )


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable weight of the model.

    Attributes:
        name: fully qualified name of the first module that owns the weight.
        aliases: other modules sharing the very same weight (tied weights), quantized together.
        kind: module class name.
        shape: weight shape.
        numel: number of weights.
        full_bits: bits per weight as stored now (32 for fp32).
    """

    name: str
    aliases: Tuple[str, ...]
    kind: str
    shape: Tuple[int, ...]
    numel: int
    full_bits: int


@dataclass(frozen=True)
class SensitivityEntry:
    """The scores of one trial: one layer quantized with one candidate format.

    Attributes:
        layer: layer name (``LayerInfo.name``).
        candidate: candidate key (``candidate_key``).
        config: the candidate as a dict (``candidate_to_dict``).
        bits_per_param: storage bits per weight of this layer in this format, scales included.
        metrics: metric name -> score (higher is more damage).
    """

    layer: str
    candidate: str
    config: Optional[Dict[str, Any]]
    bits_per_param: float
    metrics: Dict[str, float]


@dataclass
class SensitivityReport:
    """All trials of a sensitivity run, reusable for any number of plans without the model.

    Attributes:
        layers: the candidate layers in model order.
        entries: one :class:`SensitivityEntry` per (layer, candidate).
        baseline: reference figures of the unmodified model (``loss``, ``num_batches``).
        other_bytes: bytes of everything in the model that is not a candidate weight (biases,
            norms, buffers), which a whole-model byte budget must leave room for.
        metadata: free-form description of the run (model, candidates, metrics).
    """

    layers: List[LayerInfo]
    entries: List[SensitivityEntry]
    baseline: Dict[str, Any] = field(default_factory=dict)
    other_bytes: int = 0
    metadata: Dict[str, Any] = field(default_factory=dict)

    # -- lookups ------------------------------------------------------------------------------

    @property
    def metrics(self) -> List[str]:
        """Metrics present in every entry, in ``METRICS`` order."""
        if not self.entries:
            return []
        common = set(self.entries[0].metrics)
        for e in self.entries[1:]:
            common &= set(e.metrics)
        return [m for m in METRICS if m in common]

    @property
    def candidates(self) -> List[str]:
        """Candidate keys in first-seen order."""
        seen: Dict[str, None] = {}
        for e in self.entries:
            seen.setdefault(e.candidate, None)
        return list(seen)

    def layer(self, name: str) -> LayerInfo:
        """Return the :class:`LayerInfo` called ``name`` (or one of whose aliases is ``name``)."""
        for info in self.layers:
            if info.name == name or name in info.aliases:
                return info
        raise KeyError(f"no layer named {name!r}; layers are {[l.name for l in self.layers]}")

    def score(self, layer: str, candidate: str, metric: str) -> float:
        """Return one score; raises KeyError when that trial or metric was not measured."""
        for e in self.entries:
            if e.layer == layer and e.candidate == candidate:
                if metric not in e.metrics:
                    raise KeyError(f"metric {metric!r} was not measured; available: {sorted(e.metrics)}")
                return e.metrics[metric]
        raise KeyError(f"no trial for layer {layer!r} with candidate {candidate!r}")

    def rows(self, metric: Optional[str] = None, descending: bool = True) -> List[Dict[str, Any]]:
        """Return flat table rows sorted by ``metric`` (most damaging first by default).

        Args:
            metric: sort key; defaults to the first available of kl, mse, fisher, loss.
            descending: most damaging first.

        Returns:
            One dict per trial: layer, candidate, bits_per_param, numel, and every metric.
        """
        metric = metric or self.default_metric()
        if metric not in self.metrics:
            raise ValueError(f"metric must be one of {self.metrics}, got {metric!r}")
        numel = {l.name: l.numel for l in self.layers}
        out = []
        for e in self.entries:
            row: Dict[str, Any] = {
                "layer": e.layer,
                "candidate": e.candidate,
                "bits_per_param": e.bits_per_param,
                "numel": numel[e.layer],
            }
            row.update({m: e.metrics[m] for m in self.metrics})
            out.append(row)
        out.sort(key=lambda r: r[metric], reverse=descending)
        return out

    def default_metric(self) -> str:
        """Return the metric plans use by default.

        For regression outputs (``metadata["output_kind"]``) ``rel_mse``, else ``mse``; for
        classification ``kl``; then ``fisher``, ``loss``, ``hawq``, ``weight_mse``.
        """
        if self.metadata.get("output_kind") == "regression":
            order: Tuple[str, ...] = ("rel_mse", "mse", "kl", "fisher", "loss", "hawq", "weight_mse")
        else:
            order = ("kl", "mse", "rel_mse", "fisher", "loss", "hawq", "weight_mse")
        for m in order:
            if m in self.metrics:
                return m
        raise ValueError("the report holds no metric")

    # -- persistence --------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """Return a JSON-able dict (non-finite scores become strings ``"inf"``/``"nan"``)."""
        return {
            "format": "gradcomp-sensitivity",
            "version": _FORMAT_VERSION,
            "layers": [
                {**asdict(l), "aliases": list(l.aliases), "shape": list(l.shape)} for l in self.layers
            ],
            "entries": [
                {
                    "layer": e.layer,
                    "candidate": e.candidate,
                    "config": e.config,
                    "bits_per_param": e.bits_per_param,
                    "metrics": {k: _json_float(v) for k, v in e.metrics.items()},
                }
                for e in self.entries
            ],
            "baseline": {k: _json_float(v) for k, v in self.baseline.items()},
            "other_bytes": int(self.other_bytes),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SensitivityReport":
        """Rebuild a report from :meth:`to_dict` output, checking its structure."""
        if not isinstance(data, Mapping) or data.get("format") != "gradcomp-sensitivity":
            raise ValueError("not a gradcomp sensitivity file: expected a JSON object with format 'gradcomp-sensitivity'")
        if data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"sensitivity file version must be {_FORMAT_VERSION}, got {data.get('version')!r}")
        try:
            layers = [
                LayerInfo(
                    name=str(l["name"]),
                    aliases=tuple(l.get("aliases", ())),
                    kind=str(l.get("kind", "")),
                    shape=tuple(int(s) for s in l["shape"]),
                    numel=int(l["numel"]),
                    full_bits=int(l.get("full_bits", 32)),
                )
                for l in data["layers"]
            ]
            entries = [
                SensitivityEntry(
                    layer=str(e["layer"]),
                    candidate=str(e["candidate"]),
                    config=e.get("config"),
                    bits_per_param=float(e["bits_per_param"]),
                    metrics={k: float(v) for k, v in e["metrics"].items()},
                )
                for e in data["entries"]
            ]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed sensitivity file: {type(exc).__name__}: {exc}") from exc
        names = {l.name for l in layers}
        unknown = sorted({e.layer for e in entries} - names)
        if unknown:
            raise ValueError(f"sensitivity entries name layers that are not listed: {unknown}")
        return cls(layers, entries, dict(data.get("baseline", {})), int(data.get("other_bytes", 0)), dict(data.get("metadata", {})))

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        """Write the report as JSON (atomically: a crash never leaves half a file)."""
        _atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "SensitivityReport":
        """Read a report written by :meth:`to_json`."""
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_csv(self, path: Optional[Union[str, os.PathLike]] = None, metric: Optional[str] = None) -> str:
        """Return (and write to ``path`` if given) the sorted table as CSV."""
        rows = self.rows(metric)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["layer"])
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
        if path is not None:
            _atomic_write_text(Path(path), text)
        return text


def _json_float(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
