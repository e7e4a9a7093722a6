"""A measured policy: per bucket, plain all-reduce, int8 or int4, whichever the network makes fastest.

On a fast network the codec can cost more than the bytes it saves; on a slow one compression wins.
The policy measures which case this job is in and decides per bucket size:

1. Probe the hook's process group with fp32 all-reduces of growing size (``probe_numels``, each
   timed ``probe_repeats`` times after a warm-up, the median kept); with a topology, probe each
   node's group the same way. Every rank takes the maximum over ranks of each time, so every rank
   fits the same numbers.
2. Fit the latency-bandwidth model of :mod:`gradcomp.costmodel` to them: a ring all-reduce of
   ``n`` fp32 elements on ``P`` ranks takes ``2 (P-1) alpha + (2 (P-1)/P * 4 n) / beta``; a weighted
   least-squares fit (relative error) gives ``alpha`` and ``beta`` (:func:`fit_latency_bandwidth`).
3. Time the hook's own codec kernels (error-feedback quantization and dequantization) on this
   machine for each candidate width; the slowest rank's times count.
4. For a bucket of ``n`` elements, predict with :func:`gradcomp.costmodel.estimate` the time of
   ``ring-fp32`` and of ``twophase-intK`` (flat) or ``hier-intK`` (with a topology), codec time
   included, and pick the fastest candidate allowed by the accuracy floor ``min_bits``.

The decision depends only on numbers every rank agreed on and on the bucket's size, so it is the
same on every rank. Tests and users who know their network inject the figures with
``PolicyConfig(fit=NetworkFit(...))``; nothing is timed then.

Example (injected figures, 4 ranks on 2 nodes, 1 Gbit/s between nodes)::

    fit = NetworkFit(link=LinkFit(latency=50e-6, bandwidth=125e6), intra=LinkFit(20e-6, 5e9),
                     codec=((8, CodecThroughput(1e9, 1e9)), (4, CodecThroughput(8e8, 8e8))))
    policy = CommPolicy(PolicyConfig(fit=fit), fit, workers=4, nodes=2, block_size=256)
    policy.describe_choice(4_000_000)
    # '4000000 elements -> hier-int4 (ring-fp32 192.300 ms, hier-int8 42.846 ms, hier-int4 28.593 ms)'
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from gradcomp.checks import check_positive
from gradcomp.comm.exchange import DEFAULT_CHUNK_NUMEL
from gradcomp.comm.measure import measure_hook_codec, probe_allreduce, timed
from gradcomp.costmodel import Cluster, CodecThroughput, Scheme, estimate

logger = logging.getLogger(__name__)

__all__ = [
    "PLAIN",
    "LinkFit",
    "NetworkFit",
    "PolicyConfig",
    "CommPolicy",
    "fit_latency_bandwidth",
    "probe_bucket_numel",
    "probe_network",
]

PLAIN = 32  # the "bits" of plain fp32 all-reduce among the candidates
_CANDIDATES = (PLAIN, 8, 4, 2)
_RING_FP32 = Scheme.plain()


@dataclass(frozen=True)
class LinkFit:
    """Latency and bandwidth of a group's links, fitted or given.

    Attributes:
        latency: seconds per message (alpha).
        bandwidth: bytes per second each way (beta).
        rel_rmse: root mean square relative error of the fit over the probes (0 when given).
        samples: probes the fit used (0 when given).
        probes: the measured ``(elements, seconds)`` pairs behind the fit (empty when given).
    """

    latency: float
    bandwidth: float
    rel_rmse: float = 0.0
    samples: int = 0
    probes: Tuple[Tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        check_positive("latency", self.latency, allow_zero=True)
        check_positive("bandwidth", self.bandwidth)
        check_positive("rel_rmse", self.rel_rmse, allow_zero=True)
        try:  # a fit read back from JSON holds lists
            probes = tuple((int(n), float(t)) for n, t in self.probes)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"probes must hold (elements, seconds) pairs, got {self.probes!r}") from exc
        object.__setattr__(self, "probes", probes)


@dataclass(frozen=True)
class NetworkFit:
    """Everything the policy decides from: the links and the codec speed per width.

    Attributes:
        link: the process group's links (between nodes when there are several).
        intra: the links inside a node (hierarchical mode), or None.
        codec: ``((bits, CodecThroughput), ...)`` for every quantized candidate.
        source: ``given`` or a description of the measurement.
        overhead: ``((bits, seconds), ...)``: a fixed cost of every quantized bucket exchange that
            the model of links and codec does not hold (per-bucket work, a pipeline's fill and
            drain), found by timing the hook's exchange end to end at two bucket sizes; none: 0.
    """

    link: LinkFit
    intra: Optional[LinkFit] = None
    codec: Tuple[Tuple[int, CodecThroughput], ...] = ()
    source: str = "given"
    overhead: Tuple[Tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.link, LinkFit):
            raise TypeError(f"link must be a LinkFit, got {type(self.link).__name__}")
        if self.intra is not None and not isinstance(self.intra, LinkFit):
            raise TypeError(f"intra must be a LinkFit or None, got {type(self.intra).__name__}")
        for item in self.codec:
            if not (isinstance(item, tuple) and len(item) == 2 and item[0] in _CANDIDATES[1:] and isinstance(item[1], CodecThroughput)):
                raise TypeError(f"codec must hold (bits, CodecThroughput) pairs with bits in (8, 4, 2), got {item!r}")
        try:  # a fit read back from JSON holds lists
            overhead = tuple((int(b), float(t)) for b, t in self.overhead)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"overhead must hold (bits, seconds) pairs, got {self.overhead!r}") from exc
        if any(b not in _CANDIDATES[1:] or not (t >= 0 and math.isfinite(t)) for b, t in overhead):
            raise ValueError(f"overhead must hold (bits in (8, 4, 2), seconds >= 0) pairs, got {self.overhead!r}")
        object.__setattr__(self, "overhead", overhead)

    def overhead_for(self, bits: int) -> float:
        """Return the fixed seconds per bucket of ``bits`` that the end-to-end probe found (0 when none)."""
        return next((t for b, t in self.overhead if b == bits), 0.0)

    def codec_for(self, bits: int) -> CodecThroughput:
        """Return the codec throughput of ``bits``."""
        for b, tp in self.codec:
            if b == bits:
                return tp
        raise ValueError(f"the network fit has no codec throughput for int{bits}; it has {[b for b, _ in self.codec]}")

    def to_dict(self) -> Dict[str, Any]:
        """Return a plain dict (for checkpoints and logs); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NetworkFit":
        """Rebuild a fit from :meth:`to_dict`'s output."""
        intra = d.get("intra")
        return cls(
            link=LinkFit(**d["link"]),
            intra=LinkFit(**intra) if intra is not None else None,
            codec=tuple((int(b), CodecThroughput(**tp)) for b, tp in d.get("codec", ())),
            source=str(d.get("source", "given")),
            overhead=tuple(d.get("overhead", ())),
        )


