"""Benchmark the gradient hooks on the emulated cluster: step time, the first 50 steps, the policy, time to accuracy.

One command measures everything, every baseline in the same run::

    sudo flock /tmp/gradcomp-bench.lock python benchmarks/benchmark.py

It prints the expected runtime first (about an hour on an idle 2-core machine with the defaults)
and, for each TinyGPT preset of ``--models``, runs the parts of ``--parts`` on ``launch/netsim.sh``'s
network namespaces, one rank per host, one thread per rank, every hook with its default options:

Presets (``gradcomp.examples.tasks.GPT_PRESETS``), each with its own batch (``--batch-size``
overrides both):

* ``gpt20m``, the headline: 19.1M parameters in 6 transformer blocks of width 512, no big table.
  With DDP's default 25 MB buckets its gradient reaches DDP in 4 buckets (1.05M, 7.36M, 6.57M and
  4.11M values), the first three while backward still runs. Batch 2 x 64 bytes per rank: the step
  without communication (forward, backward, clipping, AdamW; one process, one thread) costs 0.21 s
  of CPU time (0.13 s at batch 1; measured with other jobs on the machine, wall 0.31-0.33 s).
* ``comm17m``, the single-bucket case: 17.6M parameters, 16.8M of them in one byte-bigram table
  whose gradient is one 17.3M-value bucket that reaches DDP at the very end of backward (beside it
  a 0.26M and a 0.08M bucket). Batch 4 x 64 bytes.

Parts, each for every preset (``tta``: for the presets of ``--tta-models``, by default the first one):

* ``steps2`` / ``steps4``: step time at 2 and 4 hosts joined at ``--rate`` (1 Gbit/s);
* ``nolimit2``: step time at 2 hosts with ``--nolimit-rate`` (a 100 Gbit/s token bucket: one TCP
  stream between two emulated hosts carried 11.5 Gbit/s through it, against 0.95 Gbit/s at 1gbit,
  so no limit is in effect);
* ``tta``: time to accuracy at ``--tta-hosts`` hosts. fp32 all-reduce trains ``--tta-steps`` steps;
  its final validation loss is the target. Every other hook trains the same run (same seed, data and
  learning-rate schedule, then the schedule's final rate) until its validation loss, evaluated every
  ``--tta-eval-every`` steps, is at or below the target, for at most ``--tta-extra`` times as many
  steps. The time to accuracy is the sum of rank 0's step times until then, evaluation excluded.

Hooks of the step-time parts (``--hooks``): DDP's fp32 all-reduce, PyTorch's ``fp16_compress_hook``,
PyTorch's PowerSGD at rank 4 (on gloo in one bucket: with two or more in flight it deadlocks gloo),
gradcomp int8 and int4 (defaults), gradcomp with the measured policy (``--policy``: plain, int8 or
int4 per bucket), and ``local``: the same job with no communication at all, which gives the floor.

**Every run starts on an empty compile cache**: each host of each run gets a new temporary
``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR`` (removed after the run), and nothing is waited
for before the timed steps. So a table shows what a user's first job gets, from its first step.

Columns of the step-time table (ratios against runs of the same invocation):

* buckets/step: buckets DDP handed to the hook in the last step (PowerSGD: one, see above);
* wire MB/step: bytes the rank-0 host's interface sent per timed step (its kernel counters);
* median step: median wall time on rank 0 of steps ``--time-after`` + 1 to ``--steps``: the steady
  state, against fp32 all-reduce, the fp16 hook and PowerSGD;
* first 50 steps: wall time on rank 0 from the hook's setup (registration and whatever it starts)
  to the end of step 50 (steps 0-49 counted from 0: warm-up steps, compilation, logging included),
  against fp32 all-reduce and the fp16 hook;
* kernels: the kernels gradcomp's exchange ran ("native (avx512)": built at install; "-": not gradcomp);
* floor: the ``local`` run's median step (no communication) plus the hook's minimum memory time:
  the fewest bytes its data path must read and write per gradient value (``min B/value``) times the
  gradient's values, at the bandwidth of one memory pass in the same invocation (``copy_`` of the
  gradient into a held buffer; a ``clone()``, which faults in fresh pages every call, is shown beside
  it). With the codec and the wire fully overlapped with each other and with nothing else, a step
  could not be faster;
* B/value: bytes the hook's own CPU work is worth per gradient value, measured: its local work on one
  bucket of the model's size (gradcomp: encode, reduce the owned shard, decode, one thread) in units of
  that memory pass (8 bytes per value), beside ``min B/value``: for gradcomp ``16 + 3c + (8 + c)/P``
  with ``c = bits/8 + 4/256`` the code bytes per value; fp32 ring all-reduce ``16 (P-1)/P``; the fp16
  hook ``12 + 8 (P-1)/P``; PowerSGD's depends on the matrix shapes: not given;
* targets: issue 22's verdicts where a target exists (``benchmarks/benchmark_tables.py``): at 1 Gbit/s
  for gpt20m int8 <= 0.40x / 0.45x and int4 <= 0.35x / 0.40x of fp32's step at 2 / 4 hosts, each width
  <= 0.75x of the fp16 hook's and int4 faster than int8; for comm17m no regression from int8 0.389 /
  0.458 and int4 0.269 / 0.338; for both, every gradcomp width's first 50 steps faster in total than
  the fp16 hook's; everywhere, the policy within 5% of the best fixed choice (plain, int8, int4) of
  the same part, and without a rate limit within 5% of fp32 all-reduce (no hook) too.

After the parts comes one table of the policy against the best fixed choice in every setting run.
Every table carries the date, the machine (CPU model, cores), the load average at its part's start
and end and the exact command.

Needs root (network namespaces); the timings are only fair on an otherwise idle machine, hence the
lock. Results go to ``--out-dir`` (default ``runs/bench``): ``results.md``, ``results.json`` and each
run's directory ``<preset>/<part>/<hook>/`` with ``metrics.jsonl``, ``summary.json``, ``netsim.json``
and ``log.txt``. ``--parts steps2 --models gpt20m`` runs one part of one preset; ``--report-only``
redraws the tables from ``results.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from benchmark_tables import PARTS, STEP_PARTS, render, upgrade

from gradcomp.codec.formats import format_names

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
    # every other wire format, by its name (fp8_e4m3, mxfp4, int2r, ...)
    **{name: ["--hook", name] for name in format_names() if name not in ("int8", "int4")},
    # widths chosen by error as well as by the network: the policy among plain, int8, int4r and int2r
    # with a budget of 0.3 relative error per bucket, measured every 100 steps
    "budget": ["--hook", "int8", "--policy", "--policy-candidates", "32,int8,int4r,int2r", "--policy-min-bits", "2",
               "--error-budget", "0.3"],
    # a budget between int2r's errors on gpt20m's buckets (0.342 to 0.361): int2r where it fits, int4r elsewhere
    "budget-0.35": ["--hook", "int8", "--policy", "--policy-candidates", "32,int8,int4r,int2r", "--policy-min-bits", "2",
                    "--error-budget", "0.35"],
}
MODELS = "gpt20m,comm17m"
STEP_HOOKS = "local,allreduce,fp16,powersgd,int8,int4,policy"
TTA_HOOKS = "allreduce,fp16,powersgd,int8,int4,policy"
# sequences of 64 bytes per rank and step: gpt20m's step without communication is 0.21 s of one core
MODEL_BATCH = {"gpt20m": 2, "comm17m": 4}
# mean seconds per step over the hooks of a part (warm-up and eager steps included) and per run
# start and exit on the idle 2-core machine, for the runtime forecast
_FORECAST_STEP = {
    ("gpt20m", "steps2"): 0.6, ("gpt20m", "steps4"): 1.1, ("gpt20m", "nolimit2"): 0.35,
    ("comm17m", "steps2"): 0.5, ("comm17m", "steps4"): 0.9, ("comm17m", "nolimit2"): 0.25,
}
_FORECAST_START = 30.0
_FORECAST_MEMORY = 60.0  # the memory pass and gradcomp's local work, per preset


def build_parser() -> argparse.ArgumentParser:
    """Return the benchmark's argument parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {PARTS}")
    p.add_argument("--models", default=MODELS, help="TinyGPT presets, comma-separated; the first one's tables come first")
    p.add_argument("--rate", default="1gbit", help="link bandwidth of steps2, steps4 and tta (tc units)")
    p.add_argument("--nolimit-rate", default="100gbit", help="link bandwidth of nolimit2: far above what the veth links carry")
    p.add_argument("--hooks", default=STEP_HOOKS, help=f"step-time parts: comma-separated, from {sorted(HOOK_ARGS)}")
    p.add_argument("--batch-size", type=int, default=None, help=f"sequences per rank per step (default per preset: {MODEL_BATCH}, else 4)")
    p.add_argument("--steps", type=int, default=60, help="steps per hook in the step-time parts")
    p.add_argument("--time-after", type=int, default=30, help="steps excluded from the median step (the steady state starts after them)")
    p.add_argument("--first-steps", type=int, default=50, help="the first steps whose total wall time is a column")
    p.add_argument("--warmup-steps", type=int, default=10, help="plain all-reduce steps of gradcomp and PowerSGD")
    p.add_argument("--tta-models", default=None, help="presets of the time-to-accuracy part (default: the first of --models)")
    p.add_argument("--tta-hooks", default=TTA_HOOKS, help="time-to-accuracy part: comma-separated hooks (allreduce first)")
    p.add_argument("--tta-hosts", type=int, default=2, help="hosts of the time-to-accuracy part")
    p.add_argument("--tta-steps", type=int, default=150, help="steps of every time-to-accuracy run")
    p.add_argument("--tta-eval-every", type=int, default=10, help="validation loss every N steps")
    p.add_argument("--tta-extra", type=float, default=1.5,
                   help="other hooks may train up to this many times --tta-steps (at the schedule's final rate) to reach the target")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP bucket size in MB (default: DDP's own, 25 MB with a 1 MB first bucket)")
    p.add_argument("--trace", action="store_true", help="time hook calls against the backward pass (overlap)")
    p.add_argument("--train-args", default="", help="extra arguments for launch/train.py, e.g. '--no-fused'")
    p.add_argument("--out-dir", default="runs/bench")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run before it is stopped")
    p.add_argument("--python", default=sys.executable, help="interpreter for the training job")
    p.add_argument("--report-only", action="store_true", help="redraw the tables from --out-dir/results.json, run nothing")
    p.add_argument("--measure-memory", action="store_true", help="with --report-only: measure the memory figures again")
    return p


def _split(text: str) -> List[str]:
    return [h.strip() for h in text.split(",") if h.strip()]


def check_args(args: argparse.Namespace) -> List[str]:
    """Return what is wrong with the arguments, one message each (empty when they are fine)."""
    from gradcomp.examples.tasks import GPT_PRESETS

    errors = []
    parts, models = _split(args.parts), _split(args.models)
    tta_models = _split(args.tta_models) if args.tta_models is not None else models[:1]
    if bad := [p for p in parts if p not in PARTS]:
        errors.append(f"unknown part(s) {bad}; expected some of {PARTS}")
    if bad := [h for h in _split(args.hooks) + _split(args.tta_hooks) if h not in HOOK_ARGS]:
        errors.append(f"unknown hook(s) {bad}; expected some of {sorted(HOOK_ARGS)}")
    if bad := [m for m in models + tta_models if m not in GPT_PRESETS]:
        errors.append(f"unknown preset(s) {bad}; expected some of {sorted(GPT_PRESETS)}")
    if not models:
        errors.append("--models is empty; expected at least one preset, e.g. gpt20m")
    for name in ("steps", "first_steps", "tta_steps", "tta_eval_every", "threads"):
        if getattr(args, name) < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_size is not None and args.batch_size < 1:
        errors.append(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.time_after < args.steps:
        errors.append(f"--time-after must be in [0, --steps) so at least one step is timed, got {args.time_after} with --steps {args.steps}")
    return errors


def batch_size(args: argparse.Namespace, model: str) -> int:
    """Sequences per rank and step for ``model``: ``--batch-size``, else the preset's own."""
    return args.batch_size if args.batch_size is not None else MODEL_BATCH.get(model, 4)


# --------------------------------------------------------------------------------------------
# running


def run_hook(
    args: argparse.Namespace, model: str, hook: str, hosts: int, rate: str, out: Path, steps: int, time_after: int,
    eval_every: int = 0, extra: Sequence[str] = (),
) -> Dict[str, Any]:
    """Train with one hook on the emulated cluster, every host on an empty compile cache; return its summary and records."""
    from gradcomp.examples.tasks import GPT_PRESETS

    out.mkdir(parents=True, exist_ok=True)
    train_args = [
        "--model", model, "--steps", str(steps), "--batch-size", str(batch_size(args, model)),
        "--threads", str(args.threads), "--time-after", str(time_after),
        "--warmup-steps", str(args.warmup_steps), "--powersgd-start-iter", str(max(2, args.warmup_steps)),
        "--log-every", "10", "--eval-batches", str(16 if eval_every else 4),
        "--eval-every", str(eval_every), "--out-dir", str(out), "--netdev", "auto",
    ] + HOOK_ARGS[hook] + list(extra) + args.train_args.split()
    if args.bucket_cap_mb is not None:
        train_args += ["--bucket-cap-mb", str(args.bucket_cap_mb)]
    if args.trace:
        train_args.append("--trace-overlap")
    cache = Path(tempfile.mkdtemp(prefix="gradcomp-bench-cache-"))
    # each host compiles into a cache of its own, empty at the start, as on a fresh cluster
    fresh_cache = [
        "bash", "-c",
        'export TORCHINDUCTOR_CACHE_DIR="$0/host$NODE_RANK/inductor" TRITON_CACHE_DIR="$0/host$NODE_RANK/triton"; exec "$@"',
        str(cache),
    ]
    cmd = [
        "bash", str(LAUNCH / "netsim.sh"), "--hosts", str(hosts), "--rate", rate,
        "--report", str(out / "netsim.json"), "--timeout", str(args.timeout), "--grace", "20", "--",
        *fresh_cache, "bash", str(LAUNCH / "multinode.sh"),
    ] + train_args
    env = dict(os.environ, PYTHON=args.python, NPROC="1", RDZV_ID=f"bench-{hook}")
    print(f"== {model}, {hook}, {hosts} hosts at {rate}: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        with open(out / "log.txt", "w") as log:
            res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if res.returncode != 0:
        tail = (out / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"hook {hook}: the run failed with exit code {res.returncode}; end of {out / 'log.txt'}:\n{tail}")
    summary = json.loads((out / "summary.json").read_text())
    summary["netsim"] = json.loads((out / "netsim.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary["records"] = [{k: r[k] for k in ("step", "loss", "step_time_s", "elapsed_s", "val_loss") if k in r} for r in records]
    summary["run_wall_s"] = time.perf_counter() - t0
    summary["block_size"] = GPT_PRESETS[model].block_size
    summary.pop("args", None)
    # the policy logs its choice per bucket size: "gradcomp policy: bucket 0: 17563648 elements -> twophase-int8 (...)"
    choices = re.findall(r"gradcomp policy: bucket \d+: (\d+) elements -> (\S+)", (out / "log.txt").read_text())
    if choices:
        summary["policy_choices"] = {int(n): scheme for n, scheme in choices}
    first = next((r["elapsed_s"] for r in records if r.get("step") == min(args.first_steps, steps) and "elapsed_s" in r), None)
    print(
        f"   median step {1e3 * summary['median_step_time_s']:.1f} ms, "
        + (f"first {min(args.first_steps, steps)} steps {first:.1f} s, " if first is not None else "")
        + f"val loss {summary['final_val_loss']:.4f}, {summary['run_wall_s']:.0f} s wall",
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

    from gradcomp.comm.plan import chunk_numel_for
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
            stages = hook_local_work(bits, cfg.block_size, numel, P, repeats=repeats, fused=cfg.fused, chunk_numel=chunk_numel_for(P))
            out["hook"][f"int{bits}/{P}"] = stages
    return out


def machine() -> Dict[str, Any]:
    """The machine in a few figures: CPU model, cores, memory, kernel, torch and Python versions."""
    cpu = platform.processor() or "n/a"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "n/a"
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
        mem = f"{kb / 2**20:.0f}"
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - the benchmark needs torch anyway
        torch_version = "n/a"
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "kernel": platform.release(),
        "torch": torch_version, "python": platform.python_version(),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _part_hosts_rate(args: argparse.Namespace, part: str) -> tuple:
    return {"steps2": (2, args.rate), "steps4": (4, args.rate), "nolimit2": (2, args.nolimit_rate)}.get(part, (args.tta_hosts, args.rate))


def plan(args: argparse.Namespace) -> List[tuple]:
    """The ``(preset, part)`` pairs to run, headline preset first."""
    parts, models = _split(args.parts), _split(args.models)
    tta_models = _split(args.tta_models) if args.tta_models is not None else models[:1]
    order = models + [m for m in tta_models if m not in models]
    return [(m, p) for m in order for p in PARTS if p in parts and (m in tta_models if p == "tta" else m in models)]


def forecast(args: argparse.Namespace) -> float:
    """Seconds the requested runs should take on the idle machine (the runtime printed up front)."""
    total = 30.0
    for model, part in plan(args):
        if part == "tta":
            hooks = _split(args.tta_hooks)
            per_step = _FORECAST_STEP.get((model, "steps2"), 1.0) if args.tta_hosts == 2 else _FORECAST_STEP.get((model, "steps4"), 2.0)
            # most hooks reach the target near --tta-steps; PowerSGD runs to the end
            total += len(hooks) * _FORECAST_START + (len(hooks) + args.tta_extra) * args.tta_steps * per_step * 0.8
            continue
        hooks = _split(args.hooks)
        total += len(hooks) * (_FORECAST_START + args.steps * _FORECAST_STEP.get((model, part), 1.0))
    total += _FORECAST_MEMORY * len({m for m, p in plan(args) if p in STEP_PARTS})
    return total


def run_part(args: argparse.Namespace, model: str, part: str, out: Path) -> Dict[str, Any]:
    """Run every hook of one part of one preset; return the part's record (conditions, results, failures)."""
    from gradcomp.examples.tasks import GPT_PRESETS

    hosts, rate = _part_hosts_rate(args, part)
    hooks = _split(args.tta_hooks) if part == "tta" else _split(args.hooks)
    if part == "tta" and hooks[0] != "allreduce":
        hooks = ["allreduce"] + [h for h in hooks if h != "allreduce"]  # its final loss is the target
    record: Dict[str, Any] = {
        "name": part, "hosts": hosts, "rate": rate, "batch_size": batch_size(args, model),
        "block_size": GPT_PRESETS[model].block_size, "threads": args.threads,
        "steps": args.tta_steps if part == "tta" else args.steps, "time_after": args.time_after,
        "first_steps": args.first_steps, "eval_every": args.tta_eval_every if part == "tta" else 0,
        "started": _now(), "load_start": list(os.getloadavg()), "results": {}, "failed": {},
    }
    results, failed = record["results"], record["failed"]
    where = out / model / part
    for hook in hooks:
        try:
            if part == "tta" and hook == "allreduce":
                results[hook] = run_hook(args, model, hook, hosts, rate, where / hook, args.tta_steps, args.warmup_steps + 3, args.tta_eval_every)
            elif part == "tta":
                if "allreduce" not in results:
                    raise RuntimeError("no fp32 all-reduce run, hence no target loss")
                extra = ["--schedule-steps", str(args.tta_steps), "--target-val-loss", repr(results["allreduce"]["final_val_loss"])]
                longest = math.ceil(args.tta_extra * args.tta_steps)
                results[hook] = run_hook(
                    args, model, hook, hosts, rate, where / hook, longest, args.warmup_steps + 3, args.tta_eval_every, extra,
                )
            else:
                results[hook] = run_hook(args, model, hook, hosts, rate, where / hook, args.steps, args.time_after)
        except RuntimeError as exc:  # one broken hook must not hide the others' results
            print(f"   FAILED: {exc}", flush=True)
            failed[hook] = str(exc).splitlines()[0]
    record["ended"], record["load_end"] = _now(), list(os.getloadavg())
    return record


def main(argv: List[str] | None = None) -> int:
    """Run the requested parts, print and save the tables; return the exit code."""
    args = build_parser().parse_args(argv)
    out = Path(args.out_dir)
    if args.report_only:
        saved = upgrade(json.loads((out / "results.json").read_text()))
        if args.measure_memory:
            for entry in saved["models"].values():
                res = [r for p in entry["parts"].values() for r in p["results"].values()]
                hosts = sorted({p["hosts"] for k, p in entry["parts"].items() if k != "tta"})
                if res and hosts:
                    entry["memory"] = measure_memory(res[0]["parameters"], hosts)
            (out / "results.json").write_text(json.dumps(saved, indent=1, default=str))
        md = render(saved)
        (out / "results.md").write_text(md + "\n")
        print(md)
        return 0
    errors = check_args(args)
    if errors:
        for e in errors:
            print(f"benchmark.py: error: {e}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("benchmark.py: error: the emulated cluster needs root (network namespaces); run it as root", file=sys.stderr)
        return 3
    eta = forecast(args)
    print(f"expected runtime: about {eta / 60:.0f} minutes on an idle 2-core machine (more when other jobs run); "
          f"every run stops after {args.timeout} s at most", flush=True)
    t_start = time.perf_counter()
    saved: Dict[str, Any] = {
        "config": vars(args), "command": [sys.executable, sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        "machine": machine(), "started": _now(), "load_start": list(os.getloadavg()), "models": {},
    }
    failed_any = False
    for model, part in plan(args):
        entry = saved["models"].setdefault(model, {"parts": {}, "memory": None})
        entry["parts"][part] = run_part(args, model, part, out)
        failed_any |= bool(entry["parts"][part]["failed"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(saved, indent=1, default=str))
    for model, entry in saved["models"].items():
        hosts = sorted({p["hosts"] for name, p in entry["parts"].items() if name in STEP_PARTS})
        params = next((r["parameters"] for p in entry["parts"].values() for r in p["results"].values()), None)
        if hosts and params is not None:
            print(f"== memory, {model}: copy_, clone and gradcomp's local work on one bucket of the model's size, one thread", flush=True)
            entry["memory"] = measure_memory(params, hosts)
    saved["wall_s"] = time.perf_counter() - t_start
    saved["ended"], saved["load_end"] = _now(), list(os.getloadavg())
    md = render(saved)
    print()
    print(md)
    print(f"(took {saved['wall_s'] / 60:.1f} minutes; forecast {eta / 60:.0f})")
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(saved, indent=1, default=str))
    return 1 if failed_any else 0


if __name__ == "__main__":
    sys.exit(main())
