"""Save and load quantized models: plain tensors plus a JSON quantization map in safetensors.

:func:`save_quantized` writes plain tensors plus a JSON quantization map into a safetensors file
(no pickled tensor subclasses); :func:`load_quantized` restores them into a freshly built model,
bit-identically. :func:`quantize_state_dict` and its save/load pair do the same for a state_dict
without a model.

Example::

    >>> save_quantized(model, "m.safetensors")
    >>> fresh = load_quantized(build_model_on_meta(), "m.safetensors")
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from gradcomp.batches import progress_bar
from gradcomp.quant.configs import Config, Rules, _config_from_dict, _config_to_dict
from gradcomp.quant import activation_files
from gradcomp.quant.file_format import FORMAT, read_file, read_sections, write_file
from gradcomp.quant.modules import PackedWeight, _QuantizedLayer, _kind, _set_submodule, _swap
from gradcomp.quant.rules import _config_rules, resolve_config
from gradcomp.quant.torch_files import describe_unloadable, one_line

logger = logging.getLogger(__name__)

__all__ = [
    "save_quantized",
    "load_quantized",
    "quantize_state_dict",
    "save_quantized_state_dict",
    "load_quantized_state_dict",
    "load_tensor_file",
]

_DTYPE_NAMES: Dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}



def _quantized_entries(model: nn.Module) -> Dict[str, _QuantizedLayer]:
    return {fqn: m for fqn, m in model.named_modules(remove_duplicate=False) if isinstance(m, _QuantizedLayer)}


def _layer_record(kind: str, packed: PackedWeight) -> Dict[str, Any]:
    rec = {
        "kind": kind,
        "config": _config_to_dict(packed.config),
        "weight_shape": list(packed.shape),
        "weight_dtype": _DTYPE_NAMES.get(packed.dtype, str(packed.dtype)),
    }
    if packed.input_scale is not None:
        rec["input_scale"] = True
    return rec


def _packed_tensors(fqn: str, packed: PackedWeight) -> Dict[str, torch.Tensor]:
    out = {f"{fqn}.qweight": packed.qweight}
    if packed.scale is not None:
        out[f"{fqn}.scale"] = packed.scale
    if packed.zero_point is not None:
        out[f"{fqn}.zero_point"] = packed.zero_point
    if packed.input_scale is not None:
        out[f"{fqn}.input_scale"] = packed.input_scale
    return out


def save_quantized(model: nn.Module, path: Union[str, os.PathLike], *, observers: bool = False) -> None:
    """Save a (partly) quantized model, weights and activation quantizers, as one safetensors file.

    Quantized layer ``L`` stores ``L.qweight`` (packed uint8 codes, or the fp16/bf16 cast),
    ``L.scale``, ``L.zero_point`` (asymmetric only), ``L.input_scale`` (activation-aware scaling only)
    and ``L.bias``; every other tensor of the
    state_dict is stored under its own name. The file's metadata holds ``quantization_map``: per
    layer its kind, config, weight shape and dtype (``tied_to`` for a layer that shares another
    layer's packed weight), and ``aliases`` for state_dict entries that share one tensor. The file
    is written to ``path + ".tmp"`` and renamed, so a failure leaves no partial file.

    Activation quantizers (:func:`gradcomp.quant.quantize_activations_`) are stored too, in the map's
    ``activations`` section with their config, plus ``<module>.input_quantizer.scale`` / ``.zero_point``
    of frozen static ones (see :mod:`gradcomp.quant.activation_files`); the observers' calibration
    state only with ``observers=True``.

    Args:
        model: a model, usually after :func:`quantize_` and/or :func:`quantize_activations_`.
        path: destination file (``.safetensors``).
        observers: also store each activation observer's calibration state (histograms, ranges), so
            calibration can go on after loading; needed to save a quantizer that is still calibrating.

    Raises:
        ValueError: a quantizer is still calibrating and ``observers`` is False (nothing is written).
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
    acts, act_tensors = activation_files.activation_records(model, observers)
    prefixes = tuple(f"{fqn}.packed." for fqn in qlayers) + activation_files.quantizer_prefixes(model)
    for name, t in model.state_dict(keep_vars=True).items():
        if prefixes and name.startswith(prefixes):
            continue
        if name in tensors:
            raise ValueError(f"state_dict entry {name!r} collides with a quantized tensor name")
        tensors[name] = t
    tensors.update(act_tensors)
    write_file(path, layers, tensors, acts or None)
    logger.info("saved %d quantized layers, %d activation quantizers and %d tensors to %s", len(layers), len(acts),
                len(tensors), path)


def _packed_from_file(fqn: str, rec: Mapping[str, Any], tensors: Dict[str, torch.Tensor], path) -> PackedWeight:
    where = f"{path}: layer {fqn!r}"
    cfg = _config_from_dict(rec.get("config", {}), where)
    dtype_name = rec.get("weight_dtype")
    dtype = {v: k for k, v in _DTYPE_NAMES.items()}.get(dtype_name)
    if dtype is None:
        raise ValueError(f"{where}: unsupported weight_dtype {dtype_name!r}")
    try:
        packed = PackedWeight(
            tensors[f"{fqn}.qweight"], tensors.get(f"{fqn}.scale"), tensors.get(f"{fqn}.zero_point"),
            cfg, rec["weight_shape"], dtype, tensors[f"{fqn}.input_scale"] if rec.get("input_scale") else None,
        )
    except KeyError as exc:
        raise ValueError(f"{where}: missing tensor {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    scale = packed.scale
    if scale is not None and not bool((torch.isfinite(scale) & (scale >= 0)).all()):
        raise ValueError(f"{where}: the scales hold inf, nan or negative values; the file is corrupt")
    return packed


def load_quantized(model: nn.Module, path: Union[str, os.PathLike], *, device: Union[str, torch.device, None] = None) -> nn.Module:
    """Load a file written by :func:`save_quantized` into a freshly built model (meta device is fine).

    Steps:
        1. Read the tensors and the quantization map; rebuild every packed weight and check it
           against its config.
        2. Check the model against the file: each quantized layer exists, has the recorded kind and
           weight shape; each module with an activation quantizer in the file exists and the file
           holds the quantizer's tensors; every other state_dict entry is present with its shape and
           nothing is left over. Any mismatch raises ValueError naming the layer or tensor; the model
           is untouched.
        3. Swap the quantized layers in, attach the activation quantizers (replacing any the model
           has) and load the other tensors (assigned when the model is on the meta device, copied
           otherwise).

    Args:
        model: the same architecture, unquantized (or quantized the same way).
        path: the ``.safetensors`` file.
        device: where to put the loaded tensors; default: the model's device (CPU for meta).

    Returns:
        ``model``, with bit-identical packed weights and outputs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers, acts, tensors = read_sections(path)
    acts = activation_files.check_activation_records(acts, str(path))
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
    activation_files.check_modules(model, acts, str(path))
    act_names = set(activation_files.expected_tensors(acts, tensors, str(path)))
    expected = {}
    # the model's own quantizers (a prepared copy) are replaced by the file's
    prefixes = tuple(skip_prefixes) + activation_files.quantizer_prefixes(model)
    for name, t in model.state_dict(keep_vars=True).items():
        if name in skip_names or (prefixes and name.startswith(prefixes)):
            continue
        expected[name] = t
    quant_names = {n for fqn, rec in layers.items() if "tied_to" not in rec for n in _packed_tensors(fqn, packs[fqn])}
    quant_names |= act_names
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
    activation_files.attach_activation_quantizers(model, acts, tensors, device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        logger.warning("after loading, %d tensors are still on the meta device (non-persistent buffers?): %s", len(left), left[:5])
    logger.info("loaded %d quantized layers, %d activation quantizers and %d tensors from %s", len(new), len(acts),
                len(plain_sd), path)
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
    progress: bool = False,
) -> Tuple[Dict[str, PackedWeight], Dict[str, torch.Tensor]]:
    """Quantize the weight matrices of a state_dict, without a model.

    Every floating tensor named ``<layer>.weight`` with two or more dims is a layer weight; rules
    match the layer name ``<layer>``. Other tensors (biases, norms, integer buffers) stay as they are.

    Args:
        state_dict: name -> tensor.
        config_or_rules: as for :func:`quantize_`.
        filter_fn: optional ``(layer_name, weight) -> bool``.
        progress: show a tqdm progress bar over the tensors on stderr.

    Returns:
        ``(packed, plain)``: layer name -> :class:`PackedWeight`, and the remaining tensors.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    rules = _config_rules(config_or_rules)
    packed: Dict[str, PackedWeight] = {}
    plain: Dict[str, torch.Tensor] = {}
    items = list(state_dict.items())
    for key, t in progress_bar(items, progress, "quantize", unit="tensor"):
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
    write_file(path, layers, tensors)


def load_quantized_state_dict(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Config]]:
    """Read a gradcomp quantized file back as a plain (dequantized) state_dict, without a model.

    The file is verified as :func:`load_quantized` verifies it (names, the map's structure, every
    tensor's shape, dtype and checksum, aliases, each packed weight against its config, finite
    scales); besides, no dequantized ``<layer>.weight`` may collide with a plain tensor of the file.

    Returns:
        ``(state_dict, configs)``: ``<layer>.weight`` is the dequantized weight in its original
        dtype; ``configs`` maps each quantized layer to its config.

    Raises:
        ValueError: any check fails; nothing is returned.
    """
    layers, tensors = read_file(path)
    packs: Dict[str, PackedWeight] = {}
    for fqn, rec in layers.items():
        if "tied_to" not in rec:
            packs[fqn] = _packed_from_file(fqn, rec, tensors, path)
    quant_names = {n for fqn, p in packs.items() for n in _packed_tensors(fqn, p)}
    for fqn, rec in layers.items():
        if "tied_to" not in rec:
            continue
        stray = sorted(n for n in tensors if n.startswith(f"{fqn}.") and n[len(fqn) + 1:] in ("qweight", "scale", "zero_point", "input_scale"))
        if stray:
            raise ValueError(f"{path}: layer {fqn!r} is tied to {rec['tied_to']!r} but the file holds its own {stray}")
    plain = {name: t for name, t in tensors.items() if name not in quant_names}
    out: Dict[str, torch.Tensor] = {}
    configs: Dict[str, Config] = {}
    for fqn, rec in layers.items():
        key = f"{fqn}.weight" if fqn else "weight"
        if key in plain:
            raise ValueError(f"{path}: layer {fqn!r} is quantized but the file also holds a plain tensor {key!r}")
        p = packs[rec.get("tied_to", fqn)]
        out[key] = p.dequantize()
        configs[fqn] = p.config
    out.update(plain)
    return out, configs


def _tensor_mappings(obj: Any, prefix: str, depth: int, out: List[Tuple[str, Mapping]]) -> None:
    """Collect every mapping (with its dotted key path) that holds tensors, down to ``depth`` levels."""
    if not isinstance(obj, Mapping) or depth < 0:
        return
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        out.append((prefix, obj))
    for k, v in obj.items():
        if isinstance(v, Mapping):
            _tensor_mappings(v, f"{prefix}.{k}" if prefix else str(k), depth - 1, out)


def _find_state_dict(obj: Any, path: Path, key: Optional[str]) -> Tuple[str, Mapping]:
    """Return ``(key path, mapping)`` of the state dict inside a loaded checkpoint."""
    if key:
        cur = obj
        for part in key.split("."):
            if not isinstance(cur, Mapping) or part not in cur:
                have = sorted(map(str, cur)) if isinstance(cur, Mapping) else type(cur).__name__
                raise ValueError(f"{path}: no entry {part!r} on the key path {key!r}; there: {have}")
            cur = cur[part]
        if not isinstance(cur, Mapping):
            raise ValueError(f"{path}: {key!r} holds a {type(cur).__name__}, expected a mapping of names to tensors")
        return key, cur
    found: List[Tuple[str, Mapping]] = []
    _tensor_mappings(obj, "", 4, found)
    if not found:
        return "", obj
    # the mapping with the most tensors: a model's state dict beats an optimizer's step counters
    return max(found, key=lambda kv: sum(isinstance(v, torch.Tensor) for v in kv[1].values()))


def load_tensor_file(path: Union[str, os.PathLike], *, key: Optional[str] = None, strip_prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file or a torch ``state_dict`` / checkpoint (``weights_only=True``).

    A gradcomp quantized file is read back dequantized. In a checkpoint the state dict is found where
    it sits: the nested mapping holding the most tensors, at any depth up to 4 (``ckpt["model"]``,
    ``ckpt["model"]["state_dict"]``, Lightning's ``ckpt["state_dict"]``), or at the dotted ``key``
    given (``"model.state_dict"``). Non-tensor entries are dropped.

    Args:
        path: the file.
        key: dotted path of the state dict inside the checkpoint (default: found automatically).
        strip_prefix: remove this prefix from every name that has it (Lightning's ``"model."``), so
            that names match the bare model.

    Example: ``load_tensor_file("ckpt.pth.tar")`` on ``{"model": {"state_dict": {...}, "model_args": ...},
    "optimizer": {...}}`` returns the model's tensors.
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
        if meta.get("format") == FORMAT:
            out = load_quantized_state_dict(path)[0]
        else:
            from safetensors.torch import load_file

            out = load_file(str(path))
        return _strip(out, strip_prefix)
    script = describe_unloadable(path, torchscript_only=True)
    if script:   # torch.load would hand a TorchScript archive to torch.jit.load and run its code
        raise ValueError(script)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(describe_unloadable(path) or f"{path} could not be loaded as a torch state_dict with "
                         f"weights_only=True: {one_line(exc)}") from None
    if isinstance(obj, nn.Module):  # pragma: no cover - weights_only refuses modules
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state_dict (a mapping of names to tensors)")
    where, sd = _find_state_dict(obj, path, key)
    out = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise ValueError(f"{path} holds no tensors{f' at {where!r}' if where else ''}; give the key path of the state dict (--key)")
    if where:
        logger.info("%s: state dict found at %r (%d tensors)", path, where, len(out))
    return _strip(out, strip_prefix)


def _strip(sd: Dict[str, torch.Tensor], prefix: Optional[str]) -> Dict[str, torch.Tensor]:
    if not prefix:
        return sd
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
