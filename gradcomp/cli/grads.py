"""``gradcomp grads``: capture real gradients of a model and measure what quantizing them costs in error."""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from pathlib import Path

from gradcomp.codec.formats import format_names, gradient_bits, wire_format
from gradcomp.cli._common import EXIT_OK, CliError, add_json_flag, existing_file, float_in, format_table, load_callable, out_dir, out_file, positive_int, print_json

_EPILOG = """\
examples:
  gradcomp grads                                   # TinyGPT on the stdlib corpus, 4 emulated ranks
  gradcomp grads --bits 8,4,2 --block-sizes 64,256 --steps 40 --plot-dir plots/
  gradcomp grads --format int8,int4                # the same widths by wire-format name
  gradcomp grads --steps 8 --save-trace g.safetensors         # keep the gradients ...
  gradcomp grads --load-trace g.safetensors --replay-steps 200  # ... and replay them many times
  gradcomp grads --model mypkg.models:build --data mypkg.data:batch --json

your own model: --model MODULE:FACTORY names a function returning an nn.Module; --data MODULE:FN
names fn(step, worker) returning a batch that is passed as model(*batch) (a tuple), model(**batch)
(a dict) or model(batch); the loss is the output if it is a scalar, out[1] of a (logits, loss)
tuple, or out.loss; otherwise give --loss MODULE:FN with fn(model, batch) -> scalar loss.

metrics, against the exact mean gradient g of the emulated ranks:
  rel_error  mean over steps of ||out - g|| / ||g||
  sqnr_db    10 log10(sum ||g||^2 / sum ||out - g||^2)
  bias       <out - g, g> / ||g||^2 (negative: the update is shrunk along the gradient)
  drift      ||sum_t out_t - sum_t g_t|| / ||sum_t g_t|| after the last step (error feedback keeps it small)
"""


