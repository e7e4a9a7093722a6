"""Time the codec work of one FSDP2 step of the comm-bound preset's root module, eager against fused.

The root module of TinyGPT 'comm17m' holds 17.2M of its 17.6M parameters. On P = 2 ranks each
step runs, per rank: the reduce-scatter's ``exchange.encode`` (the whole gradient plus the
residual) and ``exchange.decode_sum`` (this rank's row), the weight all-gather's ``exchange.encode``
(this rank's shard) and ``exchange.decode`` (every shard). One process, one thread, no
communication; median of 5 calls after one untimed call. Also the reduce-scatter's encode with its
error feedback (residual in, new residual committed), fused kernels: for the full row every call,
for a row without the token embedding every call (a frozen parameter: the residuals stay in that
row's layout), and for the two in turn (a branch taken every other step: each call moves the
residuals of the row's parameters between the layouts)::

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
    res, spare = mod.residuals(rs.plan, cpu)
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
    part = (0, 2, 3, 4)  # every parameter but the token embedding
    prow = sum(segs[i] for i in part)
    ps = mod.entry("rs", prow, P, 8, B, cpu, part)
    pgrad = torch.randn(P * prow)

    def encode_ef(entry, x, present):
        r, r_out = mod.residuals(entry.plan, cpu, present)
        exchange.encode(entry.plan, entry.bufs, 0, x, residual=r, residual_out=r_out, fused=True)
        mod.commit_residual(torch.tensor(True))

    full_ef = timed(lambda: encode_ef(rs, grad, None))
    part_ef = timed(lambda: encode_ef(ps, pgrad, part))

    def in_turn():
        encode_ef(rs, grad, None)
        encode_ef(ps, pgrad, part)

    turn_ef = timed(in_turn)
    result["error feedback"] = {
        "encode + commit, full row": full_ef,
        "encode + commit, row without the token embedding": part_ef,
        "per value, row without the token embedding / full row": (part_ef / prow) / (full_ef / row),
        "the two in turn, per pair": turn_ef,
        "in turn / each alone": turn_ef / (full_ef + part_ef),
    }
    result["clone() of the fp32 gradient"] = timed(lambda: grad.clone())
    result["copy_() of the fp32 gradient"] = timed(lambda: full.copy_(grad))
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else {a: round(b, 2) for a, b in v.items()}) for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
