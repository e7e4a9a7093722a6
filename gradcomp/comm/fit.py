"""The figures the communication policy decides from: fitted links, codec speeds, and what a candidate is.

* :data:`PLAIN` and the candidates: plain fp32 all-reduce (32) or a wire format, by bits or registry
  name, kept in its short spelling (:attr:`~gradcomp.codec.formats.WireFormat.short`);
* :class:`LinkFit`: a group's latency and bandwidth, :func:`fit_latency_bandwidth` fits them to
  timed all-reduces with the cost model's ring all-reduce (:mod:`gradcomp.comm.cost`);
* :class:`NetworkFit`: the links and the codec speed per format, measured or given.

The policy itself (probing, deciding) is :mod:`gradcomp.comm.policy`; import these names from there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from gradcomp.checks import check_positive
from gradcomp.codec.formats import FORMATS, WireFormat, wire_format
from gradcomp.comm.cost import Cluster, CodecThroughput, Scheme, estimate

__all__ = [
    "PLAIN",
    "Candidate",
    "candidate",
    "candidate_width",
    "candidate_label",
    "LinkFit",
    "NetworkFit",
    "fit_latency_bandwidth",
]

_RING_FP32 = Scheme.plain()

PLAIN = 32  # the "bits" of plain fp32 all-reduce among the candidates
_RING_FP32 = Scheme.plain()

Candidate = Union[int, str]


def candidate(c: Any, name: str = "candidates") -> Candidate:
    """``c`` as the policy keeps it: :data:`PLAIN`, or the short spelling of the wire format it names."""
    if isinstance(c, int) and not isinstance(c, bool) and c == PLAIN:
        return PLAIN
    try:
        return wire_format(c, name).short
    except (TypeError, ValueError):
        known = (PLAIN,) + tuple(f.short for f in FORMATS.values())
        raise ValueError(f"{name} must be among {known} (32: plain fp32 all-reduce) or format names, got {c!r}") from None


def candidate_width(c: Candidate) -> int:
    """Bits per value of a candidate: 32 for plain all-reduce, the format's bits otherwise."""
    return PLAIN if c == PLAIN else wire_format(c).bits


def candidate_label(c: Candidate) -> str:
    """``int8``, ``int4``, ...: the candidate's format name (``fp32`` for plain all-reduce)."""
    return "fp32" if c == PLAIN else wire_format(c).name


def _format_or_none(spec: Any) -> Optional[WireFormat]:
    try:
        return wire_format(spec)
    except (TypeError, ValueError):
        return None


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
        codec: ``((format, CodecThroughput), ...)`` for every quantized candidate (a format by its
            bits or name, kept in its short spelling).
        source: ``given`` or a description of the measurement.
        overhead: ``((format, seconds), ...)``: a fixed cost of every quantized bucket exchange that
            the model of links and codec does not hold (per-bucket work, a pipeline's fill and
            drain), found by timing the hook's exchange end to end at two bucket sizes; none: 0.
    """

    link: LinkFit
    intra: Optional[LinkFit] = None
    codec: Tuple[Tuple[Candidate, CodecThroughput], ...] = ()
    source: str = "given"
    overhead: Tuple[Tuple[Candidate, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.link, LinkFit):
            raise TypeError(f"link must be a LinkFit, got {type(self.link).__name__}")
        if self.intra is not None and not isinstance(self.intra, LinkFit):
            raise TypeError(f"intra must be a LinkFit or None, got {type(self.intra).__name__}")
        codec = []
        for item in self.codec:
            fmt = _format_or_none(item[0]) if isinstance(item, tuple) and len(item) == 2 else None
            if fmt is None or not isinstance(item[1], CodecThroughput):
                raise TypeError(f"codec must hold (format, CodecThroughput) pairs with a wire format (bits or name), got {item!r}")
            codec.append((fmt.short, item[1]))
        object.__setattr__(self, "codec", tuple(codec))
        try:  # a fit read back from JSON holds lists
            overhead = tuple((b, float(t)) for b, t in self.overhead)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"overhead must hold (format, seconds) pairs, got {self.overhead!r}") from exc
        fmts = [_format_or_none(b) for b, _ in overhead]
        if any(f is None for f in fmts) or any(not (t >= 0 and math.isfinite(t)) for _, t in overhead):
            raise ValueError(f"overhead must hold (wire format, seconds >= 0) pairs, got {self.overhead!r}")
        object.__setattr__(self, "overhead", tuple((f.short, t) for f, (_, t) in zip(fmts, overhead)))

    def overhead_for(self, fmt: Candidate) -> float:
        """Return the fixed seconds per bucket of format ``fmt`` that the end-to-end probe found (0 when none)."""
        want = wire_format(fmt).short
        return next((t for b, t in self.overhead if b == want), 0.0)

    def codec_for(self, fmt: Candidate) -> CodecThroughput:
        """Return the codec throughput of format ``fmt`` (its bits or name)."""
        want = wire_format(fmt)
        for b, tp in self.codec:
            if b == want.short:
                return tp
        raise ValueError(f"the network fit has no codec throughput for {want.name}; it has {[candidate_label(b) for b, _ in self.codec]}")

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
            codec=tuple((b, CodecThroughput(**tp)) for b, tp in d.get("codec", ())),
            source=str(d.get("source", "given")),
            overhead=tuple(d.get("overhead", ())),
        )


# --------------------------------------------------------------------------------------------
# fitting


def _ring_terms(numel: int, workers: int) -> Tuple[float, float]:
    """(latency coefficient, wire bytes) of an fp32 ring all-reduce in the cost model."""
    e = estimate(_RING_FP32, numel, Cluster(workers, bandwidth=1.0, latency=1.0))
    return e.latency_s, e.wire_bytes


def fit_latency_bandwidth(numels: Sequence[int], times: Sequence[float], workers: int) -> LinkFit:
    """Fit ``alpha`` and ``beta`` of the cost model's fp32 ring all-reduce to measured times.

    The model is ``t(n) = k alpha + w(n) / beta`` with ``k = 2 (P-1)`` and ``w(n) = 2 (P-1)/P * 4 n``
    (:func:`gradcomp.comm.cost.estimate` of ``ring-fp32``). Each term is taken where it dominates:

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
