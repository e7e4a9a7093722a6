"""gradcomp: quantized gradient communication for PyTorch DDP and FSDP2, and the quantization toolkit around it.

The hook: ``gradcomp.register(ddp_model, bits=8)`` (DDP); ``gradcomp.register_fsdp(model,
grad_bits=8, weight_bits=8)`` (FSDP2). Widths are wire formats (:mod:`gradcomp.codec.formats`):
``bits=8`` is shorthand for ``"int8"``.

Layers, bottom up (a layer imports only the ones below it):

* :mod:`gradcomp.codec`: the one quantizer (primitives, packing, wire formats, the exchange's kernels);
* :mod:`gradcomp.comm`: the exchange, the DDP hook, FSDP2, the hierarchical mode, the policy;
  :mod:`gradcomp.quant`: weights and activations (``quantize_``, calibration, files);
* :mod:`gradcomp.analysis`: sensitivity, mixed precision, the cost model, gradient replay;
* :mod:`gradcomp.integrations`, :mod:`gradcomp.plots`, :mod:`gradcomp.cli`: Lightning /
  accelerate / HF Trainer, pictures, the ``gradcomp`` command (never imported by the layers below).

``gradcomp.sensitivity``, ``gradcomp.mixed_precision``, ``gradcomp.costmodel``, ``gradcomp.gradexp``,
``gradcomp.weights``, ``gradcomp.activations`` and ``gradcomp.fsdp`` are deprecated aliases (for one
release) of :mod:`gradcomp.analysis`, :mod:`gradcomp.quant` and :func:`register_fsdp`: every name
read from them warns with its new path.
"""

from __future__ import annotations

from gradcomp._version import __version__
from gradcomp.analysis.mixed_precision import MixedPrecisionPlan, allocate_bits, apply_plan, plan_from_rules
from gradcomp.analysis.sensitivity import SensitivityConfig, SensitivityReport, measure_sensitivity
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
from gradcomp.comm.fsdp import FSDPCompressConfig, FSDPCompressState, register_fsdp
from gradcomp.quant import (
    ActivationCapture,
    ActQuantConfig,
    CastConfig,
    WeightQuantConfig,
    calibrate_,
    convert_activation_quant_,
    load_quantized,
    model_size_bytes,
    prepare_activation_quant_,
    quantize_,
    quantize_activations_,
    save_quantized,
)

__all__ = [
    # the hook
    "HookConfig",
    "HookFailedError",
    "QuantizedAllReduceState",
    "quantized_allreduce_hook",
    "register",
    # FSDP2
    "register_fsdp",
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

_ALIASES = ("activations", "costmodel", "fsdp", "gradexp", "mixed_precision", "sensitivity", "weights")


def __getattr__(name: str):
    """Load a deprecated alias module (``gradcomp.fsdp``...) on first use; its names warn when read."""
    if name in _ALIASES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
