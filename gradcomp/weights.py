"""Deprecated alias of :mod:`gradcomp.quant` for weight quantization (kept for one release).

Every name read from ``gradcomp.weights`` warns (``DeprecationWarning``) and comes from
:mod:`gradcomp.quant`, the one import path from now on (see docs/weights.md).
"""

from __future__ import annotations

from gradcomp import quant as _target
from gradcomp._deprecated import alias
from gradcomp.quant import configs, fake_quant, modules, rules, serialization, sizes, weight_report

__getattr__, __dir__, _ = alias(__name__, _target)
__all__ = [
    *configs.__all__,
    *rules.__all__,
    *modules.__all__,
    *fake_quant.__all__,
    *sizes.__all__,
    *serialization.__all__,
    *weight_report.__all__,
]
