"""``gradcomp weights``: analyse, quantize and size the weights of a checkpoint or state_dict file.

Subcommands::

    gradcomp weights analyze FILE [--config int8] [--config int4-g128-asym] [--plot report.png] [--json]
    gradcomp weights quantize IN OUT.safetensors --bits 4 --granularity per_group --group-size 128 [--asymmetric]
    gradcomp weights quantize IN OUT.safetensors --plan plan.json
    gradcomp weights quantize IN OUT.safetensors --bits 4 --granularity per_group --group-size 32 \
        --method gptq --model mymodel:build --data mymodel:calibration_batches [--forward mymodel:forward]
    gradcomp weights quantize IN OUT.safetensors --bits 4 --granularity per_group --group-size 32 \
        --method autoround --steps 200 --holdout 1 --model mymodel:build --data mymodel:calibration_batches
    gradcomp weights kernels MODEL.safetensors --model mymodel:build --data mymodel:batches [--threads 1] [--json]
    gradcomp weights size --params 7e9 [--json]
    gradcomp weights size FILE [--config ...] [--json]

FILE is a ``.safetensors`` file (a gradcomp quantized file is read back dequantized) or a torch
``state_dict`` / checkpoint (``.pt``, ``.pth``, ``.bin``, ``.tar``; loaded with ``weights_only=True``);
in a checkpoint the state dict is found where it sits (``ckpt["model"]["state_dict"]``, Lightning's
``ckpt["state_dict"]``), or at ``--key model.state_dict``; ``--strip-prefix model.`` drops a prefix.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List

from gradcomp.cli._common import CliError, add_json_flag, existing_file, float_in, format_table, int_in, out_file, print_json

DEFAULT_ANALYZE = ("int8-channel", "int4-g128-asym")
DEFAULT_SIZE = ("fp32", "fp16", "int8-channel", "int4-g128", "int4-g128-asym", "int2-g64-asym")


def register(subparsers) -> None:
    """Add ``weights`` and its subcommands."""
    p = subparsers.add_parser("weights", help="analyse, quantize and size model weights",
                              description="Analyse, quantize and size the weights of a checkpoint or state_dict file.")
    sub = p.add_subparsers(dest="weights_command", metavar="ACTION")
    sub.required = True

    a = sub.add_parser("analyze", help="per-layer statistics and quantization error of a weights file")
    a.add_argument("file", type=existing_file, help=".safetensors or torch state_dict (.pt/.pth/.bin) file")
    a.add_argument("--config", action="append", metavar="SPEC",
                   help="config to measure, e.g. int8, int4-g128-asym, int2-g64-asym-sfp32, fp16 (repeatable; "
                        f"default: {' and '.join(DEFAULT_ANALYZE)})")
    a.add_argument("--outlier-sigma", type=float_in(0, 1e6, lo_open=True), default=3.0, help="outlier threshold in standard deviations (default 3)")
    a.add_argument("--plot", metavar="PNG", type=out_file(".png"), help="also write a picture of the report (needs matplotlib)")
    a.add_argument("--histograms", action="store_true", help="include per-layer histograms in --json output")
    a.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    a.add_argument("--model", metavar="MODULE:FN", help="FN() builds the model FILE belongs to: with --data, each layer's output error on real inputs")
    a.add_argument("--data", metavar="MODULE:FN", help="FN() returns calibration batches for the output error")
    a.add_argument("--forward", metavar="MODULE:FN", help="FN(model, batch) runs one batch (default model(batch))")
    _add_file_options(a)
    add_json_flag(a)
    a.set_defaults(func=_analyze)

    q = sub.add_parser("quantize", help="quantize the weight matrices of a file into a gradcomp .safetensors file")
    q.add_argument("input", type=existing_file, help=".safetensors or torch state_dict (.pt/.pth/.bin) file")
    q.add_argument("output", type=out_file(".safetensors"), help="output .safetensors file")
    q.add_argument("--bits", type=int, default=8, choices=(2, 3, 4, 8), help="code width (default 8)")
    q.add_argument("--granularity", default="per_channel", choices=("per_tensor", "per_channel", "per_group"),
                   help="where scales are shared (default per_channel)")
    q.add_argument("--group-size", type=int_in(1, 1 << 24), default=128, help="values per group for per_group (default 128)")
    q.add_argument("--asymmetric", action="store_true", help="affine scales with zero points (default symmetric)")
    q.add_argument("--scale-dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="how scales are stored (default fp16)")
    q.add_argument("--cast", choices=("fp16", "bf16"), help="cast weights to a 16-bit float instead of integer codes")
    q.add_argument("--rule", action="append", default=[], metavar="PATTERN=SPEC",
                   help="per-layer rule before the default config, e.g. 're:.*attn.*=int8' or 'lm_head=fp32' "
                        "(fp32 keeps the layer; exact name, glob or re:<regex>; first match wins; repeatable)")
    q.add_argument("--skip", action="append", default=[], metavar="PATTERN", help="keep matching layers in full precision (repeatable)")
    q.add_argument("--plan", metavar="PLAN.json", help="per-layer configs from `gradcomp plan --out` (layers not in it stay as they are)")
    q.add_argument("--method", default="rtn", choices=("rtn", "gptq", "awq_clip", "awq_scale", "hqq", "autoround"),
                   help="how codes are chosen: round-to-nearest (default, no data), hqq (fitted scales; needs --model, "
                        "--data optional) or data-aware (gptq, awq_clip, awq_scale, autoround: need --model and --data; "
                        "autoround trains rounding and ranges against the model's outputs, which --forward must return)")
    q.add_argument("--steps", type=int_in(0), default=None, help="autoround: optimisation steps, one batch each (default 100)")
    q.add_argument("--lr", type=float_in(0, 1e3, lo_open=True), default=None,
                   help="autoround: learning rate at step 0, decayed linearly (default 0.5/steps)")
    q.add_argument("--holdout", type=int_in(0), default=None,
                   help="autoround: calibration batches (the last ones) kept out of training to pick the best step (default 0)")
    q.add_argument("--init", choices=("rtn", "awq_clip"), default=None, help="autoround: the starting ranges (default awq_clip)")
    q.add_argument("--output-weights", type=_output_weights, default=None, metavar="NAME=W[,NAME=W...]",
                   help="autoround: weight of each named output in the loss, e.g. 'e=4' to favour the output the task is "
                        "judged on (outputs not named weigh 1)")
    q.add_argument("--model", metavar="MODULE:FN", help="FN() builds the model IN belongs to (for --method other than rtn)")
    q.add_argument("--data", metavar="MODULE:FN", help="FN() returns the calibration batches (for gptq/awq_clip/awq_scale)")
    q.add_argument("--strict", action="store_true",
                   help="fail (exit 2) when --method does not cover a selected layer, instead of warning and rounding it to nearest")
    q.add_argument("--sequential", type=int, default=0, metavar="STAGES",
                   help="calibrate in this many stages, each on the output of the already-quantized earlier ones (0: off)")
    q.add_argument("--forward", metavar="MODULE:FN", help="FN(model, batch) runs one batch (default model(batch))")
    q.add_argument("--batches", type=int, default=None, help="use at most this many calibration batches")
    q.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    q.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_file_options(q)
    add_json_flag(q)
    q.set_defaults(func=_quantize)

    k = sub.add_parser("kernels", help="measure which kernel each quantized layer of a saved model runs on this machine",
                       description="Load a save_quantized file (weights and activation quantizers) into the model of --model, "
                                   "run one calibration batch without gradient and print, per layer, the route measured "
                                   "fastest among those of the layer's result class, with every route's time and fp32's.")
    k.add_argument("file", type=existing_file, help="a .safetensors file written by save_quantized")
    k.add_argument("--model", metavar="MODULE:FN", required=True, help="FN() builds the (unquantized) model the file belongs to")
    k.add_argument("--data", metavar="MODULE:FN", required=True, help="FN() returns batches; the first one is measured")
    k.add_argument("--forward", metavar="MODULE:FN", help="FN(model, batch) runs one batch (default model(batch))")
    k.add_argument("--threads", type=int_in(1, 4096), default=None, help="torch threads while measuring (default: torch's)")
    k.add_argument("--cache", metavar="JSON", help="route cache file: read if it exists, written after measuring")
    add_json_flag(k)
    k.set_defaults(func=_kernels)

    s = sub.add_parser("size", help="bytes per precision for N parameters, or for the weights of a file (measured on disk)")
    s.add_argument("file", nargs="?", type=existing_file, help="weights file to measure (quantized copies are written to a temporary directory)")
    s.add_argument("--params", type=float_in(1, 1e15), help="number of weights, e.g. 7e9 (instead of FILE)")
    s.add_argument("--row-length", type=int_in(1, 1 << 24), default=4096, help="inputs per weight row for --params (default 4096)")
    s.add_argument("--config", action="append", metavar="SPEC", help=f"configs to list (default: {', '.join(DEFAULT_SIZE)})")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_file_options(s)
    add_json_flag(s)
    s.set_defaults(func=_size)


def _add_file_options(p) -> None:
    p.add_argument("--key", metavar="PATH", help="dotted path of the state dict inside a checkpoint, e.g. model.state_dict "
                                                 "(default: the nested mapping holding the most tensors)")
    p.add_argument("--strip-prefix", metavar="PREFIX", help="drop this prefix from tensor names, e.g. 'model.' of Lightning")


def _load(args, path=None):
    from gradcomp.quant import load_tensor_file

    try:
        return load_tensor_file(path or args.file, key=getattr(args, "key", None), strip_prefix=getattr(args, "strip_prefix", None))
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc


def _progress(args, desc: str = "") -> bool:
    # a bar only when asked for and stderr is a terminal, so logs and pipes stay clean
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()

def _parse_specs(specs, default) -> List[Any]:
    from gradcomp.quant import parse_config

    return [parse_config(s) for s in (specs or default)]


def _analyze(args) -> int:
    from gradcomp.quant import analyze_weights

    configs = _parse_specs(args.config, DEFAULT_ANALYZE)
    sd = _load(args)
    if args.model or args.data:
        from gradcomp.cli._common import load_callable as import_spec

        model = _user_model(args, sd)
        if not args.data:
            raise CliError("--model needs --data (calibration batches) for the output error")
        forward = import_spec(args.forward, "--forward") if args.forward else None
        report = analyze_weights(model, configs, outlier_sigma=args.outlier_sigma, progress=_progress(args, "analyze"),
                                 calibration=import_spec(args.data, "--data")(), forward=forward)
    else:
        report = analyze_weights(sd, configs, outlier_sigma=args.outlier_sigma, progress=_progress(args, "analyze"))
    if args.plot:
        from gradcomp.plots.weights import plot_weight_report

        plot_weight_report(report, args.plot, title=f"weights of {args.file}")
    if args.json:
        out = report.to_json(histogram=args.histograms)
        out["file"] = args.file
        if args.plot:
            out["plot"] = args.plot
        print_json(out)
        return 0
    print(f"{args.file}: {len(report.stats)} weight tensors, "
          f"{sum(s.numel for s in report.stats):,} weights")
    print()
    print(format_table(report.rows(), floatfmt=".3g"))
    print()
    print(format_table(report.summary(), floatfmt=".4g"))
    print(f"\nnote: {report.note}")
    for f in report.flags:
        print(f"FLAG {f['layer']} [{f['config']}]: {f['why']}")
    if args.plot:
        print(f"\nwrote {args.plot}")
    return 0


def _rules(args) -> List[Any]:
    from gradcomp.quant import CastConfig, WeightQuantConfig, parse_config

    rules: List[Any] = [(p, None) for p in args.skip]
    if getattr(args, "plan", None):
        from gradcomp.analysis.mixed_precision import MixedPrecisionPlan

        try:
            plan = MixedPrecisionPlan.from_json(args.plan)
        except (OSError, ValueError, KeyError) as exc:
            raise CliError(f"--plan {args.plan}: {exc}") from exc
        return rules + plan.to_rules()
    for r in args.rule:
        pattern, sep, spec = r.rpartition("=")
        if not sep or not pattern:
            raise CliError(f"--rule must look like PATTERN=SPEC (e.g. 'lm_head=fp32'), got {r!r}")
        rules.append((pattern, parse_config(spec)))
    if args.cast:
        default = CastConfig(args.cast)
    else:
        default = WeightQuantConfig(bits=args.bits, granularity=args.granularity, group_size=args.group_size,
                                    symmetric=not args.asymmetric, scale_dtype=args.scale_dtype)
    rules.append(("*", default))
    return rules


def _tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (entries sharing one tensor, like tied weights, count once, as on disk)."""
    seen = {}
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else id(t)
        seen[key] = t.numel() * t.element_size()
    return sum(seen.values())


