"""A measured policy: per bucket, plain all-reduce or a quantized wire format, whichever the network makes fastest.

On a fast network the codec can cost more than the bytes it saves; on a slow one compression wins.
The policy measures which case this job is in and decides per bucket size:

1. Probe the hook's process group with fp32 all-reduces of growing size (``probe_numels``, each
   timed ``probe_repeats`` times after a warm-up, the median kept); with a topology, probe each
   node's group the same way. Every rank takes the maximum over ranks of each time, so every rank
   fits the same numbers.
2. Fit the latency-bandwidth model of :mod:`gradcomp.comm.cost` to them: a ring all-reduce of
   ``n`` fp32 elements on ``P`` ranks takes ``2 (P-1) alpha + (2 (P-1)/P * 4 n) / beta``; a weighted
   least-squares fit (relative error) gives ``alpha`` and ``beta`` (:func:`fit_latency_bandwidth`).
3. Time the hook's own codec kernels (error-feedback quantization and dequantization) on this
   machine for each candidate width; the slowest rank's times count.
4. For a bucket of ``n`` elements, predict with :func:`gradcomp.comm.cost.estimate` the time of
   ``ring-fp32`` and of ``twophase-F`` (flat) or ``hier-F`` (with a topology) for every candidate
   wire format ``F``, codec time included, and pick the fastest candidate allowed by the accuracy
   floor ``min_bits``.

Candidates are :data:`PLAIN` (32: plain fp32 all-reduce) and wire formats, by registry name
(``"int4"``) or bits (``4``); each is kept in its shorter spelling
(:attr:`~gradcomp.codec.formats.WireFormat.short`: ``8``, ``4``, ``2`` for the int formats), which is
what :meth:`CommPolicy.choose` returns.

The decision depends only on numbers every rank agreed on and on the bucket's size, so it is the
same on every rank. Tests and users who know their network inject the figures with
``PolicyConfig(fit=NetworkFit(...))``; nothing is timed then.

Example (injected figures, 4 ranks on 2 nodes, 1 Gbit/s between nodes)::

    fit = NetworkFit(link=LinkFit(latency=50e-6, bandwidth=125e6), intra=LinkFit(20e-6, 5e9),
                     codec=((8, CodecThroughput(1e9, 1e9)), (4, CodecThroughput(8e8, 8e8))))
    policy = CommPolicy(PolicyConfig(fit=fit), fit, workers=4, nodes=2, block_size=256)
    policy.describe_choice(4_000_000)
    # '4000000 elements -> hier-int4 (ring-fp32 192.300 ms, hier-int8 39.347 ms, hier-int4 24.219 ms)'
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from gradcomp.codec.formats import FORMATS, WireFormat, wire_format
from gradcomp.comm.cost import Cluster, CodecThroughput, Scheme, estimate
from gradcomp.comm.fit import (
    PLAIN,
    Candidate,
    LinkFit,
    NetworkFit,
    candidate,
    candidate_label,
    candidate_width,
    fit_latency_bandwidth,
)
from gradcomp.comm.measure import measure_hook_codec, probe_allreduce, timed
from gradcomp.comm.plan import DEFAULT_CHUNK_NUMEL

logger = logging.getLogger(__name__)

_RING_FP32 = Scheme.plain()

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

@dataclass(frozen=True)
class PolicyConfig:
    """Knobs of the measured policy.

    Attributes:
        candidates: what a bucket may use: 32 (plain fp32 all-reduce) and wire formats, by bits
            (8, 4, 2) or registry name (``"int8"``); kept as :data:`PLAIN` and the formats' short
            spellings.
        min_bits: accuracy floor: quantized candidates of fewer bits per value are never chosen
            (8: never int4).
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
        error_budget: widths chosen by error as well: a bucket may only use a quantized candidate
            whose relative quantization error on the bucket's own gradient,
            ``sqrt(sum_ranks ||Q(g) - g||^2 / sum_ranks ||g||^2)``, is at most this (0.1: 10%),
            measured at the bucket's first compressed step and every ``measure_every`` steps
            after (:mod:`gradcomp.comm.budget`); among those the network decides as above. None
            (default): the network alone decides.
        measure_every: steps between two measurements of the error budget (0: measure once).
    """

    candidates: Tuple[Candidate, ...] = (PLAIN, 8, 4)
    min_bits: int = 4
    probe_numels: Tuple[int, ...] = (256, 4096, 65536, 262144, 1048576, 4194304)
    probe_repeats: int = 3
    codec_numel: Optional[int] = None
    fit: Optional[NetworkFit] = None
    min_gain: float = 0.2
    error_budget: Optional[float] = None
    measure_every: int = 100

    def __post_init__(self) -> None:
        if not isinstance(self.candidates, tuple) or not self.candidates:
            raise TypeError(f"candidates must be a non-empty tuple such as (32, 8, 4), got {self.candidates!r}")
        object.__setattr__(self, "candidates", tuple(dict.fromkeys(candidate(c) for c in self.candidates)))
        widths = tuple(sorted({f.bits for f in FORMATS.values()} | {PLAIN}))
        if isinstance(self.min_bits, bool) or self.min_bits not in widths:
            raise ValueError(f"min_bits must be one of {widths}, got {self.min_bits!r}")
        if not [c for c in self.candidates if candidate_width(c) >= self.min_bits]:
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
        if self.error_budget is not None and (
            isinstance(self.error_budget, bool) or not isinstance(self.error_budget, (int, float)) or not 0 < self.error_budget < 10
        ):
            raise ValueError(f"error_budget must be a relative error in (0, 10) such as 0.1, or None, got {self.error_budget!r}")
        if isinstance(self.measure_every, bool) or not isinstance(self.measure_every, int) or self.measure_every < 0:
            raise ValueError(f"measure_every must be an int >= 0 (0: measure once), got {self.measure_every!r}")

    @property
    def allowed(self) -> Tuple[Candidate, ...]:
        """The candidates the accuracy floor lets through, widest first (then in the given order)."""
        return tuple(sorted((c for c in self.candidates if candidate_width(c) >= self.min_bits), key=candidate_width, reverse=True))

    @property
    def formats(self) -> Tuple[WireFormat, ...]:
        """The quantized candidates the accuracy floor lets through, as :class:`~gradcomp.codec.formats.WireFormat` s."""
        return tuple(wire_format(c) for c in self.allowed if c != PLAIN)


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
    src = (f"{local.source}; scaled {m:.2f}x, plus {a * 1e3:.2f} ms per bucket, to the {candidate_label(bits)} exchanges measured end to end "
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
        >>> from gradcomp.comm.cost import CodecThroughput
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
        self._cache: Dict[Tuple[int, Optional[Tuple[Candidate, ...]]], Tuple[Candidate, Dict[Candidate, float]]] = {}

    def scheme(self, candidate: Candidate) -> Scheme:
        """Return the cost model's :class:`~gradcomp.comm.cost.Scheme` of a candidate (``.name``: ``twophase-int8``...)."""
        if candidate == PLAIN:
            return _RING_FP32
        return Scheme.exchange(candidate, self.hierarchical)

    def predict(self, numel: int, allowed: Optional[Sequence[Candidate]] = None) -> Dict[Candidate, float]:
        """Return the predicted seconds of every allowed candidate (or of those in ``allowed``) for ``numel`` elements."""
        out = {}
        for b in self.config.allowed:
            if allowed is not None and b not in allowed:
                continue
            tp = None if b == PLAIN else self.fit.codec_for(b)
            out[b] = estimate(self.scheme(b), max(1, int(numel)), self.cluster, tp, self.block_size, self.chunk_numel).total_s
            if b != PLAIN:
                out[b] += self.fit.overhead_for(b)
        return out

    def choose(self, numel: int, allowed: Optional[Sequence[Candidate]] = None) -> Candidate:
        """Return the fastest allowed candidate for ``numel`` elements (32: plain all-reduce); ties go to the wider.

        A quantized candidate comes back in its short spelling (``8`` for int8). ``allowed``
        narrows the candidates further (the error budget's verdict for a bucket); it must keep
        at least one of them.

        Plain all-reduce, when allowed, is kept unless the fastest quantized width is predicted at
        least ``config.min_gain`` faster.
        """
        key = (numel, None if allowed is None else tuple(allowed))
        hit = self._cache.get(key)
        if hit is None:
            pred = self.predict(numel, allowed)
            if not pred:
                raise ValueError(f"allowed={tuple(allowed)!r} keeps none of the policy's candidates {self.config.allowed}")
            best = min(pred, key=lambda b: (pred[b], -candidate_width(b)))
            if best != PLAIN and PLAIN in pred and pred[best] > (1.0 - self.config.min_gain) * pred[PLAIN]:
                best = PLAIN
            hit = self._cache[key] = (best, pred)
        return hit[0]

    def describe(self) -> str:
        """One line with the fitted figures, for the log."""
        f = self.fit
        parts = [f"link alpha {f.link.latency * 1e6:.1f} us, beta {f.link.bandwidth / 1e6:.1f} MB/s (fit rel. rmse {f.link.rel_rmse:.2f})"]
        if f.intra is not None:
            parts.append(f"intra alpha {f.intra.latency * 1e6:.1f} us, beta {f.intra.bandwidth / 1e6:.1f} MB/s (rmse {f.intra.rel_rmse:.2f})")
        for b, tp in f.codec:
            extra = f" + {f.overhead_for(b) * 1e3:.2f} ms per bucket" if f.overhead_for(b) else ""
            parts.append(f"{candidate_label(b)} codec {tp.quantize_eps / 1e6:.0f}/{tp.dequantize_eps / 1e6:.0f} Melem/s (quantize/dequantize){extra}")
        return "; ".join(parts) + f" [{f.source}]"

    def describe_choice(self, numel: int, allowed: Optional[Sequence[Candidate]] = None) -> str:
        """One line with the decision for ``numel`` elements (among ``allowed``) and the predicted times."""
        best = self.choose(numel, allowed)
        pred = self._cache[(numel, None if allowed is None else tuple(allowed))][1]
        times = ", ".join(f"{self.scheme(b).name} {pred[b] * 1e3:.3f} ms" for b in sorted(pred, key=candidate_width, reverse=True))
        return f"{numel} elements -> {self.scheme(best).name} ({times})"
