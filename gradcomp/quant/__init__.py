"""Model quantization: weights and activations, built on the one quantizer of :mod:`gradcomp.codec`.

The package is split the way torchao splits it; read it top-down:

* :mod:`~gradcomp.quant.configs`: :class:`WeightQuantConfig`, :class:`CastConfig`, :class:`ActQuantConfig`
  and the short spec strings (``"int4-g128-asym"``).
* :mod:`~gradcomp.quant.rules`: which layer gets which config (exact name, glob, ``re:`` regex; first
  match wins).
* :mod:`~gradcomp.quant.layout`: the codec on a weight's rows and groups.
* :mod:`~gradcomp.quant.modules`: :class:`PackedWeight`, the quantized Linear/Embedding/Conv2d, and
  :func:`quantize_`.
* :mod:`~gradcomp.quant.sizes`: real bytes and bits per weight, scales counted.
* :mod:`~gradcomp.quant.serialization`: safetensors files with a JSON quantization map.
* :mod:`~gradcomp.quant.fake_quant`: quantize-dequantize for weights and activations, with a
  straight-through gradient.
* :mod:`~gradcomp.quant.histogram` and :mod:`~gradcomp.quant.observers`: the running histogram, the
  MSE and KL range searches, and the ``torch.ao``-style observers.
* :mod:`~gradcomp.quant.activation_quant`: prepare, calibrate and convert fake quantization of layer
  inputs.
* :mod:`~gradcomp.quant.algorithms`: how codes are chosen: round-to-nearest, GPTQ, activation-aware
  clipping and scaling, HQQ, AutoRound (data-aware or data-free, same packed format).
* :mod:`~gradcomp.quant.kernels` and :mod:`~gradcomp.quant.int8_kernels`: PyTorch's int8/int4 CPU
  kernels (weight-only, ``torch._int_mm``, oneDNN's int8 convolution and linear).
* :mod:`~gradcomp.quant.routes`: which kernel each quantized layer runs, chosen by measurement on
  the machine and the layer's real input shapes (:func:`tune_`, :func:`route_report`).
* :mod:`~gradcomp.quant.activation_files`: the activation quantizers inside a weights file.
* :mod:`~gradcomp.quant.observer_selection`: ``observer="auto"``, the observer per layer with the
  least held-out output error.
* :mod:`~gradcomp.quant.qat`: quantization-aware fine-tuning of weights with learned scales.
* :mod:`~gradcomp.quant.weight_report` and :mod:`~gradcomp.quant.activation_report`: the analyses
  (weight statistics and per-config quality; activation capture and dynamics).

Example::

    >>> from gradcomp.quant import WeightQuantConfig, quantize_, save_quantized
    >>> quantize_(model, WeightQuantConfig(bits=4, granularity="per_group", group_size=128))
    >>> save_quantized(model, "m.safetensors")
"""

from __future__ import annotations

from gradcomp.quant import activation_quant, activation_report, configs, fake_quant, histogram, modules, observers, rules, serialization, sizes, weight_report
from gradcomp.quant.configs import *  # noqa: F401,F403
from gradcomp.quant.rules import *  # noqa: F401,F403
from gradcomp.quant.modules import *  # noqa: F401,F403
from gradcomp.quant.fake_quant import *  # noqa: F401,F403
from gradcomp.quant.sizes import *  # noqa: F401,F403
from gradcomp.quant.serialization import *  # noqa: F401,F403
from gradcomp.quant.weight_report import *  # noqa: F401,F403
from gradcomp.quant.histogram import *  # noqa: F401,F403
from gradcomp.quant.observers import *  # noqa: F401,F403
from gradcomp.quant.activation_quant import *  # noqa: F401,F403
from gradcomp.quant.activation_report import *  # noqa: F401,F403
from gradcomp.quant import algorithms, int8_kernels, kernels, routes
from gradcomp.quant.routes import clear_routes_, load_route_cache, route_report, save_route_cache, tune_
from gradcomp.quant.observer_selection import observer_choices
from gradcomp.quant.qat import convert_qat_, prepare_qat_, qat_layers
from gradcomp.quant.algorithms import GPTQ, HQQ, ActivationAwareClip, AutoRound, AWQScale, layer_output_error

__all__ = [
    *configs.__all__,
    *rules.__all__,
    *modules.__all__,
    *fake_quant.__all__,
    *sizes.__all__,
    *serialization.__all__,
    *weight_report.__all__,
    *histogram.__all__,
    *observers.__all__,
    *activation_quant.__all__,
    *activation_report.__all__,
    "GPTQ",
    "ActivationAwareClip",
    "AWQScale",
    "HQQ",
    "AutoRound",
    "layer_output_error",
    "tune_",
    "route_report",
    "clear_routes_",
    "save_route_cache",
    "load_route_cache",
    "observer_choices",
    "prepare_qat_",
    "convert_qat_",
    "qat_layers",
]
