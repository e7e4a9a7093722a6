"""CPU cost of one quantized all-reduce against gloo's fp32 all-reduce of the same bucket, no network limit.

Two processes on this machine (gloo over loopback, 1 thread each) reduce one bucket of ``--numel``
fp32 gradients: with ``dist.all_reduce``, with gradcomp's ``quantized_allreduce`` (eager and
``torch.compile``'d codec), and time the codec kernels alone and a plain ``clone()`` for scale. On an
unlimited loopback the network is nearly free, so the difference is what the hook costs in CPU::

    flock /tmp/gradcomp-bench.lock python benchmarks/hook_cost.py --numel 17567488 --bits 8 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from typing import List, Optional

import torch
import torch.distributed as dist


def _median_ms(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts[2:] if repeat > 3 else ts)


def _worker(rank: int, world_size: int, init: str, numel: int, bits: int, repeat: int) -> None:
    from gradcomp import codec
    from gradcomp.comm.collectives import ShardLayout, quantized_allreduce

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world_size)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank)) * 1e-3
    layout = ShardLayout(numel, world_size, bits, 256)
    wres, sres = torch.zeros(layout.padded_numel), torch.zeros(layout.shard_numel)
    res = {}

    def timed_collective(fn):
        ts = []
        for _ in range(repeat):
            y = x.clone()
            dist.barrier()
            t = time.perf_counter()
            fn(y)
            ts.append(time.perf_counter() - t)
        return 1e3 * statistics.median(ts[2:] if repeat > 3 else ts)

    res["fp32 all_reduce"] = timed_collective(lambda y: dist.all_reduce(y))
    for compiled in (False, True):
        tag = "compiled" if compiled else "eager"
        res[f"int{bits} quantized_allreduce ({tag})"] = timed_collective(
            lambda y: quantized_allreduce(y, layout, None, worker_residual=wres, server_residual=sres, compiled=compiled)
        )
        blocks = torch.zeros(layout.padded_numel)
        blocks[:numel] = x
        blocks = blocks.view(-1, 256)
        packed, scale, _ = codec.error_feedback_step(blocks, wres.view_as(blocks), bits, 256, compiled=compiled)
        res[f"  error_feedback_step ({tag})"] = _median_ms(
            lambda: codec.error_feedback_step(blocks, wres.view_as(blocks), bits, 256, compiled=compiled), repeat
        )
        res[f"  dequantize_packed ({tag})"] = _median_ms(
            lambda: codec.dequantize_packed(packed.view(-1), scale.view(-1), bits, compiled=compiled), repeat
        )
    res["fp32 clone (memory-bandwidth scale)"] = _median_ms(lambda: x.clone(), repeat)
    if rank == 0:
        print(f"\n{numel} elements, int{bits}, {world_size} ranks over loopback, 1 thread each (median ms, rank 0):")
        for k, v in res.items():
            print(f"  {k:42s} {v:9.1f}")
        sys.stdout.flush()
    dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> int:
    """Run the measurement for each requested bit width; return the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=int, default=17_567_488, help="bucket size (default: comm17m's largest bucket)")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=(8, 4, 2))
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--repeat", type=int, default=6)
    args = p.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="gradcomp-hookcost-")
    for bits in args.bits:
        torch.multiprocessing.spawn(
            _worker, args=(args.world_size, f"{folder}/init{bits}", args.numel, bits, args.repeat), nprocs=args.world_size, join=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
