"""Weight quantization of a model: configs, packed modules, ``quantize_``, real size, save/load, quality.

The weight quantizer is the codec's (:mod:`gradcomp.codec`): a weight is viewed as ``rows`` of
``row_len`` values (``rows = shape[0]``, the output channel of ``nn.Linear`` and ``nn.Conv2d``, the
token of ``nn.Embedding``) and cut into blocks that each get one scale:

* ``per_tensor``: one block for the whole tensor;
* ``per_channel``: one block per row (``weight.reshape(out, -1)``);
* ``per_group``: blocks of ``group_size`` consecutive values along the input dimension of each row.
  When ``row_len`` is not a multiple of ``group_size`` the last group of every row is shorter (it is
  zero-padded for the scale computation only; padding is never stored). Conv2d rows are the
  flattened ``in/groups * kh * kw`` values.

Scales come from :func:`gradcomp.codec.choose_qparams` in fp32 and are then stored as
``scale_dtype`` (fp16 by default, like most int4 formats). A stored fp16/bf16 scale is rounded *up*
to the next representable value, so no value is clipped, and the codes are made with that very
stored scale (:func:`gradcomp.codec.quantize_codes_with_qparams`), so dequantization reproduces
exactly what was meant. Asymmetric zero points are integers in ``[0, 2**bits - 1]`` and are held
packed at ``bits`` bits like the codes.

Worked example (int4, group 128, symmetric, fp16 scales): a ``4096 x 4096`` weight holds
``4096 * 4096 / 2 = 8 MiB`` of packed codes and ``4096 * 32`` fp16 scales (256 KiB), i.e.
``4 + 16 / 128 = 4.125`` bits per weight; asymmetric adds a 4-bit zero point per group,
``4.125 + 4 / 128 = 4.15625`` bits.

:func:`quantize_` swaps ``nn.Linear``, ``nn.Embedding`` and ``nn.Conv2d`` for modules that hold the
packed codes and scales and dequantize on the fly in ``forward``. Layers can be selected by rules
(exact name, glob, or ``re:<regex>``; first match wins; ``None`` keeps a layer in full precision)
and a filter function. :func:`save_quantized` writes plain tensors plus a JSON quantization map
into a safetensors file (no pickled tensor subclasses); :func:`load_quantized` restores them into a
freshly built model, bit-identically.

Example::

    >>> model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> quantize_(model, [("0", WeightQuantConfig(bits=4, granularity="per_group", group_size=128)),
    ...                   ("*", WeightQuantConfig(bits=8))])
    >>> save_quantized(model, "m.safetensors")
    >>> fresh = load_quantized(build_model_on_meta(), "m.safetensors")
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcomp.codec import (
    SUPPORTED_BITS,
    choose_qparams,
    cosine_similarity,
    dequantize_codes,
    mse,
    pack_codes,
    packed_nbytes,
    quantize_codes_with_qparams,
    sqnr_db,
    unpack_codes,
)

logger = logging.getLogger(__name__)

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
    "fake_quantize_weight",
    "PackedWeight",
    "QuantizedLinear",
    "QuantizedEmbedding",
    "QuantizedConv2d",
    "quantize_",
    "resolve_config",
    "quantizable_layers",
    "model_size_bytes",
    "weight_nbytes",
    "weight_bits_per_param",
    "predict_model_size_bytes",
    "size_table",
    "save_quantized",
    "load_quantized",
    "quantize_state_dict",
    "save_quantized_state_dict",
    "load_quantized_state_dict",
    "load_tensor_file",
    "LayerQuality",
    "WeightStats",
    "layer_quality",
    "weight_stats",
    "WeightReport",
    "analyze_weights",
    "weight_tensors",
]

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
SCALE_DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CAST_DTYPES: Dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES: Dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}
_FORMAT = "gradcomp.weights"
_FORMAT_VERSION = "1"


# --------------------------------------------------------------------------------------------
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
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits must be an int, one of {SUPPORTED_BITS}, got {type(self.bits).__name__} {self.bits!r}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise TypeError(f"group_size must be a positive int, got {type(self.group_size).__name__} {self.group_size!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(self.symmetric).__name__} {self.symmetric!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")

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
        if self.dtype not in CAST_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(CAST_DTYPES)}, got {self.dtype!r}")

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
# the quantizer (codec) on a weight's layout


@dataclass(frozen=True)
class _Layout:
    """How a weight of ``shape`` is cut into blocks: ``rows`` rows of ``row_len``, ``groups`` blocks of ``block`` per row."""

    shape: Tuple[int, ...]
    rows: int
    row_len: int
    block: int
    groups: int

    @property
    def numel(self) -> int:
        return self.rows * self.row_len

    @property
    def padded(self) -> bool:
        return self.groups * self.block != self.row_len


def _layout(shape: Sequence[int], config: WeightQuantConfig) -> _Layout:
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if numel == 0:
        raise ValueError(f"cannot quantize an empty weight of shape {shape}")
    if config.granularity == "per_tensor" or len(shape) < 2:
        rows = 1
    else:
        rows = shape[0]
    row_len = numel // rows
    if config.granularity == "per_group":
        block = config.group_size
        groups = -(-row_len // block)
    else:
        block, groups = row_len, 1
    return _Layout(shape, rows, row_len, block, groups)


def _store_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Cast fp32 scales to the storage dtype, rounding up so that no value gets clipped."""
    dtype = SCALE_DTYPES[scale_dtype]
    if dtype == torch.float32:
        return scale
    stored = scale.to(dtype)
    finite = torch.isfinite(scale)
    if scale.device.type != "meta" and bool((finite & ~torch.isfinite(stored)).any()):
        raise ValueError(
            f"a scale of {float(scale[finite].max()):.4g} overflows scale_dtype={scale_dtype!r}; use scale_dtype='fp32'"
        )
    # Positive finite floats are ordered like their bit patterns, so +1 on the bits is the next
    # representable value; this also lifts a scale that underflowed to 0 to the smallest subnormal.
    low = finite & (stored.float() < scale)
    bumped = (stored.view(torch.int16) + 1).view(dtype)
    return torch.where(low, bumped, stored)


def _quantize_weight(weight: torch.Tensor, config: WeightQuantConfig):
    """Return (codes (rows, groups*block) uint8, stored scale (rows*groups,), zero point or None, layout)."""
    lay = _layout(weight.shape, config)
    w = weight.detach().reshape(lay.rows, lay.row_len)
    if lay.padded:
        # Zeros never change a block's range: absmax ignores them and affine ranges always hold 0.
        w = F.pad(w, (0, lay.groups * lay.block - lay.row_len))
    xb = w.reshape(lay.rows * lay.groups, lay.block)
    scale, zp = choose_qparams(xb.amin(dim=1), xb.amax(dim=1), config.bits, config.symmetric)
    scale = _store_scale(scale, config.scale_dtype)
    codes = quantize_codes_with_qparams(xb, scale, zp, config.bits)
    return codes.view(lay.rows, lay.groups * lay.block), scale, zp, lay


