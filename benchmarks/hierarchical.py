"""Flat vs hierarchical gradient compression, and the measured policy, on the emulated 2-host cluster.

Every configuration is a real 4-rank training job (2 hosts x 2 ranks, gloo) of the communication-bound
TinyGPT preset ``comm17m`` (17.7M parameters) started by ``launch/netsim.sh`` + ``launch/multinode.sh``:
the two hosts are network namespaces joined by rate-limited links, the two ranks of a host talk over
its loopback. Measured per configuration, side by side in one run:

* slow-link bytes per step: the host's ``eth0`` transmit counter over the timed steps, divided by the
  steps (mean over the two hosts): what crossed the emulated network, headers included;
* step time: median over the timed steps of the slowest rank's step (forward, backward with the
  hook, optimizer);
* loss: mean training loss of the last 5 steps (over all ranks); every configuration sees the same data;
* the policy's decision per bucket where a policy runs.

Run it as root from the repository root (it takes ``/tmp/gradcomp-bench.lock`` itself for each job;
to hold the lock for a whole run, wrap it in ``flock`` and pass ``--no-lock``)::

    /work/venv/bin/python benchmarks/hierarchical.py                       # the full table, ~10 min
    /work/venv/bin/python benchmarks/hierarchical.py --rates 1gbit --modes fp32,flat-int8 --steps 12

Modes: ``fp32`` (DDP's own all-reduce, no hook), ``flat-int8``/``flat-int4`` (the flat two-phase
exchange over all 4 ranks), ``hier-int8``/``hier-int4`` (fp32 inside a host, quantized between hosts),
``policy`` (hierarchical, per-bucket choice from the probed network) and ``policy-flat``.

The worker side (``--worker``) is what torchrun runs on every rank.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("fp32", "flat-int8", "flat-int4", "hier-int8", "hier-int4", "policy", "policy-flat")
LOCK = "/tmp/gradcomp-bench.lock"


# --------------------------------------------------------------------------------------------
# worker: one rank of the training job


def _tx_bytes(ifname: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/statistics/tx_bytes").read_text())


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradcomp
    from gradcomp.comm import PolicyConfig, Topology
    from gradcomp.examples.tasks import GPT_PRESETS, TinyGPT, get_batch, make_optimizer, text_corpus

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ["LOCAL_RANK"])
    topo = Topology.from_env(os.environ)
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ifname = os.environ.get("NETSIM_IFNAME", "eth0")

    data = text_corpus(1 << 20)
    torch.manual_seed(args.seed)
    model = TinyGPT.from_config(GPT_PRESETS[args.model])
    ddp = DDP(model)
    opts = dict(warmup_steps=args.hook_warmup, log_every=0, fused=not args.no_fused)
    state = None
    mode = args.mode
    if mode in ("flat-int8", "flat-int4"):
        state = gradcomp.register(ddp, bits=int(mode[-1]), **opts)
    elif mode in ("hier-int8", "hier-int4"):
        state = gradcomp.register(ddp, bits=int(mode[-1]), topology=topo, **opts)
    elif mode in ("policy", "policy-flat"):
        t0 = time.perf_counter()
        state = gradcomp.register(ddp, policy=PolicyConfig(), topology=topo if mode == "policy" else None, **opts)
        probe_s = time.perf_counter() - t0
    opt = make_optimizer(model, lr=args.lr)
    gen = torch.Generator().manual_seed(1000 + rank)

    first = args.hook_warmup + 2  # after the hook's warm-up and DDP's bucket rebuild
    steps = first + args.steps
    times, losses = [], []
    tx0 = None
    for step in range(steps):
        if step == first:
            dist.barrier()
            tx0 = _tx_bytes(ifname) if local_rank == 0 else 0
        x, y = get_batch(data, args.batch_size, GPT_PRESETS[args.model].block_size, gen)
        t0 = time.perf_counter()
        _, loss = ddp(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if step >= first:
            times.append(dt)
        losses.append(loss.detach().item())
    dist.barrier()
    tx = (_tx_bytes(ifname) - tx0) if local_rank == 0 else 0

    # the slowest rank's time of each step; the mean loss over ranks; each host's counter
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    last = torch.tensor([statistics.fmean(losses[-5:]), statistics.fmean(losses[:3])], dtype=torch.float64)
    dist.all_reduce(last)
    last /= world
    txs = torch.tensor([tx], dtype=torch.float64)
    gathered = [torch.zeros_like(txs) for _ in range(world)]
    dist.all_gather(gathered, txs)
    host_tx = [float(g) for i, g in enumerate(gathered) if i % topo.local_world_size == 0]
    if rank == 0:
        result = {
            "mode": mode,
            "world_size": world,
            "local_world_size": topo.local_world_size,
            "model": args.model,
            "params": sum(p.numel() for p in model.parameters()),
            "timed_steps": args.steps,
            "step_s_median": statistics.median(t.tolist()),
            "step_s_all": t.tolist(),
            "loss_first3": float(last[1]),
            "loss_last5": float(last[0]),
            "slow_tx_bytes_per_step_per_host": [b / args.steps for b in host_tx],
        }
        if state is not None:
            s = state.stats()
            result["hook_bytes_sent_step_rank0"] = s["bytes_sent_step"]
            result["hook_intra_node_bytes_step_rank0"] = s["intra_node_bytes_step"]
            result["compressed_buckets"] = [s["compressed_buckets_step"], s["buckets_step"]]
            if state.policy is not None:
                result["policy_probe_s"] = probe_s
                result["policy_fit"] = state.policy.fit.to_dict()
                result["policy_choice"] = {str(n): state.policy.scheme(b).name for n, b in state.policy_choices.items()}
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------------------------
# driver: one netsim job per configuration


def run_config(rate: str, mode: str, args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / f"{mode}-{rate}.json"
    report = workdir / f"{mode}-{rate}.netsim.json"
    cmd = [
        "bash", str(ROOT / "launch/netsim.sh"), "--hosts", "2", "--rate", rate, "--report", str(report), "--timeout", str(args.timeout),
        "--", "env", "NPROC=2", f"TRAIN={Path(__file__).resolve()}", f"PYTHON={sys.executable}", "OMP_NUM_THREADS=1",
        f"MASTER_PORT={args.port}", "bash", str(ROOT / "launch/multinode.sh"),
        "--worker", "--mode", mode, "--steps", str(args.steps), "--model", args.model, "--batch-size", str(args.batch_size),
        "--hook-warmup", str(args.hook_warmup), "--out", str(out),
    ] + (["--no-fused"] if args.no_fused else [])
    with open(LOCK, "w") as lock:
        if not args.no_lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # other benchmarks share the 2 cores
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{mode} at {rate} failed (exit {proc.returncode}):\n{tail}")
    res = json.loads(out.read_text())
    res["rate"] = rate
    res["job_wall_s"] = wall
    res["netsim"] = json.loads(report.read_text())
    (workdir / f"{mode}-{rate}.log").write_text(proc.stdout + proc.stderr)
    return res


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e6:.2f} MB"


def table(results: list) -> str:
    """A markdown table with ratios against fp32 and flat int8 of the same rate."""
    lines = [
        "| rate | mode | slow-link bytes/step/host | vs flat int8 | step time | vs fp32 | loss (last 5) | policy choice |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    by = {(r["rate"], r["mode"]): r for r in results}
    for r in results:
        b = statistics.fmean(r["slow_tx_bytes_per_step_per_host"])
        f8 = by.get((r["rate"], "flat-int8"))
        fp = by.get((r["rate"], "fp32"))
        vs8 = f"{b / statistics.fmean(f8['slow_tx_bytes_per_step_per_host']):.2f}x" if f8 else "-"
        vsfp = f"{r['step_s_median'] / fp['step_s_median']:.2f}x" if fp else "-"
        choice = ", ".join(f"{n}: {s}" for n, s in r.get("policy_choice", {}).items()) or "-"
        lines.append(
            f"| {r['rate']} | {r['mode']} | {_fmt_bytes(b)} | {vs8} | {r['step_s_median'] * 1e3:.0f} ms | {vsfp} | {r['loss_last5']:.4f} | {choice} |"
        )
    return "\n".join(lines)


def driver(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"unknown mode(s) {bad}; expected some of {MODES}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gradcomp-hier-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for rate in [r.strip() for r in args.rates.split(",") if r.strip()]:
        for mode in modes:
            print(f"running {mode} at {rate} ...", file=sys.stderr, flush=True)
            res = run_config(rate, mode, args, workdir)
            results.append(res)
            print(
                f"  {mode} at {rate}: {statistics.fmean(res['slow_tx_bytes_per_step_per_host']) / 1e6:.2f} MB/step/host, "
                f"step {res['step_s_median'] * 1e3:.0f} ms, loss {res['loss_last5']:.4f}",
                file=sys.stderr, flush=True,
            )
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nraw results: {workdir / 'results.json'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help="run as one rank of the job (torchrun does this)")
    p.add_argument("--mode", choices=MODES, default="fp32")
    p.add_argument("--modes", default="fp32,flat-int8,hier-int8,hier-int4,policy", help="driver: comma-separated modes")
    p.add_argument("--rates", default="1gbit,100gbit", help="driver: comma-separated link rates (netsim --rate)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per job")
    p.add_argument("--hook-warmup", type=int, default=2, help="plain all-reduce steps of the hook first")
    p.add_argument("--model", default="comm17m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fused", action="store_true", help="eager reference codec kernels (default: the fused ones)")
    p.add_argument("--out", default="result.json", help="worker: where rank 0 writes its result")
    p.add_argument("--workdir", default=None, help="driver: where the results and logs go")
    p.add_argument("--timeout", type=int, default=600, help="driver: seconds per job")
    p.add_argument("--port", type=int, default=29500)
    p.add_argument("--no-lock", action="store_true", help=f"driver: do not take {LOCK} per job (when the caller holds it for the whole run)")
    args = p.parse_args(argv)
    return worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    sys.exit(main())
