"""``gradcomp calibrate``: activation statistics, observer calibration and per-layer SQNR of a model."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List

from gradcomp.cli._common import EXIT_OK, CliError, add_json_flag, float_in, format_table, load_callable, name_pattern, out_dir, positive_int, print_json

_OBSERVERS = ("minmax", "moving_average", "per_channel", "percentile", "mse", "kl")

_EPILOG = """\
examples:
  gradcomp calibrate                                   # the built-in tiny GPT on stdlib bytes
  gradcomp calibrate --observer kl --bits 8 --out act_report
  gradcomp calibrate --model mypkg.models:build --data mypkg.data:calib_batches --batches 32 --json
  gradcomp calibrate --names '*mlp*' --dynamic         # per-token scales computed on the fly

--model names a constructor called without arguments that returns an nn.Module; --data names a
function called without arguments that returns an iterable of input batches (a tensor is passed as
model(x), a tuple as model(*batch), a dict as model(**batch)). Without --model the built-in tiny GPT
(gradcomp.examples.tasks.pretrained_tiny_gpt, trained once and cached under --cache-dir) is used with windows
of its training bytes, and the validation loss of fp32 and of the quantized model is reported.

The statistics are those of the inputs of the chosen layers (what gets quantized); --outputs adds
the layer outputs. --out DIR writes activations.json (full report with histograms and per-batch
traces), activations.md (the tables) and, unless --no-plots, distributions.png and ranges.png.
"""


def register(subparsers) -> None:
    """Add the ``calibrate`` subcommand."""
    p = subparsers.add_parser(
        "calibrate",
        help="measure activations, calibrate observers and report per-layer SQNR",
        description=(
            "Capture running statistics of the inputs of a model's Linear/Conv layers over calibration "
            "batches (range, spread, percentiles, kurtosis, outliers, per-batch dynamics), calibrate "
            "static activation quantization with an observer (or use dynamic per-token scales), and "
            "report each layer's scale and the SQNR of its quantized input."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, metavar="MODULE:CONSTRUCTOR",
                   help="importable constructor of the model (default: the built-in tiny GPT)")
    p.add_argument("--data", default=None, metavar="MODULE:FUNCTION",
                   help="importable function returning an iterable of input batches (required with --model)")
    p.add_argument("--observer", choices=_OBSERVERS, default="mse", help="static observer (default mse)")
    p.add_argument("--dynamic", action="store_true", help="dynamic per-token scales instead of an observer")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=8, help="activation bits (default 8)")
    p.add_argument("--symmetric", action="store_true", help="symmetric scales without zero point (default affine)")
    p.add_argument("--batches", type=positive_int, default=16, help="calibration batches (default 16)")
    p.add_argument("--names", default=None, metavar="PATTERN", type=name_pattern, help="only layers whose name matches (exact name, glob, or re:REGEX)")
    p.add_argument("--exclude", default=None, metavar="PATTERN", type=name_pattern, help="skip layers whose name matches (exact name, glob, or re:REGEX)")
    p.add_argument("--percentile", type=float_in(0, 100, lo_open=True), default=99.99, help="percentile of --observer percentile (default 99.99)")
    p.add_argument("--bins", type=positive_int, default=2048, help="histogram bins (default 2048)")
    p.add_argument("--outputs", action="store_true", help="also record the layer outputs")
    p.add_argument("--out", default=None, metavar="DIR", type=out_dir, help="write the report (JSON, markdown, PNG) to this folder")
    p.add_argument("--no-plots", action="store_true", help="with --out, skip the PNG plots")
    p.add_argument("--save", default=None, metavar="SCALES.safetensors",
                   help="write the calibrated scales; gradcomp.quant.load_activation_scales_(model, FILE) puts them back")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "gradcomp"), type=out_dir,
                   help="where the built-in tiny GPT is cached (default ~/.cache/gradcomp)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _builtin(args) -> Dict[str, Any]:
    import torch

    from gradcomp.examples.tasks import evaluate, get_batch, pretrained_tiny_gpt

    model, train, val = pretrained_tiny_gpt(args.cache_dir)
    block = model.config.block_size
    gen = torch.Generator().manual_seed(0)
    batches = [get_batch(train, 16, block, gen)[0] for _ in range(args.batches)]
    return {"model": model, "batches": batches, "label": "tiny GPT (gradcomp.examples.tasks)", "eval": lambda m: evaluate(m, val)}


def _user(args) -> Dict[str, Any]:
    import torch.nn as nn

    ctor = load_callable(args.model, "--model")
    model = ctor()
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {args.model!r} returned {type(model).__name__}, expected an nn.Module")
    if args.data is None:
        raise CliError("--data is required with --model (a function returning an iterable of input batches)")
    data = load_callable(args.data, "--data")()
    try:
        batches = list(itertools.islice(iter(data), args.batches))
    except TypeError as exc:
        raise CliError(f"--data {args.data!r} did not return an iterable: {exc}") from exc
    return {"model": model, "batches": batches, "label": args.model, "eval": None}


def _fmt_row(row: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}


def run(args) -> int:
    """Run ``gradcomp calibrate``."""
    import torch

    from gradcomp.quant import (
        ActQuantConfig,
        analyze_activation_dynamics,
        calibrate_,
        convert_activation_quant_,
        measure_activation_sqnr,
        prepare_activation_quant_,
    )

    config = ActQuantConfig(
        bits=args.bits, observer=args.observer, symmetric=args.symmetric, dynamic=args.dynamic,
        percentile=args.percentile, bins=args.bins,
    )
    if args.data is not None and args.model is None:
        raise CliError("--data needs --model (the built-in tiny GPT brings its own data)")
    task = _builtin(args) if args.model is None else _user(args)
    model, batches = task["model"], task["batches"]
    if not batches:
        raise CliError("the data source gave no batch")
    progress = not args.no_progress
    torch.manual_seed(0)

    report = analyze_activation_dynamics(
        model, batches, num_batches=None, names=args.names, exclude=args.exclude,
        inputs=True, outputs=args.outputs, bins=args.bins, progress=progress,
    )
    fp32_loss = task["eval"](model) if task["eval"] else None

    layers = prepare_activation_quant_(model, config, names=args.names, exclude=args.exclude)
    clips: Dict[str, Any] = {}
    if not config.dynamic:
        calibrate_(model, batches, progress=progress)
        modules = dict(model.named_modules())
        for name in layers:
            lo, hi = modules[name].input_quantizer.observer.clip_range()
            clips[name] = (lo, hi)
        qparams = convert_activation_quant_(model)
        if args.save:
            from gradcomp.quant.activation_quant import save_activation_scales

            save_activation_scales(model, args.save)
    else:
        if args.save:
            raise CliError("--save writes calibrated static scales; --dynamic computes them from each input, there is nothing to save")
        qparams = {}
    sqnr = measure_activation_sqnr(model, batches, progress=progress)
    q_loss = task["eval"](model) if task["eval"] else None

    rows: List[Dict[str, Any]] = []
    for name in layers:
        st = report.layers[f"{name}:input"]
        row: Dict[str, Any] = {
            "layer": name,
            "min": st.min,
            "max": st.max,
            "p0.01": st.percentiles[0.01],
            "p99.99": st.percentiles[99.99],
            "kurtosis": st.kurtosis,
            "outliers%": 100.0 * st.outlier_share,
            "absmax_cv": st.dynamics()["absmax_cv"],
        }
        if name in qparams:
            scale, zp = qparams[name]
            lo, hi = clips[name]
            if scale.numel() == 1:
                row.update(clip_lo=float(lo), clip_hi=float(hi), scale=float(scale), zero_point=None if zp is None else float(zp))
            else:
                row.update(clip_lo=float(lo.min()), clip_hi=float(hi.max()), scale=float(scale.max()), zero_point=None)
        row["sqnr_db"] = sqnr[name]
        rows.append(row)

    doc: Dict[str, Any] = {
        "model": task["label"],
        "observer": "dynamic" if config.dynamic else config.observer,
        "config": config.label,
        "bits": config.bits,
        "symmetric": config.symmetric,
        "batches": len(batches),
        "layers": [_fmt_row(r) for r in rows],
        "dynamics": [_fmt_row(r) for r in report.dynamics_rows()],
    }
    if fp32_loss is not None:
        doc["eval"] = {"fp32_loss": fp32_loss, "quantized_loss": q_loss, "delta": q_loss - fp32_loss}

    columns = ["layer", "min", "max", "p99.99", "kurtosis", "outliers%", "absmax_cv", "clip_lo", "clip_hi", "scale", "sqnr_db"]
    if config.dynamic:
        columns = [c for c in columns if c not in ("clip_lo", "clip_hi", "scale")]
    table = format_table(rows, columns)
    dyn_table = format_table(report.dynamics_rows())

    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        full = dict(doc, report=report.to_dict(include_histogram=True))
        (out / "activations.json").write_text(json.dumps(_json_safe(full), indent=1))
        md = [f"# Activation calibration: {task['label']}, {config.label}, {len(batches)} batches", "", table, "",
              "## Dynamics across batches", "", dyn_table, ""]
        if fp32_loss is not None:
            md.insert(2, f"validation loss fp32 {fp32_loss:.4f}, quantized {q_loss:.4f} (delta {q_loss - fp32_loss:+.4f})\n")
        (out / "activations.md").write_text("\n".join(md))
        if not args.no_plots:
            from gradcomp.plots.activations import plot_distributions, plot_ranges

            inputs = [f"{n}:input" for n in layers]
            clip_map = {f"{n}:input": {config.observer: (float(lo.min()), float(hi.max()))} for n, (lo, hi) in clips.items()}
            plot_distributions(report, out / "distributions.png", layers=inputs, clips=clip_map)
            plot_ranges(report, out / "ranges.png", layers=inputs)

    if args.json:
        print_json(doc)
        return EXIT_OK
    print(f"{task['label']}: {config.label}, {'symmetric' if config.symmetric else 'affine'}, {len(batches)} calibration batches")
    if fp32_loss is not None:
        print(f"validation loss: fp32 {fp32_loss:.4f}, quantized {q_loss:.4f} (delta {q_loss - fp32_loss:+.4f})")
    print()
    print(table)
    print()
    print("dynamics across batches (absmax_cv: spread of the per-batch absmax; range_use: mean batch range / global range)")
    print(dyn_table)
    if args.out is not None:
        print(f"\nreport written to {args.out}", file=sys.stderr)
    return EXIT_OK


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
