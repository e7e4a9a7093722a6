"""Check the communication cost model and the policy's predictions against the real hook on the emulated cluster.

For each setting (hosts, link rate, one-way delay) this runs ``launch/netsim.sh`` with this
script's ``worker`` mode in every host namespace; the whole series runs holding
``/tmp/gradcomp-bench.lock`` (as ``flock`` does) so no other timing run shares the cores with it.
Each worker times, for a few sizes N, on gloo over the rate-limited links:

* ``allreduce-fp32``: ``dist.all_reduce`` of N fp32 elements;
* ``twophase-int8-wire``: ``all_to_all_single`` + all-gather of the exact byte counts of the int8
  two-phase exchange, i.e. the network part alone;
* ``hook-plain``, ``hook-int8``, ``hook-int4``: the **step communication** of a DDP job whose one
  bucket holds N values: the median step (forward, backward, DDP waiting for the hook) with DDP's
  own all-reduce (plain) or gradcomp's hook at 8 / 4 bits with its default options, minus the
  median step of the same job with a hook that communicates nothing. This is what the hook costs
  a step: its real path (error feedback, buffers, copies, chunks in flight, its thread).

Two predictions are compared with each measurement:

* ``model``: :func:`gradcomp.analysis.costmodel.estimate` with two constants of gloo on this machine fitted
  on the first setting's ``allreduce-fp32`` rows only (a per-message software latency ``alpha``
  and the share ``eta`` of the link rate that payload gets) and the hook's local work timed by
  :func:`gradcomp.comm.measure.measure_hook_codec` in every worker, all ranks at once; the
  quantized exchange is pipelined over the hook's chunks.
* ``policy``: what the hook's own policy predicts (``PolicyConfig()``: it probes the links, times
  its exchange, fits, and predicts each candidate with the same model): no constant from here.

The "within 25%" counts it prints describe how well the two predict a step's communication; they are
a diagnostic. What a user feels of the policy, its step against the best fixed choice (plain, int8,
int4) measured side by side, within 5%, is judged by ``benchmarks/benchmark.py`` in every setting it runs.

Usage (as root, from the repository root)::

    python benchmarks/costmodel_validate.py                   # 2 and 4 hosts at 1 Gbit/s and 100 Mbit/s, ~10 minutes
    python benchmarks/costmodel_validate.py --quick           # 2x1gbit and 4x1gbit, one size
    python benchmarks/costmodel_validate.py --settings 2x1gbit,4x100mbit,4x100mbit+2ms

Results go to ``runs/costmodel_validate/`` (``results.json``, ``validation.png``); the tables are
printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("allreduce-fp32", "twophase-int8-wire", "hook-plain", "hook-int8", "hook-int4")
HOOK_KINDS = {"hook-plain": 32, "hook-int8": 8, "hook-int4": 4}
LOCK = "/tmp/gradcomp-bench.lock"


# --------------------------------------------------------------------------------------------
# worker: runs inside each emulated host


def _median_max(times, dist, torch) -> float:
    """Median over repeats of the slowest rank's time (a collective ends when its slowest rank does)."""
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.median())


def _step_job(numel: int, route: str, torch, dist):
    """Build a DDP job whose one bucket holds ``numel`` values, with ``route`` communicating it; return its step.

    ``route``: ``local`` (a hook that sends nothing), ``plain`` (DDP's own all-reduce), or
    ``int8`` / ``int4`` (gradcomp's hook with its default options). The forward and backward are a
    dot product, so a step is the hook's cost plus a small constant that ``local`` measures.
    Returns ``(step, state)``: ``step()`` runs one step after a barrier and returns its seconds.
    """
    import gradcomp
    from torch.nn.parallel import DistributedDataParallel as DDP

    class Dot(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(numel))

        def forward(self, w):
            return (self.p * w).sum()

    ddp = DDP(Dot(), bucket_cap_mb=numel * 4 / 2**20 + 1)
    state = None
    if route == "local":

        def local(_, bucket):
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, local)
    elif route != "plain":
        state = gradcomp.register(ddp, bits=int(route[3:]), warmup_steps=2, log_every=0)
    gen = torch.Generator().manual_seed(dist.get_rank())

    def step() -> float:
        w = torch.randn(numel, generator=gen)
        dist.barrier()
        t0 = time.perf_counter()
        ddp(w).backward()  # DDP's backward returns once the hook's future is done
        return time.perf_counter() - t0

    return step, state


