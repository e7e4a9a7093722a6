"""THE quantized exchange of a gradient bucket, as pure steps: encode, reduce_shard, decode_sum, decode.

Every user of the two-phase exchange calls these steps, never a copy of them: the DDP hook (pipelined,
:mod:`gradcomp.comm.pipeline`), the hierarchical exchange between nodes (:mod:`gradcomp.comm.hierarchical`),
the blocking :func:`allreduce`, the offline replay of captured gradients (:func:`exchange_local`) and
FSDP2's collectives (:mod:`gradcomp.comm.fsdp`: a reduce-scatter is encode, all-to-all,
:func:`decode_sum`; a weight all-gather is encode of the rank's shard, all-gather, decode).

How a bucket travels (``P`` ranks, blocks of ``B`` values, one fp32 scale per block):

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

A message (one shard of one chunk) is ``codes | pad to 4 bytes | fp32 scales | 16-byte header``; the
header (step, bucket index, chunk and bits, bucket numel as int32) lets each receiver check that every
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

import bisect
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from gradcomp import codec
from gradcomp.checks import check_is_int
from gradcomp.comm.collectives import ShardLayout, all_gather_into

__all__ = [
    "HEADER_BYTES",
    "DEFAULT_CHUNK_NUMEL",
    "SHARD_NUMEL",
    "chunk_numel_for",
    "Chunk",
    "ExchangePlan",
    "ExchangeBuffers",
    "HeaderMismatch",
    "encode",
    "reduce_shard",
    "decode_sum",
    "decode",
    "ROUTE_ALLREDUCE",
    "ROUTE_REDUCE_SCATTER",
    "ROUTE_GATHER_SEND",
    "ROUTE_GATHER_RECV",
    "check_header",
    "header_of",
    "allreduce",
    "exchange_local",
    "param_noise",
]

HEADER_BYTES = 16
DEFAULT_CHUNK_NUMEL = 1 << 20  # 4 MB of fp32 per chunk
ROUTE_ALLREDUCE = ("send", "recv", "mine", "gathered")  # the message buffers each route needs
ROUTE_REDUCE_SCATTER = ("send", "recv")
ROUTE_GATHER_SEND = ("send",)
ROUTE_GATHER_RECV = ("gathered",)

SHARD_NUMEL = 1 << 20  # values each rank owns of a chunk when the hook picks the chunk size


def chunk_numel_for(world_size: int) -> int:
    """The hook's chunk size when none is given: ``SHARD_NUMEL`` values per rank, ``P * 2**20`` in all.

    Every chunk costs two collectives, each with a fixed cost (latency, the wake-ups of every rank's
    threads) on top of its bytes. Keeping what each rank sends every peer at about 2**20 codes keeps
    that cost a small part of a message as P grows. On the emulated 1 Gbit/s cluster, the whole
    exchange of a 17.6M-value bucket in int4 at 4 hosts took 232 ms with 4M-value chunks and
    331 ms with 1M-value chunks (the wire alone 109 ms); at 2 hosts int4 took 102 ms with 2M and
    121 ms with 1M, while int8 was 5% slower with 2M (docs/launch.md, "Chunk size").
    """
    check_is_int("world_size", world_size)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return SHARD_NUMEL * max(2, world_size)


class HeaderMismatch(RuntimeError):
    """A peer sent a message of another step, bucket, chunk, size or width: the ranks are out of step."""


@dataclass(frozen=True)
class Chunk:
    """One chunk of a bucket: its own two-phase exchange of ``world_size`` shards.

    Attributes:
        index: position in the bucket.
        block0: first block of the chunk in the aligned layout.
        shard_blocks: blocks per shard ``s``; the chunk spans ``world_size * s`` blocks.
        real_blocks: blocks that hold data (the rest of the last chunk is padding).
        server_row0: first row (block) of this chunk's owned shard in the server residual.
        code_bytes: packed code bytes of one shard; scales start at ``scale_offset`` (4-aligned),
            the header at ``header_offset``; ``message_bytes`` in all.
        full: ``(src, block, nblocks)``: whole blocks read from ``bucket[src:]`` into the chunk's blocks
            ``block..block+nblocks`` (relative to ``block0``; never across a shard; ``nblocks >= 2``).
        staged: ``(src, block, length)``: blocks that go through the staging buffer (a parameter's
            ragged last block, zero-padded, or a one-block run).
    """

    index: int
    block0: int
    shard_blocks: int
    real_blocks: int
    server_row0: int
    code_bytes: int
    scale_offset: int
    header_offset: int
    message_bytes: int
    full: Tuple[Tuple[int, int, int], ...]
    staged: Tuple[Tuple[int, int, int], ...]


@dataclass(frozen=True)
class ExchangePlan:
    """Where every value of a bucket goes in the exchange, for one bucket layout and width.

    Build it with :meth:`build`; it holds no tensors and is the same on every rank.

    Attributes:
        keys: parameter keys in bucket order (any ints; the hook uses the index in the model).
        numels: parameter sizes; ``offsets``: their starts in the aligned layout (block multiples).
        world_size, bits, block_size: the exchange's ranks, width and block.
        layout: the :class:`ShardLayout` of the whole aligned bucket (one shard cut; same padding).
        chunks: the :class:`Chunk` s, in order.

    Example: numels ``(300, 512)``, 2 ranks, ``B = 256``, int8: aligned offsets ``(0, 512)``, 4 blocks;
    with ``chunk_numel=512`` two chunks of 2 blocks (one block per shard); parameter 0's first block is
    a staged one-block run, its tail of 44 values a staged ragged block, parameter 1 a full run of 2
    blocks split at the shard boundary into two staged blocks.
    """

    keys: Tuple[int, ...]
    numels: Tuple[int, ...]
    offsets: Tuple[int, ...]
    world_size: int
    bits: int
    block_size: int
    chunk_numel: int
    layout: ShardLayout
    chunks: Tuple[Chunk, ...]

    @property
    def numel(self) -> int:
        """Values in the bucket."""
        return sum(self.numels)

    @property
    def padded_numel(self) -> int:
        """Values of the aligned, padded layout (residual length), ``world_size * server_numel``."""
        return self.layout.padded_numel

    @property
    def server_numel(self) -> int:
        """Values of this rank's server residual: its shard of every chunk."""
        return self.layout.shard_numel

    @property
    def bytes_sent(self) -> int:
        """Bytes each rank sends for the bucket: ``2 (P - 1)`` messages per chunk, headers included."""
        return sum(2 * (self.world_size - 1) * c.message_bytes for c in self.chunks)

    @staticmethod
    def build(
        numels: Sequence[int],
        world_size: int,
        bits: int,
        block_size: int,
        chunk_numel: Optional[int] = DEFAULT_CHUNK_NUMEL,
        keys: Optional[Sequence[int]] = None,
    ) -> "ExchangePlan":
        """Lay ``numels`` out block-aligned, cut chunks of about ``chunk_numel`` values and shards.

        Args:
            numels: parameter sizes in bucket order (positive).
            world_size: ranks of the exchange.
            bits: 2, 4 or 8.
            block_size: values per scale, a multiple of 8.
            chunk_numel: values per chunk (rounded down to whole blocks, a multiple of ``world_size``
                blocks, at least ``world_size``); None: the whole bucket is one chunk.
            keys: parameter keys (default ``0..len-1``).
        """
        numels = tuple(int(n) for n in numels)
        if not numels or min(numels) < 1:
            raise ValueError(f"numels must be a non-empty sequence of positive sizes, got {numels}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if bits not in (2, 4, 8):
            raise ValueError(f"bits must be one of (2, 4, 8), got {bits!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 8 or block_size % 8:
            raise ValueError(f"block_size must be a positive multiple of 8, got {block_size!r}")
        keys = tuple(range(len(numels))) if keys is None else tuple(keys)
        if len(keys) != len(numels):
            raise ValueError(f"keys and numels must have the same length, got {len(keys)} and {len(numels)}")
        B, P = block_size, world_size
        offsets: List[int] = []
        runs: List[List[int]] = []  # [src, block, nblocks] of whole blocks, merged where contiguous
        tails: List[Tuple[int, int, int]] = []  # (src, block, length) of ragged last blocks
        src = blk = 0
        for n in numels:
            offsets.append(blk * B)
            whole, tail = divmod(n, B)
            if whole:
                if runs and runs[-1][0] + runs[-1][2] * B == src and runs[-1][1] + runs[-1][2] == blk:
                    runs[-1][2] += whole
                else:
                    runs.append([src, blk, whole])
            if tail:
                tails.append((src + whole * B, blk + whole, tail))
            src += n
            blk += -(-n // B)
        total_blocks = max(blk, 1)
        layout = ShardLayout(total_blocks * B, P, bits, B)
        if chunk_numel is None:
            per_chunk = layout.blocks_per_shard * P
        else:
            if isinstance(chunk_numel, bool) or not isinstance(chunk_numel, int) or chunk_numel < 1:
                raise ValueError(f"chunk_numel must be a positive int or None, got {chunk_numel!r}")
            per_chunk = max(P, (chunk_numel // B) // P * P)
        starts = list(range(0, total_blocks, per_chunk))
        if len(starts) > 1 and total_blocks - starts[-1] < 2 * P:
            starts.pop()  # a last chunk of one block per shard joins the previous one (fewer kernel shapes)
        # split runs at every shard boundary of every chunk
        ends = starts[1:] + [total_blocks]
        bounds = []
        for c0, c1 in zip(starts, ends):
            real = c1 - c0
            s = -(-real // P)
            bounds.extend(c0 + k * s for k in range(P))
        bounds.append(total_blocks)
        pieces: List[Tuple[int, int, int]] = []
        for r_src, r_blk, r_n in runs:
            b, end = r_blk, r_blk + r_n
            while b < end:
                i = bisect.bisect_right(bounds, b)
                e = min(end, bounds[i]) if i < len(bounds) else end
                pieces.append((r_src + (b - r_blk) * B, b, e - b))
                b = e
        chunks = []
        code_row = B * bits // 8
        server_row = 0
        for ci, (c0, c1) in enumerate(zip(starts, ends)):
            real = c1 - c0
            s = -(-real // P)
            full = tuple((sr, b - c0, n) for sr, b, n in pieces if c0 <= b < c1 and n >= 2)
            staged = [(sr + i * B, b - c0 + i, B) for sr, b, n in pieces if c0 <= b < c1 and n == 1 for i in range(n)]
            staged += [(sr, b - c0, n) for sr, b, n in tails if c0 <= b < c1]
            code_bytes = s * code_row
            scale_offset = code_bytes + (-code_bytes) % 4
            header_offset = scale_offset + 4 * s
            chunks.append(
                Chunk(ci, c0, s, real, server_row, code_bytes, scale_offset, header_offset,
                      header_offset + HEADER_BYTES, full, tuple(sorted(staged, key=lambda t: t[1])))
            )
            server_row += s
        plan = ExchangePlan(keys, numels, tuple(offsets), P, bits, B, per_chunk * B, layout, tuple(chunks))
        if plan.padded_numel != sum(P * c.shard_blocks for c in chunks) * B:  # chunks are multiples of P blocks
            raise AssertionError("internal error: chunk padding differs from the shard layout's")
        return plan

    # ---- residual layouts

    def server_rows(self, rank: int) -> List[Tuple[int, int, int]]:
        """``(aligned block, server row, blocks)`` of each chunk's shard owned by ``rank``."""
        return [(c.block0 + rank * c.shard_blocks, c.server_row0, c.shard_blocks) for c in self.chunks]

    def server_of(self, aligned: torch.Tensor, rank: int) -> torch.Tensor:
        """Cut ``rank``'s server shards out of an aligned ``(padded_numel,)`` tensor (a new tensor)."""
        B = self.block_size
        a = aligned.reshape(-1, B)
        return torch.cat([a[b0 : b0 + n] for b0, _, n in self.server_rows(rank)]).reshape(-1)

    def server_to_aligned(self, gathered: torch.Tensor) -> torch.Tensor:
        """Put the server residuals of all ranks ``(P, server_numel)`` back in aligned order."""
        B, P = self.block_size, self.world_size
        g = gathered.reshape(P, -1, B)
        out = torch.empty(self.padded_numel // B, B, dtype=gathered.dtype, device=gathered.device)
        for c in self.chunks:
            out[c.block0 : c.block0 + P * c.shard_blocks].view(P, c.shard_blocks, B).copy_(
                g[:, c.server_row0 : c.server_row0 + c.shard_blocks]
            )
        return out.reshape(-1)

    def to_aligned(self, bucket: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Copy a flat bucket into the zero-padded aligned fp32 layout (for the hierarchical mode)."""
        if out is None:
            out = torch.zeros(self.padded_numel, dtype=torch.float32, device=bucket.device)
        src = 0
        for off, n in zip(self.offsets, self.numels):
            out[off : off + n] = bucket[src : src + n]
            src += n
        return out

    def from_aligned(self, aligned: torch.Tensor, bucket: torch.Tensor) -> torch.Tensor:
        """Copy the aligned layout's values back into the flat bucket (in place)."""
        src = 0
        for off, n in zip(self.offsets, self.numels):
            bucket[src : src + n] = aligned[off : off + n]
            src += n
        return bucket


def header_of(plan: ExchangePlan, chunk: int, step: int, bucket_index: int) -> Tuple[int, int, int, int]:
    """The four int32 of a message header: step, bucket index, ``chunk * 256 + bits``, bucket numel."""
    return (step & 0x7FFF_FFFF, bucket_index & 0x7FFF_FFFF, (chunk << 8) | plan.bits, plan.numel & 0x7FFF_FFFF)


@dataclass
class _Staging:
    nt: int
    src: torch.Tensor  # bucket indices of the staged values
    dst: torch.Tensor  # indices into x (rows * B)
    rows: torch.Tensor  # aligned rows of the staged blocks
    shard: torch.Tensor  # shard k of each staged block
    row: torch.Tensor  # row inside the shard
    x: torch.Tensor  # fp32 (max(nt, 2), B), zero padding stays zero
    res_in: torch.Tensor
    res_out: torch.Tensor
    noise: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    out: torch.Tensor
    picks: dict = field(default_factory=dict)  # shard k -> _ShardPick (decode_sum), built on first use


@dataclass
class _ShardPick:
    """The staged blocks of one shard, for :func:`decode_sum`: their rows in the shard and their values."""

    rows: torch.Tensor  # row inside the shard of each staged block of shard k
    src: torch.Tensor  # bucket indices of their values
    dst: torch.Tensor  # indices into out (rows * B)
    codes: torch.Tensor  # (P, max(m, 2), bytes): the P received copies of those blocks
    scale: torch.Tensor  # (P, max(m, 2))
    out: torch.Tensor  # fp32 (max(m, 2), B)


def _shard_pick(plan: ExchangePlan, c: Chunk, st: _Staging, k: int) -> Optional[_ShardPick]:
    pick = st.picks.get(k)
    if pick is None and k not in st.picks:
        B, s, P = plan.block_size, c.shard_blocks, plan.world_size
        mine = [(sr, b, n) for sr, b, n in c.staged if b // s == k]
        if mine:
            device = st.x.device
            m = max(len(mine), 2)  # at least two rows: the compiled (CUDA) kernels are built for rows >= 2
            pick = _ShardPick(
                rows=torch.tensor([b - k * s for _, b, _ in mine], dtype=torch.long, device=device),
                src=torch.cat([torch.arange(sr, sr + n) for sr, _, n in mine]).to(device),
                dst=torch.cat([torch.arange(i * B, i * B + n) for i, (_, _, n) in enumerate(mine)]).to(device),
                codes=torch.zeros(P, m, B * plan.bits // 8, dtype=torch.uint8, device=device),
                scale=torch.zeros(P, m, dtype=torch.float32, device=device),
                out=torch.zeros(m, B, dtype=torch.float32, device=device),
            )
        st.picks[k] = pick
    return pick


@dataclass
class ExchangeBuffers:
    """Persistent buffers of one bucket's exchange (keep them per bucket; none is of bucket size in fp32).

    Attributes:
        send, recv, gathered: per chunk, uint8 ``(P * message_bytes,)``: the all-to-all's input and
            output and the all-gather's output; ``mine``: per chunk, this rank's reduced message.
            A buffer the route does not need (:meth:`allocate`'s ``need``) is an empty list.
    """

    plan: ExchangePlan
    send: List[torch.Tensor]
    recv: List[torch.Tensor]
    mine: List[torch.Tensor]
    gathered: List[torch.Tensor]
    staging: List[Optional[_Staging]] = field(default_factory=list)

    @staticmethod
    def allocate(plan: ExchangePlan, device=None, need: Sequence[str] = ROUTE_ALLREDUCE) -> "ExchangeBuffers":
        """Allocate the message buffers ``need`` names on ``device`` (the others stay empty lists).

        A route allocates only what its steps touch: the all-reduce (:data:`ROUTE_ALLREDUCE`) all
        four, a reduce-scatter (:data:`ROUTE_REDUCE_SCATTER`: encode, all-to-all, :func:`decode_sum`)
        ``send`` and ``recv``, an all-gather's sending side ``send`` and its receiving side
        (:func:`decode`) ``gathered``. The staging of ragged blocks (a few blocks) is always there.
        Padding blocks of ``send`` are written once (code 0, scale 0).
        """
        unknown = set(need) - set(ROUTE_ALLREDUCE)
        if unknown or isinstance(need, str):
            raise ValueError(f"need must name some of {ROUTE_ALLREDUCE}, got {need!r}")
        device = torch.device("cpu") if device is None else torch.device(device)
        P, bits = plan.world_size, plan.bits
        zero_code = 0
        per = 8 // bits
        for i in range(per):
            zero_code |= (1 << (bits - 1)) << (bits * i)
        bufs = ExchangeBuffers(plan, [], [], [], [])
        for c in plan.chunks:
            m = c.message_bytes
            if "send" in need:
                send = torch.zeros(P * m, dtype=torch.uint8, device=device)
                sv = send.view(P, m)
                sv[:, : c.code_bytes] = zero_code  # padding blocks stay code "0" with scale 0 forever
                bufs.send.append(send)
            if "recv" in need:
                bufs.recv.append(torch.zeros(P * m, dtype=torch.uint8, device=device))
            if "mine" in need:
                bufs.mine.append(torch.zeros(m, dtype=torch.uint8, device=device))
            if "gathered" in need:
                bufs.gathered.append(torch.zeros(P * m, dtype=torch.uint8, device=device))
            bufs.staging.append(_make_staging(plan, c, device))
        return bufs

    def to_views(self, c: int, buf: torch.Tensor, rows: int = 0):
        """Codes ``(rows, shard_blocks, bytes)`` and scales ``(rows, shard_blocks)`` views of a message buffer."""
        return _message_views(self.plan, self.plan.chunks[c], buf, rows)


def _make_staging(plan: ExchangePlan, c: Chunk, device) -> Optional[_Staging]:
    if not c.staged:
        return None
    B, s = plan.block_size, c.shard_blocks
    nt = len(c.staged)
    src, dst = [], []
    for i, (sr, _, n) in enumerate(c.staged):
        src.append(torch.arange(sr, sr + n))
        dst.append(torch.arange(i * B, i * B + n))
    blocks = torch.tensor([b for _, b, _ in c.staged], dtype=torch.long)
    rows = max(nt, 2)  # at least two rows: the compiled (CUDA) kernels are built for rows >= 2
    f32 = dict(dtype=torch.float32, device=device)
    return _Staging(
        nt=nt,
        src=torch.cat(src).to(device),
        dst=torch.cat(dst).to(device),
        rows=(blocks + c.block0).to(device),
        shard=(blocks // s).to(device),
        row=(blocks % s).to(device),
        x=torch.zeros(rows, B, **f32),
        res_in=torch.zeros(rows, B, **f32),
        res_out=torch.zeros(rows, B, **f32),
        noise=torch.zeros(rows, B, **f32),
        codes=torch.zeros(rows, B * plan.bits // 8, dtype=torch.uint8, device=device),
        scale=torch.zeros(rows, **f32),
        out=torch.zeros(rows, B, **f32),
    )


def _message_views(plan: ExchangePlan, c: Chunk, buf: torch.Tensor, rows: int):
    """Views of ``rows`` messages laid side by side: codes ``(rows, s, bytes)``, scales ``(rows, s)``, headers ``(rows, 4)``."""
    m = c.message_bytes
    v = buf.view(-1, m) if rows == 0 else buf.view(rows, m)
    codes = v[:, : c.code_bytes].view(v.shape[0], c.shard_blocks, plan.block_size * plan.bits // 8)
    # message_bytes, scale_offset and header_offset are multiples of 4: the fp32 and int32 views need no copy
    scales = v[:, c.scale_offset : c.header_offset].view(torch.float32)
    header = v[:, c.header_offset :].view(torch.int32)
    return codes, scales, header


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
    B, bits = plan.block_size, plan.bits
    codes, scales, hdr = _message_views(plan, ch, bufs.send[c], plan.world_size)
    rin, rout, nz = _rows(residual, B), _rows(residual_out, B), _rows(noise, B)
    if rin is not None and rout is None:
        raise ValueError("residual_out is needed with a residual (it may be the residual itself)")
    s = ch.shard_blocks
    for src, blk, nb in ch.full:
        k, r = divmod(blk, s)
        g = ch.block0 + blk
        codec.encode_blocks(
            bucket[src : src + nb * B].view(nb, B), bits,
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
            st.x, bits,
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
    _, _, hdr = _message_views(plan, ch, buf, plan.world_size)
    want = list(header_of(plan, c, step, bucket_index))
    got = hdr.tolist()
    for rank, h in enumerate(got):
        if h != want:
            raise HeaderMismatch(
                f"ranks out of step in the {what}: rank {rank} sent step {h[0]}, bucket {h[1]}, chunk {h[2] >> 8}, "
                f"{h[2] & 0xFF} bits, bucket numel {h[3]}; this rank expected step {want[0]}, bucket {want[1]}, "
                f"chunk {c}, {plan.bits} bits, bucket numel {want[3]} (every rank must run the same steps and "
                "buckets in the same order)"
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
    codes, scales, _ = _message_views(plan, ch, bufs.recv[c], plan.world_size)
    mcodes, mscales, mhdr = _message_views(plan, ch, bufs.mine[c], 1)
    rin, rout, nz = _rows(residual, B), _rows(residual_out, B), _rows(noise, B)
    if rin is not None and rout is None:
        raise ValueError("residual_out is needed with a residual (it may be the residual itself)")
    r0 = ch.server_row0
    codec.reduce_blocks(
        codes, scales, plan.bits,
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
    B, bits, s, P = plan.block_size, plan.bits, ch.shard_blocks, plan.world_size
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < P:
        raise ValueError(f"rank must be an int in [0, {P}), got {rank!r}")
    codes, scales, _ = _message_views(plan, ch, bufs.recv[c] if received is None else received, P)
    f = None if factor is None else torch.tensor(float(factor), dtype=torch.float32, device=codes.device)
    lo = rank * s
    for src, blk, nb in ch.full:
        if lo <= blk < lo + s:
            r, o = blk - lo, src - offset
            codec.decode_sum_blocks(
                codes[:, r : r + nb], scales[:, r : r + nb], bits, out=out[o : o + nb * B].view(nb, B),
                divide=divide, factor=f, fused=fused,
            )
    st = bufs.staging[c]
    pick = None if st is None else _shard_pick(plan, ch, st, rank)
    if pick is not None:
        m = pick.rows.numel()
        pick.codes[:, :m] = codes[:, pick.rows]
        pick.scale[:, :m] = scales[:, pick.rows]
        codec.decode_sum_blocks(pick.codes, pick.scale, bits, out=pick.out, divide=divide, factor=f, fused=fused)
        out[pick.src - offset] = pick.out.view(-1)[pick.dst].to(out.dtype)
    return torch.isfinite(scales).all()


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
    B, bits, s = plan.block_size, plan.bits, ch.shard_blocks
    codes, scales, _ = _message_views(plan, ch, bufs.gathered[c] if gathered is None else gathered, plan.world_size)
    for src, blk, nb in ch.full:
        k, r = divmod(blk, s)
        codec.decode_blocks(codes[k, r : r + nb], scales[k, r : r + nb], bits, out=bucket[src : src + nb * B].view(nb, B), fused=fused)
    st = bufs.staging[c]
    if st is not None:
        nt = st.nt
        st.codes[:nt] = codes[st.shard, st.row]
        st.scale[:nt] = scales[st.shard, st.row]
        codec.decode_blocks(st.codes, st.scale, bits, out=st.out, fused=fused)
        bucket[st.src] = st.out.view(-1)[st.dst].to(bucket.dtype)
    return torch.isfinite(scales).all()


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
            finite &= torch.isfinite(_message_views(plan, plan.chunks[c], bufs.gathered[c], plan.world_size)[1]).all()
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


def chunk_sizes(plan: ExchangePlan) -> Iterable[int]:
    """Values per chunk (padding included), in order."""
    return (plan.world_size * c.shard_blocks * plan.block_size for c in plan.chunks)
