"""Quantization configs: one frozen, validated dataclass per workflow, and the short spec strings.

* :class:`WeightQuantConfig`: integer weights (bits, where scales are shared, how they are stored).
* :class:`CastConfig`: a plain 16-bit cast of a weight.
* :class:`ActQuantConfig`: fake quantization of layer inputs (static from calibration, or dynamic).

:func:`parse_config` and :func:`config_name` turn a weight config into a short spec string such as
``"int4-g128-asym"`` and back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from gradcomp.checks import check_bits, check_bool, check_choice, check_int, check_number

__all__ = [
    "GRANULARITIES",
    "SCALE_DTYPES",
    "CAST_DTYPES",
    "WeightQuantConfig",
    "CastConfig",
    "Config",
    "Rules",
    "parse_config",
    "config_name",
    "ActQuantConfig",
]

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
SCALE_DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CAST_DTYPES: Dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}


# configs


@dataclass(frozen=True)
class WeightQuantConfig:
    """Integer weight quantization: bits, where scales are shared, and how they are stored.

    Attributes:
        bits: code width, one of (2, 3, 4, 8).
        granularity: ``"per_tensor"`` (one scale), ``"per_channel"`` (one scale per output channel /
            embedding row) or ``"per_group"`` (one scale per ``group_size`` values along the input dim).
        group_size: values per group for ``per_group`` (e.g. 32, 64, 128, 256); ignored otherwise.
        symmetric: absmax scales without zero point, or affine scales with a zero point.
        scale_dtype: how scales are held: ``"fp16"`` (default), ``"bf16"`` or ``"fp32"``.

    Example:
        >>> WeightQuantConfig(bits=4, granularity="per_group", group_size=128, symmetric=False)
    """

    bits: int = 8
    granularity: str = "per_channel"
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: str = "fp16"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_int("group_size", self.group_size)
        check_bool("symmetric", self.symmetric)
        check_choice("scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))

    @property
    def name(self) -> str:
        """Short spec string, e.g. ``"int4-g128-asym"`` (see :func:`parse_config`)."""
        return config_name(self)


@dataclass(frozen=True)
class CastConfig:
    """Plain casting of a weight to a 16-bit float (no integer codes).

    Attributes:
        dtype: ``"fp16"`` or ``"bf16"``.
    """

    dtype: str

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, tuple(CAST_DTYPES))

    @property
    def name(self) -> str:
        """Short spec string: ``"fp16"`` or ``"bf16"``."""
        return self.dtype


Config = Union[WeightQuantConfig, CastConfig]
Rules = Union[Config, Sequence[Tuple[str, Optional[Config]]], Mapping[str, Optional[Config]]]


def config_name(config: Optional[Config]) -> str:
    """Return the short spec string of a config (``None`` is ``"fp32"``, i.e. left as it is).

    Example:
        >>> config_name(WeightQuantConfig(bits=4, granularity="per_group", group_size=128, symmetric=False))
        'int4-g128-asym'
        >>> config_name(WeightQuantConfig(bits=8, scale_dtype="fp32"))
        'int8-channel-sfp32'
    """
    if config is None:
        return "fp32"
    if isinstance(config, CastConfig):
        return config.dtype
    if not isinstance(config, WeightQuantConfig):
        raise TypeError(f"config must be a WeightQuantConfig, CastConfig or None, got {type(config).__name__}")
    gran = {"per_tensor": "tensor", "per_channel": "channel"}.get(config.granularity, f"g{config.group_size}")
    name = f"int{config.bits}-{gran}"
    if not config.symmetric:
        name += "-asym"
    if config.scale_dtype != "fp16":
        name += f"-s{config.scale_dtype}"
    return name


def parse_config(spec: str) -> Optional[Config]:
    """Parse a short spec string into a config.

    Grammar: ``fp32`` (None: keep), ``fp16``, ``bf16``, or ``int<bits>`` followed by optional
    ``-tensor`` | ``-channel`` | ``-g<group_size>``, ``-sym`` | ``-asym`` and ``-s<fp16|bf16|fp32>``
    (scale dtype), in any order. Defaults: per channel, symmetric, fp16 scales.

    Example:
        >>> parse_config("int4-g128-asym")
        WeightQuantConfig(bits=4, granularity='per_group', group_size=128, symmetric=False, scale_dtype='fp16')
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str such as 'int4-g128-asym', got {type(spec).__name__}")
    text = spec.strip().lower()
    if text in ("fp32", "none", "full"):
        return None
    if text in CAST_DTYPES:
        return CastConfig(text)
    parts = re.split(r"[-:_,]", text)
    m = re.fullmatch(r"int(\d+)", parts[0])
    if not m:
        raise ValueError(f"config spec must start with int2/int3/int4/int8 or be fp16/bf16/fp32, got {spec!r}")
    kwargs: Dict[str, Any] = {"bits": int(m.group(1))}
    for p in parts[1:]:
        if p in ("tensor", "pertensor"):
            kwargs["granularity"] = "per_tensor"
        elif p in ("channel", "perchannel"):
            kwargs["granularity"] = "per_channel"
        elif re.fullmatch(r"g\d+", p):
            kwargs["granularity"] = "per_group"
            kwargs["group_size"] = int(p[1:])
        elif p in ("sym", "asym"):
            kwargs["symmetric"] = p == "sym"
        elif p[:1] == "s" and p[1:] in SCALE_DTYPES:
            kwargs["scale_dtype"] = p[1:]
        else:
            raise ValueError(
                f"unknown part {p!r} in config spec {spec!r}; expected tensor, channel, g<N>, sym, asym or s<fp16|bf16|fp32>"
            )
    return WeightQuantConfig(**kwargs)


