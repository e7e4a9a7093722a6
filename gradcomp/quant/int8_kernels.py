"""Integer convolutions and linear layers with int8 activations, through PyTorch's x86 oneDNN engine.

PyTorch ships the quantized kernels that its own x86 quantization flow (PT2E + Inductor) lowers
to: ``torch.ops.onednn.qconv_prepack`` / ``qconv2d_pointwise`` and ``qlinear_prepack`` /
``qlinear_pointwise``. They take plain ``uint8`` activations with a per-tensor scale and zero
point, ``int8`` weights with per-output-channel scales (prepacked once into oneDNN's blocked
layout), an fp32 bias, and return fp32 directly (no quantized tensor types).

This module maps gradcomp's stored codes onto them:

* weights: int8 symmetric per channel or per tensor (stored codes ``c`` with offset 128, so the
  int8 weight is ``c - 128``, the weight scale per output channel the stored scale);
* activations: the codes of the layer's :class:`~gradcomp.quant.activation_quant.ActivationQuantizer`,
  made by the codec's own rounding (``round(x / s)``, ties to even, then the zero point and the clamp),
  so they are exactly the codes of the fake-quantized path. Affine codes are ``uint8`` with the
  zero point; symmetric codes ``[-127, 127]`` are shifted by 128 into ``uint8`` with zero point 128
  (the same real values). Static quantizers use their frozen scale; dynamic per-tensor ones the
  scale of each input (per-token scales do not fit a per-tensor kernel).

Worked example: ``s_x = 0.02``, ``zp = 64``; ``x = 0.5`` -> code ``round(25) + 64 = 89``; weight
``w = -0.3`` with ``s_w = 0.01`` -> ``-30``; the kernel sums ``(89 - 64) * (-30) = -750`` in int32
and writes ``-750 * 0.02 * 0.01 = -0.15 = x w`` in fp32.

The integer sums are exact, so a route here differs from the fake-quantized reference only by the
fp32 rounding of the rescaled sum (relative 1e-7 in our tests).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F

from gradcomp.codec import choose_qparams, qrange, unpack_codes
from gradcomp.quant.configs import ActQuantConfig, WeightQuantConfig

__all__ = ["onednn_available", "int8_activation_fits", "weight_fits", "prepare_conv", "prepare_linear", "quantize_input",
           "qconv2d", "qlinear"]


def onednn_available() -> bool:
    """Whether this PyTorch has the oneDNN quantized conv and linear ops (x86 builds of 2.2 and later)."""
    try:
        return all(hasattr(torch.ops.onednn, n) for n in ("qconv_prepack", "qconv2d_pointwise", "qlinear_prepack", "qlinear_pointwise"))
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def weight_fits(packed: Any) -> bool:
    """Whether a packed weight is int8 symmetric per channel / per tensor without an input scale."""
    cfg = packed.config
    return (isinstance(cfg, WeightQuantConfig) and cfg.bits == 8 and cfg.symmetric
            and cfg.granularity in ("per_channel", "per_tensor") and packed.input_scale is None)


def int8_activation_fits(quantizer: Any) -> bool:
    """Whether an input quantizer gives per-tensor 8-bit codes: frozen static (not per channel) or dynamic per tensor."""
    cfg = getattr(quantizer, "config", None)
    if not isinstance(cfg, ActQuantConfig) or cfg.bits != 8:
        return False
    if cfg.dynamic:
        return cfg.granularity == "per_tensor"
    return cfg.observer != "per_channel" and not quantizer.calibrating and quantizer.scale.numel() == 1


def _int8_weight(packed: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(int8 weight in its shape, fp32 scale per output channel)``."""
    lay = packed._layout
    codes = unpack_codes(packed.qweight, 8, lay.numel).view(packed.shape)
    w = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    s = packed.scale.float().reshape(-1)
    return w, (s.expand(packed.shape[0]).contiguous() if s.numel() == 1 else s.contiguous())


