"""Packed weights, the quantized layers built on them, and :func:`quantize_`.

:func:`quantize_` swaps ``nn.Linear``, ``nn.Embedding`` and ``nn.Conv2d`` for modules that hold the
packed codes and scales and dequantize on the fly in ``forward``. Layers are selected by rules
(:mod:`gradcomp.quant.rules`; ``None`` keeps a layer in full precision) and a filter function.

Worked example (int4, group 128, symmetric, fp16 scales): a ``4096 x 4096`` weight holds
``4096 * 4096 / 2 = 8 MiB`` of packed codes and ``4096 * 32`` fp16 scales (256 KiB), i.e.
``4 + 16 / 128 = 4.125`` bits per weight; asymmetric adds a 4-bit zero point per group,
``4.125 + 4 / 128 = 4.15625`` bits. Asymmetric zero points are integers in ``[0, 2**bits - 1]``
and are held packed at ``bits`` bits like the codes.

Example::

    >>> model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> quantize_(model, [("0", WeightQuantConfig(bits=4, granularity="per_group", group_size=128)),
    ...                   ("*", WeightQuantConfig(bits=8))])
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcomp.batches import progress_bar
from gradcomp.quant import routes
from gradcomp.quant.algorithms.conv import quantize_module_weight, uncovered_reason
from gradcomp.quant.configs import CastConfig, Config, Rules, config_name
from gradcomp.quant.packed import PackedWeight
from gradcomp.quant.rules import _config_rules, first_match

logger = logging.getLogger(__name__)

__all__ = [
    "PackedWeight",
    "QuantizedLinear",
    "QuantizedEmbedding",
    "QuantizedConv2d",
    "quantize_",
    "quantizable_layers",
]


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

    # Measured routes keep operands (dense copies, prepacked weights) and choices on the layer: anything
    # that moves or overwrites the packed weight, or changes how the layer may compute, forgets them.
    _ROUTE_KNOBS = frozenset(("use_kernels", "compute_dtype", "route", "allow_dense"))

    def _forget_routes(self) -> None:
        self.__dict__.pop("_route_state", None)
        cache = self.__dict__.get("_kernel_cache")
        if cache:
            cache.clear()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._ROUTE_KNOBS:
            self._forget_routes()
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._forget_routes()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self._forget_routes()
        super()._load_from_state_dict(*args, **kwargs)

    def _fast(self, x: torch.Tensor) -> Any:
        """The chosen route of a layer without input quantizer for this input, if measured already (else None)."""
        st = self.__dict__.get("_route_state")
        if st is None or "input_quantizer" in self._modules or (x.requires_grad and torch.is_grad_enabled()):
            return None
        return st["fast"].get((x.shape, x.dtype, x.device, torch.get_num_threads()))


class QuantizedLinear(_QuantizedLayer):
    """``nn.Linear`` with a packed weight.

    Without a gradient to the input, on CPU, the forward runs the route that the measurement of
    :mod:`gradcomp.quant.routes` found fastest for this input shape on this machine, among those
    that give the layer's result class, all from the same stored codes: the dequantized weight (at
    every call, or kept), a weight-only CPU kernel (int8 per channel, int4 per group; only when the
    input is bf16 or ``compute_dtype`` is ``torch.bfloat16``), or, with an 8-bit input quantizer,
    ``torch._int_mm`` (dynamic per-token) or oneDNN's int8 linear (per-tensor). With a gradient the
    weight is dequantized to ``x.dtype`` and ``F.linear`` runs (exact, differentiable).

    A weight with an ``input_scale`` ``s`` (activation-aware scaling) holds the codes of ``W diag(s)``:
    route 2 divides the input by ``s`` (in fp32) before the kernel, route 3 folds ``1/s`` into the
    dequantized weight, and route 1 is not taken (it would quantize ``x / s`` where the fake-quant
    path quantizes ``x``).

    Attributes:
        compute_dtype: None (compute in the input's dtype) or ``torch.bfloat16`` (the bf16 kernels may
            run for fp32 inputs too, at bf16 precision of the activations).
        use_kernels: False forces the dequantize route.
        allow_dense: keep a dequantized copy of the weight when that is the fastest route (memory:
            the dense weight); False measures only routes that keep the packed weight alone.
        route: None (measured) or a route name of :data:`gradcomp.quant.routes.ROUTES` to pin.
    """

    kind = "linear"

    def __init__(self, packed: PackedWeight, bias: Optional[torch.Tensor]) -> None:
        super().__init__(packed, bias)
        if len(packed.shape) != 2:
            raise ValueError(f"a linear weight must be 2-D, got shape {packed.shape}")
        self.out_features, self.in_features = packed.shape
        self.compute_dtype: Optional[torch.dtype] = None
        self.use_kernels = True
        self.allow_dense = True
        self.route: Optional[str] = None
        self._kernel_cache: Dict[str, Any] = {}

    def _operands(self, what: str):
        from gradcomp.quant import kernels

        key = (what, self.packed.qweight.data_ptr(), self.packed.qweight.device)
        hit = self._kernel_cache.get(what)
        if hit is None or hit[0] != key:
            if what == "w8a8":
                ops = kernels.w8a8_operands(self._operands("weight")[1])
            else:
                ops = kernels.prepare_operands(self.packed)
            self._kernel_cache[what] = (key, ops)
            hit = self._kernel_cache[what]
        return hit[1]

    def fuses_input_quant(self, quantizer: Any, x: torch.Tensor) -> bool:
        """Whether this forward quantizes ``x`` itself (a measured route): the pre-hook then leaves ``x`` alone."""
        return _route_handles(self, quantizer, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x @ W^T + b`` through the route measured fastest for this input (see :mod:`gradcomp.quant.routes`)."""
        fast = self._fast(x)
        if fast is not None:
            return fast(x)
        if routes.applies(self, x):
            return routes.run(self, x)
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
    """``nn.Conv2d`` with a packed weight (rows = output channels, flattened ``in/groups*kh*kw``).

    Without a gradient to the input, on CPU, the forward runs the route measured fastest for the
    input shape (:mod:`gradcomp.quant.routes`): the dequantized weight (at every call, or kept, in
    NCHW or channels-last layout) or, with an 8-bit per-tensor input quantizer and int8 symmetric
    weights, oneDNN's int8 convolution with prepacked weights. Attributes ``use_kernels``,
    ``allow_dense`` and ``route`` as for :class:`QuantizedLinear`.
    """

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
        self.use_kernels = True
        self.allow_dense = True
        self.route: Optional[str] = None

    def fuses_input_quant(self, quantizer: Any, x: torch.Tensor) -> bool:
        """Whether this forward quantizes ``x`` itself (a measured route): the pre-hook then leaves ``x`` alone."""
        return _route_handles(self, quantizer, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the convolution of ``x`` with the packed weight (see the class docstring for the route)."""
        fast = self._fast(x)
        if fast is not None:
            return fast(x)
        if routes.applies(self, x):
            return routes.run(self, x)
        w = self.packed.dequantize(x.dtype)
        if self.padding_mode != "zeros":
            # Same as nn.Conv2d: explicit padding of the requested mode, then a convolution without padding.
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            return F.conv2d(x, w, self._bias_for(x), self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self._bias_for(x), self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")


def _route_handles(layer: _QuantizedLayer, quantizer: Any, x: torch.Tensor) -> bool:
    """Whether the measured routes take ``x`` raw and apply the (frozen or dynamic) input quantizer themselves."""
    if getattr(quantizer, "calibrating", True) or getattr(quantizer, "track_error", False) or getattr(quantizer, "passthrough", False):
        return False
    return routes.applies(layer, x)


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


def _check_weight(fqn: str, w: torch.Tensor) -> None:
    """Refuse a weight that is not floating point or holds inf or nan (a meta weight has no values to check)."""
    if not w.is_floating_point():
        raise TypeError(f"layer {fqn!r}: weight must be floating point, got {w.dtype}")
    if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
        raise ValueError(f"layer {fqn!r}: the weight holds inf or nan values; refusing to quantize it")


def _whole_model(model, plan, algorithm, calibration, *, forward, num_batches, progress) -> Dict[str, PackedWeight]:
    """Run a method that trains every integer-coded layer of ``plan`` at once (AutoRound); return ``{fqn: PackedWeight}``."""
    from gradcomp.quant.algorithms import autoround_quantize, collect_input_hessians

    batches = list(calibration)[: num_batches if num_batches is not None else None]
    if not batches:
        raise ValueError(f"method {algorithm.name!r} needs at least one calibration batch, got none")
    groups: Dict[Tuple[int, Config], List[Tuple[str, nn.Module]]] = {}
    for fqn, m, cfg in plan:
        if isinstance(cfg, CastConfig):
            continue
        _check_weight(fqn, m.weight)
        groups.setdefault((id(m.weight), cfg), []).append((fqn, m))
    layers = [(mods, key[1]) for key, mods in groups.items()]
    hessians = None
    if algorithm.init == "awq_clip":
        linear = {mods[0][0]: mods[0][1] for mods, _ in layers if isinstance(mods[0][1], nn.Linear)}
        train = batches[: len(batches) - algorithm.holdout] if len(batches) > algorithm.holdout else batches
        hessians = collect_input_hessians(model, linear, train, forward=forward, progress=progress) if linear else {}
    try:
        res = autoround_quantize(model, layers, batches, algorithm, forward=forward, hessians=hessians, progress=progress)
    except ValueError as exc:
        raise ValueError(f"method {algorithm.name!r}: {exc}") from exc
    logger.info("%s: %d weights; selection loss %.4g -> %.4g (step %d of %d kept)", algorithm.name, len(layers),
                res.history[0][1], min(h[1] for h in res.history), res.best_step, algorithm.steps)
    return res.packed


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
    rules = _config_rules(config_or_rules)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, fqn) -> bool, got {type(filter_fn).__name__}")
    used = set()
    plan = []
    for fqn, m in quantizable_layers(model):
        if fqn == "":
            raise ValueError("the model itself is a single layer; wrap it in a container (nn.Sequential) to quantize it in place")
        hit = first_match(rules, fqn)
        if hit is not None:
            used.add(hit[0])
        cfg = None if hit is None else hit[1]
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


def quantize_(
    model: nn.Module,
    config_or_rules: Rules,
    *,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    method: Any = None,
    calibration: Optional[Iterable[Any]] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    num_batches: Optional[int] = None,
    progress: bool = False,
    sequential: Any = False,
    strict: bool = False,
) -> nn.Module:
    """Swap the model's Linear, Embedding and Conv2d layers for packed quantized ones, in place.

    Steps:
        1. List the supported layers by fully qualified name; pick each one's config: the single
           config, or the first rule whose pattern matches (a None config or no match leaves the layer
           as it is); drop layers for which ``filter_fn(module, fqn)`` is False.
        2. With a data-aware ``method``: run the calibration batches once through the unquantized
           model and sum each selected Linear's input Hessian ``X^T X`` (a Conv2d's per group, over
           its unfolded input patches, :mod:`gradcomp.quant.algorithms.conv`). With ``sequential``, the
           Linear layers are taken in execution order, in stages: the Hessians of a stage are
           collected with every earlier stage already quantized (GPTQ's sequential mode), so each
           layer compensates the error its quantized inputs carry; one calibration pass per stage.
        3. Quantize every selected weight (round-to-nearest, or the method on the Linear layers) and
           pack it (nothing is changed yet, so a bad weight or config leaves the model untouched).
           Layers sharing one weight with the same config share one :class:`PackedWeight`.
        4. Replace the layers.

    Args:
        model: the model (any device; the packed buffers live where the weights were).
        config_or_rules: one config for every supported layer, or an ordered list (or dict) of
            ``(pattern, config or None)``.
        filter_fn: optional ``(module, fqn) -> bool``; False keeps that layer in full precision.
        method: ``None``/``"rtn"`` (round-to-nearest), ``"gptq"``, ``"awq_clip"``, ``"hqq"``, ``"autoround"``,
            or a configured :class:`gradcomp.quant.algorithms.GPTQ` /
            :class:`~gradcomp.quant.algorithms.ActivationAwareClip` / :class:`~gradcomp.quant.algorithms.HQQ`
            (data-free: calibration optional; it also fits Embedding tables and Conv2d weights) /
            :class:`~gradcomp.quant.algorithms.AutoRound` (trained against the model's outputs:
            ``forward`` must return them differentiably; it covers Embedding and Conv2d layers too).
            GPTQ and awq_clip cover Linear and Conv2d (through the unfolded input, groups included),
            awq_scale Linear only. Same packed modules and files whichever method; a layer a method
            does not cover gets round-to-nearest with a warning naming it (see ``strict``); cast
            configs always do.
        calibration: batches for the data-aware methods (required by them).
        forward: ``forward(model, batch)`` for the calibration batches (default ``model(batch)``,
            ``model(*batch)`` for tuples, ``model(**batch)`` for dicts).
        num_batches: use at most this many calibration batches.
        progress: tqdm progress bars over the calibration batches and the layers.
        sequential: False (Hessians from the unquantized model), True (one stage per Linear layer)
            or the number of stages (one calibration pass each).
        strict: raise ValueError (before anything changes) when the method does not cover a selected
            layer, instead of warning and rounding it to nearest.

    Returns:
        ``model`` itself.

    Example:
        >>> quantize_(model, [("lm_head", None), ("re:blocks\\.\\d+\\.attn\\..*", WeightQuantConfig(bits=8)),
        ...                   ("*", WeightQuantConfig(bits=4, granularity="per_group", group_size=64))])
    """
    from gradcomp.quant.algorithms import resolve_method

    plan = _plan(model, config_or_rules, filter_fn)
    algorithm = resolve_method(method)
    if isinstance(sequential, bool):
        stages = 0 if not sequential else -1
    elif isinstance(sequential, int) and sequential >= 1:
        stages = sequential
    else:
        raise ValueError(f"sequential must be a bool or a positive int (number of stages), got {sequential!r}")
    hessians: Dict[str, torch.Tensor] = {}
    done: Dict[str, PackedWeight] = {}
    data_free = algorithm is not None and not getattr(algorithm, "needs_data", True)
    if algorithm is not None and calibration is None and not data_free:
        raise ValueError(f"method {algorithm.name!r} needs calibration batches (calibration=...); use method='rtn' without data")
    if stages and (algorithm is None or calibration is None):
        raise ValueError("sequential=... needs a data-aware method and calibration batches")
    uncovered: Dict[str, str] = {}
    if algorithm is not None:
        for fqn, m, cfg in plan:
            why = uncovered_reason(algorithm, m, cfg, calibration is not None)
            if why is not None:
                uncovered[fqn] = why
        if uncovered:
            listed = "; ".join(f"{n!r} ({why})" for n, why in sorted(uncovered.items()))
            if strict:
                raise ValueError(f"method {algorithm.name!r} does not cover {len(uncovered)} layers (strict=True): {listed}")
            logger.warning("method %r does not cover %d layers, which get round-to-nearest: %s", algorithm.name, len(uncovered), listed)
    if getattr(algorithm, "whole_model", False):
        if stages:
            raise ValueError(f"method {algorithm.name!r} trains every layer at once against the model's outputs; "
                             "it takes no sequential=... stages")
        done = _whole_model(model, plan, algorithm, calibration, forward=forward, num_batches=num_batches, progress=progress)
    elif algorithm is not None and calibration is not None:
        from gradcomp.quant.algorithms import collect_input_hessians

        aware = {fqn: m for fqn, m, cfg in plan if isinstance(m, (nn.Linear, nn.Conv2d)) and fqn not in uncovered
                 and not isinstance(cfg, CastConfig) and not (isinstance(m, nn.Conv2d) and data_free)}
        if aware and not stages:
            hessians = collect_input_hessians(model, aware, calibration, forward=forward, num_batches=num_batches, progress=progress)
        elif aware:
            from gradcomp.quant.algorithms.sequential import sequential_quantize

            done = sequential_quantize(model, plan, aware, algorithm, calibration, stages, forward=forward,
                               num_batches=num_batches, progress=progress, swap=_swap, set_submodule=_set_submodule)
    shared: Dict[Tuple[int, Config], PackedWeight] = {}
    new: Dict[str, _QuantizedLayer] = {}
    configs_of_weight: Dict[int, set] = {}
    steps = progress_bar(plan, progress and algorithm is not None, f"quantize ({'rtn' if algorithm is None else algorithm.name})",
                         total=len(plan), unit="layer")
    for fqn, m, cfg in steps:
        w = m.weight
        _check_weight(fqn, w)
        key = (id(w), cfg)
        packed = shared.get(key)
        if packed is None:
            try:
                if fqn in done:
                    packed = done[fqn]
                elif fqn in hessians or (data_free and fqn not in uncovered and not isinstance(cfg, CastConfig)):
                    r = quantize_module_weight(algorithm, m, hessians.get(fqn), cfg)
                    packed = PackedWeight.from_codes(r.codes, r.scale, r.zero_point, cfg, w.shape, w.dtype, r.input_scale)
                else:
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
    logger.info("quantized %d layers (%s): %s", len(new), "rtn" if algorithm is None else algorithm.name,
                sorted({config_name(c) for _, _, c in plan}))
    return model


# --------------------------------------------------------------------------------------------
