"""The hook's whole per-bucket CPU work against a ``copy_()`` of the bucket, measured in the same run.

Run:
    python benchmarks/hook_path.py                     # 16M fp32 values, one thread, P = 2, int8 and int4
    python benchmarks/hook_path.py --eager             # the eager reference kernels too (fused=False)
    python benchmarks/hook_path.py --world-size 4 --bits 8 --repeats 7 --json
    python benchmarks/hook_path.py --formats int4 int4r int2 int2r mxfp4 mxfp4r --clock thread   # rotation's cost
    python benchmarks/hook_path.py --clock thread      # CPU time of the one thread: steadier on a loaded machine

One rank's CPU work for one bucket, phase by phase, exactly as the hook runs it
(:mod:`gradcomp.comm.exchange`): ``encode`` (bucket + worker residual -> send buffers, every chunk),
``reduce_shard`` (the P received copies of this rank's shard of every chunk -> the all-gather message,
with the server residual) and ``decode`` (the gathered messages -> the bucket). The wire is left out:
the received buffers are filled once from the send buffers before timing.

Next to each figure: the memory-traffic floor, i.e. the bytes the step must read and write at the
bandwidth of ``copy_()`` into a buffer that is already mapped (the hook's buffers persist; a copy
reads 4 and writes 4 bytes per value). Per value, with fp32
bucket and residuals and ``b = bits / 8`` code bytes: encode reads the bucket and the residual and
writes the residual and the codes (``12 + b``); reduce reads ``P`` copies of ``1/P`` of the codes and
reads and writes ``1/P`` of the server residual and writes ``b/P`` codes (``b + (8 + b)/P``); decode
reads the codes and writes the bucket (``4 + b``). At P = 2, int8: 13 + 5.5 + 5 = 23.5 bytes per value,
2.94 copies. Ratios are medians (and minima) over ``--repeats`` runs, all measured in this process.
A ``clone()`` allocates and pays page faults, which flatters any ratio against it; it is printed
only for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from gradcomp.codec import kernels
from gradcomp.codec.formats import wire_format
from gradcomp.comm import exchange
from gradcomp.comm import plan as comm_plan
from gradcomp.comm.buffers import ExchangeBuffers
from gradcomp.comm.plan import ExchangePlan


_CLOCK = time.perf_counter


def _times(fn, repeats: int):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = _CLOCK()
        fn()
        out.append(_CLOCK() - t0)
    return out


def floor_bytes_per_value(bits: int, world_size: int, error_feedback: bool = True) -> dict:
    """The bytes each phase must move per bucket value (see the module docstring)."""
    b = bits / 8
    res = 8 if error_feedback else 0
    return {
        "encode": 4 + res + b,
        "reduce_shard": b + (res + b) / world_size,
        "decode": 4 + b,
    }


def phases(numel: int, world_size: int, fmt, fused: bool, chunk_numel: int, error_feedback: bool = True) -> dict:
    """The three phases of one rank for a bucket of about ``numel`` values in format ``fmt``, as callables (buffers ready)."""
    # a bucket of a few parameters, one with a ragged last block
    numels = [numel // 4, numel // 4, numel // 4 - 4096, numel // 4 + 4096 - 7, 7]
    plan = ExchangePlan.build(numels, world_size, fmt, 256, chunk_numel)
    bufs = ExchangeBuffers.allocate(plan)
    bucket = torch.randn(plan.numel)
    res = torch.zeros(plan.padded_numel) if error_feedback else None
    res_out = torch.zeros(plan.padded_numel) if error_feedback else None
    sres = torch.zeros(plan.server_numel) if error_feedback else None
    sres_out = torch.zeros(plan.server_numel) if error_feedback else None
    chunks = range(len(plan.chunks))

    def encode():
        for c in chunks:
            exchange.encode(plan, bufs, c, bucket, residual=res, residual_out=res_out, fused=fused)

    encode()
    for c in chunks:  # what the all-to-all would deliver: every rank's copy looks like ours
        m = plan.chunks[c].message_bytes
        bufs.recv[c].view(world_size, m).copy_(bufs.send[c].view(world_size, m)[0].expand(world_size, m))

    def reduce():
        for c in chunks:
            exchange.reduce_shard(plan, bufs, c, residual=sres, residual_out=sres_out, fused=fused)

    reduce()
    for c in chunks:  # what the all-gather would deliver
        bufs.gathered[c].copy_(bufs.send[c])

    def decode():
        for c in chunks:
            exchange.decode(plan, bufs, c, bucket, fused=fused)

    return {"encode": encode, "reduce_shard": reduce, "decode": decode}


def measure(numel: int, world_size: int, bits, fused: bool, repeats: int, chunk_numel: int, error_feedback: bool = True) -> dict:
    """Time the three phases of one rank for a bucket of about ``numel`` values; return seconds per phase and repeat."""
    return {name: _times(fn, repeats) for name, fn in phases(numel, world_size, bits, fused, chunk_numel, error_feedback).items()}


def measure_interleaved(numel: int, world_size: int, formats, fused: bool, repeats: int, chunk_numel: int) -> dict:
    """Time every format's phases round-robin, ``repeats`` rounds (a change of load hits every format alike)."""
    built = {f: phases(numel, world_size, f, fused, chunk_numel) for f in formats}
    times = {f: {name: [] for name in ph} for f, ph in built.items()}
    for ph in built.values():  # warm-up
        for fn in ph.values():
            fn()
    for _ in range(repeats):
        for f, ph in built.items():
            for name, fn in ph.items():
                t0 = _CLOCK()
                fn()
                times[f][name].append(_CLOCK() - t0)
    return times


