"""The codec's primitives: qparams, quantize, dequantize, fake quantize, one rounding rule.

Weights, activations and (through :mod:`gradcomp.codec.kernels`) gradients use these. Pure tensor
math: no ``torch.distributed``, no ``nn.Module``, no I/O.

A tensor is flattened and cut into blocks of ``block_size`` consecutive elements (the last block is
zero-padded; padding never reaches the output). Each block gets its own scale:

* **symmetric** (absmax): ``scale = max|x| / qmax`` with ``qmax = 2**(bits-1) - 1``; codes are
  ``round(x / scale)`` in ``[-qmax, qmax]`` and are stored with an offset of ``2**(bits-1)`` so they
  fit an unsigned field of ``bits`` bits.
* **asymmetric** (affine): ``scale = (max - min) / (2**bits - 1)`` over a range that always contains 0,
  and an integer zero point ``zp = round(-min / scale)``; codes are ``round(x / scale) + zp`` in
  ``[0, 2**bits - 1]``.

Worked example (symmetric, 8 bits): a block with values in ``[-0.5, 2.54]`` has ``max|x| = 2.54``,
so ``scale = 2.54 / 127 = 0.02``; ``x = 1.0`` becomes ``round(50.0) = 50`` (stored as 178) and
dequantizes back to ``50 * 0.02 = 1.0``; the error of any element is at most ``scale / 2 = 0.01``.

Scales are fp32 and the very scales that are stored are the ones used to quantize, so the receiver
reconstructs exactly what the sender meant. fp32 scales cover magnitudes from about 1e-36 to 3e38
without underflow or overflow. A block that holds an inf or a nan gets a non-finite scale and
dequantizes to non-finite values only, never to finite garbage.

Rounding is one rule everywhere (:func:`round_codes`): to nearest, ties to even, or stochastic
``floor(y + u)`` with ``u ~ U[0, 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from gradcomp.checks import SUPPORTED_BITS, check_int
from gradcomp.checks import check_bits as _check_bits
from gradcomp.codec.compiling import run as _run
from gradcomp.codec.packing import pack_codes, pack_kernel, unpack_codes

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "qrange",
    "choose_qparams",
    "round_codes",
    "quantize_codes",
    "quantize_codes_with_qparams",
    "quantize",
    "dequantize_codes",
    "dequantize",
    "fake_quantize",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_block(block_size: int) -> None:
    check_int("block_size", block_size)


def _check_float(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be a floating tensor (fp32, fp16, bf16 or fp64), got {x.dtype}")


def round_codes(y: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Round scaled values to integers: to nearest with ties to even, or ``floor(y + noise)``.

    With ``noise ~ U[0, 1)`` the stochastic rule is unbiased: ``E[floor(y + u)] = y``. Every
    quantizer of gradcomp (the exchange kernels, weights, fake quantization) rounds through here,
    so the rule is written once.

    Example: ``round_codes(torch.tensor([2.5, 3.5, -0.5]))`` is ``[2., 4., -0.]``;
    ``round_codes(torch.tensor([2.25]), torch.tensor([0.8]))`` is ``[3.]``.
    """
    return torch.round(y) if noise is None else torch.floor(y + noise)


def qrange(bits: int, symmetric: bool) -> Tuple[int, int, int]:
    """Return ``(qmin, qmax, offset)`` of the unsigned code range for ``bits``.

    Symmetric codes span ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` and are stored with the offset
    ``2**(bits-1)``; asymmetric codes span ``[0, 2**bits - 1]`` with a per-block zero point.

    Example:
        >>> qrange(8, True)
        (-127, 127, 128)
        >>> qrange(4, False)
        (0, 15, 0)
    """
    _check_bits(bits)
    if symmetric:
        half = 1 << (bits - 1)
        return -(half - 1), half - 1, half
    return 0, (1 << bits) - 1, 0