def _dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zp: Optional[torch.Tensor], lay: _Layout, bits: int) -> torch.Tensor:
    """Dequantize codes ``(r, row_len)`` (or already padded) of ``r`` rows to fp32 ``(r, row_len)``."""
    r = codes.shape[0]
    full = lay.groups * lay.block
    if codes.shape[1] != full:
        codes = F.pad(codes, (0, full - codes.shape[1]))
    out = dequantize_codes(codes.reshape(r * lay.groups, lay.block), scale.reshape(-1).float(),
                           None if zp is None else zp.reshape(-1), bits)
    out = out.view(r, full)
    return out[:, : lay.row_len] if full != lay.row_len else out


def fake_quantize_weight(weight: torch.Tensor, config: Optional[Config]) -> torch.Tensor:
    """Quantize and dequantize a weight (same shape and dtype) as :func:`quantize_` would store it.

    Args:
        weight: floating tensor (``(out, in)``, ``(num, dim)`` or ``(out, in/g, kh, kw)``; 1-D tensors
            are one row).
        config: a :class:`WeightQuantConfig`, a :class:`CastConfig`, or None (returns a copy).

    Returns:
        The reconstruction that a quantized layer uses in its forward, bit for bit.

    Example: ``w = [[0.5, -1.0, 0.25, 0.0]]`` with ``WeightQuantConfig(bits=4, scale_dtype="fp32")``:
    scale ``1/7``, codes ``[4, -7, 2, 0]`` -> ``[0.571, -1.0, 0.286, 0.0]``.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating torch.Tensor, got {type(weight).__name__} {getattr(weight, 'dtype', '')}")
    if config is None:
        return weight.detach().clone()
    _check_config(config)
    if isinstance(config, CastConfig):
        return weight.detach().to(CAST_DTYPES[config.dtype]).to(weight.dtype)
    codes, scale, zp, lay = _quantize_weight(weight, config)
    return _dequantize_rows(codes, scale, zp, lay, config.bits).reshape(weight.shape).to(weight.dtype)


# --------------------------------------------------------------------------------------------
# packed weights and quantized modules


def weight_nbytes(config: Optional[Config], shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """Return the bytes a weight of ``shape`` holds under ``config``: codes, scales and zero points.

    Args:
        config: the config, or None for the weight as it is (``dtype``).
        shape: the weight's shape.
        dtype: the dtype of an unquantized weight (only used when ``config`` is None).

    Returns:
        Exact bytes, equal to :attr:`PackedWeight.nbytes` of a weight quantized with ``config``.

    Example: int4 g128 symmetric fp16 scales on ``(4096, 4096)``: ``8388608 + 4096*32*2 = 8650752``.
    """
    numel = math.prod(int(s) for s in shape)
    if config is None:
        return numel * torch.empty((), dtype=dtype).element_size()
    _check_config(config)
    if isinstance(config, CastConfig):
        return numel * 2
    lay = _layout(shape, config)
    blocks = lay.rows * lay.groups
    zp = 0 if config.symmetric else packed_nbytes(blocks, config.bits)
    return packed_nbytes(lay.numel, config.bits) + blocks * SCALE_DTYPES[config.scale_dtype].itemsize + zp


def weight_bits_per_param(config: Optional[Config], shape: Sequence[int]) -> float:
    """Return the real cost in bits per weight of ``config`` on a weight of ``shape``, overheads counted.

    Example:
        >>> weight_bits_per_param(WeightQuantConfig(bits=4, granularity="per_group", group_size=128), (4096, 4096))
        4.125
        >>> weight_bits_per_param(WeightQuantConfig(bits=8), (4096, 4096))   # one fp16 scale per row
        8.00390625
    """
    numel = math.prod(int(s) for s in shape)
    if numel == 0:
        raise ValueError(f"shape must have at least one element, got {tuple(shape)}")
    return 8.0 * weight_nbytes(config, shape) / numel


class PackedWeight(nn.Module):
    """A weight held as packed integer codes plus scales (and zero points), or as a 16-bit cast.

    Buffers: ``qweight`` (flat uint8 packed codes, or the fp16/bf16 weight for a :class:`CastConfig`),
    ``scale`` (``(rows, groups)`` in ``scale_dtype``) and, when asymmetric, ``zero_point`` (flat uint8,
    zero points packed at ``bits`` bits). Two layers that share a weight (tied embeddings) share one
    ``PackedWeight``.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: Optional[torch.Tensor],
        zero_point: Optional[torch.Tensor],
        config: Config,
        shape: Sequence[int],
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._check(qweight, scale, zero_point)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self._layout = None if isinstance(config, CastConfig) else _layout(self.shape, config)

    def _check(self, qweight: torch.Tensor, scale: Optional[torch.Tensor], zp: Optional[torch.Tensor]) -> None:
        cfg = self.config
        if isinstance(cfg, CastConfig):
            want = CAST_DTYPES[cfg.dtype]
            if qweight.dtype != want or tuple(qweight.shape) != self.shape:
                raise ValueError(f"qweight must be {want} of shape {self.shape}, got {qweight.dtype} of shape {tuple(qweight.shape)}")
            if scale is not None or zp is not None:
                raise ValueError("a cast weight holds no scale or zero_point")
            return
        lay = _layout(self.shape, cfg)
        need = packed_nbytes(lay.numel, cfg.bits)
        if qweight.dtype != torch.uint8 or qweight.dim() != 1 or qweight.numel() != need:
            raise ValueError(f"qweight must be flat uint8 of {need} bytes for shape {self.shape} and {cfg.name}, "
                             f"got {qweight.dtype} of shape {tuple(qweight.shape)}")
        sdt = SCALE_DTYPES[cfg.scale_dtype]
        if scale is None or scale.dtype != sdt or tuple(scale.shape) != (lay.rows, lay.groups):
            got = "None" if scale is None else f"{scale.dtype} of shape {tuple(scale.shape)}"
            raise ValueError(f"scale must be {sdt} of shape {(lay.rows, lay.groups)} for {cfg.name}, got {got}")
        if cfg.symmetric:
            if zp is not None:
                raise ValueError(f"a symmetric config ({cfg.name}) holds no zero_point")
        else:
            need_zp = packed_nbytes(lay.rows * lay.groups, cfg.bits)
            if zp is None or zp.dtype != torch.uint8 or tuple(zp.shape) != (need_zp,):
                got = "None" if zp is None else f"{zp.dtype} of shape {tuple(zp.shape)}"
                raise ValueError(f"zero_point must be flat uint8 of {need_zp} bytes for {cfg.name}, got {got}")

    @classmethod
    def from_weight(cls, weight: torch.Tensor, config: Config) -> "PackedWeight":
        """Quantize ``weight`` with ``config`` and pack it.

        Args:
            weight: floating tensor of any shape with at least one element.
            config: a :class:`WeightQuantConfig` or :class:`CastConfig`.

        Returns:
            A :class:`PackedWeight` on ``weight``'s device.
        """
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating torch.Tensor, got {type(weight).__name__}")
        _check_config(config)
        w = weight.detach()
        if isinstance(config, CastConfig):
            return cls(w.to(CAST_DTYPES[config.dtype]).clone(), None, None, config, w.shape, w.dtype)
        codes, scale, zp, lay = _quantize_weight(w, config)
        if lay.padded:
            codes = codes[:, : lay.row_len]
        packed = pack_codes(codes.contiguous(), config.bits)
        pzp = None if zp is None else pack_codes(zp.to(torch.uint8), config.bits)
        return cls(packed, scale.reshape(lay.rows, lay.groups).contiguous(), pzp, config, w.shape, w.dtype)

    def _apply(self, fn, recurse: bool = True):
        # Moves between devices apply as usual, but a dtype conversion (model.half(), .to(bf16))
        # must not touch the stored representation: the scales stay in scale_dtype and a cast weight
        # stays in its dtype. Only the dtype that dequantization returns by default follows.
        probe = fn(torch.zeros(1, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        for key, buf in self._buffers.items():
            if buf is None:
                continue
            out = fn(buf)
            if out.dtype != buf.dtype:
                out = buf.to(device=out.device)
            self._buffers[key] = out
        return self

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (codes, scales, zero points)."""
        return sum(b.numel() * b.element_size() for b in (self.qweight, self.scale, self.zero_point) if b is not None)

    def _zero_points(self) -> Optional[torch.Tensor]:
        if self.zero_point is None:
            return None
        lay = self._layout
        return unpack_codes(self.zero_point, self.config.bits, lay.rows * lay.groups).view(lay.rows, lay.groups)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Return the weight reconstructed in ``dtype`` (default: the original weight's dtype)."""
        dtype = self.dtype if dtype is None else dtype
        if isinstance(self.config, CastConfig):
            return self.qweight.to(dtype)
        lay = self._layout
        codes = unpack_codes(self.qweight, self.config.bits, lay.numel).view(lay.rows, lay.row_len)
        out = _dequantize_rows(codes, self.scale, self._zero_points(), lay, self.config.bits)
        return out.reshape(self.shape).to(dtype)

    def dequantize_rows(self, index: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Return rows ``index`` (any integer shape) of a 2-D weight without dequantizing the others.

        Used by :class:`QuantizedEmbedding`: only the looked-up rows are unpacked when a row fills a
        whole number of bytes; otherwise the full weight is dequantized and indexed.
        """
        dtype = self.dtype if dtype is None else dtype
        if len(self.shape) != 2:
            raise ValueError(f"dequantize_rows needs a 2-D weight, this one has shape {self.shape}")
        cfg = self.config
        if isinstance(cfg, CastConfig):
            return F.embedding(index, self.qweight).to(dtype)
        lay = self._layout
        row_bits = lay.row_len * cfg.bits
        aligned = lay.rows == self.shape[0] and row_bits % (24 if cfg.bits == 3 else 8) == 0
        if not aligned:
            return F.embedding(index, self.dequantize(dtype))
        flat = index.reshape(-1)
        row_bytes = row_bits // 8
        packed = self.qweight.view(lay.rows, row_bytes)[flat].reshape(-1)
        codes = unpack_codes(packed, cfg.bits, flat.numel() * lay.row_len).view(flat.numel(), lay.row_len)
        zp = self._zero_points()
        out = _dequantize_rows(codes, self.scale[flat], None if zp is None else zp[flat], lay, cfg.bits)
        return out.reshape(*index.shape, lay.row_len).to(dtype)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, config={config_name(self.config)}, nbytes={self.nbytes}"


class _QuantizedLayer(nn.Module):
    """Common part of the quantized layers: a (possibly shared) :class:`PackedWeight` and a bias."""

    kind = ""

    def __init__(self, packed: PackedWeight, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        if not isinstance(packed, PackedWeight):
            raise TypeError(f"packed must be a PackedWeight, got {type(packed).__name__}")
        self.packed = packed
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a new tensor each time; read-only view of the packed data)."""
        return self.packed.dequantize()

    @property
    def config(self) -> Config:
        """The quantization config of the weight."""
        return self.packed.config

    def _bias_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.bias is None or self.bias.dtype == x.dtype:
            return self.bias
        return self.bias.to(x.dtype)


class QuantizedLinear(_QuantizedLayer):
    """``nn.Linear`` with a packed weight, dequantized to the input's dtype in every forward."""

    kind = "linear"

    def __init__(self, packed: PackedWeight, bias: Optional[torch.Tensor]) -> None:
        super().__init__(packed, bias)
        if len(packed.shape) != 2:
            raise ValueError(f"a linear weight must be 2-D, got shape {packed.shape}")
        self.out_features, self.in_features = packed.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x @ W^T + b`` with ``W`` dequantized to ``x.dtype``."""
        return F.linear(x, self.packed.dequantize(x.dtype), self._bias_for(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantizedEmbedding(_QuantizedLayer):
    """``nn.Embedding`` with a packed table; a lookup unpacks only the rows it needs."""

    kind = "embedding"

    def __init__(self, packed: PackedWeight, padding_idx: Optional[int] = None) -> None:
        super().__init__(packed, None)
        if len(packed.shape) != 2:
            raise ValueError(f"an embedding weight must be 2-D, got shape {packed.shape}")
        self.num_embeddings, self.embedding_dim = packed.shape
        self.padding_idx = padding_idx

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Return the dequantized rows ``index`` (shape ``index.shape + (embedding_dim,)``)."""
        return self.packed.dequantize_rows(index)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"


class QuantizedConv2d(_QuantizedLayer):
    """``nn.Conv2d`` with a packed weight (rows = output channels, flattened ``in/groups*kh*kw``)."""

    kind = "conv2d"

    def __init__(self, packed: PackedWeight, bias: Optional[torch.Tensor], *, stride, padding, dilation, groups: int,
                 padding_mode: str = "zeros", reversed_padding: Optional[Sequence[int]] = None) -> None:
        super().__init__(packed, bias)
        if len(packed.shape) != 4:
            raise ValueError(f"a conv2d weight must be 4-D, got shape {packed.shape}")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode = padding_mode
        if padding_mode != "zeros" and reversed_padding is None:
            if isinstance(padding, str):
                raise ValueError(f"padding={padding!r} with padding_mode={padding_mode!r} needs reversed_padding "
                                 "(take it from the nn.Conv2d's _reversed_padding_repeated_twice)")
            reversed_padding = [p for p in reversed(padding) for _ in range(2)]
        # F.pad order: (left, right, top, bottom), as nn.Conv2d keeps it.
        self._reversed_padding = None if reversed_padding is None else list(reversed_padding)
        self.out_channels = packed.shape[0]
        self.in_channels = packed.shape[1] * groups
        self.kernel_size = tuple(packed.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the convolution of ``x`` with the weight dequantized to ``x.dtype``."""
        w = self.packed.dequantize(x.dtype)
        if self.padding_mode != "zeros":
            # Same as nn.Conv2d: explicit padding of the requested mode, then a convolution without padding.
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            return F.conv2d(x, w, self._bias_for(x), self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self._bias_for(x), self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")


_SUPPORTED = (nn.Linear, nn.Embedding, nn.Conv2d)
_KIND_OF = {nn.Linear: "linear", nn.Embedding: "embedding", nn.Conv2d: "conv2d"}
_QCLASS = {"linear": QuantizedLinear, "embedding": QuantizedEmbedding, "conv2d": QuantizedConv2d}


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, _QuantizedLayer):
        return module.kind
    for cls, kind in _KIND_OF.items():
        if isinstance(module, cls):
            return kind
    return None


def _swap(module: nn.Module, packed: PackedWeight, fqn: str) -> _QuantizedLayer:
    """Build the quantized replacement of a supported (plain or quantized) module around ``packed``."""
    if isinstance(module, QuantizedLinear):
        return QuantizedLinear(packed, module.bias)
    if isinstance(module, QuantizedEmbedding):
        return QuantizedEmbedding(packed, module.padding_idx)
    if isinstance(module, QuantizedConv2d):
        return QuantizedConv2d(packed, module.bias, stride=module.stride, padding=module.padding,
                               dilation=module.dilation, groups=module.groups, padding_mode=module.padding_mode,
                               reversed_padding=module._reversed_padding)
    if isinstance(module, nn.Linear):
        return QuantizedLinear(packed, module.bias)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise ValueError(f"layer {fqn!r}: nn.Embedding with max_norm renormalises its weight in place and cannot be quantized")
        return QuantizedEmbedding(packed, module.padding_idx)
    if isinstance(module, nn.Conv2d):
        return QuantizedConv2d(packed, module.bias, stride=module.stride, padding=module.padding,
                               dilation=module.dilation, groups=module.groups, padding_mode=module.padding_mode,
                               reversed_padding=getattr(module, "_reversed_padding_repeated_twice", None))
    raise TypeError(f"layer {fqn!r}: cannot quantize a {type(module).__name__}")


# --------------------------------------------------------------------------------------------
# rules and quantize_


def _normalize_rules(config_or_rules: Rules) -> List[Tuple[str, Optional[Config]]]:
    if isinstance(config_or_rules, (WeightQuantConfig, CastConfig)):
        return [("*", config_or_rules)]
    if isinstance(config_or_rules, Mapping):
        items = list(config_or_rules.items())
    elif isinstance(config_or_rules, (list, tuple)):
        items = list(config_or_rules)
    else:
        raise TypeError(
            f"config_or_rules must be a WeightQuantConfig, a CastConfig or a list of (pattern, config or None), "
            f"got {type(config_or_rules).__name__}"
        )
    rules = []
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"rule {i} must be a (pattern, config or None) pair, got {item!r}")
        pattern, cfg = item
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"rule {i}: pattern must be a non-empty str, got {pattern!r}")
        if cfg is not None:
            _check_config(cfg, f"rule {i} ({pattern!r}) config")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ValueError(f"rule {i}: invalid regular expression {pattern[3:]!r}: {exc}") from exc
        rules.append((pattern, cfg))
    return rules


def _matches(pattern: str, fqn: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(fqn, pattern)
    return pattern == fqn


def resolve_config(fqn: str, config_or_rules: Rules) -> Tuple[bool, Optional[Config]]:
    """Return ``(matched, config)`` for the layer named ``fqn`` under a config or ordered rules.

    A pattern is an exact fully qualified name, a glob (``"blocks.*.mlp.*"``; ``*`` also crosses
    dots) or ``"re:<regex>"`` (full match). The first matching rule wins; its config may be None
    (keep in full precision). ``matched`` is False when no rule matches.

    Example:
        >>> resolve_config("blocks.0.mlp.fc", [("re:.*attn.*", None), ("blocks.*", WeightQuantConfig(bits=4))])
        (True, WeightQuantConfig(bits=4, ...))
    """
    for pattern, cfg in _normalize_rules(config_or_rules):
        if _matches(pattern, fqn):
            return True, cfg
    return False, None


def quantizable_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Return ``(fqn, module)`` for every ``nn.Linear``, ``nn.Embedding`` and ``nn.Conv2d`` of ``model``.

    Shared module instances are listed under each name they have. Already quantized layers are left out.
    """
    out = []
    for fqn, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, _SUPPORTED) and not isinstance(m, _QuantizedLayer):
            out.append((fqn, m))
    return out


def _plan(model: nn.Module, config_or_rules: Rules, filter_fn) -> List[Tuple[str, nn.Module, Config]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rules = _normalize_rules(config_or_rules)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, fqn) -> bool, got {type(filter_fn).__name__}")
    used = set()
    plan = []
    for fqn, m in quantizable_layers(model):
        if fqn == "":
            raise ValueError("the model itself is a single layer; wrap it in a container (nn.Sequential) to quantize it in place")
        cfg = None
        for i, (pattern, c) in enumerate(rules):
            if _matches(pattern, fqn):
                used.add(i)
                cfg = c
                break
        if cfg is None or (filter_fn is not None and not filter_fn(m, fqn)):
            continue
        w = m.weight
        if isinstance(w, nn.parameter.UninitializedParameter):
            raise ValueError(f"layer {fqn!r}: the weight is not initialised yet (lazy module); run a forward first")
        plan.append((fqn, m, cfg))
    if len(rules) > 1 or rules[0][0] != "*":
        for i, (pattern, _) in enumerate(rules):
            if i not in used:
                logger.warning("quantization rule %d (%r) matched no layer", i, pattern)
    return plan


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(model: nn.Module, config_or_rules: Rules, *, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Swap the model's Linear, Embedding and Conv2d layers for packed quantized ones, in place.

    Steps:
        1. List the supported layers by fully qualified name; pick each one's config: the single
           config, or the first rule whose pattern matches (a None config or no match leaves the layer
           as it is); drop layers for which ``filter_fn(module, fqn)`` is False.
        2. Quantize every selected weight with the codec and pack it (nothing is changed yet, so a
           bad weight or config leaves the model untouched). Layers sharing one weight with the same
           config share one :class:`PackedWeight`.
        3. Replace the layers.

    Args:
        model: the model (any device; the packed buffers live where the weights were).
        config_or_rules: one config for every supported layer, or an ordered list (or dict) of
            ``(pattern, config or None)``.
        filter_fn: optional ``(module, fqn) -> bool``; False keeps that layer in full precision.

    Returns:
        ``model`` itself.

    Example:
        >>> quantize_(model, [("lm_head", None), ("re:blocks\\.\\d+\\.attn\\..*", WeightQuantConfig(bits=8)),
        ...                   ("*", WeightQuantConfig(bits=4, granularity="per_group", group_size=64))])
    """
    plan = _plan(model, config_or_rules, filter_fn)
    shared: Dict[Tuple[int, Config], PackedWeight] = {}
    new: Dict[str, _QuantizedLayer] = {}
    configs_of_weight: Dict[int, set] = {}
    for fqn, m, cfg in plan:
        w = m.weight
        if not w.is_floating_point():
            raise TypeError(f"layer {fqn!r}: weight must be floating point, got {w.dtype}")
        if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer {fqn!r}: the weight holds inf or nan values; refusing to quantize it")
        key = (id(w), cfg)
        packed = shared.get(key)
        if packed is None:
            try:
                packed = PackedWeight.from_weight(w, cfg)
            except ValueError as exc:
                raise ValueError(f"layer {fqn!r}: {exc}") from exc
            shared[key] = packed
        configs_of_weight.setdefault(id(w), set()).add(cfg)
        new[fqn] = _swap(m, packed, fqn)
    for fqn, m, cfg in plan:
        if len(configs_of_weight[id(m.weight)]) > 1:
            logger.warning("layer %r shares its weight with a layer quantized differently; each holds its own copy", fqn)
    for fqn, q in new.items():
        _set_submodule(model, fqn, q)
    logger.info("quantized %d layers: %s", len(new), sorted({config_name(c) for _, _, c in plan}))
    return model


# --------------------------------------------------------------------------------------------
# size accounting


def _unique_tensors(model: nn.Module) -> List[torch.Tensor]:
    seen = set()
    out = []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def model_size_bytes(model: nn.Module) -> int:
    """Return the bytes the model actually holds: parameters and buffers, each shared tensor once.

    Packed codes, scales and zero points are buffers of the quantized layers, so they are counted
    as stored. For a saved model this equals the tensor bytes of the safetensors file.

    Example: ``nn.Linear(256, 64)`` in fp32 holds ``(256*64 + 64) * 4 = 65792`` bytes; after
    ``quantize_`` with int4 g128 symmetric fp16 scales it holds ``8192 + 64*2*2 + 64*4 = 8704``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def predict_model_size_bytes(model: nn.Module, config_or_rules: Rules, *, filter_fn=None) -> int:
    """Return what :func:`model_size_bytes` will give after ``quantize_(model, config_or_rules)``, without quantizing.

    The arithmetic is :func:`weight_nbytes` per selected layer; a weight that another, unselected
    module still holds stays counted, and layers sharing a weight and a config count it once.
    """
    plan = _plan(model, config_or_rules, filter_fn)
    swapped = {id(m) for _, m, _ in plan}
    held: Dict[int, torch.Tensor] = {}
    for m in model.modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is None or (id(m) in swapped and name == "weight"):
                continue
            held[id(t)] = t
    total = sum(t.numel() * t.element_size() for t in held.values())
    packed = {(id(m.weight), cfg): weight_nbytes(cfg, m.weight.shape) for _, m, cfg in plan}
    return total + sum(packed.values())


def size_table(num_params: int, configs: Optional[Sequence[Optional[Config]]] = None, *, row_length: int = 4096) -> List[Dict[str, Any]]:
    """Return what ``num_params`` weights cost at each precision, scale overhead included.

    The weights are taken as rows of ``row_length`` inputs (a model whose layers have that input
    width); the arithmetic is that of :func:`weight_nbytes`, i.e. of the modules that are really built.

    Args:
        num_params: number of weights (e.g. ``7e9``).
        configs: configs to list (None entries mean fp32); default fp32, fp16, int8 per channel,
            int4 g128 (sym and asym), int3 g128, int2 g64.
        row_length: inputs per row.

    Returns:
        Rows ``{"config", "bits_per_weight", "bytes", "GB", "GiB", "vs_fp32"}``.

    Example: 7e9 weights in int4 g128 with fp16 scales: 4.125 bits each, 3.61 GB (not 3.5).
    """
    if isinstance(num_params, bool) or not isinstance(num_params, (int, float)) or num_params < 1:
        raise ValueError(f"num_params must be a positive number, got {num_params!r}")
    if isinstance(row_length, bool) or not isinstance(row_length, int) or row_length < 1:
        raise ValueError(f"row_length must be a positive int, got {row_length!r}")
    n = int(num_params)
    if configs is None:
        configs = [None, CastConfig("fp16"), WeightQuantConfig(bits=8),
                   WeightQuantConfig(bits=4, granularity="per_group", group_size=128),
                   WeightQuantConfig(bits=4, granularity="per_group", group_size=128, symmetric=False),
                   WeightQuantConfig(bits=3, granularity="per_group", group_size=128),
                   WeightQuantConfig(bits=2, granularity="per_group", group_size=64, symmetric=False)]
    rows_full, rest = divmod(n, row_length)
    rows = []
    for cfg in configs:
        nbytes = 0
        if rows_full:
            nbytes += weight_nbytes(cfg, (rows_full, row_length))
        if rest:
            nbytes += weight_nbytes(cfg, (1, rest))
        rows.append({
            "config": config_name(cfg),
            "bits_per_weight": 8.0 * nbytes / n,
            "bytes": nbytes,
            "GB": nbytes / 1e9,
            "GiB": nbytes / 2**30,
            "vs_fp32": nbytes / (4.0 * n),
        })
    return rows


# --------------------------------------------------------------------------------------------
# save / load (safetensors + JSON quantization map)


def _quantized_entries(model: nn.Module) -> Dict[str, _QuantizedLayer]:
    return {fqn: m for fqn, m in model.named_modules(remove_duplicate=False) if isinstance(m, _QuantizedLayer)}


def _layer_record(kind: str, packed: PackedWeight) -> Dict[str, Any]:
    return {
        "kind": kind,
        "config": _config_to_dict(packed.config),
        "weight_shape": list(packed.shape),
        "weight_dtype": _DTYPE_NAMES.get(packed.dtype, str(packed.dtype)),
    }


def _packed_tensors(fqn: str, packed: PackedWeight) -> Dict[str, torch.Tensor]:
    out = {f"{fqn}.qweight": packed.qweight}
    if packed.scale is not None:
        out[f"{fqn}.scale"] = packed.scale
    if packed.zero_point is not None:
        out[f"{fqn}.zero_point"] = packed.zero_point
    return out


def _write(path: Union[str, os.PathLike], layers: Dict[str, Dict[str, Any]], tensors: Dict[str, torch.Tensor]) -> None:
    """Write tensors (shared ones once, with aliases) and the map to ``path`` atomically."""
    from safetensors.torch import save_file

    out: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    first_of: Dict[Tuple[int, int, Tuple[int, ...], torch.dtype], str] = {}
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device and has no data to save")
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in first_of:
            aliases[name] = first_of[key]
            continue
        if key is not None:
            first_of[key] = name
        out[name] = t.to("cpu").contiguous()
    qmap = {"layers": layers, "aliases": aliases}
    meta = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "quantization_map": json.dumps(qmap, sort_keys=True)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(out, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_quantized(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Save a (partly) quantized model as plain tensors plus a JSON quantization map in safetensors.

    Quantized layer ``L`` stores ``L.qweight`` (packed uint8 codes, or the fp16/bf16 cast),
    ``L.scale``, ``L.zero_point`` (asymmetric only) and ``L.bias``; every other tensor of the
    state_dict is stored under its own name. The file's metadata holds ``quantization_map``: per
    layer its kind, config, weight shape and dtype (``tied_to`` for a layer that shares another
    layer's packed weight), and ``aliases`` for state_dict entries that share one tensor. The file
    is written to ``path + ".tmp"`` and renamed, so a failure leaves no partial file.

    Args:
        model: a model, usually after :func:`quantize_`.
        path: destination file (``.safetensors``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    qlayers = _quantized_entries(model)
    layers: Dict[str, Dict[str, Any]] = {}
    tensors: Dict[str, torch.Tensor] = {}
    owner: Dict[int, str] = {}
    for fqn, m in qlayers.items():
        rec = _layer_record(m.kind, m.packed)
        if id(m.packed) in owner:
            rec["tied_to"] = owner[id(m.packed)]
        else:
            owner[id(m.packed)] = fqn
            tensors.update(_packed_tensors(fqn, m.packed))
        layers[fqn] = rec
    prefixes = tuple(f"{fqn}.packed." for fqn in qlayers)
    for name, t in model.state_dict(keep_vars=True).items():
        if prefixes and name.startswith(prefixes):
            continue
        if name in tensors:
            raise ValueError(f"state_dict entry {name!r} collides with a quantized tensor name")
        tensors[name] = t
    _write(path, layers, tensors)
    logger.info("saved %d quantized layers and %d tensors to %s", len(layers), len(tensors), path)


def _read(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a gradcomp quantized file (metadata format={meta.get('format')!r}, expected {_FORMAT!r})")
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')!r}, expected {_FORMAT_VERSION!r}")
    try:
        qmap = json.loads(meta["quantization_map"])
        layers, aliases = qmap["layers"], qmap["aliases"]
    except (KeyError, json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{path}: malformed quantization_map ({exc})") from exc
    for name, target in aliases.items():
        if target not in tensors:
            raise ValueError(f"{path}: alias {name!r} points to missing tensor {target!r}")
        tensors[name] = tensors[target]
    return layers, tensors


def _packed_from_file(fqn: str, rec: Mapping[str, Any], tensors: Dict[str, torch.Tensor], path) -> PackedWeight:
    where = f"{path}: layer {fqn!r}"
    cfg = _config_from_dict(rec.get("config", {}), where)
    dtype_name = rec.get("weight_dtype")
    dtype = {v: k for k, v in _DTYPE_NAMES.items()}.get(dtype_name)
    if dtype is None:
        raise ValueError(f"{where}: unsupported weight_dtype {dtype_name!r}")
    try:
        return PackedWeight(
            tensors[f"{fqn}.qweight"], tensors.get(f"{fqn}.scale"), tensors.get(f"{fqn}.zero_point"),
            cfg, rec["weight_shape"], dtype,
        )
    except KeyError as exc:
        raise ValueError(f"{where}: missing tensor {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def load_quantized(model: nn.Module, path: Union[str, os.PathLike], *, device: Union[str, torch.device, None] = None) -> nn.Module:
    """Load a file written by :func:`save_quantized` into a freshly built model (meta device is fine).

    Steps:
        1. Read the tensors and the quantization map; rebuild every packed weight and check it
           against its config.
        2. Check the model against the file: each quantized layer exists, has the recorded kind and
           weight shape; every other state_dict entry is present with its shape and nothing is left
           over. Any mismatch raises ValueError naming the layer or tensor; the model is untouched.
        3. Swap the quantized layers in and load the other tensors (assigned when the model is on
           the meta device, copied otherwise).

    Args:
        model: the same architecture, unquantized (or quantized the same way).
        path: the ``.safetensors`` file.
        device: where to put the loaded tensors; default: the model's device (CPU for meta).

    Returns:
        ``model``, with bit-identical packed weights and outputs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers, tensors = _read(path)
    params = list(model.parameters()) + list(model.buffers())
    is_meta = any(p.device.type == "meta" for p in params)
    if device is None:
        real = [p.device for p in params if p.device.type != "meta"]
        device = real[0] if real else torch.device("cpu")
    device = torch.device(device)

    # 1. packed weights
    packs: Dict[str, PackedWeight] = {}
    for fqn, rec in layers.items():
        if "tied_to" not in rec:
            packs[fqn] = _packed_from_file(fqn, rec, tensors, path)
    for fqn, rec in layers.items():
        if "tied_to" in rec:
            target = rec["tied_to"]
            if target not in packs:
                raise ValueError(f"{path}: layer {fqn!r} is tied to {target!r}, which holds no weight in the file")
            packs[fqn] = packs[target]

    # 2. check the model
    new: Dict[str, _QuantizedLayer] = {}
    skip_prefixes: List[str] = []
    skip_names = set()
    for fqn, rec in layers.items():
        if fqn == "":
            raise ValueError(f"{path}: a layer without a name (a bare 'weight' tensor) cannot be loaded into a model in place; "
                             "use load_quantized_state_dict")
        try:
            m = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"{path}: layer {fqn!r} of the file does not exist in the model") from None
        kind = _kind(m)
        want = rec.get("kind")
        if kind is None or (want != "tensor" and kind != want):
            raise ValueError(f"{path}: layer {fqn!r} is a {want} in the file but a {type(m).__name__} in the model")
        mshape = tuple(m.packed.shape) if isinstance(m, _QuantizedLayer) else tuple(m.weight.shape)
        if mshape != packs[fqn].shape:
            raise ValueError(f"{path}: layer {fqn!r} has a weight of shape {packs[fqn].shape} in the file "
                             f"but {mshape} in the model")
        if isinstance(m, _QuantizedLayer):
            skip_prefixes.append(f"{fqn}.packed.")
        else:
            skip_names.add(f"{fqn}.weight")
        new[fqn] = _swap(m, packs[fqn].to(device), fqn)
    expected = {}
    prefixes = tuple(skip_prefixes)
    for name, t in model.state_dict(keep_vars=True).items():
        if name in skip_names or (prefixes and name.startswith(prefixes)):
            continue
        expected[name] = t
    quant_names = {n for fqn, rec in layers.items() if "tied_to" not in rec for n in _packed_tensors(fqn, packs[fqn])}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - quant_names)
    if missing:
        raise ValueError(f"{path}: the file lacks {len(missing)} tensors of the model, e.g. {missing[:5]}")
    if unexpected:
        raise ValueError(f"{path}: the file holds {len(unexpected)} tensors the model does not have, e.g. {unexpected[:5]}")
    for name, t in expected.items():
        if tuple(tensors[name].shape) != tuple(t.shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)} in the file but {tuple(t.shape)} in the model")

    # 3. mutate
    for fqn, q in new.items():
        _set_submodule(model, fqn, q)
    plain_sd = {name: tensors[name].to(device) for name in expected}
    model.load_state_dict(plain_sd, strict=False, assign=is_meta)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        logger.warning("after loading, %d tensors are still on the meta device (non-persistent buffers?): %s", len(left), left[:5])
    logger.info("loaded %d quantized layers and %d tensors from %s", len(new), len(plain_sd), path)
    return model


# --------------------------------------------------------------------------------------------
# state_dict files without a model


def _is_weight_entry(name: str, t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2 and (name == "weight" or name.endswith(".weight"))


def _layer_name(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else ""


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config_or_rules: Rules,
    *,
    filter_fn: Optional[Callable[[str, torch.Tensor], bool]] = None,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
) -> Tuple[Dict[str, PackedWeight], Dict[str, torch.Tensor]]:
    """Quantize the weight matrices of a state_dict, without a model.

    Every floating tensor named ``<layer>.weight`` with two or more dims is a layer weight; rules
    match the layer name ``<layer>``. Other tensors (biases, norms, integer buffers) stay as they are.

    Args:
        state_dict: name -> tensor.
        config_or_rules: as for :func:`quantize_`.
        filter_fn: optional ``(layer_name, weight) -> bool``.
        progress: optional wrapper of an iterable (e.g. ``tqdm``) to show progress over the layers.

    Returns:
        ``(packed, plain)``: layer name -> :class:`PackedWeight`, and the remaining tensors.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    rules = _normalize_rules(config_or_rules)
    packed: Dict[str, PackedWeight] = {}
    plain: Dict[str, torch.Tensor] = {}
    items = list(state_dict.items())
    for key, t in (progress(items) if progress else items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} must be a tensor, got {type(t).__name__}")
        cfg = None
        if _is_weight_entry(key, t):
            layer = _layer_name(key)
            _, cfg = resolve_config(layer, rules)
            if cfg is not None and filter_fn is not None and not filter_fn(layer, t):
                cfg = None
        if cfg is None:
            plain[key] = t
            continue
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"layer {layer!r}: the weight holds inf or nan values; refusing to quantize it")
        try:
            packed[layer] = PackedWeight.from_weight(t, cfg)
        except ValueError as exc:
            raise ValueError(f"layer {layer!r}: {exc}") from exc
    return packed, plain


def save_quantized_state_dict(packed: Mapping[str, PackedWeight], plain: Mapping[str, torch.Tensor], path: Union[str, os.PathLike]) -> None:
    """Write the result of :func:`quantize_state_dict` in the format of :func:`save_quantized`.

    Layers have kind ``"tensor"``, which :func:`load_quantized` accepts for any supported module of
    the recorded weight shape.
    """
    layers = {fqn: _layer_record("tensor", p) for fqn, p in packed.items()}
    tensors: Dict[str, torch.Tensor] = {}
    for fqn, p in packed.items():
        tensors.update(_packed_tensors(fqn, p))
    for name, t in plain.items():
        if name in tensors:
            raise ValueError(f"state_dict entry {name!r} collides with a quantized tensor name")
        tensors[name] = t
    _write(path, layers, tensors)


def load_quantized_state_dict(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Config]]:
    """Read a gradcomp quantized file back as a plain (dequantized) state_dict, without a model.

    Returns:
        ``(state_dict, configs)``: ``<layer>.weight`` is the dequantized weight in its original
        dtype; ``configs`` maps each quantized layer to its config.
    """
    layers, tensors = _read(path)
    out: Dict[str, torch.Tensor] = {}
    configs: Dict[str, Config] = {}
    packs: Dict[str, PackedWeight] = {}
    for fqn, rec in layers.items():
        if "tied_to" not in rec:
            packs[fqn] = _packed_from_file(fqn, rec, tensors, path)
    quant_names = set()
    for fqn, rec in layers.items():
        p = packs.get(rec.get("tied_to", fqn))
        if p is None:
            raise ValueError(f"{path}: layer {fqn!r} is tied to {rec['tied_to']!r}, which holds no weight in the file")
        out[f"{fqn}.weight" if fqn else "weight"] = p.dequantize()
        configs[fqn] = p.config
        quant_names.update(_packed_tensors(fqn, p))
    for name, t in tensors.items():
        if name not in quant_names:
            out[name] = t
    return out, configs


def load_tensor_file(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file or a torch ``state_dict`` / checkpoint (``weights_only=True``).

    A gradcomp quantized file is read back dequantized. A checkpoint dict holding a
    ``state_dict``, ``model`` or ``model_state_dict`` entry is unwrapped; non-tensor entries are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
        except Exception as exc:
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
        if meta.get("format") == _FORMAT:
            return load_quantized_state_dict(path)[0]
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} could not be loaded as a torch state_dict with weights_only=True: {exc}") from exc
    if isinstance(obj, nn.Module):  # pragma: no cover - weights_only refuses modules
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state_dict (a mapping of names to tensors)")
    out = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise ValueError(f"{path} holds no tensors")
    return out


# --------------------------------------------------------------------------------------------
# quality metrics and weight statistics


@dataclass(frozen=True)
class LayerQuality:
    """Error of one quantized weight against the original.

    Attributes:
        name: layer name.
        config: config spec string (see :func:`config_name`).
        sqnr_db: ``10 log10(sum w^2 / sum (w - w_hat)^2)``.
        mse: mean squared error.
        cosine: cosine similarity of the flattened weights.
        max_abs_error: largest ``|w - w_hat|``.
        bits_per_weight: real cost with scales and zero points.
    """

    name: str
    config: str
    sqnr_db: float
    mse: float
    cosine: float
    max_abs_error: float
    bits_per_weight: float

    def to_dict(self) -> Dict[str, Any]:
        """Return the fields as a JSON-friendly dict."""
        return dict(self.__dict__)


def layer_quality(weight: torch.Tensor, config: Optional[Config], name: str = "") -> LayerQuality:
    """Measure SQNR, MSE, cosine and max error of ``config`` on ``weight``.

    Example: a Gaussian ``(512, 512)`` weight at int8 per channel gives about 40 dB; int4 g128 about 20 dB.
    """
    approx = fake_quantize_weight(weight, config)
    w = weight.detach()
    return LayerQuality(
        name=name,
        config=config_name(config),
        sqnr_db=sqnr_db(w, approx),
        mse=mse(w, approx),
        cosine=cosine_similarity(w, approx),
        max_abs_error=float((w.double() - approx.double()).abs().max()),
        bits_per_weight=weight_bits_per_param(config, w.shape) if config is not None else 8.0 * w.element_size(),
    )


PERCENTILES = (0.1, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.9)


@dataclass(frozen=True)
class WeightStats:
    """Distribution statistics of one weight tensor.

    Attributes:
        name, shape, numel: which tensor.
        mean, std, min, max, absmax: moments and range.
        percentiles: ``{p: value}`` for ``PERCENTILES`` (nearest rank).
        kurtosis: excess kurtosis ``E[(x-mu)^4]/sigma^4 - 3`` (0 for a Gaussian; heavy tails are large).
        outlier_share: fraction of values with ``|x - mean| > outlier_sigma * std``.
        outlier_sigma: the threshold in standard deviations.
        hist_counts, hist_edges: a histogram over ``[min, max]``.
    """

    name: str
    shape: Tuple[int, ...]
    numel: int
    mean: float
    std: float
    min: float
    max: float
    absmax: float
    percentiles: Dict[str, float]
    kurtosis: float
    outlier_share: float
    outlier_sigma: float
    hist_counts: List[int] = field(repr=False)
    hist_edges: List[float] = field(repr=False)

    def to_dict(self, histogram: bool = False) -> Dict[str, Any]:
        """Return a JSON-friendly dict (the histogram only when asked)."""
        d = dict(self.__dict__)
        d["shape"] = list(self.shape)
        if not histogram:
            d.pop("hist_counts")
            d.pop("hist_edges")
        return d


def weight_stats(weight: torch.Tensor, name: str = "", *, outlier_sigma: float = 3.0, bins: int = 64) -> WeightStats:
    """Compute distribution statistics of a weight (vectorised, in fp64).

    Example: for a Gaussian weight kurtosis is about 0 and ``outlier_share`` about 0.0027 at 3 sigma.

    Args:
        weight: floating tensor.
        name: label.
        outlier_sigma: threshold of the outlier share, in standard deviations.
        bins: histogram bins.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.numel() == 0:
        raise TypeError(f"weight must be a non-empty floating tensor, got {type(weight).__name__}")
    if not (outlier_sigma > 0):
        raise ValueError(f"outlier_sigma must be positive, got {outlier_sigma}")
    x = weight.detach().reshape(-1).double()
    n = x.numel()
    mean = float(x.mean())
    c = x - mean
    var = float((c * c).mean())
    std = math.sqrt(var)
    kurt = float((c**4).mean()) / (var * var) - 3.0 if var > 0 else 0.0
    srt = torch.sort(x).values
    idx = torch.tensor([min(n - 1, max(0, math.ceil(p / 100.0 * n) - 1)) for p in PERCENTILES])
    pv = srt[idx].tolist()
    lo, hi = float(srt[0]), float(srt[-1])
    outl = float((c.abs() > outlier_sigma * std).double().mean()) if std > 0 else 0.0
    counts = torch.histc(x, bins=bins, min=lo, max=hi if hi > lo else lo + 1.0)
    edges = torch.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    return WeightStats(
        name=name, shape=tuple(weight.shape), numel=n, mean=mean, std=std, min=lo, max=hi,
        absmax=max(abs(lo), abs(hi)), percentiles={f"p{p:g}": v for p, v in zip(PERCENTILES, pv)},
        kurtosis=kurt, outlier_share=outl, outlier_sigma=float(outlier_sigma),
        hist_counts=[int(v) for v in counts.tolist()], hist_edges=[float(v) for v in edges.tolist()],
    )


def weight_tensors(source: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Return ``layer name -> weight`` of a model (its supported layers) or a state_dict (``*.weight``, 2+ dims).

    Quantized layers of a model give their dequantized weight; a weight shared by several layers
    (tied embeddings) is listed once, under its first name.
    """
    if isinstance(source, nn.Module):
        out = {}
        seen = set()
        for fqn, m in source.named_modules():
            held = m.packed if isinstance(m, _QuantizedLayer) else getattr(m, "weight", None)
            if not isinstance(m, (_QuantizedLayer,) + _SUPPORTED) or id(held) in seen:
                continue
            seen.add(id(held))
            out[fqn] = m.packed.dequantize() if isinstance(m, _QuantizedLayer) else m.weight.detach()
        return out
    if isinstance(source, Mapping):
        return {_layer_name(k): v for k, v in source.items() if _is_weight_entry(k, v)}
    raise TypeError(f"source must be an nn.Module or a state_dict mapping, got {type(source).__name__}")


@dataclass
class WeightReport:
    """Per-layer statistics and quantization quality for a list of configs.

    Attributes:
        configs: the config spec strings, in order.
        stats: one :class:`WeightStats` per layer.
        quality: ``quality[layer][config]`` -> :class:`LayerQuality`.
    """

    configs: List[str]
    stats: List[WeightStats]
    quality: Dict[str, Dict[str, LayerQuality]]

    def summary(self) -> List[Dict[str, Any]]:
        """Per config: median / min / mean SQNR over layers, worst layer, and bits per weight over all layers."""
        rows = []
        numel = {s.name: s.numel for s in self.stats}
        total = sum(numel.values())
        for c in self.configs:
            q = [self.quality[s.name][c] for s in self.stats]
            worst = min(q, key=lambda x: x.sqnr_db)
            rows.append({
                "config": c,
                "layers": len(q),
                "median_sqnr_db": statistics.median(x.sqnr_db for x in q) if q else math.nan,
                "min_sqnr_db": worst.sqnr_db,
                "worst_layer": worst.name,
                "mean_cosine": float(torch.tensor([x.cosine for x in q], dtype=torch.float64).mean()) if q else math.nan,
                "bits_per_weight": sum(x.bits_per_weight * numel[x.name] for x in q) / total if total else math.nan,
            })
        return rows

    def rows(self) -> List[Dict[str, Any]]:
        """One flat row per layer: shape, std, kurtosis, outlier share, and SQNR per config."""
        out = []
        for s in self.stats:
            r = {"layer": s.name, "shape": "x".join(map(str, s.shape)), "std": s.std, "absmax": s.absmax,
                 "kurtosis": s.kurtosis, "outliers": s.outlier_share}
            for c in self.configs:
                r[f"sqnr[{c}]"] = self.quality[s.name][c].sqnr_db
            out.append(r)
        return out

    def to_json(self, histogram: bool = False) -> Dict[str, Any]:
        """Return the whole report as a JSON-friendly dict."""
        return {
            "configs": list(self.configs),
            "summary": self.summary(),
            "layers": [
                {"stats": s.to_dict(histogram), "quality": {c: self.quality[s.name][c].to_dict() for c in self.configs}}
                for s in self.stats
            ],
        }


def analyze_weights(
    source: Union[nn.Module, Mapping[str, torch.Tensor]],
    configs: Sequence[Optional[Config]],
    *,
    outlier_sigma: float = 3.0,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
) -> WeightReport:
    """Compute statistics and the quality of each config for every layer weight of a model or state_dict.

    Args:
        source: a model or a state_dict (see :func:`weight_tensors`).
        configs: configs to measure (e.g. int8 per channel, int4 g128 asym).
        outlier_sigma: threshold of the outlier share.
        progress: optional iterable wrapper (``tqdm``) over the layers.

    Returns:
        A :class:`WeightReport`.
    """
    if not configs:
        raise ValueError("configs must list at least one config")
    for c in configs:
        if c is not None:
            _check_config(c)
    names = [config_name(c) for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configs must be distinct, got {names}")
    weights = weight_tensors(source)
    if not weights:
        raise ValueError("found no layer weights to analyse (Linear/Embedding/Conv2d, or '*.weight' tensors with 2+ dims)")
    stats, quality = [], {}
    items = list(weights.items())
    for name, w in (progress(items) if progress else items):
        stats.append(weight_stats(w, name, outlier_sigma=outlier_sigma))
        quality[name] = {n: layer_quality(w, c, name) for n, c in zip(names, configs)}
    return WeightReport(names, stats, quality)