def register(subparsers) -> None:
    """Add the ``grads`` subcommand."""
    p = subparsers.add_parser(
        "grads",
        help="replay real gradients through the quantized exchange in any wire format: error per layer and bucket, drift",
        description=textwrap.fill(
            "Capture real gradients of a model on several emulated ranks and replay them through the "
            "quantized two-phase exchange offline, comparing bit widths, block sizes, rounding and error "
            "feedback: per-layer and per-bucket relative error, SQNR, bias, and the drift of the "
            "accumulated update over many steps.",
            90,
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("gradients")
    src.add_argument("--model", default=None, metavar="MODULE:FACTORY", help="a function returning your nn.Module")
    src.add_argument("--data", default=None, metavar="MODULE:FN", help="fn(step, worker) returning a batch (needed with --model)")
    src.add_argument("--loss", default=None, metavar="MODULE:FN", help="fn(model, batch) returning a scalar loss")
    src.add_argument("--preset", choices=("small", "comm17m"), default="small", help="TinyGPT shape when no --model (default small)")
    src.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                     help="TinyGPT weights: trained once and cached (1-2 minutes the first time) or random")
    src.add_argument("--cache-dir", default=None, metavar="DIR", type=out_dir, help="where the pretrained TinyGPT is cached (default ~/.cache/gradcomp)")
    src.add_argument("--steps", type=positive_int, metavar="N", default=20, help="training steps to capture (default 20)")
    src.add_argument("--workers", type=positive_int, metavar="P", default=4, help="emulated ranks, each on its own batch (default 4)")
    src.add_argument("--batch-size", type=positive_int, metavar="N", default=8, help="TinyGPT sequences per rank and step (default 8)")
    src.add_argument("--lr", type=float_in(0), metavar="LR", default=1e-3, help="learning rate applied between steps; 0 keeps the weights fixed")
    src.add_argument("--seed", type=int, metavar="S", default=0, help="seed of the weights, batches and rounding noise")
    src.add_argument("--load-trace", default=None, metavar="FILE", type=existing_file, help="replay gradients saved with --save-trace")
    src.add_argument("--save-trace", default=None, metavar="FILE", type=out_file(), help="also save the captured gradients (safetensors)")
    q = p.add_argument_group("quantization")
    q.add_argument("--bits", default=None, metavar="LIST",
                   help=f"comma-separated bit widths from {', '.join(map(str, _bits_choices()))} (default 8,4)")
    q.add_argument("--format", default=None, metavar="LIST",
                   help=f"comma-separated wire formats from {', '.join(format_names())}, instead of --bits")
    q.add_argument("--block-sizes", default="256", metavar="LIST", help="comma-separated elements per scale (default 256)")
    q.add_argument("--rounding", default="nearest,stochastic", metavar="LIST", help="nearest, stochastic or both (default both)")
    q.add_argument("--error-feedback", default="on,off", metavar="LIST", help="on, off or both (default on,off)")
    q.add_argument("--replay-steps", type=positive_int, metavar="N", default=None,
                   help="steps to replay, cycling through the captured ones (default: each captured step once)")
    q.add_argument("--bucket-cap-mb", type=float_in(0, 1e6, lo_open=True), metavar="MB", default=25.0, help="DDP bucket size in MiB (default 25)")
    q.add_argument("--first-bucket-mb", type=float_in(0, 1e6, lo_open=True), metavar="MB", default=1.0, help="DDP's first bucket in MiB (default 1)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="FILE.json", type=out_file(".json"), help="write the full result (every layer, bucket and step) as JSON")
    o.add_argument("--plot-dir", default=None, metavar="DIR", type=out_dir, help="write drift.png, layers.png and summary.png here")
    o.add_argument("--top", type=positive_int, metavar="N", default=12, help="layers shown in the table, worst first (default 12)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    o.add_argument("--threads", type=positive_int, metavar="N", default=None,
                   help="torch intra-op threads (default: torch's choice; 1 is faster on a busy machine)")
    add_json_flag(o)
    p.set_defaults(func=run)


def _split(text: str, what: str, convert, allowed=None) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise CliError(f"{what} must list at least one value, got {text!r}")
    out = []
    for t in items:
        try:
            v = convert(t)
        except (ValueError, TypeError):
            raise CliError(f"{what} must be a comma-separated list of {allowed or 'values'}, got {t!r} in {text!r}") from None
        if allowed is not None and v not in allowed:
            raise CliError(f"{what} must be a comma-separated list of {allowed}, got {t!r} in {text!r}")
        out.append(v)
    return list(dict.fromkeys(out))


def _bits_choices() -> tuple:
    """The ``--bits`` choices: the registry's bits shorthands, widest first (8, 4, 2)."""
    return tuple(sorted(gradient_bits(), reverse=True))


def _configs(args):
    from gradcomp.analysis.gradexp import config_grid

    if args.format is not None and args.bits is not None:
        raise CliError("give --bits or --format, not both")
    if args.format is not None:
        formats = [wire_format(f) for f in _split(args.format, "--format", str, format_names())]
    else:
        formats = [wire_format(b) for b in _split("8,4" if args.bits is None else args.bits, "--bits", int, _bits_choices())]
    blocks = _split(args.block_sizes, "--block-sizes", int)
    for b in blocks:
        bad = [f for f in formats if b < 1 or b % f.codes_per_byte]
        if bad:
            need = ", ".join(f"{f.codes_per_byte} for {f.name}" for f in formats if f.codes_per_byte > 1)
            raise CliError(f"--block-sizes must be positive and a whole number of code bytes (a multiple of {need}), got {b}")
    bits = [f.short for f in formats]
    rounding = _split(args.rounding, "--rounding", str, ("nearest", "stochastic"))
    ef = _split(args.error_feedback, "--error-feedback", str, ("on", "off"))
    return config_grid(bits, blocks, rounding, [e == "on" for e in ef], seed=args.seed)


def _progress(total: int, desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=disable or None, leave=False)


def _source(args):
    """Return (model, batch_fn, loss_fn, optimizer, meta) from the arguments."""
    import torch

    torch.manual_seed(args.seed)
    if args.model is not None:
        factory = load_callable(args.model, "--model")
        if args.data is None:
            raise CliError("--model needs --data MODULE:FN, a function fn(step, worker) returning a batch")
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise CliError(f"--model: {args.model!r} returned a {type(model).__name__}, expected a torch.nn.Module")
        batch_fn = load_callable(args.data, "--data")
        loss_fn = load_callable(args.loss, "--loss") if args.loss else None
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr) if args.lr > 0 else None
        return model, batch_fn, loss_fn, opt, {"model": args.model, "data": args.data}
    if args.data is not None or args.loss is not None:
        raise CliError("--data and --loss go with --model; without --model the TinyGPT task is used")
    from gradcomp.examples import tasks

    cfg = tasks.GPT_PRESETS[args.preset]
    if args.init == "pretrained":
        cache = Path(args.cache_dir) if args.cache_dir else Path.home() / ".cache" / "gradcomp"
        print(f"loading the pretrained TinyGPT ({args.preset}) from {cache}; the first run trains it (1-2 minutes)",
              file=sys.stderr)
        model, train, _ = tasks.pretrained_tiny_gpt(cache, seed=args.seed, config=cfg)
    else:
        model = tasks.TinyGPT.from_config(cfg)
        train, _ = tasks.split_corpus(tasks.text_corpus())
    gens = [torch.Generator().manual_seed(args.seed * 1_000_003 + 1 + w) for w in range(args.workers)]

    def batch_fn(step: int, worker: int):
        return tasks.get_batch(train, args.batch_size, cfg.block_size, gens[worker])

    opt = tasks.make_optimizer(model, lr=args.lr) if args.lr > 0 else None
    meta = {"model": f"TinyGPT {args.preset} ({args.init})", "data": "stdlib corpus", "batch_size": args.batch_size, "lr": args.lr}
    return model, batch_fn, None, opt, meta


def _model_name(meta) -> str:
    """The model's description, also for a replayed trace (whose description is nested)."""
    return meta.get("model") or (meta.get("trace") or {}).get("model") or "saved trace"


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}"
    return str(v)


