"""What the framework integrations share: the metrics they log, the import of an optional extra, finding the DDP model."""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any, Callable, Dict, Optional

import torch

from gradcomp.comm.hook import HookConfig, QuantizedAllReduceState

PREFIX = "gradcomp/"
_LOGGED = ("bytes_sent_step", "fp32_bytes_step", "bytes_sent_total", "compression_ratio", "rel_error")


def metrics(state: Optional[QuantizedAllReduceState], prefix: str = PREFIX) -> Dict[str, float]:
    """Return the hook statistics worth logging, as ``{prefix + name: float}``, without NaNs.

    Names: ``bytes_sent_step`` (this rank, last step), ``fp32_bytes_step`` (what an fp32 all-reduce
    would have sent), ``bytes_sent_total``, ``compression_ratio`` (fp32 bytes / bytes sent, last
    step) and ``rel_error`` (relative quantization error, once the hook has measured it; it
    measures on its ``log_every`` steps). Nothing before the first step or without a state.

    Example:
        >>> metrics(state)  # doctest: +SKIP
        {'gradcomp/bytes_sent_step': 2312.0, 'gradcomp/fp32_bytes_step': 9088.0, ..., 'gradcomp/compression_ratio': 3.93}
    """
    if state is None or state.step == 0:
        return {}
    s = state.stats()
    out = {}
    for name in _LOGGED:
        value = float(s[name])
        if math.isfinite(value):
            out[prefix + name] = value
    return out


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"gradcomp.integrations.{extra} needs {what}, which could not be imported ({e}); "
            f"install it with: pip install 'gradcomp[{extra}]'"
        ) from e


def check_options(bits: int, options: Dict[str, Any]) -> None:
    """Refuse bad hook options when an integration is set up, long before training creates the hook."""
    known = set(HookConfig.__dataclass_fields__) | {"process_group"}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; expected some of {sorted(known)}")
    HookConfig(bits=bits, **{k: v for k, v in options.items() if k != "process_group"})


def ddp_model(model: Any, world_size: int, refusal: Callable[[Any], str]) -> Optional[torch.nn.parallel.DistributedDataParallel]:
    """Return the DDP model a framework trains (inside torch.compile's wrapper, if any), or None on one process.

    Args:
        model: what the framework holds: a DDP model, a compiled one, or (on one process) a plain module.
        world_size: the processes training.
        refusal: builds the error message from the model found, for several processes without DDP.

    Raises:
        ValueError: ``world_size > 1`` and the model is no DDP model (FSDP, DeepSpeed, not wrapped).
    """
    ddp = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule keeps the DDP model here
    if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return ddp
    if world_size > 1:
        raise ValueError(refusal(ddp))
    return None