def main(argv=None) -> int:
    """Measure and print the table; return 0."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=16 * 1024 * 1024)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--bits", "--formats", dest="formats", nargs="+", default=["8", "4"],
                   help="wire formats by bits or name (e.g. int4 int4r mxfp4 mxfp4r); with a rotated format and its base "
                        "both given, the rotation's cost is printed too")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-numel", type=int, default=None, help="values per chunk (default: the hook's, 2**20 per rank)")
    p.add_argument("--eager", action="store_true", help="also measure the eager reference kernels (fused=False; slow)")
    p.add_argument(
        "--clock", choices=("wall", "thread"), default="wall",
        help="wall: perf_counter; thread: CPU time of this thread (steadier on a shared, loaded machine; one thread only)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.chunk_numel is None:
        args.chunk_numel = comm_plan.chunk_numel_for(args.world_size)
    if args.clock == "thread" and args.threads != 1:
        p.error(f"--clock thread counts one thread's CPU time: it needs --threads 1, got --threads {args.threads}")
    global _CLOCK
    _CLOCK = time.thread_time if args.clock == "thread" else time.perf_counter

    torch.set_num_threads(args.threads)
    x = torch.randn(args.numel)
    y = torch.empty_like(x)
    routes = [True, False] if args.eager else [True]
    rows = []
    clone, copy = [], []
    formats = [wire_format(int(f) if str(f).isdigit() else f) for f in args.formats]
    for fused in routes:
        clone += _times(lambda: x.clone(), args.repeats)  # before and after, so the load on the machine is shared
        copy += _times(lambda: y.copy_(x), args.repeats)
        ts = measure_interleaved(args.numel, args.world_size, formats, fused, args.repeats, args.chunk_numel)
        clone += _times(lambda: x.clone(), args.repeats)
        copy += _times(lambda: y.copy_(x), args.repeats)
        for f in formats:
            rows.append({"route": kernels.backend("cpu", fused), "bits": f.bits, "format": f.name, "times": ts[f]})
    clone_med = statistics.median(clone)
    copy_med, copy_min = statistics.median(copy), min(copy)
    out = []
    for r in rows:
        floor = floor_bytes_per_value(r["bits"], args.world_size)
        row = {"route": r["route"], "bits": r["bits"], "format": r["format"]}
        total_med = total_min = 0.0
        for phase, ts in r["times"].items():
            med, mn = statistics.median(ts), min(ts)
            total_med += med
            total_min += mn
            row[f"{phase}_ms"] = 1e3 * med
            row[f"{phase}_x_copy"] = med / copy_med
            row[f"{phase}_floor_x_copy"] = floor[phase] / 8
        row["total_ms"] = 1e3 * total_med
        row["floor_bytes_per_value"] = sum(floor.values())
        row["floor_x_copy"] = sum(floor.values()) / 8
        row["total_x_copy"] = total_med / copy_med
        row["total_x_floor"] = row["total_x_copy"] / row["floor_x_copy"]
        row["total_x_floor_min"] = (total_min / copy_min) / row["floor_x_copy"]
        row["bytes_per_value_measured"] = 8 * row["total_x_copy"]
        row["total_x_clone"] = total_med / clone_med
        row["samples"] = {phase: list(ts) for phase, ts in r["times"].items()}
        out.append(row)
    rotation = []  # a rotated format against its base, same route: the medians of the per-round totals' ratios
    for r in out:
        base = wire_format(r["format"]).base
        ref = next((b for b in out if b["format"] == base.name and b["route"] == r["route"]), None)
        if base.name != r["format"] and ref is not None:
            tot = [sum(v) for v in zip(*r["samples"].values())]
            tot_ref = [sum(v) for v in zip(*ref["samples"].values())]
            ratio = statistics.median(a / b for a, b in zip(tot, tot_ref))
            rotation.append({"format": r["format"], "base": base.name, "route": r["route"], "cpu_ratio": ratio,
                             "encode_ratio": r["encode_ms"] / ref["encode_ms"], "decode_ratio": r["decode_ms"] / ref["decode_ms"]})
    result = {
        "numel": args.numel, "world_size": args.world_size, "threads": args.threads, "repeats": args.repeats, "clock": args.clock,
        "chunk_numel": args.chunk_numel, "copy_ms_median": 1e3 * copy_med, "copy_ms_min": 1e3 * copy_min,
        "clone_ms_median": 1e3 * clone_med, "rows": out, "rotation": rotation,
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"{args.numel} fp32 values, P = {args.world_size}, {args.threads} thread(s), chunks of {args.chunk_numel}, {args.clock} clock: "
        f"copy_() into a mapped buffer {1e3 * copy_med:.2f} ms (median), {1e3 * copy_min:.2f} ms (min); clone() {1e3 * clone_med:.2f} ms"
    )
    print("| kernels | format | encode / copy_ | reduce_shard / copy_ | decode / copy_ | total (ms) | floor / copy_ | total / floor (median, min) | B/value measured (floor) | total / clone |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in out:
        print(
            f"| {r['route']} | {r['format']} | {r['encode_x_copy']:.2f} ({r['encode_floor_x_copy']:.2f}) | "
            f"{r['reduce_shard_x_copy']:.2f} ({r['reduce_shard_floor_x_copy']:.2f}) | {r['decode_x_copy']:.2f} "
            f"({r['decode_floor_x_copy']:.2f}) | {r['total_ms']:.1f} | {r['floor_x_copy']:.2f} | "
            f"**{r['total_x_floor']:.2f}**, {r['total_x_floor_min']:.2f} | {r['bytes_per_value_measured']:.1f} ({r['floor_bytes_per_value']:.1f}) | "
            f"{r['total_x_clone']:.2f} |"
        )
    print(
        "(in brackets: each phase's floor in copies, i.e. the bytes it must read and write at the bandwidth of copy_() into a "
        "buffer that is already mapped, 8 bytes per value; target: total / floor <= 1.5)"
    )
    if rotation:
        print()
        print("| kernels | rotated | base | CPU per bucket, rotated / base (median of rounds) | encode | decode | target <= 1.10 |")
        print("|---|---|---|---|---|---|---|")
        for r in rotation:
            print(f"| {r['route']} | {r['format']} | {r['base']} | **{r['cpu_ratio']:.3f}** | {r['encode_ratio']:.3f} | "
                  f"{r['decode_ratio']:.3f} | {'met' if r['cpu_ratio'] <= 1.10 else 'MISSED'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
