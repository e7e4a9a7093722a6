"""The measured policy: the alpha-beta fit, decisions from injected figures, and the hook following them on gloo."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from gradcomp.comm.hierarchical import HierarchicalLayout
from gradcomp.comm.policy import PLAIN, CommPolicy, LinkFit, NetworkFit, PolicyConfig, fit_latency_bandwidth
from gradcomp.comm.topology import Topology
from gradcomp.comm.cost import CodecThroughput

from _dist import spawn

CODEC = ((8, CodecThroughput(4e8, 8e8)), (4, CodecThroughput(3e8, 6e8)))


def _fit(latency, bandwidth, intra=None):
    return NetworkFit(link=LinkFit(latency, bandwidth), intra=intra, codec=CODEC)


# ---------------------------------------------------------------------------------------------
# fitting


@pytest.mark.parametrize("workers", [2, 4, 6])
def test_fit_recovers_latency_and_bandwidth(workers):
    alpha, beta = 40e-6, 120e6
    numels = [256, 4096, 65536, 262144, 1048576]
    k = 2 * (workers - 1)
    times = [k * alpha + (2 * (workers - 1) / workers * 4 * n) / beta for n in numels]
    # 3% multiplicative noise, alternating, must not move the fit far
    noisy = [t * (1.03 if i % 2 else 0.97) for i, t in enumerate(times)]
    exact = fit_latency_bandwidth(numels, times, workers)
    assert exact.latency == pytest.approx(alpha, rel=1e-6) and exact.bandwidth == pytest.approx(beta, rel=1e-6)
    assert exact.rel_rmse < 1e-9 and exact.samples == 5
    fit = fit_latency_bandwidth(numels, noisy, workers)
    assert fit.latency == pytest.approx(alpha, rel=0.2) and fit.bandwidth == pytest.approx(beta, rel=0.1)
    assert 0.01 < fit.rel_rmse < 0.05


def test_fit_takes_the_sustained_rate_from_the_largest_probes():
    # a rate limiter lets mid-sized probes through at twice the rate (its burst, socket buffers):
    # the bandwidth must still be the sustained one, or every bucket-sized transfer is under-predicted
    alpha, beta, workers = 250e-6, 118e6, 2
    numels = [256, 4096, 65536, 262144, 1048576, 4194304]
    fast = {65536: 2.0, 262144: 1.6}
    times = [2 * alpha + 4 * n / (beta * fast.get(n, 1.0)) for n in numels]
    fit = fit_latency_bandwidth(numels, times, workers)
    assert fit.bandwidth == pytest.approx(beta, rel=0.05)
    assert fit.latency == pytest.approx(alpha, rel=0.1)
    largest = 2 * fit.latency + 4 * numels[-1] / fit.bandwidth
    assert largest == pytest.approx(times[-1], rel=0.03)
    assert fit.probes == tuple(zip(numels, times))
    # the probes travel with the fit through a JSON round trip
    nf = NetworkFit(link=fit, codec=CODEC)
    back = NetworkFit.from_dict(json.loads(json.dumps(nf.to_dict())))
    assert back == nf
    with pytest.raises(TypeError, match="probes must hold"):
        LinkFit(1e-4, 1e8, probes=(1, 2))


def test_fit_clamps_negative_latency_and_rejects_bad_input():
    # times proportional to size: no latency at all, and a noisy intercept below zero
    numels = [1000, 10000, 100000]
    times = [n * 8e-9 * 0.9 if i == 0 else n * 8e-9 for i, n in enumerate(numels)]
    fit = fit_latency_bandwidth(numels, times, 2)
    assert fit.latency == 0.0 and fit.bandwidth == pytest.approx(4 / 8e-9, rel=0.05)
    with pytest.raises(ValueError, match="same length >= 2"):
        fit_latency_bandwidth([1], [1.0], 2)
    with pytest.raises(ValueError, match="positive finite seconds"):
        fit_latency_bandwidth([1, 2], [1.0, 0.0], 2)
    with pytest.raises(ValueError, match="workers must be an int >= 2"):
        fit_latency_bandwidth([1, 2], [1.0, 2.0], 1)


# ---------------------------------------------------------------------------------------------
# deciding from injected figures (deterministic)


def test_fast_network_picks_plain_allreduce_everywhere():
    policy = CommPolicy(PolicyConfig(), _fit(5e-6, 12.5e9), workers=4)
    for numel in (1_000, 100_000, 10_000_000):
        assert policy.choose(numel) == PLAIN, policy.describe_choice(numel)


def test_slow_network_picks_compression_for_big_buckets_only():
    policy = CommPolicy(PolicyConfig(), _fit(2e-3, 125e6), workers=4)
    assert policy.choose(10_000_000) == 4
    pred = policy.predict(10_000_000)
    assert pred[4] < pred[8] < pred[PLAIN]
    # a tiny bucket: the same number of messages whatever the width, the codec only adds time
    assert policy.choose(64) == PLAIN
    assert "twophase-int4" in policy.describe_choice(10_000_000)
    assert "beta 125.0 MB/s" in policy.describe()


def test_accuracy_floor_and_pinned_candidates():
    slow = _fit(50e-6, 125e6)
    assert CommPolicy(PolicyConfig(min_bits=8), slow, workers=4).choose(10_000_000) == 8
    assert CommPolicy(PolicyConfig(candidates=(8,)), slow, workers=4).choose(100) == 8  # pinned int8
    assert CommPolicy(PolicyConfig(candidates=(PLAIN,)), slow, workers=4).choose(10_000_000) == PLAIN
    assert PolicyConfig(min_bits=8).allowed == (PLAIN, 8)


def test_decision_matches_the_cost_model_and_its_break_even():
    """The choice flips from compression to plain where gradcomp.comm.cost says int8 stops paying."""
    from gradcomp.analysis.costmodel import Cluster, break_even_bandwidth

    from gradcomp.analysis.costmodel import Scheme

    numel = 4_000_000
    cfg = PolicyConfig(candidates=(PLAIN, 8), min_gain=0.0)
    # the hook pipelines chunks of 1M values: the policy's model overlaps codec and wire like it
    be = break_even_bandwidth(Scheme.exchange(8), numel, Cluster(4, 1e9, 20e-6), CODEC[0][1], chunk_numel=1 << 20)
    assert 0 < be < math.inf
    assert CommPolicy(cfg, _fit(20e-6, be * 0.9), workers=4).choose(numel) == 8
    assert CommPolicy(cfg, _fit(20e-6, be * 1.1), workers=4).choose(numel) == PLAIN
    # without pipelining compression stops paying at a lower bandwidth
    be_serial = break_even_bandwidth(Scheme.exchange(8), numel, Cluster(4, 1e9, 20e-6), CODEC[0][1])
    assert be_serial < be
    assert CommPolicy(cfg, _fit(20e-6, (be + be_serial) / 2), workers=4, chunk_numel=None).choose(numel) == PLAIN


def test_compression_must_win_by_the_margin():
    """Near a tie plain all-reduce (exact) is kept; a clear gain still picks compression."""
    from gradcomp.analysis.costmodel import Cluster, Scheme, break_even_bandwidth

    numel = 4_000_000
    be = break_even_bandwidth(Scheme.exchange(8), numel, Cluster(4, 1e9, 20e-6), CODEC[0][1], chunk_numel=1 << 20)
    assert PolicyConfig().min_gain == 0.2
    just_below = CommPolicy(PolicyConfig(candidates=(PLAIN, 8)), _fit(20e-6, be * 0.9), workers=4)
    pred = just_below.predict(numel)
    assert pred[8] < pred[PLAIN] < pred[8] / 0.8  # int8 is faster, by less than 20%
    assert just_below.choose(numel) == PLAIN
    slow = CommPolicy(PolicyConfig(candidates=(PLAIN, 8)), _fit(20e-6, be * 0.2), workers=4)
    assert slow.predict(numel)[8] < 0.8 * slow.predict(numel)[PLAIN] and slow.choose(numel) == 8
    # without plain among the candidates the fastest width is taken, margin or not
    assert CommPolicy(PolicyConfig(candidates=(8, 4)), _fit(20e-6, be * 0.9), workers=4).choose(numel) in (8, 4)
    for bad in (-0.1, 1.0, True, "0.2"):
        with pytest.raises(ValueError, match="min_gain must be a number in"):
            PolicyConfig(min_gain=bad)


def test_prediction_follows_the_hooks_chunks_and_world_size():
    """The policy predicts the exchange the hook runs: its chunk count, 2 (P-1) messages per chunk."""
    from gradcomp.analysis.costmodel import Cluster, Scheme, estimate, pipeline_chunks

    n = 4_000_000
    for workers in (2, 4):
        times = {}
        for chunk in (1 << 18, 1 << 20, None):
            policy = CommPolicy(PolicyConfig(), _fit(1e-3, 125e6), workers=workers, chunk_numel=chunk)
            want = estimate(Scheme.exchange(8), n, Cluster(workers, 125e6, 1e-3), CODEC[0][1], 256, chunk)
            assert policy.predict(n)[8] == pytest.approx(want.total_s)
            k = pipeline_chunks(n, workers, 256, chunk)
            assert want.latency_s == pytest.approx(2 * (workers - 1) * k * 1e-3)
            times[chunk] = policy.predict(n)[8]
        assert times[1 << 18] > times[1 << 20]  # 16 chunks pay 12 more message rounds than 4
    # the hierarchical exchange cuts no chunks: the hook builds its policy without them
    assert CommPolicy(PolicyConfig(), _fit(1e-3, 125e6, intra=LinkFit(1e-5, 2e9)), workers=4, nodes=2, chunk_numel=None).chunk_numel is None


def test_hierarchical_policy_uses_the_hierarchical_scheme():
    fit = _fit(50e-6, 125e6, intra=LinkFit(10e-6, 2e9))
    policy = CommPolicy(PolicyConfig(), fit, workers=4, nodes=2)
    assert policy.hierarchical and policy.scheme(8).name == "hier-int8"
    assert policy.cluster.num_nodes == 2 and policy.cluster.intra_bandwidth == 2e9
    flat = CommPolicy(PolicyConfig(), fit, workers=4)
    # the hierarchical exchange moves half the bytes across nodes: it is predicted faster
    assert policy.predict(10_000_000)[8] < flat.predict(10_000_000)[8]


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match=r"candidates must be among \(32, 8, 4, 2, 'fp8_e4m3', .*'mxfp4r'\)"):
        PolicyConfig(candidates=(16,))
    with pytest.raises(ValueError, match="min_bits=32 rules out every candidate"):
        PolicyConfig(candidates=(8, 4), min_bits=32)
    with pytest.raises(ValueError, match="min_bits must be one of"):
        PolicyConfig(min_bits=6)
    with pytest.raises(ValueError, match="probe_numels must be a tuple of at least 2"):
        PolicyConfig(probe_numels=(1024,))
    with pytest.raises(TypeError, match="fit must be a NetworkFit"):
        PolicyConfig(fit={"link": 1})
    with pytest.raises(ValueError, match="bandwidth must be a positive"):
        LinkFit(1e-6, 0.0)
    with pytest.raises(ValueError, match="no codec throughput for int4"):
        CommPolicy(PolicyConfig(), NetworkFit(LinkFit(1e-6, 1e9), codec=CODEC[:1]), workers=2)
    with pytest.raises(TypeError, match="policy must be a gradcomp PolicyConfig"):
        gradcomp.HookConfig(policy="auto")
    fit = _fit(1e-5, 1e9, intra=LinkFit(1e-6, 1e10, 0.02, 5))
    assert NetworkFit.from_dict(fit.to_dict()) == fit
    with pytest.raises(ValueError, match="codec_numel must be a positive int, got 0"):
        PolicyConfig(codec_numel=0)


def test_candidates_take_format_names_as_well_as_bits():
    named = PolicyConfig(candidates=(32, "int8", "int4"), min_bits=4)
    assert named == PolicyConfig(candidates=(32, 8, 4), min_bits=4)  # kept in the short spelling
    assert named.allowed == (32, 8, 4)
    fit = NetworkFit(LinkFit(1e-3, 1e7), codec=(("int8", CODEC[0][1]), ("int4", CODEC[1][1])), overhead=(("int4", 1e-3),))
    assert fit == NetworkFit(LinkFit(1e-3, 1e7), codec=CODEC, overhead=((4, 1e-3),))
    assert fit.codec_for("int4") is fit.codec_for(4) and fit.overhead_for("int4") == 1e-3
    policy = CommPolicy(named, fit, workers=4)
    assert policy.choose(10_000_000) == 4 and policy.scheme("int4").name == "twophase-int4"
    with pytest.raises(ValueError, match="candidates must be among"):
        PolicyConfig(candidates=(32, "int5"))
    with pytest.raises(TypeError, match="codec must hold"):
        NetworkFit(LinkFit(1e-3, 1e7), codec=(("fp8", CODEC[0][1]),))


def test_probe_bucket_spans_two_of_the_hooks_chunks():
    from gradcomp.comm.plan import chunk_numel_for
    from gradcomp.comm.policy import probe_bucket_numel

    assert PolicyConfig().codec_numel is None
    assert probe_bucket_numel(PolicyConfig(), chunk_numel_for(2)) == 1 << 22
    assert probe_bucket_numel(PolicyConfig(), chunk_numel_for(4)) == 1 << 23
    assert probe_bucket_numel(PolicyConfig(), None) == 1 << 22  # hierarchical: no chunks
    assert probe_bucket_numel(PolicyConfig(codec_numel=1 << 14), 1 << 23) == 1 << 14


# ---------------------------------------------------------------------------------------------
# the hook follows the policy, on every rank alike


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # a large bucket (the first Linear, alone) and small ones
    return nn.Sequential(nn.Linear(256, 400), nn.Tanh(), nn.Linear(400, 7))


def _step(model, rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(8, 256, generator=g), torch.randint(0, 7, (8,), generator=g)
    model.zero_grad(set_to_none=False)
    nn.functional.cross_entropy(model(x), y).backward()


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _hook_worker(rank, world_size):
    topo = Topology(2)
    # figures chosen so the 102800-element bucket compresses to int4 and the 2807-element one stays
    # plain: slow links between nodes, and a latency inside the node that only pays off on big buckets
    fit = _fit(1e-5, 20e6, intra=LinkFit(2e-3, 5e9))
    cfg = PolicyConfig(fit=fit)
    policy = CommPolicy(cfg, fit, world_size, nodes=2)
    assert policy.choose(102800) == 4 and policy.choose(2807) == PLAIN

    ref = DDP(_model(), bucket_cap_mb=0.01)
    model = DDP(_model(), bucket_cap_mb=0.01)
    state = gradcomp.register(model, topology=topo, policy=cfg)  # every other option at its default
    for step in range(state.config.warmup_steps + 2):
        _step(ref, rank, step)
        _step(model, rank, step)
    got, exact = _grads(model), _grads(ref)
    assert float((got - exact).norm() / exact.norm()) < 0.4
    gathered = [torch.empty_like(got) for _ in range(world_size)]
    dist.all_gather(gathered, got)
    assert all(torch.equal(gathered[0], g) for g in gathered)
    # exactly one bucket compressed, with int4, and its bytes as the hierarchical layout says
    plans = list(state.plans.values())
    assert [p.layout.bits for p in plans] == [4]
    s = state.stats()
    assert (s["compressed_buckets_step"], s["buckets_step"]) == (1, 2)
    lay = HierarchicalLayout(plans[0].layout.numel, 2, 2, 4, 256)
    plain = 2 * (world_size - 1) * 2807 * 4 // world_size
    assert s["bytes_sent_step"] == lay.inter_bytes_sent + lay.intra_bytes_sent + plain

    # the checkpoint carries the figures: a resumed state decides from them, not from a new probe
    sd = copy.deepcopy(state.state_dict())
    assert sd["network_fit"] == fit.to_dict()
    other = gradcomp.QuantizedAllReduceState(topology=topo, policy=PolicyConfig(fit=_fit(5e-6, 12.5e9)))
    assert other.policy.choose(102800) == PLAIN
    other.load_state_dict(sd)
    assert other.policy.choose(102800) == 4

    # measured: a real probe on this group; whatever it finds, every rank finds the same
    probed = gradcomp.QuantizedAllReduceState(
        bits=8, policy=PolicyConfig(probe_numels=(64, 4096, 16384), probe_repeats=2, codec_numel=1 << 14), topology=topo,
    )
    f = probed.policy.fit
    assert probed.policy.chunk_numel is None  # the hierarchical exchange is not chunked
    assert f.link.samples == 3 and f.intra is not None and f.link.bandwidth > 0
    mine = torch.tensor([f.link.latency, f.link.bandwidth, f.intra.bandwidth, f.codec_for(4).quantize_eps], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    assert all(torch.equal(every[0], e) for e in every), f"ranks fitted different figures: {every}"
    picks = torch.tensor([probed.policy.choose(n) for n in (1000, 100_000, 10_000_000)])
    every = [torch.empty_like(picks) for _ in range(world_size)]
    dist.all_gather(every, picks)
    assert all(torch.equal(every[0], e) for e in every), "ranks decided differently"
    assert set(probed.recalibrate()) == {"link", "intra", "codec", "source", "overhead"}


@pytest.mark.slow
def test_hook_follows_policy_identically_on_every_rank(tmp_path):
    spawn(_hook_worker, 4, tmp_path, timeout=180.0)


def test_end_to_end_times_at_two_sizes_give_the_codec_scale_and_a_fixed_cost_per_bucket():
    from gradcomp.comm.policy import _codec_matching
    from gradcomp.comm.cost import CodecThroughput, estimate

    policy = CommPolicy(PolicyConfig(candidates=(PLAIN, 8)), _fit(20e-6, 125e6), workers=2)
    local = CODEC[0][1]
    ns, nb = 1 << 20, 1 << 22

    def model(n, m):
        tp = CodecThroughput(local.quantize_eps / m, local.dequantize_eps / m)
        return estimate(policy.scheme(8), n, policy.cluster, tp, policy.block_size, policy.chunk_numel).total_s

    for m_true, a_true in ((2.0, 5e-3), (0.7, 0.0), (3.0, 12e-3)):
        ts, tb = model(ns, m_true) + a_true, model(nb, m_true) + a_true
        tp, a = _codec_matching(policy, 8, (ns, ts), (nb, tb), local)
        assert local.quantize_eps / tp.quantize_eps == pytest.approx(m_true, rel=1e-4)
        assert a == pytest.approx(a_true, abs=1e-6)
        refit = CommPolicy(policy.config, NetworkFit(policy.fit.link, codec=((8, tp),), overhead=((8, a),)), workers=2)
        assert refit.predict(ns)[8] == pytest.approx(ts, rel=1e-5) and refit.predict(nb)[8] == pytest.approx(tb, rel=1e-5)
        assert "measured end to end" in tp.source
    # the small bucket faster than any codec scale explains: no fixed cost, the big bucket alone is matched
    tb = 1.7 * model(nb, 1.0)
    tp, a = _codec_matching(policy, 8, (ns, 0.2 * model(ns, 1.0)), (nb, tb), local)
    assert a == 0.0
    refit = CommPolicy(policy.config, NetworkFit(policy.fit.link, codec=((8, tp),)), workers=2)
    assert refit.predict(nb)[8] == pytest.approx(tb, rel=1e-6)
    # the small bucket slower than the big one's slope explains (a fixed cost the difference cannot
    # show): the big bucket stays exact and a fixed cost brings the small one closer than none
    ts, tb = model(ns, 1.0) + 8e-3, model(nb, 1.0) + 2e-3
    tp, a = _codec_matching(policy, 8, (ns, ts), (nb, tb), local)
    refit = CommPolicy(policy.config, NetworkFit(policy.fit.link, codec=((8, tp),), overhead=((8, a),)), workers=2)
    assert a > 0 and refit.predict(nb)[8] == pytest.approx(tb, rel=1e-6)
    m0 = _codec_matching(policy, 8, (ns, 0.2 * model(ns, 1.0)), (nb, tb), local)[0]   # a = 0, big matched
    none = CommPolicy(policy.config, NetworkFit(policy.fit.link, codec=((8, m0),)), workers=2)
    assert abs(refit.predict(ns)[8] - ts) < abs(none.predict(ns)[8] - ts)
    # faster than the wire alone: the model cannot reproduce it, the local figure stays
    assert _codec_matching(policy, 8, (ns, 1e-7), (nb, 1e-6), local) is None
    # the fixed cost travels with the fit and is checked
    fit = NetworkFit(policy.fit.link, codec=((8, tp),), overhead=((8, 3e-3),))
    assert NetworkFit.from_dict(json.loads(json.dumps(fit.to_dict()))) == fit
    with pytest.raises(ValueError, match="overhead must hold"):
        NetworkFit(policy.fit.link, codec=((8, tp),), overhead=((8, -1.0),))


def _flat_probe_worker(rank, world_size):
    # the policy models the hook's own chunks, and its probe timed the exchange cut into them:
    # small chunks (several per probe bucket) and the default ones
    probe = PolicyConfig(probe_numels=(64, 4096, 16384), probe_repeats=2, codec_numel=1 << 14)
    default = gradcomp.QuantizedAllReduceState(policy=probe)
    assert default.policy.chunk_numel == default.chunk_numel == 2 * (1 << 20)
    for _, tp in default.policy.fit.codec:
        assert f"in chunks of {default.chunk_numel}" in tp.source, tp.source
    state = gradcomp.QuantizedAllReduceState(bits=8, chunk_numel=2048, log_every=0, policy=probe)
    policy = state.policy
    assert policy.chunk_numel == 2048
    for _, tp in policy.fit.codec:
        assert "in chunks of 2048" in tp.source, tp.source
    assert state._probe_held == {}  # the probe's buffers are gone
    mine = torch.tensor([policy.predict(1 << 16)[8], policy.predict(1 << 16)[4]], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    assert all(torch.equal(every[0], e) for e in every), f"ranks predicted differently: {every}"


@pytest.mark.slow
def test_probe_times_the_hooks_chunked_exchange(tmp_path):
    spawn(_flat_probe_worker, 2, tmp_path, timeout=120.0)