def _quantize(args) -> int:
    import os
    from pathlib import Path

    from gradcomp.codec import sqnr_db
    from gradcomp.quant import config_name, quantize_state_dict, save_quantized_state_dict

    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise CliError(f"OUT must be a .safetensors file, got {args.output!r}")
    if out.exists() and not args.force:
        raise CliError(f"{args.output} exists; pass --force to overwrite it")
    if Path(args.input).resolve() == out.resolve():
        raise CliError("IN and OUT must be different files")
    rules = _rules(args)
    stray = [f"--{k.replace('_', '-')}" for k in ("steps", "lr", "holdout", "init", "output_weights")
             if getattr(args, k, None) is not None]
    if stray and args.method != "autoround":
        raise CliError(f"{', '.join(stray)} belong to --method autoround, got --method {args.method}")
    sd = _load(args, args.input)
    if args.method == "rtn":
        packed, plain = quantize_state_dict(sd, rules, progress=_progress(args, "quantize"))
    else:
        packed, plain = _quantize_with_data(args, sd, rules)
    if not packed:
        raise CliError(f"{args.input}: no weight matrix ('*.weight' with 2+ dims) was selected for quantization")
    save_quantized_state_dict(packed, plain, out)
    layers = []
    for name, p in packed.items():
        w = sd[f"{name}.weight" if name else "weight"]
        layers.append({"layer": name, "shape": "x".join(map(str, p.shape)), "config": config_name(p.config),
                       "bytes": p.nbytes, "bits_per_weight": 8.0 * p.nbytes / w.numel(), "sqnr_db": sqnr_db(w, p.dequantize())})
    in_bytes = _tensor_bytes(sd.values())
    held = sum(p.nbytes for p in packed.values()) + _tensor_bytes(plain.values())
    sq = sorted(r["sqnr_db"] for r in layers)
    summary = {
        "input": args.input, "output": str(out), "quantized_layers": len(packed), "kept_tensors": len(plain),
        "input_tensor_bytes": in_bytes, "output_tensor_bytes": held, "output_file_bytes": os.path.getsize(out),
        "ratio": in_bytes / held if held else float("nan"),
        "median_sqnr_db": (sq[(len(sq) - 1) // 2] + sq[len(sq) // 2]) / 2, "min_sqnr_db": sq[0],
    }
    if args.json:
        print_json({"summary": summary, "layers": layers})
        return 0
    print(format_table(layers, floatfmt=".4g"))
    print()
    print(format_table([summary], floatfmt=".4g"))
    return 0


def _quantize_with_data(args, sd, rules):
    """Load ``sd`` into the user's model, quantize it with a data-aware method, and split packed/plain."""
    from gradcomp.cli._common import load_callable as import_spec
    from gradcomp.quant import quantize_

    if not args.model or (not args.data and args.method != "hqq"):
        raise CliError(f"--method {args.method} needs --model MODULE:FN (the model) and --data MODULE:FN (calibration batches)")
    if args.sequential < 0 or (args.sequential and not args.data):
        raise CliError(f"--sequential takes a number of stages >= 0 and needs --data, got {args.sequential}")
    given = {k: getattr(args, k) for k in ("steps", "lr", "holdout", "init") if getattr(args, k, None) is not None}
    if getattr(args, "output_weights", None) is not None:
        given["weights"] = args.output_weights
    method: Any = args.method
    if args.method == "autoround":
        from gradcomp.quant.algorithms import AutoRound

        if args.sequential:
            raise CliError("--method autoround trains every layer at once; it takes no --sequential")
        method = AutoRound(**given)
    model = _user_model(args, sd)
    batches = import_spec(args.data, "--data")() if args.data else None
    forward = import_spec(args.forward, "--forward") if args.forward else None
    quantize_(model, rules, method=method, calibration=batches, forward=forward, num_batches=args.batches,
              progress=not args.no_progress, sequential=args.sequential or False, strict=args.strict)
    packed = {n: m.packed for n, m in model.named_modules() if hasattr(m, "packed")}
    held = {f"{n}.{k}" for n in packed for k in ("packed.qweight", "packed.scale", "packed.zero_point", "packed.input_scale")}
    plain = {k: v for k, v in model.state_dict().items() if k not in held and k in sd}
    return packed, plain


def _output_weights(text: str) -> Dict[str, float]:
    """Parse ``NAME=W[,NAME=W...]`` (``--output-weights``) into ``{name: weight}``, weights finite and >= 0."""
    import argparse
    import math

    out: Dict[str, float] = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        name = name.strip()
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not eq or not name or not math.isfinite(w) or w < 0 or name in out:
            raise argparse.ArgumentTypeError(f"expected NAME=W[,NAME=W...] with distinct names and finite weights >= 0, "
                                             f"got {text!r}")
        out[name] = w
    return out


def _user_model(args, sd):
    """Build the model of ``--model`` and load the file's tensors into it."""
    import torch.nn as nn

    from gradcomp.cli._common import load_callable as import_spec

    if not args.model:
        raise CliError("--data needs --model (the model the weights belong to)")
    model = import_spec(args.model, "--model")()
    if isinstance(model, (tuple, list)) and model and isinstance(model[0], nn.Module):
        model = model[0]
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {args.model!r} returned {type(model).__name__}, expected an nn.Module")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
        raise CliError(f"the weights do not fit the model of --model: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]} "
                       "(try --key or --strip-prefix)")
    return model


def _kernels(args) -> int:
    import os

    import torch
    import torch.nn as nn

    from gradcomp.cli._common import load_callable
    from gradcomp.quant import load_quantized, routes

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_callable(args.model, "--model")()
    if isinstance(model, (tuple, list)) and model and isinstance(model[0], nn.Module):
        model = model[0]
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {args.model!r} returned {type(model).__name__}, expected an nn.Module")
    load_quantized(model, args.file)
    model.eval()
    batches = iter(load_callable(args.data, "--data")())
    batch = next(batches, None)
    if batch is None:
        raise CliError(f"--data {args.data!r} gave no batch")
    if args.cache and os.path.exists(args.cache):
        routes.load_route_cache(args.cache)
    forward = load_callable(args.forward, "--forward") if args.forward else None
    rows = routes.tune_(model, batch, forward=forward)
    if args.cache:
        routes.save_route_cache(args.cache)
    if not rows:
        raise CliError(f"{args.file}: the model holds no quantized Linear or Conv2d layer that ran on the batch")
    machine = routes.machine_signature()
    if args.json:
        print_json({"file": args.file, "machine": machine, "layers": rows})
        return 0
    cols = ("layer", "kind", "weight", "activations", "input", "class", "route", "ms", "fp32_ms", "speedup_vs_fp32", "source")
    print(f"{args.file}: cpu={machine['cpu']} threads={machine['threads']} torch={machine['torch']}\n")
    print(format_table(rows, cols, floatfmt=".3g"))
    total = sum(r["ms"] or 0.0 for r in rows)
    base = sum(r["fp32_ms"] or 0.0 for r in rows)
    if total:
        print(f"\nquantized layers: {total:.3g} ms, the same layers in fp32: {base:.3g} ms ({base / total:.2f}x)")
    return 0


def _size(args) -> int:
    from gradcomp.quant import size_table

    specs = args.config or DEFAULT_SIZE
    configs = _parse_specs(specs, DEFAULT_SIZE)
    if (args.file is None) == (args.params is None):
        raise CliError("give either FILE or --params N")
    if args.params is not None:
        rows = size_table(args.params, configs, row_length=args.row_length)
        if args.json:
            print_json({"params": int(args.params), "row_length": args.row_length, "rows": rows})
            return 0
        print(f"{int(args.params):,} weights in rows of {args.row_length} (scales and zero points included)\n")
        print(format_table(rows, floatfmt=".4g"))
        return 0
    rows = _measure_file_sizes(args, configs)
    if args.json:
        print_json({"file": args.file, "rows": rows})
        return 0
    print(format_table(rows, floatfmt=".4g"))
    return 0


def _measure_file_sizes(args, configs) -> List[Dict[str, Any]]:
    """Quantize the file's weights with each config, save each, and compare arithmetic, held and on-disk bytes."""
    import json
    import os
    import struct
    import tempfile

    from gradcomp.batches import progress_bar
    from gradcomp.quant import config_name, quantize_state_dict, save_quantized_state_dict, weight_nbytes

    sd = _load(args)
    weights = {k: v for k, v in sd.items() if v.is_floating_point() and v.dim() >= 2 and (k == "weight" or k.endswith(".weight"))}
    n_weights = sum(v.numel() for v in weights.values())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in progress_bar(configs, _progress(args), "size", unit="config"):
            name = config_name(cfg)
            other = _tensor_bytes(t for k, t in sd.items() if k not in weights)
            predicted = other + sum(weight_nbytes(cfg, v.shape, v.dtype) for v in weights.values())
            if cfg is None:
                packed, plain = {}, dict(sd)
            else:
                packed, plain = quantize_state_dict(sd, cfg)
            held = sum(p.nbytes for p in packed.values()) + _tensor_bytes(plain.values())
            path = os.path.join(tmp, f"{name}.safetensors")
            save_quantized_state_dict(packed, plain, path)
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                header_len = struct.unpack("<Q", f.read(8))[0]
                json.loads(f.read(header_len))
            on_disk = size - 8 - header_len
            wbytes = held - other
            rows.append({
                "config": name, "bits_per_weight": 8.0 * wbytes / n_weights, "predicted_bytes": predicted,
                "held_bytes": held, "file_bytes": size, "header_bytes": header_len + 8, "tensor_bytes_on_disk": on_disk,
                "match": predicted == held == on_disk, "MB": size / 1e6,
            })
    return rows
