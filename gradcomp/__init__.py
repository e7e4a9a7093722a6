"""gradcomp: quantized gradient communication for PyTorch DDP, and the quantization toolkit around it.

The hook: ``gradcomp.register(ddp_model, bits=8)``. The toolkit: :mod:`gradcomp.codec` (the one
quantizer), :mod:`gradcomp.weights`, :mod:`gradcomp.activations`, :mod:`gradcomp.sensitivity`,
:mod:`gradcomp.mixed_precision`, :mod:`gradcomp.costmodel`, :mod:`gradcomp.gradexp`.
"""

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
from gradcomp.comm import HookConfig, HookFailedError, QuantizedAllReduceState, quantized_allreduce_hook, register
from gradcomp.weights import (
    CastConfig,
    WeightQuantConfig,
    load_quantized,
    model_size_bytes,
    quantize_,
    save_quantized,
)
from gradcomp.activations import ActivationCapture, ActQuantConfig, quantize_activations_
from gradcomp.sensitivity import SensitivityConfig, measure_sensitivity
from gradcomp.mixed_precision import allocate_bits, apply_plan, plan_from_rules

__version__ = "0.1.0"

__all__ = [
    # the hook
    "HookConfig",
    "HookFailedError",
    "QuantizedAllReduceState",
    "quantized_allreduce_hook",
    "register",
    # the codec
    "QuantizedTensor",
    "cosine_similarity",
    "dequantize",
    "fake_quantize",
    "mse",
    "quantize",
    "sqnr_db",
    # weights
    "CastConfig",
    "WeightQuantConfig",
    "load_quantized",
    "model_size_bytes",
    "quantize_",
    "save_quantized",
    # activations
    "ActivationCapture",
    "ActQuantConfig",
    "quantize_activations_",
    # sensitivity and plans
    "SensitivityConfig",
    "measure_sensitivity",
    "allocate_bits",
    "apply_plan",
    "plan_from_rules",
    "__version__",
]
