"""Communication cost model: time and bytes per step of each way to all-reduce the gradients.

Every scheme is described with the latency-bandwidth (alpha-beta) model: sending a message of
``m`` bytes over a link costs ``alpha + m / beta``. A step's communication time is

    total = latency + compute + intra + wire_bytes / bandwidth

where ``latency`` counts the sequential message steps times ``alpha``, ``compute`` is the
quantization work at a measured or given codec throughput, ``intra`` is traffic over the fast
intra-node links (hierarchical schemes), and ``wire_bytes`` is what the busiest port of the main
link (a node's NIC) sends in one direction. Because the time is affine in ``1 / bandwidth``, the
bandwidth below which compression pays has a closed form (:func:`break_even_bandwidth`).

Schemes (``P`` workers on ``M`` nodes, ``L = P / M`` workers per node, ``N`` parameters):

==================  ==========================================================================
``ring-fp32/bf16``  ring all-reduce: ``2 (P-1)`` steps, ``2 (P-1)/P N b`` bytes per rank
``tree-fp32``       double binary tree all-reduce (NCCL): ``2 log2 M`` steps, ``2 N b`` per port
``twophase-intK``   quantized all-to-all + all-gather (gradcomp's hook): ``2 (P-1)/P N (K/8 + 4/B)``
``allgather-int8``  all-gather of int8 tensors (PyTorch's experimental quantization hooks):
                    ``(P-1) N`` bytes sent and received per rank
``hier-intK``       fp32 reduce-scatter inside each node, two-phase exchange across nodes on
                    ``1/L`` of the bucket per rank, fp32 all-gather inside the node
==================  ==========================================================================

Worked example: 7e9 parameters, 8 workers on 8 nodes at 10 Gbit/s (1.25e9 B/s), 5 us latency.
ring-fp32 sends ``2 * 7/8 * 7e9 * 4 = 49 GB`` per rank: ``49e9 / 1.25e9 = 39.2 s`` plus
``14 * 5 us``; twophase-int8 sends ``2 * 7/8 * 7e9 * (1 + 4/256) = 12.4 GB``: 9.95 s plus the codec.

With one node (``nodes=1``) the given ``bandwidth`` and ``latency`` describe the links between the
workers of that machine; the intra-node settings are only used when ``1 < nodes < workers``.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from gradcomp import codec

logger = logging.getLogger(__name__)

__all__ = [
    "Scheme",
    "Cluster",
    "CodecThroughput",
    "Estimate",
    "DEFAULT_SCHEMES",
    "parse_scheme",
    "estimate",
    "compare",
    "break_even_bandwidth",
    "sweep",
    "measure_codec_throughput",
    "parse_bandwidth",
    "parse_duration",
    "parse_count",
    "parse_bytes",
    "format_bandwidth",
    "format_bytes",
    "format_duration",
]

_ALGORITHMS = ("ring", "tree", "twophase", "allgather", "hier")
_FLOAT_WIDTHS = {"fp32": 4, "bf16": 2, "fp16": 2}
_QUANT_BITS = (2, 4, 8)


# --------------------------------------------------------------------------------------------
# unit parsing


_NUM = r"([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)"
_SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1024.0, "mi": 1024.0**2, "gi": 1024.0**3, "ti": 1024.0**4}


def parse_bandwidth(text: str, what: str = "bandwidth") -> float:
    """Parse a link rate with an explicit unit into bytes per second.

    Bits: ``10gbit``, ``10Gbit/s``, ``100mbit``, ``10gbps``, ``10Gb/s`` (lower-case ``b``).
    Bytes: ``25GB/s``, ``25GiB/s``, ``3.2MB/s``, ``1e9B/s`` (upper-case ``B`` followed by ``/s``).
    Prefixes k, M, G, T are decimal; Ki, Mi, Gi, Ti are binary. A bare number is rejected because
    bits and bytes differ eightfold.

    Example: ``parse_bandwidth("10gbit") == 1.25e9`` and ``parse_bandwidth("25GB/s") == 25e9``.

    Args:
        text: the rate as written by a user.
        what: the argument's name, used in the error message.

    Returns:
        Bytes per second (a positive float).
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string such as '10gbit' or '25GB/s', got {type(text).__name__}")
    m = re.fullmatch(_NUM + r"\s*([kKmMgGtT]i?)?(bits?(?:/s)?|bps|b/s|B/s|Bps|bytes?/s)", text.strip())
    if m is None:
        raise ValueError(
            f"{what} must be a number with a rate unit such as '10gbit', '100mbit', '10Gb/s' (bits) "
            f"or '25GB/s' (bytes), got {text!r}"
        )
    value = float(m.group(1))
    prefix = (m.group(2) or "").lower()
    unit = m.group(3)
    per_byte = 1.0 if unit.startswith("B") or unit.startswith("byte") else 1.0 / 8.0
    rate = value * _SI[prefix] * per_byte
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"{what} must be positive and finite, got {text!r}")
    return rate


