"""Codec speed: quantize + dequantize round trips as a ratio to ``clone()`` of the same tensor, same run.

Run:
    python benchmarks/codec_speed.py                 # 16M fp32 elements, one thread
    python benchmarks/codec_speed.py --numel 4194304 --threads 2 --json

Prints, per bit width and per route (eager torch, fused torch.compile): milliseconds and the ratio to
clone for quantize, dequantize and the round trip. Targets: round trip <= 2x clone for int8 and
<= 2.5x for int4.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from gradcomp import codec


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    """Measure and print the table; return 0."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=16 * 1024 * 1024)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--no-compile", action="store_true", help="measure the eager route only")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    x = torch.randn(args.numel)
    clone_ms = _median_ms(lambda: x.clone(), args.repeats)
    rows = []
    routes = [False] if args.no_compile or not codec.compile_available() else [False, True]
    for compiled in routes:
        for bits in (8, 4, 2):
            q = codec.quantize(x, bits, args.block_size, compiled=compiled)
            qms = _median_ms(lambda: codec.quantize(x, bits, args.block_size, compiled=compiled), args.repeats)
            dms = _median_ms(lambda: codec.dequantize(q, compiled=compiled), args.repeats)
            rows.append(
                {
                    "route": "compiled" if compiled else "eager",
                    "bits": bits,
                    "quantize_ms": qms,
                    "dequantize_ms": dms,
                    "quantize_x_clone": qms / clone_ms,
                    "dequantize_x_clone": dms / clone_ms,
                    "round_trip_x_clone": (qms + dms) / clone_ms,
                    "sqnr_db": codec.sqnr_db(x, codec.dequantize(q)),
                }
            )
    result = {"numel": args.numel, "threads": args.threads, "block_size": args.block_size, "clone_ms": clone_ms, "rows": rows}
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    print(f"{args.numel} fp32 elements, {args.threads} thread(s), block {args.block_size}: clone() takes {clone_ms:.2f} ms")
    print("| route | bits | quantize ms | dequantize ms | quantize / clone | dequantize / clone | round trip / clone | SQNR dB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['route']} | {r['bits']} | {r['quantize_ms']:.2f} | {r['dequantize_ms']:.2f} | {r['quantize_x_clone']:.2f} | "
            f"{r['dequantize_x_clone']:.2f} | {r['round_trip_x_clone']:.2f} | {r['sqnr_db']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
