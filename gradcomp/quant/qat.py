"""Quantization-aware fine-tuning of weights: fake quantization with learned scales, exported as packed layers.

:func:`prepare_qat_` puts a trainable fake quantizer on the weight of every selected Linear and
Conv2d (a :mod:`torch.nn.utils.parametrize` parametrization, so ``layer.weight`` is the
fake-quantized weight and the optimizer sees the float weight and the scales as parameters). It
works on top of any plan: plain layers get the config of ``config_or_rules`` (one config, rules, or
``plan.to_rules()`` of a mixed-precision plan) and start from round-to-nearest; layers already
quantized by :func:`gradcomp.quant.quantize_` with any method (GPTQ, AWQ, HQQ, AutoRound) start from
their packed codes and scales. Train as usual; :func:`convert_qat_` then packs the learned codes and
scales into the ordinary quantized layers, which :func:`gradcomp.quant.save_quantized` writes.

The fake quantizer is LSQ (Esser et al., "Learned Step Size Quantization", 2019), on the layout of
:mod:`gradcomp.quant.layout` (one scale per tensor, row or group):

1. ``s`` = the block's scale, with LSQ's gradient scale ``g = 1 / sqrt(block * qmax)`` and rounded to
   its storage dtype (fp16 by default) in the forward with a straight-through gradient, so training
   sees exactly the scale the file will hold;
2. ``q = clamp(round(w / s) [+ zp], qmin, qmax)`` with a straight-through gradient for the rounding
   (zero gradient to ``w`` where the clamp cuts, as ``torch.fake_quantize_per_channel_affine``);
   asymmetric zero points stay those of the start;
3. ``w_hat = (q - offset) s``: the gradient reaches ``s`` through both the rounding residual and the
   clamped values (LSQ's step-size gradient).

Worked example (int4 symmetric, one block ``[0.30, -0.70]``): RTN's scale ``0.7 / 7 = 0.1`` gives
codes ``[3, -7]``; if the loss pushes ``w_hat_0`` up, ``ds`` is ``(q - w / s) = 3 - 3.0 = 0`` from the
first weight and ``-7`` from the clamped-free second, and ``s`` moves so both reconstructions follow.

:func:`convert_qat_` makes the codes with the stored scale exactly as step 2 does, so the exported
model computes what the fine-tuned model computed (the tests check the outputs are equal).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from gradcomp.codec import choose_qparams, qrange, quantize_codes_with_qparams
from gradcomp.quant.configs import SCALE_DTYPES, Rules, WeightQuantConfig
from gradcomp.quant.layout import _layout, _store_scale
from gradcomp.quant.modules import PackedWeight, QuantizedConv2d, QuantizedLinear, _set_submodule, _swap
from gradcomp.quant.rules import _config_rules, first_match

__all__ = ["LearnedWeightQuant", "prepare_qat_", "convert_qat_", "qat_layers"]


def _blocks(w: torch.Tensor, lay) -> torch.Tensor:
    x = w.reshape(lay.rows, lay.row_len)
    if lay.padded:
        x = F.pad(x, (0, lay.groups * lay.block - lay.row_len))
    return x.reshape(lay.rows * lay.groups, lay.block)


class LearnedWeightQuant(nn.Module):
    """The parametrization: fake-quantize a weight with learned per-block scales (see the module docstring).

    Args:
        config: the integer format (any bits, granularity, symmetry, scale dtype).
        shape: the weight's shape.
        scale: initial stored scales ``(rows * groups,)``.
        zero_point: integral zero points ``(rows * groups,)`` (asymmetric), or None.
    """

    def __init__(self, config: WeightQuantConfig, shape, scale: torch.Tensor, zero_point: Optional[torch.Tensor]):
        super().__init__()
        if not isinstance(config, WeightQuantConfig):
            raise TypeError(f"QAT learns integer formats; config must be a WeightQuantConfig, got {type(config).__name__}")
        self.config = config
        self.layout = _layout(shape, config)
        self.scale = nn.Parameter(scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero_point", None if zero_point is None else zero_point.detach().float().reshape(-1).clone())
        _, qmax, _ = qrange(config.bits, config.symmetric)
        self.grad_factor = 1.0 / math.sqrt(self.layout.block * max(qmax, 1))

    def stored_scale(self) -> torch.Tensor:
        """The scales as the file will hold them (rounded up to ``scale_dtype``; a tiny floor keeps them positive)."""
        s = self.scale.detach().abs().clamp_min(1e-12)
        return _store_scale(s, self.config.scale_dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Return the fake-quantized weight (same shape and dtype), differentiable in ``w`` and the scales."""
        cfg, lay = self.config, self.layout
        g = self.grad_factor
        s = self.scale * g + (self.scale - self.scale * g).detach()          # LSQ gradient scale
        s = s + (self.stored_scale().float() - s).detach()                   # the stored value, straight-through
        qmin, qmax, off = qrange(cfg.bits, cfg.symmetric)
        v = _blocks(w.float(), lay) / s[:, None]
        v = v + (torch.round(v) - v).detach()
        if self.zero_point is not None:
            q = torch.clamp(v + self.zero_point[:, None], qmin, qmax) - self.zero_point[:, None]
        else:
            q = torch.clamp(v, qmin, qmax)
        out = (q * s[:, None]).reshape(lay.rows, lay.groups * lay.block)[:, : lay.row_len]
        return out.reshape(lay.shape).to(w.dtype)

    @torch.no_grad()
    def pack(self, w: torch.Tensor) -> PackedWeight:
        """Pack ``w`` with the learned scales: the codes of :meth:`forward`, in the stored format."""
        cfg, lay = self.config, self.layout
        s = self.stored_scale()
        codes = quantize_codes_with_qparams(_blocks(w.detach().float(), lay), s, self.zero_point, cfg.bits)
        codes = codes.reshape(lay.rows, lay.groups * lay.block)[:, : lay.row_len].contiguous()
        return PackedWeight.from_codes(codes, s, self.zero_point, cfg, lay.shape, w.dtype)

    def extra_repr(self) -> str:
        return f"{self.config.name}, scales={self.scale.numel()}"


