"""How a compressed bucket crosses the hook's group: the flat route or the hierarchical one.

The hook chooses a route once, when its groups are made (a topology means hierarchical), and from then
on asks it, per bucket: the exchange plan, where this rank's residuals and noise sit in the plan's
aligned layout (:class:`Slices`), how to gather residuals when DDP regroups its buckets, and to run
the bucket's exchange. Both routes call the same exchange steps (:mod:`gradcomp.comm.exchange`).

* :class:`FlatRoute`: the two-phase exchange over every rank, cut into chunks that a fixed-lag
  pipeline of async collectives overlaps with the codec (:mod:`gradcomp.comm.pipeline`); the bucket
  completes when its last chunk is decoded.
* :class:`HierarchicalRoute`: fp32 inside each node, the two-phase exchange only between nodes
  (:mod:`gradcomp.comm.hierarchical`); blocking, one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from gradcomp.codec import kernels
from gradcomp.comm import exchange
from gradcomp.comm.buffers import ExchangeBuffers
from gradcomp.comm.exchange import all_gather_into
from gradcomp.comm.plan import ExchangePlan
from gradcomp.comm.hierarchical import HierarchicalGroups, hierarchical_allreduce
from gradcomp.comm.pipeline import ChunkJob, ChunkPipeline

__all__ = ["Slices", "FlatRoute", "HierarchicalRoute", "chunk_job"]

Keys = Tuple[int, ...]
#: ``done(finite, rel_error, bytes_sent, intra_node_bytes)``, called once a bucket's exchange ended
Done = Callable[[bool, Optional[float], int, int], None]


@dataclass(frozen=True)
class Slices:
    """Where this rank's residuals and noise sit in a plan's aligned layout.

    Attributes:
        worker: ``(start, length)`` of the worker residual (flat: the whole padded bucket; hierarchical:
            this rank's chunk of its node's sum, which it quantizes on the node's behalf).
        server: ``(start, length)`` of the server residual in the aligned layout (hierarchical), or None
            where the owned shards are not contiguous there (flat: shard ``rank`` of every chunk,
            cut with :meth:`ExchangePlan.server_of`).
        owner: who draws phase-0 noise: the rank (flat) or the node (hierarchical).
        rank: this rank, for the flat cut.
    """

    worker: Tuple[int, int]
    server: Optional[Tuple[int, int]]
    owner: int
    rank: int

    def noise(self, plan: ExchangePlan, seed: int, step: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stochastic-rounding noise of both phases, laid out like the worker and the server residual.

        Drawn per parameter (:func:`~gradcomp.comm.exchange.param_noise`), so it does not depend on
        DDP's bucketing. Phase 0 (the rank's own gradient; hierarchical: its node's chunk) is seeded
        with :attr:`owner`; phase 1 (the reduced shards) is not, since whichever rank owns a block
        must draw the same noise for it.
        """
        w0, wn = self.worker
        n0 = exchange.param_noise(plan, seed, self.owner, step, 0, device)[w0 : w0 + wn]
        return n0, self.server_of(plan, exchange.param_noise(plan, seed, -1, step, 1, device))

    def server_of(self, plan: ExchangePlan, aligned: torch.Tensor) -> torch.Tensor:
        """Cut this rank's server part out of an aligned ``(padded_numel,)`` tensor (a new tensor)."""
        if self.server is None:
            return plan.server_of(aligned, self.rank)
        s0, sn = self.server
        return aligned[s0 : s0 + sn].clone()


def chunk_job(plan: ExchangePlan, bufs: ExchangeBuffers, c: int, bucket: torch.Tensor, residuals, noise, header, fused: bool,
              before_encode=None, decoded=None) -> ChunkJob:
    """Chunk ``c`` of ``bucket``'s exchange as the pipeline runs it: encode, check and reduce, check and decode.

    The one job builder of the step and of the policy's probe. ``residuals`` is ``(worker in,
    server in, worker out, server out)`` (None each without error feedback), ``noise`` the two
    phases' stochastic rounding noise (None each), ``header`` the messages' ``(step, bucket)``,
    ``fused`` whether the fused kernels run; ``before_encode(c)`` runs before the encode and
    ``decoded(finite)`` after the decode, with whether the chunk's values were all finite.
    """
    w_in, s_in, w_out, s_out = residuals
    n0, n1 = noise
    step, index = header

    def enc() -> None:
        if before_encode is not None:
            before_encode(c)
        exchange.encode(plan, bufs, c, bucket, residual=w_in, residual_out=w_out, noise=n0, header=header, fused=fused)

    def red() -> torch.Tensor:
        exchange.check_header(plan, c, bufs.recv[c], step, index)
        return exchange.reduce_shard(plan, bufs, c, residual=s_in, residual_out=s_out, noise=n1, header=header, fused=fused)

    def dec() -> None:
        exchange.check_header(plan, c, bufs.gathered[c], step, index, "all-gather")
        finite = exchange.decode(plan, bufs, c, bucket, fused=fused)
        if decoded is not None:
            decoded(finite)

    return ChunkJob(enc, bufs.send[c], bufs.recv[c], red, bufs.gathered[c], dec)


class FlatRoute:
    """The chunked, pipelined two-phase exchange over every rank of ``group`` (see the module docstring).

    Args:
        group: the hook's own process group.
        world_size, rank: its size and this rank.
        block_size: values per scale.
        chunk_numel: values per chunk of the pipeline.
    """

    hierarchical = False
    what = "quantized exchange (chunked all-to-all, then all-gather)"

    def __init__(self, group, world_size: int, rank: int, block_size: int, chunk_numel: int):
        self.group, self.world_size, self.rank = group, world_size, rank
        self.block_size, self.chunk_numel = block_size, chunk_numel
        self._buffers: Dict[int, ExchangeBuffers] = {}  # persistent message buffers, by bucket index
        self._pipe: Optional[ChunkPipeline] = None

    def plan(self, keys: Keys, numels: Keys, fmt) -> ExchangePlan:
        """The exchange plan of a bucket of these parameters."""
        return ExchangePlan.build(numels, self.world_size, fmt, self.block_size, self.chunk_numel, keys=keys)

    def slices(self, plan: ExchangePlan) -> Slices:
        """This rank's residuals: the whole padded bucket (worker) and shard ``rank`` of every chunk (server)."""
        return Slices((0, plan.padded_numel), None, self.rank, self.rank)

    def gather_residuals(self, plan: ExchangePlan, wres: torch.Tensor, sres: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The bucket's whole worker and server residuals in the aligned layout (collective: the server shards)."""
        full = torch.empty(self.world_size * sres.numel(), dtype=torch.float32, device=sres.device)
        all_gather_into(full, sres.contiguous(), self.group)
        return wres, plan.server_to_aligned(full.view(self.world_size, -1))

    def run(self, buf: torch.Tensor, index: int, step: int, plan: ExchangePlan, residuals, noise, fused: bool,
            measure: bool, done: Done) -> None:
        """Push every chunk of the bucket into the pipeline; ``done`` is called when the last one is decoded."""
        bufs = self._buffers.get(index)
        if bufs is None or bufs.plan is not plan or bufs.send[0].device != buf.device:
            bufs = self._buffers[index] = ExchangeBuffers.allocate(plan, buf.device)
        w_in, w_out = residuals[0], residuals[2]
        left = [len(plan.chunks)]
        finite = [torch.ones((), dtype=torch.bool, device=buf.device)]
        denom = [0.0]
        if self._pipe is None:
            self._pipe = ChunkPipeline(self.group)

        def before_encode(c: int) -> None:
            if measure and c == 0:  # before any chunk of this bucket is decoded into it
                x = plan.to_aligned(buf)
                if plan.format.rotate:  # the residual lives in the rotated space
                    x = kernels.rotate_blocks(x.view(-1, plan.block_size)).view(-1)
                denom[0] = float((x + w_in).norm())

        def decoded(chunk_finite: torch.Tensor) -> None:
            finite[0] &= chunk_finite
            left[0] -= 1
            if left[0] == 0:
                rel = (float(w_out.norm()) / denom[0] if denom[0] > 0 else 0.0) if measure else None
                done(bool(finite[0]), rel, plan.bytes_sent, 0)

        for c in range(len(plan.chunks)):
            self._pipe.push(chunk_job(plan, bufs, c, buf, residuals, noise, (step, index), fused, before_encode, decoded))

    def flush(self) -> None:
        """Finish every chunk in flight, in order."""
        if self._pipe is not None:
            self._pipe.flush()

    def abort(self) -> None:
        """Forget the chunks in flight (after an error)."""
        if self._pipe is not None:
            self._pipe.abort()

    def reset(self) -> None:
        """Drop the buffers and the pipeline (a new layout, a load, a pickle)."""
        self._buffers, self._pipe = {}, None

    def probe(self, fmt, x: torch.Tensor, fused: bool, held: Dict) -> None:
        """Do what a bucket ``x`` costs the hook with ``fmt``: its whole exchange with error feedback, as a step runs it.

        The chunks go through a pipeline of their own with persistent buffers (kept in ``held``
        across the timed calls, as the hook keeps them per bucket) and double-buffered residuals,
        decoded straight into the bucket.
        """
        key = (str(fmt), x.numel(), x.device)
        if key not in held:
            plan = ExchangePlan.build((x.numel(),), self.world_size, fmt, self.block_size, self.chunk_numel)
            z = lambda n: torch.zeros(n, device=x.device)  # noqa: E731
            held[key] = (plan, ExchangeBuffers.allocate(plan, x.device), z(plan.padded_numel), z(plan.padded_numel),
                         z(plan.server_numel), z(plan.server_numel), x.clone())
        # the bucket is decoded into in place, as DDP's is; the next call encodes the mean (same work)
        plan, bufs, w_in, w_out, s_in, s_out, bucket = held[key]
        pipe = ChunkPipeline(self.group)
        for c in range(len(plan.chunks)):
            pipe.push(chunk_job(plan, bufs, c, bucket, (w_in, s_in, w_out, s_out), (None, None), (0, 0), fused))
        pipe.flush()


class HierarchicalRoute:
    """fp32 inside each node, the quantized two-phase exchange between nodes; blocking (see the module docstring).

    Args:
        groups: the :class:`HierarchicalGroups` (intra- and inter-node groups).
        group: the hook's own group over every rank (for gathering residuals).
        world_size, rank: its size and this rank.
        block_size: values per scale.
    """

    hierarchical = True
    what = "hierarchical exchange"

    def __init__(self, groups: HierarchicalGroups, group, world_size: int, rank: int, block_size: int):
        self.groups, self.group, self.world_size, self.rank = groups, group, world_size, rank
        self.block_size = block_size
        self.chunk_numel = None  # the hierarchical exchange cuts no chunks

    def plan(self, keys: Keys, numels: Keys, fmt) -> ExchangePlan:
        """The exchange plan of a bucket of these parameters (one chunk)."""
        return ExchangePlan.build(numels, self.world_size, fmt, self.block_size, None, keys=keys)

    def slices(self, plan: ExchangePlan) -> Slices:
        """This rank's chunk of its node's sum (worker) and its inter-node shard ``local_rank * nodes + node`` (server)."""
        h, shard = self.groups, plan.layout.shard_numel
        chunk = h.nodes * shard
        return Slices((h.local_rank * chunk, chunk), ((h.local_rank * h.nodes + h.node) * shard, shard), h.node, self.rank)

    def gather_residuals(self, plan: ExchangePlan, wres: torch.Tensor, sres: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The bucket's whole residuals in the aligned layout: the node's worker parts and every server shard.

        The server shards arrive in rank order ``node * L + l`` and go back to their places ``l * nodes + node``.
        """
        h = self.groups
        full = torch.empty(self.world_size * sres.numel(), dtype=torch.float32, device=sres.device)
        all_gather_into(full, sres.contiguous(), self.group)
        full = full.view(h.nodes, h.local_size, -1).transpose(0, 1).reshape(-1)
        if h.intra is not None:
            node_wres = torch.empty(plan.layout.padded_numel, dtype=torch.float32, device=wres.device)
            all_gather_into(node_wres, wres.contiguous(), h.intra)
            wres = node_wres
        return wres, full

    def run(self, buf: torch.Tensor, index: int, step: int, plan: ExchangePlan, residuals, noise, fused: bool,
            measure: bool, done: Done) -> None:
        """Run the bucket's whole hierarchical exchange now (blocking), then call ``done``."""
        w_in, s_in, w_out, s_out = residuals
        n0, n1 = noise
        layout = plan.layout
        hlayout = self.groups.layout(layout.numel, plan.format, layout.block_size)
        nz = None if n0 is None else (lambda phase, shape: (n0 if phase == 0 else n1).view(shape))
        result = hierarchical_allreduce(
            plan.to_aligned(buf), hlayout, self.groups, worker_residual=w_in, server_residual=s_in,
            error_feedback=w_in is not None, noise=nz, measure_error=measure and w_in is not None, fused=fused,
        )
        plan.from_aligned(result.out, buf)
        if w_in is not None:
            w_out.copy_(result.worker_residual)
            s_out.copy_(result.server_residual)
        done(result.finite, result.rel_error, result.bytes_sent, hlayout.intra_bytes_sent)

    def flush(self) -> None:
        """Nothing is in flight: every exchange blocks."""

    def abort(self) -> None:
        """Nothing is in flight: every exchange blocks."""

    def reset(self) -> None:
        """Nothing is kept between buckets."""

    def probe(self, fmt, x: torch.Tensor, fused: bool, held: Dict) -> None:
        """Do what a bucket ``x`` costs the hook with ``fmt``: the blocking hierarchical exchange it runs."""
        plan = ExchangePlan.build((x.numel(),), self.world_size, fmt, self.block_size, chunk_numel=None)
        res = hierarchical_allreduce(plan.to_aligned(x), self.groups.layout(x.numel(), plan.format, self.block_size), self.groups, fused=fused)
        torch.empty_like(x).copy_(res.out[: x.numel()])

