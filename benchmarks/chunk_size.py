"""How the chunk size of the pipelined exchange changes its time, on the emulated cluster.

For every host count (``--hosts``, one rank per host, ``--rate`` links from ``launch/netsim.sh``)
and width (``--bits``), each worker times the hook's whole quantized exchange of one bucket of
``--numel`` fp32 values (the size of the communication-bound preset's big bucket) for every chunk
size in ``--chunks`` (in units of 2**20 values): encode, all-to-all, reduce the owned shard,
all-gather, decode, chunks pipelined with async collectives, persistent buffers and residuals,
fused kernels (``QuantizedAllReduceState._probe_exchange``, the path the policy's probe times and
a step runs). Chunk sizes are taken in turn in every round, so a change of load hits all alike;
each call's time is its slowest rank's, and the median over ``--repeats`` rounds is reported
beside the wire alone (the exchange's bytes at the link rate) and the hook's default chunk size.

    python benchmarks/chunk_size.py                       # 2 and 4 hosts, int8 and int4, 1/2/4/8 M
    python benchmarks/chunk_size.py --hosts 4 --bits 4 --chunks 1,4

Needs root (network namespaces); holds ``/tmp/gradcomp-bench.lock`` while it runs so no other
timing run shares the cores. Prints a markdown table; ``--out`` also writes the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
LOCK = "/tmp/gradcomp-bench.lock"


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def worker(args: argparse.Namespace) -> int:
    """Run inside one emulated host: time the exchange per chunk size and width, write JSON (rank 0)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from gradcomp.comm.hook import QuantizedAllReduceState

    torch.set_num_threads(1)
    P, rank = int(os.environ["NNODES"]), int(os.environ["NODE_RANK"])
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=P, timeout=timedelta(seconds=600))
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(rank))
    states = {}
    for bits in _ints(args.bits):
        for c in _ints(args.chunks):
            st = QuantizedAllReduceState(bits=bits, chunk_numel=c << 20, log_every=0)
            st.probe_exchange(bits, x)  # warm-up: buffers, first collectives
            states[(bits, c)] = st
    samples = {k: [] for k in states}
    for _ in range(args.repeats):
        for (bits, c), st in states.items():
            dist.barrier()
            t0 = time.perf_counter()
            st.probe_exchange(bits, x)
            samples[(bits, c)].append(time.perf_counter() - t0)
    out = {"hosts": P, "numel": args.numel, "kernels": {f"{b}/{c}": st.kernels for (b, c), st in states.items()},
           "rows": []}
    for (bits, c), ts in samples.items():
        t = torch.tensor(ts, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # an exchange ends when its slowest rank does
        st = states[(bits, c)]
        plan = st.plan_for((0,), (args.numel,), bits)
        out["rows"].append({"bits": bits, "chunk_numel": c << 20, "chunks": len(plan.chunks), "bytes_sent": plan.bytes_sent,
                            "median_s": float(t.median()), "min_s": float(t.min())})
    for st in states.values():
        st.close()
    if rank == 0:
        Path(args.out).write_text(json.dumps(out, indent=1))
    dist.destroy_process_group()
    return 0


def table(results: List[dict], rate_bps: float) -> str:
    """Markdown: per host count and width, the exchange time per chunk size against the wire alone."""
    from gradcomp.comm.plan import chunk_numel_for

    lines = ["| hosts | bits | chunk (values) | chunks | exchange (median, slowest rank) | wire alone | exchange / wire | hook default |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for res in results:
        P = res["hosts"]
        for row in res["rows"]:
            wire = row["bytes_sent"] * 8 / rate_bps
            default = "yes" if row["chunk_numel"] == chunk_numel_for(P) else ""
            lines.append(f"| {P} | {row['bits']} | {row['chunk_numel'] >> 20}M | {row['chunks']} | {row['median_s'] * 1e3:.1f} ms | "
                         f"{wire * 1e3:.1f} ms | {row['median_s'] / wire:.2f} | {default} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run every host count on the emulated cluster and print the table; return the exit code."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    w = sub.add_parser("worker", help="run inside an emulated host (netsim sets NNODES, NODE_RANK, MASTER_ADDR)")
    for q in (p, w):
        q.add_argument("--numel", type=int, default=17_567_488, help="values of the bucket (default: comm17m's big bucket)")
        q.add_argument("--bits", default="8,4", help="widths, comma-separated")
        q.add_argument("--chunks", default="1,2,4,8", help="chunk sizes in units of 2**20 values, comma-separated")
        q.add_argument("--repeats", type=int, default=7)
    w.add_argument("--out", required=True)
    p.add_argument("--hosts", default="2,4", help="host counts, comma-separated")
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.mode == "worker":
        return worker(args)
    from gradcomp.cli._units import parse_bandwidth

    rate_bps = parse_bandwidth(args.rate, "rate") * 8
    import fcntl
    import tempfile

    lock = open(LOCK, "a")
    print(f"waiting for {LOCK} ...", file=sys.stderr, flush=True)
    fcntl.flock(lock, fcntl.LOCK_EX)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for hosts in _ints(args.hosts):
            out = Path(tmp) / f"{hosts}.json"
            cmd = ["bash", str(ROOT / "launch" / "netsim.sh"), "--hosts", str(hosts), "--rate", args.rate, "--timeout", "900", "--",
                   sys.executable, str(Path(__file__).resolve()), "worker", "--numel", str(args.numel), "--bits", args.bits,
                   "--chunks", args.chunks, "--repeats", str(args.repeats), "--out", str(out)]
            print(f"== {hosts} hosts: {' '.join(cmd)}", file=sys.stderr, flush=True)
            t0 = time.time()
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                tail = "\n".join((r.stdout + r.stderr).splitlines()[-15:])
                print(f"{hosts} hosts failed with exit code {r.returncode}:\n{tail}", file=sys.stderr)
                return 1
            print(f"   done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            results.append(json.loads(out.read_text()))
    lock.close()
    print(f"Whole quantized exchange of one bucket of {args.numel} fp32 values at {args.rate} (hook's path, fused kernels, "
          f"error feedback; median of {args.repeats} rounds)\n")
    print(table(results, rate_bps))
    if args.out:
        Path(args.out).write_text(json.dumps({"rate": args.rate, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