def _step_times(numel: int, routes, warm: int, repeats: int, torch, dist) -> dict:
    """Median step seconds (slowest rank) of each route, timed in interleaved rounds so load changes hit all alike."""
    jobs = {r: _step_job(numel, r, torch, dist) for r in routes}
    for step, state in jobs.values():
        for _ in range(warm):
            step()
    times = {r: [] for r in routes}
    for _ in range(repeats):
        for r, (step, _) in jobs.items():
            times[r].append(step())
    fused = {}
    for r, (_, state) in jobs.items():
        if state is not None:
            assert state.stats()["compressed_buckets_step"] == 1, "the timed steps must be compressed"
            fused[r] = state.kernels
    return {r: _median_max(t, dist, torch) for r, t in times.items()}, fused


def worker(args) -> int:
    import torch
    import torch.distributed as dist

    from gradcomp.comm import PolicyConfig, QuantizedAllReduceState
    from gradcomp.comm.exchange import all_gather_into
    from gradcomp.comm.plan import ShardLayout, chunk_numel_for
    from gradcomp.comm.hook import HookConfig
    from gradcomp.comm.measure import measure_hook_codec

    torch.set_num_threads(1)
    P, rank = int(os.environ["NNODES"]), int(os.environ["NODE_RANK"])
    dist.init_process_group(
        "gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rank=rank, world_size=P, timeout=timedelta(seconds=600),
    )
    defaults = HookConfig()
    fused = defaults.fused
    chunk = defaults.chunk_numel if defaults.chunk_numel is not None else chunk_numel_for(P)  # what the hook uses
    # the hook's local work under the same contention as in the exchange: every rank measures at once
    codec = {}
    for bits in (8, 4):
        dist.barrier()
        tp = measure_hook_codec(bits, 256, 1 << 22, P, repeats=3, fused=fused, chunk_numel=chunk)
        speeds = torch.tensor([tp.quantize_eps, tp.dequantize_eps], dtype=torch.float64)
        dist.all_reduce(speeds, op=dist.ReduceOp.MIN)  # the slowest rank sets the pace
        codec[bits] = {"quantize_eps": float(speeds[0]), "dequantize_eps": float(speeds[1]), "source": tp.source}
    # the policy as the hook builds it: probe, time its exchange, fit
    state = QuantizedAllReduceState(bits=8, policy=PolicyConfig(), log_every=0)
    policy = state.policy
    results = {"world_size": P, "codec": codec, "chunk_numel": chunk, "fused": fused, "repeats": args.repeats,
               "policy_fit": policy.fit.to_dict(), "policy": {}, "timings": []}
    ops_run = {k: 0 for k in KINDS}
    gen = torch.Generator().manual_seed(rank)
    for n in args.sizes:
        pred = policy.predict(n)
        results["policy"][str(n)] = {"choice": policy.choose(n), "predicted_s": {str(b): t for b, t in pred.items()}}
        x = torch.randn(n, generator=gen)
        lay = ShardLayout(n, P, 8, 256)
        send = torch.randint(0, 255, (P, lay.message_bytes), dtype=torch.uint8, generator=gen)
        recv = torch.empty_like(send)
        mine = send[0].clone()
        gathered = torch.empty(P * lay.message_bytes, dtype=torch.uint8)

        def wire():
            dist.all_to_all_single(recv, send)
            all_gather_into(gathered, mine, None)

        for kind, fn in {"allreduce-fp32": lambda: dist.all_reduce(x.clone()), "twophase-int8-wire": wire}.items():
            fn()  # warm-up: connections, allocations
            times = []
            for _ in range(args.repeats):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            ops_run[kind] += args.repeats + 1
            results["timings"].append({"kind": kind, "numel": n, "median_s": _median_max(times, dist, torch)})
        # step communication of the real hook: step with the route minus step without communication
        warm = 5  # gradcomp: 2 plain warm-up steps, then compressed ones before timing
        steps, fused = _step_times(n, ("local", "plain", "int8", "int4"), warm, args.repeats, torch, dist)
        base = steps["local"]
        for kind, route in (("hook-plain", "plain"), ("hook-int8", "int8"), ("hook-int4", "int4")):
            ops_run[kind] += warm + args.repeats
            results["timings"].append({"kind": kind, "numel": n, "median_s": steps[route] - base, "step_s": steps[route], "local_step_s": base,
                                       "fused_kernels": fused.get(route)})
    results["ops_run"] = ops_run
    dist.barrier()
    if rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------------------------
