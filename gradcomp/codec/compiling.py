"""``torch.compile`` plumbing of the codec: compile a kernel once, run it, fall back to eager on failure.

:func:`run` calls a reference kernel through its compiled version, with the settings the kernels
need (:func:`_kernel_context`); a failure to compile is logged once and the eager kernel answers
(identical results).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

__all__ = ["compile_available", "run", "compile_failed", "warn_compile_failure"]

logger = logging.getLogger(__name__)


_COMPILE_LOCK = threading.Lock()
_COMPILED: dict = {}
_COMPILE_FAILED: set = set()


def compile_available() -> bool:
    """Return whether ``torch.compile`` can be used here (a compiler and a supported platform)."""
    try:
        import torch._dynamo  # noqa: F401
        import torch._inductor  # noqa: F401
    except Exception:  # pragma: no cover - depends on the torch build
        return False
    return hasattr(torch, "compile")


_WARNED = []


def warn_compile_failure(what: str, exc: BaseException) -> None:
    """Log a compilation failure once per process (later failures are logged at debug level)."""
    if _WARNED:
        logger.debug("torch.compile of %s failed (%s: %s)", what, type(exc).__name__, exc)
        return
    _WARNED.append(True)
    logger.warning("torch.compile of %s failed (%s: %s); the eager kernels are used (identical results)", what, type(exc).__name__, exc)


def _kernel_context():
    """Compile the kernels as plain functions even while a DDP forward runs on another thread.

    Dynamo hands every graph it compiles during a DDP forward to its DDPOptimizer (which splits
    graphs at DDP's bucket boundaries and refuses small ``bucket_cap_mb``); the kernels have no
    parameters, so it is turned off for them. Duck sizing is turned off too: the kernels get views
    at many storage offsets, and an offset that happens to equal another (an int8 code byte offset
    equals its fp32 residual's element offset) would otherwise become a guard, and every new
    offset a recompilation (config patches are thread-local). The kernels run without autograd
    (they write into given buffers): otherwise a call from a forward pass (grad mode on) and one
    from a backward hook (grad mode off) each need their own graph, and a training step ends up
    recompiling. A few graphs per kernel remain (with and without a residual, per dtype, offset 0
    or not), more than Dynamo's default limit of 8 allows, so the limit is raised for them.
    """
    import contextlib
    import importlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    options = (("torch._dynamo.config", "optimize_ddp", False), ("torch._dynamo.config", "recompile_limit", 64),
               ("torch.fx.experimental._config", "use_duck_shape", False))
    for module, name, value in options:
        try:
            stack.enter_context(importlib.import_module(module).patch(**{name: value}))
        except Exception:  # pragma: no cover - a torch without the option
            pass
    return stack


def run(fn: Callable, compiled: bool, *args):
    """Run ``fn(*args)`` through its ``torch.compile`` version when asked, else eagerly.

    Compilation happens once per kernel with dynamic shapes. If it fails (no C++ compiler, an
    unsupported platform, a torch without Inductor), the failure is logged once and the eager
    function runs from then on: results are identical either way.
    """
    if not compiled or fn in _COMPILE_FAILED:
        return fn(*args)
    try:
        cfn = _COMPILED.get(fn)
        if cfn is None:
            with _COMPILE_LOCK:
                cfn = _COMPILED.get(fn)
                if cfn is None:
                    cfn = torch.compile(fn, dynamic=True)
                    _COMPILED[fn] = cfn
        with _kernel_context():
            return cfn(*args)
    except Exception as exc:  # compilation problems surface at the first call
        _COMPILE_FAILED.add(fn)
        warn_compile_failure(fn.__name__, exc)
        return fn(*args)



def compile_failed(fn: Callable) -> bool:
    """Whether compiling ``fn`` failed in this process (it then runs eagerly)."""
    return fn in _COMPILE_FAILED
