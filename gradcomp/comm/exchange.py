"""THE quantized exchange of a gradient bucket, as pure steps: encode, reduce_shard, decode_sum, decode.

Every user of the two-phase exchange calls these steps, never a copy of them: the DDP hook (pipelined,
:mod:`gradcomp.comm.pipeline`), the hierarchical exchange between nodes (:mod:`gradcomp.comm.hierarchical`),
the blocking :func:`allreduce`, the offline replay of captured gradients (:func:`exchange_local`) and
FSDP2's collectives (:mod:`gradcomp.comm.fsdp`: a reduce-scatter is encode, all-to-all,
:func:`decode_sum`; a weight all-gather is encode of the rank's shard, all-gather, decode).

How a bucket travels (``P`` ranks, blocks of ``B`` values, the scales the wire format says: one fp32
per block, or one e8m0 byte per 32 values; a rotating format rotates each block before encoding and
after decoding, so the residuals and the owner's sum live in the rotated space):

1. **Plan** (:class:`ExchangePlan`, once per bucket layout): every parameter starts on a block boundary
   (so a block's arithmetic never depends on how DDP grouped the parameters); the aligned blocks are cut
   into chunks of about ``chunk_numel`` values, a multiple of ``P`` blocks each, and each chunk into
   ``P`` shards; rank ``k`` owns shard ``k`` of every chunk. Runs of whole blocks are read straight from
   the bucket; only a parameter's ragged last block (and one-block runs) go through a small staging
   buffer.
2. **encode** (per chunk): ``bucket + worker residual`` is quantized straight into the send buffer
   (codes and scales where the all-to-all reads them), and the new residual is written in place.
3. all-to-all: shard ``k`` of the chunk goes to rank ``k``.
4. **reduce_shard**: the ``P`` received copies of the owned shard are dequantized, summed in rank order
   ``0..P-1``, divided by ``P``, requantized (``+ server residual``) straight into the all-gather message.
   (A reduce-scatter stops before requantizing: **decode_sum** writes the sum, divided or scaled as
   the caller's reduce op says, straight into the owned shard of an output.)
5. all-gather of the reduced shards.
6. **decode**: the gathered codes are dequantized straight into the bucket.

A message (one shard of one chunk) is ``codes | pad to 4 bytes | scales | pad | 16-byte header``; the
header (step, bucket index, chunk and the format's header id, bucket numel as int32) lets each receiver check that every
peer is at the same step and bucket (:func:`check_header`). Bytes each rank sends per chunk:
``2 (P - 1) * message_bytes``; over a bucket that is ``2 (P-1)/P * N * (bits/8 + 4/B)`` plus 32 (P-1)
header bytes per chunk: 0.254x of an fp32 ring all-reduce for int8 and 0.129x for int4 at ``B = 256``
(chunks hold a multiple of ``P`` blocks, so only the last one pads: the same padding as one shard cut).

Memory passes per bucket, fused kernels, int8, fp32 bucket and residuals, in units of one pass over
the fp32 bucket (4 bytes per value; codes are 1/4 of that):

* encode: read bucket 1 + read residual 1 + write residual 1 + write codes 1/4          = 3.25
* reduce_shard (the owned 1/P of the chunk): read P codes 1/4, read + write server
  residual 2/P, write codes 1/(4P)                                                      = 0.25 + 2.25/P
* decode: read codes 1/4 + write bucket 1                                               = 1.25
* decode_sum instead of reduce_shard and decode (a reduce-scatter): read P codes 1/4,
  write the owned shard 1/P                                                              = 0.25 + 1/P

Total 4.75 + 2.25/P passes: 5.9 at P=2, i.e. 23.5 bytes per value (19 + 9/P) with error feedback;
without error feedback encode is 1.25 and the total 2.75 + 0.25/P. At 4 and 2 bits the fused kernels
read and write one byte per code in a per-thread scratch, and the codes are packed (encode, reduce)
or unpacked (reduce, decode) by a few whole-row integer passes (:func:`gradcomp.codec.packing.pack_rows_into`):
about 6.5 bytes per value to pack 4-bit codes and 4.5 to unpack them, on top of the fp32 traffic. The staging of ragged blocks and
the message headers add a negligible amount; ``benchmarks/hook_path.py`` measures all of it against a
``clone()`` (2 passes). The eager reference kernels (``fused=False``) make several times
more passes (each torch op reads and writes its operands). Nothing of bucket size is allocated per step: the buffers
(:class:`ExchangeBuffers`) persist per bucket, and a route allocates only the message buffers its
steps touch (``need=``: a reduce-scatter has no all-gather buffers).

Every rank decodes the same gathered bytes with the same code, so all ranks end bit-identical; a
non-finite value anywhere makes its block's reduced scale non-finite, which every rank receives, so
``finite`` is the same on every rank.
"""


