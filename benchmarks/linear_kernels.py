"""Time QuantizedLinear's routes side by side against fp32 ``F.linear`` (CPU, one thread, one run).

    python benchmarks/linear_kernels.py [--size 4096] [--repeats 10] [--threads 1]

Each row pins the route it names (``layer.route``); by default a layer runs the route measured
fastest on the machine (``gradcomp.quant.routes``, timed per layer by ``gradcomp weights kernels``
and ``benchmarks/toolkit_inference.py``). Routes: the fp32 layer; the packed layer's dequantize-then-``F.linear`` route (what every packed layer
did before the kernels); the weight-only kernels (int8 per channel, int4 g128 and g32; bf16
activations inside, fp32 in and out, ``compute_dtype=torch.bfloat16``); and dynamic W8A8 with
``torch._int_mm``. Batches 1 and 8 are memory-bound (the weight is read once per call), 256 is
compute-bound. Each figure is the median of ``--repeats`` calls after two warm-up calls; ratios are
fp32 time over route time (above 1: faster than fp32), so load from other jobs on the machine
mostly cancels out. Prints a markdown table; not a test, never fails on a timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

import gradcomp.quant as q
from gradcomp.quant.activation_quant import prepare_activation_quant_, remove_activation_quant_
from gradcomp.quant.configs import ActQuantConfig


def _time(fn, repeats: int) -> float:
    fn()
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.size
    base = nn.Sequential(nn.Linear(n, n)).eval()

    def quantized(cfg, compute_dtype=torch.bfloat16, use_kernels=True, route=None):
        m = nn.Sequential(nn.Linear(n, n))
        m.load_state_dict(base.state_dict())
        q.quantize_(m, cfg)
        m[0].compute_dtype = compute_dtype
        m[0].use_kernels = use_kernels
        m[0].route = route          # each row times the kernel it names (pinned, not measured)
        return m.eval()

    int8 = q.WeightQuantConfig(bits=8)
    g128 = q.WeightQuantConfig(bits=4, granularity="per_group", group_size=128)
    g32 = q.WeightQuantConfig(bits=4, granularity="per_group", group_size=32)
    routes = [
        ("int8 dequantize + F.linear (previous route)", quantized(int8, None, False), False),
        ("int8 weight-only kernel", quantized(int8, route="int8_weight"), False),
        ("int4 g128 dequantize + F.linear (previous route)", quantized(g128, None, False), False),
        ("int4 g128 weight-only kernel", quantized(g128, route="int4_weight"), False),
        ("int4 g32 weight-only kernel", quantized(g32, route="int4_weight"), False),
        ("W8A8 dynamic, fake quant (previous route)", quantized(int8, None, False), True),
        ("W8A8 dynamic, _int_mm", quantized(int8, None, True, route="int8_dynamic"), True),
    ]
    act = ActQuantConfig(bits=8, dynamic=True, granularity="per_token", symmetric=True)
    for _, m, w8a8 in routes:
        if w8a8:
            prepare_activation_quant_(m, act)
    print(f"# QuantizedLinear {n}x{n}, {args.threads} thread(s), median of {args.repeats}; torch {torch.__version__}\n")
    print("| batch | route | ms | fp32 ms | speed vs fp32 | rel. error vs fp32 |")
    print("|---:|---|---:|---:|---:|---:|")
    with torch.no_grad():
        for batch in (1, 8, 256):
            x = torch.randn(batch, n)
            t32 = _time(lambda: base(x), args.repeats)
            ref = base(x)
            for name, m, w8a8 in routes:
                if batch == 256 and not w8a8 and "kernel" not in name:
                    continue
                if batch < 256 and w8a8:
                    continue
                t = _time(lambda: m(x), args.repeats)
                err = float((m(x) - ref).norm() / ref.norm())
                print(f"| {batch} | {name} | {1e3 * t:.2f} | {1e3 * t32:.2f} | {t32 / t:.2f}x | {err:.2e} |")
    for _, m, w8a8 in routes:
        if w8a8:
            remove_activation_quant_(m)
    fp32_activation_kernels(args.repeats)


def fp32_activation_kernels(repeats: int) -> None:
    """Time the weight-only kernels fed fp32 activations (no bf16 rounding) against F.linear, at batch 1.

    These are the only torch 2.13 CPU kernels that multiply fp32 activations by int8 / int4 weights
    without a dense copy; the measured routes would take them if they beat the fp32 product.
    """
    print("\n# weight-only kernels with fp32 activations, batch 1\n")
    print("| layer | F.linear ms | _weight_int8pack_mm ms | speed | _weight_int4pack_mm_for_cpu ms (g128) | speed |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, k in ((384, 384), (1536, 384), (4096, 4096)):
        x, w = torch.randn(1, k), torch.randn(n, k)
        w8, s8 = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n)
        w4 = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
        sz = torch.rand(k // 128, n, 2)
        t32 = _time(lambda: torch.nn.functional.linear(x, w), repeats)
        t8 = _time(lambda: torch._weight_int8pack_mm(x, w8, s8), repeats)
        t4 = _time(lambda: torch._weight_int4pack_mm_for_cpu(x, w4, 128, sz), repeats)
        print(f"| {n}x{k} | {1e3 * t32:.4f} | {1e3 * t8:.4f} | {t32 / t8:.2f}x | {1e3 * t4:.4f} | {t32 / t4:.2f}x |")


if __name__ == "__main__":
    main()
