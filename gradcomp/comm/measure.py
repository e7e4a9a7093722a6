"""Measurements the policy and the cost model decide from: link probes and the hook's own local work.

* :func:`timed`: the one timing helper (median of repeats after a warm-up, device-synchronised).
* :func:`probe_allreduce`: fp32 all-reduces of growing size on a group (collective).
* :func:`measure_hook_codec`: the CPU/GPU work the hook does on one bucket outside the wire, as a
  :class:`~gradcomp.costmodel.CodecThroughput` the cost model's ``compute`` term reproduces.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from gradcomp import codec
from gradcomp.costmodel import CodecThroughput

__all__ = ["timed", "probe_allreduce", "measure_hook_codec"]


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, device=None, before: Optional[Callable[[], object]] = None) -> float:
    """Return the median wall time of ``repeats`` calls of ``fn`` in seconds, after ``warmup`` untimed calls.

    On a CUDA ``device`` every call is followed by a synchronisation, so the time is the kernels',
    not the launch's. ``before`` runs untimed ahead of every call (a barrier, so that the ranks of
    a collective start together; a fresh input).

    Example: ``timed(lambda: x.clone(), repeats=5)`` is the median of 5 clones after one warm-up.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    dev = torch.device(device) if device is not None else None
    sync = (lambda: torch.cuda.synchronize(dev)) if dev is not None and dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def probe_allreduce(group, numels: Sequence[int], repeats: int = 3, device="cpu") -> List[float]:
    """Time fp32 all-reduces of each size on ``group`` (median of ``repeats`` after a warm-up); collective.

    Every repeat starts after a barrier, so the ranks start together. Returns this rank's times in
    seconds; agree on them with a max over ranks before fitting.
    """
    times = []
    for n in numels:
        buf = torch.ones(int(n), dtype=torch.float32, device=device)
        # the warm-up call opens the connections and allocates the buffers
        times.append(timed(lambda: dist.all_reduce(buf, group=group), repeats, device=device, before=lambda: dist.barrier(group=group)))
    return times


def measure_hook_codec(
    bits: int,
    block_size: int = 256,
    numel: int = 1 << 20,
    world_size: int = 2,
    repeats: int = 3,
    compiled: Optional[bool] = False,
    device="cpu",
) -> CodecThroughput:
    """Time the hook's local work on a bucket of ``numel`` elements and return it as a codec throughput.

    Quantization is :func:`gradcomp.codec.error_feedback_step` (what the hook runs at both
    quantization points), dequantization :func:`gradcomp.codec.dequantize_packed`.

    Args:
        bits: code width (8, 4 or 2).
        block_size: elements per scale.
        numel: elements of the timed bucket.
        world_size: ranks the exchange would run on (sizes of the shard messages).
        repeats: timed calls of each step (median kept), after one warm-up (which compiles).
        compiled: the hook's ``compile`` option.
        device: where the buffers live.

    Returns:
        A :class:`~gradcomp.costmodel.CodecThroughput` whose ``source`` describes the measurement.
    """
    blocks = max(1, numel // block_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(blocks, block_size, generator=g).to(device)
    res = torch.zeros_like(x)
    packed, scale, _ = codec.error_feedback_step(x, res, bits, block_size, compiled=bool(compiled))
    t_q = timed(lambda: codec.error_feedback_step(x, res, bits, block_size, compiled=bool(compiled)), repeats, device=device)
    t_d = timed(lambda: codec.dequantize_packed(packed, scale, bits, compiled=bool(compiled)), repeats, device=device)
    n = blocks * block_size
    mode = "compiled" if compiled else "eager"
    return CodecThroughput(n / t_q, n / t_d, f"measured: int{bits} hook kernels, {n} elements on {torch.device(device).type}, {mode}")
