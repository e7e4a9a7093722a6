"""gradcomp: quantized gradient communication for PyTorch DDP, and the quantization toolkit around it.

The hook: ``gradcomp.register(ddp_model, bits=8)``; for FSDP2, ``gradcomp.fsdp.compress_(model,
grad_bits=8, weight_bits=8)``. The toolkit: :mod:`gradcomp.codec` (the one
quantizer), :mod:`gradcomp.quant` (weights and activations), :mod:`gradcomp.sensitivity`,
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
from gradcomp import fsdp
from gradcomp.fsdp import FSDPCompressConfig, FSDPCompressState
from gradcomp.quant import (
    CastConfig,
    WeightQuantConfig,
    load_quantized,
    model_size_bytes,
    quantize_,
    save_quantized,
)
from gradcomp.quant import (
    ActivationCapture,
    ActQuantConfig,
    calibrate_,
    convert_activation_quant_,
    prepare_activation_quant_,
    quantize_activations_,
)
from gradcomp.sensitivity import SensitivityConfig, SensitivityReport, measure_sensitivity
from gradcomp.mixed_precision import MixedPrecisionPlan, allocate_bits, apply_plan, plan_from_rules

__version__ = "0.1.0"

__all__ = [
    # the hook
    "HookConfig",
    "HookFailedError",
    "QuantizedAllReduceState",
    "quantized_allreduce_hook",
    "register",
    # FSDP2
    "fsdp",
    "FSDPCompressConfig",
    "FSDPCompressState",
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
    "prepare_activation_quant_",
    "calibrate_",
    "convert_activation_quant_",
    "quantize_activations_",
    # sensitivity and plans
    "SensitivityConfig",
    "SensitivityReport",
    "measure_sensitivity",
    "MixedPrecisionPlan",
    "allocate_bits",
    "apply_plan",
    "plan_from_rules",
    "__version__",
]
