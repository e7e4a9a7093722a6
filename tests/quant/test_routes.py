"""Kernels chosen by measurement: the slow route loses, every route gives the layer's result class, choices are reported."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn as nn

from gradcomp.quant import ActQuantConfig, WeightQuantConfig, quantize_, quantize_activations_, routes
from gradcomp.quant.activation_quant import prepare_activation_quant_

pytestmark = pytest.mark.usefixtures("one_thread")

INT8 = WeightQuantConfig(bits=8)


@pytest.fixture(autouse=True)
def fresh_cache():
    routes._CACHE.clear()
    yield
    routes._CACHE.clear()


def _slow(monkeypatch, *names, seconds=0.02):
    for name in names:
        real = routes._RUN[name]

        def slow(layer, x, q, real=real):
            time.sleep(seconds)
            return real(layer, x, q)

        monkeypatch.setitem(routes._RUN, name, slow)


def _conv_w8a8(act=ActQuantConfig(bits=8, observer="minmax"), **conv):
    torch.manual_seed(0)
    spec = dict(in_channels=8, out_channels=16, kernel_size=3)
    spec.update(conv)
    m = nn.Sequential(nn.Conv2d(**spec), nn.ReLU())
    quantize_(m, INT8)
    batches = [torch.randn(4, spec["in_channels"], 12, 12) for _ in range(3)]
    quantize_activations_(m, act, None if act.dynamic else batches)
    return m


def _route(m, name="0"):
    rows = [r for r in routes.route_report(m) if r["layer"] == name]
    assert len(rows) == 1, rows
    return rows[0]


def test_the_slow_route_loses_the_measurement(monkeypatch):
    x = torch.randn(4, 8, 12, 12)
    m = _conv_w8a8()
    _slow(monkeypatch, "int8_onednn", "int8_im2col")
    with torch.no_grad():
        m(x)
    row = _route(m)
    assert row["route"] not in ("int8_onednn", "int8_im2col") and row["source"] == "measured"
    assert row["times_ms"]["int8_onednn"] >= 20 and row["times_ms"][row["route"]] < 20
    # the other way round: everything but the int8 kernel is slow, so it wins
    routes._CACHE.clear()
    monkeypatch.undo()
    m = _conv_w8a8()
    _slow(monkeypatch, "dequantize", "dense", "dense_cl", "dense_im2col", "int8_im2col")
    with torch.no_grad():
        m(x)
    assert _route(m)["route"] == "int8_onednn"


def test_a_fake_clock_decides_the_pick(monkeypatch):
    m = quantize_(nn.Sequential(nn.Linear(64, 32)), INT8)
    costs = {"dequantize": 5.0, "dense": 1.0}
    now = [0.0]
    for name, cost in costs.items():
        real = routes._RUN[name]

        def timed(layer, x, q, real=real, cost=cost):
            now[0] += cost
            return real(layer, x, q)

        monkeypatch.setitem(routes._RUN, name, timed)
    monkeypatch.setattr(routes, "_clock", lambda: now[0])
    with torch.no_grad():
        m(torch.randn(3, 64))
    row = _route(m)
    assert row["route"] == "dense" and row["times_ms"] == {"dequantize": 5000.0, "dense": 1000.0}


def test_weight_only_fp32_takes_only_reference_routes_and_is_exact():
    m = quantize_(nn.Sequential(nn.Linear(256, 64)), WeightQuantConfig(bits=4, granularity="per_group", group_size=32))
    x = torch.randn(5, 256)
    with torch.no_grad():
        y = m(x)
    row = _route(m)
    assert set(row["times_ms"]) <= {"dequantize", "dense"} and row["class"] == "exact"
    assert torch.equal(y, nn.functional.linear(x, m[0].packed.dequantize(), m[0].bias))
    # fp32 itself (the dense weight) is always a candidate, so the pick is never slower than it measured
    assert row["ms"] <= row["times_ms"]["dense"]
    m[0].allow_dense = False
    routes.clear_routes_(m)
    with torch.no_grad():
        m(x)
    assert set(_route(m)["times_ms"]) == {"dequantize"}


CONVS = [dict(), dict(groups=2), dict(in_channels=8, out_channels=8, groups=8), dict(stride=2, padding=1),
         dict(dilation=2, padding=2), dict(kernel_size=(3, 5), padding=(1, 2), padding_mode="reflect"),
         dict(in_channels=3, out_channels=1), dict(kernel_size=1)]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("act", [ActQuantConfig(bits=8, observer="minmax"), ActQuantConfig(bits=8, observer="mse", symmetric=True),
                                 ActQuantConfig(bits=8, dynamic=True, granularity="per_tensor")], ids=["asym", "sym", "dynamic"])
@pytest.mark.parametrize("route", ["int8_onednn", "int8_im2col"])
def test_int8_convolutions_compute_the_fake_quantized_result(conv, act, route):
    m = _conv_w8a8(act, **conv)
    layer = m[0]
    if route == "int8_im2col" and layer.groups != 1:
        layer.route = route
        with pytest.raises(ValueError, match="groups"):
            with torch.no_grad():
                m(torch.randn(2, layer.in_channels, 12, 12))
        return
    ref = copy.deepcopy(m)
    ref[0].use_kernels = False
    layer.route = route
    x = torch.randn(3, layer.in_channels, 12, 12) * 1.5
    with torch.no_grad():
        got, want = m(x), ref(x)
    assert _route(m)["route"] == route and _route(m)["source"] == "pinned"
    assert got.shape == want.shape and got.is_contiguous()
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_a_route_that_does_not_fit_is_refused_with_the_reason():
    m = quantize_(nn.Sequential(nn.Linear(16, 8)), WeightQuantConfig(bits=8, symmetric=False))
    m[0].route = "int8_dynamic"
    with pytest.raises(ValueError, match="int8_dynamic.*int8 results, the layer's class is exact"):
        with torch.no_grad():
            m(torch.randn(2, 16))
    m[0].route = "nope"
    with pytest.raises(ValueError, match="unknown route"):
        with torch.no_grad():
            m(torch.randn(2, 16))


def test_choices_are_cached_per_format_and_shape_and_saved(tmp_path):
    torch.manual_seed(0)
    m = quantize_(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)), INT8)
    with torch.no_grad():
        m(torch.randn(4, 32))
    rows = routes.route_report(m)
    assert [r["source"] for r in rows] == ["measured", "cache"] and rows[0]["route"] == rows[1]["route"]
    assert routes.save_route_cache(tmp_path / "r.json") == 1
    routes._CACHE.clear()
    assert routes.load_route_cache(tmp_path / "r.json") == 1
    fresh = quantize_(nn.Sequential(nn.Linear(32, 32)), INT8)
    with torch.no_grad():
        fresh(torch.randn(3, 32))          # 3 rows and 4 rows share a bucket
    assert routes.route_report(fresh)[0]["source"] == "cache"
    # another thread count is another machine: not matched
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        other = quantize_(nn.Sequential(nn.Linear(32, 32)), INT8)
        with torch.no_grad():
            other(torch.randn(3, 32))
        assert routes.route_report(other)[0]["source"] == "measured"
    finally:
        torch.set_num_threads(before)
    (tmp_path / "bad.json").write_text('{"k": {"route": "warp"}}')
    with pytest.raises(ValueError, match="not a route cache"):
        routes.load_route_cache(tmp_path / "bad.json")


def test_gradients_take_the_differentiable_route_and_reach_the_bias():
    m = _conv_w8a8()
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and not routes.route_report(m)
    # no gradient to the input, but the bias trains: the kernel runs and the bias still gets its gradient
    m[0].bias.requires_grad_(True)
    m[0].route = "int8_onednn"
    y = m(torch.randn(2, 8, 12, 12))
    y.sum().backward()
    assert m[0].bias.grad is not None and bool((m[0].bias.grad != 0).any())


def test_dynamic_linear_w8a8_routes_agree_with_the_fake_quant_path():
    torch.manual_seed(0)
    m = quantize_(nn.Sequential(nn.Linear(64, 48)), INT8)
    prepare_activation_quant_(m, ActQuantConfig(bits=8, dynamic=True, granularity="per_tensor", symmetric=True))
    ref = copy.deepcopy(m)
    ref[0].use_kernels = False
    x = torch.randn(7, 64)
    for route in ("int8_dynamic", "int8_onednn", None):
        m[0].route = route
        routes.clear_routes_(m)
        with torch.no_grad():
            got, want = m(x), ref(x)
        assert float((got - want).norm() / want.norm()) < 1e-5, route
    assert _route(m)["class"] == "int8"


def test_a_kept_choice_is_forgotten_when_the_weight_changes_or_a_knob_is_set():
    torch.manual_seed(0)
    a = quantize_(nn.Sequential(nn.Linear(32, 16)), INT8)
    b = quantize_(nn.Sequential(nn.Linear(32, 16)), INT8)
    x = torch.randn(4, 32)
    with torch.no_grad():
        a(x)                                               # measured; the route kept as a closure
        a.load_state_dict(b.state_dict())                  # copied into the same buffers
        assert torch.equal(a(x), b(x))
        a[0].use_kernels = False
        assert "_route_state" not in a[0].__dict__
        assert torch.equal(a(x), nn.functional.linear(x, a[0].packed.dequantize(), a[0].bias))
        a[0].use_kernels = True
        a(x)
        a.double()                                         # a move: the dense copy must follow
        y = a(x.double())
        assert y.dtype == torch.float64
        assert torch.allclose(y, nn.functional.linear(x.double(), a[0].packed.dequantize(torch.float64), a[0].bias))


def test_dense_copies_stay_within_the_memory_budget(monkeypatch):
    m = quantize_(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), INT8)
    monkeypatch.setattr(routes, "DENSE_BUDGET_BYTES", routes._dense_bytes[0] + 64 * 64 * 4)   # room for one copy
    with torch.no_grad():
        m(torch.randn(2, 64))
    first, second = routes.route_report(m)
    assert "dense" in first["times_ms"] and "dense" not in second["times_ms"]
    assert second["route"] == "dequantize"
    held = routes._dense_bytes[0]
    del m, first, second
    import gc

    gc.collect()
    assert routes._dense_bytes[0] <= held - 64 * 64 * 4          # freed copies are no longer counted


def test_another_thread_count_is_measured_again():
    m = quantize_(nn.Sequential(nn.Linear(32, 32)), INT8)
    x = torch.randn(4, 32)
    with torch.no_grad():
        m(x)
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            m(x)
        finally:
            torch.set_num_threads(before)
    assert [r["source"] for r in routes.route_report(m)] == ["measured", "measured"]