from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from gradcomp import codec
from gradcomp.codec import kernels
from gradcomp.codec.formats import format_of_header
from gradcomp.comm.buffers import ExchangeBuffers, message_views
from gradcomp.comm.plan import ExchangePlan, header_of

__all__ = [
    "HeaderMismatch",
    "encode",
    "reduce_shard",
    "decode_sum",
    "decode",
    "check_header",
    "all_gather_into",
    "allreduce",
    "exchange_local",
    "param_noise",
]


class HeaderMismatch(RuntimeError):
    """A peer sent a message of another step, bucket, chunk, size or width: the ranks are out of step."""



def all_gather_into(output: torch.Tensor, inp: torch.Tensor, group) -> None:
    """All-gather ``inp`` from every rank into ``output`` (``world_size * inp.numel()`` elements)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, inp, group=group)


def _rows(t: Optional[torch.Tensor], B: int) -> Optional[torch.Tensor]:
    return None if t is None else t.view(-1, B)


def encode(
    plan: ExchangePlan,
    bufs: ExchangeBuffers,
    c: int,
    bucket: torch.Tensor,
    *,
    residual: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    header: Tuple[int, int] = (0, 0),
    fused: bool = True,
) -> torch.Tensor:
    """Quantize chunk ``c`` of ``bucket`` (+ worker residual) straight into ``bufs.send[c]``.

    Args:
        plan, bufs: the bucket's plan and buffers.
        c: chunk index.
        bucket: the flat bucket (``plan.numel`` values; fp32, fp16 or bf16); only read.
        residual: fp32 ``(plan.padded_numel,)`` worker residual in the aligned layout, or None (no
            error feedback: no residual work at all).
        residual_out: where the new residual of this chunk's blocks goes (same layout; may be
            ``residual`` for an in-place update, or a second buffer to commit later).
        noise: fp32 ``U[0, 1)`` ``(plan.padded_numel,)`` in the aligned layout for stochastic rounding.
        header: ``(step, bucket index)`` written into every message's header.
        fused: run the fused kernels (native on CPU, compiled on CUDA; bit-identical to the eager reference).

    Returns:
        ``bufs.send[c]``: ``P`` messages, message ``k`` for rank ``k``.
    """
    ch = plan.chunks[c]
    B, fmt = plan.block_size, plan.format
    codes, scales, hdr = message_views(plan, ch, bufs.send[c], plan.world_size)
    rin, rout, nz = _rows(residual, B), _rows(residual_out, B), _rows(noise, B)
    if rin is not None and rout is None:
        raise ValueError("residual_out is needed with a residual (it may be the residual itself)")
    s = ch.shard_blocks
    for src, blk, nb in ch.full:
        k, r = divmod(blk, s)
        g = ch.block0 + blk
        codec.encode_blocks(
            bucket[src : src + nb * B].view(nb, B), fmt,
            residual=None if rin is None else rin[g : g + nb],
            residual_out=None if rin is None else rout[g : g + nb],
            noise=None if nz is None else nz[g : g + nb],
            codes_out=codes[k, r : r + nb], scale_out=scales[k, r : r + nb], fused=fused,
        )
    st = bufs.staging[c]
    if st is not None:
        nt = st.nt
        st.x.view(-1)[st.dst] = bucket[st.src].float()
        if rin is not None:
            torch.index_select(rin, 0, st.rows, out=st.res_in[:nt])
        if nz is not None:
            torch.index_select(nz, 0, st.rows, out=st.noise[:nt])
        codec.encode_blocks(
            st.x, fmt,
            residual=None if rin is None else st.res_in, residual_out=None if rin is None else st.res_out,
            noise=None if nz is None else st.noise, codes_out=st.codes, scale_out=st.scale, fused=fused,
        )
        if rin is not None:
            rout.index_copy_(0, st.rows, st.res_out[:nt])
        codes[st.shard, st.row] = st.codes[:nt]
        scales[st.shard, st.row] = st.scale[:nt]
    hdr.copy_(torch.tensor(header_of(plan, c, *header), dtype=torch.int32).expand_as(hdr))
    return bufs.send[c]


def check_header(plan: ExchangePlan, c: int, buf: torch.Tensor, step: int, bucket_index: int, what: str = "all-to-all") -> None:
    """Raise :class:`HeaderMismatch` if any of the ``P`` messages in ``buf`` is not for this step, bucket and chunk.

    A rank that is a step ahead (or behind), or reduces another bucket, would otherwise pair its
    codes with the wrong step's; the error names what each side sent.
    """
    ch = plan.chunks[c]
    _, _, hdr = message_views(plan, ch, buf, plan.world_size)
    want = list(header_of(plan, c, step, bucket_index))
    got = hdr.tolist()
    for rank, h in enumerate(got):
        if h != want:
            sent = format_of_header(h[2] & 0xFF)
            raise HeaderMismatch(
                f"ranks out of step in the {what}: rank {rank} sent step {h[0]}, bucket {h[1]}, chunk {h[2] >> 8}, "
                f"format {sent.name if sent is not None else f'id {h[2] & 0xFF} (unknown)'}, bucket numel {h[3]}; "
                f"this rank expected step {want[0]}, bucket {want[1]}, chunk {c}, format {plan.format.name}, "
                f"bucket numel {want[3]} (every rank must run the same steps and buckets in the same order)"
            )


def reduce_shard(
    plan: ExchangePlan,
    bufs: ExchangeBuffers,
    c: int,
    *,
    residual: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    header: Tuple[int, int] = (0, 0),
    fused: bool = True,
) -> torch.Tensor:
    """Average the ``P`` received copies of this rank's shard of chunk ``c`` into ``bufs.mine[c]``.

    Args:
        residual: fp32 ``(plan.server_numel,)`` server residual (this rank's shard of every chunk), or None.
        residual_out: where the new server residual goes (may be ``residual``).
        noise: fp32 ``U[0, 1)`` ``(plan.server_numel,)`` for stochastic rounding, or None.
        header: ``(step, bucket index)`` for the outgoing message.

    Returns:
        ``bufs.mine[c]``: the reduced shard's message, ready for the all-gather.
    """
    ch = plan.chunks[c]
    B, s = plan.block_size, ch.shard_blocks
    codes, scales, _ = message_views(plan, ch, bufs.recv[c], plan.world_size)
    mcodes, mscales, mhdr = message_views(plan, ch, bufs.mine[c], 1)
    rin, rout, nz = _rows(residual, B), _rows(residual_out, B), _rows(noise, B)
    if rin is not None and rout is None:
        raise ValueError("residual_out is needed with a residual (it may be the residual itself)")
    r0 = ch.server_row0
    codec.reduce_blocks(
        codes, scales, plan.format,
        residual=None if rin is None else rin[r0 : r0 + s], residual_out=None if rin is None else rout[r0 : r0 + s],
        noise=None if nz is None else nz[r0 : r0 + s], codes_out=mcodes[0], scale_out=mscales[0], fused=fused,
    )
    mhdr.copy_(torch.tensor(header_of(plan, c, *header), dtype=torch.int32).view(1, 4))
    return bufs.mine[c]


def decode_sum(
    plan: ExchangePlan,
    bufs: ExchangeBuffers,
    c: int,
    rank: int,
    out: torch.Tensor,
    *,
    offset: int = 0,
    received: Optional[torch.Tensor] = None,
    divide: int = 1,
    factor: Optional[float] = None,
    fused: bool = True,
) -> torch.Tensor:
    """Decode the ``P`` received copies of shard ``rank`` of chunk ``c`` and sum them, without requantizing.

    The reduce-scatter's last step (FSDP's gradient reduce-scatter ends here; :func:`reduce_shard`
    goes on to requantize for an all-gather, with the same sum in its fused kernel):

    1. copy ``p`` of the shard (codes and fp32 scales of message ``p`` of the all-to-all's output) is
       dequantized in fp32;
    2. the copies are summed in rank order ``0..P-1``, divided by ``divide`` and multiplied by
       ``factor``;
    3. each value is written, cast to ``out``'s dtype, at its bucket position minus ``offset``: the
       runs of whole blocks straight into ``out``, a parameter's ragged last block through a small
       staging buffer. Only shard ``rank``'s values are written.

    Example: FSDP's buffer of ``P`` rows of ``row`` values is planned as ``P`` copies of the row's
    parameters, so shard ``k`` is bucket positions ``k * row .. (k + 1) * row``; with
    ``out = output_row`` and ``offset = k * row`` rank ``k`` writes its output row.

    Args:
        plan, bufs: the bucket's plan and buffers (``recv`` is read unless ``received`` is given).
        c: chunk index.
        rank: the shard to decode (this rank's index in the exchange's group).
        out: flat tensor of any float dtype covering the shard's bucket positions minus ``offset``.
        offset: bucket position of ``out[0]``.
        received: the ``P`` messages of the all-to-all (default ``bufs.recv[c]``).
        divide: the sum is divided by this positive int (``P`` for a mean).
        factor: the result is multiplied by it (in fp32, before the cast), or None.
        fused: run the fused kernels (native on CPU, compiled on CUDA; bit-identical to the eager reference).

    Returns:
        A 0-dim bool tensor: whether every received scale is finite. A non-finite value in any copy
        makes its block non-finite in ``out``.
    """
    ch = plan.chunks[c]
    B, fmt, s, P = plan.block_size, plan.format, ch.shard_blocks, plan.world_size
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < P:
        raise ValueError(f"rank must be an int in [0, {P}), got {rank!r}")
    codes, scales, _ = message_views(plan, ch, bufs.recv[c] if received is None else received, P)
    f = None if factor is None else torch.tensor(float(factor), dtype=torch.float32, device=codes.device)
    lo = rank * s
    for src, blk, nb in ch.full:
        if lo <= blk < lo + s:
            r, o = blk - lo, src - offset
            codec.decode_sum_blocks(
                codes[:, r : r + nb], scales[:, r : r + nb], fmt, out=out[o : o + nb * B].view(nb, B),
                divide=divide, factor=f, fused=fused,
            )
    pick = bufs.shard_pick(c, rank)
    if pick is not None:
        m = pick.rows.numel()
        pick.codes[:, :m] = codes[:, pick.rows]
        pick.scale[:, :m] = scales[:, pick.rows]
        codec.decode_sum_blocks(pick.codes, pick.scale, fmt, out=pick.out, divide=divide, factor=f, fused=fused)
        out[pick.src - offset] = pick.out.view(-1)[pick.dst].to(out.dtype)
    return kernels.scales_finite(scales, fmt)


def decode(
    plan: ExchangePlan,
    bufs: ExchangeBuffers,
    c: int,
    bucket: torch.Tensor,
    *,
    gathered: Optional[torch.Tensor] = None,
    fused: bool = True,
) -> torch.Tensor:
    """Dequantize the gathered messages of chunk ``c`` straight into ``bucket`` (in place).

    Args:
        gathered: the ``P`` messages (default ``bufs.gathered[c]``).
        bucket: the flat bucket (any float dtype); only chunk ``c``'s values are written.

    Returns:
        A 0-dim bool tensor: whether every scale of the chunk is finite (the same on every rank).
    """
    ch = plan.chunks[c]
    B, fmt, s = plan.block_size, plan.format, ch.shard_blocks
    codes, scales, _ = message_views(plan, ch, bufs.gathered[c] if gathered is None else gathered, plan.world_size)
    for src, blk, nb in ch.full:
        k, r = divmod(blk, s)
        codec.decode_blocks(codes[k, r : r + nb], scales[k, r : r + nb], fmt, out=bucket[src : src + nb * B].view(nb, B), fused=fused)
    st = bufs.staging[c]
    if st is not None:
        nt = st.nt
        st.codes[:nt] = codes[st.shard, st.row]
        st.scale[:nt] = scales[st.shard, st.row]
        codec.decode_blocks(st.codes, st.scale, fmt, out=st.out, fused=fused)
        bucket[st.src] = st.out.view(-1)[st.dst].to(bucket.dtype)
    return kernels.scales_finite(scales, fmt)


# --------------------------------------------------------------------------------------------
# whole exchanges built from the steps


def allreduce(
    plan: ExchangePlan,
    bufs: ExchangeBuffers,
    bucket: torch.Tensor,
    group,
    *,
    residual: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
    server_residual: Optional[torch.Tensor] = None,
    server_residual_out: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    server_noise: Optional[torch.Tensor] = None,
    header: Tuple[int, int] = (0, 0),
    fused: bool = True,
    out: Optional[torch.Tensor] = None,
    keep_messages: bool = False,
) -> bool:
    """Average ``bucket`` over ``group`` in place, chunk by chunk, blocking (no pipelining).

    This rank owns shard ``group rank`` of every chunk. With ``keep_messages`` the gathered messages stay in
    ``bufs.gathered`` and nothing is decoded (the hierarchical exchange forwards them first); ``out``
    (default ``bucket``) receives the mean otherwise. Returns whether every scale was finite.
    """
    finite = torch.ones((), dtype=torch.bool, device=bucket.device)
    step, index = header
    for c in range(len(plan.chunks)):
        send = encode(plan, bufs, c, bucket, residual=residual, residual_out=residual_out, noise=noise, header=header, fused=fused)
        dist.all_to_all_single(bufs.recv[c], send, group=group)
        check_header(plan, c, bufs.recv[c], step, index)
        mine = reduce_shard(
            plan, bufs, c, residual=server_residual, residual_out=server_residual_out, noise=server_noise,
            header=header, fused=fused,
        )
        all_gather_into(bufs.gathered[c], mine, group)
        check_header(plan, c, bufs.gathered[c], step, index, "all-gather")
        if not keep_messages:
            finite &= decode(plan, bufs, c, bucket if out is None else out, fused=fused)
        else:
            finite &= kernels.scales_finite(message_views(plan, plan.chunks[c], bufs.gathered[c], plan.world_size)[1], plan.format)
    return bool(finite)


def exchange_local(
    plan: ExchangePlan,
    buckets: Sequence[torch.Tensor],
    *,
    residuals: Optional[Sequence[torch.Tensor]] = None,
    server_residuals: Optional[Sequence[torch.Tensor]] = None,
    noises: Optional[Sequence[torch.Tensor]] = None,
    server_noises: Optional[Sequence[torch.Tensor]] = None,
    residuals_out: Optional[Sequence[torch.Tensor]] = None,
    server_residuals_out: Optional[Sequence[torch.Tensor]] = None,
    bufs: Optional[Sequence[ExchangeBuffers]] = None,
    fused: bool = True,
    out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, bool]:
    """Run the exchange of ``P`` ranks' buckets in one process, with the very steps the hook runs.

    For offline replay and tests: rank ``r``'s bucket is ``buckets[r]``; residuals (worker: aligned
    ``(padded_numel,)``, server: ``(server_numel,)``) are updated in place; the messages move between
    the ranks' buffers exactly as the all-to-all and the all-gather move them. With ``residuals_out`` /
    ``server_residuals_out`` the new residuals go there instead (the hook's double buffering).

    Returns:
        ``(mean, finite)``: the averaged bucket (fp32, ``plan.numel``; what every rank gets) and whether
        it is finite.
    """
    P = plan.world_size
    if len(buckets) != P:
        raise ValueError(f"need one bucket per rank ({P}), got {len(buckets)}")
    bufs = list(bufs) if bufs is not None else [ExchangeBuffers.allocate(plan, buckets[0].device) for _ in range(P)]
    out = torch.empty(plan.numel, dtype=torch.float32, device=buckets[0].device) if out is None else out
    finite = True

    def pick(seq, r):
        return None if seq is None else seq[r]

    for c, ch in enumerate(plan.chunks):
        m = ch.message_bytes
        for r in range(P):
            res = pick(residuals, r)
            res_out = res if residuals_out is None else residuals_out[r]
            encode(plan, bufs[r], c, buckets[r], residual=res, residual_out=res_out, noise=pick(noises, r), fused=fused)
        for k in range(P):  # the all-to-all
            recv = bufs[k].recv[c].view(P, m)
            for r in range(P):
                recv[r] = bufs[r].send[c].view(P, m)[k]
        for k in range(P):
            sres = pick(server_residuals, k)
            sres_out = sres if server_residuals_out is None else server_residuals_out[k]
            reduce_shard(plan, bufs[k], c, residual=sres, residual_out=sres_out, noise=pick(server_noises, k), fused=fused)
        gathered = torch.stack([bufs[k].mine[c] for k in range(P)]).view(-1)  # the all-gather
        finite &= bool(decode(plan, bufs[0], c, out, gathered=gathered, fused=fused))
    return out, finite


def param_noise(plan: ExchangePlan, seed: int, who: int, step: int, phase: int, device=None) -> torch.Tensor:
    """Stochastic-rounding noise in the aligned layout, drawn per parameter (independent of bucketing).

    Parameter ``key`` gets ``U[0, 1)`` values from a generator seeded with
    ``hash((seed, who, step, key, phase))``; padding is 0. Phase 0 (a rank's own gradient) uses
    ``who = rank``; phase 1 (a reduced shard) uses ``who = -1``, so whichever rank owns a block draws
    the same noise for it.

    Returns:
        fp32 ``(plan.padded_numel,)``.
    """
    full = torch.zeros(plan.padded_numel, dtype=torch.float32, device=device)
    g = torch.Generator(device=device if device is not None else "cpu")
    for key, off, n in zip(plan.keys, plan.offsets, plan.numels):
        g.manual_seed(hash((seed, who, step, key, phase)) & 0x7FFF_FFFF_FFFF_FFFF)
        full[off : off + n] = torch.rand(n, generator=g, device=device)
    return full
