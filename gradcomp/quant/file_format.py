"""The on-disk format of quantized weights: safetensors tensors plus a verified JSON quantization map.

A file holds plain tensors (no pickled objects) and three metadata strings: ``format =
"gradcomp.weights"``, ``format_version`` (``"4"`` when the file holds activation quantizers, ``"3"``
when a layer holds an input scale, else ``"2"``, so files without them read in older versions too) and
``quantization_map``, a JSON object:

* ``layers``: ``{layer: {"kind", "config", "weight_shape", "weight_dtype", ["tied_to"], ["input_scale"]}}``
  (``"input_scale": true``, version 3: the layer also stores ``<layer>.input_scale``, a per-input-channel
  scale of activation-aware scaling);
* ``aliases``: ``{state_dict name: stored tensor name}`` for entries that share one tensor;
* ``tensors``: ``{name: {"shape", "dtype", ["sha256"]}}`` for every stored tensor (with the
  SHA-256 of its bytes) and every alias (the shape and dtype it must have);
* ``activations`` (version 4 only): ``{module: {"config", "channel_axis", "state"}}``, the input
  quantizers of :mod:`gradcomp.quant.activation_quant` (checked by
  :mod:`gradcomp.quant.activation_files`).

Reading a file (:func:`read_file`) checks, before any tensor is handed out:

1. the metadata and the structure of the map (a wrong type or a missing key is a ``ValueError``
   naming the key);
2. every name: non-empty dot-separated parts without ``/``, ``\\``, whitespace or empty parts, so
   ``..`` and paths are refused;
3. that the stored tensors are exactly those the map lists, each with its recorded shape and dtype
   and its recorded checksum (a flipped byte is caught);
4. that every alias points to a stored tensor of the shape and dtype recorded for the alias.

Files of ``format_version = "1"`` (no ``tensors`` entry) are read with checks 1, 2 and 4 only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from gradcomp.files import atomic_write

FORMAT = "gradcomp.weights"
FORMAT_VERSION = "4"
_READABLE = ("1", "2", "3", "4")
_KINDS = ("linear", "embedding", "conv2d", "tensor")
_PART = r"[^.\s/\\\x00]+"
_NAME = re.compile(rf"{_PART}(?:\.{_PART})*")
_SHA = re.compile(r"[0-9a-f]{64}")


def dtype_name(dtype: torch.dtype) -> str:
    """Return the short name of a dtype (``torch.float16`` -> ``"float16"``)."""
    return str(dtype).replace("torch.", "")


def digest(t: torch.Tensor) -> str:
    """Return the SHA-256 (hex) of a tensor's bytes in its own dtype, in C order."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256()
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def check_name(name: Any, what: str, *, layer: bool = False) -> str:
    """Return ``name`` if it is a dotted name without empty parts or path characters.

    A layer may be ``""`` (a bare ``weight`` tensor), whose stored tensors are ``".qweight"`` etc.
    """
    if not isinstance(name, str):
        raise ValueError(f"{what} name must be a str, got {type(name).__name__} {name!r}")
    body = name[1:] if name.startswith(".") and not layer else name
    if (layer and name == "") or _NAME.fullmatch(body):
        return name
    raise ValueError(f"{what} name {name!r} is not a dotted module name (empty parts, '..', '/', '\\' and spaces are refused)")


def _shape(value: Any, where: str) -> Tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise ValueError(f"{where} must be a list of non-negative ints, got {value!r}")
    return tuple(value)


def _check_map(qmap: Any, where: str, version: str) -> Tuple[Dict[str, Any], Dict[str, str], Dict[str, Any]]:
    """Check the structure of a quantization map; return ``(layers, aliases, records)``."""
    if not isinstance(qmap, dict):
        raise ValueError(f"{where}: quantization_map must be a JSON object, got {type(qmap).__name__}")
    keys = ("layers", "aliases") + (("tensors",) if version != "1" else ())
    for key in keys:
        if key not in qmap:
            raise ValueError(f"{where}: quantization_map lacks the key {key!r}")
        if not isinstance(qmap[key], dict):
            raise ValueError(f"{where}: quantization_map[{key!r}] must be a JSON object, got {type(qmap[key]).__name__}")
    layers, aliases, records = qmap["layers"], qmap["aliases"], qmap.get("tensors", {})
    if "activations" in qmap and (version != "4" or not isinstance(qmap["activations"], dict)):
        raise ValueError(f"{where}: quantization_map['activations'] must be a JSON object and needs format_version 4, "
                         f"got {type(qmap['activations']).__name__} in version {version}")
    for fqn, rec in layers.items():
        check_name(fqn, "layer", layer=True)
        at = f"{where}: layers[{fqn!r}]"
        if not isinstance(rec, dict):
            raise ValueError(f"{at} must be a JSON object, got {type(rec).__name__}")
        for key in ("kind", "config", "weight_shape", "weight_dtype"):
            if key not in rec:
                raise ValueError(f"{at} lacks the key {key!r}")
        if rec["kind"] not in _KINDS:
            raise ValueError(f"{at}['kind'] must be one of {_KINDS}, got {rec['kind']!r}")
        if not isinstance(rec["config"], dict):
            raise ValueError(f"{at}['config'] must be a JSON object, got {type(rec['config']).__name__}")
        _shape(rec["weight_shape"], f"{at}['weight_shape']")
        if not isinstance(rec["weight_dtype"], str):
            raise ValueError(f"{at}['weight_dtype'] must be a str, got {rec['weight_dtype']!r}")
        if "input_scale" in rec and (rec["input_scale"] is not True or version in ("1", "2")):
            raise ValueError(f"{at}['input_scale'] must be true and needs format_version 3, got {rec['input_scale']!r} in version {version}")
        if "tied_to" in rec:
            target = rec["tied_to"]
            if not isinstance(target, str) or target not in layers or "tied_to" in layers[target]:
                raise ValueError(f"{at}['tied_to'] must name a layer of the file that holds its own weight, got {target!r}")
    for name, target in aliases.items():
        check_name(name, "alias")
        if not isinstance(target, str):
            raise ValueError(f"{where}: aliases[{name!r}] must be a str naming a stored tensor, got {target!r}")
    for name, rec in records.items():
        check_name(name, "tensor")
        at = f"{where}: tensors[{name!r}]"
        if not isinstance(rec, dict) or not isinstance(rec.get("dtype"), str):
            raise ValueError(f"{at} must be a JSON object with 'shape' and 'dtype', got {rec!r}")
        _shape(rec.get("shape"), f"{at}['shape']")
        if name not in aliases and not (isinstance(rec.get("sha256"), str) and _SHA.fullmatch(rec["sha256"])):
            raise ValueError(f"{at}['sha256'] must be 64 hex digits, got {rec.get('sha256')!r}")
    return layers, aliases, records


