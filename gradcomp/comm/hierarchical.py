"""Hierarchical quantized all-reduce: full precision inside a node, the quantized exchange between nodes.

On ``M`` nodes of ``L`` ranks (``P = M L``), for a flat fp32 tensor already padded to
``padded_numel = L * M * shard`` elements (``shard`` a whole number of blocks; the same padding as the
flat exchange's :class:`~gradcomp.comm.plan.ShardLayout` on ``P`` ranks):

1. Inside each node, an fp32 reduce-scatter (sum) over the fast local links: local rank ``l`` gets
   chunk ``l`` (``M * shard`` elements) summed over its node in local-rank order, and divides it by
   ``L`` (:func:`node_reduce_scatter`: an all-to-all and an ordered sum, so that the result does not
   depend on where DDP's bucketing puts a parameter).
2. Across nodes, the ``M`` ranks with the same local rank run the two-phase quantized exchange
   (the steps of :mod:`gradcomp.comm.exchange`) on their chunk, on a group of their own,
   with error feedback at both quantization points. Its mean over the ``M`` nodes is the mean over
   all ``P`` ranks.
3. Inside each node, an all-gather of the reduced chunks as they arrived from the other nodes
   (codes and scales, not fp32: ``bits/32`` of the bytes), and every rank dequantizes them all.

Quantization error comes only from step 2, i.e. from the slow links. Each node's NIC carries the
``L`` inter-node exchanges of ``1/L`` of the tensor each, so the node sends
``2 (M-1) * M shard (bits/8 + 4/B) ~= 2 (M-1)/M N (bits/8 + 4/B)`` bytes, where the flat exchange on
``P`` ranks makes it send ``2 L (P-L) s ~= 2 L (P-L)/P N (bits/8 + 4/B)``: ``L`` times more
(2x at ``L = 2``, 3x at ``L = 3``).

Worked example, ``N = 1e6`` elements, ``M = 2`` nodes of ``L = 2``, int8, ``B = 256``:
3907 blocks, 977 blocks per shard (``shard = 250112``), chunk ``500224``; each rank sends
``2 * 1 * (250112 + 4 * 977 + 16) = 508072`` bytes to the other node (16 of them a header) and each
node ``1016144``; the flat exchange would make each node send about ``2 * 2 * 2 * 254036``, twice as much.

Every rank ends bit-identical: a chunk is reduced once, by its owner, and the owners' results travel
as bytes. A non-finite value on any rank makes its chunk non-finite, then the whole output on every
rank, so ``finite`` is the same everywhere.

Layout of residuals (the hook keeps them per bucket): the worker residual of rank ``(m, l)`` covers
chunk ``l`` of node ``m``'s sum (``M * shard`` elements); the server residual covers inter-node shard
``m`` of chunk ``l``, i.e. elements ``[(l M + m) shard, (l M + m + 1) shard)`` of the padded tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import torch
import torch.distributed as dist

from gradcomp.codec import kernels
from gradcomp.codec.formats import WireFormat, wire_format
from gradcomp.comm import exchange
from gradcomp.comm.collectives import ExchangeResult
from gradcomp.comm.exchange import all_gather_into
from gradcomp.comm.buffers import ExchangeBuffers
from gradcomp.comm.plan import ExchangePlan, ShardLayout
from gradcomp.comm.topology import Topology

__all__ = ["HierarchicalLayout", "HierarchicalGroups", "hierarchical_allreduce", "node_reduce_scatter"]


def node_reduce_scatter(x: torch.Tensor, chunk: int, group) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group`` and return this rank's ``chunk`` elements of the sum.

    An all-to-all of the chunks, then a sum in rank order ``0..L-1``. The backends' reduce-scatter
    (gloo has one) adds the copies of a chunk in an order that depends on the chunk's place in the
    ring; with 3 or more ranks, fp32 addition not being associative, a parameter that moves to
    another chunk (DDP rebuilds its buckets, also on resume) would be summed differently and a
    resumed run would not be bit-identical. The bytes are the same as a ring reduce-scatter's:
    ``(L-1) * chunk * 4`` per rank.

    Args:
        x: contiguous tensor of ``group size * chunk`` elements.
        chunk: elements of each rank's slice.
        group: the node's process group.

    Returns:
        A new tensor of ``chunk`` elements: ``sum_r x_r[rank * chunk : (rank + 1) * chunk]``.
    """
    L = dist.get_world_size(group)
    if x.numel() != L * chunk:
        raise ValueError(f"x must have group size * chunk = {L * chunk} elements, got {x.numel()}")
    recv = torch.empty_like(x)
    dist.all_to_all_single(recv, x, group=group)
    parts = recv.view(L, chunk)
    out = parts[0].clone()
    for r in range(1, L):  # L additions of whole chunks, in a fixed order
        out.add_(parts[r])
    return out


