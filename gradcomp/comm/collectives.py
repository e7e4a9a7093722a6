"""Quantized collectives: a two-phase (reduce-scatter + all-gather) all-reduce whose bytes shrink with the bits.

The exchange, for a flat tensor of N elements on P ranks (:class:`~gradcomp.comm.plan.ShardLayout` gives the sizes):

1. Pad to ``P * shard`` elements, ``shard`` a whole number of blocks; quantize every block
   (``x + worker_residual`` with error feedback).
2. All-to-all: rank r sends shard k (packed codes, then its fp32 scales) to rank k.
3. Rank k dequantizes the P copies of its shard and sums them in rank order 0..P-1, then divides by P.
4. Rank k requantizes its reduced shard (``+ server_residual`` with error feedback).
5. All-gather: every rank receives every reduced shard and dequantizes the lot.

Bytes sent per rank: ``2 (P - 1)`` shard messages, each the shard's codes and scales as its
:class:`~gradcomp.codec.formats.WireFormat` lays them out (``shard * bytes_per_value(B)``, e.g.
``shard * (bits / 8 + 4 / B)`` for the int formats), i.e. about ``2 (P-1)/P * N * bytes_per_value``:
0.254x of an fp32 ring all-reduce for int8 and 0.129x for int4 with ``B = 256``, at any P.
Every rank dequantizes the same gathered bytes with the same code, so all ranks end bit-identical.

A non-finite value anywhere makes the owning block's reduced scale non-finite; that scale reaches every
rank in step 5, so every rank sees a non-finite result and ``finite`` is False on all of them.

The steps themselves (encode, reduce_shard, decode, with chunks and message headers) live in
:mod:`gradcomp.comm.exchange`, the plan in :mod:`gradcomp.comm.plan`; :func:`quantized_allreduce` is a
blocking convenience over them for one flat tensor. Each message also carries a 16-byte header
(:data:`gradcomp.codec.formats.HEADER_BYTES`), counted in ``bytes_sent``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from gradcomp.comm import exchange
from gradcomp.comm.buffers import ExchangeBuffers
from gradcomp.comm.plan import ExchangePlan, ShardLayout

__all__ = ["ExchangeResult", "quantized_allreduce"]


@dataclass
class ExchangeResult:
    """Outcome of :func:`quantized_allreduce` on this rank.

    Attributes:
        out: fp32 mean over ranks, shape ``(numel,)``, identical on every rank.
        worker_residual: new worker residual ``(padded_numel,)`` (fp32), or None without error feedback.
        server_residual: new residual of the owned shard ``(shard_numel,)``, or None.
        finite: whether every rank's input was finite (same answer on every rank).
        bytes_sent: bytes this rank sent.
        rel_error: ``||x + r - Q(x + r)|| / ||x + r||`` of this rank's first quantization when asked for.
        messages: with ``dequantize_out=False``, the gathered reduced shards as uint8
            ``(P, message_bytes)`` (codes then fp32 scales), and ``out`` is None.
    """

    out: Optional[torch.Tensor]
    worker_residual: Optional[torch.Tensor]
    server_residual: Optional[torch.Tensor]
    finite: bool
    bytes_sent: int
    rel_error: Optional[float] = None
    messages: Optional[torch.Tensor] = None


def quantized_allreduce(
    x: torch.Tensor,
    layout: ShardLayout,
    group,
    *,
    worker_residual: Optional[torch.Tensor] = None,
    server_residual: Optional[torch.Tensor] = None,
    error_feedback: bool = True,
    noise: Optional[Callable[[int, tuple], torch.Tensor]] = None,
    measure_error: bool = False,
    fused: bool = True,
    dequantize_out: bool = True,
) -> ExchangeResult:
    """Average ``x`` over the ranks of ``group`` with the two-phase quantized exchange.

    Args:
        x: flat floating tensor of ``layout.numel`` elements (fp32, fp16 or bf16), or an fp32
            tensor of ``layout.padded_numel`` elements already padded with zeros (used as is).
        layout: the sizes of the exchange; ``layout.world_size`` must be the group's size.
        group: the process group to run the all-to-all and the all-gather on.
        worker_residual: fp32 ``(padded_numel,)`` residual from earlier steps (zeros if None).
        server_residual: fp32 ``(shard_numel,)`` residual of this rank's shard (zeros if None).
        error_feedback: return the new residuals (else they are None).
        noise: ``noise(phase, shape)`` gives ``U[0, 1)`` noise for stochastic rounding (phase 0 or 1).
        measure_error: compute ``rel_error`` (costs two extra reductions).
        fused: run the fused codec kernels (bit-identical to the eager reference).
        dequantize_out: dequantize the gathered shards into ``out``; False returns them as
            ``messages`` instead (the hierarchical exchange forwards them inside the node first).

    Returns:
        An :class:`ExchangeResult`; residuals are returned, not updated in place, so the caller can
        keep the old ones when ``finite`` is False.
    """
    P, B = layout.world_size, layout.block_size
    if x.numel() not in (layout.numel, layout.padded_numel):
        raise ValueError(
            f"x must have layout.numel={layout.numel} (or padded_numel={layout.padded_numel}) elements, got {x.numel()}"
        )
    plan = ExchangePlan.build((x.numel(),), P, layout.format, B, chunk_numel=None)
    bufs = ExchangeBuffers.allocate(plan, x.device)
    x = x.reshape(-1)
    wres = sres = wnew = snew = None
    if error_feedback:
        wres = torch.zeros(plan.padded_numel, device=x.device) if worker_residual is None else worker_residual.reshape(-1)
        sres = torch.zeros(plan.server_numel, device=x.device) if server_residual is None else server_residual.reshape(-1)
        wnew, snew = torch.zeros_like(wres), torch.empty_like(sres)
    n0 = noise(0, (plan.padded_numel // B, B)).reshape(-1) if noise is not None else None
    n1 = noise(1, (plan.server_numel // B, B)).reshape(-1) if noise is not None else None
    out = torch.empty(x.numel(), dtype=torch.float32, device=x.device) if dequantize_out else None
    finite = exchange.allreduce(
        plan, bufs, x, group, residual=wres, residual_out=wnew, server_residual=sres, server_residual_out=snew,
        noise=n0, server_noise=n1, fused=fused, out=out, keep_messages=not dequantize_out,
    )
    rel_error = None
    if measure_error:
        err = wnew if error_feedback else None
        if err is None:
            deq = torch.empty(x.numel(), dtype=torch.float32, device=x.device)
            for c in range(len(plan.chunks)):
                exchange.decode(plan, bufs, c, deq, gathered=bufs.send[c], fused=fused)
            err_norm = float((x.float() - deq).norm())
            denom = float(x.float().norm())
        else:
            corrected = plan.to_aligned(x) + wres
            err_norm, denom = float(err.norm()), float(corrected.norm())
        rel_error = err_norm / denom if denom > 0 else 0.0
    return ExchangeResult(
        out=out[: layout.numel] if out is not None else None,
        worker_residual=wnew,
        server_residual=snew,
        finite=finite,
        bytes_sent=plan.bytes_sent,
        rel_error=rel_error,
        messages=None if dequantize_out else bufs.gathered[0].view(P, -1),
    )
