"""The alpha-beta model of the collectives: time and bytes of one gradient all-reduce, per scheme.

Every scheme is described with the latency-bandwidth (alpha-beta) model: sending a message of
``m`` bytes over a link costs ``alpha + m / beta``. A step's communication time is

    total = latency + compute + intra + wire_bytes / bandwidth

where ``latency`` counts the sequential message steps times ``alpha``, ``compute`` is the
quantization work at a measured or given codec throughput, ``intra`` is traffic over the fast
intra-node links (hierarchical schemes), and ``wire_bytes`` is what the busiest port of the main
link (a node's NIC) sends in one direction.

Schemes (``P`` workers on ``M`` nodes, ``L = P / M`` workers per node, ``N`` parameters):

==================  ==========================================================================
``ring-fp32/bf16``  ring all-reduce: ``2 (P-1)`` steps, ``2 (P-1)/P N b`` bytes per rank
``tree-fp32``       double binary tree all-reduce (NCCL): ``2 log2 M`` steps, ``2 N b`` per port
``twophase-F``      quantized all-to-all + all-gather (gradcomp's hook) in wire format ``F``
                    (``int8``, ``int4``, ``int2``): ``2 (P-1)`` messages per chunk, sized by the
                    exchange's own plan (:meth:`~gradcomp.comm.plan.ExchangePlan.sizes_of`):
                    about ``2 (P-1)/P N (K/8 + 4/B)`` plus the headers
``allgather-int8``  all-gather of int8 tensors (PyTorch's experimental quantization hooks):
                    ``(P-1) N`` bytes sent and received per rank
``hier-F``          fp32 reduce-scatter inside each node, two-phase exchange across nodes on
                    ``1/L`` of the bucket per rank (sized by
                    :class:`~gradcomp.comm.hierarchical.HierarchicalLayout`), fp32 all-gather inside the node
==================  ==========================================================================

The quantized schemes' bytes are what the exchange sends: the same chunk rule, message layout
(codes, padding, scales, 16-byte header) and :class:`~gradcomp.codec.formats.WireFormat` objects
the hook uses, never a formula of its own.

Worked example: 7e9 parameters, 8 workers on 8 nodes at 10 Gbit/s (1.25e9 B/s), 5 us latency.
ring-fp32 sends ``2 * 7/8 * 7e9 * 4 = 49 GB`` per rank: ``49e9 / 1.25e9 = 39.2 s`` plus
``14 * 5 us``; twophase-int8 sends ``2 * 7/8 * 7e9 * (1 + 4/256) = 12.4 GB``: 9.95 s plus the codec.

With one node (``nodes=1``) the given ``bandwidth`` and ``latency`` describe the links between the
workers of that machine; the intra-node settings are only used when ``1 < nodes < workers``.

This module is what the communication policy (:mod:`gradcomp.comm.policy`) decides with; the
user-facing comparisons (break-even bandwidths, sweeps) are :mod:`gradcomp.analysis.costmodel`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Union

from gradcomp.checks import check_int, check_positive
from gradcomp.codec.formats import FORMATS, WireFormat, format_names, wire_format
from gradcomp.comm.hierarchical import HierarchicalLayout
from gradcomp.comm.plan import ExchangePlan, chunking

__all__ = [
    "Scheme",
    "Cluster",
    "CodecThroughput",
    "Estimate",
    "parse_scheme",
    "estimate",
    "pipeline_chunks",
]

_ALGORITHMS = ("ring", "tree", "twophase", "allgather", "hier")
_FLOAT_WIDTHS = {"fp32": 4, "bf16": 2, "fp16": 2}


def _or_list(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Scheme:
    """One way of all-reducing gradients.

    Args:
        algorithm: ``ring``, ``tree``, ``twophase``, ``allgather`` or ``hier``.
        bits: element width on the wire: 32 or 16 for ``ring``/``tree``, the format's bits for the
            quantized ones.
        dtype: ``fp32``, ``bf16``, ``fp16`` for float schemes; for quantized ones a registered wire
            format name (``int8``...), or ``int`` for the int format of ``bits`` (kept as its name).

    Example: ``Scheme("twophase", 4, "int").name == "twophase-int4"``.
    """

    algorithm: str
    bits: int
    dtype: str

    def __post_init__(self) -> None:
        if self.algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm must be one of {_ALGORITHMS}, got {self.algorithm!r}")
        if self.algorithm in ("ring", "tree"):
            if self.dtype not in _FLOAT_WIDTHS or _FLOAT_WIDTHS[self.dtype] * 8 != self.bits:
                raise ValueError(f"{self.algorithm} runs on fp32, bf16 or fp16, got {self.dtype} with {self.bits} bits")
            return
        spec = self.bits if self.dtype == "int" else self.dtype
        try:
            fmt = wire_format(spec)
        except (TypeError, ValueError):
            fmt = None
        if fmt is None or fmt.bits != self.bits:
            raise ValueError(
                f"{self.algorithm} quantizes to a registered wire format ({_or_list(format_names())}), "
                f"got {self.dtype} with {self.bits} bits"
            )
        object.__setattr__(self, "dtype", fmt.name)

    @property
    def name(self) -> str:
        """The scheme's name, e.g. ``ring-fp32`` or ``hier-int4``."""
        return f"{self.algorithm}-{self.dtype}"

    @property
    def quantized(self) -> bool:
        """Whether the scheme quantizes (and so has a codec cost)."""
        return self.dtype not in _FLOAT_WIDTHS

    @property
    def format(self) -> Optional[WireFormat]:
        """The :class:`~gradcomp.codec.formats.WireFormat` of a quantized scheme, None for a float one."""
        return wire_format(self.dtype) if self.quantized else None

    @classmethod
    def plain(cls) -> "Scheme":
        """fp32 ring all-reduce (``ring-fp32``), what DDP does without a hook."""
        return cls("ring", 32, "fp32")

    @classmethod
    def exchange(cls, format: Union[WireFormat, str, int], hierarchical: bool = False) -> "Scheme":
        """gradcomp's quantized exchange in ``format`` (a name or the bits): ``twophase-F``, or ``hier-F`` across nodes.

        Example: ``Scheme.exchange(4, hierarchical=True).name == "hier-int4"``.
        """
        fmt = wire_format(format)
        return cls("hier" if hierarchical else "twophase", fmt.bits, fmt.name)


