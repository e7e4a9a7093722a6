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

from gradcomp.cli._common import EXIT_BAD_INPUT, EXIT_ENV, EXIT_FAILED, CliError

__all__ = ["main", "build_parser"]

_EPILOG = """\
start here:
  gradcomp doctor                                             what this machine can run
  gradcomp cost --params 7e9 --workers 8 --bandwidth 10gbit   will compression pay on my network?
  gradcomp grads                                              how much error does int8/int4 add to real gradients?
  gradcomp COMMAND --help                                     the options and examples of a command

every command takes --json for one machine-readable document on stdout; progress and errors go to stderr.

exit codes: 0 success, 1 the work failed, 2 bad arguments or input (the message names the argument),
3 the environment cannot do it (no root, no GPU, a missing optional extra).
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: what is wrong, and where to look."""

    def error(self, message: str):
        """Print ``PROG: error: MESSAGE`` and exit with code 2 (argparse would print the usage first)."""
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
    parser = _Parser(
        prog="gradcomp",
        description="Quantized gradient communication for PyTorch DDP and the quantization toolkit around it.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import gradcomp.cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"gradcomp.cli.{info.name}")
            module.register(sub)
        except Exception as exc:  # one broken command must not take the others down
            _register_broken(sub, info.name, exc)
    return parser


def _register_broken(sub, name: str, exc: Exception) -> None:
    """Register ``name`` as a command that explains why it cannot load and exits with code 3."""
    reason = f"{type(exc).__name__}: {exc}"
    try:
        p = sub.add_parser(name, help=f"(unavailable: {reason[:60]})", add_help=True)
    except argparse.ArgumentError:  # the module registered its parser before failing
        return

    def handler(args) -> int:
        raise CliError(f"this command could not be loaded ({reason})", EXIT_ENV)

    p.set_defaults(func=handler)


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
        print(f"gradcomp {args.command}: error: {_first_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ImportError as exc:
        print(f"gradcomp {args.command}: error: {exc} (install the missing extra, e.g. pip install 'gradcomp[plots]')", file=sys.stderr)
        return EXIT_ENV
    except OSError as exc:  # a path named on the command line that cannot be read or written
        print(f"gradcomp {args.command}: error: {_first_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # never a traceback for the user: one line, and -v shows the details
        if args.verbose:
            raise
        print(f"gradcomp {args.command}: error: {type(exc).__name__}: {_first_line(exc)} (run with -v for the traceback)", file=sys.stderr)
        return EXIT_FAILED


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (C++ errors append a stack trace after it)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
