"""Deprecated alias of the FSDP2 entry points (kept for one release).

``gradcomp.fsdp.compress_(model, ...)`` is now ``gradcomp.register_fsdp(model, ...)`` (defined in
:mod:`gradcomp.comm.fsdp`); the config and state are ``gradcomp.FSDPCompressConfig`` and
``gradcomp.FSDPCompressState``. Every name read from here warns (``DeprecationWarning``).
"""

from __future__ import annotations

from gradcomp._deprecated import alias
from gradcomp.comm import fsdp as _target

__getattr__, __dir__, __all__ = alias(__name__, _target, {"compress_": "register_fsdp"}, new="gradcomp")
__all__ = ["FSDPCompressConfig", "FSDPCompressState", "compress_"]
