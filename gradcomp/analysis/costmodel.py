"""Communication cost model: compare the ways to all-reduce the gradients, find where compression pays.

The model itself (schemes, the cluster, the codec's speed, :func:`estimate` of one scheme's time
and bytes with the latency-bandwidth model) lives with the communication layer that decides with
it (:mod:`gradcomp.comm.cost`, re-exported here). This module is what a user asks of it:

* :func:`compare`: every scheme on one cluster (:func:`default_schemes`: ring and tree in fp32 /
  bf16 / fp16, the two-phase exchange and the hierarchical one in every registered wire format,
  PyTorch's int8 all-gather);
* :func:`break_even_bandwidth`: the main-link bandwidth below which a compressed scheme beats a
  baseline; because the time is affine in ``1 / bandwidth``, it has a closed form (bisection when
  the exchange is pipelined);
* :func:`sweep`: total time of each scheme over worker counts or bandwidths (for the plots of
  :mod:`gradcomp.plots.costmodel` and ``gradcomp cost --sweep``);
* :func:`format_errors` and :func:`fastest_within`: the advice with an error budget, the fastest
  scheme whose wire format's relative error on a sample of gradients (a captured trace, or Gaussian
  values) is within the budget, as the hook's policy decides per bucket (:mod:`gradcomp.comm.budget`).

Worked example: 7e9 parameters, 8 workers on 8 nodes at 10 Gbit/s (1.25e9 B/s), 5 us latency.
ring-fp32 sends ``2 * 7/8 * 7e9 * 4 = 49 GB`` per rank: ``49e9 / 1.25e9 = 39.2 s`` plus
``14 * 5 us``; twophase-int8 sends ``2 * 7/8 * 7e9 * (1 + 4/256) = 12.4 GB``: 9.95 s plus the codec.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from gradcomp.checks import check_int
from gradcomp.codec import kernels
from gradcomp.codec.formats import FORMATS, WireFormat
from gradcomp.comm.cost import Cluster, CodecThroughput, Estimate, Scheme, estimate, parse_scheme, pipeline_chunks

__all__ = [
    "Scheme",
    "Cluster",
    "CodecThroughput",
    "Estimate",
    "DEFAULT_SCHEMES",
    "default_schemes",
    "parse_scheme",
    "estimate",
    "compare",
    "break_even_bandwidth",
    "pipeline_chunks",
    "sweep",
    "format_errors",
    "fastest_within",
]


def default_schemes() -> Tuple[Scheme, ...]:
    """The schemes :func:`compare` estimates: float ring and tree, and every registered wire format but the rotated ones.

    ``ring-fp32``, ``ring-bf16``, ``ring-fp16``, ``tree-fp32``, ``twophase-F`` for each format ``F``
    of the registry (``int8``, ``int4``, ``int2``, ``fp8_e4m3``, ``fp8_e5m2``, ``mxint8``, ``mxfp8``,
    ``mxfp4``), ``allgather-int8``, ``hier-F`` for each ``F``. A rotated format (``int4r``...) sends
    the bytes of its base: name it to see it (``twophase-int4r``).
    """
    formats = [f.name for f in FORMATS.values() if not f.rotate]
    names = ["ring-fp32", "ring-bf16", "ring-fp16", "tree-fp32"]
    names += [f"twophase-{f}" for f in formats] + ["allgather-int8"] + [f"hier-{f}" for f in formats]
    return tuple(parse_scheme(n) for n in names)


#: :func:`default_schemes` of the registry as it was at import.
DEFAULT_SCHEMES: Tuple[Scheme, ...] = default_schemes()


def _schemes_for(cluster: Cluster, schemes: Optional[Iterable]) -> List[Scheme]:
    if schemes is not None:
        out = [parse_scheme(s) for s in schemes]
        if not out:
            raise ValueError("schemes must name at least one scheme, got an empty list")
        return out
    M, L = cluster.ports()
    # hierarchical equals the flat two-phase exchange with one worker per node
    return [s for s in default_schemes() if s.algorithm != "hier" or L > 1]


def compare(
    params: int,
    cluster: Cluster,
    schemes: Optional[Iterable] = None,
    codec_throughput: Optional[CodecThroughput] = None,
    block_size: int = 256,
    chunk_numel: Optional[int] = None,
) -> List[Estimate]:
    """Estimate every scheme (:func:`default_schemes`; hierarchical ones only with several workers per node).

    Args:
        params, cluster, codec_throughput, block_size, chunk_numel: as for :func:`estimate`.
        schemes: scheme names or :class:`Scheme` objects; None for the defaults.

    Returns:
        One :class:`Estimate` per scheme, in the given order.
    """
    return [estimate(s, params, cluster, codec_throughput, block_size, chunk_numel) for s in _schemes_for(cluster, schemes)]


def break_even_bandwidth(
    scheme,
    params: int,
    cluster: Cluster,
    codec_throughput: Optional[CodecThroughput] = None,
    block_size: int = 256,
    baseline="ring-fp32",
    chunk_numel: Optional[int] = None,
) -> float:
    """Return the main-link bandwidth below which ``scheme`` is faster than ``baseline``.

    Both times are ``fixed + wire_bytes / bandwidth`` (only the main link's bandwidth varies), so
    they cross at ``(wire_base - wire) / (fixed - fixed_base)``. With pipelining (``chunk_numel``)
    the compressed time is no longer affine in ``1 / bandwidth`` but still falls more slowly than
    the baseline's as the bandwidth drops (it sends fewer bytes), so the one crossing is found by
    bisection.

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
    if chunk_numel is not None and e.wire_bytes < r.wire_bytes:

        def gap(bw: float) -> float:
            c = replace(cluster, bandwidth=bw)
            return (estimate(scheme, params, c, codec_throughput, block_size, chunk_numel).total_s
                    - estimate(baseline, params, c, codec_throughput, block_size, chunk_numel).total_s)

        lo, hi = 1e-3, 1e18
        if gap(hi) < 0:
            return math.inf
        if gap(lo) >= 0:
            return 0.0
        for _ in range(200):  # bisection in log space: relative precision far below 1e-9
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
        return math.sqrt(lo * hi)
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
    chunk_numel: Optional[int] = None,
) -> Dict[str, List[float]]:
    """Compute total step communication time of each scheme over a range of worker counts or bandwidths.

    When sweeping ``workers`` the number of workers per node is kept (so nodes grow with workers),
    and values that are not a multiple of it are rejected.

    Args:
        params, cluster, schemes, codec_throughput, block_size, chunk_numel: as for :func:`compare`.
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
            check_int("workers", v)
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
            out[s.name].append(estimate(s, params, c, codec_throughput, block_size, chunk_numel).total_s)
    return out


def format_errors(formats: Iterable[WireFormat], sample: Optional[torch.Tensor] = None, block_size: int = 256,
                  fused: bool = True) -> Dict[str, float]:
    """The relative error ``||Q(x) - x|| / ||x||`` of one quantization of ``sample`` in each format (no error feedback).

    ``sample``: gradient values (e.g. a captured trace's rows, flattened); None: ``2**20`` standard
    Gaussian values (seed 0), a reference that real gradients, heavier-tailed, exceed without
    rotation. Values past the last whole block are left out. The error of a rotated format is
    measured in its rotated space (the same norm).

    Example: ``format_errors([wire_format("int8"), wire_format("int4")])`` is about
    ``{"int8": 0.0070, "int4": 0.126}``.
    """
    if sample is None:
        sample = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))
    x = sample.reshape(-1).float()
    n = x.numel() // block_size * block_size
    if n == 0:
        raise ValueError(f"sample must hold at least one block of {block_size} values, got {x.numel()}")
    rows = x[:n].view(-1, block_size)
    err = torch.empty_like(rows)
    signal = float(rows.double().square().sum())
    out = {}
    for fmt in formats:
        kernels.encode_blocks(rows, fmt, residual_out=err, fused=fused)
        out[fmt.name] = math.sqrt(float(err.double().square().sum()) / signal) if signal > 0 else 0.0
    return out


def fastest_within(estimates: Sequence[Estimate], errors: Dict[str, float], budget: float) -> Optional[Estimate]:
    """The fastest estimate whose scheme is exact (float) or whose format's error (``errors``) is at most ``budget``.

    Of schemes equally fast (a rotated format and its base send the same bytes), the more accurate wins.
    """
    def error(e: Estimate) -> float:
        s = parse_scheme(e.scheme)
        return errors.get(s.format.name, math.inf) if s.quantized else 0.0

    ok = [e for e in estimates if error(e) <= budget]
    return min(ok, key=lambda e: (round(e.total_s, 12), error(e))) if ok else None