@dataclass(frozen=True)
class PolicyConfig:
    """Knobs of the measured policy.

    Attributes:
        candidates: what a bucket may use: 32 (plain fp32 all-reduce), 8, 4 or 2 (quantized).
        min_bits: accuracy floor: quantized candidates below it are never chosen (8: never int4).
        probe_numels: fp32 elements of the probing all-reduces, growing; up to the size of a DDP
            bucket, so that the fit does not extrapolate far (it costs a few seconds at 1 Gbit/s).
        probe_repeats: timed repeats per size (median kept), after one warm-up.
        codec_numel: elements of the codec timing and of the end-to-end exchange: several of the
            hook's chunks (so the pipeline's overlap is in the timing) and more than a CPU cache
            holds (the hook reads its buckets from memory; a bucket that stays in the cache between
            timed calls is coded several times faster). None (default): two of the hook's chunks,
            at least ``2**22`` (4M at 2 ranks, 8M at 4).
        fit: injected figures; when given, nothing is probed or timed.
        min_gain: a quantized width replaces plain all-reduce only where it is predicted at least
            this fraction faster (0.2: 20%). Plain all-reduce is exact and the predictions are off
            by up to about 25% on some buckets (docs/costmodel.md); without a margin a near tie
            (no rate limit: plain 78 ms, int4 predicted 67 ms, measured 86 ms on 2 emulated hosts)
            went to the lossy route and made the step slower.
    """

    candidates: Tuple[int, ...] = (PLAIN, 8, 4)
    min_bits: int = 4
    probe_numels: Tuple[int, ...] = (256, 4096, 65536, 262144, 1048576, 4194304)
    probe_repeats: int = 3
    codec_numel: Optional[int] = None
    fit: Optional[NetworkFit] = None
    min_gain: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.candidates, tuple) or not self.candidates:
            raise TypeError(f"candidates must be a non-empty tuple such as (32, 8, 4), got {self.candidates!r}")
        bad = [c for c in self.candidates if c not in _CANDIDATES]
        if bad:
            raise ValueError(f"candidates must be among {_CANDIDATES} (32: plain fp32 all-reduce), got {bad}")
        if self.min_bits not in (2, 4, 8, PLAIN):
            raise ValueError(f"min_bits must be one of (2, 4, 8, 32), got {self.min_bits!r}")
        if not [c for c in self.candidates if c >= self.min_bits]:
            raise ValueError(f"min_bits={self.min_bits} rules out every candidate of {self.candidates}")
        if (
            not isinstance(self.probe_numels, tuple)
            or len(self.probe_numels) < 2
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.probe_numels)
            or len(set(self.probe_numels)) < 2
        ):
            raise ValueError(f"probe_numels must be a tuple of at least 2 distinct positive ints, got {self.probe_numels!r}")
        for name in ("probe_repeats", "codec_numel"):
            v = getattr(self, name)
            if name == "codec_numel" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.min_gain, bool) or not isinstance(self.min_gain, (int, float)) or not 0 <= self.min_gain < 1:
            raise ValueError(f"min_gain must be a number in [0, 1), got {self.min_gain!r}")
        if self.fit is not None and not isinstance(self.fit, NetworkFit):
            raise TypeError(f"fit must be a NetworkFit or None, got {type(self.fit).__name__}")

    @property
    def allowed(self) -> Tuple[int, ...]:
        """The candidates the accuracy floor lets through, widest first."""
        return tuple(sorted((c for c in self.candidates if c >= self.min_bits), reverse=True))


