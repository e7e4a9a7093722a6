"""Layouts of FSDP2's flat buffers for the exchange, the per-module record, and the byte counts of :mod:`gradcomp.comm.fsdp`.

* :class:`RowPlan`: where a flat row of FSDP's buffer goes in the block-aligned row the exchange works on;
* :class:`ModuleComm`: one FSDP module's data on one rank (residual, step, cached exchanges, bytes);
* :class:`Ledger`: what the collectives sent, for :meth:`gradcomp.comm.fsdp.FSDPCompressState.stats`;
* :func:`op_scale`: how FSDP's reduce op scales the summed shard.

These are internal to the FSDP2 modules (:mod:`~gradcomp.comm.fsdp`, :mod:`~gradcomp.comm.fsdp_collectives`,
:mod:`~gradcomp.comm.fsdp_replicate`); users meet :class:`~gradcomp.comm.fsdp.FSDPCompressState`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from gradcomp.codec.formats import WireFormat, wire_format
from gradcomp.comm.buffers import ROUTE_GATHER_RECV, ROUTE_GATHER_SEND, ROUTE_REDUCE_SCATTER, ExchangeBuffers
from gradcomp.comm.plan import ExchangePlan

__all__ = ["FLOAT_DTYPES", "RowPlan", "op_scale", "Entry", "ModuleComm", "Ledger"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the quantized collectives carry


@dataclass(frozen=True)
class RowPlan:
    """Where a flat row of FSDP's buffer goes in the block-aligned row the exchange works on.

    The exchange (:class:`~gradcomp.comm.plan.ExchangePlan`) starts every parameter on a block
    boundary; FSDP's buffer is ``P`` rows of the same per-parameter segments, so it is planned as
    ``P`` copies of the segments, and shard ``k`` of the plan is exactly row ``k``.

    Attributes:
        row: elements of FSDP's row (one rank's shard of the module's flat buffer).
        segments: per-parameter lengths of the row (zero-length ones dropped).
        aligned: elements of the aligned row, a whole number of blocks.
        index: ``index[j]`` is the aligned position of row element ``j`` (None: the identity).
    """

    row: int
    segments: Tuple[int, ...]
    aligned: int
    index: Optional[torch.Tensor]

    @staticmethod
    def build(row: int, segments: Sequence[int], block_size: int) -> "RowPlan":
        """Lay ``segments`` (per-parameter lengths summing to ``row``) out, each from a block boundary.

        Example: segments (300, 20) with ``block_size=256`` go to 0..299 and 512..531 of a 768-element row.
        """
        segments = tuple(int(n) for n in segments if n > 0)
        if sum(segments) != row or not segments:
            segments = (row,)  # unknown split: one segment
        starts, dst = [], 0
        for n in segments:
            starts.append(dst)
            dst += -(-n // block_size) * block_size
        index = None
        if len(segments) > 1 or dst != row:
            index = torch.cat([torch.arange(s, s + n, dtype=torch.long) for s, n in zip(starts, segments)])
        return RowPlan(row, segments, dst, index)

    def align(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` (rows, row) laid out as (rows, aligned), zeros in the padding (a view when it can)."""
        if self.index is None:
            return x
        out = torch.zeros(x.shape[0], self.aligned, dtype=x.dtype, device=x.device)
        out.index_copy_(1, self.index.to(x.device), x)
        return out

    def unalign(self, y: torch.Tensor) -> torch.Tensor:
        """Return the row elements of ``y`` (rows, aligned) as (rows, row)."""
        if self.index is None:
            return y
        return y.index_select(1, self.index.to(y.device))