def choose_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    bits: int,
    symmetric: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Compute fp32 scales (and integer zero points) from observed ranges.

    Steps:
        1. Widen the range to contain 0, so that 0 is exactly representable.
        2. Symmetric: ``scale = max(|min|, |max|) / qmax``; no zero point.
           Asymmetric: ``scale = max/n - min/n`` with ``n = 2**bits - 1`` (divided before the
           subtraction so that ranges near 3e38 cannot overflow), ``zp = clamp(round(-min/scale), 0, n)``.
        3. A zero scale (an all-zero range) stays zero; quantization maps it to code 0 exactly.

    Example: ``min=-1, max=3, bits=8, symmetric=False`` -> ``scale = 4/255 = 0.01569``,
    ``zp = round(1 / 0.01569) = 64``.

    Args:
        min_val: observed minimum, any shape (one entry per block, channel or tensor).
        max_val: observed maximum, same shape as ``min_val``.
        bits: code width, one of ``SUPPORTED_BITS``.
        symmetric: absmax scales without zero point, or affine scales with one.

    Returns:
        ``(scale, zero_point)``: fp32 tensors of the input shape; ``zero_point`` is ``None`` when
        symmetric, else holds integral values.
    """
    _check_bits(bits)
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val and max_val must have the same shape, got {tuple(min_val.shape)} and {tuple(max_val.shape)}")
    lo = torch.clamp(min_val.float(), max=0.0)
    hi = torch.clamp(max_val.float(), min=0.0)
    qmin, qmax, _ = qrange(bits, symmetric)
    if symmetric:
        return torch.maximum(-lo, hi) / qmax, None
    n = float(qmax - qmin)
    scale = hi / n - lo / n
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / safe), qmin, qmax)
    zp = torch.where(torch.isfinite(zp), zp, torch.zeros_like(zp))
    return scale, zp



def _sym_quantize_kernel(xb: torch.Tensor, qmax: int, noise: Optional[torch.Tensor]):
    """Quantize rows of ``xb`` (blocks, block_size) symmetrically; return (codes uint8, scale fp32)."""
    x = xb.float()
    scale = x.abs().amax(dim=1, keepdim=True) / qmax
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = x / safe
    y = round_codes(y, noise)
    codes = (torch.clamp(y, -qmax, qmax) + (qmax + 1)).to(torch.uint8)
    return codes, scale.squeeze(1)



def _sym_dequantize_kernel(packed: torch.Tensor, scale: torch.Tensor, bits: int, offset: int):
    """Dequantize packed symmetric codes of ``scale.numel()`` blocks into fp32 (blocks, block_size)."""
    if bits == 8:
        q = packed.reshape(scale.shape[0], -1).float() - offset
        return q * scale.unsqueeze(1)
    per = 8 // bits
    mask = (1 << bits) - 1
    pb = packed.reshape(scale.shape[0], -1)
    s = scale.unsqueeze(1)
    parts = [(((pb >> (bits * i)) & mask).float() - offset) * s for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(scale.shape[0], -1)



@dataclass(frozen=True)
class QuantizedTensor:
    """A block-quantized tensor: packed codes plus one fp32 scale (and zero point) per block.

    Attributes:
        data: flat uint8 tensor of packed codes.
        scale: fp32 tensor of shape ``(num_blocks,)``.
        zero_point: fp32 tensor of integral zero points ``(num_blocks,)`` when asymmetric, else None.
        bits: code width.
        block_size: elements per block.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (dequantization returns it by default).
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    bits: int
    block_size: int
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def symmetric(self) -> bool:
        """Whether the codes are symmetric (no zero point)."""
        return self.zero_point is None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and zero points (stored as uint8)."""
        zp = 0 if self.zero_point is None else self.zero_point.numel()
        return self.data.numel() + self.scale.numel() * 4 + zp

    @property
    def bits_per_element(self) -> float:
        """Bytes held per original element, in bits (the real cost, scale overhead included)."""
        return 8.0 * self.nbytes / max(1, self.numel)


def _blocks(x: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, int]:
    """View ``x`` as (blocks, block_size), zero-padding the tail; return (blocks, numel)."""
    flat = x.reshape(-1)
    n = flat.numel()
    nb = max(1, -(-n // block_size))
    if nb * block_size != n:
        flat = torch.cat([flat, flat.new_zeros(nb * block_size - n)])
    return flat.view(nb, block_size), n


def _noise(shape, device, seed: Optional[int], generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else int(seed))
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


def quantize_codes(
    x: torch.Tensor,
    bits: int = 8,
    block_size: int = 256,
    *,
    symmetric: bool = True,
    stochastic: bool = False,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    compiled: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Quantize ``x`` block-wise to unpacked unsigned codes.

    Returns ``(codes, scale, zero_point)`` with ``codes`` uint8 of shape ``(blocks, block_size)``
    (padded tail included), ``scale`` fp32 ``(blocks,)``, ``zero_point`` fp32 ``(blocks,)`` or None.
    Arguments are those of :func:`quantize`.
    """
    _check_float(x)
    _check_bits(bits)
    _check_block(block_size)
    xb, _ = _blocks(x, block_size)
    noise = _noise(xb.shape, xb.device, seed, generator) if stochastic else None
    if symmetric:
        _, qmax, _ = qrange(bits, True)
        codes, scale = _run(_sym_quantize_kernel, compiled, xb, qmax, noise)
        return codes, scale, None
    xf = xb.float()
    scale, zp = choose_qparams(xf.amin(dim=1), xf.amax(dim=1), bits, symmetric=False)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).unsqueeze(1)
    y = xf / safe
    y = round_codes(y, noise)
    qmin, qmax, _ = qrange(bits, False)
    codes = torch.clamp(y + zp.unsqueeze(1), qmin, qmax)
    codes = torch.where(torch.isfinite(codes), codes, torch.zeros_like(codes)).to(torch.uint8)
    return codes, scale, zp


