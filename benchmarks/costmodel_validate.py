"""Check the communication cost model against real collectives on the emulated cluster.

For each setting (hosts, link rate, one-way delay) this runs ``launch/netsim.sh`` with this
script's ``worker`` mode in every host namespace; the whole series runs holding
``/tmp/gradcomp-bench.lock`` (as ``flock`` does) so no other timing run shares the cores with it. Each
worker times, for a few tensor sizes, on gloo over the rate-limited links:

* ``allreduce-fp32``: ``dist.all_reduce`` of N fp32 elements;
* ``twophase-int8-wire``: ``all_to_all_single`` + all-gather of the exact byte counts of the int8
  two-phase exchange (``ShardLayout``), i.e. the network part alone;
* ``twophase-int8-hook``: ``gradcomp.comm.collectives.quantized_allreduce`` itself (codec included).

The cost model (``gradcomp.costmodel.estimate``) predicts each time from the link rate, the delay,
and two constants of gloo on this machine fitted on the first setting only: a per-message
software latency ``alpha`` and the fraction ``eta`` of the link rate that payload gets (TCP/IP and
Ethernet headers, scheduling). The codec throughput used for the ``hook`` rows is measured by the
workers themselves, all ranks at once, right before the timings. Every other setting is a
prediction, compared with the measurement; the per-host bytes counted by netsim are compared with
the model's bytes too.

Usage (as root, from the repository root)::

    python benchmarks/costmodel_validate.py                   # default settings, ~5 minutes
    python benchmarks/costmodel_validate.py --quick           # two settings, one size
    python benchmarks/costmodel_validate.py --settings 2x1gbit,4x100mbit,4x100mbit+2ms

Results go to ``runs/costmodel_validate/`` (``results.json``, ``validation.png``); the table is
printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("allreduce-fp32", "twophase-int8-wire", "twophase-int8-hook")
LOCK = "/tmp/gradcomp-bench.lock"


# --------------------------------------------------------------------------------------------
# worker: runs inside each emulated host


def worker(args) -> int:
    import torch
    import torch.distributed as dist

    from gradcomp import costmodel
    from gradcomp.comm.collectives import ShardLayout, all_gather_into, quantized_allreduce

    torch.set_num_threads(1)
    P, rank = int(os.environ["NNODES"]), int(os.environ["NODE_RANK"])
    dist.init_process_group(
        "gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rank=rank, world_size=P, timeout=timedelta(seconds=600),
    )
    # codec speed under the same contention as in the exchange: every rank measures at once
    dist.barrier()
    tp = costmodel.measure_codec_throughput(bits=8, block_size=256, numel=1 << 20, repeats=3)
    speeds = torch.tensor([tp.quantize_eps, tp.dequantize_eps], dtype=torch.float64)
    dist.all_reduce(speeds, op=dist.ReduceOp.MIN)  # the slowest rank sets the pace
    results = {"world_size": P, "codec": {"quantize_eps": float(speeds[0]), "dequantize_eps": float(speeds[1])},
               "repeats": args.repeats, "timings": []}
    ops_run = {k: 0 for k in KINDS}
    gen = torch.Generator().manual_seed(rank)
    for n in args.sizes:
        x = torch.randn(n, generator=gen)
        lay = ShardLayout(n, P, 8, 256)
        send = torch.randint(0, 255, (P, lay.message_bytes), dtype=torch.uint8, generator=gen)
        recv = torch.empty_like(send)
        mine = send[0].clone()
        gathered = torch.empty(P * lay.message_bytes, dtype=torch.uint8)
        wres = torch.zeros(lay.padded_numel)
        sres = torch.zeros(lay.shard_numel)

        def wire():
            dist.all_to_all_single(recv, send)
            all_gather_into(gathered, mine, None)

        ops = {
            "allreduce-fp32": lambda: dist.all_reduce(x.clone()),
            "twophase-int8-wire": wire,
            "twophase-int8-hook": lambda: quantized_allreduce(x, lay, None, worker_residual=wres, server_residual=sres),
        }
        for kind, fn in ops.items():
            fn()  # warm-up: connections, allocations
            ops_run[kind] += 1
            times = []
            for _ in range(args.repeats):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
                ops_run[kind] += 1
            t = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a collective ends when its slowest rank does
            results["timings"].append({"kind": kind, "numel": n, "times_s": t.tolist(), "median_s": float(t.median())})
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


def predict(kind: str, numel: int, hosts: int, rate_bytes: float, delay_s: float, alpha: float, eta: float, codec_tp):
    from gradcomp import costmodel as cm

    cluster = cm.Cluster(workers=hosts, bandwidth=eta * rate_bytes, latency=alpha + delay_s)
    scheme = "ring-fp32" if kind == "allreduce-fp32" else "twophase-int8"
    tp = codec_tp if kind == "twophase-int8-hook" else None
    return cm.estimate(scheme, numel, cluster, tp)


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
    from gradcomp import costmodel as cm
    from gradcomp.cli._units import parse_bandwidth, parse_duration

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode")
    w = sub.add_parser("worker", help="run inside an emulated host (netsim sets NNODES, NODE_RANK, MASTER_ADDR)")
    w.add_argument("--sizes", required=True, type=lambda s: [int(float(v)) for v in s.split(",")])
    w.add_argument("--repeats", type=int, default=3)
    w.add_argument("--out", required=True)
    p.add_argument("--settings", default="2x1gbit,2x100mbit,4x100mbit,4x1gbit,3x200mbit,4x100mbit+2ms",
                   help="comma-separated HOSTSxRATE[+DELAY]; the first is the one gloo's constants are fitted on")
    p.add_argument("--sizes", default="1000000,4000000", help="fp32 elements per collective")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="settings 2x1gbit,2x100mbit and one size")
    p.add_argument("--out", default=str(ROOT / "runs" / "costmodel_validate"))
    p.add_argument("--reuse", action="store_true", help="analyse the results already in --out without running")
    args = p.parse_args(argv)
    if args.mode == "worker":
        return worker(args)

    settings = [parse_setting(s) for s in ("2x1gbit,2x100mbit" if args.quick else args.settings).split(",")]
    sizes = [int(float(v)) for v in ("2000000" if args.quick else args.sizes).split(",")]
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
        rate = parse_bandwidth(s["rate"], "rate")
        delay = parse_duration(s["delay"], "delay")
        codec = r["measured"]["codec"]
        tp = cm.CodecThroughput(codec["quantize_eps"], codec["dequantize_eps"], "measured by the workers")
        for t in r["measured"]["timings"]:
            e = predict(t["kind"], t["numel"], s["hosts"], rate, delay, alpha, eta, tp)
            rows.append({
                "setting": s["name"], "fitted": r is first and t["kind"] == "allreduce-fp32", "kind": t["kind"],
                "numel": t["numel"], "predicted_s": e.total_s, "measured_s": t["median_s"],
                "error": e.total_s / t["median_s"] - 1.0, "bytes_per_rank": e.bytes_per_rank,
            })
        # bytes: the model's payload for every operation run vs what each host's interface sent
        ops = r["measured"]["ops_run"]
        per_op = {(t["kind"], t["numel"]): predict(t["kind"], t["numel"], s["hosts"], rate, delay, alpha, eta, None).bytes_per_rank
                  for t in r["measured"]["timings"]}
        n_sizes = len({t["numel"] for t in r["measured"]["timings"]})
        payload = sum(b * ops[k] / n_sizes for (k, _), b in per_op.items())
        tx = [h["tx_bytes"] for h in r["netsim"]["per_host"]]
        r["bytes_check"] = {"predicted_payload_per_host": payload, "measured_tx_per_host": tx,
                            "ratio_mean": statistics.mean(tx) / payload}

    print(f"gloo constants fitted on {first['setting']['name']} (fp32 all-reduce only): alpha = {alpha * 1e3:.3f} ms, "
          f"eta = {eta:.3f} of the link rate")
    print()
    print("| setting | collective | elements | predicted | measured | error |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        mark = " (fitted)" if row["fitted"] else ""
        print(f"| {row['setting']} | {row['kind']}{mark} | {row['numel']:.2g} | {row['predicted_s'] * 1e3:.1f} ms | "
              f"{row['measured_s'] * 1e3:.1f} ms | {row['error'] * 100:+.1f}% |")
    held = [r for r in rows if not r["fitted"]]
    within = [r for r in held if abs(r["error"]) <= 0.25]
    print()
    print(f"validated rows (not fitted): {len(within)} of {len(held)} within 25%; "
          f"median |error| {statistics.median(abs(r['error']) for r in held) * 100:.1f}%")
    for kind in KINDS:
        ks = [r for r in held if r["kind"] == kind]
        if ks:
            print(f"  {kind}: {sum(abs(r['error']) <= 0.25 for r in ks)} of {len(ks)} within 25%, "
                  f"median |error| {statistics.median(abs(r['error']) for r in ks) * 100:.1f}%")
    print()
    print("| setting | predicted payload per host | measured tx bytes per host (netsim) | ratio |")
    print("|---|---|---|---|")
    for r in runs:
        b = r["bytes_check"]
        print(f"| {r['setting']['name']} | {b['predicted_payload_per_host'] / 1e6:.1f} MB | "
              f"{', '.join(f'{t / 1e6:.1f}' for t in b['measured_tx_per_host'])} MB | {b['ratio_mean']:.3f} |")
    (outdir / "results.json").write_text(json.dumps({"alpha_s": alpha, "eta": eta, "fitted_on": first["setting"]["name"],
                                                     "rows": rows, "runs": runs}, indent=1))
    try:
        from gradcomp.plots.costmodel import plot_validation

        plot_validation(rows, outdir / "validation.png", title=f"cost model vs emulated cluster (fitted on {first['setting']['name']})")
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
