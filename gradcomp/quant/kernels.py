"""Fast CPU matmuls for packed Linear weights, with today's dequantize path as the fallback.

PyTorch ships CPU kernels that multiply by integer weights without materialising a float weight:

* ``torch._weight_int8pack_mm(x, w_int8, scales)``: int8 per-channel symmetric weights (bf16
  activations);
* ``torch._weight_int4pack_mm_for_cpu(x, w_packed, group_size, scales_and_zeros)`` after
  ``torch._convert_weight_to_int4pack_for_cpu``: int4 weights in groups of 32/64/128/256 along the
  input dim, ``w = (q - 8) * scale + zero`` (bf16 activations);
* ``torch._int_mm(x_int8, w_int8)``: int8 x int8 -> int32, for dynamic W8A8 (per-token int8
  activations times int8 per-channel weights).

The packed files do not change: the kernel operands are derived from the stored codes on first use
and cached on the module (not in its state dict). A weight-only kernel runs when the activations are
bf16, or when the layer's ``compute_dtype`` is bf16 (then fp32 inputs are cast to bf16 and the result
back): the kernels are slow with fp32 activations (5-10x slower than an fp32 matmul in our runs).
Dynamic W8A8 runs ``_int_mm`` whenever no gradient is needed; its codes are exactly those of the
fake-quantized path and the integer sums are exact, so it differs from that path only by the fp32
rounding of the sum.

Mapping of the stored codes (see :mod:`gradcomp.quant.layout`): int8 symmetric codes ``c`` are stored
with offset 128, so the int8 weight is ``c - 128``; int4 symmetric ``w = (c - 8) s`` (zero 0);
int4 asymmetric ``w = (c - zp) s = (c - 8) s + (8 - zp) s`` (zero ``(8 - zp) s``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from gradcomp.codec import choose_qparams, quantize_codes_with_qparams, unpack_codes
from gradcomp.quant.configs import WeightQuantConfig

__all__ = ["weight_kernel", "kernels_available", "prepare_operands", "kernel_linear", "w8a8_kernel_fits", "w8a8_operands", "w8a8_linear"]

INT4_GROUP_SIZES = (32, 64, 128, 256)


def kernels_available() -> bool:
    """Whether this PyTorch has the CPU kernels (2.5 and later)."""
    return all(hasattr(torch, n) for n in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu", "_int_mm"))


def weight_kernel(config: object, shape: Tuple[int, ...]) -> Optional[str]:
    """Return ``"int8"`` or ``"int4"`` when a weight-only kernel can run this format, else None.

    int8: symmetric, per channel or per tensor. int4: symmetric or not, per group of 32/64/128/256
    with the input dim a multiple of the group and the output dim a multiple of 16.
    """
    if not isinstance(config, WeightQuantConfig) or len(shape) != 2 or not kernels_available():
        return None
    n, k = shape
    if config.bits == 8 and config.symmetric and config.granularity in ("per_channel", "per_tensor"):
        return "int8"
    if (config.bits == 4 and config.granularity == "per_group" and config.group_size in INT4_GROUP_SIZES
            and k % config.group_size == 0 and n % 16 == 0):
        return "int4"
    return None


def _codes(packed) -> torch.Tensor:
    lay = packed._layout
    return unpack_codes(packed.qweight, packed.config.bits, lay.numel).view(packed.shape)


def prepare_operands(packed) -> Tuple[str, tuple]:
    """Derive the kernel operands of a :class:`~gradcomp.quant.modules.PackedWeight` (cached by the caller).

    Returns:
        ``(kind, operands)``: ``("int8", (w_int8 (N, K), scales fp32 (N,)))`` or
        ``("int4", (w_packed, group_size, scales_and_zeros bf16 (K / g, N, 2)))``.
    """
    kind = weight_kernel(packed.config, packed.shape)
    if kind is None:
        raise ValueError(f"no CPU kernel for {packed.config.name} on shape {packed.shape}")
    n, k = packed.shape
    c = _codes(packed)
    if kind == "int8":
        w = (c.to(torch.int16) - 128).to(torch.int8).contiguous()
        s = packed.scale.float().reshape(-1)
        s = s.expand(n).contiguous() if s.numel() == 1 else s
        return kind, (w, s, torch.ones(n, dtype=torch.bfloat16))
    g = packed.config.group_size
    s = packed.scale.float().reshape(n, k // g)
    zp = packed._zero_points()
    zero = torch.zeros_like(s) if zp is None else (8.0 - zp.float()) * s
    sz = torch.stack([s.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()
    w = torch._convert_weight_to_int4pack_for_cpu(c.to(torch.int32).contiguous(), 2)
    return kind, (w, g, sz)


def kernel_linear(x: torch.Tensor, kind: str, operands: tuple, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Return ``x @ W^T + b`` with a weight-only kernel, computed in bf16 and returned in ``x.dtype``."""
    shape = x.shape
    xb = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
    if kind == "int8":
        w, s, ones = operands
        # scales of 1 in the kernel and the fp32 scales after it: no precision lost to bf16 scales
        y = torch._weight_int8pack_mm(xb, w, ones).float() * s
    else:
        w, g, sz = operands
        y = torch._weight_int4pack_mm_for_cpu(xb, w, g, sz).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])


def w8a8_kernel_fits(weight_config: object, act_config: object, shape: Tuple[int, ...]) -> bool:
    """Whether ``_int_mm`` can run this layer: int8 symmetric per-channel/tensor weights and dynamic
    per-token (or per-tensor) symmetric int8 activations."""
    if weight_kernel(weight_config, shape) != "int8" or act_config is None:
        return False
    return (getattr(act_config, "bits", None) == 8 and getattr(act_config, "dynamic", False)
            and getattr(act_config, "symmetric", False) and getattr(act_config, "granularity", None) in ("per_token", "per_tensor"))


def w8a8_operands(int8_operands: tuple) -> tuple:
    """Return ``(w_int8^T contiguous (K, N), scales fp32 (N,))`` for :func:`w8a8_linear`."""
    w, s, _ = int8_operands
    return w.T.contiguous(), s


def w8a8_linear(x: torch.Tensor, act_config, operands: tuple, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Dynamic W8A8: quantize ``x`` per token to int8 (the fake-quant path's codes), ``_int_mm``, rescale.

    Steps: 1. per-token (or per-tensor) symmetric scales ``s_x = max|x| / 127``; 2. codes
    ``round(x / s_x)`` in [-127, 127]; 3. ``acc = codes_x @ w_int8^T`` in int32 (exact);
    4. ``y = acc * s_x * s_w + b``.
    """
    w_t, sw = operands
    shape = x.shape
    x2 = x.detach().reshape(-1, shape[-1]).float()
    if act_config.granularity == "per_token":
        lo, hi = torch.aminmax(x2, dim=1)
    else:
        lo, hi = torch.aminmax(x2)
        lo, hi = lo.expand(x2.shape[0]), hi.expand(x2.shape[0])
    sx, _ = choose_qparams(lo, hi, 8, True)
    codes = (quantize_codes_with_qparams(x2, sx, None, 8).to(torch.int16) - 128).to(torch.int8)
    acc = torch._int_mm(codes, w_t)
    y = acc.float() * sx.unsqueeze(1) * sw
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], w_t.shape[1])