def parse_scheme(name: str) -> Scheme:
    """Parse a scheme name such as ``ring-fp32``, ``tree-bf16``, ``twophase-int4`` or ``hier-int8``.

    Names are for people (the command line, notebooks); code passes :class:`Scheme` objects, which
    are returned as they are. A quantized scheme names any registered wire format.
    """
    if isinstance(name, Scheme):
        return name
    if not isinstance(name, str):
        raise TypeError(f"scheme must be a Scheme or a name such as 'twophase-int8', got {type(name).__name__} {name!r}")
    m = re.fullmatch(r"(ring|tree|twophase|allgather|hier)-([A-Za-z0-9_.]+)", name.strip())
    if m is None or (m.group(2) not in _FLOAT_WIDTHS and m.group(2) not in FORMATS):
        formats = "/".join(format_names())
        raise ValueError(
            f"scheme must look like ring-fp32, tree-fp32, ring-bf16, twophase-{formats}, allgather-int8 or hier-{formats}, got {name!r}"
        )
    algo, dt = m.group(1), m.group(2)
    if dt in FORMATS:
        return Scheme(algo, FORMATS[dt].bits, dt)
    return Scheme(algo, _FLOAT_WIDTHS[dt] * 8, dt)


@dataclass(frozen=True)
class Cluster:
    """The machines and network the gradients cross.

    Args:
        workers: ranks taking part in the all-reduce (P).
        bandwidth: bytes per second of the main link in each direction: a node's NIC when
            ``nodes > 1`` (shared by the node's workers), or the link between workers on one node.
        latency: seconds per message on the main link (alpha).
        nodes: machines the workers are spread over (M); ``workers`` must be a multiple.
            Defaults to ``workers`` (one worker per node).
        intra_bandwidth: bytes per second between workers of one node (NVLink, shared memory),
            used when ``1 < nodes < workers``.
        intra_latency: seconds per message inside a node.

    Example: 8 GPUs in each of 4 nodes with 100 Gbit/s NICs:
    ``Cluster(workers=32, nodes=4, bandwidth=12.5e9, latency=5e-6)``.
    """

    workers: int
    bandwidth: float
    latency: float = 5e-6
    nodes: Optional[int] = None
    intra_bandwidth: float = 100e9
    intra_latency: float = 1e-6

    def __post_init__(self) -> None:
        check_int("workers", self.workers)
        check_positive("bandwidth", self.bandwidth)
        check_positive("latency", self.latency, allow_zero=True)
        check_positive("intra_bandwidth", self.intra_bandwidth)
        check_positive("intra_latency", self.intra_latency, allow_zero=True)
        if self.nodes is not None:
            check_int("nodes", self.nodes)
            if self.nodes > self.workers or self.workers % self.nodes:
                raise ValueError(
                    f"workers must be a multiple of nodes (the same number of workers on every node), "
                    f"got workers={self.workers}, nodes={self.nodes}"
                )

    @property
    def num_nodes(self) -> int:
        """Nodes, with one worker per node when not given."""
        return self.workers if self.nodes is None else self.nodes

    @property
    def per_node(self) -> int:
        """Workers per node (L)."""
        return self.workers // self.num_nodes

    def ports(self):
        """Return (M_eff, L_eff): nodes and workers per node as the main link sees them.

        A single node is modelled as one worker per port of the given link, which makes the flat
        and hierarchical formulas coincide for it.
        """
        if self.num_nodes == 1:
            return self.workers, 1
        return self.num_nodes, self.per_node


