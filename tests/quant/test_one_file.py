"""One file for weights and activations: save_quantized / load_quantized carry the activation quantizers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from gradcomp.quant import (
    ActQuantConfig,
    WeightQuantConfig,
    load_quantized,
    quantize_,
    quantize_activations_,
    save_quantized,
)
from gradcomp.quant.activation_quant import ActivationQuantizer, prepare_activation_quant_

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Module:
    # the minimal case of the issue: Conv2d + PReLU + Linear
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Flatten(), nn.Linear(288, 4))


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 8, 8, generator=g) for _ in range(n)]


def _quantized(act: ActQuantConfig) -> nn.Module:
    torch.manual_seed(0)
    m = _net()
    quantize_(m, WeightQuantConfig(bits=8))
    quantize_activations_(m, act, _batches())
    return m


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys()), json.loads(f.metadata()["quantization_map"])


@pytest.mark.parametrize("act", [ActQuantConfig(bits=8, observer="mse"),
                                 ActQuantConfig(bits=8, observer="per_channel"),
                                 ActQuantConfig(bits=8, observer="minmax", symmetric=True),
                                 ActQuantConfig(bits=8, dynamic=True, granularity="per_token", symmetric=True)],
                         ids=["mse", "per_channel", "minmax-sym", "dynamic"])
@pytest.mark.parametrize("meta", [True, False], ids=["meta", "cpu"])
def test_weights_and_activation_quantizers_round_trip_bit_exactly(tmp_path, act, meta):
    m = _quantized(act)
    path = tmp_path / "wa.safetensors"
    save_quantized(m, path)
    keys, qmap = _keys(path)
    assert not [k for k in keys if ".observer." in k or k.endswith((".frozen", ".signal", ".noise"))], keys
    assert set(qmap["activations"]) == {"0", "3"}
    if meta:
        with torch.device("meta"):
            fresh = _net()
    else:
        torch.manual_seed(1)
        fresh = _net()
    load_quantized(fresh, path)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    for name in ("0", "3"):
        q = getattr(fresh.get_submodule(name), "input_quantizer")
        assert isinstance(q, ActivationQuantizer) and q.config == act and not q.calibrating
        if not act.dynamic:
            ref = getattr(m.get_submodule(name), "input_quantizer")
            assert torch.equal(q.scale, ref.scale) and torch.equal(q.zero_point, ref.zero_point)
    assert not [n for n, t in list(fresh.named_parameters()) + list(fresh.named_buffers()) if t.device.type == "meta"]


def test_a_fresh_model_with_prepared_quantizers_loads_the_file_too(tmp_path):
    m = _quantized(ActQuantConfig(bits=8, observer="mse"))
    save_quantized(m, tmp_path / "a.safetensors")
    torch.manual_seed(1)
    fresh = _net()
    quantize_(fresh, WeightQuantConfig(bits=8))
    prepare_activation_quant_(fresh, ActQuantConfig(bits=8, observer="mse"))   # scales of shape (0,)
    load_quantized(fresh, tmp_path / "a.safetensors")
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_observer_state_is_saved_only_when_asked(tmp_path):
    m = _quantized(ActQuantConfig(bits=8, observer="mse"))
    save_quantized(m, tmp_path / "o.safetensors", observers=True)
    keys, _ = _keys(tmp_path / "o.safetensors")
    assert any(".input_quantizer.observer.histogram.counts" in k for k in keys)
    fresh = _net()
    load_quantized(fresh, tmp_path / "o.safetensors")
    a = m[0].input_quantizer.observer.histogram.counts
    b = fresh[0].input_quantizer.observer.histogram.counts
    assert torch.equal(a, b)
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(fresh(x), m(x))


def test_a_calibrating_quantizer_is_refused_unless_observers_are_saved(tmp_path):
    m = _net()
    prepare_activation_quant_(m, ActQuantConfig(bits=8))
    m(_batches(1)[0])
    with pytest.raises(ValueError, match="still calibrating"):
        save_quantized(m, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()
    save_quantized(m, tmp_path / "c.safetensors", observers=True)
    fresh = _net()
    load_quantized(fresh, tmp_path / "c.safetensors")
    assert fresh[0].input_quantizer.calibrating
    assert torch.equal(fresh[0].input_quantizer.observer.min_val, m[0].input_quantizer.observer.min_val)


def test_a_file_whose_activation_layer_is_missing_changes_nothing(tmp_path):
    m = _quantized(ActQuantConfig(bits=8, observer="minmax"))
    save_quantized(m, tmp_path / "a.safetensors")
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Flatten())
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="'3'"):
        load_quantized(other, tmp_path / "a.safetensors")
    assert set(other.state_dict()) == set(before)
    assert not hasattr(other[0], "input_quantizer")


def test_files_without_activations_keep_their_format_version(tmp_path):
    m = _net()
    quantize_(m, WeightQuantConfig(bits=8))
    save_quantized(m, tmp_path / "w.safetensors")
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == "2" and "activations" not in json.loads(meta["quantization_map"])