def run(args) -> int:
    """Handle ``gradcomp grads``."""
    from gradcomp.analysis import gradexp

    if args.lr < 0 or not math.isfinite(args.lr):
        raise CliError(f"--lr must be a non-negative number, got {args.lr}")
    if args.bucket_cap_mb <= 0 or args.first_bucket_mb <= 0:
        raise CliError(f"--bucket-cap-mb and --first-bucket-mb must be positive, got {args.bucket_cap_mb} and {args.first_bucket_mb}")
    configs = _configs(args)
    for path, what in ((args.out, "--out"), (args.save_trace, "--save-trace")):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise CliError(f"{what}: the folder of {path!r} does not exist")
    if args.plot_dir is not None:
        from gradcomp.plots import require_matplotlib

        require_matplotlib()

    quiet = args.no_progress
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.load_trace is not None:
        if args.model is not None or args.save_trace is not None:
            raise CliError("--load-trace replays saved gradients; it cannot be combined with --model or --save-trace")
        try:
            trace = gradexp.GradientTrace.load(args.load_trace)
        except FileNotFoundError:
            raise CliError(f"--load-trace: no such file {args.load_trace!r}") from None
        except ValueError as exc:
            raise CliError(f"--load-trace: {exc}") from None
        total = args.replay_steps or trace.steps
        with _progress(total, "replay", quiet) as bar:
            result = gradexp.replay(trace, configs, total, args.bucket_cap_mb, args.first_bucket_mb, bar.update)
    else:
        model, batch_fn, loss_fn, opt, meta = _source(args)
        meta.update({"seed": args.seed})
        if args.save_trace is not None or args.replay_steps is not None:
            with _progress(args.steps, "capture", quiet) as bar:
                trace = gradexp.capture_gradients(model, batch_fn, args.steps, args.workers, loss_fn, opt, bar.update, meta)
            if args.save_trace is not None:
                trace.save(args.save_trace)
            total = args.replay_steps or trace.steps
            with _progress(total, "replay", quiet) as bar:
                result = gradexp.replay(trace, configs, total, args.bucket_cap_mb, args.first_bucket_mb, bar.update)
        else:
            # stream: capture one step, replay it through every config, keep nothing
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            stream = gradexp.iter_gradients(model, batch_fn, args.steps, args.workers, loss_fn, opt)
            with _progress(args.steps, "capture+replay", quiet) as bar:
                result = gradexp.replay_stream(
                    stream, [n for n, _ in named], [p.numel() for _, p in named], configs,
                    args.bucket_cap_mb, args.first_bucket_mb, bar.update, meta,
                )

    if args.out is not None:
        result.save_json(args.out)
    plots = []
    if args.plot_dir is not None:
        from gradcomp.plots.gradients import plot_drift, plot_error_summary, plot_layer_errors

        os.makedirs(args.plot_dir, exist_ok=True)
        m = result.meta
        title = f"{_model_name(m)}: {m['params']} params, {m['workers']} ranks, {m['steps']} steps"
        plots.append(plot_drift(result.curves, os.path.join(args.plot_dir, "drift.png"), title))
        plots.append(plot_layer_errors(result.per_layer, os.path.join(args.plot_dir, "layers.png"), title=title))
        plots.append(plot_error_summary(result.summary, os.path.join(args.plot_dir, "summary.png"), title))

    if args.json:
        data = result.to_dict()
        data["plots"] = plots
        print_json(data)
        return EXIT_OK

    m = result.meta
    print(f"{_model_name(m)}: {m['params']} parameters in {m['layers']} tensors and {len(m['buckets'])} DDP buckets, "
          f"{m['workers']} emulated ranks, {m['steps']} steps")
    print()
    rows = [{
        "config": r["config"], "rel error": _fmt(r["rel_error"]), "SQNR dB": _fmt(r["sqnr_db"]), "bias": _fmt(r["bias"]),
        f"drift@{m['steps']}": _fmt(r["drift"]), "bytes/rank": r["bytes_per_rank"], "vs fp32": f"{r['compression']:.2f}x",
    } for r in result.summary]
    print(format_table(rows))
    print()
    names = [r["config"] for r in result.summary]
    by_layer = {}
    for r in result.per_layer:
        by_layer.setdefault((r["layer"], r["numel"]), {})[r["config"]] = r["rel_error"]
    worst = sorted(by_layer.items(), key=lambda kv: -max(v for v in kv[1].values() if not math.isnan(v)))[: args.top]
    print(f"relative error per layer (the {len(worst)} worst of {len(by_layer)}):")
    print(format_table([dict({"layer": k[0], "numel": k[1]}, **{n: _fmt(v[n]) for n in names}) for k, v in worst]))
    print()
    by_bucket = {}
    for r in result.per_bucket:
        by_bucket.setdefault((r["bucket"], r["numel"], r["params"]), {})[r["config"]] = r["rel_error"]
    print("relative error per DDP bucket:")
    print(format_table([dict({"bucket": k[0], "numel": k[1], "tensors": k[2]}, **{n: _fmt(v[n]) for n in names})
                        for k, v in by_bucket.items()]))
    for path in ([args.out] if args.out else []) + plots:
        print(f"wrote {path}")
    return EXIT_OK