def quantize(
    x: torch.Tensor,
    bits: int = 8,
    block_size: int = 256,
    *,
    symmetric: bool = True,
    stochastic: bool = False,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    compiled: bool = False,
) -> QuantizedTensor:
    """Quantize a floating tensor block-wise and pack its codes.

    Steps:
        1. Flatten ``x`` and cut it into blocks of ``block_size`` (the tail block is zero-padded).
        2. Compute one fp32 scale per block (absmax, or min/max with a zero point).
        3. Divide by the scale and round: to nearest (ties to even), or stochastically
           (``floor(y + u)``, ``u ~ U[0, 1)``, unbiased: ``E[q] = y``), reproducible from ``seed``
           or ``generator``.
        4. Clamp to the code range and pack the codes (see module docstring).

    Example: ``quantize(torch.tensor([0.5, -1.0, 0.25]), bits=4, block_size=4)`` has scale
    ``1/7``, codes ``round([3.5, -7, 1.75]) = [4, -7, 2]`` (ties to even), error at most ``1/14``.

    Args:
        x: fp32, fp16, bf16 or fp64 tensor of any shape and length.
        bits: 2, 3, 4 or 8.
        block_size: elements sharing one scale; use ``x.numel()`` for one scale per tensor and the
            row length for one scale per row.
        symmetric: absmax scales (default) or affine scales with a zero point.
        stochastic: unbiased stochastic rounding instead of round-to-nearest.
        seed: seed of the stochastic rounding noise when no ``generator`` is given (default 0).
        generator: a ``torch.Generator`` on ``x``'s device for the noise.
        compiled: run the fused ``torch.compile`` kernels (falls back to eager where unavailable).

    Returns:
        A :class:`QuantizedTensor`.
    """
    codes, scale, zp = quantize_codes(
        x, bits, block_size, symmetric=symmetric, stochastic=stochastic, seed=seed, generator=generator, compiled=compiled
    )
    if bits == 3 or (codes.numel() % (8 // bits)):
        data = pack_codes(codes, bits)
    else:
        data = _run(pack_kernel, compiled, codes, bits)
    return QuantizedTensor(data, scale, zp, bits, block_size, tuple(x.shape), x.dtype)


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], bits: int
) -> torch.Tensor:
    """Map unpacked codes ``(blocks, block_size)`` back to fp32 values of the same shape.

    Symmetric: ``(code - 2**(bits-1)) * scale``; asymmetric: ``(code - zero_point) * scale``.
    """
    _check_bits(bits)
    q = codes.reshape(scale.shape[0], -1).float()
    if zero_point is None:
        q = q - qrange(bits, True)[2]
    else:
        q = q - zero_point.unsqueeze(1)
    return q * scale.unsqueeze(1)


