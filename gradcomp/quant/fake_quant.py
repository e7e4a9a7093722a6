"""Fake quantization: quantize and dequantize again, for weights and for activations.

:func:`fake_quantize_weight` gives what a packed layer computes with; :func:`fake_quantize_with_qparams`
applies given scales (per tensor, per channel or per token); :func:`fake_quantize_ste` adds a
clipped straight-through gradient for quantization-aware training. All the arithmetic is the
codec's (:func:`gradcomp.codec.quantize_codes_with_qparams` then :func:`gradcomp.codec.dequantize_codes`).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from gradcomp.checks import check_bits
from gradcomp.codec import dequantize_codes, qrange, quantize_codes_with_qparams
from gradcomp.quant._util import norm_axis
from gradcomp.quant.configs import CAST_DTYPES, CastConfig, Config, _check_config
from gradcomp.quant.layout import _dequantize_rows, _quantize_weight

__all__ = ["fake_quantize_weight", "fake_quantize_with_qparams", "fake_quantize_ste"]


def fake_quantize_weight(weight: torch.Tensor, config: Optional[Config]) -> torch.Tensor:
    """Quantize and dequantize a weight (same shape and dtype) as :func:`quantize_` would store it.

    Args:
        weight: floating tensor (``(out, in)``, ``(num, dim)`` or ``(out, in/g, kh, kw)``; 1-D tensors
            are one row).
        config: a :class:`WeightQuantConfig`, a :class:`CastConfig`, or None (returns a copy).

    Returns:
        The reconstruction that a quantized layer uses in its forward, bit for bit.

    Example: ``w = [[0.5, -1.0, 0.25, 0.0]]`` with ``WeightQuantConfig(bits=4, scale_dtype="fp32")``:
    scale ``1/7``, codes ``[4, -7, 2, 0]`` -> ``[0.571, -1.0, 0.286, 0.0]``.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating torch.Tensor, got {type(weight).__name__} {getattr(weight, 'dtype', '')}")
    if config is None:
        return weight.detach().clone()
    _check_config(config)
    if isinstance(config, CastConfig):
        return weight.detach().to(CAST_DTYPES[config.dtype]).to(weight.dtype)
    codes, scale, zp, lay = _quantize_weight(weight, config)
    return _dequantize_rows(codes, scale, zp, lay, config.bits).reshape(weight.shape).to(weight.dtype)


def _as_blocks(x: torch.Tensor, scale: torch.Tensor, axis: Optional[int]) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """View ``x`` as codec blocks matching ``scale``; return blocks and the inverse reshape."""
    if axis is not None:
        ax = norm_axis(axis, x.dim())
        if scale.numel() != x.shape[ax]:
            raise ValueError(f"per-channel scale needs {x.shape[ax]} entries for axis {axis}, got {scale.numel()}")
        moved = x.movedim(ax, 0)
        shape = moved.shape
        return moved.reshape(shape[0], -1), lambda y: y.reshape(shape).movedim(0, ax)
    if scale.numel() == 1:
        return x.reshape(1, -1), lambda y: y.reshape(x.shape)
    if tuple(scale.shape) == tuple(x.shape[:-1]) + (1,):  # per token
        return x.reshape(-1, x.shape[-1]), lambda y: y.reshape(x.shape)
    raise ValueError(
        f"scale must have 1 entry, x.shape[:-1] + (1,) = {tuple(x.shape[:-1]) + (1,)} entries (per token), or be "
        f"per channel with an axis; got shape {tuple(scale.shape)} for x of shape {tuple(x.shape)}"
    )


def fake_quantize_with_qparams(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bits: int,
    axis: Optional[int] = None,
) -> torch.Tensor:
    """Quantize ``x`` with given scales and dequantize it again, through the codec.

    Per tensor (one scale), per channel (``axis`` given, one scale per entry along it) or per token
    (scale of shape ``x.shape[:-1] + (1,)``). The codes are those of
    :func:`gradcomp.codec.quantize_codes_with_qparams`, mapped back by
    :func:`gradcomp.codec.dequantize_codes`, so with the scale the codec would pick itself the result
    equals ``gradcomp.codec.fake_quantize(x, bits, block_size=x.numel(), symmetric=...)`` bit for bit.

    Example: ``x = [0.5, -1.0, 0.25]``, ``scale = 1/7``, no zero point, 4 bits ->
    ``round([3.5, -7, 1.75]) = [4, -7, 2]`` -> ``[0.5714, -1.0, 0.2857]``.

    Args:
        x: floating tensor.
        scale: scales (see above).
        zero_point: integral zero points of the shape of ``scale``, or None (symmetric codes).
        bits: code width.
        axis: channel axis for per-channel scales.

    Returns:
        A tensor of ``x``'s shape and dtype.
    """
    check_bits(bits)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    xb, back = _as_blocks(x, scale, axis)
    s = scale.reshape(-1).float()
    zp = None if zero_point is None else zero_point.reshape(-1).float()
    codes = quantize_codes_with_qparams(xb, s, zp, bits)
    return back(dequantize_codes(codes, s, zp, bits)).to(x.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization with a clipped straight-through gradient."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, bits, axis):
        out = fake_quantize_with_qparams(x, scale, zero_point, bits, axis)
        ctx.save_for_backward(_ste_mask(x, scale, zero_point, bits, axis))
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def _ste_mask(
    x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], bits: int, axis: Optional[int]
) -> torch.Tensor:
    """Return where the code ``round(x / s) + zp`` lies inside ``[qmin, qmax]`` (the values the clamp keeps).

    The test is made on the codes, as the forward makes them, not on the float range
    ``[(qmin - zp) s, (qmax - zp) s]``: a row's own min or max can round onto ``qmin``/``qmax`` while
    lying a hair outside that float range (the zero point is rounded), and must keep its gradient.
    """
    qmin, qmax, _ = qrange(bits, zero_point is None)
    s = scale.float()
    z = None if zero_point is None else zero_point.float()
    if axis is not None:
        shape = [1] * x.dim()
        shape[norm_axis(axis, x.dim())] = -1
        s = s.reshape(shape)
        z = None if z is None else z.reshape(shape)
    elif s.numel() == 1:
        s = s.reshape(())
        z = None if z is None else z.reshape(())
    # the codec divides by 1 where a scale is 0 (see quantize_codes_with_qparams)
    code = torch.round(x.detach().float() / torch.where(s == 0, torch.ones_like(s), s))
    if z is not None:
        code = code + z
    return (code >= qmin) & (code <= qmax)


def fake_quantize_ste(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bits: int,
    axis: Optional[int] = None,
) -> torch.Tensor:
    """:func:`fake_quantize_with_qparams` with a clipped straight-through gradient.

    Forward: the codec's quantize-dequantize. Backward: ``dL/dx = dL/dy`` where the code
    ``round(x / scale) + zp`` lies inside ``[qmin, qmax]`` and 0 where the clamp cut it off, the rule of
    ``torch.fake_quantize_per_tensor_affine``. Scales get no gradient.

    Example: 8 bits symmetric with ``scale = 0.01`` passes the gradient for ``|x| < 1.275`` (codes up to
    127) only; per-token scales from each row's own range pass it everywhere, row extremes included.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        # inference and calibration: no gradient mask to build
        return fake_quantize_with_qparams(x, scale, zero_point, bits, axis)
    return _FakeQuantSTE.apply(x, scale, zero_point, bits, axis)
