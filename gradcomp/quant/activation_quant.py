"""Fake quantization of layer inputs: prepare, calibrate, convert.

:func:`prepare_activation_quant_` attaches an :class:`ActivationQuantizer` child and a forward
pre-hook on every chosen Linear/Conv layer; :func:`calibrate_` feeds batches to its observer;
:func:`convert_activation_quant_` freezes the scales. Dynamic configs compute per-token scales on
the fly. The gradient is a clipped straight-through one, so the same wrappers serve
quantization-aware fine-tuning.

Example::

    >>> names = prepare_activation_quant_(model, ActQuantConfig(bits=8, observer="mse"))
    >>> calibrate_(model, batches)
    >>> qparams = convert_activation_quant_(model)      # the model now fake-quantizes Linear inputs
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from gradcomp.batches import run_batches
from gradcomp.codec import choose_qparams
from gradcomp.files import atomic_write
from gradcomp.quant.configs import ActQuantConfig
from gradcomp.quant.fake_quant import fake_quantize_ste
from gradcomp.quant.histogram import RunningHistogram
from gradcomp.quant.modules import QuantizedConv2d, QuantizedLinear
from gradcomp.quant.observer_selection import ObserverChoice, observer_for
from gradcomp.quant.observers import ActivationObserver
from gradcomp.quant.rules import check_patterns, match_pattern

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TYPES",
    "default_layer_types",
    "run_batches",
    "ActivationQuantizer",
    "prepare_activation_quant_",
    "calibrate_",
    "convert_activation_quant_",
    "quantize_activations_",
    "remove_activation_quant_",
    "measure_activation_sqnr",
    "save_activation_scales",
    "load_activation_scales_",
]

DEFAULT_TYPES: Tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TYPES: Tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_layer_types() -> Tuple[type, ...]:
    """Return the layer classes chosen when ``types`` is None.

    ``nn.Linear`` and ``nn.Conv1d/2d/3d``, plus the packed ``QuantizedLinear`` and ``QuantizedConv2d``
    of :mod:`gradcomp.quant.modules`, so that activation quantization applied after ``quantize_``
    finds the swapped layers (W8A8, W4A8).
    """
    return DEFAULT_TYPES + (QuantizedLinear, QuantizedConv2d)


_QUANTIZER_ATTR = "input_quantizer"


class ActivationQuantizer(nn.Module):
    """Fake-quantize a layer input: observe while calibrating, then quantize with frozen scales.

    States: ``calibrating`` (static, before :meth:`freeze`: records inputs, returns them unchanged),
    ``frozen`` (static: fake-quantizes with the stored ``scale``/``zero_point``), or dynamic (scales
    from each input). Gradients are straight-through (:func:`fake_quantize_ste`). With
    ``track_error`` on it accumulates ``sum x^2`` and ``sum (x - q(x))^2`` for the SQNR; with
    ``passthrough`` on it still computes ``q(x)`` (for the error) but returns ``x``.

    Args:
        config: an :class:`ActQuantConfig`.
        channel_axis: channel axis of the input (-1 for Linear, 1 for Conv) for per-channel scales.
    """

    def __init__(self, config: ActQuantConfig, channel_axis: int = -1):
        super().__init__()
        if not isinstance(config, ActQuantConfig):
            raise TypeError(f"config must be an ActQuantConfig, got {type(config).__name__}")
        self.config = config
        self.channel_axis = channel_axis
        self.observer = None if config.dynamic else observer_for(config, channel_axis)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        self.register_buffer("frozen", torch.tensor(False))
        self.register_buffer("signal", torch.zeros((), dtype=torch.float64))
        self.register_buffer("noise", torch.zeros((), dtype=torch.float64))
        self.track_error = False
        self.passthrough = False

    @property
    def per_channel(self) -> bool:
        """Whether the scales are per channel (``per_channel``, or ``auto`` that chose it)."""
        return self.config.observer == "per_channel" or self.scale.numel() > 1

    @property
    def calibrating(self) -> bool:
        """Whether the quantizer still observes (static and not frozen)."""
        return not self.config.dynamic and not bool(self.frozen)

    def freeze(
        self, qparams: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Store the scales and start quantizing; return ``(scale, zero_point)``.

        Args:
            qparams: ``(scale, zero_point)`` already computed by ``self.observer.calculate_qparams()``;
                computed here when None.
        """
        if self.config.dynamic:
            raise ValueError("a dynamic quantizer has no calibrated scales to freeze")
        scale, zp = self.observer.calculate_qparams() if qparams is None else qparams
        self.scale = scale.detach().clone()
        self.zero_point = torch.empty(0) if zp is None else zp.detach().clone()
        self.frozen.fill_(True)
        return scale, zp

    def _qparams(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[int]]:
        cfg = self.config
        if cfg.dynamic:
            xd = x.detach().float()
            if cfg.granularity == "per_token":
                lo, hi = torch.aminmax(xd, dim=-1, keepdim=True)
            else:
                lo, hi = torch.aminmax(xd)
            scale, zp = choose_qparams(lo, hi, cfg.bits, cfg.symmetric)
            return scale, zp, None
        zp = None if cfg.symmetric else self.zero_point
        axis = self.channel_axis if self.per_channel else None
        return self.scale, zp, axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe or fake-quantize ``x`` (see the class docstring)."""
        if self.calibrating:
            return self.observer(x)
        scale, zp, axis = self._qparams(x)
        out = fake_quantize_ste(x, scale, zp, self.config.bits, axis)
        if self.track_error:
            with torch.no_grad():
                xd = x.detach().double()
                self.signal += (xd * xd).sum()
                self.noise += ((xd - out.detach().double()) ** 2).sum()
        return x if self.passthrough else out

    def sqnr_db(self) -> float:
        """SQNR in dB of everything quantized while ``track_error`` was on."""
        s, n = float(self.signal), float(self.noise)
        if n == 0.0:
            return math.inf
        if s == 0.0:
            return -math.inf
        return 10.0 * math.log10(s / n)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != self._buffers[name].shape:
                self._buffers[name] = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        state = "dynamic" if self.config.dynamic else ("frozen" if bool(self.frozen) else "calibrating")
        return f"{self.config.label}, symmetric={self.config.symmetric}, {state}"


def _input_quant_pre_hook(module: nn.Module, args: Tuple[Any, ...]):
    """Forward pre-hook: pass the first positional input through ``module.input_quantizer``."""
    quantizer = getattr(module, _QUANTIZER_ATTR, None)
    if quantizer is None or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    if quantizer.calibrating and getattr(quantizer.observer, "scoring", False):
        quantizer.observer.score(module, args[0])   # held-out batch of observer="auto": measure, pass through
        return None
    fuses = getattr(module, "fuses_input_quant", None)
    if fuses is not None and fuses(quantizer, args[0]):
        return None  # the module quantizes its input itself, in an integer kernel (same codes)
    return (quantizer(args[0]),) + tuple(args[1:])


def _select_modules(
    model: nn.Module,
    types: Optional[Sequence[type]],
    names: Union[None, str, Sequence[str]],
    exclude: Union[None, str, Sequence[str]] = None,
) -> List[Tuple[str, nn.Module]]:
    """Return ``(name, module)`` of the modules of ``types`` that match ``names`` and not ``exclude``.

    Names are matched by :mod:`gradcomp.quant.rules` (exact name, glob or ``re:<regex>``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    types = default_layer_types() if types is None else tuple(types)
    if not types or not all(isinstance(t, type) for t in types):
        raise TypeError(f"types must be a non-empty sequence of classes, got {types!r}")

    include = check_patterns(names, "names")
    skip = check_patterns(exclude, "exclude")
    chosen = []
    for name, module in model.named_modules():
        # nothing inside a quantizer (observers, their histograms and candidate lists) is a layer to quantize
        if not name or _QUANTIZER_ATTR in name.split(".") or isinstance(module, (ActivationObserver, ActivationQuantizer,
                                                                                RunningHistogram, ObserverChoice)):
            continue
        if not isinstance(module, types):
            continue
        if include and not any(match_pattern(p, name) for p in include):
            continue
        if any(match_pattern(p, name) for p in skip):
            continue
        chosen.append((name, module))
    if not chosen:
        raise ValueError(
            f"no module of {model.__class__.__name__} matches types={[t.__name__ for t in types]}, "
            f"names={names!r}, exclude={exclude!r}"
        )
    return chosen


def _channel_axis_for(module: nn.Module) -> int:
    """Channel axis of a layer's input and output: 1 for convolutions (N, C, ...), -1 otherwise."""
    if isinstance(module, _CONV_TYPES) or "conv" in type(module).__name__.lower():
        return 1
    return -1


def prepare_activation_quant_(
    model: nn.Module,
    config: ActQuantConfig,
    *,
    types: Optional[Sequence[type]] = None,
    names: Union[None, str, Sequence[str]] = None,
    exclude: Union[None, str, Sequence[str]] = None,
) -> List[str]:
    """Attach an :class:`ActivationQuantizer` to the input of every chosen layer (in place).

    Each chosen module gets a child ``input_quantizer`` and a forward pre-hook that passes its first
    input through it, so parameter names do not change. Static configs start calibrating (run
    :func:`calibrate_`, then :func:`convert_activation_quant_`); dynamic ones quantize at once.

    Args:
        model: the model.
        config: an :class:`ActQuantConfig`.
        types: module classes to choose; None: :func:`default_layer_types` (``(nn.Module,)`` for any).
        names: pattern(s) a module name must match (exact name, glob or ``re:<regex>``, as in
            :mod:`gradcomp.quant.rules`); None: every module of ``types``.
        exclude: pattern(s) of names to leave alone.

    Returns:
        Names of the modules that got a quantizer.

    Raises:
        ValueError: nothing matches, or a chosen module already has a quantizer (the model is unchanged).
    """
    if not isinstance(config, ActQuantConfig):
        raise TypeError(f"config must be an ActQuantConfig, got {type(config).__name__}")
    chosen = _select_modules(model, types, names, exclude)
    already = [n for n, m in chosen if hasattr(m, _QUANTIZER_ATTR)]
    if already:
        raise ValueError(f"modules already have an input quantizer: {already[:5]}; call remove_activation_quant_ first")
    for _, module in chosen:
        module.add_module(_QUANTIZER_ATTR, ActivationQuantizer(config, _channel_axis_for(module)))
        module.register_forward_pre_hook(_input_quant_pre_hook)
    logger.info("activation quantization %s on %d modules", config.label, len(chosen))
    return [n for n, _ in chosen]


def _quantizers(model: nn.Module) -> List[Tuple[str, ActivationQuantizer]]:
    return [
        (name, getattr(m, _QUANTIZER_ATTR))
        for name, m in model.named_modules()
        if isinstance(getattr(m, _QUANTIZER_ATTR, None), ActivationQuantizer)
    ]


def calibrate_(model: nn.Module, batches: Iterable[Any], *, forward: Optional[Callable[[nn.Module, Any], Any]] = None,
               num_batches: Optional[int] = None, progress: bool = False) -> int:
    """Feed calibration batches to the observers of a prepared model; return the batch count.

    With ``observer="auto"`` the last ``holdout`` share of the batches (at least one of two or more)
    is not observed but scores every candidate observer by the layer's output error
    (:mod:`gradcomp.quant.observer_selection`).

    Raises:
        ValueError: the model has no calibrating quantizer, or no batch came.
    """
    todo = [q for _, q in _quantizers(model) if q.calibrating]
    if not todo:
        raise ValueError("the model has no calibrating activation quantizer; call prepare_activation_quant_ with a static config first")
    auto = [q.observer for q in todo if getattr(q.observer, "scoring", None) is not None]
    if not auto:
        n = run_batches(model, batches, forward=forward, num_batches=num_batches, progress=progress, desc="calibrate")
    else:
        # observer="auto": the last share of the batches is held out to score the candidates
        data = list(batches)[: num_batches if num_batches is not None else None]
        share = max(q.config.holdout for q in todo if q.config.observer == "auto")
        hold = min(len(data) - 1, max(1, round(share * len(data)))) if len(data) >= 2 else 0
        n = run_batches(model, data[: len(data) - hold], progress=progress, forward=forward, desc="calibrate")
        if hold and n:
            for obs in auto:
                obs.start_scoring()
            try:
                n += run_batches(model, data[len(data) - hold:], forward=forward, progress=progress, desc="score observers")
            finally:
                for obs in auto:
                    obs.stop_scoring()
    if n == 0:
        raise ValueError("calibration got no batch")
    return n


def convert_activation_quant_(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Freeze the scales of every calibrating quantizer; from then on the model fake-quantizes.

    All observers are checked before any is frozen, so a failure leaves the model unchanged.

    Returns:
        ``{module name: (scale, zero_point)}``.
    """
    todo = [(n, q) for n, q in _quantizers(model) if q.calibrating]
    if not todo:
        raise ValueError("the model has no calibrating activation quantizer to convert")
    empty = [n for n, q in todo if not q.observer.has_data]
    if empty:
        raise ValueError(f"these quantizers saw no calibration data: {empty[:5]}; run calibrate_ with batches that reach them")
    qparams = {n: q.observer.calculate_qparams() for n, q in todo}
    for n, q in todo:
        unseen = getattr(q.observer, "unseen_channels", None)
        if unseen is not None and unseen.numel():
            logger.warning("%s: %d of %d input channels never held a finite nonzero value during calibration (first: %s); "
                           "they get the range of the whole tensor", n, unseen.numel(), q.observer.min_val.numel(), unseen[:5].tolist())
        q.freeze(qparams[n])
    return qparams


def quantize_activations_(
    model: nn.Module,
    config: ActQuantConfig,
    batches: Optional[Iterable[Any]] = None,
    *,
    types: Optional[Sequence[type]] = None,
    names: Union[None, str, Sequence[str]] = None,
    exclude: Union[None, str, Sequence[str]] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    num_batches: Optional[int] = None,
    progress: bool = False,
) -> List[str]:
    """Prepare, calibrate (static configs) and convert in one call; return the quantized module names.

    If calibration fails, the quantizers are removed again and the model is as it was.
    """
    if not config.dynamic and batches is None:
        raise ValueError("static activation quantization needs calibration batches")
    chosen = prepare_activation_quant_(model, config, types=types, names=names, exclude=exclude)
    if config.dynamic:
        return chosen
    try:
        calibrate_(model, batches, forward=forward, num_batches=num_batches, progress=progress)
        convert_activation_quant_(model)
    except BaseException:
        remove_activation_quant_(model, chosen)
        raise
    return chosen


def remove_activation_quant_(model: nn.Module, names: Optional[Sequence[str]] = None) -> List[str]:
    """Remove input quantizers and their pre-hooks; return the names of the modules cleaned.

    Args:
        model: the model.
        names: only these modules (default: every module that has one).
    """
    only = None if names is None else set(names)
    cleaned = []
    for name, module in list(model.named_modules()):
        if not isinstance(getattr(module, _QUANTIZER_ATTR, None), ActivationQuantizer):
            continue
        if only is not None and name not in only:
            continue
        for key in [k for k, h in module._forward_pre_hooks.items() if h is _input_quant_pre_hook]:
            del module._forward_pre_hooks[key]
        delattr(module, _QUANTIZER_ATTR)
        cleaned.append(name)
    return cleaned


def measure_activation_sqnr(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    num_batches: Optional[int] = None,
    progress: bool = False,
    isolated: bool = True,
) -> Dict[str, float]:
    """Return the SQNR (dB) of each quantized layer input over the given batches.

    Each quantizer compares its input with its fake-quantized version. With ``isolated`` (default)
    every quantizer passes its input through unchanged while measuring, so each layer sees the
    fp32 model's activations and its figure is its own quantization error alone: the fair way to
    compare observers layer by layer. With ``isolated=False`` the model runs fully quantized and each
    layer's input already carries the errors (and clipping) of the layers before it.

    Example: a layer whose input has ``sum x^2 = 100`` and quantization error ``sum (x - q(x))^2 =
    0.01`` has an SQNR of ``10 log10(100 / 0.01) = 40`` dB.
    """
    qs = [(n, q) for n, q in _quantizers(model) if not q.calibrating]
    if not qs:
        raise ValueError("the model has no converted or dynamic activation quantizer")
    for _, q in qs:
        q.signal.zero_()
        q.noise.zero_()
        q.track_error = True
        q.passthrough = isolated
    try:
        run_batches(model, batches, forward=forward, num_batches=num_batches, progress=progress, desc="sqnr")
    finally:
        for _, q in qs:
            q.track_error = False
            q.passthrough = False
    return {n: q.sqnr_db() for n, q in qs}


# --------------------------------------------------------------------------------------------
# calibrated scales as a file

_SCALES_FORMAT = "gradcomp.activation_scales"


def save_activation_scales(model: nn.Module, path: Union[str, "os.PathLike[str]"]) -> List[str]:
    """Write the frozen static input scales of a calibrated model to a safetensors file; return the layer names.

    The file holds ``<layer>.scale`` (and ``<layer>.zero_point``) per layer and, in its metadata, the
    :class:`ActQuantConfig` and each layer's channel axis, so :func:`load_activation_scales_` can put
    the same quantizers on a fresh copy of the model without calibrating again.

    Raises:
        ValueError: the model holds no frozen static quantizer.
    """
    import json
    from dataclasses import asdict

    from safetensors.torch import save_file

    todo = [(n, q) for n, q in _quantizers(model) if not q.config.dynamic and bool(q.frozen)]
    if not todo:
        raise ValueError("the model has no calibrated (frozen, static) activation quantizer; calibrate and convert first")
    configs = {json.dumps(asdict(q.config), sort_keys=True) for _, q in todo}
    if len(configs) != 1:
        raise ValueError(f"the quantizers use {len(configs)} different configs; one file holds one config")
    tensors: Dict[str, torch.Tensor] = {}
    axes: Dict[str, int] = {}
    for n, q in todo:
        tensors[f"{n}.scale"] = q.scale.detach().contiguous().cpu()
        if q.zero_point.numel():
            tensors[f"{n}.zero_point"] = q.zero_point.detach().contiguous().cpu()
        axes[n] = q.channel_axis
    meta = {"format": _SCALES_FORMAT, "config": configs.pop(), "layers": json.dumps(axes)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return [n for n, _ in todo]


def load_activation_scales_(model: nn.Module, path: Union[str, "os.PathLike[str]"]) -> List[str]:
    """Put frozen input quantizers with the scales of a :func:`save_activation_scales` file on ``model``.

    Every layer named in the file must exist in the model; nothing is changed when one is missing.

    Returns:
        The names of the layers now quantizing their inputs.
    """
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _SCALES_FORMAT:
            raise ValueError(f"{path} is not a gradcomp activation-scales file (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = ActQuantConfig(**json.loads(meta["config"]))
    axes: Dict[str, int] = json.loads(meta["layers"])
    modules = dict(model.named_modules())
    missing = [n for n in axes if n not in modules]
    if missing:
        raise ValueError(f"layers {missing[:5]} of {path} are not in the model")
    names = prepare_activation_quant_(model, config, names=list(axes))   # exact names
    for n in names:
        q = getattr(modules[n], _QUANTIZER_ATTR)
        zp = tensors.get(f"{n}.zero_point")
        q.freeze((tensors[f"{n}.scale"], zp))
    return names
