"""Helpers shared by the subcommands: JSON or table output, errors with exit codes."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pkgutil
import sys
from typing import Any, Callable, Dict, List, Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ENV = 3


class CliError(Exception):
    """An error to print without a traceback, with the exit code to return."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
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

