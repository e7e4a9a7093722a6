"""The communication cost model against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from gradcomp.analysis import costmodel as cm
from gradcomp.codec.formats import HEADER_BYTES
from gradcomp.comm.measure import measure_hook_codec
from gradcomp.comm.plan import ExchangePlan, ShardLayout

GBIT10 = 1.25e9  # 10 Gbit/s in bytes per second


# --------------------------------------------------------------------------------------------
# hand-computed cases


def test_ring_fp32_7b_on_8_workers_at_10gbit():
    c = cm.Cluster(workers=8, bandwidth=GBIT10, latency=5e-6)
    e = cm.estimate("ring-fp32", 7_000_000_000, c)
    # 2 * 7/8 * 7e9 * 4 bytes = 49 GB; 49e9 / 1.25e9 = 39.2 s; 14 latency steps of 5 us
    assert e.bytes_per_rank == pytest.approx(49e9)
    assert e.wire_s == pytest.approx(39.2)
    assert e.latency_s == pytest.approx(14 * 5e-6)
    assert e.total_s == pytest.approx(39.2 + 70e-6)
    assert e.compute_s == 0.0


def test_ring_bf16_is_half_of_fp32():
    c = cm.Cluster(workers=4, bandwidth=1e9, latency=1e-5)
    f32 = cm.estimate("ring-fp32", 10_000_000, c)
    b16 = cm.estimate("ring-bf16", 10_000_000, c)
    assert b16.bytes_per_rank == pytest.approx(f32.bytes_per_rank / 2)
    assert b16.latency_s == f32.latency_s


def test_twophase_bytes_match_the_shard_layout_example():
    # ShardLayout(1000, 3, 4, 256): 2 blocks per shard, 256 code bytes + 8 scale bytes + a 16-byte header,
    # 2 * 2 * 280 = 1120
    c = cm.Cluster(workers=3, bandwidth=1e6, latency=0.0)
    e = cm.estimate("twophase-int4", 1000, c)
    assert ShardLayout(1000, 3, 4, 256).framed_message_bytes == 280
    assert e.bytes_per_rank == 1120 == ShardLayout(1000, 3, 4, 256).bytes_sent + 2 * 2 * HEADER_BYTES
    assert e.wire_s == pytest.approx(1120 / 1e6)


@pytest.mark.parametrize("chunk_numel", [None, 4096, 1 << 20])
@pytest.mark.parametrize("numel,world,bits", [(1, 2, 8), (4097, 5, 4), (1 << 20, 8, 2), (123_457, 3, 8), (3_000_001, 4, 4)])
def test_twophase_bytes_equal_what_the_collective_sends(numel, world, bits, chunk_numel):
    """The cost model's bytes are the exchange plan's: chunks, padding, scales and headers."""
    e = cm.estimate(f"twophase-int{bits}", numel, cm.Cluster(world, 1e9), chunk_numel=chunk_numel)
    plan = ExchangePlan.build([numel], world, bits, 256, chunk_numel)
    assert e.bytes_per_rank == plan.bytes_sent == ExchangePlan.sizes_of(numel, world, bits, 256, chunk_numel).bytes_sent
    assert e.wire_bytes == plan.bytes_sent  # one worker per node: every message crosses the main link
    assert e.latency_s == pytest.approx(2 * (world - 1) * len(plan.chunks) * cm.Cluster(world, 1e9).latency)


def test_twophase_ratio_to_fp32_ring_when_sizes_divide():
    n, P = 8 * 256 * 1000, 8
    c = cm.Cluster(workers=P, bandwidth=1e9)
    ring = cm.estimate("ring-fp32", n, c).bytes_per_rank
    headers = 2 * (P - 1) * HEADER_BYTES  # one chunk: one header per message
    assert (cm.estimate("twophase-int8", n, c).bytes_per_rank - headers) / ring == pytest.approx((1 + 4 / 256) / 4)
    assert (cm.estimate("twophase-int4", n, c).bytes_per_rank - headers) / ring == pytest.approx((0.5 + 4 / 256) / 4)


def test_twophase_codec_time_from_throughput():
    tp = cm.CodecThroughput(quantize_eps=1e9, dequantize_eps=2e9)
    e = cm.estimate("twophase-int8", 1_000_000, cm.Cluster(4, 1e9), tp)
    # quantize N + N/P = 1.25e6 elements at 1e9/s; dequantize 2N = 2e6 at 2e9/s
    assert e.compute_s == pytest.approx(1.25e-3 + 1e-3)
    assert cm.CodecThroughput.from_bytes_per_s(8e9).quantize_eps == 2e9


def test_allgather_int8_bytes_and_codec():
    tp = cm.CodecThroughput(1e9, 1e9)
    e = cm.estimate("allgather-int8", 1_000_000, cm.Cluster(5, 1e8, latency=1e-3), tp)
    assert e.bytes_per_rank == 4 * (1_000_000 + 8)
    assert e.latency_s == pytest.approx(2 * 4 * 1e-3)
    assert e.compute_s == pytest.approx(1e-3 + 5e-3)  # quantize N, dequantize P * N


def test_tree_latency_and_port_bytes():
    c = cm.Cluster(workers=8, bandwidth=1e9, latency=1e-4)
    e = cm.estimate("tree-fp32", 1_000_000, c)
    assert e.latency_s == pytest.approx(2 * 3 * 1e-4)  # log2(8) levels, up and down
    assert e.wire_bytes == pytest.approx(2 * 4e6)  # an interior node: N b per phase
    assert e.bytes_per_rank == pytest.approx(2 * 7 / 8 * 4e6)
    two = cm.estimate("tree-fp32", 1_000_000, cm.Cluster(2, 1e9, 1e-4))
    assert two.wire_bytes == pytest.approx(4e6) and two.latency_s == pytest.approx(2e-4)


def test_hierarchical_hand_computed():
    n = 1 << 20
    c = cm.Cluster(workers=8, nodes=2, bandwidth=1e9, latency=1e-5, intra_bandwidth=1e11, intra_latency=1e-6)
    tp = cm.CodecThroughput(1e9, 1e9)
    e = cm.estimate("hier-int8", n, c, tp)
    # L = 4 per node: fp32 reduce-scatter + all-gather inside, 2 * 3/4 * N * 4 bytes per rank
    intra = 2 * 3 / 4 * n * 4
    # across M = 2 nodes each rank exchanges N/4 = 262144 elements: shard of 131072 = 512 blocks, and a header
    s_h = 131072 + 4 * 512 + HEADER_BYTES
    assert e.bytes_per_rank == pytest.approx(intra + 2 * 1 * s_h)
    assert e.wire_bytes == pytest.approx(4 * 2 * s_h)  # the 4 ranks of a node share its NIC
    assert e.intra_s == pytest.approx(intra / 1e11)
    assert e.latency_s == pytest.approx(2 * 1e-5 + 2 * 3 * 1e-6)
    q = n / 4
    assert e.compute_s == pytest.approx((q + q / 2) / 1e9 + 2 * q / 1e9)


def test_hierarchical_with_one_worker_per_node_is_the_flat_exchange():
    c = cm.Cluster(workers=6, bandwidth=1e9, latency=1e-5)
    tp = cm.CodecThroughput(3e8, 5e8)
    h = cm.estimate("hier-int4", 999_999, c, tp)
    f = cm.estimate("twophase-int4", 999_999, c, tp)
    assert h.total_s == pytest.approx(f.total_s) and h.bytes_per_rank == f.bytes_per_rank


def test_one_node_uses_the_given_link_like_one_worker_per_node():
    a = cm.compare(10_000_000, cm.Cluster(4, 1e9, 1e-5, nodes=1))
    b = cm.compare(10_000_000, cm.Cluster(4, 1e9, 1e-5))
    assert [x.total_s for x in a] == pytest.approx([x.total_s for x in b])


def test_flat_twophase_across_nodes_pays_for_the_shared_nic():
    # 4 workers per node on 2 nodes: the all-to-all sends L * (P - L) = 16 shards off each node,
    # the ring all-gather P - 1 = 7 over each inter-node edge (instead of 2 * 7 with one worker per node)
    c = cm.Cluster(workers=8, nodes=2, bandwidth=1e9)
    e = cm.estimate("twophase-int8", 8 * 256, c)
    s = 256 + 4 + HEADER_BYTES
    assert e.bytes_per_rank == 2 * 7 * s
    assert e.wire_bytes == (4 * 4 + 7) * s
    assert e.intra_s == pytest.approx(3 * s / c.intra_bandwidth)


def test_single_worker_costs_nothing():
    for e in cm.compare(1000, cm.Cluster(1, 1e9)):
        assert e.total_s == 0 and e.bytes_per_rank == 0


def test_compare_lists_hierarchical_only_with_several_workers_per_node():
    flat = {e.scheme for e in cm.compare(1000, cm.Cluster(8, 1e9))}
    multi = {e.scheme for e in cm.compare(1000, cm.Cluster(8, 1e9, nodes=2))}
    assert "hier-int8" not in flat and "hier-int8" in multi
    assert {"ring-fp32", "ring-bf16", "ring-fp16", "tree-fp32", "twophase-int2", "allgather-int8"} <= flat


# --------------------------------------------------------------------------------------------
# break-even bandwidth


def test_break_even_is_where_the_times_cross():
    c = cm.Cluster(workers=8, bandwidth=1e9, latency=5e-6)
    tp = cm.CodecThroughput(5e8, 1e9)
    n = 50_000_000
    be = cm.break_even_bandwidth("twophase-int8", n, c, tp)
    assert 0 < be < math.inf

    def total(scheme, bw):
        return cm.estimate(scheme, n, cm.Cluster(8, bw, 5e-6), tp).total_s

    assert total("twophase-int8", be) == pytest.approx(total("ring-fp32", be), rel=1e-9)
    assert total("twophase-int8", be / 2) < total("ring-fp32", be / 2)
    assert total("twophase-int8", be * 2) > total("ring-fp32", be * 2)


def test_break_even_hand_computed():
    # int8 saves 2*(P-1)/P*N*(4 - 1 - 4/256) bytes less its 2 (P-1) headers, and costs the codec time
    n, p = 8 * 256 * 100, 8
    tp = cm.CodecThroughput(1e8, 1e8)
    saved = 2 * (p - 1) / p * n * (4 - 1 - 4 / 256) - 2 * (p - 1) * HEADER_BYTES
    codec_s = (n + n / p + 2 * n) / 1e8
    be = cm.break_even_bandwidth("twophase-int8", n, cm.Cluster(p, 1e9, 0.0), tp)
    assert be == pytest.approx(saved / codec_s)


def test_break_even_extremes():
    c = cm.Cluster(workers=8, bandwidth=1e9)
    assert cm.break_even_bandwidth("ring-bf16", 10**6, c) == math.inf  # fewer bytes, same latency
    assert cm.break_even_bandwidth("twophase-int4", 10**6, c) == math.inf  # no codec cost given
    assert cm.break_even_bandwidth("allgather-int8", 10**6, cm.Cluster(16, 1e9), cm.CodecThroughput(1e9, 1e9)) == 0.0


# --------------------------------------------------------------------------------------------
# sweep, codec measurement


def test_sweep_over_workers_and_bandwidth_match_estimate():
    c = cm.Cluster(workers=8, nodes=2, bandwidth=1e9)
    out = cm.sweep(10**7, c, "workers", [4, 8, 16], ["ring-fp32", "hier-int4"])
    assert out["x"] == [4, 8, 16]
    want = cm.estimate("hier-int4", 10**7, cm.Cluster(16, 1e9, nodes=4)).total_s
    assert out["hier-int4"][2] == pytest.approx(want)
    bw = cm.sweep(10**7, cm.Cluster(8, 1e9), "bandwidth", [1e8, 1e9], ["ring-fp32"])
    assert bw["ring-fp32"][0] > bw["ring-fp32"][1]
    with pytest.raises(ValueError, match="multiple of the 4 workers per node"):
        cm.sweep(10**7, c, "workers", [6])
    with pytest.raises(ValueError, match="over must be"):
        cm.sweep(10**7, c, "latency", [1])


def test_measure_hook_codec_is_positive_and_described():
    from gradcomp.codec import kernels

    tp = measure_hook_codec(4, 256, 1 << 14, world_size=2, repeats=2)  # the hook's default: fused kernels
    assert tp.quantize_eps > 0 and tp.dequantize_eps > 0
    assert "int4" in tp.source and kernels.backend("cpu") in tp.source
    assert "eager" in measure_hook_codec(4, 256, 1 << 14, world_size=2, repeats=2, fused=False).source


def test_schemes_are_objects_and_names_are_only_for_people():
    plain, q = cm.Scheme.plain(), cm.Scheme.exchange(4, hierarchical=True)
    assert plain == cm.parse_scheme("ring-fp32") and q == cm.parse_scheme("hier-int4")
    assert cm.parse_scheme(q) is q
    c = cm.Cluster(4, 1e9, nodes=2)
    assert cm.estimate(q, 10**6, c) == cm.estimate("hier-int4", 10**6, c)
    with pytest.raises(TypeError, match="scheme must be a Scheme or a name"):
        cm.parse_scheme(8)


# --------------------------------------------------------------------------------------------
# validation of inputs


@pytest.mark.parametrize("kwargs,match", [
    (dict(workers=0, bandwidth=1e9), "workers must be a positive int"),
    (dict(workers=8, bandwidth=0), "bandwidth must be a positive"),
    (dict(workers=8, bandwidth=1e9, latency=-1), "latency must be a non-negative"),
    (dict(workers=8, bandwidth=1e9, nodes=3), "workers must be a multiple of nodes"),
    (dict(workers=8, bandwidth=1e9, nodes=16), "workers must be a multiple of nodes"),
])
def test_cluster_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cm.Cluster(**kwargs)


def test_cluster_rejects_a_bool_as_a_type_error():
    with pytest.raises(TypeError, match="workers must be a positive int, got bool True"):
        cm.Cluster(workers=True, bandwidth=1e9)


def test_bad_scheme_and_params():
    with pytest.raises(ValueError, match="scheme must look like"):
        cm.parse_scheme("butterfly-fp32")
    with pytest.raises(ValueError, match="ring runs on fp32, bf16 or fp16"):
        cm.parse_scheme("ring-int8")
    with pytest.raises(ValueError, match="int8, int4, int2, fp8_e4m3, .* or mxfp4r"):
        cm.Scheme("twophase", 3, "int")
    with pytest.raises(ValueError, match="params must be a positive int"):
        cm.estimate("ring-fp32", 0, cm.Cluster(2, 1e9))
    with pytest.raises(TypeError, match="cluster must be a Cluster"):
        cm.estimate("ring-fp32", 10, {"workers": 2})
    assert cm.parse_scheme("hier-int2").name == "hier-int2"


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from gradcomp.plots.costmodel import plot_cost_sweep, plot_validation

    c = cm.Cluster(8, 1.25e9)
    curves = cm.sweep(10**8, c, "bandwidth", [1e8, 1e9, 1e10], ["ring-fp32", "twophase-int8"])
    out = plot_cost_sweep(curves, "bandwidth", tmp_path / "s.png", "t", break_even={"twophase-int8": 5e8})
    assert (tmp_path / "s.png").stat().st_size > 5000 and out.endswith("s.png")
    rows = [{"kind": "a", "predicted_s": 0.1, "measured_s": 0.12}, {"kind": "b", "predicted_s": 1.0, "measured_s": 0.9}]
    plot_validation(rows, tmp_path / "v.png")
    assert (tmp_path / "v.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="over must be"):
        plot_cost_sweep(curves, "latency", tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one measurement"):
        plot_validation([], tmp_path / "x.png")


def test_pipelined_exchange_overlaps_codec_and_wire():
    c = cm.Cluster(2, 125e6, 0.0)
    tp = cm.CodecThroughput(1e8, 1e8)
    n = 4_000_000
    plain = cm.estimate(cm.Scheme.exchange(8), n, c, tp)
    piped = cm.estimate(cm.Scheme.exchange(8), n, c, tp, chunk_numel=1_000_000)
    # 4 chunks: the shorter of transfer and codec is hidden but for one chunk of it
    hidden = min(piped.wire_s, piped.compute_s) * 3 / 4
    assert piped.overlap_s == pytest.approx(hidden)
    assert piped.total_s == pytest.approx(piped.latency_s + piped.wire_s + piped.compute_s - hidden)
    # the chunks cost their headers: 3 more messages each way than one chunk
    assert piped.wire_bytes == plain.wire_bytes + 3 * 2 * (2 - 1) * HEADER_BYTES
    one = cm.estimate(cm.Scheme.exchange(8), n, c, tp, chunk_numel=n)  # one chunk: nothing overlaps
    assert one.total_s == pytest.approx(plain.total_s) and one.overlap_s == 0
    # the break-even bandwidth rises with overlap, and at it the two times are equal
    be = cm.break_even_bandwidth(cm.Scheme.exchange(8), n, c, tp)
    be_p = cm.break_even_bandwidth(cm.Scheme.exchange(8), n, c, tp, chunk_numel=1_000_000)
    assert be_p > be
    at = cm.Cluster(2, be_p, 0.0)
    assert cm.estimate(cm.Scheme.exchange(8), n, at, tp, chunk_numel=1_000_000).total_s == pytest.approx(
        cm.estimate(cm.Scheme.plain(), n, at).total_s, rel=1e-6)


@pytest.mark.parametrize("workers", [2, 3, 4, 8])
@pytest.mark.parametrize("numel", [1, 255, 9 * 256, 300_000, (1 << 20) + 256 * 7])
@pytest.mark.parametrize("chunk_numel", [None, 4096, 1 << 18, 1 << 20])
def test_pipeline_chunks_is_the_hooks_chunk_count(workers, numel, chunk_numel):
    plan = ExchangePlan.build([numel], workers, 8, 256, chunk_numel)
    assert cm.pipeline_chunks(numel, workers, 256, chunk_numel) == len(plan.chunks)


@pytest.mark.parametrize("workers", [2, 4])
def test_chunked_exchange_pays_its_latency_per_chunk_and_per_peer(workers):
    """Every chunk is an all-to-all and an all-gather of P - 1 messages each: 2 (P-1) k alpha in all."""
    alpha = 1e-3
    c = cm.Cluster(workers, 125e6, alpha)
    tp = cm.CodecThroughput(1e8, 1e8)
    n = 4_000_000
    one = cm.estimate(cm.Scheme.exchange(8), n, c, tp)
    assert one.latency_s == pytest.approx(2 * (workers - 1) * alpha)
    for chunk, k in ((1 << 20, 4), (1 << 18, 16)):
        piped = cm.estimate(cm.Scheme.exchange(8), n, c, tp, chunk_numel=chunk)
        assert piped.latency_s == pytest.approx(2 * (workers - 1) * k * alpha)
        # the same padding (chunks are multiples of P blocks), one header per message of every chunk
        assert piped.wire_bytes == one.wire_bytes + (k - 1) * 2 * (workers - 1) * HEADER_BYTES
        assert piped.compute_s == one.compute_s
    # smaller chunks: more messages, so a latency-bound link prefers the bigger ones
    assert cm.estimate(cm.Scheme.exchange(8), n, c, tp, chunk_numel=1 << 18).total_s > cm.estimate(
        cm.Scheme.exchange(8), n, c, tp, chunk_numel=1 << 20).total_s
