"""Activation quantization, under its short name: everything here lives in :mod:`gradcomp.quant`.

Observers in :mod:`gradcomp.quant.observers` (on :mod:`gradcomp.quant.histogram`), fake
quantization in :mod:`gradcomp.quant.fake_quant`, prepare/calibrate/convert in
:mod:`gradcomp.quant.activation_quant`, capture and statistics in
:mod:`gradcomp.quant.activation_report`. See docs/activations.md.
"""

from __future__ import annotations

from gradcomp.quant import activation_quant, activation_report, fake_quant, histogram, observers
from gradcomp.quant.configs import ActQuantConfig
from gradcomp.quant.histogram import *  # noqa: F401,F403
from gradcomp.quant.observers import *  # noqa: F401,F403
from gradcomp.quant.activation_quant import *  # noqa: F401,F403
from gradcomp.quant.activation_report import *  # noqa: F401,F403
from gradcomp.quant.fake_quant import *  # noqa: F401,F403

__all__ = [
    "ActQuantConfig",
    *histogram.__all__,
    *observers.__all__,
    *activation_quant.__all__,
    *activation_report.__all__,
    *fake_quant.__all__,
]
