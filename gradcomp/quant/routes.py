"""Kernels chosen by measurement, on the machine that runs them: one route per layer and input shape.

A quantized Linear or Conv2d can compute its output in several ways from the same stored codes.
Which is fastest depends on the CPU (``torch._int_mm`` is fast with AVX-512 VNNI and very slow
without it), the thread count and the layer's real shapes (an int8 convolution with one input
channel is 3x slower than fp32 on the machine where the other layers of the same net are 15x
faster). So nothing is assumed: the first time a layer runs without a gradient on a new input shape,
every route that fits it is timed on that very input and the fastest one that gives the layer's
result class is kept, per (layer format, input shape, dtype, CPU capability, thread count), in a
process-wide cache (:func:`save_route_cache` / :func:`load_route_cache` keep it on disk).

Routes (``ROUTES``) and their result class:

============== ========================================================== ==============
route          computation                                                result class
============== ========================================================== ==============
dequantize     weight dequantized at every call, then F.linear / conv2d   reference
dense          the dequantized weight kept (one dense copy; all dense copies  reference
               together stay within ``DENSE_BUDGET_BYTES``, a quarter of memory)
dense_cl       ``dense`` in channels-last layout (Conv2d)                 reference
dense_im2col   Conv2d as one fp32 matrix product over the input patches   reference
int8_weight    ``torch._weight_int8pack_mm`` (bf16 activations)           bf16
int4_weight    ``torch._weight_int4pack_mm_for_cpu`` (bf16 activations)   bf16
int8_dynamic   per-token int8 activations, ``torch._int_mm``              int8
int8_onednn    oneDNN ``qconv2d_pointwise`` / ``qlinear_pointwise``       int8
int8_im2col    Conv2d as ``torch._int_mm`` over the patches of the codes  int8
============== ========================================================== ==============

"reference" routes compute what the layer computes without kernels (the input fake-quantized by
its activation quantizer, if any, times the dequantized weight), up to fp32 summation order. The
layer's result class is ``int8`` when it has an active 8-bit input quantizer (the kernels use the
very codes of the fake-quantized path and exact integer sums), ``bf16`` when its input is bf16 or
the user set ``compute_dtype = torch.bfloat16``, and otherwise ``exact``: fp32 activations, where
only reference routes qualify (no bf16 rounding the user did not ask for).

Steps of a selection (:func:`run`):
    1. List the routes that fit the layer's format, its input quantizer and the input (``fits``),
       and whose class is the layer's; ``dense`` and ``dense_cl`` only with ``layer.allow_dense``.
    2. Prepare each route's operands (prepacked weights; not counted in the timing), run each once
       and check its output against the ``dequantize`` route on this input: a reference route must
       agree to 1e-5 (relative), an ``int8`` route to a tenth of the activation quantization's own
       effect (``||y_ref - y_fp32||``), a ``bf16`` route to 2e-2; a route that does not is rejected
       and the report says by how much.
    3. Time the survivors and the plain fp32 computation (dense weight, no activation quantization;
       for the report) in interleaved rounds, the fastest run of each counted (at least ``REPEATS``
       rounds, more for cheap layers up to ``BUDGET_S`` seconds; routes more than 3x slower than the
       best first run are not repeated); keep the fastest route.

A pinned route (``layer.route = "int8_onednn"``) is used as asked, without measurement: that is the
user asking for a route that may be slower than fp32. ``layer.use_kernels = False`` keeps the
``dequantize`` route.

Example::

    >>> quantize_(model, WeightQuantConfig(bits=8)); quantize_activations_(model, ActQuantConfig(bits=8), batches)
    >>> with torch.no_grad():
    ...     model(batch)                       # the first call measures, later calls run the choice
    >>> for row in route_report(model): print(row["layer"], row["route"], row["speedup_vs_fp32"])
"""

from __future__ import annotations

import json
import math
import os
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcomp.quant import int8_kernels, kernels

__all__ = ["ROUTES", "RouteChoice", "run", "applies", "route_report", "tune_", "clear_routes_", "save_route_cache",
           "load_route_cache", "machine_signature"]

# time source of the measurement (tests inject a fake clock to make a route lose)
_clock: Callable[[], float] = time.perf_counter
REPEATS = 3
BUDGET_S = 0.05
MAX_ROUNDS = 30


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without sysconf
        return 16 << 30


