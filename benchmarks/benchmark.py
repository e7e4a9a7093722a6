"""Benchmark the gradient hooks on the emulated cluster: step time, its floor, and time to accuracy.

One command measures everything, every baseline in the same run::

    sudo flock /tmp/gradcomp-bench.lock python benchmarks/benchmark.py

It prints the expected runtime first (about 30 minutes on an idle 2-core machine) and runs three
parts, each training the communication-bound 17.6M-parameter TinyGPT preset (``comm17m``) on
``--hosts`` network namespaces joined at ``--rate`` (``launch/netsim.sh``), one rank per host, one
thread per rank, every hook with its default options:

* ``steps2`` / ``steps4``: step time at 2 and 4 hosts. Hooks: DDP's fp32 all-reduce, PyTorch's
  ``fp16_compress_hook``, PyTorch's PowerSGD at rank 4, gradcomp int8 and int4 (defaults), gradcomp
  with the measured policy (``--policy``), and ``local``: the same job with no communication at all
  (each rank keeps its own gradient), which gives the **floor**.
* ``tta``: time to accuracy at 2 hosts. fp32 all-reduce trains ``--tta-steps`` steps; its final
  validation loss is the target. Every other hook trains the same run (same seed, data and
  learning-rate schedule of ``--tta-steps`` steps, then the schedule's final rate) until its
  validation loss, evaluated every ``--tta-eval-every`` steps, is at or below the target, for at
  most ``--tta-extra`` times as many steps. The time to accuracy is the training time until then:
  the sum of rank 0's step times, evaluation excluded.

Columns of the step-time table:

* wire MB/step: bytes the rank-0 host's interface sent per timed step (its kernel counters);
* median step: median wall time of the timed steps on rank 0 (after every hook's warm-up);
* floor: the ``local`` run's median step (no communication) plus the hook's minimum memory time:
  the fewest bytes its data path must read and write per gradient value (``min B/value``, below)
  times the gradient's values, at the bandwidth of one memory pass on this machine in the same
  run (``copy_`` of the gradient into a held buffer; a ``clone()``, which allocates and faults in
  fresh pages every call, is several times slower and is shown beside it). With the codec and the
  wire fully overlapped with each other and with nothing else, a step could not be faster;
* B/value: bytes the hook's own CPU work is worth per gradient value, measured: its local work on
  one bucket of the model's size (gradcomp: encode, reduce the owned shard, decode, one thread)
  in units of that memory pass (8 bytes per value), beside ``min B/value``: for gradcomp
  ``16 + 3c + (8 + c)/P`` with ``c = bits/8 + 4/256`` the code bytes per value (encode reads the
  bucket and the residual and writes the residual and the codes; the owner reads P shards of codes
  and its residual and writes its residual and its message; decode reads the gathered codes and
  writes the bucket); fp32 ring all-reduce ``16 (P-1)/P`` (reduce-scatter reads two and writes one
  fp32 value per reduced value, the all-gather writes the rest); the fp16 hook ``12 + 8 (P-1)/P``
  (two casts, then the same ring in fp16). PowerSGD's depends on the matrix shapes: not given.

Needs root (network namespaces); the timings are only fair on an otherwise idle machine, hence the
lock. Results go to ``--out-dir`` (default ``runs/bench``): ``results.md``, ``results.json`` and each
run's directory with ``metrics.jsonl``, ``summary.json``, ``netsim.json`` and ``log.txt``.
``--parts steps2`` runs one part; ``--report-only`` redraws the tables from ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"

HOOK_ARGS = {
    "local": ["--hook", "local"],
    "allreduce": ["--hook", "allreduce"],
    "fp16": ["--hook", "fp16"],
    "powersgd": ["--hook", "powersgd", "--powersgd-rank", "4"],
    "int8": ["--hook", "int8"],
    "int4": ["--hook", "int4"],
    "policy": ["--hook", "int8", "--policy"],
    "int4-noef": ["--hook", "int4", "--no-error-feedback"],
}
LABELS = {
    "local": "no communication (floor run)",
    "allreduce": "fp32 all-reduce (DDP default)",
    "fp16": "fp16_compress_hook (PyTorch)",
    "powersgd": "PowerSGD rank 4 (PyTorch)",
    "int8": "gradcomp int8, defaults",
    "int4": "gradcomp int4, defaults",
    "policy": "gradcomp policy (plain/int8/int4)",
    "int4-noef": "gradcomp int4, no EF",
}
PARTS = ("steps2", "steps4", "tta")
STEP_HOOKS = "local,allreduce,fp16,powersgd,int8,int4,policy"
TTA_HOOKS = "allreduce,fp16,powersgd,int8,int4,policy"
# seconds per step and per run start on the idle 2-core machine, for the runtime forecast
_FORECAST_STEP = {2: 0.75, 4: 1.3}
_FORECAST_START = 25.0
_FORECAST_COMPILE = 45.0


def build_parser() -> argparse.ArgumentParser:
    """Return the benchmark's argument parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {PARTS}")
    p.add_argument("--rate", default="1gbit", help="link bandwidth (tc units)")
    p.add_argument("--hooks", default=STEP_HOOKS, help=f"step-time parts: comma-separated, from {sorted(HOOK_ARGS)}")
    p.add_argument("--model", default="comm17m", help="TinyGPT preset")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=30, help="steps per hook in the step-time parts")
    p.add_argument("--time-after", type=int, default=14, help="steps excluded from timing (warm-up of every hook)")
    p.add_argument("--warmup-steps", type=int, default=10, help="plain all-reduce steps of gradcomp and PowerSGD")
    p.add_argument("--tta-hooks", default=TTA_HOOKS, help="time-to-accuracy part: comma-separated hooks (allreduce first)")
    p.add_argument("--tta-hosts", type=int, default=2, help="hosts of the time-to-accuracy part")
    p.add_argument("--tta-steps", type=int, default=150, help="steps of every time-to-accuracy run")
    p.add_argument("--tta-eval-every", type=int, default=10, help="validation loss every N steps")
    p.add_argument("--tta-extra", type=float, default=1.5,
                   help="other hooks may train up to this many times --tta-steps (at the schedule's final rate) to reach the target")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size")
    p.add_argument("--trace", action="store_true", help="time hook calls against the backward pass (overlap)")
    p.add_argument("--train-args", default="", help="extra arguments for launch/train.py, e.g. '--no-compile'")
    p.add_argument("--out-dir", default="runs/bench")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run before it is stopped")
    p.add_argument("--python", default=sys.executable, help="interpreter for the training job")
    p.add_argument("--report-only", action="store_true", help="redraw the tables from --out-dir/results.json, run nothing")
    p.add_argument("--measure-memory", action="store_true", help="with --report-only: measure the memory figures again")
    return p


