"""Weight-quantization algorithms: how codes and scales are chosen, on the one packed format.

* ``rtn`` (round-to-nearest, the default of :func:`gradcomp.quant.quantize_`): each group's scale
  from its min and max, each weight rounded on its own. Data-free.
* ``gptq`` (:class:`GPTQ`): column-wise rounding with error compensation against the input Hessian.
* ``awq_clip`` (:class:`ActivationAwareClip`): per-group clipping range searched on the input Hessian.
* ``awq_scale`` (:class:`AWQScale`): AWQ's per-input-channel scaling by activation magnitude (stored
  as ``input_scale``, divided out of the input at run time), then the clipping search.
* ``hqq`` (:class:`HQQ`): half-quadratic fit of each group's scale and zero point; data-free (the input
  Hessian's diagonal weighs the columns when calibration data is given).
* ``autoround`` (:class:`AutoRound`): per-weight rounding offsets in [-0.5, 0.5] and per-group
  ranges learnt by signed gradient descent against the whole model's outputs (not layer by layer);
  it covers every selected layer (Linear, Embedding, Conv2d).

GPTQ and awq_clip need calibration batches: :func:`collect_input_hessians` runs them once through
the unquantized model and sums ``X^T X`` of every selected Linear's input, and of every Conv2d's
unfolded input per group (:mod:`gradcomp.quant.algorithms.conv`), so they cover convolutions too.
Layers a method cannot handle (Embedding for GPTQ and AWQ, Conv2d for awq_scale) fall back to
round-to-nearest with a warning that names them (``quantize_(..., strict=True)`` raises instead). The result is packed by
:meth:`gradcomp.quant.modules.PackedWeight.from_codes` into the same modules and files.
"""

from __future__ import annotations

from typing import Any, Union

from gradcomp.quant.algorithms.autoround import AutoRound, AutoRoundResult, autoround_quantize
from gradcomp.quant.algorithms.awq import AWQScale, awq_scale_quantize
from gradcomp.quant.algorithms.calibration import collect_input_hessians
from gradcomp.quant.algorithms.clip import ActivationAwareClip, clip_search_quantize, clip_search_ratios
from gradcomp.quant.algorithms.common import QuantResult, input_hessian_of, layer_output_error
from gradcomp.quant.algorithms.gptq import GPTQ, gptq_quantize
from gradcomp.quant.algorithms.hqq import HQQ, hqq_quantize

__all__ = [
    "METHODS",
    "GPTQ",
    "ActivationAwareClip",
    "HQQ",
    "AWQScale",
    "AutoRound",
    "AutoRoundResult",
    "autoround_quantize",
    "clip_search_ratios",
    "awq_scale_quantize",
    "hqq_quantize",
    "QuantResult",
    "collect_input_hessians",
    "gptq_quantize",
    "clip_search_quantize",
    "layer_output_error",
    "input_hessian_of",
    "resolve_method",
]

METHODS = ("rtn", "gptq", "awq_clip", "awq_scale", "hqq", "autoround")

Method = Union[None, str, GPTQ, ActivationAwareClip, AWQScale, HQQ, AutoRound]


def resolve_method(method: Any) -> Union[None, GPTQ, ActivationAwareClip, AWQScale, HQQ, AutoRound]:
    """Return the algorithm object for ``method`` (None or ``"rtn"``: round-to-nearest, returned as None).

    Example: ``resolve_method("gptq") == GPTQ()``; ``resolve_method(GPTQ(act_order=True))`` is itself.
    """
    if method is None or method == "rtn":
        return None
    if isinstance(method, (GPTQ, ActivationAwareClip, AWQScale, HQQ, AutoRound)):
        return method
    if method == "gptq":
        return GPTQ()
    if method in ("awq_clip", "awq"):
        return ActivationAwareClip()
    if method == "awq_scale":
        return AWQScale()
    if method == "hqq":
        return HQQ()
    if method == "autoround":
        return AutoRound()
    raise ValueError(f"method must be one of {METHODS} or a GPTQ / ActivationAwareClip / AWQScale / HQQ / AutoRound instance, "
                     f"got {method!r}")