# Dense copies (the ``dense*`` routes) are kept only while all of them together stay within this many
# bytes (a quarter of the machine's memory), so a model quantized to fit in memory is not undone by
# its kernel choice; past it those routes are not candidates.
DENSE_BUDGET_BYTES = _physical_memory() // 4
_dense_bytes = [0]


@dataclass(frozen=True)
class Route:
    """One way to compute a layer: its name, result class (None: the reference) and the layer kinds it serves."""

    name: str
    result_class: Optional[str]
    kinds: Tuple[str, ...]


ROUTES: Dict[str, Route] = {r.name: r for r in (
    Route("dequantize", None, ("linear", "conv2d")),
    Route("dense", None, ("linear", "conv2d")),
    Route("dense_cl", None, ("conv2d",)),
    Route("dense_im2col", None, ("conv2d",)),
    Route("int8_weight", "bf16", ("linear",)),
    Route("int4_weight", "bf16", ("linear",)),
    Route("int8_dynamic", "int8", ("linear",)),
    Route("int8_onednn", "int8", ("linear", "conv2d")),
    Route("int8_im2col", "int8", ("conv2d",)),
)}


@dataclass
class RouteChoice:
    """What the measurement chose for one layer and input signature.

    Attributes:
        route: the route that runs.
        result_class: ``exact``, ``bf16`` or ``int8``.
        input_shape, dtype: the input it was measured on.
        times_ms: fastest time of each route timed (ms).
        fp32_ms: the plain fp32 computation (dense weight, no activation quantization), for reference.
        rejected: ``{route: why}`` for routes that fit but failed the output check.
        pinned: the user pinned the route (no measurement).
        from_cache: the choice came from the cache (another layer of the same format and shape).
    """

    route: str
    result_class: str
    input_shape: Tuple[int, ...]
    dtype: str
    times_ms: Dict[str, float] = field(default_factory=dict)
    fp32_ms: Optional[float] = None
    rejected: Dict[str, str] = field(default_factory=dict)
    pinned: bool = False
    from_cache: bool = False


_CACHE: Dict[str, Dict[str, Any]] = {}


def machine_signature() -> Dict[str, Any]:
    """The facts a measured choice depends on besides the layer: CPU capability, threads, torch version."""
    return {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(), "torch": torch.__version__}


# --------------------------------------------------------------------------------------------
# the layer's state (kept on the layer, never in its state_dict)


def _state(layer: nn.Module) -> Dict[str, Any]:
    st = layer.__dict__.get("_route_state")
    if st is None:
        st = {"choices": {}, "ops": {}, "fast": {}}
        layer.__dict__["_route_state"] = st
    return st


def clear_routes_(model: nn.Module) -> int:
    """Forget every layer's choices and cached operands (dense copies, prepacked weights); return the layer count."""
    n = 0
    for m in model.modules():
        if "_route_state" in m.__dict__:
            del m.__dict__["_route_state"]
            n += 1
        cache = getattr(m, "_kernel_cache", None)
        if isinstance(cache, dict):
            cache.clear()
    return n


def _ops(layer: nn.Module, name: str, make: Callable[[], Any]) -> Any:
    """Operands cached per layer, rebuilt when the packed codes move (device, or a new tensor)."""
    key = (layer.packed.qweight.data_ptr(), layer.packed.qweight.device)
    ops = _state(layer)["ops"]
    hit = ops.get(name)
    if hit is None or hit[0] != key:
        ops[name] = (key, make())
        hit = ops[name]
    return hit[1]


def _counted(t: torch.Tensor) -> torch.Tensor:
    """Count a dense copy against ``DENSE_BUDGET_BYTES`` until it is freed."""
    n = t.numel() * t.element_size()
    _dense_bytes[0] += n
    weakref.finalize(t, lambda: _dense_bytes.__setitem__(0, _dense_bytes[0] - n))
    return t


