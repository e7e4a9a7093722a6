"""The ``gradcomp`` command line.

Each module of this package (other than those starting with ``_``) adds one or more subcommands
through ``register(subparsers)``; a subcommand's parser sets ``func=handler`` where
``handler(args) -> int`` returns the exit code. Modules import their heavy dependencies inside the
handlers so that ``gradcomp --help`` stays fast.

Exit codes: 0 success, 1 the work failed, 2 bad arguments or input (argparse uses 2 as well),
3 the environment cannot do what was asked (no root, no GPU, a missing optional extra).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import List, Optional

from gradcomp.cli._common import EXIT_BAD_INPUT, EXIT_ENV, CliError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="gradcomp",
        description="Quantized gradient communication for PyTorch DDP and the quantization toolkit around it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import gradcomp.cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"gradcomp.cli.{info.name}")
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``gradcomp`` command; return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): return the code instead of exiting
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"gradcomp {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"gradcomp {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ImportError as exc:
        print(f"gradcomp {args.command}: error: {exc} (install the missing extra, e.g. pip install 'gradcomp[plots]')", file=sys.stderr)
        return EXIT_ENV


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
