"""The tensors of one bucket's exchange: persistent message buffers, the staging of ragged blocks, message views.

An :class:`~gradcomp.comm.plan.ExchangePlan` holds no tensors; :class:`ExchangeBuffers` holds what
its steps write and read, per chunk, allocated once per bucket (a route allocates only the buffers
its steps touch: :data:`ROUTE_ALLREDUCE`, :data:`ROUTE_REDUCE_SCATTER`, :data:`ROUTE_GATHER_SEND`,
:data:`ROUTE_GATHER_RECV`). :func:`message_views` cuts a buffer of messages into codes, scales and
headers at the offsets the plan's wire format gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from gradcomp.codec.formats import HEADER_BYTES
from gradcomp.codec.kernels import scale_shape
from gradcomp.comm.plan import Chunk, ExchangePlan

__all__ = [
    "ExchangeBuffers",
    "Staging",
    "ShardPick",
    "message_views",
    "ROUTE_ALLREDUCE",
    "ROUTE_REDUCE_SCATTER",
    "ROUTE_GATHER_SEND",
    "ROUTE_GATHER_RECV",
]

ROUTE_ALLREDUCE = ("send", "recv", "mine", "gathered")  # the message buffers each route needs
ROUTE_REDUCE_SCATTER = ("send", "recv")
ROUTE_GATHER_SEND = ("send",)
ROUTE_GATHER_RECV = ("gathered",)

def message_views(plan: ExchangePlan, c: Chunk, buf: torch.Tensor, rows: int):
    """Views of ``rows`` messages laid side by side (0: as many as ``buf`` holds).

    Returns codes ``(rows, s, code bytes per block)``, scales ``(rows, s)`` (fp32) or ``(rows, s,
    block / group)`` (e8m0 bytes) and headers ``(rows, 4)``, at the offsets the format's message
    layout gives (:class:`Chunk`).
    """
    fmt, B = plan.format, plan.block_size
    m = c.message_bytes
    v = buf.view(-1, m) if rows == 0 else buf.view(rows, m)
    codes = v[:, : c.code_bytes].view(v.shape[0], c.shard_blocks, fmt.code_bytes(B))
    # message_bytes, scale_offset and header_offset are multiples of 4: the fp32 and int32 views need no copy
    scales = v[:, c.scale_offset : c.scale_offset + fmt.scale_bytes_per_block(B) * c.shard_blocks]
    if fmt.scale == "fp32":
        scales = scales.view(torch.float32)
    else:
        scales = scales.view(v.shape[0], c.shard_blocks, fmt.scales_per_block(B))
    header = v[:, c.header_offset : c.header_offset + HEADER_BYTES].view(torch.int32)
    return codes, scales, header


@dataclass
class Staging:
    """The staged blocks of one chunk (ragged last blocks, one-block runs) and their small buffers.

    ``x``, ``res_in``, ``res_out``, ``noise``, ``codes``, ``scale`` and ``out`` have ``max(nt, 2)``
    rows: the compiled (CUDA) kernels are built for rows >= 2; the zero padding stays zero.
    """

    nt: int
    src: torch.Tensor  # bucket indices of the staged values
    dst: torch.Tensor  # indices into x (rows * B)
    rows: torch.Tensor  # aligned rows of the staged blocks
    shard: torch.Tensor  # shard k of each staged block
    row: torch.Tensor  # row inside the shard
    x: torch.Tensor  # fp32 (max(nt, 2), B)
    res_in: torch.Tensor
    res_out: torch.Tensor
    noise: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    out: torch.Tensor
    picks: dict = field(default_factory=dict)  # shard k -> ShardPick (decode_sum), built on first use


@dataclass
class ShardPick:
    """The staged blocks of one shard, for the exchange's ``decode_sum``: their rows in the shard and their values."""

    rows: torch.Tensor  # row inside the shard of each staged block of shard k
    src: torch.Tensor  # bucket indices of their values
    dst: torch.Tensor  # indices into out (rows * B)
    codes: torch.Tensor  # (P, max(m, 2), bytes): the P received copies of those blocks
    scale: torch.Tensor  # (P, max(m, 2)) fp32, or (P, max(m, 2), B / group) e8m0 bytes
    out: torch.Tensor  # fp32 (max(m, 2), B)


