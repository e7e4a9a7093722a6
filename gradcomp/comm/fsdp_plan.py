"""Layouts of FSDP2's flat buffers for the exchange, the per-module record, and the byte counts of :mod:`gradcomp.comm.fsdp`.

* :class:`RowPlan`: where a flat row of FSDP's buffer goes in the block-aligned row the exchange works on;
* :class:`ModuleComm`: one FSDP module's data on one rank (per-parameter residuals, step, cached exchanges, bytes);
* :class:`Ledger`: what the collectives sent, for :meth:`gradcomp.comm.fsdp.FSDPCompressState.stats`;
* :func:`op_scale`: how FSDP's reduce op scales the summed shard.

These are internal to the FSDP2 modules (:mod:`~gradcomp.comm.fsdp`, :mod:`~gradcomp.comm.fsdp_collectives`,
:mod:`~gradcomp.comm.fsdp_replicate`); users meet :class:`~gradcomp.comm.fsdp.FSDPCompressState`.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from gradcomp.codec.formats import WireFormat, wire_format
from gradcomp.comm.buffers import ROUTE_GATHER_RECV, ROUTE_GATHER_SEND, ROUTE_REDUCE_SCATTER, ExchangeBuffers
from gradcomp.comm.plan import ExchangePlan

__all__ = ["FLOAT_DTYPES", "RowPlan", "op_scale", "Entry", "ModuleComm", "Ledger"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the quantized collectives carry

_MAX_PARTIAL_SETS = 64  # index tensors of parameter subsets a module keeps (one int64 per block each)
_MAX_POOLED_SIZES = 2  # sizes of released residual buffers a module keeps for reuse (a row in turn with another)


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
    """Per-module, per-rank data: the residuals, the step, the cached exchanges and the byte counts.

    Parameters are named by their index in FSDP's parameter group (``segments[i]`` is parameter
    ``i``'s length in a row). Error feedback keeps one residual per parameter
    (:meth:`param_residual`: ``P`` rows, each padded to whole blocks). Those of the parameters in
    the last reduce-scatter's row are laid out as that row is, so the exchange reads and writes
    them in place; the others' wait in a full-row buffer until their parameter is in a row again
    (a branch not taken, an expert not routed to, a frozen parameter). When a row holds other
    parameters than the last one, the residuals are moved once (:meth:`_relayout`); a run whose
    rows always hold the same parameters never moves them.

    Args:
        fqn: the module's name in the model; index: its position (in every message header).
        segments: per-parameter lengths of one rank's row (FSDP's padded shards), in FSDP's order;
            empty when FSDP's layout is unknown (the row is then one segment).
        exact: per parameter, whether it is sent unquantized in the weight all-gather (1-D ones).
        params: FSDP's ``FSDPParam`` objects in the same order, by which :meth:`present_of` names
            the parameters a reduce-scatter carries.
    """

    def __init__(self, fqn: str, index: int, segments: Tuple[int, ...], exact: Tuple[bool, ...] = (),
                 params: Sequence[Any] = ()):
        self.fqn = fqn
        self.index = index  # the module's position: in every message header, with the step
        self.segments = tuple(int(n) for n in segments)
        self.exact = exact  # per segment: sent unquantized in the weight all-gather (1-D parameters)
        self.params = tuple(params)  # held, so that their ids stay theirs
        self._param_index = {id(p): i for i, p in enumerate(self.params)}
        self.full: Tuple[int, ...] = tuple(i for i, n in enumerate(self.segments) if n > 0)  # a full row's parameters
        self._exact_index: Dict[Tuple[int, str], Optional[torch.Tensor]] = {}
        self.step = 0
        # error feedback: ``residual`` holds the residuals of the parameters ``layout`` laid out as a row
        # of them is (P rows of their aligned segments); ``home`` (full-row layout) the others'
        self.residual: Optional[torch.Tensor] = None
        self.layout: Tuple[int, ...] = self.full
        self.home: Optional[torch.Tensor] = None
        self._spare: Optional[torch.Tensor] = None  # where the next residual is written (double buffering)
        self._pool: Dict[int, list] = {}  # released buffers by size, for the next relayout
        self._blocks: Dict[Tuple[Tuple[int, ...], int, str], torch.Tensor] = {}
        self.entries: Dict[Tuple[str, Tuple[int, ...], int, WireFormat, str], Entry] = {}
        self.pending_weight: Tuple[int, int] = (0, 0)  # (sent, fp32) of the all-gathers since the last reduce-scatter
        self.last_grad: Tuple[int, int] = (0, 0)
        self.last_weight: Tuple[int, int] = (0, 0)
        self.last_present: Optional[Tuple[int, ...]] = None  # the parameters of the last reduce-scatter (None: unknown)

    # ---- which parameters a reduce-scatter carries

    def present_of(self, fsdp_params: Optional[Sequence[Any]], row: int) -> Optional[Tuple[int, ...]]:
        """Return the indices of the parameters in a reduce-scatter row of ``row`` values, in row order.

        ``fsdp_params`` are the ``FSDPParam`` objects FSDP2 reduces (those with a gradient, in the
        group's order), or None when they could not be read: a row of the full length then holds
        every parameter. Returns None when the row cannot be attributed: an unknown parameter,
        lengths that do not add up, a shorter row of unknown parameters, or an unknown layout.
        """
        if not self.segments:
            return None
        if fsdp_params is None:
            return self.full if row == sum(self.segments) else None
        idx = [self._param_index.get(id(p)) for p in fsdp_params]
        if any(i is None for i in idx) or idx != sorted(set(idx)) or sum(self.segments[i] for i in idx) != row:
            return None
        return tuple(i for i in idx if self.segments[i] > 0)

    def fingerprint(self, present: Optional[Tuple[int, ...]]) -> int:
        """Return 0 for a full row (or an unknown layout), else 1..32767 from the parameters' indices (message headers)."""
        if present is None or present == self.full:
            return 0
        return 1 + zlib.crc32(",".join(map(str, present)).encode()) % 0x7FFF

    def row_segments(self, present: Optional[Tuple[int, ...]]) -> Tuple[int, ...]:
        """Per-parameter lengths of a row holding ``present`` (every segment for None)."""
        return self.segments if present is None else tuple(self.segments[i] for i in present)

    def aligned_of(self, i: int, block_size: int) -> int:
        """Values of parameter ``i`` in one row of the block-aligned layout (its length in whole blocks)."""
        return -(-self.segments[i] // block_size) * block_size

    def full_aligned(self, block_size: int) -> int:
        """Values of a full row in the block-aligned layout (``A``)."""
        return sum(self.aligned_of(i, block_size) for i in self.full)

    def _column_blocks(self, present: Tuple[int, ...], block_size: int, device: torch.device) -> torch.Tensor:
        """Block indices, within a full aligned row, of the parameters ``present``, in order."""
        key = (present, block_size, str(device))
        if key not in self._blocks:
            starts, pos = {}, 0
            for i in self.full:
                starts[i] = pos
                pos += self.aligned_of(i, block_size) // block_size
            parts = [torch.arange(starts[i], starts[i] + self.aligned_of(i, block_size) // block_size) for i in present]
            if len(self._blocks) >= _MAX_PARTIAL_SETS:  # many experts: drop the set built first
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[key] = torch.cat(parts).to(device)
        return self._blocks[key]

    # ---- the per-parameter residuals

    def _take(self, numel: int, device: torch.device) -> torch.Tensor:
        """A fp32 buffer of ``numel`` values (uninitialised): a released one of that size, or a new one."""
        free = self._pool.get(numel)
        if free:
            t = free.pop()
            if t.device == torch.device(device):
                return t
        return torch.empty(numel, dtype=torch.float32, device=device)

    def _release(self, t: Optional[torch.Tensor]) -> None:
        """Keep ``t`` for a later :meth:`_take` of its size (two per size, of the two sizes released last)."""
        if t is None:
            return
        free = self._pool[t.numel()] = self._pool.pop(t.numel(), [])  # the size released last goes last
        if len(free) < 2:
            free.append(t)
        while len(self._pool) > _MAX_POOLED_SIZES:
            self._pool.pop(next(iter(self._pool)))

    def _relayout(self, present: Tuple[int, ...], P: int, B: int, device: torch.device) -> None:
        """Make ``residual`` hold the residuals of ``present``, laid out as a row of them is; park the others in ``home``.

        Values move, none changes: the current layout's residuals go back to the full-row ``home``
        (no copy when the current layout is the full row: that buffer becomes the home), and the
        new layout's are gathered from it (no copy when it is the full row). 2 passes over each
        moved parameter's residual (read and write), only when the set of parameters changes.
        """
        numel = P * sum(self.aligned_of(i, B) for i in present)
        self._release(self._spare)
        self._spare = None
        if self.residual is None:  # the first compressed reduce-scatter: every residual is zero
            self.residual, self.layout = self._take(numel, device).zero_(), present
            return
        if self.layout == self.full:
            home = self.residual
        else:
            home = self.home
            if home is None:
                home = torch.zeros(P * self.full_aligned(B), dtype=torch.float32, device=device)
            home.view(P, -1, B).index_copy_(1, self._column_blocks(self.layout, B, device), self.residual.view(P, -1, B))
            self._release(self.residual)
        if present == self.full:
            self.residual, self.home = home, None
        else:
            self.residual, self.home = self._take(numel, device), home
            torch.index_select(home.view(P, -1, B), 1, self._column_blocks(present, B, device), out=self.residual.view(P, -1, B))
        self.layout = present

    def param_residual(self, i: int, world_size: int, block_size: int) -> Optional[torch.Tensor]:
        """Parameter ``i``'s residual as a ``(P, aligned)`` tensor (a view where it can), or None before the first one.

        Row ``k`` is this rank's residual of the parameter's shard ``k``, zero-padded to whole blocks.
        """
        if self.residual is None or i not in self.full or not self.segments:
            return None
        P, B = world_size, block_size

        def column(buf: torch.Tensor, order: Tuple[int, ...]) -> torch.Tensor:
            start = sum(self.aligned_of(j, B) for j in order[: order.index(i)])
            return buf.view(P, -1)[:, start : start + self.aligned_of(i, B)]

        if i in self.layout:
            return column(self.residual, self.layout)
        if self.home is not None:
            return column(self.home, self.full)
        return torch.zeros(P, self.aligned_of(i, B), dtype=torch.float32, device=self.residual.device)

    def residuals(self, plan: ExchangePlan, device: torch.device, present: Optional[Tuple[int, ...]] = None,
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(residual, spare)`` for the exchange ``plan`` of a row holding ``present`` (default: every parameter).

        ``residual`` holds the residuals of exactly those parameters, laid out as ``plan`` lays the
        row (``P`` rows of their aligned segments), zeros at first; ``spare`` is where the new ones
        are written (:meth:`commit_residual` swaps them). Both persist. The residuals stay in the
        layout of the last row until a row of other parameters comes (:meth:`_relayout`); those
        of parameters not in the row are kept as they are.
        """
        numel = plan.padded_numel
        if not self.segments:  # FSDP's layout unknown: one residual of the row, kept while its length stays
            if self.residual is None or self.residual.numel() != numel:
                self.residual, self._spare = torch.zeros(numel, dtype=torch.float32, device=device), None
        else:
            if self.residual is not None and self.residual.device != torch.device(device):
                self.residual = self.residual.to(device)
                self.home = None if self.home is None else self.home.to(device)
                self._spare, self._pool = None, {}
            present = self.full if present is None else present
            if self.layout != present or self.residual is None:
                self._relayout(present, plan.world_size, plan.block_size, device)
            if self.residual.numel() != numel:
                raise AssertionError(f"internal error: residual of {self.residual.numel()} values for a plan of {numel}")
        if self._spare is None or self._spare.numel() != numel or self._spare.device != self.residual.device:
            self._spare = self._take(numel, self.residual.device)
        return self.residual, self._spare

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

    def residual_state(self, block_size: int) -> Union[Dict[int, torch.Tensor], torch.Tensor, None]:
        """Return the residuals for a checkpoint: ``{parameter index: (P, aligned) CPU tensor}``, copies.

        None before the first compressed reduce-scatter; the module residual itself (1-D) when
        FSDP's layout is unknown.
        """
        if self.residual is None:
            return None
        if not self.segments:
            return self.residual.detach().cpu().clone()
        P = self.residual.numel() // sum(self.aligned_of(i, block_size) for i in self.layout)
        return {i: self.param_residual(i, P, block_size).detach().cpu().clone() for i in self.full}

    def check_residual_state(self, value: Any, block_size: int) -> Union[Dict[int, torch.Tensor], torch.Tensor]:
        """Validate what :meth:`residual_state` returned (for this module's layout) and return it; change nothing.

        Also takes the earlier checkpoint form, the module residual as one 1-D tensor of the full row's
        layout, and returns it per parameter.

        Raises:
            ValueError: a parameter index this module does not have, a tensor that is not fp32, of
                another shape, with another number of rows than its siblings, or non-finite.
        """
        what = f"residual of FSDP module {self.fqn or '<root>'!r}"
        A = self.full_aligned(block_size)
        if isinstance(value, torch.Tensor) and value.dim() == 1 and self.segments:
            if value.dtype != torch.float32 or not A or value.numel() % A:
                raise ValueError(
                    f"{what} must be per parameter (a dict) or one float32 tensor of P x {A} values (the full "
                    f"row's layout), got {value.dtype} of {value.numel()} values"
                )
            P, start, per = value.numel() // A, 0, {}
            for i in self.full:
                n = self.aligned_of(i, block_size)
                per[i] = value.view(P, A)[:, start : start + n]
                start += n
            value = per
        if not self.segments:
            if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or value.dim() != 1:
                raise ValueError(f"{what} must be a 1-D float32 tensor, got {type(value).__name__} {getattr(value, 'dtype', '')}")
            tensors = {0: value}
        else:
            if not isinstance(value, dict):
                raise ValueError(f"{what} must be a dict of per-parameter tensors, got {type(value).__name__}")
            tensors = {}
            for i, t in value.items():
                if isinstance(i, bool) or not isinstance(i, int) or i not in self.full:
                    raise ValueError(f"{what}: parameter index {i!r} is not one of this module's {list(self.full)}")
                want = self.aligned_of(i, block_size)
                if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != want:
                    raise ValueError(
                        f"{what}, parameter {i}: expected a float32 tensor of shape (P, {want}), got "
                        f"{type(t).__name__} {getattr(t, 'dtype', '')} {tuple(getattr(t, 'shape', ()))}"
                    )
                tensors[i] = t
            rows = {t.shape[0] for t in tensors.values()}
            if len(rows) > 1:
                raise ValueError(f"{what}: the parameters' residuals have different numbers of rows {sorted(rows)}")
        for i, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{what}, parameter {i}: holds non-finite values (a corrupted checkpoint?)")
        return value if not self.segments else tensors

    def load_residuals(self, value: Union[Dict[int, torch.Tensor], torch.Tensor, None], block_size: int) -> None:
        """Set the residuals from what :meth:`check_residual_state` returned (zeros for a parameter not given)."""
        self._spare, self.home, self._pool = None, None, {}
        self.layout = self.full
        if value is None or isinstance(value, torch.Tensor):
            self.residual = None if value is None else value.detach().clone()
            return
        if not value:
            self.residual = None
            return
        P = next(iter(value.values())).shape[0]
        res = torch.zeros(P, self.full_aligned(block_size), dtype=torch.float32)
        start = 0
        for i in self.full:
            n = self.aligned_of(i, block_size)
            if i in value:
                res[:, start : start + n] = value[i]
            start += n
        self.residual = res.view(-1)

    # ---- the cached exchanges

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

    def entry(self, kind: str, row: int, world_size: int, fmt: Union[WireFormat, str, int], block_size: int,
              device: torch.device, present: Optional[Tuple[int, ...]] = None) -> Entry:
        """Return the plan and buffers of a reduce-scatter (``"rs"``) or all-gather (``"ag"``) in format ``fmt``, built once.

        ``present``: the parameters the row holds (default: every one); the plan depends only on their lengths.
        """
        fmt = wire_format(fmt)
        segments = self.row_segments(present)
        key = (kind, segments if sum(segments) == row else (row,), world_size, fmt, str(device))
        e = self.entries.get(key)
        if e is not None:
            return e
        rp = RowPlan.build(row, segments, block_size)
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