def dequantize(
    q: QuantizedTensor,
    *,
    dtype: Optional[torch.dtype] = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Reconstruct a tensor of ``q.shape`` from a :class:`QuantizedTensor`.

    Args:
        q: the quantized tensor.
        dtype: result dtype; defaults to the dtype that was quantized.
        compiled: use the fused ``torch.compile`` kernel for symmetric 2/4/8-bit codes.

    Returns:
        A tensor of shape ``q.shape``; blocks whose scale is non-finite come back non-finite.
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    nb = q.scale.numel()
    dtype = q.dtype if dtype is None else dtype
    if q.symmetric and q.bits != 3 and (q.block_size * q.bits) % 8 == 0:
        out = _run(_sym_dequantize_kernel, compiled, q.data, q.scale, q.bits, qrange(q.bits, True)[2])
    else:
        codes = unpack_codes(q.data, q.bits, nb * q.block_size)
        out = dequantize_codes(codes, q.scale, q.zero_point, q.bits)
    return out.reshape(-1)[: q.numel].reshape(q.shape).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    bits: int = 8,
    block_size: int = 256,
    *,
    symmetric: bool = True,
    stochastic: bool = False,
    seed: Optional[int] = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Quantize and dequantize ``x`` in one go (same shape and dtype), skipping the packing.

    Equal, element for element, to ``dequantize(quantize(x, ...))``.
    """
    codes, scale, zp = quantize_codes(
        x, bits, block_size, symmetric=symmetric, stochastic=stochastic, seed=seed, compiled=compiled
    )
    out = dequantize_codes(codes, scale, zp, bits)
    return out.reshape(-1)[: x.numel()].reshape(x.shape).to(x.dtype)



def quantize_codes_with_qparams(
    xb: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], bits: int
) -> torch.Tensor:
    """Quantize blocks ``(blocks, block_size)`` to unsigned codes with scales chosen beforehand.

    The rounding is that of :func:`quantize_codes` (to nearest, ties to even, then clamped), so with
    the scales :func:`quantize_codes` would choose the codes are identical. Use it when the stored
    scale differs from the computed one (e.g. rounded to fp16 for storage) so that the codes are
    made with the very scale that dequantizes them, or for static scales from a calibration.

    Example: ``xb = [[0.5, -1.0]]``, ``scale = [1/7]``, 4 bits symmetric -> ``round([3.5, -7]) =
    [4, -7]``, stored with offset 8 as ``[12, 1]``.

    Args:
        xb: floating tensor of shape ``(blocks, block_size)``.
        scale: ``(blocks,)`` scales of any float dtype (used in fp32); a zero scale maps its block to 0.
        zero_point: ``(blocks,)`` integral zero points for asymmetric codes, or None for symmetric.
        bits: code width, one of ``SUPPORTED_BITS``.

    Returns:
        uint8 codes of shape ``(blocks, block_size)``; non-finite inputs give code 0.
    """
    _check_float(xb, "xb")
    _check_bits(bits)
    if xb.dim() != 2 or scale.shape != (xb.shape[0],):
        raise ValueError(f"xb must be (blocks, block_size) with scale (blocks,), got {tuple(xb.shape)} and {tuple(scale.shape)}")
    if zero_point is not None and zero_point.shape != scale.shape:
        raise ValueError(f"zero_point must have the shape of scale {tuple(scale.shape)}, got {tuple(zero_point.shape)}")
    s = scale.float().unsqueeze(1)
    y = round_codes(xb.float() / torch.where(s == 0, torch.ones_like(s), s))
    if zero_point is None:
        qmin, qmax, offset = qrange(bits, True)
        y = torch.clamp(y, qmin, qmax) + offset
    else:
        qmin, qmax, _ = qrange(bits, False)
        y = torch.clamp(y + zero_point.float().unsqueeze(1), qmin, qmax)
    return torch.where(torch.isfinite(y), y, torch.zeros_like(y)).to(torch.uint8)

