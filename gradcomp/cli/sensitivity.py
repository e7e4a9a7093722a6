"""``gradcomp sensitivity`` and ``gradcomp plan``: per-layer sensitivity scores and bit plans.

Examples::

    gradcomp sensitivity --out scores.json --csv scores.csv --plot sensitivity.png
    gradcomp sensitivity --model mypkg.models:build --candidates int4-g128,int8-channel --json
    gradcomp plan --scores scores.json --avg-bits 4.5
    gradcomp plan --scores scores.json --max-bytes 300000 --metric fisher --out plan.json --json
    gradcomp plan --scores scores.json --rule 'wte=int8-g128' --rule '*=int4-g128'
    gradcomp plan --scores scores.json --avg-bits 4.5 --evaluate     # built-in task: apply and measure
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from gradcomp.cli._common import CliError, add_json_flag, existing_file, float_in, format_table, int_in, load_callable, out_dir, out_file, print_json

DEFAULT_CANDIDATES = "int2-g128,int3-g128,int4-g128,int4-g32,int8-g128,fp16"


def _default_cache() -> str:
    return str(Path.home() / ".cache" / "gradcomp")


def register(subparsers) -> None:
    """Add the ``sensitivity`` and ``plan`` subcommands."""
    s = subparsers.add_parser(
        "sensitivity",
        help="measure per-layer quantization sensitivity (one layer quantized at a time)",
        description="Quantize each layer alone at each candidate format, run calibration batches and score the damage "
        "(output MSE, KL, loss increase, Fisher, optional Hessian trace). Default model: the built-in tiny GPT task.",
    )
    s.add_argument("--model", metavar="MODULE:CALLABLE",
                   help="a callable returning (model, calibration_batches); each batch is called as model(batch), model(*batch) for a tuple or model(**batch) for a dict")
    s.add_argument("--cache-dir", default=_default_cache(), type=out_dir, help="cache of the built-in tiny GPT (default ~/.cache/gradcomp)")
    s.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                   help=f"comma-separated formats such as int4-g128, int8-channel, fp16 (default {DEFAULT_CANDIDATES})")
    s.add_argument("--metrics", default="auto",
                   help="scores to compute (default auto: mse, rel_mse, loss, fisher, weight_mse, and kl for classification outputs)")
    s.add_argument("--forward", metavar="MODULE:FN",
                   help="FN(model, batch) runs one batch of any structure and returns the outputs (tensor, dict, dataclass, list)")
    s.add_argument("--hessian", action="store_true", help="also the HAWQ score (Hutchinson trace of the Hessian)")
    s.add_argument("--hutchinson-samples", type=int_in(1, 10**6), default=4, help="Rademacher vectors per batch for --hessian (default 4)")
    s.add_argument("--act-bits", type=int, choices=(2, 3, 4, 8),
                   help="also fake-quantize each tried layer's input (dynamic per-token scales) with this many bits")
    s.add_argument("--layers", action="append", metavar="NAME", help="analyse only these layers (repeatable)")
    s.add_argument("--batches", type=int_in(1, 10**6), default=8, help="calibration batches of the built-in task (default 8)")
    s.add_argument("--batch-size", type=int_in(1, 10**6), default=32, help="sequences per calibration batch of the built-in task (default 32)")
    s.add_argument("--seed", type=int, default=0, help="seed of the calibration batches and Hutchinson vectors")
    s.add_argument("--out", metavar="JSON", type=out_file(".json"), help="save the scores (reusable by 'gradcomp plan --scores')")
    s.add_argument("--csv", metavar="CSV", type=out_file(".csv"), help="save the sorted table as CSV")
    s.add_argument("--plot", metavar="PNG", type=out_file(".png"), help="bar plot of sensitivity per layer per candidate (needs matplotlib)")
    s.add_argument("--sort", metavar="METRIC", help="sort the table by this metric (default kl)")
    s.add_argument("--top", type=int_in(0), default=0, help="print only the N most sensitive trials (default all)")
    s.add_argument("--threads", type=int_in(1, 4096), help="torch intra-op threads")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_json_flag(s)
    s.set_defaults(func=_sensitivity)

    p = subparsers.add_parser(
        "plan",
        help="choose bits per layer from saved sensitivity scores (knapsack under a budget, or rules)",
        description="Solve the multiple-choice knapsack over saved scores: minimise the summed sensitivity subject to "
        "an average-bits or a byte budget (scale overhead counted). No model run is needed.",
    )
    p.add_argument("--scores", required=True, metavar="JSON", type=existing_file, help="scores saved by 'gradcomp sensitivity --out'")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--avg-bits", type=float_in(0, 64, lo_open=True), help="budget in average bits per planned weight, scales included")
    budget.add_argument("--max-bytes", type=float_in(0, 1e18, lo_open=True), help="budget in bytes of the whole model")
    p.add_argument("--rule", action="append", default=[], metavar="PATTERN=SPEC",
                   help="rule-based plan instead of a budget: pattern (name, glob or re:regex) = format or fp32 (repeatable, in order)")
    p.add_argument("--precedence", choices=("first", "specific"), default="first", help="rule precedence (default first match)")
    p.add_argument("--metric", help="score to minimise (default kl when measured)")
    p.add_argument("--candidates", help="comma-separated formats to allow (default every measured one plus fp32)")
    p.add_argument("--no-fp32", action="store_true", help="do not allow keeping a layer in full precision")
    p.add_argument("--method", choices=("auto", "exact", "bucketed", "greedy"), default="auto", help="knapsack solver (default auto)")
    p.add_argument("--pareto", metavar="CSV", type=out_file(".csv"), help="also write the whole Pareto front (size vs predicted damage) as CSV")
    p.add_argument("--pareto-plot", metavar="PNG", type=out_file(".png"), help="also draw the Pareto front (needs matplotlib)")
    p.add_argument("--out", metavar="JSON", type=out_file(".json"), help="save the plan")
    p.add_argument("--evaluate", action="store_true",
                   help="apply the plan and measure: the built-in tiny GPT's validation loss, or your model's --eval metric (with --model)")
    p.add_argument("--cache-dir", default=_default_cache(), type=out_dir, help="cache of the built-in tiny GPT, for --evaluate")
    p.add_argument("--model", metavar="MODULE:FN", help="for --evaluate on your own model: FN() returns the model "
                                                         "(or the (model, batches) of `gradcomp sensitivity --model`)")
    p.add_argument("--eval", dest="eval_fn", metavar="MODULE:FN",
                   help="for --evaluate with --model: FN(model) returns a number, lower is better (a loss, an error against fp32)")
    add_json_flag(p)
    p.set_defaults(func=_plan)


# --------------------------------------------------------------------------------------------
# sensitivity


def _builtin_task(args):
    import torch

    from gradcomp.examples.tasks import get_batch, pretrained_tiny_gpt

    model, train, _ = pretrained_tiny_gpt(args.cache_dir)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [get_batch(train, args.batch_size, model.config.block_size, gen) for _ in range(args.batches)]
    return model, batches


def _sensitivity(args) -> int:
    import torch
    import torch.nn as nn

    from gradcomp.analysis.sensitivity import METRICS, SensitivityConfig, measure_sensitivity
    from gradcomp.quant import parse_config

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batches < 1 or args.batch_size < 1:
        raise CliError(f"--batches and --batch-size must be >= 1, got {args.batches} and {args.batch_size}")
    try:
        cands = tuple(parse_config(c) for c in args.candidates.split(",") if c.strip())
    except ValueError as exc:
        raise CliError(f"--candidates: {exc}") from exc
    if any(c is None for c in cands):
        raise CliError("--candidates: fp32 is the unquantized reference (score 0) and is always available to plans; leave it out")
    metrics = None if args.metrics.strip() == "auto" else tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    activations = None
    if args.act_bits:
        from gradcomp.quant import ActQuantConfig

        activations = ActQuantConfig(bits=args.act_bits, dynamic=True, granularity="per_token")
    config = SensitivityConfig(candidates=cands, metrics=metrics, hessian=args.hessian,
                               hutchinson_samples=args.hutchinson_samples, activations=activations, seed=args.seed)
    if args.model:
        built = load_callable(args.model, "--model")()
        if not (isinstance(built, (tuple, list)) and len(built) == 2 and isinstance(built[0], nn.Module)):
            raise CliError(f"{args.model} must return (model, calibration_batches), got {type(built).__name__}")
        model, batches = built
        task = args.model
    else:
        model, batches = _builtin_task(args)
        task = "tiny_gpt"
    kwargs = {}
    if args.forward:
        kwargs["forward"] = load_callable(args.forward, "--forward")
    report = measure_sensitivity(model, batches, config, layers=args.layers, progress=not args.no_progress, **kwargs)
    report.metadata["task"] = task
    sort = args.sort or report.default_metric()
    if sort not in report.metrics:
        raise CliError(f"--sort must be one of {report.metrics}, got {sort!r}")
    if args.out:
        report.to_json(args.out)
    if args.csv:
        report.to_csv(args.csv, metric=sort)
    if args.plot:
        from gradcomp.plots.sensitivity import plot_sensitivity

        plot_sensitivity(report, args.plot, metric=sort)
    rows = report.rows(sort)
    if args.top:
        rows = rows[: args.top]
    if args.json:
        print_json({"baseline": report.baseline, "metadata": report.metadata, "sorted_by": sort, "rows": rows,
                    "layers": [l.__dict__ for l in report.layers], "other_bytes": report.other_bytes})
        return 0
    base = report.baseline.get("loss")
    print(f"{len(report.layers)} layers x {len(report.candidates)} candidates on {report.baseline['num_batches']} calibration batches"
          + (f"; baseline loss {base:.4f}" if base is not None else ""))
    cols = ["layer", "candidate", "bits_per_param"] + [m for m in METRICS if m in report.metrics]
    print(format_table(rows, cols))
    return 0


# --------------------------------------------------------------------------------------------
# plan


def _plan(args) -> int:
    from gradcomp.analysis.mixed_precision import allocate_bits, apply_plan, pareto_front, plan_from_rules
    from gradcomp.analysis.sensitivity import SensitivityReport
    from gradcomp.quant import parse_config

    report = SensitivityReport.from_json(args.scores)
    cands = [c.strip() for c in args.candidates.split(",")] if args.candidates else None
    if args.rule:
        if args.avg_bits is not None or args.max_bytes is not None:
            raise CliError("give either --rule or a budget (--avg-bits / --max-bytes), not both")
        rules = []
        for r in args.rule:
            if "=" not in r:
                raise CliError(f"--rule must look like PATTERN=SPEC, got {r!r}")
            pattern, spec = r.rsplit("=", 1)
            try:
                rules.append((pattern, parse_config(spec)))
            except ValueError as exc:
                raise CliError(f"--rule {r!r}: {exc}") from exc
        plan = plan_from_rules(report, rules, precedence=args.precedence, metric=args.metric)
    else:
        if args.avg_bits is None and args.max_bytes is None:
            raise CliError("give a budget (--avg-bits or --max-bytes) or rules (--rule)")
        plan = allocate_bits(report, avg_bits=args.avg_bits, max_bytes=args.max_bytes, metric=args.metric,
                             candidates=cands, include_full_precision=not args.no_fp32, method=args.method)
    if args.out:
        plan.to_json(args.out)
    front_rows: List[Dict[str, Any]] = []
    if args.pareto or args.pareto_plot:
        front = pareto_front(report, metric=plan.metric, candidates=cands, include_full_precision=not args.no_fp32)
        front_rows = [{"avg_bits": f.avg_bits, "model_bytes": f.model_bytes, "predicted": f.predicted,
                       "plan": " ".join(f"{a.layer}={a.candidate}" for a in f.assignments)} for f in front]
        if args.pareto:
            import csv

            with open(args.pareto, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(front_rows[0]))
                w.writeheader()
                w.writerows(front_rows)
        if args.pareto_plot:
            from gradcomp.plots.sensitivity import plot_pareto

            plot_pareto(front_rows, args.pareto_plot, measured=None, ylabel=f"predicted {plan.metric} (log scale)",
                        title=f"Pareto front ({plan.metric})")
    evaluation = None
    if args.evaluate:
        from gradcomp.quant import model_size_bytes

        if args.model:
            import torch.nn as nn

            if not args.eval_fn:
                raise CliError("--evaluate with --model needs --eval MODULE:FN (FN(model) -> a number, lower is better)")
            built = load_callable(args.model, "--model")()
            model = built[0] if isinstance(built, (tuple, list)) and built and isinstance(built[0], nn.Module) else built
            if not isinstance(model, nn.Module):
                raise CliError(f"--model {args.model!r} returned {type(built).__name__}, expected an nn.Module or (model, batches)")
            score = load_callable(args.eval_fn, "--eval")
            base, base_bytes = float(score(model)), model_size_bytes(model)
            apply_plan(model, plan)
            loss = float(score(model))
        else:
            if report.metadata.get("task") != "tiny_gpt":
                raise CliError("--evaluate needs --model MODULE:FN and --eval MODULE:FN for scores measured on your own model "
                               "(without them it evaluates the built-in task)")
            from gradcomp.examples.tasks import evaluate, pretrained_tiny_gpt

            model, _, val = pretrained_tiny_gpt(args.cache_dir)
            base, base_bytes = evaluate(model, val), model_size_bytes(model)
            apply_plan(model, plan)
            loss = evaluate(model, val)
        evaluation = {"base_loss": base, "loss": loss, "loss_increase": loss - base, "base_bytes": base_bytes,
                      "bytes": model_size_bytes(model), "predicted_bytes": plan.model_bytes}
    if args.json:
        doc: Dict[str, Any] = {**plan.summary(), "layers": plan.rows(), "rules": [[n, c.name if c else "fp32"] for n, c in plan.to_rules()]}
        if evaluation:
            doc["evaluation"] = evaluation
        if front_rows:
            doc["pareto_points"] = len(front_rows)
        print_json(doc)
        return 0
    print(format_table(plan.rows()))
    s = plan.summary()
    how = s["method"] if s["method"].startswith("rules") else f"{s['method']} knapsack (cost resolution {s['resolution_bits']} bit)"
    print(f"\nmethod {how}, metric {s['metric']}: "
          f"{s['avg_bits']:.4f} bits/weight, weights {s['weight_bytes']:.0f} B, model {s['model_bytes']:.0f} B, "
          f"predicted {s['metric']} {s['predicted']:.4g}")
    if front_rows:
        print(f"Pareto front: {len(front_rows)} plans" + (f" -> {args.pareto}" if args.pareto else ""))
    if evaluation:
        print(f"applied: validation loss {evaluation['loss']:.4f} (fp32 {evaluation['base_loss']:.4f}, "
              f"{evaluation['loss_increase']:+.4f}); model {evaluation['bytes']} B (predicted {evaluation['predicted_bytes']:.0f} B, "
              f"fp32 {evaluation['base_bytes']} B)")
    return 0
