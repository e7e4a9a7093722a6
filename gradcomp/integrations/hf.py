"""HF ``transformers.Trainer``: one call adds a callback that registers, logs and checkpoints the hook.

``gradcomp.integrations.hf.register(trainer, bits=8)`` after building the ``Trainer`` and before
``trainer.train()``. The callback:

1. ``on_train_begin`` (the Trainer has wrapped the model in DDP; no step has run): registers the hook
   on ``trainer.model_wrapped``; when the run resumes from a checkpoint, loads this rank's hook
   state from the checkpoint folder.
2. ``on_log``: adds :func:`gradcomp.integrations.metrics` (``gradcomp/compression_ratio``, bytes
   sent, quantization error) to the logs, so the Trainer's reporters (TensorBoard, W&B, the console)
   and ``trainer.state.log_history`` show them.
3. ``on_save`` (every rank, right after the Trainer wrote ``checkpoint-<step>``): gathers every
   rank's hook state and writes it as ``checkpoint-<step>/gradcomp_hook.pt`` from the process that
   saves.

A ``TrainerCallback`` is not told which Trainer runs it, and the DDP model is only reachable through
the Trainer, hence ``register(trainer)`` rather than ``callbacks=[...]``.

Needs ``transformers`` and ``accelerate``: ``pip install 'gradcomp[hf]'``.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Dict, Optional

import torch

from gradcomp.comm.checkpoint import gather_state_dict, load_gathered_state_dict
from gradcomp.comm.hook import QuantizedAllReduceState
from gradcomp.comm.hook import register as _register
from gradcomp.integrations._common import check_options, ddp_model, metrics, require

transformers = require("transformers", "hf", "HF transformers")
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

logger = logging.getLogger(__name__)

HOOK_FILE = "gradcomp_hook.pt"

__all__ = ["GradcompTrainerCallback", "HOOK_FILE", "register"]


class GradcompTrainerCallback(transformers.TrainerCallback):
    """The Trainer callback behind :func:`register` (build it with :func:`register`).

    Args:
        trainer: the ``transformers.Trainer`` whose DDP model gets the hook (held by weak reference).
        bits: 8, 4 or 2.
        resume_from: the checkpoint folder to take the hook state from when the run resumes; by
            default ``<output_dir>/checkpoint-<global step>``, the folder ``trainer.train(resume_from_checkpoint=True)``
            picks and the only one that holds the resumed step.
        **options: the fields of :class:`gradcomp.HookConfig` and ``process_group``. ``log_every``
            defaults to the Trainer's ``logging_steps`` (an int), so the quantization error is
            measured on the steps the Trainer logs.

    Attributes:
        state: the :class:`gradcomp.QuantizedAllReduceState` once training has begun (None before,
            and on a single process).
    """

    def __init__(self, trainer: "transformers.Trainer", bits: int = 8, resume_from: Optional[str] = None, **options: Any):
        if not isinstance(trainer, transformers.Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        if resume_from is not None and not isinstance(resume_from, (str, os.PathLike)):
            raise TypeError(f"resume_from must be a folder path or None, got {type(resume_from).__name__}")
        check_options(bits, options)
        self._trainer = weakref.ref(trainer)
        self.bits = bits
        self.options = dict(options)
        self.resume_from = resume_from
        self.state: Optional[QuantizedAllReduceState] = None
        self._ddp: Optional[torch.nn.parallel.DistributedDataParallel] = None

    def on_train_begin(self, args, state, control, **kwargs):
        """Register the hook on the Trainer's DDP model; load the hook state when resuming."""
        trainer = self._trainer()
        if trainer is None:
            raise ValueError("the Trainer this callback was registered with no longer exists")
        model = ddp_model(trainer.model_wrapped, args.world_size, lambda found: (
            f"gradcomp needs the Trainer to wrap the model in DistributedDataParallel on {args.world_size} "
            f"processes; it is a {type(found).__name__} (FSDP and DeepSpeed are not supported)"
        ))
        if model is None:
            logger.info("gradcomp: one process, no DDP model: nothing to compress")
            return
        if model is not self._ddp:
            if self.state is not None:
                self.state.close()
            options = dict(self.options)
            if "log_every" not in options and isinstance(args.logging_steps, int) and args.logging_steps >= 1:
                options["log_every"] = args.logging_steps
            self.state = _register(model, bits=self.bits, **options)
            self._ddp = model
        if state.global_step > 0:
            folder = self.resume_from or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            path = os.path.join(folder, HOOK_FILE)
            if os.path.isfile(path):
                load_gathered_state_dict(self.state, torch.load(path, map_location="cpu", weights_only=True))
                if self.state.rank == 0:
                    logger.info("gradcomp: hook state restored from %s (step %d)", path, self.state.step)
            else:
                logger.warning(
                    "gradcomp: resuming at step %d but %s does not exist; the hook starts afresh (training is "
                    "correct, but not bit-identical to an uninterrupted run). Pass resume_from= to register().",
                    state.global_step, path,
                )

    def on_save(self, args, state, control, **kwargs):
        """Write every rank's hook state into the checkpoint folder the Trainer has just written."""
        if self.state is None:
            return
        blob = gather_state_dict(self.state)  # every rank takes part; one writes
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if not os.path.isdir(folder):
                raise ValueError(f"expected the Trainer's checkpoint folder {folder} after on_save; it does not exist")
            tmp = os.path.join(folder, HOOK_FILE + ".tmp")
            torch.save(blob, tmp)
            os.replace(tmp, os.path.join(folder, HOOK_FILE))

    def on_log(self, args, state, control, logs: Optional[Dict[str, float]] = None, **kwargs):
        """Add the hook's statistics to the Trainer's logs and to ``state.log_history``."""
        values = metrics(self.state)
        if not values or logs is None:
            return
        logs.update(values)
        # the Trainer appended a copy of these logs to log_history just before calling on_log
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def register(trainer: "transformers.Trainer", bits: int = 8, resume_from: Optional[str] = None, **options: Any) -> GradcompTrainerCallback:
    """Add gradcomp's hook to a ``transformers.Trainer``; call it before ``trainer.train()``.

    The callback goes first in the Trainer's list, so the reporters that run after it see the
    statistics it adds to the logs.

    Args:
        trainer: the Trainer (on every process).
        bits: 8, 4 or 2.
        resume_from: see :class:`GradcompTrainerCallback`.
        **options: the fields of :class:`gradcomp.HookConfig` and ``process_group``.

    Returns:
        The callback; ``callback.state`` holds the hook state once training has begun.

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds)  # doctest: +SKIP
        >>> gradcomp.integrations.hf.register(trainer, bits=8)          # doctest: +SKIP
        >>> trainer.train()                                              # doctest: +SKIP
    """
    callback = GradcompTrainerCallback(trainer, bits=bits, resume_from=resume_from, **options)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