def _split(text: str) -> List[str]:
    return [h.strip() for h in text.split(",") if h.strip()]


# --------------------------------------------------------------------------------------------
# running


def run_hook(
    args: argparse.Namespace, hook: str, hosts: int, out: Path, steps: int, time_after: int, eval_every: int = 0, extra: Sequence[str] = ()
) -> Dict[str, Any]:
    """Train with one hook on the emulated cluster; return its summary, netsim's report and its records."""
    out.mkdir(parents=True, exist_ok=True)
    train_args = [
        "--model", args.model, "--steps", str(steps), "--batch-size", str(args.batch_size),
        "--threads", str(args.threads), "--time-after", str(time_after),
        "--warmup-steps", str(args.warmup_steps), "--powersgd-start-iter", str(max(2, args.warmup_steps)),
        "--bucket-cap-mb", str(args.bucket_cap_mb), "--log-every", "10", "--eval-batches", str(16 if eval_every else 4),
        "--eval-every", str(eval_every), "--out-dir", str(out), "--netdev", "auto",
    ] + HOOK_ARGS[hook] + list(extra) + args.train_args.split()
    if args.trace:
        train_args.append("--trace-overlap")
    if not eval_every and hook in ("int8", "int4", "policy", "int4-noef"):
        # step time: the steady state, after the background compilation (the time-to-accuracy runs do not wait)
        train_args.append("--wait-fused-kernels")
    cmd = [
        "bash", str(LAUNCH / "netsim.sh"), "--hosts", str(hosts), "--rate", args.rate,
        "--report", str(out / "netsim.json"), "--timeout", str(args.timeout), "--grace", "20", "--",
        "bash", str(LAUNCH / "multinode.sh"),
    ] + train_args
    env = dict(os.environ, PYTHON=args.python, NPROC="1", RDZV_ID=f"bench-{hook}")
    print(f"== {hook}, {hosts} hosts: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = (out / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"hook {hook}: the run failed with exit code {res.returncode}; end of {out / 'log.txt'}:\n{tail}")
    summary = json.loads((out / "summary.json").read_text())
    summary["netsim"] = json.loads((out / "netsim.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary["records"] = [{k: r[k] for k in ("step", "loss", "step_time_s", "val_loss") if k in r} for r in records]
    summary["run_wall_s"] = time.perf_counter() - t0
    summary.pop("args", None)
    # the policy logs its choice per bucket size: "gradcomp policy: bucket 0: 17563648 elements -> twophase-int8 (...)"
    choices = re.findall(r"gradcomp policy: bucket \d+: (\d+) elements -> (\S+)", (out / "log.txt").read_text())
    if choices:
        summary["policy_choices"] = {int(n): scheme for n, scheme in choices}
    print(
        f"   median step {1e3 * summary['median_step_time_s']:.1f} ms, val loss {summary['final_val_loss']:.4f}, "
        f"{summary['run_wall_s']:.0f} s wall",
        flush=True,
    )
    return summary


def measure_memory(numel: int, hosts: List[int], repeats: int = 5) -> Dict[str, Any]:
    """Time one memory pass over ``numel`` fp32 values and gradcomp's local work per bucket, one thread.

    The memory pass is ``y.copy_(x)`` into a buffer held across calls (8 bytes per value read and
    written): the bandwidth a persistent-buffer data path can reach. A ``clone()`` is timed too,
    for comparison; it allocates a fresh buffer every call and pays the page faults of it.

    Returns the seconds of both and the copy's bandwidth and, per width and world size, the seconds
    of the hook's local steps on one bucket of ``numel`` values with its default options.
    """
    import torch

    from gradcomp.comm.hook import HookConfig
    from gradcomp.comm.measure import hook_local_work, timed

    torch.set_num_threads(1)
    x = torch.randn(numel)
    y = torch.empty_like(x)
    t_clone = timed(lambda: x.clone(), repeats)
    t_copy = timed(lambda: y.copy_(x), repeats)
    out: Dict[str, Any] = {
        "numel": numel, "clone_s": t_clone, "copy_s": t_copy, "memory_bytes_per_s": 8 * numel / t_copy, "hook": {},
    }
    cfg = HookConfig()
    for P in hosts:
        for bits in (8, 4):
            stages = hook_local_work(bits, cfg.block_size, numel, P, repeats=repeats, compiled=cfg.compile)
            out["hook"][f"int{bits}/{P}"] = stages
    return out


def min_bytes_per_value(hook: str, P: int, block_size: int = 256) -> Optional[float]:
    """The fewest bytes a hook's data path must read and write per gradient value (see the module docstring)."""
    if hook == "allreduce":
        return 16 * (P - 1) / P
    if hook == "fp16":
        return 12 + 8 * (P - 1) / P
    bits = {"int8": 8, "int4": 4, "policy": 8, "int4-noef": 4}.get(hook)
    if bits is None:
        return None
    c = bits / 8 + 4 / block_size
    if hook == "int4-noef":  # no residuals to read and write
        return 8 + 3 * c + c / P
    return 16 + 3 * c + (8 + c) / P


# --------------------------------------------------------------------------------------------
# tables


def steps_table(results: Dict[str, Dict[str, Any]], P: int, memory: Optional[Dict[str, Any]]) -> str:
    """Render one step-time part as markdown (ratios against the fp32 all-reduce of the same run)."""
    base = results.get("allreduce", {}).get("median_step_time_s")
    local = results.get("local", {}).get("median_step_time_s")
    lines = [
        "| hook | wire MB/step (tx, host 0) | median step (ms) | vs fp32 | floor (ms) | floor vs fp32 | step / floor | B/value measured | min B/value | val loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for hook, s in results.items():
        wire = s["wire_per_step"][0].get("wire_per_step") if s.get("wire_per_step") else None
        wire_mb = f"{wire['tx_bytes'] / 1e6:.2f}" if wire else "n/a"
        step = s["median_step_time_s"]
        ratio = f"{step / base:.3f}" if base else "n/a"
        route = hook
        choices = {int(n): sch for n, sch in (s.get("policy_choices") or {}).items()}  # JSON keys are strings
        if choices:  # the policy's choice for its largest bucket
            chosen = max(choices.items())[1]
            route = "allreduce" if chosen.startswith("ring") else chosen.split("-")[-1]
        mb = min_bytes_per_value(route, P)
        measured = "-"
        floor = floor_ratio = step_floor = "-"
        if memory is not None and local is not None:
            mem_bw, n = memory.get("memory_bytes_per_s", memory.get("clone_bytes_per_s")), memory["numel"]
            if hook == "local":
                fl = local
            elif mb is not None:
                fl = local + mb * n / mem_bw
            else:
                fl = None
            if fl is not None:
                floor, step_floor = f"{1e3 * fl:.1f}", f"{step / fl:.2f}"
                floor_ratio = f"{fl / base:.3f}" if base else "n/a"
            bits = {"int8": 8, "int4": 4}.get(route)
            stages = memory["hook"].get(f"int{bits}/{P}") if bits else None
            if stages:
                measured = f"{8 * stages['total_s'] / memory.get('copy_s', memory['clone_s']):.1f}"
        label = LABELS.get(hook, hook)
        if s.get("fused_kernels_ready") is False:
            label += " (eager kernels: the fused ones were not ready)"
        if choices:
            label += " [" + ", ".join(f"{n / 1e6:.2g}M: {sch}" for n, sch in sorted(choices.items(), reverse=True)[:3]) + "]"
        lines.append(
            f"| {label} | {wire_mb} | {1e3 * step:.1f} | {ratio} | {floor} | {floor_ratio} | {step_floor} | "
            f"{measured} | {'-' if mb is None else f'{mb:.1f}'} | {s['final_val_loss']:.4f} |"
        )
    return "\n".join(lines)


def time_to_target(records: List[Dict[str, Any]], target: float) -> Dict[str, Any]:
    """Return the first evaluation at or below ``target``: its step and the training seconds until then.

    Training seconds are the sum of rank 0's step times up to that step (evaluation excluded).
    """
    elapsed = 0.0
    for r in records:
        elapsed += r["step_time_s"]
        if "val_loss" in r and r["val_loss"] <= target:
            return {"step": r["step"], "seconds": elapsed, "val_loss": r["val_loss"]}
    return {"step": None, "seconds": None, "val_loss": None}


def tta_table(results: Dict[str, Dict[str, Any]]) -> str:
    """Render the time-to-accuracy part as markdown; the target is the fp32 run's final validation loss."""
    ref = results.get("allreduce")
    if ref is None:
        return "(no fp32 all-reduce run: no target)"
    target = ref["final_val_loss"]
    ref_t = time_to_target(ref["records"], target)["seconds"]
    lines = [
        f"Target: the fp32 all-reduce run's final validation loss, {target:.4f}.",
        "",
        "| hook | last val loss | vs target | reached at step | training time to target (s) | vs fp32 | median step (ms) | total training time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for hook, s in results.items():
        hit = time_to_target(s["records"], target)
        total = sum(r["step_time_s"] for r in s["records"])
        gap = 100 * (s["final_val_loss"] - target) / target
        if hit["step"] is None:
            reached, secs, rel = f"never in {s['steps']} steps", "-", "-"
        else:
            reached, secs = str(hit["step"]), f"{hit['seconds']:.1f}"
            rel = f"{hit['seconds'] / ref_t:.3f}" if ref_t else "n/a"
        lines.append(
            f"| {LABELS.get(hook, hook)} | {s['final_val_loss']:.4f} | {gap:+.2f}% | {reached} | {secs} | {rel} | "
            f"{1e3 * s['median_step_time_s']:.1f} | {total:.1f} |"
        )
    return "\n".join(lines)


def render(saved: Dict[str, Any]) -> str:
    """Render every part of a saved run as markdown, with the conditions in a header line each."""
    cfg, parts, memory = saved["config"], saved["parts"], saved.get("memory")
    md = []
    for part in PARTS:
        if part not in parts or not parts[part]["results"]:
            continue
        res = parts[part]["results"]
        P = parts[part]["hosts"]
        params = next(iter(res.values()))["parameters"]
        if part == "tta":
            md.append(
                f"**Time to accuracy**, {P} hosts x 1 rank, {cfg['rate']} links, model {cfg['model']} ({params / 1e6:.1f}M parameters), "
                f"batch {cfg['batch_size']} x 64 bytes per rank, {cfg['tta_steps']} steps, validation every {cfg['tta_eval_every']} steps, "
                f"{cfg['threads']} thread(s) per rank, default hook options"
            )
            md.append("")
            md.append(tta_table(res))
        else:
            md.append(
                f"**Step time**, {P} hosts x 1 rank, {cfg['rate']} links, model {cfg['model']} ({params / 1e6:.1f}M parameters), "
                f"batch {cfg['batch_size']} x 64 bytes per rank, {cfg['steps']} steps timed from step {cfg['time_after'] + 1}, "
                f"{cfg['threads']} thread(s) per rank, default hook options"
                + (f"; one memory pass over the gradient (copy_ into a held buffer) {1e3 * memory['copy_s']:.1f} ms "
                   f"({memory['memory_bytes_per_s'] / 1e9:.2f} GB/s), a clone() {1e3 * memory['clone_s']:.1f} ms"
                   if memory and "copy_s" in memory else "")
            )
            md.append("")
            md.append(steps_table(res, P, memory))
        for hook, reason in parts[part].get("failed", {}).items():
            md.append(f"\n{LABELS.get(hook, hook)}: failed ({reason})")
        md.append("")
    return "\n".join(md)


def forecast(args: argparse.Namespace, parts: List[str]) -> float:
    """Seconds the requested parts should take on the idle machine (the runtime printed up front)."""
    total = 0.0
    for part in parts:
        if part == "tta":
            hooks = _split(args.tta_hooks)
            # most hooks reach the target near --tta-steps; PowerSGD runs to the end
            total += len(hooks) * _FORECAST_START + (len(hooks) + args.tta_extra) * args.tta_steps * _FORECAST_STEP.get(args.tta_hosts, 1.5) * 0.8
        else:
            P = 2 if part == "steps2" else 4
            total += len(_split(args.hooks)) * (_FORECAST_START + args.steps * _FORECAST_STEP[P])
            # gradcomp's step-time runs wait for the background compilation of the fused kernels
            total += _FORECAST_COMPILE * sum(h in ("int8", "int4", "policy", "int4-noef") for h in _split(args.hooks))
    return total + 30.0


def main(argv: List[str] | None = None) -> int:
    """Run the requested parts, print and save the tables; return the exit code."""
    args = build_parser().parse_args(argv)
    out = Path(args.out_dir)
    parts = _split(args.parts)
    bad = [p for p in parts if p not in PARTS] + [h for h in _split(args.hooks) + _split(args.tta_hooks) if h not in HOOK_ARGS]
    if bad:
        print(f"benchmark.py: error: unknown part(s) or hook(s) {bad}; parts are {PARTS}, hooks {sorted(HOOK_ARGS)}", file=sys.stderr)
        return 2
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        if args.measure_memory:
            params = next(r["parameters"] for p in saved["parts"].values() for r in p["results"].values())
            saved["memory"] = measure_memory(params, sorted({p["hosts"] for k, p in saved["parts"].items() if k != "tta"}))
            (out / "results.json").write_text(json.dumps(saved, indent=1, default=str))
        md = render(saved)
        (out / "results.md").write_text(md + "\n")
        print(md)
        return 0
    if os.geteuid() != 0:
        print("benchmark.py: error: the emulated cluster needs root (network namespaces); run it as root", file=sys.stderr)
        return 3
    eta = forecast(args, parts)
    print(f"expected runtime: about {eta / 60:.0f} minutes on an idle 2-core machine (more when other jobs run); "
          f"every run stops after {args.timeout} s at most", flush=True)
    t_start = time.perf_counter()
    saved: Dict[str, Any] = {"config": vars(args), "parts": {}, "memory": None}
    failed_any = False
    params = None
    for part in parts:
        if part == "tta":
            hosts, hooks = args.tta_hosts, _split(args.tta_hooks)
        else:
            hosts, hooks = (2 if part == "steps2" else 4), _split(args.hooks)
        results: Dict[str, Dict[str, Any]] = {}
        failed: Dict[str, str] = {}
        if part == "tta" and hooks[0] != "allreduce":
            hooks = ["allreduce"] + [h for h in hooks if h != "allreduce"]  # its final loss is the target
        for hook in hooks:
            try:
                if part == "tta" and hook == "allreduce":
                    results[hook] = run_hook(args, hook, hosts, out / part / hook, args.tta_steps, args.warmup_steps + 3, args.tta_eval_every)
                elif part == "tta":
                    if "allreduce" not in results:
                        raise RuntimeError("no fp32 all-reduce run, hence no target loss")
                    extra = ["--schedule-steps", str(args.tta_steps), "--target-val-loss", repr(results["allreduce"]["final_val_loss"])]
                    longest = math.ceil(args.tta_extra * args.tta_steps)
                    results[hook] = run_hook(args, hook, hosts, out / part / hook, longest, args.warmup_steps + 3, args.tta_eval_every, extra)
                else:
                    results[hook] = run_hook(args, hook, hosts, out / part / hook, args.steps, args.time_after)
                params = results[hook]["parameters"]
            except RuntimeError as exc:  # one broken hook must not hide the others' results
                print(f"   FAILED: {exc}", flush=True)
                failed[hook] = str(exc).splitlines()[0]
                failed_any = True
        saved["parts"][part] = {"hosts": hosts, "results": results, "failed": failed}
        (out / "results.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(saved, indent=1, default=str))
    if params is not None and any(p != "tta" for p in parts):
        print("== memory: clone and gradcomp's local work on one bucket of the model's size, one thread", flush=True)
        saved["memory"] = measure_memory(params, sorted({2 if p == "steps2" else 4 for p in parts if p != "tta"}))
    saved["wall_s"] = time.perf_counter() - t_start
    md = render(saved)
    print()
    print(md)
    print(f"(took {saved['wall_s'] / 60:.1f} minutes; forecast {eta / 60:.0f})")
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(saved, indent=1, default=str))
    return 1 if failed_any else 0


if __name__ == "__main__":
    sys.exit(main())