def _start(module: nn.Module, config: WeightQuantConfig):
    """``(float module, weight, initial scale, zero point)``: from the packed codes of a quantized layer, else RTN."""
    if isinstance(module, (QuantizedLinear, QuantizedConv2d)):
        p = module.packed
        if p.input_scale is not None:
            raise ValueError("a weight with an AWQ input_scale cannot be fine-tuned with per-block scales alone")
        w = p.dequantize(torch.float32)
        zp = p._zero_points()
        if isinstance(module, QuantizedLinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=w.device)
        else:
            plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                              module.dilation, module.groups, module.bias is not None, module.padding_mode, device=w.device)
        with torch.no_grad():
            plain.weight.copy_(w)
            if module.bias is not None:
                plain.bias.copy_(module.bias)
        for name in ("input_quantizer",):   # an activation quantizer stays with the layer (and its pre-hook)
            if hasattr(module, name):
                plain.add_module(name, getattr(module, name))
                plain._forward_pre_hooks.update(module._forward_pre_hooks)
        return plain, w, p.scale.float().reshape(-1), None if zp is None else zp.float().reshape(-1)
    lay = _layout(module.weight.shape, config)
    xb = _blocks(module.weight.detach().float(), lay)
    scale, zp = choose_qparams(xb.amin(1), xb.amax(1), config.bits, config.symmetric)
    return module, module.weight, _store_scale(scale, config.scale_dtype).float(), zp


def prepare_qat_(model: nn.Module, config_or_rules: Optional[Rules] = None, *,
                 filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> List[str]:
    """Put a learned-scale fake quantizer on the weight of every selected Linear and Conv2d (in place).

    Args:
        model: the model, with plain and/or already quantized layers.
        config_or_rules: config or rules (as :func:`gradcomp.quant.quantize_`) for the plain layers;
            None: only the already quantized layers, each with its own config.
        filter_fn: ``(module, fqn) -> bool``; False leaves a layer alone.

    Returns:
        The names of the layers now fine-tuned (the float weight and ``scale`` of each are trainable).

    Raises:
        ValueError: a selected weight has a cast config or an AWQ input scale, or nothing is selected
            (the model is unchanged).
    """
    rules = _config_rules(config_or_rules) if config_or_rules is not None else []
    todo = []
    for fqn, m in model.named_modules():
        if not fqn or parametrize.is_parametrized(m):
            continue
        if isinstance(m, (QuantizedLinear, QuantizedConv2d)):
            cfg = m.packed.config
        elif type(m) in (nn.Linear, nn.Conv2d):
            hit = first_match(rules, fqn) if rules else None
            cfg = None if hit is None else hit[1]
        else:
            continue
        if cfg is None or (filter_fn is not None and not filter_fn(m, fqn)):
            continue
        if not isinstance(cfg, WeightQuantConfig):
            raise ValueError(f"layer {fqn!r}: QAT learns integer formats, got {cfg!r}")
        todo.append((fqn, m, cfg))
    if not todo:
        raise ValueError("no Linear or Conv2d layer was selected for quantization-aware fine-tuning")
    starts = [(fqn, cfg) + _start(m, cfg) for fqn, m, cfg in todo]   # every check before any change
    for fqn, cfg, plain, w, scale, zp in starts:
        if plain is not model.get_submodule(fqn):
            _set_submodule(model, fqn, plain)
        parametrize.register_parametrization(plain, "weight", LearnedWeightQuant(cfg, w.shape, scale, zp))
    return [fqn for fqn, *_ in starts]


def qat_layers(model: nn.Module) -> Dict[str, LearnedWeightQuant]:
    """Return ``{layer name: its LearnedWeightQuant}`` for every layer under quantization-aware fine-tuning."""
    out = {}
    for fqn, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, LearnedWeightQuant):
                    out[fqn] = p
    return out


def convert_qat_(model: nn.Module) -> List[str]:
    """Pack every fine-tuned weight with its learned scales into the ordinary quantized layers (in place).

    Returns:
        The names of the layers converted; the model then holds :class:`QuantizedLinear` /
        :class:`QuantizedConv2d` layers that :func:`gradcomp.quant.save_quantized` writes.
    """
    layers = qat_layers(model)
    if not layers:
        raise ValueError("the model has no layer under quantization-aware fine-tuning; call prepare_qat_ first")
    new = {}
    for fqn, fq in layers.items():
        m = model.get_submodule(fqn)
        packed = fq.pack(m.parametrizations.weight.original)
        hooks = dict(m._forward_pre_hooks)
        quantizer = getattr(m, "input_quantizer", None)
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        q = _swap(m, packed, fqn)
        if quantizer is not None:
            q.add_module("input_quantizer", quantizer)
            q._forward_pre_hooks.update(hooks)
        new[fqn] = q
    for fqn, q in new.items():
        _set_submodule(model, fqn, q)
    return list(new)
