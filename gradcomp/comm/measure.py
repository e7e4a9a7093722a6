"""Measurements the policy and the cost model decide from: link probes and the hook's own local work.

* :func:`timed`: the one timing helper (median of repeats after a warm-up, device-synchronised).
* :func:`probe_allreduce`: fp32 all-reduces of growing size on a group (collective).
* :func:`measure_hook_codec`: the CPU/GPU work the hook does on one bucket outside the wire, as a
  :class:`~gradcomp.comm.cost.CodecThroughput` the cost model's ``compute`` term reproduces.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from gradcomp.codec import kernels
from gradcomp.codec.formats import WireFormat, wire_format
from gradcomp.comm import exchange as ex
from gradcomp.comm.cost import CodecThroughput
from gradcomp.comm.buffers import ExchangeBuffers
from gradcomp.comm.plan import DEFAULT_CHUNK_NUMEL, ExchangePlan

Format = Union[WireFormat, str, int]

__all__ = ["timed", "probe_allreduce", "hook_local_work", "measure_hook_codec"]


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

    Every repeat starts after a barrier, so the ranks start together. Sizes up to 64K elements take
    at least 9 repeats: they cost a few milliseconds each, and a scheduling delay of that size (the
    ranks share cores with each other and with the network stack) would otherwise set the latency.
    Returns this rank's times in seconds; agree on them with a max over ranks before fitting.
    """
    times = []
    for n in numels:
        buf = torch.ones(int(n), dtype=torch.float32, device=device)
        reps = max(repeats, 9) if int(n) <= 65536 else repeats
        # the warm-up call opens the connections and allocates the buffers
        times.append(timed(lambda: dist.all_reduce(buf, group=group), reps, device=device, before=lambda: dist.barrier(group=group)))
    return times


def hook_local_work(
    bits: Format,
    block_size: int = 256,
    numel: int = 1 << 20,
    world_size: int = 2,
    repeats: int = 3,
    fused: bool = True,
    device="cpu",
    error_feedback: bool = True,
    chunk_numel: Optional[int] = DEFAULT_CHUNK_NUMEL,
) -> Dict[str, float]:
    """Time the hook's work on one bucket outside the wire, step by step, in this process.

    The hook's own exchange steps (:mod:`gradcomp.comm.exchange`) on a bucket of ``numel`` values,
    chunk after chunk, with its persistent buffers and in-place residuals: ``encode`` (bucket +
    worker residual straight into the send buffer), ``reduce_shard`` (the P received copies of the
    owned shard summed in rank order, divided by P, requantized with the server residual into the
    all-gather message) and ``decode`` (the gathered messages straight into the bucket). The
    messages a rank would receive are stood in for by the ones it sends (same sizes, same work).

    Returns:
        ``{"encode_s", "reduce_shard_s", "decode_s", "total_s"}``: median seconds of each step over
        the whole bucket (``repeats`` runs after a warm-up).
    """
    plan = ExchangePlan.build([int(numel)], world_size, bits, block_size, chunk_numel)
    bufs = ExchangeBuffers.allocate(plan, device)
    g = torch.Generator().manual_seed(0)
    bucket = (torch.randn(plan.numel, generator=g) * 1e-3).to(device)
    out = torch.empty_like(bucket)
    wres = torch.zeros(plan.padded_numel, device=device) if error_feedback else None
    sres = torch.zeros(plan.server_numel, device=device) if error_feedback else None
    c = bool(fused)
    chunks = range(len(plan.chunks))

    def encode() -> None:
        for k in chunks:
            ex.encode(plan, bufs, k, bucket, residual=wres, residual_out=wres, fused=c)

    def reduce_shard() -> None:
        for k in chunks:
            ex.reduce_shard(plan, bufs, k, residual=sres, residual_out=sres, fused=c)

    def decode() -> None:
        for k in chunks:
            ex.decode(plan, bufs, k, out, fused=c)

    encode()
    for k in chunks:  # what the all-to-all and the all-gather would deliver: messages of the same sizes
        bufs.recv[k].copy_(bufs.send[k])
        bufs.gathered[k].copy_(bufs.send[k])
    t = {
        "encode_s": timed(encode, repeats, device=device),
        "reduce_shard_s": timed(reduce_shard, repeats, device=device),
        "decode_s": timed(decode, repeats, device=device),
    }
    t["total_s"] = t["encode_s"] + t["reduce_shard_s"] + t["decode_s"]
    return t


def measure_hook_codec(
    bits: Format,
    block_size: int = 256,
    numel: int = 1 << 20,
    world_size: int = 2,
    repeats: int = 3,
    fused: bool = True,
    device="cpu",
    chunk_numel: Optional[int] = DEFAULT_CHUNK_NUMEL,
) -> CodecThroughput:
    """Time the hook's local work on a bucket (:func:`hook_local_work`) and return it as a codec throughput.

    What is timed is what the hook runs: error feedback, the copies into and out of the messages,
    the chunked route, the hook's kernels (fused unless ``fused=False``), not a bare ``quantize``.

    The cost model charges a two-phase exchange of ``N`` values on ``P`` ranks
    ``(N + N/P) / quantize_eps + 2 N / dequantize_eps`` seconds of codec work. Both figures are set
    to the one rate ``e`` at which that charge equals the three measured steps together,
    ``e = (3 N + N/P) / (t_encode + t_reduce_shard + t_decode)``, so the model reproduces what was
    measured at this ``P`` and scales it linearly with the bucket (the steps are memory-bound
    passes, each proportional to ``N``); the step times are kept in ``source``.

    Args:
        bits: the wire format: its bits (8, 4 or 2) or its name (``"int8"``).
        block_size: elements per scale.
        numel: elements of the timed bucket.
        world_size: ranks the exchange runs on (P: the size of the owned shard).
        repeats: timed calls of each step (median kept), after one warm-up.
        fused: the hook's ``fused`` option.
        device: where the buffers live.
        chunk_numel: the hook's ``chunk_numel`` (its chunks are the kernels' shapes).

    Time a bucket of the size the hook sees (several chunks): a bucket small enough to stay in the
    CPU's cache between the timed calls is coded several times faster than one the hook reads from
    memory (here 1M values took 2 ms for int8, 4M values 37 ms).

    Returns:
        A :class:`~gradcomp.comm.cost.CodecThroughput` whose ``source`` describes the measurement.
    """
    t = hook_local_work(bits, block_size, numel, world_size, repeats, fused, device, chunk_numel=chunk_numel)
    n = float(numel)
    e = (3 * n + n / world_size) / t["total_s"]
    mode = kernels.backend(device, fused)
    src = (
        f"measured: {wire_format(bits).name} hook steps on {int(n)} elements in chunks of {chunk_numel}, {world_size} ranks, "
        f"{torch.device(device).type}, {mode} "
        f"(encode {t['encode_s'] * 1e3:.2f} ms, reduce shard {t['reduce_shard_s'] * 1e3:.2f} ms, decode {t['decode_s'] * 1e3:.2f} ms)"
    )
    return CodecThroughput(e, e, src)