_DURATIONS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_duration(text: str, what: str = "latency") -> float:
    """Parse a duration with a unit (``ns``, ``us``, ``ms``, ``s``) into seconds; ``0`` is allowed.

    Example: ``parse_duration("5us") == 5e-6``; ``parse_duration("0.5ms") == 5e-4``.

    Args:
        text: the duration as written by a user.
        what: the argument's name, used in the error message.

    Returns:
        Seconds (a non-negative float).
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string such as '5us', got {type(text).__name__}")
    s = text.strip()
    if s in ("0", "0.0"):
        return 0.0
    m = re.fullmatch(_NUM + r"\s*(ns|us|µs|ms|s)", s)
    if m is None:
        raise ValueError(f"{what} must be a number with a unit ns, us, ms or s such as '5us', got {text!r}")
    value = float(m.group(1)) * _DURATIONS[m.group(2)]
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {text!r}")
    return value


_COUNT_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str, what: str = "params") -> int:
    """Parse a positive count such as ``7e9``, ``7B``, ``350M``, ``125k`` or ``1_000_000``.

    Suffixes (case-insensitive): k = 1e3, M = 1e6, B or G = 1e9, T = 1e12.

    Example: ``parse_count("7B") == 7_000_000_000``; ``parse_count("1.3e9") == 1_300_000_000``.

    Args:
        text: the count as written by a user.
        what: the argument's name, used in the error message.

    Returns:
        A positive int.
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string such as '7e9' or '350M', got {type(text).__name__}")
    m = re.fullmatch(_NUM + r"\s*([kKmMbBgGtT]?)", text.strip().replace("_", ""))
    if m is None:
        raise ValueError(f"{what} must be a positive number such as '7e9', '7B' or '350M', got {text!r}")
    value = float(m.group(1)) * _COUNT_SUFFIX[m.group(2).lower()]
    if not math.isfinite(value) or value > 1e18:
        raise ValueError(f"{what} must be a finite count of at most 1e18, got {text!r}")
    if value < 1:
        raise ValueError(f"{what} must be at least 1, got {text!r}")
    return int(round(value))


def parse_bytes(text: str, what: str = "size") -> int:
    """Parse a byte size such as ``25MB``, ``1MiB``, ``512kB`` or ``4096B`` into bytes.

    Example: ``parse_bytes("25MB") == 25_000_000``; ``parse_bytes("1MiB") == 1_048_576``.
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string such as '25MB', got {type(text).__name__}")
    m = re.fullmatch(_NUM + r"\s*([kKmMgGtT]i?)?B", text.strip())
    if m is None:
        raise ValueError(f"{what} must be a number with a unit such as '25MB', '1MiB' or '4096B', got {text!r}")
    value = float(m.group(1)) * _SI[(m.group(2) or "").lower()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{what} must be at least 1 byte, got {text!r}")
    return int(round(value))


def format_bandwidth(bytes_per_s: float) -> str:
    """Format bytes per second as a network rate in bits, e.g. ``1.25e9 -> '10 Gbit/s'``."""
    if bytes_per_s == math.inf:
        return "any"
    if bytes_per_s <= 0:
        return "never"
    bits = bytes_per_s * 8
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.3g} bit/s"


def format_bytes(n: float) -> str:
    """Format a byte count with a decimal prefix, e.g. ``4.9e10 -> '49 GB'``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def format_duration(seconds: float) -> str:
    """Format seconds with a unit, e.g. ``0.0123 -> '12.3 ms'``."""
    if seconds >= 1 or seconds == 0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


# --------------------------------------------------------------------------------------------
# configuration


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _positive_float(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} finite number, got {value!r}")


