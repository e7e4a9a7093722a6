"""Deprecated alias of :mod:`gradcomp.analysis.sensitivity` (kept for one release).

``import gradcomp.sensitivity`` still works; every name read from it warns (``DeprecationWarning``) and
comes from :mod:`gradcomp.analysis.sensitivity`, the one import path from now on.
"""

from __future__ import annotations

from gradcomp._deprecated import alias
from gradcomp.analysis import sensitivity as _target

__getattr__, __dir__, __all__ = alias(__name__, _target)
