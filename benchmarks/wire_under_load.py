"""The emulated link's throughput with the CPU idle and with every core computing, as a training step's backward does.

On ``launch/netsim.sh`` the network is the kernel's: every byte a host sends is copied, shaped
(``tbf``, 1 ms burst) and delivered by threads that share the machine's cores with the training. This
script measures what that costs a collective that runs *beside* compute, which is what DDP's overlap of
communication with backward needs: each rank times ``dist.all_reduce`` of ``--mb`` MB of fp32 (gloo)
alone, then again while one thread of its own runs single-threaded matmuls (the backward's stand-in),
and reports the link's effective rate both ways::

    sudo launch/netsim.sh --hosts 2 --rate 1gbit -- bash -c '.venv/bin/python -m torch.distributed.run \
        --nnodes $NNODES --node-rank $NODE_RANK --nproc-per-node 1 --master-addr $MASTER_ADDR \
        --master-port $MASTER_PORT benchmarks/wire_under_load.py'

A ratio near 1 means the emulated link keeps its rate beside compute (measured: 1.00-1.14 at 1
Gbit/s); what overlap then loses is the compute's speed beside the wire, which
``benchmark.py --trace`` shows (the backward pass's time with and without the exchange).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch
import torch.distributed as dist


def _timed_allreduce(t: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    """Time the all-reduce idle and beside compute; rank 0 prints both and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=10.0, help="MB of fp32 per all-reduce")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    t = torch.ones(int(args.mb * 2**20 / 4))
    _timed_allreduce(t, 2)  # connections up
    idle = _timed_allreduce(t, args.repeats)
    stop = threading.Event()
    a = torch.randn(512, 512)

    def burn():  # one thread of matmuls, as a single-threaded backward
        while not stop.is_set():
            a @ a

    th = threading.Thread(target=burn, daemon=True)
    th.start()
    busy = _timed_allreduce(t, args.repeats)
    stop.set()
    th.join()
    if dist.get_rank() == 0:
        nbytes = 2 * (dist.get_world_size() - 1) / dist.get_world_size() * t.numel() * 4
        print(f"all_reduce of {args.mb:g} MB, {dist.get_world_size()} ranks: idle {idle * 1e3:.1f} ms "
              f"({nbytes * 8 / idle / 1e9:.2f} Gbit/s on the wire), beside compute {busy * 1e3:.1f} ms "
              f"({nbytes * 8 / busy / 1e9:.2f} Gbit/s): busy / idle {busy / idle:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