@dataclass(frozen=True)
class Scheme:
    """One way of all-reducing gradients.

    Args:
        algorithm: ``ring``, ``tree``, ``twophase``, ``allgather`` or ``hier``.
        bits: element width on the wire: 32 or 16 for ``ring``/``tree``, 8/4/2 for the quantized ones.
        dtype: ``fp32``, ``bf16``, ``fp16`` for float schemes, ``int`` for quantized ones.

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
        else:
            if self.dtype != "int" or self.bits not in _QUANT_BITS:
                raise ValueError(f"{self.algorithm} quantizes to int8, int4 or int2, got {self.dtype} with {self.bits} bits")

    @property
    def name(self) -> str:
        """The scheme's name, e.g. ``ring-fp32`` or ``hier-int4``."""
        suffix = self.dtype if self.dtype != "int" else f"int{self.bits}"
        return f"{self.algorithm}-{suffix}"

    @property
    def quantized(self) -> bool:
        """Whether the scheme quantizes (and so has a codec cost)."""
        return self.dtype == "int"


def parse_scheme(name: str) -> Scheme:
    """Parse a scheme name such as ``ring-fp32``, ``tree-bf16``, ``twophase-int4`` or ``hier-int8``."""
    if isinstance(name, Scheme):
        return name
    m = re.fullmatch(r"(ring|tree|twophase|allgather|hier)-(fp32|bf16|fp16|int8|int4|int2)", str(name).strip())
    if m is None:
        raise ValueError(
            f"scheme must look like ring-fp32, tree-fp32, ring-bf16, twophase-int8/4/2, allgather-int8 or hier-int8/4/2, got {name!r}"
        )
    algo, dt = m.group(1), m.group(2)
    if dt.startswith("int"):
        return Scheme(algo, int(dt[3:]), "int")
    return Scheme(algo, _FLOAT_WIDTHS[dt] * 8, dt)


