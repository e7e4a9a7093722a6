"""Where every value of a bucket goes in the exchange: the plan, its chunks and shards, their message sizes.

The exchange (:mod:`gradcomp.comm.exchange`) runs its steps on what this module lays out, once per
bucket layout and wire format:

* :class:`ShardLayout`: the sizes of one shard cut of ``numel`` values over ``P`` ranks (the padding
  every exchange of that bucket shares);
* :class:`ExchangePlan`: every parameter starts on a block boundary (so a block's arithmetic never
  depends on how DDP grouped the parameters); the aligned blocks are cut into chunks of about
  ``chunk_numel`` values, a multiple of ``P`` blocks each (:func:`chunking`: the one chunk rule,
  which the cost model asks too), and each chunk into ``P`` shards; rank ``k`` owns shard ``k`` of
  every chunk. Runs of whole blocks are read straight from the bucket; only a parameter's ragged
  last block (and one-block runs) go through a small staging buffer;
* :func:`header_of`: a message's header (the tensors a plan's messages live in are
  :mod:`gradcomp.comm.buffers`).

A message is laid out as the bucket's :class:`~gradcomp.codec.formats.WireFormat` says
(``codes | pad to 4 bytes | scales | 16-byte header``).

Every size here is the format's: code bytes, scale bytes, message bytes and header id come from
:class:`~gradcomp.codec.formats.WireFormat`, never from ``bits`` by hand.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from gradcomp.checks import check_is_int
from gradcomp.codec.formats import WireFormat, wire_format

__all__ = [
    "DEFAULT_CHUNK_NUMEL",
    "SHARD_NUMEL",
    "chunk_numel_for",
    "chunking",
    "ShardLayout",
    "Chunk",
    "PlanSizes",
    "ExchangePlan",
    "header_of",
]

Format = Union[WireFormat, str, int]

DEFAULT_CHUNK_NUMEL = 1 << 20  # 4 MB of fp32 per chunk

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


def _check_block_size(block_size: int, fmt: Optional[WireFormat] = None) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 8 or block_size % 8:
        raise ValueError(f"block_size must be a positive multiple of 8, got {block_size!r}")
    return block_size if fmt is None else fmt.check_block_size(block_size)


def _check_world_size(world_size: int) -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    return world_size


def chunking(total_blocks: int, world_size: int, block_size: int, chunk_numel: Optional[int]) -> Tuple[int, int]:
    """The chunk rule: ``(blocks per chunk, chunks)`` for ``total_blocks`` aligned blocks on ``P`` ranks.

    A chunk holds ``max(P, floor(chunk_numel / B / P) * P)`` blocks (a multiple of ``P``, so only the
    last chunk pads, as one shard cut of the whole bucket would); chunk ``i`` starts at block
    ``i * per_chunk`` and the last one ends at ``total_blocks``. A last chunk of fewer than ``2 P``
    blocks joins the previous one (fewer kernel shapes). ``chunk_numel=None``: one chunk.

    Example: 15625 blocks (4,000,000 values at ``B = 256``), chunks of 1,048,576 values on 4 ranks:
    4096 blocks per chunk, 4 chunks, the last of 3337 blocks.
    """
    P = world_size
    if chunk_numel is None:
        return max(1, -(-total_blocks // P)) * P, 1
    if isinstance(chunk_numel, bool) or not isinstance(chunk_numel, int) or chunk_numel < 1:
        raise ValueError(f"chunk_numel must be a positive int or None, got {chunk_numel!r}")
    per_chunk = max(P, (chunk_numel // block_size) // P * P)
    k = -(-total_blocks // per_chunk)
    if k > 1 and total_blocks - (k - 1) * per_chunk < 2 * P:
        k -= 1
    return per_chunk, k


@dataclass(frozen=True)
class ShardLayout:
    """Sizes of one shard cut of ``numel`` values over ``world_size`` ranks.

    ``bits`` takes a format name (``"int4"``) or the bits shorthand (``4``) and keeps the shorter
    spelling (:attr:`WireFormat.short`); :attr:`format` is the :class:`WireFormat`.

    Example: ``ShardLayout(numel=1000, world_size=3, bits=4, block_size=256)`` has 4 blocks,
    2 blocks per shard (``shard_numel = 512``), ``padded_numel = 1536``, 256 code bytes and
    8 scale bytes per shard, so each rank sends ``2 * 2 * 264 = 1056`` bytes of codes and scales;
    with the messages' 16-byte headers (:attr:`framed_message_bytes`, 280) it is 1120.
    """

    numel: int
    world_size: int
    bits: Union[int, str]
    block_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", wire_format(self.bits, "bits").short)

    @property
    def format(self) -> WireFormat:
        """The :class:`WireFormat` of the codes."""
        return wire_format(self.bits)

    @property
    def blocks_per_shard(self) -> int:
        """Blocks in each rank's shard."""
        blocks = -(-self.numel // self.block_size)
        return max(1, -(-blocks // self.world_size))

    @property
    def shard_numel(self) -> int:
        """Elements in each rank's shard (padding included)."""
        return self.blocks_per_shard * self.block_size

    @property
    def padded_numel(self) -> int:
        """Elements of the padded tensor, ``world_size * shard_numel``."""
        return self.world_size * self.shard_numel

    @property
    def code_bytes(self) -> int:
        """Packed code bytes of one shard."""
        return self.format.code_bytes(self.shard_numel)

    @property
    def message_bytes(self) -> int:
        """Bytes of one shard's codes and scales (the payload; :attr:`framed_message_bytes` adds the rest)."""
        return self.code_bytes + self.format.scale_bytes_per_block(self.block_size) * self.blocks_per_shard

    @property
    def framed_message_bytes(self) -> int:
        """Bytes of one shard message as the exchange sends it: codes, padding, scales, header."""
        return self.format.message_bytes(self.blocks_per_shard, self.block_size)

    @property
    def bytes_sent(self) -> int:
        """Payload bytes each rank sends: (P-1) messages in the all-to-all and (P-1) in the all-gather."""
        return 2 * (self.world_size - 1) * self.message_bytes


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
            the header at ``header_offset``; ``message_bytes`` in all (the format's
            :meth:`~gradcomp.codec.formats.WireFormat.message_layout`).
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
class PlanSizes:
    """What the exchange of a bucket sends, as its plan would lay it out (without building the plan).

    Attributes:
        world_size: ranks of the exchange (P).
        chunks: chunks of the bucket (each an all-to-all and an all-gather).
        message_bytes: one shard message of every chunk, summed: what a rank sends each peer in
            each of the two phases.
    """

    world_size: int
    chunks: int
    message_bytes: int

    @property
    def bytes_sent(self) -> int:
        """Bytes each rank sends for the bucket: ``2 (P - 1)`` messages per chunk, headers included."""
        return 2 * (self.world_size - 1) * self.message_bytes


@dataclass(frozen=True)
class ExchangePlan:
    """Where every value of a bucket goes in the exchange, for one bucket layout and wire format.

    Build it with :meth:`build`; it holds no tensors and is the same on every rank.

    Attributes:
        keys: parameter keys in bucket order (any ints; the hook uses the index in the model).
        numels: parameter sizes; ``offsets``: their starts in the aligned layout (block multiples).
        world_size, format, block_size: the exchange's ranks, :class:`WireFormat` and block.
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
    format: WireFormat
    block_size: int
    chunk_numel: int
    layout: ShardLayout
    chunks: Tuple[Chunk, ...]

    @property
    def bits(self) -> int:
        """Bits per code of the plan's format (``format.bits``)."""
        return self.format.bits

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
    def sizes(self) -> PlanSizes:
        """The plan's :class:`PlanSizes` (equal to :meth:`sizes_of` a bucket of its aligned size)."""
        return PlanSizes(self.world_size, len(self.chunks), sum(c.message_bytes for c in self.chunks))

    @property
    def bytes_sent(self) -> int:
        """Bytes each rank sends for the bucket: ``2 (P - 1)`` messages per chunk, headers included."""
        return self.sizes.bytes_sent

    @staticmethod
    def sizes_of(
        numel: int, world_size: int, format: Format, block_size: int, chunk_numel: Optional[int] = DEFAULT_CHUNK_NUMEL
    ) -> PlanSizes:
        """The :class:`PlanSizes` of a one-parameter bucket of ``numel`` values, in O(1).

        The same chunk rule (:func:`chunking`) and message layout (:meth:`WireFormat.message_bytes`)
        as :meth:`build` (tested equal), without laying out a parameter: what the cost model asks.

        Example: 1000 values on 3 ranks in int4 (``B = 256``, one chunk): one message of 2 blocks,
        280 bytes (256 of codes, 8 of scales, 16 of header), so ``bytes_sent = 2 * 2 * 280 = 1120``.
        """
        fmt = wire_format(format, "format")
        P, B = _check_world_size(world_size), _check_block_size(block_size, fmt)
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
            raise ValueError(f"numel must be a positive int, got {numel!r}")
        total = -(-numel // B)
        per_chunk, k = chunking(total, P, B, chunk_numel)
        last = total - (k - 1) * per_chunk
        message = (k - 1) * fmt.message_bytes(per_chunk // P, B) + fmt.message_bytes(max(1, -(-last // P)), B)
        return PlanSizes(P, k, message)

    @staticmethod
    def build(
        numels: Sequence[int],
        world_size: int,
        format: Format,
        block_size: int,
        chunk_numel: Optional[int] = DEFAULT_CHUNK_NUMEL,
        keys: Optional[Sequence[int]] = None,
    ) -> "ExchangePlan":
        """Lay ``numels`` out block-aligned, cut chunks of about ``chunk_numel`` values and shards.

        Args:
            numels: parameter sizes in bucket order (positive).
            world_size: ranks of the exchange.
            format: the :class:`WireFormat`, its name (``"int4"``) or the bits shorthand (``4``).
            block_size: values per scale, a multiple of 8.
            chunk_numel: values per chunk (rounded down to whole blocks, a multiple of ``world_size``
                blocks, at least ``world_size``); None: the whole bucket is one chunk (:func:`chunking`).
            keys: parameter keys (default ``0..len-1``).
        """
        numels = tuple(int(n) for n in numels)
        if not numels or min(numels) < 1:
            raise ValueError(f"numels must be a non-empty sequence of positive sizes, got {numels}")
        P = _check_world_size(world_size)
        fmt = wire_format(format, "format")
        B = _check_block_size(block_size, fmt)
        keys = tuple(range(len(numels))) if keys is None else tuple(keys)
        if len(keys) != len(numels):
            raise ValueError(f"keys and numels must have the same length, got {len(keys)} and {len(numels)}")
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
        layout = ShardLayout(total_blocks * B, P, fmt.short, B)
        per_chunk, k = chunking(total_blocks, P, B, chunk_numel)
        starts = [i * per_chunk for i in range(k)]
        ends = starts[1:] + [total_blocks]
        # split runs at every shard boundary of every chunk
        bounds = []
        for c0, c1 in zip(starts, ends):
            s = -(-(c1 - c0) // P)
            bounds.extend(c0 + j * s for j in range(P))
        bounds.append(total_blocks)
        pieces: List[Tuple[int, int, int]] = []  # in block order: runs and their splits are
        for r_src, r_blk, r_n in runs:
            b, end = r_blk, r_blk + r_n
            while b < end:
                i = bisect.bisect_right(bounds, b)
                e = min(end, bounds[i]) if i < len(bounds) else end
                pieces.append((r_src + (b - r_blk) * B, b, e - b))
                b = e
        piece_blocks = [b for _, b, _ in pieces]
        tail_blocks = [b for _, b, _ in tails]
        chunks = []
        server_row = 0
        for ci, (c0, c1) in enumerate(zip(starts, ends)):
            s = -(-(c1 - c0) // P)
            mine = pieces[bisect.bisect_left(piece_blocks, c0) : bisect.bisect_left(piece_blocks, c1)]
            full = tuple((sr, b - c0, n) for sr, b, n in mine if n >= 2)
            staged = [(sr, b - c0, B) for sr, b, n in mine if n == 1]
            staged += [(sr, b - c0, n) for sr, b, n in tails[bisect.bisect_left(tail_blocks, c0) : bisect.bisect_left(tail_blocks, c1)]]
            code_bytes, scale_offset, header_offset, message_bytes = fmt.message_layout(s, B)
            chunks.append(
                Chunk(ci, c0, s, c1 - c0, server_row, code_bytes, scale_offset, header_offset, message_bytes,
                      full, tuple(sorted(staged, key=lambda t: t[1])))
            )
            server_row += s
        plan = ExchangePlan(keys, numels, tuple(offsets), P, fmt, B, per_chunk * B, layout, tuple(chunks))
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

    def chunk_sizes(self) -> List[int]:
        """Values per chunk (padding included), in order."""
        return [self.world_size * c.shard_blocks * self.block_size for c in self.chunks]


def header_of(plan: ExchangePlan, chunk: int, step: int, bucket_index: int) -> Tuple[int, int, int, int]:
    """The four int32 of a message header: step, bucket index, ``chunk * 256 + format.header_id``, bucket numel."""
    return (step & 0x7FFF_FFFF, bucket_index & 0x7FFF_FFFF, (chunk << 8) | plan.format.header_id, plan.numel & 0x7FFF_FFFF)
