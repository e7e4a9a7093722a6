"""Run a function on several gloo ranks in fresh processes; fail with the worker's traceback, time out on a hang."""

from __future__ import annotations

import os
import sys
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def init_gloo(rank: int, world_size: int, init_file: str, backend: str = "gloo") -> None:
    """Join the process group of this test (gloo unless told; a file rendezvous: no ports)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)


def _entry(rank: int, fn, world_size: int, init_file: str, args: tuple, backend: str) -> None:
    init_gloo(rank, world_size, init_file, backend)
    try:
        fn(rank, world_size, *args)
        # every rank is done before any tears its groups down: FSDP2 on gloo can abort at exit
        # ("terminate called without an active exception") when a peer is still in a collective
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # FSDP2 on gloo (torch 2.13) sometimes aborts in the interpreter's teardown after a clean run
    # ("terminate called without an active exception", seen without gradcomp too): a worker that
    # finished and left its group exits at once, skipping that teardown. Failures still raise above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world_size: int, tmp_path, *args, timeout: float = 120.0, backend: str = "gloo") -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raise on failure or after ``timeout`` s."""
    init_file = str(tmp_path / f"init_{time.monotonic_ns()}")
    ctx = mp.start_processes(_entry, args=(fn, world_size, init_file, args, backend), nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish within {timeout:.0f} s (hang?)")
