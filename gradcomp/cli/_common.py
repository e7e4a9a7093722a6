"""Helpers shared by the subcommands: JSON or table output, errors with exit codes."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pkgutil
import re
import sys
from typing import Any, Callable, Dict, List, Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ENV = 3


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class CliError(Exception):
    """An error to print without a traceback, with the exit code to return (terminal colour codes removed)."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(_ANSI.sub("", str(message)))
        self.code = code


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """Return the callable that ``MODULE:NAME`` names (``pkgutil.resolve_name``), or raise a CliError naming ``what``.

    The current directory is put on ``sys.path`` first, as ``python -m`` does, so a user's own
    ``mymodel.py`` next to where the command runs is found without ``PYTHONPATH=.``.

    Example: ``load_callable("mypkg.models:build", "--model")`` imports ``mypkg.models`` and returns its ``build``.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise CliError(f"{what} must look like MODULE:NAME (e.g. mypkg.models:build), got {spec!r}")
    module = spec.partition(":")[0]
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise CliError(f"{what}: cannot import module {module!r} ({exc})") from None
    try:
        obj = pkgutil.resolve_name(spec)
    except (AttributeError, ValueError) as exc:
        raise CliError(f"{what}: cannot resolve {spec!r} ({exc})") from None
    if not callable(obj):
        raise CliError(f"{what}: {spec!r} is not callable")
    return obj


def name_pattern(text: str) -> str:
    """Accept a layer-name pattern (exact name, glob or ``re:<regex>``, see :mod:`gradcomp.quant.rules`)."""
    from gradcomp.quant.rules import check_patterns

    try:
        check_patterns(text, "pattern")
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_json_flag(parser) -> None:
    """Add the ``--json`` flag that switches a subcommand's output to one JSON document."""
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON (non-finite floats become strings)."""
    json.dump(_jsonable(data), sys.stdout, indent=2)
    sys.stdout.write("\n")


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str] = (), floatfmt: str = ".4g") -> str:
    """Render dict rows as a markdown table (columns default to the first row's keys)."""
    if not rows:
        return "(no rows)"
    cols: List[str] = list(columns) or list(rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def arg_type(parse: Callable[[str], Any], name: str = "") -> Callable[[str], Any]:
    """Wrap a parser ``parse(text)`` for argparse's ``type=`` so its ValueError/TypeError becomes a usage error.

    argparse then prints ``argument --NAME: <message>`` and the command exits with code 2.
    ``name`` is only used for the function's ``__name__`` (argparse shows it for other failures).
    """

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name or getattr(parse, "__name__", "value")
    return convert


def positive_int(text: str) -> int:
    """Parse a positive int for argparse, with a message that names what came."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# ---- argument validators: argparse ``type=`` functions that refuse bad input before any work
#
# argparse reports their ArgumentTypeError as ``argument --NAME: <message>`` and exits with code 2.

INT_MAX = 2**31 - 1  # larger sizes overflow the tensor code long before they make sense


def int_in(lo: int, hi: int = INT_MAX) -> Callable[[str], int]:
    """Return an argparse type accepting a decimal integer in ``[lo, hi]``."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip().replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False) -> Callable[[str], float]:
    """Return an argparse type accepting a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    left = "(" if lo_open else "["

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < lo or value > hi or (lo_open and value == lo):
            if hi == math.inf:
                want = f"a number {'>' if lo_open else '>='} {lo:g}"
            else:
                want = f"a number in {left}{lo:g}, {hi:g}]"
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def hook_block_size(text: str) -> int:
    """Parse a block size the DDP hook accepts: a positive multiple of 8 (the hook's own rule)."""
    value = int_in(1)(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"block size must be a positive multiple of 8 (e.g. 64, 128, 256), got {text!r}")
    return value


def existing_file(text: str) -> str:
    """Accept the path of an existing regular file (not a folder)."""
    import os

    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"expected a file, got the folder {text!r}" if os.path.isdir(text) else f"not a regular file: {text!r}")
    return text


def out_file(*suffixes: str) -> Callable[[str], str]:
    """Return an argparse type for an output file: its folder exists, it is not a folder, it ends with a suffix.

    Every subcommand treats output paths the same way: a FILE's folder must exist (nothing is
    created silently in a mistyped place); an output DIR is created (:func:`out_dir`).
    """

    def parse(text: str) -> str:
        import os

        if suffixes and not text.lower().endswith(suffixes):
            raise argparse.ArgumentTypeError(f"expected a {' or '.join(suffixes)} file, got {text!r}")
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"expected a file name, got the folder {text!r}")
        folder = os.path.dirname(os.path.abspath(text))
        if not os.path.isdir(folder):
            raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist ({folder}); create it first")
        return text

    parse.__name__ = "file"
    return parse


def out_dir(text: str) -> str:
    """Accept an output folder: an existing folder, or a path whose nearest existing ancestor is a folder."""
    import os

    path = os.path.abspath(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"expected a folder, got the file {text!r}")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot create the folder {text!r}: {parent} is a file")
    return text