@dataclass
class ExchangeBuffers:
    """Persistent buffers of one bucket's exchange (keep them per bucket; none is of bucket size in fp32).

    Attributes:
        send, recv, gathered: per chunk, uint8 ``(P * message_bytes,)``: the all-to-all's input and
            output and the all-gather's output; ``mine``: per chunk, this rank's reduced message.
            A buffer the route does not need (:meth:`allocate`'s ``need``) is an empty list.
        staging: per chunk, its :class:`Staging` (None: no staged block).
    """

    plan: ExchangePlan
    send: List[torch.Tensor]
    recv: List[torch.Tensor]
    mine: List[torch.Tensor]
    gathered: List[torch.Tensor]
    staging: List[Optional[Staging]] = field(default_factory=list)

    @staticmethod
    def allocate(plan: ExchangePlan, device=None, need: Sequence[str] = ROUTE_ALLREDUCE) -> "ExchangeBuffers":
        """Allocate the message buffers ``need`` names on ``device`` (the others stay empty lists).

        A route allocates only what its steps touch: the all-reduce (:data:`ROUTE_ALLREDUCE`) all
        four, a reduce-scatter (:data:`ROUTE_REDUCE_SCATTER`: encode, all-to-all, ``decode_sum``)
        ``send`` and ``recv``, an all-gather's sending side ``send`` and its receiving side
        (``decode``) ``gathered``. The staging of ragged blocks (a few blocks) is always there.
        Padding blocks of ``send`` are written once: the format's zero code, scale bytes 0 (fp32 0.0;
        e8m0 ``2**-127``, times zero codes): they decode to zero.
        """
        unknown = set(need) - set(ROUTE_ALLREDUCE)
        if unknown or isinstance(need, str):
            raise ValueError(f"need must name some of {ROUTE_ALLREDUCE}, got {need!r}")
        device = torch.device("cpu") if device is None else torch.device(device)
        P = plan.world_size
        bufs = ExchangeBuffers(plan, [], [], [], [])
        for c in plan.chunks:
            m = c.message_bytes
            if "send" in need:
                send = torch.zeros(P * m, dtype=torch.uint8, device=device)
                sv = send.view(P, m)
                sv[:, : c.code_bytes] = plan.format.zero_byte  # padding blocks stay code "0" with scale 0 forever
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
        """Codes ``(rows, shard_blocks, bytes)``, scales ``(rows, shard_blocks)`` and headers ``(rows, 4)`` of a message buffer."""
        return message_views(self.plan, self.plan.chunks[c], buf, rows)

    def shard_pick(self, c: int, k: int) -> Optional[ShardPick]:
        """The staged blocks of shard ``k`` of chunk ``c`` and their buffers (built on first use), or None."""
        st = self.staging[c]
        if st is None:
            return None
        pick = st.picks.get(k)
        if pick is None and k not in st.picks:
            plan, ch = self.plan, self.plan.chunks[c]
            B, s, P = plan.block_size, ch.shard_blocks, plan.world_size
            mine = [(sr, b, n) for sr, b, n in ch.staged if b // s == k]
            if mine:
                device = st.x.device
                m = max(len(mine), 2)  # at least two rows: the compiled (CUDA) kernels are built for rows >= 2
                pick = ShardPick(
                    rows=torch.tensor([b - k * s for _, b, _ in mine], dtype=torch.long, device=device),
                    src=torch.cat([torch.arange(sr, sr + n) for sr, _, n in mine]).to(device),
                    dst=torch.cat([torch.arange(i * B, i * B + n) for i, (_, _, n) in enumerate(mine)]).to(device),
                    codes=torch.zeros(P, m, plan.format.code_bytes(B), dtype=torch.uint8, device=device),
                    scale=torch.zeros((P,) + scale_shape(plan.format, m, B), dtype=getattr(torch, plan.format.scale_dtype), device=device),
                    out=torch.zeros(m, B, dtype=torch.float32, device=device),
                )
            st.picks[k] = pick
        return pick


def _make_staging(plan: ExchangePlan, c: Chunk, device) -> Optional[Staging]:
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
    return Staging(
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
        codes=torch.zeros(rows, plan.format.code_bytes(B), dtype=torch.uint8, device=device),
        scale=torch.zeros(scale_shape(plan.format, rows, B), dtype=getattr(torch, plan.format.scale_dtype), device=device),
        out=torch.zeros(rows, B, **f32),
    )