def op_scale(op: Any, world_size: int) -> Optional[Tuple[str, float]]:
    """Return how the summed shard is scaled for FSDP's ``op``: ``("div", P)``, ``("mul", f)``; None for other ops.

    AVG: divided by ``P`` (as the DDP exchange divides); SUM: ``("mul", 1.0)``; PREMUL_SUM(f):
    multiplied by ``f`` (FSDP passes ``1 / gradient_divide_factor``).
    """
    kind = getattr(op, "op", op)
    if kind == dist.ReduceOp.AVG:
        return ("div", float(world_size))
    if kind == dist.ReduceOp.SUM:
        return ("mul", 1.0)
    if kind == dist.ReduceOp.PREMUL_SUM:
        factor = getattr(op, "factor", None)
        if factor is None:
            return None
        return ("mul", float(factor))
    return None


@dataclass
class Entry:
    """A cached exchange of one module for one (row, world size, width, device)."""

    row: RowPlan
    plan: ExchangePlan  # P copies of the row's segments: shard k is row k
    bufs: ExchangeBuffers
    plan1: Optional[ExchangePlan] = None  # the all-gather: this rank's row alone
    bufs1: Optional[ExchangeBuffers] = None


class ModuleComm:
    """Per-module, per-rank data: the residual, the step, the cached exchanges and the byte counts."""

    def __init__(self, fqn: str, index: int, segments: Tuple[int, ...], exact: Tuple[bool, ...] = ()):
        self.fqn = fqn
        self.index = index  # the module's position: in every message header, with the step
        self.segments = segments
        self.exact = exact  # per segment: sent unquantized in the weight all-gather (1-D parameters)
        self._exact_index: Dict[Tuple[int, str], Optional[torch.Tensor]] = {}
        self.step = 0
        self.residual: Optional[torch.Tensor] = None
        self._spare: Optional[torch.Tensor] = None  # where the next residual is written (double buffering)
        self.entries: Dict[Tuple[str, int, int, WireFormat, str], Entry] = {}
        self.pending_weight: Tuple[int, int] = (0, 0)  # (sent, fp32) of the all-gathers since the last reduce-scatter
        self.last_grad: Tuple[int, int] = (0, 0)
        self.last_weight: Tuple[int, int] = (0, 0)

    def exact_index(self, row: int, device: torch.device) -> Optional[torch.Tensor]:
        """Positions in a row of the segments sent unquantized, or None (none, or the split is unknown)."""
        key = (row, str(device))
        if key not in self._exact_index:
            idx = None
            if self.exact and any(self.exact) and len(self.exact) == len(self.segments) and sum(self.segments) == row:
                starts = [0]
                for n in self.segments[:-1]:
                    starts.append(starts[-1] + n)
                parts = [torch.arange(s0, s0 + n) for s0, n, e in zip(starts, self.segments, self.exact) if e and n > 0]
                idx = torch.cat(parts).to(device) if parts else None
            self._exact_index[key] = idx
        return self._exact_index[key]

    def residuals(self, numel: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(residual, spare)``: the error-feedback residual (zeros at first) and where the new one goes.

        Both persist: a reduce-scatter allocates nothing of module size (:meth:`commit_residual` swaps them).
        """
        res = self.residual
        if res is None or res.numel() != numel:
            res = torch.zeros(numel, dtype=torch.float32, device=device)
        elif res.device != torch.device(device):
            res = res.to(device)
        self.residual = res
        if self._spare is None or self._spare.numel() != numel or self._spare.device != res.device:
            self._spare = torch.empty_like(res)
        return res, self._spare

    def commit_residual(self, finite: torch.Tensor) -> None:
        """Make the spare the residual if every rank was finite; keep the old one otherwise (the same on every rank).

        On the CPU by swapping the buffers; on an accelerator without a host sync, by copying with
        ``torch.where`` (three passes).
        """
        if self.residual.device.type == "cpu":
            if bool(finite):
                self.residual, self._spare = self._spare, self.residual
        else:
            torch.where(finite, self._spare, self.residual, out=self.residual)

    def entry(self, kind: str, row: int, world_size: int, fmt: Union[WireFormat, str, int], block_size: int,
              device: torch.device) -> Entry:
        """Return the plan and buffers of a reduce-scatter (``"rs"``) or all-gather (``"ag"``) in format ``fmt``, built once."""
        fmt = wire_format(fmt)
        key = (kind, row, world_size, fmt, str(device))
        e = self.entries.get(key)
        if e is not None:
            return e
        rp = RowPlan.build(row, self.segments, block_size)
        plan = ExchangePlan.build(rp.segments * world_size, world_size, fmt, block_size, chunk_numel=None)
        if plan.layout.shard_numel != rp.aligned or len(plan.chunks) != 1:
            raise AssertionError(f"internal error: the exchange's shards ({plan.layout.shard_numel}) are not FSDP's rows ({rp.aligned})")
        if kind == "rs":  # encode, all-to-all, decode_sum
            e = Entry(rp, plan, ExchangeBuffers.allocate(plan, device, need=ROUTE_REDUCE_SCATTER))
        else:  # encode this rank's row alone (plan1), all-gather, decode every row (plan)
            plan1 = ExchangePlan.build(rp.segments, 1, fmt, block_size, chunk_numel=None)
            c1, cp = plan1.chunks[0], plan.chunks[0]
            if (c1.code_bytes, c1.scale_offset, c1.message_bytes) != (cp.code_bytes, cp.scale_offset, cp.message_bytes):
                raise AssertionError("internal error: a rank's message and a shard's message differ in layout")
            e = Entry(
                rp, plan, ExchangeBuffers.allocate(plan, device, need=ROUTE_GATHER_RECV),
                plan1, ExchangeBuffers.allocate(plan1, device, need=ROUTE_GATHER_SEND),
            )
        self.entries[key] = e
        return e


class Ledger:
    """The bytes the FSDP2 collectives of one rank sent, and the non-finite steps they met (thread-safe).

    Totals per kind (``grad``, ``weight``, ``replicate``) of what was sent, what FSDP's fp32
    collectives would have sent, and what FSDP's own collectives in their dtypes would have sent;
    the per-module figures of the last step live in each :class:`ModuleComm`. ``lock`` also guards
    the modules' records while a checkpoint is read or written.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals: Dict[str, int] = {
            "grad_sent": 0, "grad_fp32": 0, "grad_default": 0, "weight_sent": 0, "weight_fp32": 0, "weight_default": 0,
            "replicate_sent": 0, "replicate_fp32": 0,
        }
        self.nonfinite: Optional[torch.Tensor] = None  # steps x modules seen non-finite, counted on the device

    def _add(self, kind: str, sent: int, fp32: int, default: int) -> None:
        for key, n in (("sent", sent), ("fp32", fp32), ("default", default)):
            self.totals[f"{kind}_{key}"] += n

    def grad(self, mod: ModuleComm, sent: int, fp32: int, default: int) -> None:
        """Count one reduce-scatter of ``mod``: it closes the module's step (its all-gathers so far become ``last_weight``)."""
        with self.lock:
            self._add("grad", sent, fp32, default)
            mod.last_grad = (sent, fp32)
            mod.last_weight, mod.pending_weight = mod.pending_weight, (0, 0)

    def weight(self, mod: ModuleComm, sent: int, fp32: int, default: int) -> None:
        """Count one all-gather of ``mod``'s parameters."""
        with self.lock:
            self._add("weight", sent, fp32, default)
            s, f = mod.pending_weight
            mod.pending_weight = (s + sent, f + fp32)

    def replicate(self, rep: Any, sent: int, fp32: int) -> None:
        """Count one all-reduce across replicas (``rep.last`` keeps it)."""
        with self.lock:
            self.totals["replicate_sent"] += sent
            self.totals["replicate_fp32"] += fp32
            rep.last = (sent, fp32)

    def finite(self, finite: torch.Tensor) -> None:
        """Count a module reduce-scatter whose result was not ``finite`` (a 0-dim bool tensor; no host sync)."""
        with self.lock:
            bad = (~finite).to(torch.int64)
            self.nonfinite = bad if self.nonfinite is None else self.nonfinite.to(bad.device) + bad
