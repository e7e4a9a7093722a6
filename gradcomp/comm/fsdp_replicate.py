"""HSDP with a quantized replicate all-reduce: FSDP2 on the shard dimension, gradcomp's exchange across replicas.

FSDP2's native HSDP (``fully_shard`` on a 2-D mesh) calls ``dist.all_reduce`` on the replicate group
itself, with no hook to replace it (``set_all_reduce_hook`` runs after it). FSDP2 does support a
custom HSDP: shard on a 1-D mesh (the shard dimension) and give every FSDP module an all-reduce hook,
which it calls with the module's reduce-scatter output (this rank's shard, averaged over the shard
group) before the gradients are assigned. :func:`gradcomp.register_fsdp` with ``replicate_group=``
installs this hook: the DDP hook's two-phase quantized all-reduce (``exchange.allreduce``: encode
with the worker residual, all-to-all, reduce_shard with the server residual, all-gather, decode) of
the shard across the replicas, averaged over them, so every replica ends with bit-identical shards.
A step in which some of a module's parameters have no gradient (FSDP2 reduces only the others)
all-reduces that module's shard uncompressed and leaves this exchange's residuals as they are.

Typical set-up on ``R x S`` ranks::

    mesh = init_device_mesh("cuda", (R, S), mesh_dim_names=("replicate", "shard"))
    for block in model.blocks:
        fully_shard(block, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    gradcomp.register_fsdp(model, grad_bits=8, replicate_group=mesh.get_group("replicate"))

As with native HSDP, every replica must start from the same parameters (the same seed, or a broadcast).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from gradcomp.codec.formats import WireFormat
from gradcomp.comm import exchange
from gradcomp.comm.fsdp_plan import FLOAT_DTYPES, Ledger, ModuleComm, RowPlan
from gradcomp.comm.buffers import ExchangeBuffers
from gradcomp.comm.plan import ExchangePlan

__all__ = ["ReplicateAllReduce"]


class ReplicateAllReduce:
    """The all-reduce hook of one FSDP module across replicas (``FSDPModule.set_all_reduce_hook``).

    Holds the module's worker and server residuals of this exchange (in the state's ``state_dict``).

    Args:
        config: the state's :class:`~gradcomp.comm.fsdp.FSDPCompressConfig` (``grad_format`` is used).
        mod: the module's :class:`~gradcomp.comm.fsdp_plan.ModuleComm` (its step and segments).
        group: the replicas of this rank's shard.
        ledger: where the bytes are counted.
    """

    def __init__(self, config: Any, mod: ModuleComm, group: dist.ProcessGroup, ledger: Ledger):
        self.config, self.mod, self.group, self.ledger = config, mod, group, ledger
        self.residual: Optional[torch.Tensor] = None
        self.server_residual: Optional[torch.Tensor] = None
        self._entries: Dict[Tuple[int, int, WireFormat, str], Tuple[ExchangePlan, ExchangeBuffers]] = {}
        self.last: Tuple[int, int] = (0, 0)  # (sent, fp32) of the last call

    def _plan(self, n: int, R: int, fmt: WireFormat, device) -> Tuple[ExchangePlan, ExchangeBuffers]:
        key = (n, R, fmt, str(device))
        e = self._entries.get(key)
        if e is None:
            rp = RowPlan.build(n, self.mod.segments, self.config.block_size)
            plan = ExchangePlan.build(rp.segments, R, fmt, self.config.block_size)
            e = self._entries[key] = (plan, ExchangeBuffers.allocate(plan, device))
        return e

    def __call__(self, out: torch.Tensor) -> None:
        """Average ``out`` (this rank's reduced shard) over the replicas, in place."""
        cfg = self.config
        R = self.group.size()
        step = self.mod.step - 1  # the module's reduce-scatter of this step came first
        n = out.numel()
        fp32 = 2 * (R - 1) * n * 4 // R
        # a shard of some of the module's parameters (the others had no gradient) goes uncompressed:
        # this exchange's residuals are cut by the row's length into the replicas' shards, so a
        # parameter's blocks would move to another replica's server residual (the same decision on
        # every rank: FSDP2 needs every rank to reduce the same parameters)
        full = self.mod.last_present is not None and self.mod.last_present == self.mod.full
        compress = (
            cfg.grad_format is not None and R > 1 and step >= cfg.warmup_steps
            and n >= cfg.min_compress_numel and out.dtype in FLOAT_DTYPES and out.is_contiguous()
            and (full or not self.mod.segments)
        )
        if not compress:
            if R > 1:
                dist.all_reduce(out, group=self.group)  # SUM then divide: gloo has no AVG
                out.div_(R)
            self.ledger.replicate(self, 2 * (R - 1) * n * out.element_size() // R, fp32)
            return
        plan, bufs = self._plan(n, R, cfg.grad_format, out.device)
        wres = snew = wnew = sres = None
        if cfg.error_feedback:
            wres = self.residual if self.residual is not None and self.residual.numel() == plan.padded_numel else None
            sres = self.server_residual if self.server_residual is not None and self.server_residual.numel() == plan.server_numel else None
            f32 = dict(dtype=torch.float32, device=out.device)
            wres = torch.zeros(plan.padded_numel, **f32) if wres is None else wres.to(out.device)
            sres = torch.zeros(plan.server_numel, **f32) if sres is None else sres.to(out.device)
            wnew, snew = torch.empty_like(wres), torch.empty_like(sres)
        finite = exchange.allreduce(
            plan, bufs, out.view(-1), self.group,
            residual=wres, residual_out=wnew, server_residual=sres, server_residual_out=snew,
            header=(step, self.mod.index), fused=cfg.fused,
        )
        if cfg.error_feedback and finite:  # a non-finite step leaves the residuals as they were, on every rank
            self.residual, self.server_residual = wnew, snew
        self.ledger.replicate(self, plan.bytes_sent, fp32)