DEFAULT_SCHEMES: tuple = tuple(
    parse_scheme(n)
    for n in (
        "ring-fp32",
        "ring-bf16",
        "ring-fp16",
        "tree-fp32",
        "twophase-int8",
        "twophase-int4",
        "twophase-int2",
        "allgather-int8",
        "hier-int8",
        "hier-int4",
        "hier-int2",
    )
)


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
        _positive_int("workers", self.workers)
        _positive_float("bandwidth", self.bandwidth)
        _positive_float("latency", self.latency, allow_zero=True)
        _positive_float("intra_bandwidth", self.intra_bandwidth)
        _positive_float("intra_latency", self.intra_latency, allow_zero=True)
        if self.nodes is not None:
            _positive_int("nodes", self.nodes)
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

    def _ports(self):
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
        _positive_float("quantize_eps", self.quantize_eps)
        _positive_float("dequantize_eps", self.dequantize_eps)

    @classmethod
    def from_bytes_per_s(cls, bytes_per_s: float, source: str = "given") -> "CodecThroughput":
        """Build from one throughput in bytes of fp32 input per second, for both directions."""
        _positive_float("codec throughput", bytes_per_s)
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
        total_s: the sum of the four.
    """

    scheme: str
    bytes_per_rank: float
    wire_bytes: float
    latency_s: float
    wire_s: float
    intra_s: float
    compute_s: float
    total_s: float

    @property
    def fixed_s(self) -> float:
        """The part of the time that does not depend on the main link's bandwidth."""
        return self.latency_s + self.intra_s + self.compute_s

    def to_dict(self) -> Dict[str, float]:
        """Return the fields as a plain dict."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# the model


def _shard_message_bytes(numel: int, world: int, bits: int, block_size: int) -> int:
    """Bytes of one shard message of the two-phase exchange (codes + fp32 scales), as the hook pads it."""
    blocks = -(-numel // block_size)
    per_shard = max(1, -(-blocks // world))
    return per_shard * block_size * bits // 8 + 4 * per_shard


def estimate(
    scheme,
    params: int,
    cluster: Cluster,
    codec_throughput: Optional[CodecThroughput] = None,
    block_size: int = 256,
) -> Estimate:
    """Predict the time and bytes of one gradient all-reduce with ``scheme``.

    Models (``P`` workers, ``M`` nodes, ``L = P/M`` per node, ``N = params``, ``b`` bytes per
    element, ``c = bits/8 + 4/block_size`` per quantized element, ``s`` the two-phase shard message
    ``~ N/P * c``; a single node is treated as ``M = P``, ``L = 1`` on the given link):

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
    3. ``twophase``: all-to-all of ``P-1`` shard messages then all-gather of ``P-1``:
       latency ``2 (P-1) alpha`` (pairwise all-to-all, ring all-gather); every rank sends
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

    Returns:
        An :class:`Estimate`.
    """
    sch = parse_scheme(scheme)
    _positive_int("params", params)
    _positive_int("block_size", block_size)
    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster must be a Cluster, got {type(cluster).__name__}")
    if codec_throughput is not None and not isinstance(codec_throughput, CodecThroughput):
        raise TypeError(f"codec_throughput must be a CodecThroughput or None, got {type(codec_throughput).__name__}")
    N = float(params)
    P = cluster.workers
    M, L = cluster._ports()
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
        s = _shard_message_bytes(params, P, sch.bits, block_size)
        per_rank = 2 * (P - 1) * s
        # all-to-all: each of the node's L ranks sends P - L shards off the node; the ring
        # all-gather carries P - 1 shards over each inter-node edge of the ring
        wire = (L * (P - L) + (P - 1)) * s
        intra = (L - 1) * s / bw_i
        latency = 2 * (P - 1) * a
        if q is not None:
            compute = q.seconds(N + N / P, 2 * N)
    elif sch.algorithm == "allgather":
        msg = N * sch.bits / 8 + 8  # codes plus one fp32 scale and zero point
        per_rank = (P - 1) * msg
        wire = per_rank
        latency = 2 * (P - 1) * a
        if q is not None:
            compute = q.seconds(N, P * N)
    else:  # hier
        s_h = _shard_message_bytes(-(-params // L), M, sch.bits, block_size)
        inter_rank = 2 * (M - 1) * s_h
        fp32_intra = 2 * (L - 1) / L * N * 4  # reduce-scatter + all-gather inside the node
        per_rank = inter_rank + fp32_intra
        wire = L * inter_rank
        intra = fp32_intra / bw_i
        latency = 2 * (M - 1) * a + 2 * (L - 1) * a_i
        if q is not None:
            n = N / L
            compute = q.seconds(n + n / M, 2 * n)

    wire_s = wire / cluster.bandwidth
    total = latency + wire_s + intra + compute
    return Estimate(sch.name, per_rank, wire, latency, wire_s, intra, compute, total)


def _schemes_for(cluster: Cluster, schemes: Optional[Iterable]) -> List[Scheme]:
    if schemes is not None:
        out = [parse_scheme(s) for s in schemes]
        if not out:
            raise ValueError("schemes must name at least one scheme, got an empty list")
        return out
    M, L = cluster._ports()
    # hierarchical equals the flat two-phase exchange with one worker per node
    return [s for s in DEFAULT_SCHEMES if s.algorithm != "hier" or L > 1]


def compare(
    params: int,
    cluster: Cluster,
    schemes: Optional[Iterable] = None,
    codec_throughput: Optional[CodecThroughput] = None,
    block_size: int = 256,
) -> List[Estimate]:
    """Estimate every scheme (``DEFAULT_SCHEMES``; hierarchical ones only with several workers per node).

    Args:
        params, cluster, codec_throughput, block_size: as for :func:`estimate`.
        schemes: scheme names or :class:`Scheme` objects; None for the defaults.

    Returns:
        One :class:`Estimate` per scheme, in the given order.
    """
    return [estimate(s, params, cluster, codec_throughput, block_size) for s in _schemes_for(cluster, schemes)]


def break_even_bandwidth(
    scheme,
    params: int,
    cluster: Cluster,
    codec_throughput: Optional[CodecThroughput] = None,
    block_size: int = 256,
    baseline="ring-fp32",
) -> float:
    """Return the main-link bandwidth below which ``scheme`` is faster than ``baseline``.

    Both times are ``fixed + wire_bytes / bandwidth`` (only the main link's bandwidth varies), so
    they cross at ``(wire_base - wire) / (fixed - fixed_base)``.

    Example: with ``fixed`` 0.1 s and 10 GB on the wire for int8 against 0 s and 40 GB for fp32,
    int8 pays below ``30e9 / 0.1 = 300 GB/s``.

    Args:
        scheme: the compressed scheme.
        params, cluster, codec_throughput, block_size: as for :func:`estimate`; the cluster's
            bandwidth is ignored.
        baseline: the scheme to beat.

    Returns:
        Bytes per second; ``math.inf`` if ``scheme`` is faster at every bandwidth, ``0.0`` if at none.
    """
    e = estimate(scheme, params, cluster, codec_throughput, block_size)
    r = estimate(baseline, params, cluster, codec_throughput, block_size)
    saved = r.wire_bytes - e.wire_bytes
    extra = e.fixed_s - r.fixed_s
    if saved <= 0:
        return math.inf if (saved == 0 and extra < 0) else 0.0
    if extra <= 0:
        return math.inf
    return saved / extra


def sweep(
    params: int,
    cluster: Cluster,
    over: str,
    values: Sequence[float],
    schemes: Optional[Iterable] = None,
    codec_throughput: Optional[CodecThroughput] = None,
    block_size: int = 256,
) -> Dict[str, List[float]]:
    """Compute total step communication time of each scheme over a range of worker counts or bandwidths.

    When sweeping ``workers`` the number of workers per node is kept (so nodes grow with workers),
    and values that are not a multiple of it are rejected.

    Args:
        params, cluster, schemes, codec_throughput, block_size: as for :func:`compare`.
        over: ``"workers"`` or ``"bandwidth"`` (bytes per second).
        values: the x values.

    Returns:
        ``{"x": [...], "<scheme>": [total seconds, ...], ...}``.
    """
    if over not in ("workers", "bandwidth"):
        raise ValueError(f"over must be 'workers' or 'bandwidth', got {over!r}")
    values = list(values)
    if not values:
        raise ValueError("values must hold at least one point, got none")
    chosen = _schemes_for(cluster, schemes)
    out: Dict[str, List[float]] = {"x": [float(v) for v in values]}
    for s in chosen:
        out[s.name] = []
    L = cluster.per_node if cluster.nodes not in (None, 1) else None
    for v in values:
        if over == "workers":
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            _positive_int("workers", v)
            if L is None:
                nodes = None if cluster.nodes is None else 1
            else:
                if v % L:
                    raise ValueError(f"workers must be a multiple of the {L} workers per node, got {v}")
                nodes = v // L
            c = Cluster(v, cluster.bandwidth, cluster.latency, nodes, cluster.intra_bandwidth, cluster.intra_latency)
        else:
            c = Cluster(cluster.workers, float(v), cluster.latency, cluster.nodes, cluster.intra_bandwidth, cluster.intra_latency)
        for s in chosen:
            out[s.name].append(estimate(s, params, c, codec_throughput, block_size).total_s)
    return out


# --------------------------------------------------------------------------------------------
# codec throughput


def measure_codec_throughput(
    bits: int = 8,
    block_size: int = 256,
    numel: int = 1 << 22,
    repeats: int = 5,
    compiled: bool = False,
    device: str = "cpu",
) -> CodecThroughput:
    """Time ``codec.quantize`` and ``codec.dequantize`` on random data and return their throughput.

    Steps: build ``numel`` normal fp32 values; run each function once to warm up (this compiles
    the kernels when ``compiled``); time ``repeats`` calls of each and take the median.

    Args:
        bits: code width (2, 4 or 8).
        block_size: elements per scale.
        numel: elements per call (a gradient bucket: 4M elements = 16 MB by default).
        repeats: timed calls of each function.
        compiled: measure the fused ``torch.compile`` kernels.
        device: where to run (``cpu`` or ``cuda``).

    Returns:
        A :class:`CodecThroughput` whose ``source`` describes the measurement.
    """
    _positive_int("numel", numel)
    _positive_int("repeats", repeats)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def timed(fn) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    qt = codec.quantize(x, bits, block_size, compiled=compiled)
    t_q = timed(lambda: codec.quantize(x, bits, block_size, compiled=compiled))
    t_d = timed(lambda: codec.dequantize(qt, compiled=compiled))
    mode = "compiled" if compiled else "eager"
    src = f"measured: int{bits} block {block_size}, {numel} elements on {device}, {mode}, median of {repeats}"
    logger.info("codec throughput %s: quantize %.3g elem/s, dequantize %.3g elem/s", src, numel / t_q, numel / t_d)
    return CodecThroughput(numel / t_q, numel / t_d, src)
