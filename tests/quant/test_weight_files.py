"""Weight files are verified: the map's structure, names, checksums, finite scales, aliases and shapes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gradcomp.quant import (
    WeightQuantConfig,
    load_quantized,
    load_quantized_state_dict,
    quantize_,
    quantize_state_dict,
    save_quantized,
    save_quantized_state_dict,
)
from gradcomp.quant.file_format import digest


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    m[1].weight = m[0].weight  # tied: the file holds one packed weight and an alias-free tie
    return m


def _saved(tmp_path):
    m = _model()
    quantize_(m, WeightQuantConfig(bits=4, granularity="per_group", group_size=4))
    path = tmp_path / "q.safetensors"
    save_quantized(m, path)
    return path


def _parts(path):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    return load_file(str(path)), meta, json.loads(meta["quantization_map"])


def _rewrite(path, tensors, meta, qmap, *, rehash=()):
    """Write a crafted file: the map is changed, and the checksums of ``rehash`` are made to fit."""
    for name in rehash:
        qmap["tensors"][name]["sha256"] = digest(tensors[name])
    meta = dict(meta, quantization_map=json.dumps(qmap))
    out = path.with_name("crafted.safetensors")
    save_file(tensors, str(out), metadata=meta)
    return out


def test_every_tensor_has_a_checksum_and_loads_back(tmp_path):
    path = _saved(tmp_path)
    tensors, meta, qmap = _parts(path)
    assert meta["format_version"] == "2"
    for name, t in tensors.items():
        assert qmap["tensors"][name]["sha256"] == digest(t)
    load_quantized(nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16)), path)


@pytest.mark.parametrize("change,needle", [
    (lambda q: q.update(layers=[1, 2]), r"quantization_map\['layers'\] must be a JSON object, got list"),
    (lambda q: q.pop("aliases"), r"quantization_map lacks the key 'aliases'"),
    (lambda q: q["layers"]["0"].pop("weight_shape"), r"layers\['0'\] lacks the key 'weight_shape'"),
    (lambda q: q["layers"]["0"].update(weight_shape=[16, -8]), r"layers\['0'\]\['weight_shape'\] must be a list of non-negative ints"),
    (lambda q: q["layers"]["0"].update(kind="lstm"), r"layers\['0'\]\['kind'\] must be one of"),
    (lambda q: q["layers"]["1"].update(tied_to="nope"), r"layers\['1'\]\['tied_to'\] must name a layer"),
    (lambda q: q["tensors"]["0.scale"].update(sha256="xyz"), r"tensors\['0.scale'\]\['sha256'\] must be 64 hex digits"),
])
def test_map_structure_errors_name_the_key(tmp_path, change, needle):
    tensors, meta, qmap = _parts(_saved(tmp_path))
    change(qmap)
    bad = _rewrite(tmp_path / "q.safetensors", tensors, meta, qmap)
    for load in (lambda: load_quantized(nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16)), bad), lambda: load_quantized_state_dict(bad)):
        with pytest.raises(ValueError, match=needle):
            load()


def test_flipped_bytes_are_caught_by_the_checksum(tmp_path):
    tensors, meta, qmap = _parts(_saved(tmp_path))
    tensors["0.qweight"] = tensors["0.qweight"].clone()
    tensors["0.qweight"][:5] ^= 0xFF
    bad = _rewrite(tmp_path / "q.safetensors", tensors, meta, qmap)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"tensor '0.qweight' does not match its recorded SHA-256"):
        load_quantized(model, bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="SHA-256"):
        load_quantized_state_dict(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5])
def test_non_finite_or_negative_scales_are_refused(tmp_path, value):
    tensors, meta, qmap = _parts(_saved(tmp_path))
    tensors["0.scale"] = tensors["0.scale"].clone()
    tensors["0.scale"][0, 0] = value
    bad = _rewrite(tmp_path / "q.safetensors", tensors, meta, qmap, rehash=["0.scale"])  # a consistent, crafted file
    with pytest.raises(ValueError, match=r"layer '0': the scales hold inf, nan or negative values"):
        load_quantized_state_dict(bad)
    with pytest.raises(ValueError, match="scales hold inf"):
        load_quantized(nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16)), bad)


def _state_file(tmp_path):
    torch.manual_seed(1)
    sd = {"a.weight": torch.randn(8, 8), "a.bias": torch.randn(8), "b.weight": torch.randn(4, 8)}
    sd["c.weight"] = sd["b.weight"]  # shared: stored once, listed as an alias
    packed, plain = quantize_state_dict(sd, [("a", WeightQuantConfig(bits=8))])
    path = tmp_path / "s.safetensors"
    save_quantized_state_dict(packed, plain, path)
    return path, sd


def test_state_dict_file_round_trip_with_alias(tmp_path):
    path, sd = _state_file(tmp_path)
    back, configs = load_quantized_state_dict(path)
    assert set(back) == set(sd) and list(configs) == ["a"]
    assert torch.equal(back["c.weight"], sd["b.weight"]) and back["c.weight"].data_ptr() == back["b.weight"].data_ptr()


def _rename_bias(tensors, qmap):
    tensors["../../evil.weight"] = tensors.pop("a.bias")
    qmap["tensors"]["../../evil.weight"] = qmap["tensors"].pop("a.bias")


@pytest.mark.parametrize("craft,needle", [
    (_rename_bias, r"tensor name '\.\./\.\./evil\.weight' is not a dotted module name"),
    (lambda tensors, qmap: tensors.update({"extra.weight": torch.zeros(3)}), r"holds tensors its map does not list: \['extra.weight'\]"),
])
def test_state_dict_loader_refuses_traversal_names_and_unlisted_tensors(tmp_path, craft, needle):
    path, _ = _state_file(tmp_path)
    tensors, meta, qmap = _parts(path)
    craft(tensors, qmap)
    with pytest.raises(ValueError, match=needle):
        load_quantized_state_dict(_rewrite(path, tensors, meta, qmap))


def test_state_dict_loader_refuses_an_alias_to_a_tensor_of_another_shape(tmp_path):
    path, _ = _state_file(tmp_path)
    tensors, meta, qmap = _parts(path)
    qmap["aliases"]["c.weight"] = "a.bias"  # a (8,) tensor where a (4, 8) one belongs
    bad = _rewrite(path, tensors, meta, qmap)
    with pytest.raises(ValueError, match=r"alias 'c.weight' must be float32 of shape \(4, 8\), but its target 'a.bias' is float32 of shape \(8,\)"):
        load_quantized_state_dict(bad)
    qmap["aliases"]["c.weight"] = "missing.weight"
    with pytest.raises(ValueError, match=r"alias 'c.weight' points to 'missing.weight', which is not a stored tensor"):
        load_quantized_state_dict(_rewrite(path, tensors, meta, qmap))


def test_state_dict_loader_refuses_a_plain_tensor_that_shadows_a_layer(tmp_path):
    path, _ = _state_file(tmp_path)
    tensors, meta, qmap = _parts(path)
    tensors["a.weight"] = torch.zeros(8, 8)
    qmap["tensors"]["a.weight"] = {"shape": [8, 8], "dtype": "float32"}
    bad = _rewrite(path, tensors, meta, qmap, rehash=["a.weight"])
    with pytest.raises(ValueError, match=r"layer 'a' is quantized but the file also holds a plain tensor 'a.weight'"):
        load_quantized_state_dict(bad)


def test_version_1_files_still_load(tmp_path):
    path, sd = _state_file(tmp_path)
    tensors, meta, qmap = _parts(path)
    qmap.pop("tensors")
    meta["format_version"] = "1"
    old = _rewrite(path, tensors, meta, qmap)
    back, _ = load_quantized_state_dict(old)
    assert set(back) == set(sd)