def prepare_conv(layer: Any) -> tuple:
    """Return the oneDNN operands of a quantized Conv2d: ``(prepacked weight, w_scales, w_zero_points, padding)``.

    Raises:
        ValueError: the layer's padding is a string other than ``"valid"`` (the kernel takes numbers).
    """
    w, s = _int8_weight(layer.packed)
    padding = layer.padding
    if isinstance(padding, str):
        if padding != "valid":
            raise ValueError(f"padding={padding!r} has no fixed numbers for the int8 convolution")
        padding = (0, 0)
    if layer.padding_mode != "zeros":
        padding = (0, 0)   # the input is padded explicitly first, as nn.Conv2d does
    pw = torch.ops.onednn.qconv_prepack(w, s, 1.0, 0, list(layer.stride), list(padding), list(layer.dilation), layer.groups, None)
    return pw, s, torch.zeros(s.numel(), dtype=torch.int64), [int(p) for p in padding]


def prepare_linear(layer: Any) -> tuple:
    """Return the oneDNN operands of a quantized Linear: ``(prepacked weight, w_scales, w_zero_points)``."""
    w, s = _int8_weight(layer.packed)
    return torch.ops.onednn.qlinear_prepack(w, None), s, torch.zeros(s.numel(), dtype=torch.int64)


def quantize_input(x: torch.Tensor, quantizer: Any) -> Tuple[torch.Tensor, float, int]:
    """Return ``(uint8 codes, scale, zero point)`` of ``x`` with the quantizer's per-tensor qparams.

    The codes are those of :func:`gradcomp.codec.quantize_codes_with_qparams` (the fake-quantized
    path), symmetric ones shifted by 128; infinities clamp to the end codes as there, NaN gives the
    zero point's code (the value 0).
    """
    cfg: ActQuantConfig = quantizer.config
    xd = x.detach()
    if cfg.dynamic:
        lo, hi = torch.aminmax(xd.float())
        scale_t, zp_t = choose_qparams(lo, hi, 8, cfg.symmetric)
    else:
        scale_t = quantizer.scale.reshape(())
        zp_t = None if cfg.symmetric else quantizer.zero_point.reshape(())
    scale = float(scale_t)
    if cfg.symmetric:
        qmin, qmax, zp = -127, 127, 128
    else:
        qmin, qmax, _ = qrange(8, False)
        zp = int(zp_t)
    safe = scale if scale != 0.0 else 1.0
    y = torch.div(xd.float() if xd.dtype != torch.float32 else xd, safe)
    y.round_()
    if cfg.symmetric:
        y.clamp_(qmin, qmax).add_(zp)
    else:
        y.add_(zp).clamp_(qmin, qmax)
    y.nan_to_num_(nan=float(zp), posinf=float(zp), neginf=float(zp))
    return y.to(torch.uint8), scale, zp


def qconv2d(layer: Any, x: torch.Tensor, quantizer: Any, ops: tuple, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Run the int8 convolution of ``x`` (fp32, NCHW) and return fp32 in ``x``'s memory format."""
    pw, ws, wzp, padding = ops
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding, mode=layer.padding_mode)
    codes, scale, zp = quantize_input(x, quantizer)
    b = None if bias is None else bias.float()
    y = torch.ops.onednn.qconv2d_pointwise(codes, scale, zp, pw, ws, wzp, b, list(layer.stride), padding,
                                           list(layer.dilation), layer.groups, 1.0, 0, torch.float32, "none", [], "")
    # the kernel writes channels-last; callers of an NCHW model may .view() the output
    return y.contiguous() if x.is_contiguous() else y