# --------------------------------------------------------------------------------------------
# fitting


def _ring_terms(numel: int, workers: int) -> Tuple[float, float]:
    """(latency coefficient, wire bytes) of an fp32 ring all-reduce in the cost model."""
    e = estimate(_RING_FP32, numel, Cluster(workers, bandwidth=1.0, latency=1.0))
    return e.latency_s, e.wire_bytes


def fit_latency_bandwidth(numels: Sequence[int], times: Sequence[float], workers: int) -> LinkFit:
    """Fit ``alpha`` and ``beta`` of the cost model's fp32 ring all-reduce to measured times.

    The model is ``t(n) = k alpha + w(n) / beta`` with ``k = 2 (P-1)`` and ``w(n) = 2 (P-1)/P * 4 n``
    (:func:`gradcomp.costmodel.estimate` of ``ring-fp32``). Each term is taken where it dominates:

    1. ``1 / beta`` by least squares through ``(0, k alpha0)`` over every probe, unweighted, so the
       largest probes (the sustained rate) set it; ``alpha0`` is the smallest probe's time over ``k``.
       Mid-sized probes often run faster than the sustained rate (a rate limiter's burst, socket
       buffers): a fit that weighs every probe alike then reports a link faster than it is, and
       under-predicts every bucket-sized transfer.
    2. ``alpha`` from the latency-bound probes (the bandwidth term under 10% of the time: the least
       of their ``(t - w / beta) / k``, as scheduling delays only add), clamped at 0; 0 when no
       probe is latency-bound.
    3. ``1 / beta`` again with that ``alpha``; steps 2 and 3 repeat until ``alpha`` settles.

    Example: on 2 ranks (``k = 2``, ``w = 4 n``) times 1.0 ms for 256 elements, 4.0 ms for 1e5 and
    34.0 ms for 1e6 give ``alpha`` about 0.5 ms and ``beta`` about 120 MB/s.

    Args:
        numels: fp32 elements of each probe.
        times: seconds of each probe.
        workers: ranks of the probed group (P >= 2).

    Returns:
        A :class:`LinkFit` (with the probes it was fitted on).
    """
    if len(numels) != len(times) or len(numels) < 2:
        raise ValueError(f"numels and times must have the same length >= 2, got {len(numels)} and {len(times)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 2:
        raise ValueError(f"workers must be an int >= 2 (a link needs two ends), got {workers!r}")
    if any(not (t > 0 and math.isfinite(t)) for t in times):
        raise ValueError(f"times must be positive finite seconds, got {list(times)}")
    # plain float arithmetic: bit-identical on every rank, which a LAPACK solver does not promise
    terms = [_ring_terms(int(n), workers) for n in numels]
    t = [float(x) for x in times]
    ks, ws = [k for k, _ in terms], [w for _, w in terms]
    sww = sum(w * w for w in ws)

    def slope(alpha: float) -> float:
        return sum(w * (ti - k * alpha) for k, w, ti in zip(ks, ws, t)) / sww

    small = min(range(len(t)), key=lambda i: ws[i])
    alpha = t[small] / ks[small]
    inv_beta = slope(alpha)
    for _ in range(50):  # steps 2 and 3 to a fixed point (each moves alpha by a factor w_small / w_large)
        if inv_beta <= 0:
            break
        bound = sorted((ti - w * inv_beta) / k for k, w, ti in zip(ks, ws, t) if w * inv_beta < 0.1 * ti)
        new_alpha = max(0.0, bound[0]) if bound else 0.0  # the least: scheduling delays only add
        converged = abs(new_alpha - alpha) <= 1e-12 * max(alpha, 1e-30)
        alpha, inv_beta = new_alpha, slope(new_alpha)
        if converged:
            break
    if inv_beta <= 0:  # times did not grow with size: latency-bound; take the largest probe's slope as a floor
        inv_beta = max(t) / max(ws)
        alpha = 0.0
    pred = [k * alpha + w * inv_beta for k, w in terms]
    rel_rmse = math.sqrt(sum(((p - ti) / ti) ** 2 for p, ti in zip(pred, t)) / len(t))
    return LinkFit(latency=alpha, bandwidth=1.0 / inv_beta, rel_rmse=rel_rmse, samples=len(numels),
                   probes=tuple((int(n), ti) for n, ti in zip(numels, t)))


# --------------------------------------------------------------------------------------------
# measuring (collective: every rank of the groups calls these in the same order)


def _agree_max(values: List[float], group) -> List[float]:
    """Return the elementwise maximum of ``values`` over the ranks of ``group``."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [float(v) for v in t]


def probe_bucket_numel(config: PolicyConfig, chunk_numel: Optional[int]) -> int:
    """Values of the probe's bucket: ``config.codec_numel``, else two of the hook's chunks and at least ``2**22``."""
    if config.codec_numel is not None:
        return config.codec_numel
    return max(1 << 22, 2 * (chunk_numel or 0))


def probe_network(
    config: PolicyConfig,
    group,
    intra_group=None,
    *,
    block_size: int = 256,
    fused: bool = True,
    device="cpu",
    exchange: Optional[Callable[[int, torch.Tensor], None]] = None,
    nodes: Optional[int] = None,
    chunk_numel: Optional[int] = DEFAULT_CHUNK_NUMEL,
) -> NetworkFit:
    """Measure the links and the codec, agree on the numbers over ``group``, and fit (collective).

    Steps: probe ``group`` (and ``intra_group``, every node's at once, when given); time the hook's
    own local work per candidate width (:func:`gradcomp.comm.measure.measure_hook_codec`: the
    exchange steps with error feedback, buffers and copies, as the hook runs them); take every
    number's maximum over the ranks of ``group``; fit each link with :func:`fit_latency_bandwidth`.

    With ``exchange`` (``exchange(bits, x)`` runs the hook's whole quantized exchange of ``x`` on
    the real groups as a step runs it: its chunks pipelined with async collectives, its kernels,
    persistent buffers and residuals), the exchange is also timed end to end (the slowest rank) on
    a bucket of ``codec_numel`` elements and on one of a quarter of it; where the model (links +
    local timing, pipelined by ``chunk_numel``, ``2 (P-1)`` messages per chunk) predicts other
    times, the codec figure is scaled and a fixed cost per bucket added until it reproduces both
    (:func:`_codec_matching`): what the local timing cannot see (contention for the cores between
    the ranks, gloo's threads and the codec, an overlap the pipeline does not reach, traffic inside
    the node, per-bucket work) is then included.

    Args:
        config: the :class:`PolicyConfig` (sizes, repeats, candidates).
        group: the group the hook averages over.
        intra_group: this rank's node group (hierarchical mode), or None.
        block_size: the hook's block size (the codec timing uses it).
        fused: time the fused codec kernels (as the hook will run them).
        device: where the buffers live.
        exchange: the hook's whole exchange, for the end-to-end timing (optional).
        nodes: nodes in hierarchical mode (M), or None.
        chunk_numel: the hook's pipelined chunk size (None: no pipelining).

    Returns:
        The :class:`NetworkFit`, identical on every rank of ``group``.
    """
    numels = list(config.probe_numels)
    P = dist.get_world_size(group)
    times = probe_allreduce(group, numels, config.probe_repeats, device)
    L = dist.get_world_size(intra_group) if intra_group is not None else 1
    intra_times = probe_allreduce(intra_group, numels, config.probe_repeats, device) if L > 1 else []
    widths = [b for b in config.candidates if b != PLAIN]
    n = probe_bucket_numel(config, chunk_numel)
    # the quantized exchange runs over the nodes in hierarchical mode, over every rank otherwise
    ranks = nodes if nodes is not None and 1 < nodes < P else P
    measured = [measure_hook_codec(b, block_size, n, ranks, config.probe_repeats, fused, device, chunk_numel) for b in widths]
    # seconds, so that the max over ranks is the slowest rank's pace
    codec_times = [t for tp in measured for t in (n / tp.quantize_eps, n / tp.dequantize_eps)]
    agreed = _agree_max(times + intra_times + codec_times, group)
    times, intra_times, codec_times = agreed[: len(numels)], agreed[len(numels) : len(numels) + len(intra_times)], agreed[len(numels) + len(intra_times) :]
    link = fit_latency_bandwidth(numels, times, P)
    intra = fit_latency_bandwidth(numels, intra_times, L) if L > 1 else None
    tps = [
        (b, CodecThroughput(n / codec_times[2 * i], n / codec_times[2 * i + 1], measured[i].source + ", slowest rank"))
        for i, b in enumerate(widths)
    ]
    overhead = []
    if exchange is not None and widths:
        # the whole exchange on the real groups: where it takes longer (or shorter) than the model
        # predicts from the links and the local timing (contention, the collectives' own copies),
        # the codec figure is scaled until the model reproduces it
        # and at a quarter of that bucket as well: the two sizes separate a fixed cost per bucket
        # from the part that grows with the bucket
        x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
        # a quarter of the big one: sizes 4x apart separate the fixed cost from the per-value one
        # (2x apart, the fit followed the noise: at 2 hosts with 2M-value chunks and no rate limit it
        # predicted int4 40% short and chose it over plain all-reduce)
        small = max(1, n // 4)
        reps = max(7, config.probe_repeats)
        ex_big = _time_exchanges(exchange, widths, x, reps, group, device)
        ex_small = _time_exchanges(exchange, widths, x[:small], reps, group, device)
        probe_policy = CommPolicy(config, NetworkFit(link=link, intra=intra, codec=tuple(tps)), P, nodes, block_size, chunk_numel)
        for i, b in enumerate(widths):
            scaled = _codec_matching(probe_policy, b, (small, ex_small[i]), (n, ex_big[i]), tps[i][1])
            if scaled is not None:
                tps[i] = (b, scaled[0])
                overhead.append((b, scaled[1]))
    return NetworkFit(link=link, intra=intra, codec=tuple(tps), source=f"measured on {P} ranks, max over ranks, sizes {numels}",
                      overhead=tuple(overhead))


def _time_exchanges(exchange: Callable[[int, torch.Tensor], None], widths: Sequence[int], x: torch.Tensor, repeats: int,
                    group, device) -> List[float]:
    """Time ``exchange(bits, x)`` for every width; return per width the median over repeats of the slowest rank (collective).

    One warm-up call per width, then ``repeats`` rounds that take the widths in turn (so a change
    of load hits every width alike), each call after a barrier. Every call's time is agreed as its
    maximum over the ranks (an exchange ends when its slowest rank does) before the median is taken,
    as a step's communication is measured.
    """
    for b in widths:
        dist.barrier(group=group)
        exchange(b, x)
    samples = []
    for _ in range(repeats):
        for b in widths:
            samples.append(timed(lambda: exchange(b, x), 1, warmup=0, device=device, before=lambda: dist.barrier(group=group)))
    agreed = _agree_max(samples, group)
    k = len(widths)
    return [statistics.median(agreed[i::k]) for i in range(k)]


def _codec_matching(policy: "CommPolicy", bits: int, small: Tuple[int, float], big: Tuple[int, float],
                    local: CodecThroughput) -> Optional[Tuple[CodecThroughput, float]]:
    """Scale ``local`` and find a fixed cost so the policy's model reproduces two measured exchanges at ``bits``.

    ``small`` and ``big`` are ``(elements, seconds)`` of the hook's whole exchange of a bucket. The
    model's time ``T(n, m)`` with the codec ``m`` times slower than ``local`` grows with ``m``, and
    faster for the bigger bucket, so ``m`` is found by bisection (``1e-2`` to ``1e4``) on
    ``T(big, m) - T(small, m) = t_big - t_small``; the fixed cost is ``a = t_small - T(small, m)``.
    When that has no solution or gives ``a < 0``, ``m`` matches the big bucket exactly with the
    ``a`` in ``[0, t_small]`` (65 steps) that brings the small bucket closest.

    Returns:
        ``(scaled codec throughput, a seconds)``, or None when even no codec time at all predicts
        more than the big bucket took.
    """

    def predicted(numel: int, m: float) -> float:
        tp = CodecThroughput(local.quantize_eps / m, local.dequantize_eps / m)
        return estimate(policy.scheme(bits), numel, policy.cluster, tp, policy.block_size, policy.chunk_numel).total_s

    def solve(f: Callable[[float], float], target: float) -> Optional[float]:
        lo, hi = 1e-2, 1e4
        if not (f(lo) < target < f(hi)):
            return None
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return math.sqrt(lo * hi)

    (ns, ts), (nb, tb) = small, big
    m = solve(lambda m: predicted(nb, m) - predicted(ns, m), tb - ts) if nb > ns else None
    a = ts - predicted(ns, m) if m is not None else -1.0
    if -1e-6 * ts <= a < 0:  # exact up to the bisection's rounding
        a = 0.0
    if a < 0:
        # no exact fit: the big bucket matched exactly, and the fixed cost in [0, t_small] that
        # brings the small one closest (a = 0 when none helps)
        best = None
        for k in range(65):
            ak = ts * k / 64
            mk = solve(lambda m: predicted(nb, m), tb - ak)
            if mk is None:
                continue
            err = abs(predicted(ns, mk) + ak - ts)
            if best is None or err < best[0] - 1e-6 * ts:  # ties keep the smaller fixed cost
                best = (err, mk, ak)
        if best is None:
            return None
        _, m, a = best
    src = (f"{local.source}; scaled {m:.2f}x, plus {a * 1e3:.2f} ms per bucket, to the int{bits} exchanges measured end to end "
           f"({ns} elements {ts * 1e3:.2f} ms, {nb} elements {tb * 1e3:.2f} ms)")
    return CodecThroughput(local.quantize_eps / m, local.dequantize_eps / m, src), a


# --------------------------------------------------------------------------------------------
# deciding


class CommPolicy:
    """Per-bucket choice among plain all-reduce and the quantized widths, from a :class:`NetworkFit`.

    Args:
        config: the :class:`PolicyConfig` (candidates, accuracy floor).
        fit: the figures to decide from (measured by :func:`probe_network` or given).
        workers: ranks the hook averages over (P).
        nodes: nodes in hierarchical mode (M), or None for the flat exchange.
        block_size: the hook's block size.

    Example:
        >>> from gradcomp.costmodel import CodecThroughput
        >>> fast = NetworkFit(LinkFit(10e-6, 10e9), codec=((8, CodecThroughput(5e8, 5e8)),))
        >>> CommPolicy(PolicyConfig(candidates=(32, 8)), fast, workers=4).choose(1_000_000)
        32
    """

    def __init__(
        self, config: PolicyConfig, fit: NetworkFit, workers: int, nodes: Optional[int] = None, block_size: int = 256,
        chunk_numel: Optional[int] = DEFAULT_CHUNK_NUMEL,
    ):
        if not isinstance(config, PolicyConfig):
            raise TypeError(f"config must be a PolicyConfig, got {type(config).__name__}")
        if not isinstance(fit, NetworkFit):
            raise TypeError(f"fit must be a NetworkFit, got {type(fit).__name__}")
        for b in config.allowed:
            if b != PLAIN:
                fit.codec_for(b)
        self.config = config
        self.fit = fit
        self.block_size = block_size
        self.chunk_numel = chunk_numel
        self.hierarchical = nodes is not None and 1 < nodes < workers
        if self.hierarchical:
            intra = fit.intra or LinkFit(latency=0.0, bandwidth=1e12)
            self.cluster = Cluster(workers, fit.link.bandwidth, fit.link.latency, nodes, intra.bandwidth, intra.latency)
        else:
            self.cluster = Cluster(workers, fit.link.bandwidth, fit.link.latency)
        self._cache: Dict[int, Tuple[int, Dict[str, float]]] = {}

    def scheme(self, bits: int) -> Scheme:
        """Return the cost model's :class:`~gradcomp.costmodel.Scheme` of a candidate (``.name``: ``twophase-int8``...)."""
        if bits == PLAIN:
            return _RING_FP32
        return Scheme.exchange(bits, self.hierarchical)

    def predict(self, numel: int) -> Dict[int, float]:
        """Return the predicted seconds of every allowed candidate for a bucket of ``numel`` elements."""
        out = {}
        for b in self.config.allowed:
            tp = None if b == PLAIN else self.fit.codec_for(b)
            out[b] = estimate(self.scheme(b), max(1, int(numel)), self.cluster, tp, self.block_size, self.chunk_numel).total_s
            if b != PLAIN:
                out[b] += self.fit.overhead_for(b)
        return out

    def choose(self, numel: int) -> int:
        """Return the fastest allowed candidate for ``numel`` elements (32: plain all-reduce); ties go to the wider.

        Plain all-reduce, when allowed, is kept unless the fastest quantized width is predicted at
        least ``config.min_gain`` faster.
        """
        hit = self._cache.get(numel)
        if hit is None:
            pred = self.predict(numel)
            best = min(pred, key=lambda b: (pred[b], -b))
            if best != PLAIN and PLAIN in pred and pred[best] > (1.0 - self.config.min_gain) * pred[PLAIN]:
                best = PLAIN
            hit = self._cache[numel] = (best, pred)
        return hit[0]

    def describe(self) -> str:
        """One line with the fitted figures, for the log."""
        f = self.fit
        parts = [f"link alpha {f.link.latency * 1e6:.1f} us, beta {f.link.bandwidth / 1e6:.1f} MB/s (fit rel. rmse {f.link.rel_rmse:.2f})"]
        if f.intra is not None:
            parts.append(f"intra alpha {f.intra.latency * 1e6:.1f} us, beta {f.intra.bandwidth / 1e6:.1f} MB/s (rmse {f.intra.rel_rmse:.2f})")
        for b, tp in f.codec:
            extra = f" + {f.overhead_for(b) * 1e3:.2f} ms per bucket" if f.overhead_for(b) else ""
            parts.append(f"int{b} codec {tp.quantize_eps / 1e6:.0f}/{tp.dequantize_eps / 1e6:.0f} Melem/s (quantize/dequantize){extra}")
        return "; ".join(parts) + f" [{f.source}]"

    def describe_choice(self, numel: int) -> str:
        """One line with the decision for ``numel`` elements and the predicted times."""
        best = self.choose(numel)
        pred = self._cache[numel][1]
        times = ", ".join(f"{self.scheme(b).name} {pred[b] * 1e3:.3f} ms" for b in sorted(pred, reverse=True))
        return f"{numel} elements -> {self.scheme(best).name} ({times})"
