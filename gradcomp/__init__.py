"""gradcomp: quantized gradient communication for PyTorch DDP, and the quantization toolkit around it."""

from __future__ import annotations

from gradcomp.codec import (
    QuantizedTensor,
    cosine_similarity,
    dequantize,
    fake_quantize,
    mse,
    quantize,
    sqnr_db,
)

from gradcomp.comm import HookConfig, QuantizedAllReduceState, quantized_allreduce_hook, register

__version__ = "0.1.0"

__all__ = [
    "HookConfig",
    "QuantizedAllReduceState",
    "quantized_allreduce_hook",
    "register",
    "QuantizedTensor",
    "cosine_similarity",
    "dequantize",
    "fake_quantize",
    "mse",
    "quantize",
    "sqnr_db",
    "__version__",
]