def _dense(layer: nn.Module, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    def make():
        w = layer.packed.dequantize(dtype)
        return _counted(w.contiguous(memory_format=torch.channels_last) if channels_last else w)
    return _ops(layer, f"dense/{dtype}/{channels_last}", make)


# --------------------------------------------------------------------------------------------
# the routes


def _active_quantizer(layer: nn.Module) -> Any:
    q = getattr(layer, "input_quantizer", None)
    if q is None or q.calibrating or getattr(q, "track_error", False) or getattr(q, "passthrough", False):
        return None
    return q


def _compute(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if layer.kind == "linear":
        return F.linear(x, w, bias)
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding, mode=layer.padding_mode)
        return F.conv2d(x, w, bias, layer.stride, 0, layer.dilation, layer.groups)
    return F.conv2d(x, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _kernel_bias(layer: nn.Module, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(bias for the kernel, bias to add after it)``: a bias that needs a gradient is added outside the kernel."""
    b = layer.bias
    if b is not None and torch.is_grad_enabled() and b.requires_grad:
        return None, b
    return b, None


def _reference(layer, x, q, dense: bool, channels_last: bool = False):
    xq = q(x) if q is not None else x
    w = _dense(layer, xq.dtype, channels_last) if dense else layer.packed.dequantize(xq.dtype)
    if channels_last:
        y = _compute(layer, xq.contiguous(memory_format=torch.channels_last), w, layer._bias_for(xq))
        return y.contiguous()
    return _compute(layer, xq, w, layer._bias_for(xq))


def _weight_kernel(layer, x, q):
    kind, ops = layer._operands("weight")
    if layer.packed.input_scale is not None:   # the kernel multiplies by the codes of W diag(s)
        x = (x.float() / layer.packed.input_scale.float()).to(x.dtype)
    b_in, b_out = _kernel_bias(layer, x)
    y = kernels.kernel_linear(x, kind, ops, b_in)
    return y if b_out is None else y + b_out.to(y.dtype)


def _int8_dynamic(layer, x, q):
    b_in, b_out = _kernel_bias(layer, x)
    y = kernels.w8a8_linear(x, q.config, layer._operands("w8a8"), b_in)
    return y if b_out is None else y + b_out


def _int8_onednn(layer, x, q):
    b_in, b_out = _kernel_bias(layer, x)
    if layer.kind == "conv2d":
        y = int8_kernels.qconv2d(layer, x, q, _ops(layer, "onednn", lambda: int8_kernels.prepare_conv(layer)), b_in)
        return y if b_out is None else y + b_out.reshape(1, -1, 1, 1)
    y = int8_kernels.qlinear(x, q, _ops(layer, "onednn", lambda: int8_kernels.prepare_linear(layer)), b_in, layer.out_features)
    return y if b_out is None else y + b_out


def _int8_im2col(layer, x, q):
    b_in, b_out = _kernel_bias(layer, x)
    y = int8_kernels.im2col_int8(layer, x, q, _ops(layer, "im2col", lambda: int8_kernels.prepare_im2col(layer)), b_in)
    return y if b_out is None else y + b_out.reshape(1, -1, 1, 1)


def _dense_im2col(layer, x, q):
    xq = q(x) if q is not None else x
    w2 = _ops(layer, f"dense2d/{xq.dtype}",
              lambda: _counted(layer.packed.dequantize(xq.dtype).reshape(layer.packed.shape[0], -1).contiguous()))
    return int8_kernels.im2col_dense(layer, xq, w2, layer._bias_for(xq))


_RUN: Dict[str, Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]] = {
    "dequantize": lambda layer, x, q: _reference(layer, x, q, dense=False),
    "dense": lambda layer, x, q: _reference(layer, x, q, dense=True),
    "dense_cl": lambda layer, x, q: _reference(layer, x, q, dense=True, channels_last=True),
    "dense_im2col": _dense_im2col,
    "int8_weight": _weight_kernel,
    "int4_weight": _weight_kernel,
    "int8_dynamic": _int8_dynamic,
    "int8_onednn": _int8_onednn,
    "int8_im2col": _int8_im2col,
}


def _result_class(layer: nn.Module, x: torch.Tensor, q: Any) -> str:
    if q is not None:
        return "int8" if q.config.bits == 8 else f"int{q.config.bits}"
    if x.dtype == torch.bfloat16 or getattr(layer, "compute_dtype", None) == torch.bfloat16:
        return "bf16"
    return "exact"


def _why_not(name: str, layer: nn.Module, x: torch.Tensor, q: Any, cls: str) -> Optional[str]:
    """Return None if route ``name`` fits the layer, its quantizer and the input, else the reason."""
    route = ROUTES[name]
    if layer.kind not in route.kinds:
        return f"serves {route.kinds}, not {layer.kind}"
    if name in ("dense", "dense_cl", "dense_im2col"):
        if not getattr(layer, "allow_dense", True):
            return "allow_dense is False"
        need = math.prod(layer.packed.shape) * x.element_size()
        held = any(k.startswith("dense") for k in _state(layer)["ops"])
        if not held and _dense_bytes[0] + need > DENSE_BUDGET_BYTES:
            return (f"the dense copies would exceed DENSE_BUDGET_BYTES ({(_dense_bytes[0] + need) / 2**30:.2f} of "
                    f"{DENSE_BUDGET_BYTES / 2**30:.2f} GiB)")
    if name.endswith("im2col") and int8_kernels.im2col_fits(layer):
        return int8_kernels.im2col_fits(layer)
    if route.result_class is None:
        return None
    if route.result_class != cls:
        return f"gives {route.result_class} results, the layer's class is {cls}"
    if name in ("int8_weight", "int4_weight"):
        if x.dtype not in (torch.float32, torch.bfloat16):
            return f"takes fp32/bf16 inputs, got {x.dtype}"
        want = kernels.weight_kernel(layer.packed.config, layer.packed.shape)
        return None if want == name[:4] else f"format {layer.packed.config.name} has no {name[:4]} weight kernel"
    if x.dtype != torch.float32:
        return f"takes fp32 inputs, got {x.dtype}"
    if name == "int8_dynamic":
        if layer.packed.input_scale is not None:
            return "the weight holds an input_scale"
        return None if kernels.w8a8_kernel_fits(layer.packed.config, q.config, layer.packed.shape) else \
            "needs int8 symmetric weights and dynamic symmetric per-token/per-tensor int8 activations"
    if name == "int8_im2col":
        if not hasattr(torch, "_int_mm"):
            return "this PyTorch has no torch._int_mm"
    elif not int8_kernels.onednn_available():
        return "this PyTorch has no oneDNN quantized ops"
    if not int8_kernels.weight_fits(layer.packed):
        return "needs int8 symmetric per-channel/per-tensor weights without input_scale"
    if not int8_kernels.int8_activation_fits(q):
        return "needs per-tensor int8 activations (frozen static, or dynamic per_tensor)"
    if layer.kind == "conv2d" and isinstance(layer.padding, str) and layer.padding != "valid":
        return f"padding={layer.padding!r}"
    return None


def applies(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether the measured routes serve this call (CPU, kernels on, no gradient to the input, no quantizer calibrating)."""
    if not getattr(layer, "use_kernels", True) or not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return False
    if not x.is_floating_point() or (torch.is_grad_enabled() and x.requires_grad):
        return False
    # calibration and error measurement run the reference path (nothing to measure there)
    return getattr(layer, "input_quantizer", None) is None or _active_quantizer(layer) is not None


def _signature(layer: nn.Module, x: torch.Tensor, q: Any, cls: str) -> str:
    p = layer.packed
    rows = x.shape[0] if layer.kind == "conv2d" else math.prod(x.shape[:-1])
    shape = list(x.shape) if layer.kind == "conv2d" else [1 << max(0, int(rows) - 1).bit_length(), x.shape[-1]]
    act = None if q is None else [q.config.label, q.config.symmetric, q.config.dynamic]
    geo = int8_kernels.conv_geometry(layer) if layer.kind == "conv2d" else None
    key = [layer.kind, list(p.shape), getattr(p.config, "name", str(p.config)), p.input_scale is not None, layer.bias is not None,
           geo, act, shape, str(x.dtype), cls, getattr(layer, "allow_dense", True), machine_signature()]
    return json.dumps(key, sort_keys=True, default=str)


def _timed_rounds(fns: Dict[str, Callable[[], Any]]) -> Dict[str, float]:
    """Fastest time (ms) of each function, run in interleaved rounds (order rotated) so load bursts hit all alike.

    At least ``REPEATS`` rounds; cheap layers get more, until ``BUDGET_S`` seconds were spent or
    ``MAX_ROUNDS`` rounds ran (the fastest of many runs is what the layer costs on a quiet core).
    """
    names = list(fns)
    best = {n: math.inf for n in names}
    spent, rounds = 0.0, 0
    while rounds < REPEATS or (spent < BUDGET_S and rounds < MAX_ROUNDS):
        k = rounds % len(names)
        for n in names[k:] + names[:k]:
            t0 = _clock()
            fns[n]()
            dt = _clock() - t0
            best[n] = min(best[n], dt)
            spent += dt
        rounds += 1
    return {n: t * 1e3 for n, t in best.items()}


def _measure(layer: nn.Module, x: torch.Tensor, q: Any, cls: str, names: List[str]) -> RouteChoice:
    ref = _RUN["dequantize"](layer, x, q)
    base = _RUN["dense"](layer, x, None) if q is not None else ref
    ref_norm = float(ref.float().norm())
    act_effect = float((ref.float() - base.float()).norm())
    first: Dict[str, float] = {}
    rejected: Dict[str, str] = {}
    for name in names:
        fn = _RUN[name]
        try:
            t0 = _clock()
            y = fn(layer, x, q)
            first[name] = (_clock() - t0) * 1e3
        except (RuntimeError, ValueError) as exc:   # a kernel that refuses this shape on this build
            rejected[name] = f"failed: {str(exc).splitlines()[0][:120]}"
            continue
        dev = float((y.float() - ref.float()).norm())
        cls_r = ROUTES[name].result_class
        limit = 1e-5 * ref_norm if cls_r is None else (0.1 * act_effect + 1e-5 * ref_norm if cls_r == "int8" else 2e-2 * ref_norm)
        if y.shape != ref.shape or not dev <= limit:
            rejected[name] = f"output differs from the reference by {dev:.3g} (allowed {limit:.3g})"
            del first[name]
    if not first:
        raise RuntimeError("no route could compute this layer")
    # the first runs include one-off work (page faults, oneDNN primitive creation): time again, in rounds
    best_first = min(first.values())
    again: Dict[str, Callable[[], Any]] = {n: (lambda n=n: _RUN[n](layer, x, q)) for n, t in first.items() if t <= 3 * best_first}
    own_fp32 = q is not None or "dense" not in again
    if own_fp32:
        again["(fp32)"] = lambda: _RUN["dense"](layer, x, None)
    timed = _timed_rounds(again)
    fp32 = timed.pop("(fp32)") if own_fp32 else timed["dense"]
    times = {n: timed.get(n, t) for n, t in first.items()}
    route = min(times, key=times.get)
    return RouteChoice(route, cls, tuple(x.shape), str(x.dtype).replace("torch.", ""), times, fp32, rejected)


def run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Compute ``layer(x)`` through its chosen route, measuring the routes on the first call of a new signature."""
    q = _active_quantizer(layer)
    cls = _result_class(layer, x, q)
    st = _state(layer)
    local = (tuple(x.shape), x.dtype, cls, None if q is None else id(q), torch.get_num_threads())
    choice = st["choices"].get(local)
    if choice is None:
        pinned = getattr(layer, "route", None)
        if pinned is not None:
            # pinning a bf16 kernel is asking for bf16 activations; the int8 routes need the layer's int8 quantizer
            asked = "bf16" if pinned in ROUTES and ROUTES[pinned].result_class == "bf16" else cls
            why = "unknown route" if pinned not in ROUTES else _why_not(pinned, layer, x, q, asked)
            if why:
                raise ValueError(f"route {pinned!r} does not fit this layer ({type(layer).__name__} "
                                 f"{layer.packed.config.name}, input {tuple(x.shape)} {x.dtype}): {why}")
            choice = RouteChoice(pinned, cls, tuple(x.shape), str(x.dtype).replace("torch.", ""), pinned=True)
        else:
            key = _signature(layer, x, q, cls)
            hit = _CACHE.get(key)
            names = [n for n in ROUTES if _why_not(n, layer, x, q, cls) is None]
            if hit is not None and hit["route"] in names:
                choice = RouteChoice(**dict(hit, input_shape=tuple(x.shape), from_cache=True))
            else:
                with torch.no_grad():
                    choice = _measure(layer, x, q, cls, names)
                _CACHE[key] = {k: v for k, v in asdict(choice).items() if k not in ("input_shape", "pinned", "from_cache")}
        st["choices"][local] = choice
    if q is None and getattr(layer, "input_quantizer", None) is None:
        st["fast"][(x.shape, x.dtype, x.device, torch.get_num_threads())] = _fast_call(layer, choice.route, x)
    return _RUN[choice.route](layer, x, q)


def _fast_call(layer: nn.Module, route: str, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The chosen route as a closure over its operands, so a small layer pays no per-call bookkeeping.

    The layer forgets it whenever its weight moves or is overwritten, or a route knob changes
    (:class:`gradcomp.quant.modules._QuantizedLayer`).
    """
    if route == "dense":
        w, b = _dense(layer, x.dtype), layer._bias_for(x)
        if layer.kind == "linear":
            return lambda x: F.linear(x, w, b)
        if layer.padding_mode == "zeros":
            stride, padding, dilation, groups = layer.stride, layer.padding, layer.dilation, layer.groups
            return lambda x: F.conv2d(x, w, b, stride, padding, dilation, groups)
    run_route = _RUN[route]
    return lambda x: run_route(layer, x, None)


# --------------------------------------------------------------------------------------------
# reports, tuning and the disk cache


def route_report(model: nn.Module) -> List[Dict[str, Any]]:
    """Return one row per quantized layer and input shape seen: the route chosen and what each route measured.

    Columns: ``layer``, ``kind``, ``weight`` (format), ``activations`` (the input quantizer, or
    ``"-"``), ``input``, ``class``, ``route``, ``ms`` (the chosen route), ``fp32_ms``,
    ``speedup_vs_fp32``, ``times_ms`` (every route timed), ``rejected`` and ``source`` (``measured``,
    ``cache`` or ``pinned``).
    """
    rows = []
    for name, m in model.named_modules():
        st = m.__dict__.get("_route_state")
        if not st:
            continue
        q = getattr(m, "input_quantizer", None)
        for choice in st["choices"].values():
            ms = choice.times_ms.get(choice.route)
            rows.append({
                "layer": name, "kind": m.kind, "weight": m.packed.config.name,
                "activations": "-" if q is None else q.config.label, "input": "x".join(map(str, choice.input_shape)),
                "class": choice.result_class, "route": choice.route, "ms": ms, "fp32_ms": choice.fp32_ms,
                "speedup_vs_fp32": (choice.fp32_ms / ms) if ms and choice.fp32_ms else None,
                "times_ms": dict(choice.times_ms), "rejected": dict(choice.rejected),
                "source": "pinned" if choice.pinned else ("cache" if choice.from_cache else "measured"),
            })
    return rows


def tune_(model: nn.Module, batch: Any, *, forward: Optional[Callable[[nn.Module, Any], Any]] = None,
          remeasure: bool = False) -> List[Dict[str, Any]]:
    """Measure every quantized layer's routes on ``batch`` now (one forward without gradient); return the report.

    Args:
        model: a quantized model.
        batch: a real input (the shapes decide the kernels).
        forward: ``forward(model, batch)`` (default ``model(batch)``, ``model(*batch)`` for tuples, ``model(**batch)`` for dicts).
        remeasure: forget earlier choices and the process cache first.
    """
    from gradcomp.batches import call_model

    if remeasure:
        clear_routes_(model)
        _CACHE.clear()
    with torch.no_grad():
        if forward is None:
            call_model(model, batch)
        else:
            forward(model, batch)
    return route_report(model)


def save_route_cache(path: Union[str, os.PathLike]) -> int:
    """Write the process-wide route cache to a JSON file; return the number of entries."""
    Path(path).write_text(json.dumps(_CACHE, indent=1, sort_keys=True))
    return len(_CACHE)


def load_route_cache(path: Union[str, os.PathLike]) -> int:
    """Add the entries of a :func:`save_route_cache` file to the process cache; return how many were read.

    Entries carry the CPU capability, thread count and torch version they were measured with, so an
    entry from another machine or thread count is simply never matched.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(isinstance(v, dict) and v.get("route") in ROUTES for v in data.values()):
        raise ValueError(f"{path} is not a route cache written by save_route_cache (expected {{key: {{'route': ...}}}})")
    fields = set(RouteChoice.__dataclass_fields__)
    for key, v in data.items():
        _CACHE[key] = {k: v[k] for k in v if k in fields and k not in ("input_shape", "pinned", "from_cache")}
    return len(data)
