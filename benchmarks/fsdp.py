"""FSDP2 with gradcomp's quantized collectives against FSDP2's own, same model, data and steps.

Runs ``launch/train.py --fsdp`` once per configuration, all in the same invocation:

    FSDP2 fp32 (default) | FSDP2 bf16 reduce | int8 grads | int4 grads | int8 grads + int8 weights

Two modes::

    # convergence: TinyGPT 'small', 2 ranks on this machine (launch/run.sh); losses do not depend on timing
    python benchmarks/fsdp.py convergence --steps 600
    # step time on the emulated cluster (launch/netsim.sh, root): comm-bound preset, 1 rank per host
    flock /tmp/gradcomp-bench.lock python benchmarks/fsdp.py cluster --hosts 2 --rate 1gbit

Each prints one markdown table (also written to ``--out-dir``/results.md, with results.json): final
validation loss and its gap to FSDP2 fp32; gradient and weight bytes per step and rank as the
collectives report them, and their ratios to fp32; in cluster mode the bytes the rank-0 host's
interface sent per timed step and the median step time and its ratio to FSDP2 fp32 of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"

RUNS = {
    "FSDP2 fp32": [],
    "FSDP2 bf16 reduce": ["--reduce-dtype", "bf16"],
    "int8 grads": ["--grad-bits", "8"],
    "int4 grads": ["--grad-bits", "4"],
    "int8 grads + int8 weights": ["--grad-bits", "8", "--weight-bits", "8"],
    "int8 grads + int8 weights incl. 1-D": ["--grad-bits", "8", "--weight-bits", "8", "--quantize-1d-weights"],
}
TARGETS = {"int8 grads": 0.01, "int4 grads": 0.03, "int8 grads + int8 weights": 0.02, "int8 grads + int8 weights incl. 1-D": 0.02}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("mode", choices=("convergence", "cluster"))
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 600 convergence, 30 cluster)")
    p.add_argument("--model", default=None, help="TinyGPT preset (default small convergence, comm17m cluster)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per rank (default 16 convergence, 4 cluster)")
    p.add_argument("--nproc", type=int, default=2, help="convergence: ranks")
    p.add_argument("--hosts", type=int, default=2, help="cluster: emulated hosts, one rank each")
    p.add_argument("--rate", default="1gbit", help="cluster: link bandwidth (tc units)")
    p.add_argument("--warmup-steps", type=int, default=10, help="plain collectives first")
    p.add_argument("--seed", type=int, default=0, help="model init and data seed")
    p.add_argument("--time-after", type=int, default=14, help="cluster: steps excluded from timing")
    p.add_argument("--no-fused", action="store_true", help="eager reference codec kernels (default: the fused ones, native on CPU)")
    p.add_argument("--runs", default=",".join(list(RUNS)[:5]), help=f"comma-separated subset of {list(RUNS)}")
    p.add_argument("--floor-rate", default=None,
                   help="cluster: also run FSDP2 fp32 and int8 grads + int8 weights at this link rate (e.g. 40gbit): "
                        "the step without the wire (compute, FSDP and the codec), in the same invocation")
    p.add_argument("--out-dir", default=None, help="default runs/fsdp-<mode>")
    p.add_argument("--timeout", type=int, default=1200, help="cluster: seconds per run before it is stopped")
    p.add_argument("--python", default=sys.executable)
    return p


def run_one(args: argparse.Namespace, label: str, out: Path, rate: str | None = None) -> Dict[str, Any]:
    """Train one configuration (cluster mode: at ``rate``, default ``--rate``); return its summary (plus the netsim report)."""
    out.mkdir(parents=True, exist_ok=True)
    rate = rate or args.rate
    train = [
        "--fsdp", "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed), "--log-every", "50", "--out-dir", str(out),
    ] + RUNS[label] + (["--no-fused"] if args.no_fused else [])
    env = dict(os.environ, PYTHON=args.python)
    if args.mode == "convergence":
        cmd = ["bash", str(LAUNCH / "run.sh"), *train, "--eval-every", "50", "--netdev", "none"]
        env["NPROC"] = str(args.nproc)
    else:
        cmd = [
            "bash", str(LAUNCH / "netsim.sh"), "--hosts", str(args.hosts), "--rate", rate,
            "--report", str(out / "netsim.json"), "--timeout", str(args.timeout), "--grace", "20", "--",
            "bash", str(LAUNCH / "multinode.sh"), *train, "--time-after", str(args.time_after), "--eval-batches", "4", "--netdev", "auto",
        ]
        env.update(NPROC="1", RDZV_ID=f"fsdp-{abs(hash(label)) % 10**6}")
    print(f"== {label}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise RuntimeError(f"{label}: exit code {res.returncode}; end of {out / 'log.txt'}:\n{(out / 'log.txt').read_text()[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    if args.mode == "cluster":
        s["netsim"] = json.loads((out / "netsim.json").read_text())
    s["run_wall_s"] = time.perf_counter() - t0
    print(f"   val loss {s['final_val_loss']:.4f}, median step {1e3 * s['median_step_time_s']:.0f} ms, {s['run_wall_s']:.0f} s", flush=True)
    return s


def table(results: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> str:
    """Markdown table; gaps and ratios against FSDP2 fp32 of the same invocation."""
    ref = results.get("FSDP2 fp32")
    cols = "| run | final val loss | vs fp32 | target | grad kB/step | grad / fp32 | weight kB/step | weight / fp32 |"
    sep = "|---|---:|---:|---|---:|---:|---:|---:|"
    if args.mode == "cluster":
        cols += " wire MB/step (host 0) | median step (ms) | step / fp32 |"
        sep += "---:|---:|---:|"
    lines = [cols, sep]
    for label, s in results.items():
        h = s["hook_stats"]
        gap = (s["final_val_loss"] - ref["final_val_loss"]) / ref["final_val_loss"] if ref else float("nan")
        target = TARGETS.get(label)
        verdict = f"<= {100 * target:.0f}%: {'met' if gap <= target else 'MISSED'}" if target is not None and ref else ""
        line = (
            f"| {label} | {s['final_val_loss']:.4f} | {100 * gap:+.2f}% | {verdict} | {h['grad_bytes_step'] / 1e3:.0f} | "
            f"{h['grad_ratio']:.3f} | {h['weight_bytes_step'] / 1e3:.0f} | {h['weight_ratio']:.3f} |"
        )
        if args.mode == "cluster":
            wire = (s.get("wire_per_step") or [{}])[0].get("wire_per_step")
            wire_mb = f"{wire['tx_bytes'] / 1e6:.2f}" if wire else "n/a"
            ratio = s["median_step_time_s"] / ref["median_step_time_s"] if ref else float("nan")
            line += f" {wire_mb} | {1e3 * s['median_step_time_s']:.0f} | {ratio:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    """Run every requested configuration; print and save the table."""
    args = build_parser().parse_args(argv)
    conv = args.mode == "convergence"
    args.steps = args.steps or (600 if conv else 30)
    args.model = args.model or ("small" if conv else "comm17m")
    args.batch_size = args.batch_size or (16 if conv else 4)
    labels = [x.strip() for x in args.runs.split(",") if x.strip()]
    unknown = [x for x in labels if x not in RUNS]
    if unknown:
        print(f"fsdp.py: error: unknown run(s) {unknown}; expected some of {list(RUNS)}", file=sys.stderr)
        return 2
    if not conv and os.geteuid() != 0:
        print("fsdp.py: error: the emulated cluster needs root (network namespaces)", file=sys.stderr)
        return 3
    out = Path(args.out_dir or f"runs/fsdp-{args.mode}")
    results: Dict[str, Dict[str, Any]] = {}
    failed: List[str] = []
    for label in labels:
        slug = label.lower().replace(" + ", "_").replace(" ", "_")
        try:
            results[label] = run_one(args, label, out / slug)
        except RuntimeError as exc:  # one failed run must not hide the others
            failed.append(label)
            print(f"   FAILED: {exc}", flush=True)
    if not conv and args.floor_rate:
        for label in ("FSDP2 fp32", "int8 grads + int8 weights"):
            slug = label.lower().replace(" + ", "_").replace(" ", "_") + "_floor"
            try:
                results[f"{label} @ {args.floor_rate} (floor)"] = run_one(args, label, out / slug, rate=args.floor_rate)
            except RuntimeError as exc:
                failed.append(f"{label} @ {args.floor_rate}")
                print(f"   FAILED: {exc}", flush=True)
    if not results:
        return 1
    ranks = args.nproc if conv else args.hosts
    where = f"{ranks} ranks on one machine" if conv else f"{args.hosts} hosts x 1 rank at {args.rate}, timed from step {args.time_after + 1}"
    header = (
        f"TinyGPT '{args.model}' ({next(iter(results.values()))['parameters'] / 1e6:.2f}M parameters), FSDP2, {where}, "
        f"batch {args.batch_size} x 64 bytes per rank, {args.steps} steps, warm-up {args.warmup_steps}, seed {args.seed}, "
        f"codec {'eager' if args.no_fused else 'fused (native on CPU)'}"
    )
    md = table(results, args)
    print()
    print(header)
    print(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(header + "\n\n" + md + "\n")
    (out / "results.json").write_text(json.dumps({"config": vars(args), "results": results}, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