# orchestrator


def parse_setting(text: str):
    m = re.fullmatch(r"(\d+)x(\d+(?:\.\d+)?(?:k|m|g)?bit)(?:\+(\d+(?:\.\d+)?(?:us|ms)))?", text.strip())
    if m is None:
        raise ValueError(f"a setting must look like 2x1gbit or 4x100mbit+2ms, got {text!r}")
    return {"name": text.strip(), "hosts": int(m.group(1)), "rate": m.group(2), "delay": m.group(3) or "0ms"}


def run_setting(s, sizes, repeats, outdir: Path, python: str) -> dict:
    tag = s["name"].replace("+", "_")
    meas = outdir / f"{tag}.json"
    report = outdir / f"{tag}.netsim.json"
    cmd = ["bash", str(ROOT / "launch" / "netsim.sh"),
           "--hosts", str(s["hosts"]), "--rate", s["rate"], "--delay", s["delay"], "--report", str(report), "--timeout", "900",
           "--", python, str(Path(__file__).resolve()), "worker", "--sizes", ",".join(map(str, sizes)),
           "--repeats", str(repeats), "--out", str(meas)]
    print(f"== {s['name']}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-15:])
        raise RuntimeError(f"setting {s['name']} failed with exit code {r.returncode}:\n{tail}")
    print(f"   done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return {"setting": s, "measured": json.loads(meas.read_text()), "netsim": json.loads(report.read_text())}


def predict(kind: str, numel: int, hosts: int, rate_bytes: float, delay_s: float, alpha: float, eta: float, codec, chunk):
    """The cost model's estimate of one timed kind (``codec``: {bits: CodecThroughput})."""
    from gradcomp.analysis import costmodel as cm

    cluster = cm.Cluster(workers=hosts, bandwidth=eta * rate_bytes, latency=alpha + delay_s)
    if kind in ("allreduce-fp32", "hook-plain"):
        return cm.estimate(cm.Scheme.plain(), numel, cluster)
    if kind == "twophase-int8-wire":
        return cm.estimate(cm.Scheme.exchange(8), numel, cluster)
    bits = HOOK_KINDS[kind]
    return cm.estimate(cm.Scheme.exchange(bits), numel, cluster, codec[bits], 256, chunk)


def fit(run: dict, rate_bytes: float):
    """Fit alpha and eta of t = 2(P-1) alpha + bytes / (eta * rate) on the fp32 all-reduce rows."""
    P = run["setting"]["hosts"]
    pts = [(2 * (P - 1), 2 * (P - 1) / P * t["numel"] * 4, t["median_s"]) for t in run["measured"]["timings"]
           if t["kind"] == "allreduce-fp32"]
    # least squares in (alpha, 1/eta) of t = k alpha + (bytes / rate) inv_eta
    a11 = sum(k * k for k, _, _ in pts)
    a12 = sum(k * b / rate_bytes for k, b, _ in pts)
    a22 = sum((b / rate_bytes) ** 2 for _, b, _ in pts)
    y1 = sum(k * t for k, _, t in pts)
    y2 = sum(b / rate_bytes * t for _, b, t in pts)
    det = a11 * a22 - a12 * a12
    if len(pts) >= 2 and abs(det) > 1e-30:
        alpha = (y1 * a22 - y2 * a12) / det
        inv_eta = (a11 * y2 - a12 * y1) / det
    else:
        alpha, inv_eta = 0.0, y2 / a22
    if alpha < 0:  # a negative software latency is noise: refit the rate alone
        alpha, inv_eta = 0.0, y2 / a22
    return alpha, 1.0 / inv_eta


def main(argv=None) -> int:
    from gradcomp.analysis import costmodel as cm
    from gradcomp.cli._units import parse_bandwidth, parse_duration

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode")
    w = sub.add_parser("worker", help="run inside an emulated host (netsim sets NNODES, NODE_RANK, MASTER_ADDR)")
    w.add_argument("--sizes", required=True, type=lambda s: [int(float(v)) for v in s.split(",")])
    w.add_argument("--repeats", type=int, default=3)
    w.add_argument("--out", required=True)
    p.add_argument("--settings", default="2x1gbit,4x1gbit,2x100mbit,4x100mbit",
                   help="comma-separated HOSTSxRATE[+DELAY]; the first is the one gloo's constants are fitted on")
    p.add_argument("--sizes", default="1000000,4000000", help="fp32 elements per collective")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="settings 2x1gbit,4x1gbit and one size")
    p.add_argument("--out", default=str(ROOT / "runs" / "costmodel_validate"))
    p.add_argument("--reuse", action="store_true", help="analyse the results already in --out without running")
    args = p.parse_args(argv)
    if args.mode == "worker":
        return worker(args)

    settings = [parse_setting(s) for s in ("2x1gbit,4x1gbit" if args.quick else args.settings).split(",")]
    sizes = [int(float(v)) for v in ("4000000" if args.quick else args.sizes).split(",")]
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    runs = []
    lock = None
    done = {s["name"] for s in settings if args.reuse and (outdir / f"{s['name'].replace('+', '_')}.json").exists()}
    if len(done) < len(settings):
        # one lock for every setting, so other timing runs cannot slip in between them
        import fcntl

        lock = open(LOCK, "a")
        print(f"waiting for {LOCK} ...", file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    for s in settings:
        tag = s["name"].replace("+", "_")
        if s["name"] in done:
            runs.append({"setting": s, "measured": json.loads((outdir / f"{tag}.json").read_text()),
                         "netsim": json.loads((outdir / f"{tag}.netsim.json").read_text())})
            continue
        if s["delay"] not in ("0ms", "0us", "0") and not _netem_ok():
            print(f"== {s['name']}: skipped, this kernel has no netem qdisc for --delay", file=sys.stderr)
            continue
        runs.append(run_setting(s, sizes, args.repeats, outdir, sys.executable))

    if lock is not None:
        lock.close()
    if not runs:
        print("no setting could run", file=sys.stderr)
        return 1
    first = runs[0]
    rate0 = parse_bandwidth(first["setting"]["rate"], "rate")
    alpha, eta = fit(first, rate0)
    rows = []
    for r in runs:
        s = r["setting"]
        m = r["measured"]
        rate = parse_bandwidth(s["rate"], "rate")
        delay = parse_duration(s["delay"], "delay")
        codec = {int(b): cm.CodecThroughput(c["quantize_eps"], c["dequantize_eps"], c["source"]) for b, c in m["codec"].items()}
        for t in m["timings"]:
            e = predict(t["kind"], t["numel"], s["hosts"], rate, delay, alpha, eta, codec, m["chunk_numel"])
            row = {
                "setting": s["name"], "fitted": r is first and t["kind"] == "allreduce-fp32", "kind": t["kind"],
                "numel": t["numel"], "predicted_s": e.total_s, "measured_s": t["median_s"],
                "error": e.total_s / t["median_s"] - 1.0 if t["median_s"] > 0 else math.inf,
            }
            if t["kind"] in HOOK_KINDS:
                pol = m["policy"][str(t["numel"])]["predicted_s"].get(str(HOOK_KINDS[t["kind"]]))
                row["policy_predicted_s"] = pol
                row["policy_error"] = pol / t["median_s"] - 1.0 if pol is not None and t["median_s"] > 0 else None
            rows.append(row)

    print(f"gloo constants fitted on {first['setting']['name']} (fp32 all-reduce only): alpha = {alpha * 1e3:.3f} ms, "
          f"eta = {eta:.3f} of the link rate")
    print()
    print("| setting | measured | elements | measured | model | error | policy's prediction | error | policy chose |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        mark = " (fitted)" if row["fitted"] else ""
        pol = row.get("policy_predicted_s")
        pe = row.get("policy_error")
        run = next(r for r in runs if r["setting"]["name"] == row["setting"])
        chose = run["measured"]["policy"][str(row["numel"])]["choice"] if row["kind"] in HOOK_KINDS else None
        print(f"| {row['setting']} | {row['kind']}{mark} | {row['numel']:.2g} | {row['measured_s'] * 1e3:.1f} ms | "
              f"{row['predicted_s'] * 1e3:.1f} ms | {row['error'] * 100:+.1f}% | "
              f"{'-' if pol is None else f'{pol * 1e3:.1f} ms'} | {'-' if pe is None else f'{pe * 100:+.1f}%'} | "
              f"{'-' if chose is None else ('plain' if chose == 32 else f'int{chose}')} |")
    held = [r for r in rows if not r["fitted"]]
    print()
    for label, key, subset in (("model", "error", held), ("policy", "policy_error", [r for r in rows if r.get("policy_error") is not None])):
        if not subset:
            continue
        within = [r for r in subset if abs(r[key]) <= 0.25]
        print(f"{label}: {len(within)} of {len(subset)} rows within 25%, median |error| "
              f"{statistics.median(abs(r[key]) for r in subset) * 100:.1f}%")
        for kind in KINDS:
            ks = [r for r in subset if r["kind"] == kind]
            if ks:
                print(f"  {kind}: {sum(abs(r[key]) <= 0.25 for r in ks)} of {len(ks)} within 25%, "
                      f"median |error| {statistics.median(abs(r[key]) for r in ks) * 100:.1f}%")
    print()
    print("| setting | policy's link fit | policy's int8 / int4 codec (M values/s, quantize / dequantize) |")
    print("|---|---|---|")
    for r in runs:
        f = r["measured"]["policy_fit"]
        cod = {int(b): tp for b, tp in f["codec"]}
        print(f"| {r['setting']['name']} | alpha {f['link']['latency'] * 1e6:.0f} us, beta {f['link']['bandwidth'] / 1e6:.1f} MB/s | "
              + " / ".join(f"{cod[b]['quantize_eps'] / 1e6:.0f}, {cod[b]['dequantize_eps'] / 1e6:.0f}" for b in (8, 4) if b in cod) + " |")
    (outdir / "results.json").write_text(json.dumps({"alpha_s": alpha, "eta": eta, "fitted_on": first["setting"]["name"],
                                                     "rows": rows, "runs": runs}, indent=1))
    try:
        from gradcomp.plots.costmodel import plot_validation

        plot_validation([r for r in rows if r["measured_s"] > 0], outdir / "validation.png", title=f"cost model vs emulated cluster (fitted on {first['setting']['name']})")
        print(f"\nwrote {outdir / 'results.json'} and {outdir / 'validation.png'}")
    except ImportError:
        print(f"\nwrote {outdir / 'results.json'} (no plot: matplotlib missing)")
    return 0


def _netem_ok() -> bool:
    ns = f"gradcomp-val-{os.getpid()}"
    try:
        if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
            return False
        r = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], capture_output=True)
        return r.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
