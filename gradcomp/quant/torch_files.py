"""Say in one line what a torch file holds when it is not a state_dict: a pickled module or TorchScript.

``torch.load(..., weights_only=True)`` refuses a whole pickled ``nn.Module`` with several lines of
text (terminal colour codes included) that advise ``weights_only=False``, which would run the file's
code. The file is read here without unpickling anything: a torch zip archive with ``code/`` and
``constants.pkl`` entries is TorchScript (``torch.jit.save``); otherwise the pickle's opcodes are
scanned (:mod:`pickletools`, nothing executed) for the classes it would build.

Example: a file written by ``torch.save(model, "m.pt")`` gives
``m.pt holds a pickled torch.nn.Module (mypkg.Net), not a state_dict; save the weights instead:
torch.save(model.state_dict(), 'm.pt')``.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from pathlib import Path
from typing import List, Optional, Union

__all__ = ["describe_unloadable", "one_line"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BUILTIN = ("torch.", "collections.", "builtins.", "__builtin__.", "_codecs.", "copyreg.", "numpy.core.multiarray._reconstruct")
_SAVE_HINT = "save the weights instead: torch.save(model.state_dict(), {name!r})"


def one_line(text: str) -> str:
    """Return the first non-empty line of ``text`` without terminal colour codes."""
    for line in _ANSI.sub("", str(text)).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _globals(data: bytes, limit: int = 2000) -> List[str]:
    """Return the ``module.name`` of every class or function the pickle would look up (nothing is run)."""
    out: List[str] = []
    strings: List[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                out.append(arg.replace(" ", "."))
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8") and isinstance(arg, str):
                strings.append(arg)
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                out.append(f"{strings[-2]}.{strings[-1]}")
            if len(out) > limit:
                break
    except Exception:  # a truncated or odd pickle: report what was found so far
        pass
    return out


def _is_module_class(name: str) -> bool:
    return name.startswith("torch.nn.modules.") or ".nn.modules." in name


def describe_unloadable(path: Union[str, Path], *, torchscript_only: bool = False) -> Optional[str]:
    """Return one line saying what ``path`` holds and what to save instead, or None if it looks like weights.

    Args:
        path: a file that ``torch.load(..., weights_only=True)`` refused.
        torchscript_only: only say whether it is a TorchScript archive (checked before ``torch.load``,
            which would hand such a file to ``torch.jit.load``).

    Returns:
        A one-line message for a TorchScript archive, a pickled ``nn.Module`` or another pickled
        object; None when nothing of the kind is found (the caller reports torch's own first line).
    """
    path = Path(path)
    name = path.with_suffix(".pt").name if path.suffix not in (".pt", ".pth", ".bin") else path.name
    data: Optional[bytes] = None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
                return (f"{path} is a TorchScript archive (torch.jit.save), not a state_dict; save the weights instead: "
                        f"torch.save(torch.jit.load({str(path)!r}).state_dict(), {('weights_' + name)!r})")
            if torchscript_only:
                return None
            pkl = [n for n in names if n.endswith("/data.pkl")]
            if pkl:
                data = z.read(pkl[0])
    elif torchscript_only:
        return None
    else:
        with open(path, "rb") as f:
            data = f.read(1 << 22)
    if not data:
        return None
    found = _globals(data)
    modules = [g for g in found if _is_module_class(g)]
    if modules:
        top = next((g for g in found if not g.startswith(_BUILTIN)), modules[0])
        return f"{path} holds a pickled torch.nn.Module ({top}), not a state_dict; {_SAVE_HINT.format(name=name)}"
    odd = [g for g in found if not g.startswith(_BUILTIN)]
    if odd:
        return (f"{path} holds pickled Python objects ({', '.join(sorted(set(odd))[:3])}) that weights_only=True refuses to "
                f"build; save a state_dict (names to tensors) instead: torch.save(model.state_dict(), {name!r})")
    return None
