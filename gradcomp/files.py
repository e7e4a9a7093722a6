"""Write result files atomically, with the permissions the user's umask gives every other file.

``tempfile.mkstemp`` creates its file with mode 0600, and so does ``safetensors.torch.save_file``;
renamed into place, such a temporary file leaves a result (``summary.json``, a checkpoint, a
quantized ``.safetensors``) readable by its owner only. :func:`atomic_write` gives the file the mode
``open()`` would have given it (``0o666`` less the umask: 0644 under the usual umask 022) before the
rename, so an atomic write and a plain write leave the same permissions.

Example::

    from gradcomp.files import atomic_write, atomic_write_text

    atomic_write_text("runs/x/summary.json", text)                  # 0644 under umask 022
    atomic_write("model.pt", lambda tmp: torch.save(state, tmp))     # any writer that takes a path
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "default_file_mode", "current_umask"]

PathLike = Union[str, "os.PathLike[str]"]
_umask_lock = threading.Lock()


def current_umask() -> int:
    """Return the process's umask without changing it (read from ``/proc/self/status`` on Linux).

    Elsewhere the umask is read by setting it and setting it back, under a lock; files created by
    other threads in that instant could get mode 0o666 & ~0o022.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Return the mode ``open(path, "w")`` gives a new file: ``0o666`` less the umask (0o644 under 022)."""
    return 0o666 & ~current_umask()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], None], *, durable: bool = True) -> None:
    """Create or replace ``path`` so that it holds either the old content or the complete new one.

    1. reserve a unique temporary name in ``path``'s folder (created with ``O_EXCL``, so two writers
       never share it);
    2. ``write(tmp)`` fills it (a writer that recreates the file, like safetensors, is fine);
    3. give it :func:`default_file_mode` (mkstemp and safetensors leave 0600);
    4. with ``durable``, fsync it; rename it over ``path``; fsync the folder, so the rename lasts too.

    If ``write`` raises, the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the file to write; its folder is created if missing.
        write: called with the temporary file's path (a ``str``).
        durable: fsync the file and the folder (off for files that are cheap to recreate).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident() % 100000}.{attempt}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        break
    else:  # pragma: no cover - a hundred stale temporary files of this very process and thread
        raise FileExistsError(f"could not reserve a temporary name next to {path}")
    try:
        write(str(tmp))
        os.chmod(tmp, default_file_mode())
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write, durable=durable)


def atomic_write_text(path: PathLike, text: str, *, durable: bool = True, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write_bytes(path, text.encode(encoding), durable=durable)