@dataclass(frozen=True)
class HierarchicalLayout:
    """Sizes of the hierarchical exchange of ``numel`` elements on ``nodes`` x ``local_size`` ranks.

    Example: ``HierarchicalLayout(1000, nodes=2, local_size=2, bits=8, block_size=256)`` has 4 blocks,
    one block per shard: ``shard_numel = 256``, ``chunk_numel = 512``, ``padded_numel = 1024``; the
    inter-node exchange is ``ShardLayout(512, 2, 8, 256)`` and each rank sends it
    ``2 * 1 * (256 + 4 + 16) = 552`` bytes (codes, scales, header), plus ``1 * 512 * 4 = 2048`` fp32
    bytes (reduce-scatter) and ``1 * 2 * 276 = 552`` message bytes (all-gather) inside the node.
    """

    numel: int
    nodes: int
    local_size: int
    bits: Union[int, str]
    block_size: int

    def __post_init__(self) -> None:
        for name in ("numel", "nodes", "local_size", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        object.__setattr__(self, "bits", wire_format(self.bits, "bits").short)

    @property
    def format(self) -> WireFormat:
        """The :class:`~gradcomp.codec.formats.WireFormat` of the inter-node exchange."""
        return wire_format(self.bits)

    @property
    def flat(self) -> ShardLayout:
        """The flat exchange's layout on all ``nodes * local_size`` ranks (same padding)."""
        return ShardLayout(self.numel, self.nodes * self.local_size, self.bits, self.block_size)

    @property
    def shard_numel(self) -> int:
        """Elements of one inter-node shard."""
        return self.flat.shard_numel

    @property
    def chunk_numel(self) -> int:
        """Elements of the chunk each local rank reduces across nodes, ``nodes * shard_numel``."""
        return self.nodes * self.shard_numel

    @property
    def padded_numel(self) -> int:
        """Elements of the padded tensor, ``local_size * chunk_numel``."""
        return self.local_size * self.chunk_numel

    @property
    def inter(self) -> ShardLayout:
        """The two-phase exchange of one chunk among the ``nodes`` ranks of equal local rank."""
        return ShardLayout(self.chunk_numel, self.nodes, self.bits, self.block_size)

    @property
    def inter_message_bytes(self) -> int:
        """Bytes of one inter-node message: codes, scales and the 16-byte header, as the format lays them out."""
        return self.inter.framed_message_bytes

    @property
    def inter_bytes_sent(self) -> int:
        """Bytes each rank sends to other nodes: ``2 (M - 1)`` messages."""
        return 2 * (self.nodes - 1) * self.inter_message_bytes if self.nodes > 1 else 0

    @property
    def intra_bytes_sent(self) -> int:
        """Bytes each rank sends inside its node: the fp32 reduce-scatter, then the all-gather of the
        reduced chunks as codes (fp32 when there is a single node and nothing is quantized)."""
        rs = (self.local_size - 1) * self.chunk_numel * 4
        if self.nodes == 1:
            return 2 * rs
        return rs + (self.local_size - 1) * self.nodes * self.inter_message_bytes

    def server_offset(self, node: int, local_rank: int) -> int:
        """Start of the server shard of rank ``(node, local_rank)`` in the padded tensor."""
        return (local_rank * self.nodes + node) * self.shard_numel


class HierarchicalGroups:
    """The process groups of the hierarchical exchange, created once (a collective call on every rank).

    Attributes:
        topology: the :class:`Topology`.
        node, local_rank, nodes, local_size: where this rank is, and the sizes.
        intra: this rank's node group (``local_size`` ranks) or None when ``local_size == 1``.
        inter: the group of this rank's local slot across nodes (``nodes`` ranks) or None when ``nodes == 1``.

    Args:
        topology: ranks per node.
        group_ranks: global ranks of the process group the exchange averages over, in group order
            (``dist.get_process_group_ranks(pg)``); group rank ``g`` runs on node ``g // L``.
        rank: this rank's index in ``group_ranks``.
        backend: the backend of the new groups (that of the parent group).
        timeout: of the new groups' collectives (a ``timedelta``; None: torch's default).
    """

    def __init__(self, topology: Topology, group_ranks: List[int], rank: int, backend=None, timeout=None):
        if not isinstance(topology, Topology):
            raise TypeError(f"topology must be a gradcomp Topology, got {type(topology).__name__}")
        world = len(group_ranks)
        self.topology = topology
        self.nodes = topology.num_nodes(world)
        self.local_size = topology.local_world_size
        self.node = topology.node_of(rank)
        self.local_rank = topology.local_rank(rank)
        # every rank creates every group in the same order: new_group is collective over the parent
        self.intra = self._mine([[group_ranks[g] for g in grp] for grp in topology.node_groups(world)], self.node, backend, timeout)
        self.inter = self._mine([[group_ranks[g] for g in grp] for grp in topology.cross_groups(world)], self.local_rank, backend, timeout)

    @staticmethod
    def _mine(groups: List[List[int]], mine: int, backend, timeout):
        if len(groups[0]) == 1:
            return None
        made = [dist.new_group(ranks=g, backend=backend, timeout=timeout) for g in groups]
        return made[mine]

    def layout(self, numel: int, bits, block_size: int) -> HierarchicalLayout:
        """Return the :class:`HierarchicalLayout` of ``numel`` elements on these groups."""
        return HierarchicalLayout(numel, self.nodes, self.local_size, bits, block_size)


def hierarchical_allreduce(
    x: torch.Tensor,
    layout: HierarchicalLayout,
    groups: HierarchicalGroups,
    *,
    worker_residual: Optional[torch.Tensor] = None,
    server_residual: Optional[torch.Tensor] = None,
    error_feedback: bool = True,
    noise: Optional[Callable[[int, tuple], torch.Tensor]] = None,
    measure_error: bool = False,
    fused: bool = True,
) -> ExchangeResult:
    """Average ``x`` over every rank: fp32 inside nodes, the two-phase quantized exchange between them.

    Args:
        x: fp32 contiguous tensor of ``layout.padded_numel`` elements (zero padding included).
        layout: the sizes; ``layout.nodes`` and ``layout.local_size`` must match ``groups``.
        groups: the :class:`HierarchicalGroups` made once for this job.
        worker_residual: fp32 ``(chunk_numel,)`` residual of this rank's chunk (zeros if None).
        server_residual: fp32 ``(shard_numel,)`` residual of this rank's inter-node shard (zeros if None).
        error_feedback: return the new residuals (else they are None).
        noise: ``noise(phase, shape)`` gives ``U[0, 1)`` noise for stochastic rounding of the chunk
            (phase 0, shape ``(chunk_numel / B, B)``) and of the owned shard (phase 1).
        measure_error: compute ``rel_error`` of this rank's chunk quantization.
        fused: run the fused codec kernels (bit-identical to the eager reference).

    Returns:
        An :class:`~gradcomp.comm.collectives.ExchangeResult`: ``out`` has ``padded_numel`` elements,
        identical on every rank; ``bytes_sent`` counts inter- and intra-node bytes of this rank;
        residuals are returned, not updated in place.
    """
    if (layout.nodes, layout.local_size) != (groups.nodes, groups.local_size):
        raise ValueError(
            f"layout is for {layout.nodes} nodes x {layout.local_size} ranks, the groups are "
            f"{groups.nodes} x {groups.local_size}"
        )
    if x.numel() != layout.padded_numel or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(
            f"x must be a contiguous fp32 tensor of padded_numel={layout.padded_numel} elements, "
            f"got {x.dtype} with {x.numel()} elements"
        )
    L, chunk = layout.local_size, layout.chunk_numel
    # 1. full-precision reduce-scatter over the fast local links, summed in local-rank order
    if groups.intra is not None:
        mine = node_reduce_scatter(x, chunk, groups.intra)
        mine.div_(L)
    else:
        mine = x
    if groups.inter is not None:
        # 2. the quantized exchange across nodes, among the ranks owning the same chunk
        plan = ExchangePlan.build((chunk,), layout.nodes, layout.format, layout.block_size, chunk_numel=None)
        bufs = ExchangeBuffers.allocate(plan, x.device)
        wres = sres = None
        if error_feedback:
            w_in = torch.zeros(chunk, device=x.device) if worker_residual is None else worker_residual.reshape(-1)
            s_in = torch.zeros(plan.server_numel, device=x.device) if server_residual is None else server_residual.reshape(-1)
            wres, sres = torch.empty_like(w_in), torch.empty_like(s_in)
        else:
            w_in = s_in = None
        B = layout.block_size
        n0 = noise(0, (chunk // B, B)).reshape(-1) if noise is not None else None
        n1 = noise(1, (plan.server_numel // B, B)).reshape(-1) if noise is not None else None
        exchange.allreduce(
            plan, bufs, mine, groups.inter, residual=w_in, residual_out=wres, server_residual=s_in,
            server_residual_out=sres, noise=n0, server_noise=n1, fused=fused, keep_messages=True,
        )
        rel = None
        if measure_error and error_feedback:
            x = kernels.rotate_blocks(mine.view(-1, layout.block_size)).view(-1) if layout.format.rotate else mine
            denom = float((x + w_in).norm())  # the residual lives in the rotated space of a rotated format
            rel = float(wres.norm()) / denom if denom > 0 else 0.0
        # 3. share the reduced chunks inside the node as messages; chunk l's M shards land at l*M..l*M+M-1,
        # i.e. in the padded order, and every rank dequantizes the same bytes with the same kernel
        msgs = bufs.gathered[0]
        if groups.intra is not None:
            node_msgs = torch.empty(L * msgs.numel(), dtype=torch.uint8, device=x.device)
            all_gather_into(node_msgs, msgs, groups.intra)
        else:
            node_msgs = msgs
        out = torch.empty(layout.padded_numel, dtype=torch.float32, device=x.device)
        per = msgs.numel()
        finite_t = torch.ones((), dtype=torch.bool, device=x.device)
        for l in range(L):
            # a non-finite value anywhere made its block's scale non-finite, and every rank has every scale
            finite_t &= exchange.decode(plan, bufs, 0, out[l * chunk : (l + 1) * chunk], gathered=node_msgs[l * per : (l + 1) * per], fused=fused)
        finite = bool(finite_t)
    else:  # one node: nothing crosses a slow link, nothing is quantized
        wres, sres, rel = None, None, None
        if error_feedback:
            wres = torch.zeros(chunk, dtype=torch.float32, device=x.device)
            sres = torch.zeros(layout.shard_numel, dtype=torch.float32, device=x.device)
        if groups.intra is not None:
            out = torch.empty(layout.padded_numel, dtype=torch.float32, device=x.device)
            all_gather_into(out, mine.contiguous(), groups.intra)
        else:
            out = mine
        finite = bool(torch.isfinite(out).all())
    return ExchangeResult(
        out=out,
        worker_residual=wres,
        server_residual=sres,
        finite=finite,
        bytes_sent=layout.inter_bytes_sent + layout.intra_bytes_sent,
        rel_error=rel,
    )
