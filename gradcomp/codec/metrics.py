"""Error metrics of a reconstruction: mean squared error, SQNR in dB, cosine similarity."""

from __future__ import annotations

import math

import torch

__all__ = ["mse", "sqnr_db", "cosine_similarity"]


def mse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean squared error between two tensors of the same shape, computed in fp64."""
    _same_shape(reference, approx)
    return float(torch.mean((reference.detach().double() - approx.detach().double()) ** 2))


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB.

    Returns ``inf`` for an exact reconstruction and ``-inf`` for an all-zero reference with error.
    """
    _same_shape(reference, approx)
    r = reference.detach().double()
    signal = float(torch.sum(r * r))
    noise = float(torch.sum((r - approx.detach().double()) ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine_similarity(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors (1.0 when both are zero)."""
    _same_shape(reference, approx)
    a = reference.detach().double().reshape(-1)
    b = approx.detach().double().reshape(-1)
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(torch.dot(a, b)) / (na * nb)


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"tensors must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")

