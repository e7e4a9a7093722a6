"""``gradcomp cost``: predict the communication time and bytes of each all-reduce scheme."""

from __future__ import annotations

import argparse
import math
import os
import textwrap

from gradcomp.cli._common import (
    EXIT_OK, CliError, add_json_flag, arg_type, existing_file, float_in, format_table, hook_block_size, int_in, out_file, print_json,
)

_EPILOG = """\
examples:
  gradcomp cost --params 7e9 --workers 8 --bandwidth 10gbit
  gradcomp cost --params 7e9 --workers 32 --nodes 4 --bandwidth 100gbit --intra-bandwidth 300GB/s
  gradcomp cost --params 350M --workers 16 --bandwidth 25GB/s --codec-throughput 200GB/s --json
  gradcomp cost --params 7e9 --workers 8 --bandwidth 10gbit --plot cost.png --sweep workers
  gradcomp cost --params 7e9 --workers 8 --bandwidth 1gbit --error-budget 0.2
  gradcomp cost --params 20M --workers 2 --bandwidth 1gbit --error-budget 0.2 --grads g.safetensors

--error-budget E: the fastest scheme whose wire format's relative error ||Q(g) - g|| / ||g|| is at
most E, measured on --grads (a trace saved by gradcomp grads --save-trace) or, without it, on
Gaussian values (real gradients are heavier-tailed: rotated formats lose less on them than the
others do); the hook's policy does the same per bucket with PolicyConfig(error_budget=E).

units: bandwidth in bits (10gbit, 100mbit, 10Gb/s, 10gbps) or bytes (25GB/s, 1GiB/s);
latency in ns, us, ms or s (5us); counts as 7e9, 7B, 350M.

The codec's own cost is measured on this machine by default (the kernels the hook runs here, a few seconds);
on GPUs pass the GPU's figure with --codec-throughput, or run it on the GPU machine to time the
fused kernels here.
"""


