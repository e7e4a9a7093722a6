"""Compare the compiled exchange kernels with the eager ones bit for bit, over many variants in one process.

Run:
    python scripts/check_compiled_kernels.py                       # one thread, every variant, shuffled
    python scripts/check_compiled_kernels.py --threads 2 --seed 3 --bits 4 2

Each call runs :func:`gradcomp.codec.encode_blocks`, :func:`~gradcomp.codec.reduce_blocks` or
:func:`~gradcomp.codec.decode_blocks` (with ``out=``) twice on the same inputs, eagerly and with
``compiled=True``, and compares every output (codes, scales, residuals, the decoded values) bit for bit.
The variants: 8/4/2 bits; no residual, a residual updated out of place, in place (the same view) or
through two views of one buffer; stochastic rounding on/off; rows of blocks from 1 to the policy's chunk
sizes; fp32 and bf16 buckets. They run in a shuffled order in one process, because Dynamo's caches
(recompiles for another width, aliasing guards) are where miscompiles showed. Exit status 1 on any
difference, with the variants that differ and the calls before them.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time

import torch

from gradcomp import codec

B = 256


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _inputs(kind: str, bits: int, rows: int, res: str, noise: bool, dtype, seed: int, p: int = 3):
    g = torch.Generator().manual_seed(seed)
    nbytes = B * bits // 8
    x = (torch.randn(rows, B, generator=g) * torch.rand(rows, 1, generator=g) * 4).to(dtype)
    codes = torch.randint(0, 256, (p, rows, nbytes), dtype=torch.uint8, generator=g)
    scale = torch.rand(p, rows, generator=g)
    base = torch.randn(2 * rows * B, generator=g) * 1e-2
    if res == "none":
        rin = rout = None
    elif res == "apart":
        rin, rout = base[: rows * B].view(rows, B), torch.full((rows, B), float("nan"))
    elif res == "inplace":
        rin = rout = base[: rows * B].view(rows, B)
    else:  # two view objects of the same memory, as exchange.encode passes an in-place residual
        rin, rout = base.view(-1, B)[:rows], base.view(-1, B)[:rows]
    nz = torch.rand(rows, B, generator=g) if noise else None
    return dict(x=x, codes=codes, scale=scale, rin=rin, rout=rout, noise=nz, base=base)


def run_variant(kind: str, bits: int, rows: int, res: str, noise: bool, dtype, seed: int) -> list:
    """Run one variant eagerly and compiled; return the names of the outputs that differ."""
    outs = []
    for compiled in (False, True):
        t = _inputs(kind, bits, rows, res, noise, dtype, seed)
        if kind == "encode":
            c, s = codec.encode_blocks(t["x"], bits, residual=t["rin"], residual_out=t["rout"], noise=t["noise"], compiled=compiled)
            got = {"codes": c, "scale": s}
        elif kind == "reduce":
            c, s = codec.reduce_blocks(t["codes"], t["scale"], bits, residual=t["rin"], residual_out=t["rout"], noise=t["noise"], compiled=compiled)
            got = {"codes": c, "scale": s}
        else:
            out = torch.full((rows, B), float("nan"), dtype=dtype)
            got = {"decoded": codec.decode_blocks(t["codes"][0], t["scale"][0], bits, out=out, compiled=compiled)}
        if t["rout"] is not None:
            got["residual_out"] = t["rout"]
            got["residual_buffer"] = t["base"]
        outs.append(got)
    return [k for k in outs[0] if not _same(outs[0][k], outs[1][k])]


def variants(bits_list, rows_list):
    """Every variant of the hook's calls (kind, bits, rows, residual, noise, dtype)."""
    out = []
    for kind, bits, rows in itertools.product(("encode", "reduce", "decode"), bits_list, rows_list):
        if kind == "decode":
            out += [(kind, bits, rows, "none", False, d) for d in (torch.float32, torch.bfloat16)]
            continue
        for res, noise in itertools.product(("none", "apart", "inplace", "views"), (False, True)):
            dtypes = (torch.float32, torch.bfloat16) if kind == "encode" and res == "apart" and not noise else (torch.float32,)
            out += [(kind, bits, rows, res, noise, d) for d in dtypes]
    return out


def main(argv=None) -> int:
    """Run the variants in a shuffled order; print the differing ones; return 1 if any."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    # 1 and 2 rows (specialised shapes), a ragged count, the policy's default chunk (4096 blocks) and shard
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 7, 2048, 4096])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="run only the first N variants of the shuffled order")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # every variant gets its own graph here (past Dynamo's default limit of 8 a kernel would quietly run eagerly)
    torch._dynamo.config.recompile_limit = 256
    todo = variants(args.bits, args.rows)
    random.Random(args.seed).shuffle(todo)
    if args.limit:
        todo = todo[: args.limit]
    bad, done = [], []
    t0 = time.perf_counter()
    for i, v in enumerate(todo):
        diff = run_variant(*v, seed=i)
        name = f"{v[0]} {v[1]}-bit rows={v[2]} residual={v[3]} noise={v[4]} {str(v[5]).replace('torch.', '')}"
        done.append(name)
        if diff:
            bad.append((name, diff, list(done[:-1])))
            print(f"DIFFERS: {name}: {', '.join(diff)}", flush=True)
    print(f"{len(todo)} variants, {len(bad)} differ, {time.perf_counter() - t0:.0f} s, {args.threads} thread(s)")
    for name, diff, before in bad:
        print(f"  {name} ({', '.join(diff)}) after: {'; '.join(before[-6:])}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
