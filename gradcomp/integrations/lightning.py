"""PyTorch Lightning: one callback registers the hook, logs its statistics and checkpoints it.

``trainer = L.Trainer(strategy="ddp", callbacks=[GradcompCallback(bits=8)])`` is all it takes.

Why a callback and not ``DDPStrategy(ddp_comm_hook=...)``: Lightning registers comm hooks only when
the device is CUDA (on CPU it ignores them without a word), and ``ddp_comm_state`` must be built
before ``fit`` creates the process group, which the hook's state needs. The callback registers the
hook in ``on_fit_start``, after the strategy has wrapped the model in DDP and before the first step,
on CPU and GPU alike.

Checkpoints: Lightning calls ``Callback.state_dict`` on every rank and writes rank 0's result, so
the callback returns every rank's hook state (:func:`gradcomp.comm.checkpoint.gather_state_dict`);
on resume each rank takes its own entry. Lightning restores callbacks before it wraps the model in
DDP, so the callback holds the entry and applies it when it registers the hook.

Needs ``lightning`` (or ``pytorch_lightning``) >= 2.0: ``pip install 'gradcomp[lightning]'``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch

from gradcomp.comm.checkpoint import gather_state_dict, load_gathered_state_dict
from gradcomp.comm.hook import QuantizedAllReduceState, register
from gradcomp.integrations._common import check_options, ddp_model, metrics, require


def _import_lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = require("pytorch_lightning", "lightning", "PyTorch Lightning (the lightning or pytorch_lightning package, >= 2.0)")
    return pl


pl = _import_lightning()
logger = logging.getLogger(__name__)

__all__ = ["GradcompCallback"]


class GradcompCallback(pl.Callback):
    """Compress DDP gradients with gradcomp's quantized all-reduce in a Lightning ``Trainer``.

    Steps:
        1. ``on_fit_start`` (the model is wrapped in DDP by then, no step has run): build the hook
           state on every rank with :func:`gradcomp.register`, and load the rank's entry of a
           checkpoint that Lightning restored earlier.
        2. ``on_train_batch_end``: log :func:`gradcomp.integrations.metrics` (bytes sent per step,
           compression ratio, quantization error, under ``gradcomp/``) with ``LightningModule.log``,
           so they reach the Trainer's logger at its ``log_every_n_steps``.
        3. ``state_dict`` (every rank, when Lightning saves): every rank's hook state in one entry.

    With one process (no DDP) the callback does nothing; with another multi-process strategy
    (FSDP, DeepSpeed) it raises, since the hook is a DDP communication hook.

    Args:
        bits: 8, 4 or 2 bits per gradient value on the wire.
        log_metrics: log the statistics through Lightning (default True).
        **options: the other fields of :class:`gradcomp.HookConfig` (``warmup_steps``,
            ``block_size``, ...) and ``process_group``. ``log_every`` defaults to the Trainer's
            ``log_every_n_steps``, so the quantization error is measured on the steps Lightning logs.

    Attributes:
        state: the :class:`gradcomp.QuantizedAllReduceState` once ``fit`` has started (None before).

    Example:
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp",
        ...                     callbacks=[GradcompCallback(bits=8)])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)                             # doctest: +SKIP
    """

    def __init__(self, bits: int = 8, log_metrics: bool = True, **options: Any):
        check_options(bits, options)
        self.bits = bits
        self.options = dict(options)
        self.log_metrics = bool(log_metrics)
        self.state: Optional[QuantizedAllReduceState] = None
        self._ddp: Optional[torch.nn.parallel.DistributedDataParallel] = None
        self._pending: Optional[Dict[str, Any]] = None  # a restored checkpoint entry waiting for the hook
        self._logged_step = -1
        self._live = False  # the state serves the fit that is running

    # ---- registration

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Register the hook on the strategy's DDP model (and apply a restored checkpoint entry)."""
        model = ddp_model(trainer.strategy.model, trainer.world_size, lambda found: (
            "GradcompCallback needs a DDP strategy (strategy='ddp' or DDPStrategy(...)) when training on "
            f"several processes; the strategy is {type(trainer.strategy).__name__} and its model is a "
            f"{type(found).__name__}"
        ))
        if model is None:
            logger.info("gradcomp: one process, no DDP model: nothing to compress")
            self._pending = None
            return
        if model is not self._ddp:
            if self.state is not None:
                self.state.close()
            options = dict(self.options)
            options.setdefault("log_every", trainer.log_every_n_steps)
            self.state = register(model, bits=self.bits, **options)
            self._ddp = model
            self._logged_step = -1
        self._live = True
        if self._pending is not None:
            load_gathered_state_dict(self.state, self._pending)
            self._pending = None

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Stop the hook's communication thread at the end of ``fit`` (statistics stay readable)."""
        if stage == "fit" and self.state is not None:
            self.state.close()
            self._live = False

    # ---- logging

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the hook's statistics once per optimizer step (not on accumulation micro-batches)."""
        if not self.log_metrics or self.state is None or self.state.step == self._logged_step:
            return
        values = metrics(self.state)
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False)
            self._logged_step = self.state.step

    # ---- checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """Every rank's hook state (a collective: Lightning calls it on every rank when it saves)."""
        if self.state is None:
            return dict(self._pending) if self._pending is not None else {}
        return gather_state_dict(self.state)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Take this rank's entry now if the hook is registered, else when ``fit`` registers it."""
        if not state_dict:
            return
        if self._live:
            load_gathered_state_dict(self.state, state_dict)
        else:
            self._pending = state_dict