def register(subparsers) -> None:
    """Add the ``cost`` subcommand."""
    from gradcomp.cli._units import parse_bandwidth, parse_count, parse_duration
    from gradcomp.codec.formats import format_names

    p = subparsers.add_parser(
        "cost",
        help="predict time and bytes per step of fp32/bf16 ring, tree and quantized all-reduce",
        description=textwrap.fill(
            "Predict the communication time and bytes of one gradient all-reduce per step for "
            "ring/tree all-reduce in fp32, bf16 and fp16, gradcomp's two-phase quantized exchange in "
            f"every wire format ({', '.join(format_names())}), all-gather based int8, and the hierarchical mode, with a latency-bandwidth "
            "model; print the bandwidth below which each compressed scheme beats fp32 ring all-reduce.",
            90,
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--params", required=True, metavar="N", type=arg_type(lambda s: parse_count(s, "--params"), "count"),
                   help="gradient elements all-reduced per step, e.g. 7e9, 7B, 350M")
    p.add_argument("--workers", required=True, type=int_in(1, 10**6), metavar="P", help="ranks in the all-reduce")
    p.add_argument("--bandwidth", required=True, metavar="RATE", type=arg_type(lambda s: parse_bandwidth(s, "--bandwidth"), "rate"),
                   help="main link per direction: each node's NIC (or the link between workers of one node)")
    p.add_argument("--nodes", type=int_in(1, 10**6), default=None, metavar="M",
                   help="machines the workers are spread over (default: one worker per node)")
    p.add_argument("--latency", default="5us", metavar="TIME", type=arg_type(lambda s: parse_duration(s, "--latency"), "duration"),
                   help="per-message latency of the main link (default 5us)")
    p.add_argument("--intra-bandwidth", default="100GB/s", metavar="RATE",
                   type=arg_type(lambda s: parse_bandwidth(s, "--intra-bandwidth"), "rate"),
                   help="link between workers inside a node, when 1 < nodes < workers (default 100GB/s)")
    p.add_argument("--intra-latency", default="1us", metavar="TIME",
                   type=arg_type(lambda s: parse_duration(s, "--intra-latency"), "duration"),
                   help="per-message latency inside a node (default 1us)")
    p.add_argument("--block-size", type=hook_block_size, default=256, metavar="B", help="elements per fp32 scale (default 256)")
    p.add_argument("--chunk-numel", type=int, default=None, metavar="N",
                   help="values per pipelined chunk of the quantized exchange (default: the hook's own, "
                        "1048576 per worker); 0: no overlap of codec and wire")
    p.add_argument("--schemes", default=None, metavar="LIST",
                   help="comma-separated schemes, e.g. ring-fp32,twophase-int8,hier-int4 (default: all that apply)")
    codec = p.add_mutually_exclusive_group()
    codec.add_argument("--codec-throughput", default=None, metavar="RATE",
                       type=arg_type(lambda s: parse_bandwidth(s, "--codec-throughput"), "rate"),
                       help="codec speed in fp32 input bytes per second, e.g. 200GB/s for a GPU")
    codec.add_argument("--measure-codec", choices=("fused", "eager"), default="fused",
                       help="measure the codec here with the hook's kernels (fused: native on CPU, compiled on CUDA; "
                            "the default) or the eager reference ones")
    codec.add_argument("--no-codec", action="store_true", help="leave the codec's compute time out")
    p.add_argument("--error-budget", type=float_in(0, 10, lo_open=True), default=None, metavar="E",
                   help="advise the fastest scheme whose format's relative error is at most E (e.g. 0.2)")
    p.add_argument("--grads", default=None, metavar="TRACE", type=existing_file,
                   help="--error-budget: measure the formats' errors on these gradients (gradcomp grads --save-trace)")
    p.add_argument("--plot", default=None, metavar="PNG", type=out_file(".png"), help="write a plot of time against --sweep to this PNG")
    p.add_argument("--sweep", choices=("bandwidth", "workers"), default="bandwidth",
                   help="x axis of --plot (default bandwidth)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _parse_schemes(text):
    from gradcomp.analysis.costmodel import parse_scheme

    if text is None:
        return None
    names = [s for s in (t.strip() for t in text.split(",")) if s]
    if not names:
        raise CliError(f"--schemes must name at least one scheme, got {text!r}")
    try:
        return [parse_scheme(n) for n in names]
    except ValueError as exc:
        raise CliError(f"--schemes: {exc}") from None


def _chunk_numel(args):
    """The chunk size the model pipelines with: ``--chunk-numel``, else the hook's default for this many workers."""
    from gradcomp.comm.plan import chunk_numel_for

    if args.chunk_numel is None:
        return chunk_numel_for(args.workers)
    if args.chunk_numel < 0:
        raise CliError(f"--chunk-numel must be >= 0 (0: no pipelining), got {args.chunk_numel}")
    return args.chunk_numel or None


def run(args) -> int:
    """Handle ``gradcomp cost``."""
    from gradcomp.analysis import costmodel as cm
    from gradcomp.cli._units import format_bandwidth, format_bytes, format_duration

    try:
        cluster = cm.Cluster(
            workers=args.workers,
            bandwidth=args.bandwidth,
            latency=args.latency,
            nodes=args.nodes,
            intra_bandwidth=args.intra_bandwidth,
            intra_latency=args.intra_latency,
        )
    except ValueError as exc:
        raise CliError(f"--workers/--nodes: {exc}") from None
    schemes = _parse_schemes(args.schemes)
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise CliError(f"--plot must name a .png file, got {args.plot!r}")
    if args.plot is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        raise CliError(f"--plot: the folder of {args.plot!r} does not exist")

    device = None
    if args.no_codec:
        tp = None
    elif args.codec_throughput is not None:
        tp = cm.CodecThroughput.from_bytes_per_s(args.codec_throughput, source="given (--codec-throughput)")
    else:
        import torch

        from gradcomp.codec import kernels
        from gradcomp.comm.measure import measure_hook_codec

        device = "cuda" if torch.cuda.is_available() else "cpu"
        fused = args.measure_codec == "fused"
        kernels.prepare(device, fused=fused)  # on CUDA the kernels compile first (20-30 s)
        tp = measure_hook_codec(8, args.block_size, 1 << 22, args.workers, repeats=5, fused=fused, device=device,
                                chunk_numel=_chunk_numel(args))
    codec_origin, codec_lines = codec_provenance(args, tp, device)

    chunk = _chunk_numel(args)
    estimates = cm.compare(args.params, cluster, schemes, tp, args.block_size, chunk)
    errors, sample_from = _format_errors(args, estimates) if args.error_budget is not None else ({}, None)
    base = cm.estimate(cm.Scheme.plain(), args.params, cluster, tp, args.block_size)
    rows = []
    for e in estimates:
        be = cm.break_even_bandwidth(e.scheme, args.params, cluster, tp, args.block_size, chunk_numel=chunk)
        rows.append((e, be))

    if args.plot is not None:
        from gradcomp.plots.costmodel import plot_cost_sweep

        if args.sweep == "bandwidth":
            # cover two decades either side of the given bandwidth, and every finite break-even point
            finite = [be for _, be in rows if 0 < be < math.inf]
            lo = math.log10(min([cluster.bandwidth / 100] + [be / 3 for be in finite]))
            hi = math.log10(max([cluster.bandwidth * 100] + [be * 3 for be in finite]))
            values = [10 ** (lo + (hi - lo) * i / 40) for i in range(41)]
        else:
            # keep the workers per node; start at two nodes (one node is a different network)
            step = cluster.per_node if cluster.nodes not in (None, 1) else 1
            values = sorted({2 * step * (2**k) for k in range(0, 9)} | {args.workers})
        curves = cm.sweep(args.params, cluster, args.sweep, values, [e.scheme for e in estimates], tp, args.block_size, chunk)
        plot_cost_sweep(
            curves,
            args.sweep,
            args.plot,
            title=(f"{format_bytes(args.params).replace('B', '').strip()} params, {args.workers} workers"
                   f"{'' if args.nodes is None else f' on {args.nodes} nodes'}, {format_bandwidth(cluster.bandwidth)}, "
                   f"{format_duration(cluster.latency)} latency"),
            break_even={e.scheme: be for e, be in rows if e.scheme != "ring-fp32"} if args.sweep == "bandwidth" else None,
        )

    if args.json:
        print_json({
            "params": args.params,
            "cluster": {
                "workers": cluster.workers, "nodes": cluster.num_nodes, "bandwidth_bytes_per_s": cluster.bandwidth,
                "latency_s": cluster.latency, "intra_bandwidth_bytes_per_s": cluster.intra_bandwidth,
                "intra_latency_s": cluster.intra_latency,
            },
            "block_size": args.block_size,
            "codec": None if tp is None else {
                "quantize_elements_per_s": tp.quantize_eps, "dequantize_elements_per_s": tp.dequantize_eps, "source": tp.source,
                "origin": codec_origin,
            },
            "schemes": [
                dict(e.to_dict(), speedup_vs_ring_fp32=(base.total_s / e.total_s if e.total_s > 0 else None),
                     break_even_bandwidth_bytes_per_s=None if e.scheme == "ring-fp32" else be,
                     **({"rel_error": _scheme_error(cm, e.scheme, errors)} if args.error_budget is not None else {}))
                for e, be in rows
            ],
            "error_budget": None if args.error_budget is None else {
                "budget": args.error_budget, "errors_on": sample_from,
                "fastest_within": getattr(cm.fastest_within(estimates, errors, args.error_budget), "scheme", None),
            },
            "plot": args.plot,
        })
        return EXIT_OK

    table = []
    for e, be in rows:
        table.append({
            "scheme": e.scheme,
            "bytes/rank": format_bytes(e.bytes_per_rank),
            "NIC bytes": format_bytes(e.wire_bytes),
            "latency": format_duration(e.latency_s),
            "wire": format_duration(e.wire_s),
            "intra": format_duration(e.intra_s),
            "codec": format_duration(e.compute_s),
            "total": format_duration(e.total_s),
            "vs ring-fp32": f"{base.total_s / e.total_s:.2f}x" if e.total_s > 0 else "-",
            "pays below": "-" if e.scheme == "ring-fp32" else format_bandwidth(be),
        })
        if args.error_budget is not None:
            err = _scheme_error(cm, e.scheme, errors)
            table[-1]["rel. error"] = "0 (exact)" if err == 0 else f"{err:.3g}" + ("" if err <= args.error_budget else " (over)")
    nodes = "" if args.nodes is None else f" on {cluster.num_nodes} nodes ({cluster.per_node} per node)"
    print(f"{args.params:.4g} parameters, {cluster.workers} workers{nodes}, "
          f"{format_bandwidth(cluster.bandwidth)}, {format_duration(cluster.latency)} latency")
    for line in codec_lines:
        print(line)
    print()
    print(format_table(table))
    print()
    best = min(estimates, key=lambda e: e.total_s)
    print(f"fastest here: {best.scheme} ({format_duration(best.total_s)} per step, "
          f"{base.total_s / best.total_s if best.total_s > 0 else float('inf'):.2f}x ring-fp32)")
    if args.error_budget is not None:
        ok = cm.fastest_within(estimates, errors, args.error_budget)
        print(f"fastest within the error budget {args.error_budget:g} (relative error on {sample_from}): {ok.scheme} "
              f"({format_duration(ok.total_s)} per step, {base.total_s / ok.total_s if ok.total_s > 0 else float('inf'):.2f}x ring-fp32)")
    print("'pays below': the main-link bandwidth under which the scheme beats ring-fp32 "
          "('any' = at every bandwidth, 'never' = at none).")
    if args.plot is not None:
        print(f"plot: {args.plot}")
    return EXIT_OK


def _format_errors(args, estimates):
    """``({format name: relative error}, what they were measured on)`` for the quantized schemes of ``estimates``."""
    from gradcomp.analysis import costmodel as cm

    formats = {}
    for e in estimates:
        scheme = cm.parse_scheme(e.scheme)
        if scheme.quantized:
            formats[scheme.format.name] = scheme.format
    sample, origin = None, "2**20 Gaussian values"
    if args.grads is not None:
        from gradcomp.analysis.capture import GradientTrace

        try:
            trace = GradientTrace.load(args.grads)
        except (OSError, ValueError, KeyError) as exc:
            raise CliError(f"--grads {args.grads}: expected a gradient trace saved by gradcomp grads --save-trace: {exc}") from None
        sample, origin = trace.grads.reshape(trace.steps * trace.workers, -1), f"the gradients of {args.grads}"
        sample = sample[:, : sample.shape[1] // args.block_size * args.block_size]
    try:
        return cm.format_errors(formats.values(), sample, args.block_size), origin
    except ValueError as exc:
        raise CliError(f"--grads: {exc}") from None


def _scheme_error(cm, scheme: str, errors) -> float:
    """The relative error a scheme's format makes (0 for a float scheme)."""
    s = cm.parse_scheme(scheme)
    return errors[s.format.name] if s.quantized else 0.0


def codec_provenance(args, tp, device):
    """Say where the codec throughput came from: ``(origin, lines to print)``.

    ``origin`` is ``"none"`` (``--no-codec``), ``"given"`` (``--codec-throughput``: an assumption,
    not a measurement) or ``"measured-<device>-<fused|eager>"``. The lines name the figure, its
    origin and, for a CPU measurement, what it implies: a CPU codec is far slower than a GPU's, so
    a CPU figure makes compression look slow for GPU training.
    """
    if tp is None:
        return "none", ["codec: not counted (--no-codec): only the wire and the latency are modelled"]
    rate = f"{tp.quantize_eps * 4 / 1e9:.3g} GB/s quantize, {tp.dequantize_eps * 4 / 1e9:.3g} GB/s dequantize"
    if args.codec_throughput is not None:
        return "given", [f"codec: {rate} of fp32 input, ASSUMED (given with --codec-throughput), not measured here"]
    which = args.measure_codec
    origin = f"measured-{device}-{which}"
    lines = [f"codec: {rate}, MEASURED on this machine's {device.upper()} [{tp.source}]"]
    if device == "cpu":
        if which == "eager":
            lines.append("note: the eager kernels are the hook's slow reference (fused=False); it runs the fused ones "
                         "(the default --measure-codec fused times those)")
        lines.append("note: a CPU codec; for GPU training give the GPU's codec throughput with --codec-throughput "
                     "(e.g. 500GB/s), or compression will look slower than it is there")
    return origin, lines
