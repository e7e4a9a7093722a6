"""The activation quantizers in a weights file: what :func:`save_quantized` stores and :func:`load_quantized` rebuilds.

A model with quantized weights and quantized activations is one file. The quantization map gets an
``activations`` section, ``{module: {"config": {...ActQuantConfig}, "channel_axis": int, "state":
"frozen" | "dynamic" | "calibrating"}}``, and the file the tensors that make the quantizer compute
what it computed when saved:

* frozen static quantizers: ``<module>.input_quantizer.scale`` and (affine) ``.zero_point``;
* dynamic quantizers: nothing (their scales come from each input);
* the observers' calibration state (``<module>.input_quantizer.observer.*``) only with
  ``observers=True``; a quantizer that is still calibrating can only be saved that way.

The bookkeeping buffers (``frozen``, and the ``signal`` / ``noise`` sums of
:func:`measure_activation_sqnr`) are never stored: the state says whether the quantizer is frozen.
Loading checks every record and tensor before anything changes, then attaches a fresh
:class:`ActivationQuantizer` (and its forward pre-hook) to each module, replacing one that is there.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from gradcomp.quant.activation_quant import _QUANTIZER_ATTR, ActivationQuantizer, _input_quant_pre_hook, _quantizers
from gradcomp.quant.configs import ActQuantConfig

__all__ = ["activation_records", "check_activation_records", "attach_activation_quantizers"]

STATES = ("frozen", "dynamic", "calibrating")


def _prefix(name: str) -> str:
    """``"<module>.input_quantizer."`` (``"input_quantizer."`` for the model itself)."""
    return f"{name}.{_QUANTIZER_ATTR}." if name else f"{_QUANTIZER_ATTR}."


def quantizer_prefixes(model: nn.Module) -> Tuple[str, ...]:
    """Return :func:`_prefix` of every module of ``model`` that has an activation quantizer."""
    return tuple(_prefix(n) for n, _ in _quantizers(model))


def _state(q: ActivationQuantizer) -> str:
    if q.config.dynamic:
        return "dynamic"
    return "calibrating" if q.calibrating else "frozen"


def activation_records(model: nn.Module, observers: bool = False) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, torch.Tensor]]:
    """Return the ``activations`` section of the map and the tensors to store for the quantizers of ``model``.

    Args:
        model: the model.
        observers: also store each observer's calibration state (its buffers).

    Raises:
        ValueError: a quantizer is still calibrating and ``observers`` is False (its scales do not exist yet).
    """
    records: Dict[str, Dict[str, Any]] = {}
    tensors: Dict[str, torch.Tensor] = {}
    for name, q in _quantizers(model):
        state = _state(q)
        if state == "calibrating" and not observers:
            raise ValueError(f"the activation quantizer of {name!r} is still calibrating (no scales yet); call "
                             "convert_activation_quant_ first, or save_quantized(..., observers=True) to keep the observers")
        records[name] = {"config": asdict(q.config), "channel_axis": int(q.channel_axis), "state": state}
        if state == "frozen" and q.config.observer == "auto":
            records[name]["observer"] = q.observer.choose()
        prefix = _prefix(name)
        if state == "frozen":
            tensors[prefix + "scale"] = q.scale
            if q.zero_point.numel():
                tensors[prefix + "zero_point"] = q.zero_point
        if observers and q.observer is not None:
            for key, t in q.observer.state_dict(keep_vars=True).items():
                tensors[f"{prefix}observer.{key}"] = t
    return records, tensors


def check_activation_records(records: Any, where: str) -> Dict[str, Dict[str, Any]]:
    """Check the structure of an ``activations`` section; return it with each config as an :class:`ActQuantConfig`."""
    if not isinstance(records, dict):
        raise ValueError(f"{where}: quantization_map['activations'] must be a JSON object, got {type(records).__name__}")
    out = {}
    for name, rec in records.items():
        at = f"{where}: activations[{name!r}]"
        if not isinstance(name, str) or not isinstance(rec, dict):
            raise ValueError(f"{at} must be a JSON object under a module name, got {type(rec).__name__}")
        if rec.get("state") not in STATES:
            raise ValueError(f"{at}['state'] must be one of {STATES}, got {rec.get('state')!r}")
        axis = rec.get("channel_axis")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"{at}['channel_axis'] must be an int, got {axis!r}")
        try:
            cfg = ActQuantConfig(**rec.get("config", {}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{at}['config'] is not a valid ActQuantConfig: {exc}") from exc
        if rec.get("observer") is not None and (cfg.observer != "auto" or rec["observer"] not in cfg.candidates):
            raise ValueError(f"{at}['observer'] must be one of the auto candidates {cfg.candidates}, got {rec['observer']!r}")
        if (rec["state"] == "dynamic") != cfg.dynamic:
            raise ValueError(f"{at}: state {rec['state']!r} does not fit a {'dynamic' if cfg.dynamic else 'static'} config")
        out[name] = dict(rec, config=cfg)
    return out


def expected_tensors(records: Mapping[str, Dict[str, Any]], tensors: Mapping[str, torch.Tensor], where: str) -> List[str]:
    """Check that the file holds the tensors each record needs; return every stored quantizer tensor name."""
    names = []
    for name, rec in records.items():
        prefix = _prefix(name)
        mine = [k for k in tensors if k.startswith(prefix)]
        if rec["state"] == "frozen":
            if prefix + "scale" not in tensors:
                raise ValueError(f"{where}: the frozen activation quantizer of {name!r} has no tensor {prefix + 'scale'!r}")
            needs_zp = not rec["config"].symmetric
            if needs_zp != (prefix + "zero_point" in tensors):
                raise ValueError(f"{where}: the activation quantizer of {name!r} is "
                                 f"{'affine and lacks' if needs_zp else 'symmetric and holds'} {prefix + 'zero_point'!r}")
        stray = [k for k in mine if k[len(prefix):] not in ("scale", "zero_point") and not k[len(prefix):].startswith("observer.")]
        if stray:
            raise ValueError(f"{where}: unknown activation-quantizer tensors {stray[:5]}")
        names.extend(mine)
    return names


def check_modules(model: nn.Module, records: Mapping[str, Dict[str, Any]], where: str) -> Dict[str, nn.Module]:
    """Return ``{name: module}`` for every record, or raise naming a module the model lacks."""
    out = {}
    for name in records:
        try:
            out[name] = model.get_submodule(name) if name else model
        except AttributeError:
            raise ValueError(f"{where}: the activation quantizer of module {name!r} has no module in the model") from None
    return out


def attach_activation_quantizers(model: nn.Module, records: Mapping[str, Dict[str, Any]],
                                 tensors: Mapping[str, torch.Tensor], device: torch.device) -> List[str]:
    """Attach a quantizer rebuilt from the file to each module (after every check passed); return the names.

    Modules are looked up by name now, so layers swapped for quantized ones get the quantizer.
    """
    for name, rec in records.items():
        module = model.get_submodule(name) if name else model
        q = ActivationQuantizer(rec["config"], rec["channel_axis"]).to(device)
        prefix = _prefix(name)
        if q.observer is not None:
            obs = {k[len(prefix) + len("observer."):]: t.to(device) for k, t in tensors.items() if k.startswith(prefix + "observer.")}
            if obs:
                q.observer.load_state_dict(obs)
        if rec.get("observer") is not None:
            q.observer.chosen = rec["observer"]
        if rec["state"] == "frozen":
            zp = tensors.get(prefix + "zero_point")
            q.freeze((tensors[prefix + "scale"].to(device), None if zp is None else zp.to(device)))
        if hasattr(module, _QUANTIZER_ATTR):
            delattr(module, _QUANTIZER_ATTR)
        module.add_module(_QUANTIZER_ATTR, q)
        if not any(h is _input_quant_pre_hook for h in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(_input_quant_pre_hook)
    return list(records)
