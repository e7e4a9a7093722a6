"""Benchmark the gradient hooks on the emulated cluster: same model, same data, one hook after another.

Every hook trains the communication-bound 17.6M-parameter TinyGPT preset (``comm17m``) for the same
steps on ``--hosts`` network namespaces joined at ``--rate`` (``launch/netsim.sh``), one rank per host,
and the baselines are measured in the same run: DDP's fp32 all-reduce, PyTorch's ``fp16_compress_hook``
and PyTorch's PowerSGD at rank 4. It prints one table:

    hook | wire MB/step | hook MB/step | median step | ratio to fp32 | loss after K steps | overlap

* wire MB/step: bytes the rank-0 host's interface sent per timed step, read from its counters
  (``/sys/class/net/eth0/statistics`` inside the namespace) before and after the timed steps;
* hook MB/step: what the hook reports sending per rank and step (``state.stats()`` for gradcomp; for
  the baselines the same formula: a ring all-reduce sends ``2 (P-1)/P`` times its payload);
* median step: median wall time of the timed steps on rank 0 (after every hook's warm-up);
* overlap: share of the hook's communication time that ran while gradients were still computed.

Needs root (network namespaces). Timings are only fair on an otherwise idle machine; wrap the run in
the shared lock so benchmarks do not overlap::

    flock /tmp/gradcomp-bench.lock python benchmarks/benchmark.py --hosts 2 --rate 1gbit
    flock /tmp/gradcomp-bench.lock python benchmarks/benchmark.py --hosts 4 --rate 1gbit --out-dir runs/bench4

Results go to ``--out-dir`` (default ``runs/bench``): ``results.json``, ``results.md`` and each hook's run
directory with its ``metrics.jsonl``, ``summary.json`` and ``netsim.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"

HOOK_ARGS = {
    "allreduce": ["--hook", "allreduce"],
    "fp16": ["--hook", "fp16"],
    "powersgd": ["--hook", "powersgd", "--powersgd-rank", "4"],
    "int8": ["--hook", "int8"],
    "int4": ["--hook", "int4"],
    "int4-noef": ["--hook", "int4", "--no-error-feedback"],
}
LABELS = {
    "allreduce": "fp32 all-reduce (DDP default)",
    "fp16": "fp16_compress_hook (PyTorch)",
    "powersgd": "PowerSGD rank 4 (PyTorch)",
    "int8": "gradcomp int8 + EF",
    "int4": "gradcomp int4 + EF",
    "int4-noef": "gradcomp int4, no EF",
}


def build_parser() -> argparse.ArgumentParser:
    """Return the benchmark's argument parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hosts", type=int, default=2, help="emulated hosts, one rank each")
    p.add_argument("--rate", default="1gbit", help="link bandwidth (tc units)")
    p.add_argument("--hooks", default="allreduce,fp16,powersgd,int8,int4", help=f"comma-separated, from {sorted(HOOK_ARGS)}")
    p.add_argument("--model", default="comm17m", help="TinyGPT preset")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=30, help="steps per hook (K)")
    p.add_argument("--time-after", type=int, default=14, help="steps excluded from timing (warm-up of every hook, compilation)")
    p.add_argument("--warmup-steps", type=int, default=10, help="plain all-reduce steps of int8/int4 and PowerSGD")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--no-compile", action="store_true", help="run gradcomp's codec eagerly instead of torch.compile'd")
    p.add_argument("--no-trace", action="store_true", help="do not time hook calls against the backward pass")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size")
    p.add_argument("--out-dir", default="runs/bench")
    p.add_argument("--timeout", type=int, default=900, help="seconds per hook before the run is stopped")
    p.add_argument("--python", default=sys.executable, help="interpreter for the training job")
    return p