def _config_to_dict(config: Config) -> Dict[str, Any]:
    if isinstance(config, CastConfig):
        return {"type": "cast", "dtype": config.dtype}
    return {
        "type": "int",
        "bits": config.bits,
        "granularity": config.granularity,
        "group_size": config.group_size,
        "symmetric": config.symmetric,
        "scale_dtype": config.scale_dtype,
    }


def _config_from_dict(d: Mapping[str, Any], where: str) -> Config:
    try:
        if d["type"] == "cast":
            return CastConfig(d["dtype"])
        if d["type"] == "int":
            return WeightQuantConfig(
                bits=d["bits"], granularity=d["granularity"], group_size=d["group_size"],
                symmetric=d["symmetric"], scale_dtype=d["scale_dtype"],
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: invalid quantization config {dict(d)!r} ({exc})") from exc
    raise ValueError(f"{where}: config type must be 'int' or 'cast', got {d.get('type')!r}")


def _check_config(config: Any, what: str = "config") -> None:
    if not isinstance(config, (WeightQuantConfig, CastConfig)):
        raise TypeError(f"{what} must be a WeightQuantConfig or CastConfig, got {type(config).__name__}")




# --------------------------------------------------------------------------------------------
# activation quantization of layer inputs


_STATIC_OBSERVERS = ("minmax", "moving_average", "per_channel", "percentile", "mse", "kl", "auto")
_DYNAMIC_GRANULARITIES = ("per_token", "per_tensor")


@dataclass(frozen=True)
class ActQuantConfig:
    """How to quantize the inputs of the chosen layers.

    Args:
        bits: code width, one of ``SUPPORTED_BITS``.
        observer: for static quantization, one of ``minmax``, ``moving_average``, ``per_channel``,
            ``percentile``, ``mse``, ``kl``, or ``auto``: per layer, the one of ``candidates`` with the
            least output error on the held-out share of the calibration batches
            (:mod:`gradcomp.quant.observer_selection`).
        symmetric: codec scales without a zero point (True) or affine with one (False).
        dynamic: compute scales on the fly from each input instead of from calibration.
        granularity: for dynamic quantization, ``per_token`` (one scale per row of the last axis)
            or ``per_tensor``.
        percentile: ``p`` of the percentile observer.
        bins: histogram bins of the percentile, mse and kl observers.
        averaging_constant: of the moving-average observer.
        candidates: the observers ``auto`` chooses from (per-tensor ones by default, which the int8
            kernels can run; add ``per_channel`` to consider it).
        holdout: the share of calibration batches ``auto`` holds out to score the candidates.

    Example: ``ActQuantConfig(bits=8, observer="kl")`` (static) or
    ``ActQuantConfig(bits=8, dynamic=True, granularity="per_token")``.
    """

    bits: int = 8
    observer: str = "minmax"
    symmetric: bool = False
    dynamic: bool = False
    granularity: str = "per_token"
    percentile: float = 99.99
    bins: int = 2048
    averaging_constant: float = 0.01
    candidates: Tuple[str, ...] = ("minmax", "mse", "percentile", "kl")
    holdout: float = 0.25

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_choice("observer", self.observer, _STATIC_OBSERVERS)
        check_bool("symmetric", self.symmetric)
        check_bool("dynamic", self.dynamic)
        check_choice("granularity", self.granularity, _DYNAMIC_GRANULARITIES)
        check_number("percentile", self.percentile, low=50.0, high=100.0, low_open=True)
        check_int("bins", self.bins, 2)
        check_number("averaging_constant", self.averaging_constant, low=0.0, high=1.0, low_open=True)
        if isinstance(self.candidates, list):   # from JSON
            object.__setattr__(self, "candidates", tuple(self.candidates))
        if (not isinstance(self.candidates, tuple) or not self.candidates or len(set(self.candidates)) != len(self.candidates)
                or not all(c in _STATIC_OBSERVERS and c != "auto" for c in self.candidates)):
            raise ValueError(f"candidates must be distinct names from {_STATIC_OBSERVERS[:-1]}, got {self.candidates!r}")
        check_number("holdout", self.holdout, low=0.0, high=1.0, low_open=True)

    @property
    def label(self) -> str:
        """Short name, e.g. ``A8 kl`` or ``A8 dynamic per_token``."""
        if self.dynamic:
            return f"A{self.bits} dynamic {self.granularity}"
        return f"A{self.bits} {self.observer}"

