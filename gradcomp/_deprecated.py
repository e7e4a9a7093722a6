"""Warned aliases: an old module path that forwards to a new one for one release.

An alias module keeps no names of its own: every attribute read on it is looked up on the new
module, with a ``DeprecationWarning`` that names the new path. ``import gradcomp`` imports no alias
(the package loads them on first use), so nothing warns until an old path is used.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Callable, Dict, List, Mapping, Optional, Tuple

__all__ = ["alias"]


def alias(
    old: str, target: ModuleType, names: Optional[Mapping[str, str]] = None, new: Optional[str] = None
) -> Tuple[Callable[[str], object], Callable[[], List[str]], List[str]]:
    """Return ``(__getattr__, __dir__, __all__)`` for the alias module ``old`` of ``target``.

    Args:
        old: the alias module's name, e.g. ``"gradcomp.sensitivity"``.
        target: the module the names now live in.
        names: renamed names, ``{old name: new name}`` (``{"compress_": "register_fsdp"}``).
        new: the path to name in the warning (default ``target.__name__``).

    Example::

        __getattr__, __dir__, __all__ = alias(__name__, gradcomp.analysis.sensitivity)
    """
    renames: Dict[str, str] = dict(names or {})
    where = new or target.__name__
    public = list(getattr(target, "__all__", ())) + [k for k in renames if k not in getattr(target, "__all__", ())]

    def __getattr__(name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        real = renames.get(name, name)
        try:
            value = getattr(target, real)
        except AttributeError:
            raise AttributeError(f"module {old!r} has no attribute {name!r} (it is a deprecated alias of {where})") from None
        warnings.warn(
            f"{old}.{name} is deprecated and will be removed in the next release; use {where}.{real}",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    def __dir__() -> List[str]:
        return sorted(set(public))

    return __getattr__, __dir__, public