@dataclass(frozen=True)
class CodecThroughput:
    """How fast the codec runs, in fp32 input elements per second.

    Args:
        quantize_eps: elements quantized (and packed) per second.
        dequantize_eps: elements dequantized per second.
        source: where the numbers come from (``given`` or a description of the measurement).

    Example: a codec at 8 GB/s of fp32 input both ways is ``CodecThroughput.from_bytes_per_s(8e9)``,
    i.e. 2e9 elements per second.
    """

    quantize_eps: float
    dequantize_eps: float
    source: str = "given"

    def __post_init__(self) -> None:
        check_positive("quantize_eps", self.quantize_eps)
        check_positive("dequantize_eps", self.dequantize_eps)

    @classmethod
    def from_bytes_per_s(cls, bytes_per_s: float, source: str = "given") -> "CodecThroughput":
        """Build from one throughput in bytes of fp32 input per second, for both directions."""
        check_positive("codec throughput", bytes_per_s)
        return cls(bytes_per_s / 4.0, bytes_per_s / 4.0, source)

    def seconds(self, quantized: float, dequantized: float) -> float:
        """Seconds to quantize ``quantized`` elements and dequantize ``dequantized`` elements."""
        return quantized / self.quantize_eps + dequantized / self.dequantize_eps


@dataclass(frozen=True)
class Estimate:
    """Predicted cost of one all-reduce of the gradients.

    Attributes:
        scheme: scheme name.
        bytes_per_rank: bytes each rank sends per step over all links (average over ranks).
        wire_bytes: bytes the busiest port of the main link sends in one direction.
        latency_s: ``alpha`` times the sequential message steps (main and intra-node links).
        wire_s: ``wire_bytes / bandwidth``.
        intra_s: bandwidth time of traffic over the intra-node links.
        compute_s: codec time (0 for float schemes).
        total_s: the sum of the four, less ``overlap_s``.
        overlap_s: codec time hidden behind transfers (or transfers behind codec time) when the
            exchange is cut into chunks and pipelined (``chunk_numel``); 0 otherwise.
    """

    scheme: str
    bytes_per_rank: float
    wire_bytes: float
    latency_s: float
    wire_s: float
    intra_s: float
    compute_s: float
    total_s: float
    overlap_s: float = 0.0

    @property
    def fixed_s(self) -> float:
        """The part of the time that does not depend on the main link's bandwidth (without pipelining)."""
        return self.latency_s + self.intra_s + self.compute_s

    def to_dict(self) -> Dict[str, float]:
        """Return the fields as a plain dict."""
        return asdict(self)



# --------------------------------------------------------------------------------------------
# the model


