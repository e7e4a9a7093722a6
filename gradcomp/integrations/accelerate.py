"""HF accelerate: register the hook after ``accelerator.prepare``, checkpoint it with ``save_state``.

``state = register(accelerator, model, bits=8)`` right after ``model = accelerator.prepare(model)``
(or the tuple form) does both: it registers the hook on the prepared DDP model and registers a
:class:`HookCheckpoint` with ``accelerator.register_for_checkpointing``, so ``save_state`` /
``load_state`` carry every rank's hook state although accelerate writes the file from the main
process only. Log the statistics with ``accelerator.log(metrics(state), step=...)``.

Why not ``DistributedDataParallelKwargs(comm_hook=...)``: that field only accepts accelerate's own
hook names; given a function it registers nothing and says nothing.

Needs ``accelerate``: ``pip install 'gradcomp[accelerate]'``. On CPU, start several processes with
``torchrun`` or ``accelerate launch --multi_gpu --cpu`` (``accelerate launch --cpu
--num_processes 2`` starts only one) and build ``Accelerator(cpu=True)``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch

from gradcomp.comm.checkpoint import gather_state_dict, load_gathered_state_dict
from gradcomp.comm.hook import QuantizedAllReduceState
from gradcomp.comm.hook import register as _register
from gradcomp.integrations._common import ddp_model, metrics, require

accelerate = require("accelerate", "accelerate", "HF accelerate")
logger = logging.getLogger(__name__)

__all__ = ["HookCheckpoint", "metrics", "register"]


class HookCheckpoint:
    """Every rank's hook state as one object for ``accelerator.register_for_checkpointing``.

    ``accelerator.save_state`` calls :meth:`state_dict` on every rank (a collective here: it gathers
    all ranks' states) and writes the main process's copy; ``load_state`` calls
    :meth:`load_state_dict` on every rank with that file, and each rank takes its own entry.

    Args:
        state: the hook state that :func:`gradcomp.register` returned.
    """

    def __init__(self, state: QuantizedAllReduceState):
        if not isinstance(state, QuantizedAllReduceState):
            raise TypeError(f"state must be a gradcomp QuantizedAllReduceState, got {type(state).__name__}")
        self.state = state

    def state_dict(self) -> Dict[str, Any]:
        """Every rank's hook state (collective: call it on every rank)."""
        return gather_state_dict(self.state)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load this rank's entry of what :meth:`state_dict` returned."""
        load_gathered_state_dict(self.state, state_dict)


def register(accelerator: "accelerate.Accelerator", model: torch.nn.Module, bits: int = 8, checkpoint: bool = True, **options: Any) -> Optional[QuantizedAllReduceState]:
    """Register the quantized all-reduce hook on a model that ``accelerator.prepare`` returned.

    Call it on every process, after ``accelerator.prepare`` and before the first step. Gradient
    accumulation with ``accelerator.accumulate`` works as usual (DDP's ``no_sync``: one compressed
    exchange per optimizer step).

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: the prepared model (a ``DistributedDataParallel``, possibly inside ``torch.compile``).
        bits: 8, 4 or 2.
        checkpoint: also ``accelerator.register_for_checkpointing(HookCheckpoint(state))``; then
            ``load_state`` needs a folder saved with it (accelerate counts registered objects).
        **options: the fields of :class:`gradcomp.HookConfig` and ``process_group``.

    Returns:
        The hook state (``state.stats()``, :func:`metrics`), or None on a single process, where
        there is nothing to compress (and nothing is registered).

    Raises:
        TypeError: ``accelerator`` is not an ``Accelerator``, or the options are wrong.
        ValueError: several processes but ``model`` is no DDP model (FSDP, DeepSpeed, or not prepared).

    Example:
        >>> model, opt, loader = accelerator.prepare(model, opt, loader)           # doctest: +SKIP
        >>> state = gradcomp.integrations.accelerate.register(accelerator, model)  # doctest: +SKIP
    """
    if not isinstance(accelerator, accelerate.Accelerator):
        raise TypeError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}")
    ddp = ddp_model(model, accelerator.num_processes, lambda found: (
        "expected the model that accelerator.prepare returned, a torch DistributedDataParallel on "
        f"{accelerator.num_processes} processes; got a {type(found).__name__} (distributed type "
        f"{accelerator.distributed_type}); gradcomp's hook needs DDP (not FSDP or DeepSpeed)"
    ))
    if ddp is None:
        logger.info("gradcomp: one process, no DDP model: nothing to compress")
        return None
    state = _register(ddp, bits=bits, **options)
    if checkpoint:
        accelerator.register_for_checkpointing(HookCheckpoint(state))
    return state