def run_hook(args: argparse.Namespace, hook: str, out: Path) -> Dict[str, Any]:
    """Train with one hook on the emulated cluster; return its summary plus netsim's report."""
    out.mkdir(parents=True, exist_ok=True)
    train_args = [
        "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--threads", str(args.threads), "--time-after", str(args.time_after),
        "--warmup-steps", str(args.warmup_steps), "--powersgd-start-iter", str(max(2, args.warmup_steps)),
        "--bucket-cap-mb", str(args.bucket_cap_mb), "--log-every", "10", "--eval-batches", "4",
        "--out-dir", str(out), "--netdev", "auto",
    ] + HOOK_ARGS[hook]
    if not args.no_compile and hook.startswith("int"):
        train_args.append("--compile")
    if not args.no_trace:
        train_args.append("--trace-overlap")
    cmd = [
        "bash", str(LAUNCH / "netsim.sh"), "--hosts", str(args.hosts), "--rate", args.rate,
        "--report", str(out / "netsim.json"), "--timeout", str(args.timeout), "--grace", "20", "--",
        "bash", str(LAUNCH / "multinode.sh"),
    ] + train_args
    env = dict(os.environ, PYTHON=args.python, NPROC="1", RDZV_ID=f"bench-{hook}")
    print(f"== {hook}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = (out / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"hook {hook}: the run failed with exit code {res.returncode}; end of {out / 'log.txt'}:\n{tail}")
    summary = json.loads((out / "summary.json").read_text())
    summary["netsim"] = json.loads((out / "netsim.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary["loss_last5"] = statistics.fmean(r["loss"] for r in records[-5:])
    summary["run_wall_s"] = time.perf_counter() - t0
    print(
        f"   median step {1e3 * summary['median_step_time_s']:.1f} ms, loss {summary['loss_last5']:.4f}, "
        f"{summary['run_wall_s']:.0f} s wall",
        flush=True,
    )
    return summary


def table(results: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> str:
    """Render the results as a markdown table (ratios against the fp32 all-reduce of the same run)."""
    base = results.get("allreduce", {}).get("median_step_time_s")
    lines = [
        f"| hook | wire MB/step (tx, host 0) | hook MB/step | median step (ms) | ratio to fp32 | loss after {args.steps} steps | val loss | comm overlapped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for hook, s in results.items():
        wire = s["wire_per_step"][0].get("wire_per_step") if s.get("wire_per_step") else None
        wire_mb = f"{wire['tx_bytes'] / 1e6:.2f}" if wire else "n/a"
        ratio = f"{s['median_step_time_s'] / base:.3f}" if base else "n/a"
        ov = (s.get("overlap") or {}).get("overlap_fraction")
        ov_s = f"{100 * ov:.0f}%" if isinstance(ov, float) and ov == ov else "n/a"
        lines.append(
            f"| {LABELS.get(hook, hook)} | {wire_mb} | {s['hook_bytes_per_step'] / 1e6:.2f} | "
            f"{1e3 * s['median_step_time_s']:.1f} | {ratio} | {s['loss_last5']:.4f} | {s['final_val_loss']:.4f} | {ov_s} |"
        )
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    """Run every requested hook, print and save the table; return the exit code."""
    args = build_parser().parse_args(argv)
    hooks = [h.strip() for h in args.hooks.split(",") if h.strip()]
    unknown = [h for h in hooks if h not in HOOK_ARGS]
    if unknown:
        print(f"benchmark.py: error: unknown hook(s) {unknown}; expected some of {sorted(HOOK_ARGS)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("benchmark.py: error: the emulated cluster needs root (network namespaces); run it as root", file=sys.stderr)
        return 3
    out = Path(args.out_dir)
    results: Dict[str, Dict[str, Any]] = {}
    failed: Dict[str, str] = {}
    for hook in hooks:
        try:
            results[hook] = run_hook(args, hook, out / hook)
        except RuntimeError as exc:  # one broken hook must not hide the others' results
            print(f"   FAILED: {exc}", flush=True)
            failed[hook] = str(exc).splitlines()[0]
    if not results:
        print("benchmark.py: error: every hook failed", file=sys.stderr)
        return 1
    md = table(results, args)
    header = (
        f"{args.hosts} hosts x 1 rank, {args.rate} links, model {args.model} "
        f"({next(iter(results.values()))['parameters'] / 1e6:.1f}M parameters), batch {args.batch_size} x 64 bytes per rank, "
        f"{args.steps} steps, timed from step {args.time_after + 1}, {args.threads} thread(s) per rank, "
        f"gradcomp codec {'eager' if args.no_compile else 'torch.compile'}"
    )
    for hook, reason in failed.items():
        md += f"\n\n{LABELS.get(hook, hook)}: failed ({reason})"
    print()
    print(header)
    print(md)
    (out / "results.md").write_text(header + "\n\n" + md + "\n")
    (out / "results.json").write_text(json.dumps({"config": vars(args), "results": results, "failed": failed}, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