def pipeline_chunks(numel: int, workers: int, block_size: int = 256, chunk_numel: Optional[int] = None) -> int:
    """Return how many chunks the hook cuts a bucket of ``numel`` values into (1 without ``chunk_numel``).

    Asked of the exchange's plan (:meth:`gradcomp.comm.plan.ExchangePlan.sizes_of`, the rule of
    :func:`gradcomp.comm.plan.chunking`): a chunk holds ``max(P, floor(chunk_numel / B / P) * P)``
    blocks, and a last chunk of fewer than ``2 P`` blocks joins the previous one.

    Example: 4,000,000 values (15625 blocks of 256) with chunks of 1,048,576 values on 4 ranks:
    4096 blocks per chunk, so 4 chunks (the last one of 3337 blocks).
    """
    check_int("numel", numel)
    check_int("workers", workers)
    check_int("block_size", block_size)
    if chunk_numel is None:
        return 1
    check_int("chunk_numel", chunk_numel)
    return chunking(-(-numel // block_size), workers, block_size, chunk_numel)[1]


def estimate(
    scheme,
    params: int,
    cluster: Cluster,
    codec_throughput: Optional[CodecThroughput] = None,
    block_size: int = 256,
    chunk_numel: Optional[int] = None,
) -> Estimate:
    """Predict the time and bytes of one gradient all-reduce with ``scheme``.

    Models (``P`` workers, ``M`` nodes, ``L = P/M`` per node, ``N = params``, ``b`` bytes per
    element, ``c = format.bytes_per_value(block_size)`` per quantized element (``bits/8 + 4/B``),
    ``s`` the two-phase shard messages ``~ N/P * c`` plus their headers, as the exchange's plan
    sizes them; a single node is treated as ``M = P``, ``L = 1`` on the given link):

    1. ``ring``: ``2 (P-1)`` steps of ``N/P`` elements (Patarasuk and Yuan, "Bandwidth optimal
       all-reduce algorithms for clusters of workstations", JPDC 2009; Thakur, Rabenseifner and
       Gropp, "Optimization of collective communication operations in MPICH", IJHPCA 2005).
       latency ``2 (P-1) alpha``; each inter-node ring edge carries ``2 (P-1)/P N b``.
    2. ``tree``: NCCL's double binary tree (Sanders, Speck and Traeff, "Two-tree algorithms for
       full bandwidth broadcast, reduction and scan", Parallel Computing 2009; NCCL 2.4): a
       pipelined reduce up and broadcast down two complementary binary trees over the nodes, each
       carrying half the data, and a chain inside each node. latency
       ``2 (ceil(log2 M) alpha + (L-1) alpha_intra)``; a node that is interior in one tree receives
       ``N b`` and sends ``N b`` in each phase, so its port sends ``2 N b`` (``N b`` when ``M = 2``).
       Every rank sends ``2 (P-1)/P N b`` on average, like the ring.
    3. ``twophase``: all-to-all of ``P-1`` shard messages then all-gather of ``P-1``, once per
       chunk (``k`` chunks, :func:`pipeline_chunks`; 1 without ``chunk_numel``): latency
       ``2 (P-1) k alpha`` (pairwise all-to-all, ring all-gather); every rank sends
       ``2 (P-1) s``. A node's port sends ``L (P-L) s`` in the all-to-all (each of its ranks
       sends ``P-L`` shards off the node) plus ``(P-1) s`` in the ring all-gather: ``2 (P-1) s``
       with one worker per node, but ``L`` times more all-to-all traffic with ``L`` workers per
       node (which the hierarchical mode avoids); the ``(L-1) s`` all-to-all bytes between
       workers of a node go over the intra links. Codec: quantize ``N``, dequantize-and-sum the
       ``P`` messages (``N`` elements), requantize ``N/P``, dequantize the gathered ``N``.
    4. ``allgather``: PyTorch's per-tensor int8 hooks all-gather the scales then the codes:
       latency ``2 (P-1) alpha``; a ring all-gather makes every port send and receive
       ``(P-1) N bits/8`` bytes. Codec: quantize ``N``, dequantize ``P N``.
    5. ``hier``: fp32 ring reduce-scatter inside the node (``(L-1) alpha_intra`` and
       ``(L-1)/L N 4`` bytes per rank), the two-phase exchange across the ``M`` nodes by the ``L``
       ranks of equal local rank on ``N/L`` elements each (the node's port carries all ``L`` of
       them: ``2 L (M-1) s_h`` with ``s_h ~ N/(L M) c``; latency ``2 (M-1) alpha``), then an fp32
       all-gather inside the node. Codec on ``N/L`` elements.

    Pipelining (``chunk_numel``, quantized schemes with a codec figure): the hook cuts a bucket into
    ``k = ceil(n / chunk_numel)`` chunks (``n`` the values one exchange handles: ``N``, or ``N/L``
    for ``hier``) and codes chunk ``c+1`` while chunk ``c`` is on the wire, so the transfers ``T``
    (wire and intra-node) and the codec ``C`` overlap: ``max(T, C) + min(T, C) / k`` instead of
    ``T + C`` (the pipeline's fill and drain cost one chunk of the shorter stage).

    Not modelled: the fp32 additions of ring and tree (memory bound, far below the wire time on
    any network slower than memory), the overlap of communication with the backward pass, and
    congestion beyond the NIC (a full-bisection network is assumed).

    Example: ``estimate("ring-fp32", 7_000_000_000, Cluster(8, 1.25e9, 5e-6)).total_s`` is
    ``49e9 / 1.25e9 + 14 * 5e-6 = 39.2 s``.

    Args:
        scheme: a :class:`Scheme` or its name.
        params: gradient elements all-reduced per step (N).
        cluster: the :class:`Cluster`.
        codec_throughput: codec speed for quantized schemes; None leaves their compute out (0 s).
        block_size: elements per fp32 scale of the quantized schemes.
        chunk_numel: values per pipelined chunk of the quantized exchange, or None (no overlap).

    Returns:
        An :class:`Estimate`.
    """
    sch = parse_scheme(scheme)
    check_int("params", params)
    check_int("block_size", block_size)
    if chunk_numel is not None:
        check_int("chunk_numel", chunk_numel)
    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster must be a Cluster, got {type(cluster).__name__}")
    if codec_throughput is not None and not isinstance(codec_throughput, CodecThroughput):
        raise TypeError(f"codec_throughput must be a CodecThroughput or None, got {type(codec_throughput).__name__}")
    N = float(params)
    P = cluster.workers
    M, L = cluster.ports()
    a, a_i, bw_i = cluster.latency, cluster.intra_latency, cluster.intra_bandwidth
    latency = wire = intra = compute = 0.0
    per_rank = 0.0
    q = codec_throughput

    if P == 1:
        return Estimate(sch.name, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    if sch.algorithm == "ring":
        b = sch.bits / 8
        per_rank = 2 * (P - 1) / P * N * b
        wire = per_rank
        latency = 2 * (P - 1) * a
    elif sch.algorithm == "tree":
        b = sch.bits / 8
        per_rank = 2 * (P - 1) / P * N * b
        if M == 1:
            wire = 0.0
        else:
            wire = (1.0 if M == 2 else 2.0) * N * b
        # the chain inside a node is pipelined with the tree over faster links: latency only
        latency = 2 * (math.ceil(math.log2(M)) * a + (L - 1) * a_i)
    elif sch.algorithm == "twophase":
        sizes = ExchangePlan.sizes_of(params, P, sch.format, block_size, chunk_numel)
        s = sizes.message_bytes  # one shard message of every chunk, headers included
        per_rank = sizes.bytes_sent
        # all-to-all: each of the node's L ranks sends P - L shards off the node; the ring
        # all-gather carries P - 1 shards over each inter-node edge of the ring
        wire = (L * (P - L) + (P - 1)) * s
        intra = (L - 1) * s / bw_i
        # every chunk is an all-to-all and an all-gather of its own: P - 1 messages each, per rank
        latency = 2 * (P - 1) * a * sizes.chunks
        if q is not None:
            compute = q.seconds(N + N / P, 2 * N)
    elif sch.algorithm == "allgather":
        msg = N * sch.bits / 8 + 8  # PyTorch's per-tensor codes plus one fp32 scale and zero point
        per_rank = (P - 1) * msg
        wire = per_rank
        latency = 2 * (P - 1) * a
        if q is not None:
            compute = q.seconds(N, P * N)
    else:  # hier
        # the inter-node exchange of the hook's hierarchical route, sized as it sends it
        inter_rank = HierarchicalLayout(params, M, L, sch.format, block_size).inter_bytes_sent
        fp32_intra = 2 * (L - 1) / L * N * 4  # reduce-scatter + all-gather inside the node
        per_rank = inter_rank + fp32_intra
        wire = L * inter_rank
        intra = fp32_intra / bw_i
        latency = 2 * (M - 1) * a + 2 * (L - 1) * a_i
        if q is not None:
            n = N / L
            compute = q.seconds(n + n / M, 2 * n)

    wire_s = wire / cluster.bandwidth
    overlap = 0.0
    if chunk_numel is not None and sch.quantized and compute > 0:
        if sch.algorithm == "twophase":
            k = sizes.chunks
        else:
            k = max(1, math.ceil(N / L / chunk_numel))
        transfer = wire_s + intra
        overlap = min(transfer, compute) * (1.0 - 1.0 / k)
    total = latency + wire_s + intra + compute - overlap
    return Estimate(sch.name, per_rank, wire, latency, wire_s, intra, compute, total, overlap)
