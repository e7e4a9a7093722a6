"""A new wire format is one registry entry (plus its kernels and CLI choice): everything else follows it.

A test-only format is registered for the length of each test: int4 codes and fp32 scales, but a
message layout with 16 spare bytes before the header and a header id of its own. No formula by
``bits`` gives that layout, so the exchange's plan, its message views and headers, the collectives'
byte counts, the cost model, the configs and the CLI must all be asking the format.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest
import torch

from gradcomp.codec import formats
from gradcomp.codec.formats import HEADER_BYTES, WireFormat, wire_format
from gradcomp.comm.buffers import ExchangeBuffers
from gradcomp.comm.exchange import HeaderMismatch, check_header, encode, exchange_local
from gradcomp.comm.plan import ExchangePlan, ShardLayout

NUMELS = (300, 512, 256, 1000, 2048, 7, 9 * 256)
B = 256
SPARE = 16


@dataclass(frozen=True)
class _Spacious(WireFormat):
    """int4 codes, fp32 scales, and ``SPARE`` bytes between the scales and the header."""

    def message_layout(self, blocks: int, block_size: int):
        code, scale_offset, header_offset, total = super().message_layout(blocks, block_size)
        return code, scale_offset, header_offset + SPARE, total + SPARE


TOY = _Spacious("int4sp", 4, "int", "fp32", header_id=77)


@pytest.fixture(autouse=True)
def toy_format(monkeypatch):
    monkeypatch.setitem(formats.FORMATS, TOY.name, TOY)
    yield TOY


def test_the_registry_names_it_and_the_shorthand_still_means_int4():
    assert wire_format("int4sp") is TOY and TOY.short == "int4sp"
    assert wire_format(4) is formats.FORMATS["int4"]
    assert formats.format_of_header(77) is TOY and "int4sp" in formats.format_names()


@pytest.mark.parametrize("P", [2, 3])
def test_plan_sizes_follow_the_format(P):
    for chunk in (None, 3 * B, 1000):
        toy = ExchangePlan.build(NUMELS, P, "int4sp", B, chunk)
        ref = ExchangePlan.build(NUMELS, P, "int4", B, chunk)
        assert toy.format is TOY and len(toy.chunks) == len(ref.chunks)
        for c, r in zip(toy.chunks, ref.chunks):
            assert c.message_bytes == TOY.message_bytes(c.shard_blocks, B) == r.message_bytes + SPARE
            assert c.header_offset == r.header_offset + SPARE
        assert toy.bytes_sent == ref.bytes_sent + 2 * (P - 1) * SPARE * len(toy.chunks)
        assert toy.sizes == ExchangePlan.sizes_of(sum(-(-n // B) * B for n in NUMELS), P, "int4sp", B, chunk)
    layout = ShardLayout(1000, 3, "int4sp", B)
    assert layout.bits == "int4sp" and layout.framed_message_bytes == ShardLayout(1000, 3, 4, B).framed_message_bytes + SPARE


@pytest.mark.parametrize("P", [2, 3])
def test_the_exchange_runs_it_bit_for_bit_like_its_codes(P):
    """Same codes and scales as int4: the same mean, however the message is laid out."""
    g = torch.Generator().manual_seed(P)
    xs = [torch.randn(sum(NUMELS), generator=g) for _ in range(P)]
    out = {}
    for name in ("int4", "int4sp"):
        plan = ExchangePlan.build(NUMELS, P, name, B, 3 * B)
        res = [torch.zeros(plan.padded_numel) for _ in range(P)]
        sres = [torch.zeros(plan.server_numel) for _ in range(P)]
        out[name], finite = exchange_local(plan, xs, residuals=res, server_residuals=sres)
        assert finite
    assert torch.equal(out["int4"], out["int4sp"])


def test_headers_carry_its_id_and_a_mismatch_names_both_formats():
    toy = ExchangePlan.build(NUMELS, 2, "int4sp", B, 3 * B)
    send = encode(toy, ExchangeBuffers.allocate(toy), 1, torch.randn(toy.numel), header=(5, 2))
    _, _, hdr = ExchangeBuffers.allocate(toy).to_views(1, send, 2)
    assert (hdr[:, 2] & 0xFF).tolist() == [77, 77] and (hdr[:, 2] >> 8).tolist() == [1, 1]
    check_header(toy, 1, send, 5, 2)
    # a peer that sent int4 messages of the same size: its header names int4
    wrong = send.clone()
    _, _, whdr = ExchangeBuffers.allocate(toy).to_views(1, wrong, 2)
    whdr[1, 2] = (1 << 8) | formats.FORMATS["int4"].header_id
    with pytest.raises(HeaderMismatch, match="rank 1 sent .* format int4, .* expected .* format int4sp"):
        check_header(toy, 1, wrong, 5, 2)


def test_the_cost_model_sizes_it_as_the_exchange_does():
    from gradcomp.analysis import costmodel as cm
    from gradcomp.comm.hierarchical import HierarchicalLayout

    n, P = 3_000_001, 4
    assert cm.parse_scheme("twophase-int4sp") == cm.Scheme.exchange("int4sp")
    for chunk in (None, 1 << 20):
        e = cm.estimate("twophase-int4sp", n, cm.Cluster(P, 1e9), chunk_numel=chunk)
        assert e.bytes_per_rank == ExchangePlan.build([n], P, "int4sp", B, chunk).bytes_sent
        assert e.bytes_per_rank == cm.estimate("twophase-int4", n, cm.Cluster(P, 1e9), chunk_numel=chunk).bytes_per_rank + (
            2 * (P - 1) * SPARE * cm.pipeline_chunks(n, P, B, chunk))
    hier = cm.estimate("hier-int4sp", n, cm.Cluster(8, 1e9, nodes=2))
    inter = HierarchicalLayout(n, 2, 4, "int4sp", B).inter_bytes_sent
    assert inter == HierarchicalLayout(n, 2, 4, 4, B).inter_bytes_sent + 2 * SPARE
    assert hier.bytes_per_rank == inter + 2 * 3 / 4 * n * 4
    assert "twophase-int4sp" in [s.name for s in cm.default_schemes()]


def test_the_configs_and_the_cli_take_it_by_name():
    from gradcomp.analysis.gradexp import ReplayConfig
    from gradcomp.cli import grads
    from gradcomp.comm.fsdp import FSDPCompressConfig
    from gradcomp.comm.policy import PolicyConfig

    assert ReplayConfig("int4sp").format is TOY
    assert FSDPCompressConfig(grad_bits="int4sp").grad_format is TOY
    assert PolicyConfig(candidates=(32, "int4sp")).allowed == (32, "int4sp")
    args = argparse.Namespace(format="int4sp,int8", bits=None, block_sizes="64", rounding="nearest", error_feedback="on", seed=0)
    assert [c.format for c in grads._configs(args)] == [TOY, formats.FORMATS["int8"]]


def test_spare_bytes_are_never_read_as_scales_or_header():
    toy = ExchangePlan.build((4 * B,), 2, "int4sp", B, None)
    bufs = ExchangeBuffers.allocate(toy)
    send = encode(toy, bufs, 0, torch.randn(4 * B), header=(1, 0))
    c = toy.chunks[0]
    m = send.view(2, c.message_bytes)
    spare = m[:, c.header_offset - SPARE : c.header_offset]
    assert not spare.any()  # untouched: the views end where the format says
    assert c.header_offset + HEADER_BYTES == c.message_bytes
