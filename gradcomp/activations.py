"""Deprecated alias of :mod:`gradcomp.quant` for activation quantization (kept for one release).

Every name read from ``gradcomp.activations`` warns (``DeprecationWarning``) and comes from
:mod:`gradcomp.quant`, the one import path from now on (see docs/activations.md).
"""

from __future__ import annotations

from gradcomp import quant as _target
from gradcomp._deprecated import alias
from gradcomp.quant import activation_quant, activation_report, fake_quant, histogram, observers

__getattr__, __dir__, _ = alias(__name__, _target)
__all__ = [
    "ActQuantConfig",
    *histogram.__all__,
    *observers.__all__,
    *activation_quant.__all__,
    *activation_report.__all__,
    *fake_quant.__all__,
]