def qlinear(x: torch.Tensor, quantizer: Any, ops: tuple, bias: Optional[torch.Tensor], out_features: int) -> torch.Tensor:
    """Run the int8 linear layer on ``x`` (any leading dims) and return fp32."""
    pw, ws, wzp = ops
    shape = x.shape
    codes, scale, zp = quantize_input(x.reshape(-1, shape[-1]), quantizer)
    b = None if bias is None else bias.float()
    y = torch.ops.onednn.qlinear_pointwise(codes.contiguous(), scale, zp, pw, ws, wzp, b, 1.0, 0, torch.float32, "none", [], "")
    return y.reshape(*shape[:-1], out_features)


def conv_geometry(layer: Any) -> List[Any]:
    """The conv parameters that decide a kernel's speed (for cache keys and reports)."""
    return [list(layer.stride), layer.padding if isinstance(layer.padding, str) else list(layer.padding),
            list(layer.dilation), layer.groups, layer.padding_mode]


# --------------------------------------------------------------------------------------------
# convolution as one matrix product (im2col), for shapes where the direct kernels are slow
# (a single input channel with a long kernel: every output needs all of its taps)


def im2col_fits(layer: Any) -> Optional[str]:
    """Return None if the convolution can run as one matrix product (``groups == 1``, numeric padding), else why not."""
    if layer.groups != 1:
        return f"groups={layer.groups}"
    if isinstance(layer.padding, str) and layer.padding != "valid":
        return f"padding={layer.padding!r}"
    return None


def _patches(x: torch.Tensor, layer: Any) -> Tuple[torch.Tensor, int, int]:
    """Return the ``(N * Ho * Wo, C * kh * kw)`` patch matrix of ``x`` (already padded) and ``Ho, Wo``; any dtype."""
    kh, kw = layer.kernel_size
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    p = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)   # N, C, Ho, Wo, span_h, span_w
    if dh > 1 or dw > 1:
        p = p[..., ::dh, ::dw]
    n, c, ho, wo = p.shape[:4]
    return p.permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw), ho, wo


def _padded(x: torch.Tensor, layer: Any) -> torch.Tensor:
    if layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding, mode=layer.padding_mode)
    ph, pw = (0, 0) if isinstance(layer.padding, str) else layer.padding
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def prepare_im2col(layer: Any) -> tuple:
    """Return ``(int8 weight^T (K, O), column sums int32 (O,), fp32 scales (O,))`` of a quantized Conv2d."""
    w, s = _int8_weight(layer.packed)
    wt = w.reshape(w.shape[0], -1).T.contiguous()
    return wt, wt.to(torch.int32).sum(0), s


def im2col_int8(layer: Any, x: torch.Tensor, quantizer: Any, ops: tuple, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Int8 convolution as ``torch._int_mm`` on the patches of the input codes.

    Steps: 1. pad ``x`` in fp32 (a zero pads to the zero point's code, as in the fake-quantized path);
    2. codes ``u`` of :func:`quantize_input`; ``u - 128`` fits int8 exactly; 3. ``acc = (u - 128)
    patches @ w`` in int32; 4. ``sum (u - zp) w = acc + (128 - zp) sum w``; 5. ``y = acc * s_x s_w + b``.
    """
    wt, colsum, sw = ops
    codes, scale, zp = quantize_input(_padded(x, layer), quantizer)
    a, ho, wo = _patches((codes.to(torch.int16) - 128).to(torch.int8), layer)
    acc = torch._int_mm(a, wt)
    if zp != 128:
        acc += (128 - zp) * colsum
    y = acc * (sw * scale)
    if bias is not None:
        y += bias.float()
    n = x.shape[0]
    return y.view(n, ho, wo, -1).permute(0, 3, 1, 2).contiguous()


def im2col_dense(layer: Any, x: torch.Tensor, w2: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The convolution as one fp32 matrix product with the dense ``(O, C * kh * kw)`` weight ``w2``."""
    a, ho, wo = _patches(_padded(x, layer), layer)
    y = a @ w2.T if bias is None else torch.addmm(bias.to(a.dtype), a, w2.T)
    return y.view(x.shape[0], ho, wo, -1).permute(0, 3, 1, 2).contiguous()