def write_file(path: Union[str, os.PathLike], layers: Dict[str, Dict[str, Any]], tensors: Dict[str, torch.Tensor],
               activations: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
    """Write tensors (shared ones once, with aliases), their checksums and the map to ``path`` atomically.

    ``activations``: the map's ``activations`` section (the file is then version 4), or None.
    """
    from safetensors.torch import save_file

    out: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    records: Dict[str, Dict[str, Any]] = {}
    first_of: Dict[Tuple[int, int, Tuple[int, ...], torch.dtype], str] = {}
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device and has no data to save")
        t = t.detach()
        records[name] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in first_of:
            aliases[name] = first_of[key]
            continue
        if key is not None:
            first_of[key] = name
        out[name] = t.to("cpu").contiguous()
        records[name]["sha256"] = digest(out[name])
    qmap = {"layers": layers, "aliases": aliases, "tensors": records}
    if activations:
        qmap["activations"] = activations
        version = FORMAT_VERSION
    else:
        version = "3" if any(rec.get("input_scale") for rec in layers.values()) else "2"
    meta = {"format": FORMAT, "format_version": version, "quantization_map": json.dumps(qmap, sort_keys=True)}
    # all or nothing, with the umask's permissions (safetensors alone creates 0600 files)
    atomic_write(path, lambda tmp: save_file(out, tmp, metadata=meta))


def read_file(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Read and verify a file (see the module docstring); return ``(layers, tensors)``, aliases resolved."""
    layers, _, tensors = read_sections(path)
    return layers, tensors


def read_sections(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, torch.Tensor]]:
    """Read and verify a file; return ``(layers, activations, tensors)`` (``activations`` is ``{}`` before version 4).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable gradcomp file, or any check fails (the message names
            the key, the tensor or the alias).
    """
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
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a gradcomp quantized file (metadata format={meta.get('format')!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if version not in _READABLE:
        raise ValueError(f"{path}: unsupported format_version {version!r}, expected one of {_READABLE}")
    try:
        qmap = json.loads(meta.get("quantization_map", ""))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: quantization_map is not valid JSON ({exc})") from exc
    layers, aliases, records = _check_map(qmap, str(path), version)
    for name in tensors:
        check_name(name, "tensor")
    if version != "1":
        _verify(tensors, aliases, records, str(path))
    for name, target in aliases.items():
        if target not in tensors or target in aliases:
            raise ValueError(f"{path}: alias {name!r} points to {target!r}, which is not a stored tensor")
        if name in tensors:
            raise ValueError(f"{path}: alias {name!r} is also a stored tensor")
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return layers, qmap.get("activations", {}), tensors


def _verify(tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str], records: Mapping[str, Any], where: str) -> None:
    """Check stored tensors against their records (names, shapes, dtypes, checksums) and aliases against theirs."""
    stored = set(tensors)
    listed = set(records) - set(aliases)
    if stored - listed:
        raise ValueError(f"{where}: the file holds tensors its map does not list: {sorted(stored - listed)[:5]}")
    if listed - stored:
        raise ValueError(f"{where}: the map lists tensors the file does not hold: {sorted(listed - stored)[:5]}")
    unrecorded = sorted(set(aliases) - set(records))
    if unrecorded:
        raise ValueError(f"{where}: aliases without a record of their shape: {unrecorded[:5]}")
    for name, t in tensors.items():
        rec = records[name]
        if list(t.shape) != rec["shape"] or dtype_name(t.dtype) != rec["dtype"]:
            raise ValueError(f"{where}: tensor {name!r} is {dtype_name(t.dtype)} of shape {tuple(t.shape)} in the file "
                             f"but {rec['dtype']} of shape {tuple(rec['shape'])} in its map")
        if digest(t) != rec["sha256"]:
            raise ValueError(f"{where}: tensor {name!r} does not match its recorded SHA-256: the file is corrupt")
    for name, target in aliases.items():
        rec, t = records[name], tensors.get(target)
        if t is not None and (list(t.shape) != rec["shape"] or dtype_name(t.dtype) != rec["dtype"]):
            raise ValueError(f"{where}: alias {name!r} must be {rec['dtype']} of shape {tuple(rec['shape'])}, "
                             f"but its target {target!r} is {dtype_name(t.dtype)} of shape {tuple(t.shape)}")
