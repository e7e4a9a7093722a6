"""Time the codec work of one FSDP2 step of the comm-bound preset's root module, eager against fused.

The root module of TinyGPT 'comm17m' holds 17.2M of its 17.6M parameters. On P = 2 ranks each
step runs, per rank: the reduce-scatter's ``exchange.encode`` (the whole gradient plus the
residual) and ``exchange.decode_sum`` (this rank's row), the weight all-gather's ``exchange.encode``
(this rank's shard) and ``exchange.decode`` (every shard). One process, one thread, no
communication; median of 5 calls after one untimed call::

    python benchmarks/fsdp_codec.py

Prints milliseconds per call as JSON, with a ``clone()`` and a ``copy_()`` of the fp32 gradient
for scale. Timings on a shared machine are noisy; compare the lines of one invocation.
"""

from __future__ import annotations

import json
import time

import torch

from gradcomp.comm import exchange
from gradcomp.comm.fsdp_plan import ModuleComm


def main() -> None:
    """Time the four codec steps and print the table."""
    torch.set_num_threads(1)
    P, B = 2, 256
    # one rank's row of the root: half of the bigram table, token and position embeddings, final norm
    segs = (65536 * 256 // P, 256 * 256 // P, 64 * 256 // P, 256 // P, 256 // P)
    row = sum(segs)
    mod = ModuleComm("root", 0, segs)
    cpu = torch.device("cpu")
    rs, ag = mod.entry("rs", row, P, 8, B, cpu), mod.entry("ag", row, P, 8, B, cpu)
    grad, weights = torch.randn(P * row), torch.randn(row)
    res, spare = mod.residuals(rs.plan.padded_numel, cpu)
    out, full = torch.empty(row), torch.empty(P * row)

    def timed(fn, n: int = 5) -> float:
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * sorted(ts)[n // 2]

    result = {}
    for fused in (False, True):
        r = {
            "reduce-scatter encode (whole gradient + residual)": timed(
                lambda: exchange.encode(rs.plan, rs.bufs, 0, grad, residual=res, residual_out=spare, fused=fused)),
            "reduce-scatter decode_sum (this rank's row)": timed(
                lambda: exchange.decode_sum(rs.plan, rs.bufs, 0, 0, out, divide=P, fused=fused)),
            "all-gather encode (this rank's shard)": timed(lambda: exchange.encode(ag.plan1, ag.bufs1, 0, weights, fused=fused)),
            "all-gather decode (every shard)": timed(lambda: exchange.decode(ag.plan, ag.bufs, 0, full, fused=fused)),
        }
        r["total"] = sum(r.values())
        result["fused" if fused else "eager"] = r
    result["clone() of the fp32 gradient"] = timed(lambda: grad.clone())
    result["copy_() of the fp32 gradient"] = timed(lambda: full.copy_(grad))
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else {a: round(b, 1) for a, b in v.items()}) for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
