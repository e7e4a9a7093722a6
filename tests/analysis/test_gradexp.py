"""Gradient experiments: DDP bucketing, capture, and the offline replay of the quantized exchange."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from _dist import spawn
from gradcomp.analysis import gradexp as gx
from gradcomp.comm.plan import ExchangePlan


pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(steps: int, workers: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a shared signal plus per-worker noise, with a few layers of very different scales
    base = torch.randn(steps, 1, n, generator=g)
    noise = 0.5 * torch.randn(steps, workers, n, generator=g)
    scale = torch.ones(n)
    scale[: n // 4] = 1e-3
    return (base + noise) * scale


# --------------------------------------------------------------------------------------------
# buckets


def test_ddp_buckets_reverse_order_and_caps():
    mib = 1 << 18  # fp32 elements per MiB
    b = gx.ddp_buckets([300_000, 300_000, 300_000], bucket_cap_mb=1.0, first_bucket_mb=None)
    assert [x.params for x in b] == [(2,), (1,), (0,)]
    b = gx.ddp_buckets([mib // 4] * 8 + [mib * 30], bucket_cap_mb=25.0, first_bucket_mb=1.0)
    # the 30 MiB tensor is last registered, so it is alone in the first bucket; the rest fit one bucket
    assert b[0].params == (8,) and b[1].params == tuple(range(7, -1, -1))
    assert sum(x.numel for x in b) == 8 * (mib // 4) + 30 * mib
    small = gx.ddp_buckets([mib // 2, mib // 2, mib // 2, mib], bucket_cap_mb=25.0, first_bucket_mb=1.0)
    assert small[0].params == (3,) and small[1].params == (2, 1, 0)
    with pytest.raises(ValueError, match="bucket limits must be positive"):
        gx.ddp_buckets([10], bucket_cap_mb=0)


# --------------------------------------------------------------------------------------------
# the replay is the hook's exchange, bit for bit


def _parity_worker(rank, world_size, grads_path, out_path, cases):
    from gradcomp.comm.collectives import quantized_allreduce
    from gradcomp.comm.plan import ShardLayout

    grads = torch.load(grads_path)
    n = grads.shape[2]
    results = []
    for bits, ef in cases:
        lay = ShardLayout(n, world_size, bits, 64)
        wres = sres = None
        outs = []
        for t in range(grads.shape[0]):
            r = quantized_allreduce(grads[t, rank], lay, None, worker_residual=wres, server_residual=sres, error_feedback=ef)
            wres, sres = r.worker_residual, r.server_residual
            outs.append(r.out.clone())
        results.append(torch.stack(outs))
    if rank == 0:
        torch.save(results, out_path)


@pytest.mark.slow
def test_replay_matches_the_real_collective_bit_for_bit(tmp_path):
    cases = [(4, True), (8, False), (2, True)]
    grads = _grads(3, 2, 1000, seed=1)
    torch.save(grads, tmp_path / "g.pt")
    spawn(_parity_worker, 2, tmp_path, str(tmp_path / "g.pt"), str(tmp_path / "o.pt"), cases)
    real = torch.load(tmp_path / "o.pt")
    for (bits, ef), want in zip(cases, real):
        sim = gx._Simulator(gx.ReplayConfig(bits, 64, False, ef), [((0,), (1000,))], 2)
        for t in range(3):
            assert torch.equal(sim.exchange(0, grads[t]), want[t]), f"int{bits} ef={ef}: step {t} differs"


# --------------------------------------------------------------------------------------------
# error feedback and rounding


def test_error_feedback_invariant_accumulated_error_equals_minus_residuals():
    grads = _grads(6, 3, 777)
    cfg = gx.ReplayConfig(2, 32, False, True)
    sim = gx._Simulator(cfg, [((0,), (777,))], 3)
    total_out = torch.zeros(777, dtype=torch.float64)
    total_true = torch.zeros(777, dtype=torch.float64)
    for t in range(6):
        total_out += sim.exchange(0, grads[t]).double()
        total_true += grads[t].double().mean(0)
    # sum out = sum mean(g) - mean_w(worker residual) - server residual
    left = sim.worker_res[0].double().mean(0)[:777] + sim.plans[0].server_to_aligned(sim.server_res[0]).double()[:777]
    # up to fp32 rounding of the sums (the quantization error itself is about 0.3 here)
    torch.testing.assert_close(total_out - total_true, -left, atol=5e-6, rtol=0)


def test_drift_falls_with_error_feedback_and_stays_without():
    g = _grads(1, 2, 4096, seed=3)
    steps = [g[0]] * 40  # the same gradient every step: deterministic rounding repeats its error
    cfgs = [gx.ReplayConfig(4, 256, False, True), gx.ReplayConfig(4, 256, False, False)]
    res = gx.replay_stream(steps, ["w"], [4096], cfgs)
    ef, no_ef = res.curves[cfgs[0].name]["drift"], res.curves[cfgs[1].name]["drift"]
    assert ef[-1] < ef[0] / 10  # about 1/T
    assert no_ef[-1] == pytest.approx(no_ef[0], rel=1e-6)  # the same error each step
    assert ef[-1] < no_ef[-1] / 10


def test_stochastic_rounding_is_unbiased_where_nearest_shrinks():
    # blocks of one large value and many small ones: round-to-nearest flushes the small ones to 0
    n, steps = 64 * 64, 200
    x = torch.full((n,), 0.09)
    x[::64] = 1.0
    stream = [x.unsqueeze(0)] * steps
    near = gx.ReplayConfig(2, 64, False, False)
    sto = gx.ReplayConfig(2, 64, True, False, seed=1)
    res = gx.replay_stream(stream, ["w"], [n], [near, sto])
    bias = {r["config"]: r["bias"] for r in res.summary}
    assert bias[near.name] < -0.3  # the small values (a third of the energy) are lost every step
    assert abs(bias[sto.name]) < 0.05
    drift = {r["config"]: r["drift"] for r in res.summary}
    assert drift[sto.name] < drift[near.name] / 3


def test_more_bits_less_error_and_metrics_add_up():
    trace = gx.GradientTrace(["a", "b", "c"], [(100, 10), (50,), (3, 7, 11)], _grads(4, 2, 1281))
    res = gx.replay(trace, gx.config_grid((8, 4, 2), (64,), ("nearest",), (False,)))
    err = {r["bits"]: r["rel_error"] for r in res.summary}
    assert err[8] < err[4] < err[2]
    for r in res.summary:
        assert r["sqnr_db"] == pytest.approx(-20 * math.log10(r["rel_error_rms"]), rel=1e-9)
        # one bucket, parameters in reverse order, each block-aligned, 16-byte headers included
        assert r["bytes_per_rank"] == ExchangePlan.build([231, 50, 1000], 2, r["bits"], 64).bytes_sent
        assert r["compression"] == pytest.approx(2 * 641 * 4 / r["bytes_per_rank"])
    assert len(res.per_layer) == 3 * 3 and len(res.per_bucket) == 3 * len(res.meta["buckets"])
    # per-layer squared errors add up to the whole: sum_k rel_k^2 * |g_k|^2 = rel^2 * |g|^2
    sig = [float((trace.grads.mean(1)[:, s] ** 2).sum()) for s in (slice(0, 1000), slice(1000, 1050), slice(1050, 1281))]
    for cfg in res.summary:
        rows = [r for r in res.per_layer if r["config"] == cfg["config"]]
        total = sum(r["rel_error"] ** 2 * s for r, s in zip(rows, sig))
        assert total == pytest.approx(cfg["rel_error_rms"] ** 2 * sum(sig), rel=1e-6)


def test_replay_cycles_a_short_trace():
    trace = gx.GradientTrace(["w"], [(300,)], _grads(3, 2, 300))
    res = gx.replay(trace, [gx.ReplayConfig()], steps=7)
    assert res.meta["steps"] == 7 and res.meta["captured_steps"] == 3
    assert len(res.curves[gx.ReplayConfig().name]["drift"]) == 7


def test_replay_rejects_bad_input():
    with pytest.raises(ValueError, match="configs must hold at least one"):
        gx.replay_stream([torch.zeros(2, 5)], ["w"], [5], [])
    with pytest.raises(ValueError, match=r"each step must be a \(workers, 5\) tensor"):
        gx.replay_stream([torch.zeros(2, 6)], ["w"], [5], [gx.ReplayConfig()])
    with pytest.raises(ValueError, match="every step must have 2 workers"):
        gx.replay_stream([torch.zeros(2, 5), torch.zeros(3, 5)], ["w"], [5], [gx.ReplayConfig()])
    with pytest.raises(ValueError, match="yielded no steps"):
        gx.replay_stream([], ["w"], [5], [gx.ReplayConfig()])
    with pytest.raises(TypeError, match="trace must be a GradientTrace"):
        gx.replay(torch.zeros(1, 2, 3), [gx.ReplayConfig()])


def test_replay_config_takes_a_format_name_or_its_bits():
    assert gx.ReplayConfig("int4") == gx.ReplayConfig(4)
    assert gx.ReplayConfig("int2", 64).name == "int2 b64 nearest ef" and gx.ReplayConfig(2).format.name == "int2"
    assert [c.bits for c in gx.config_grid(("int8", 4), rounding=("nearest",), error_feedback=(True,))] == [8, 4]


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "bits must be one of"), (dict(block_size=0), "block_size must be a positive"),
    (dict(bits=2, block_size=6), "multiple of 4"), (dict(stochastic=1), "must be bools"),
])
def test_replay_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gx.ReplayConfig(**kwargs)
    with pytest.raises(ValueError, match="rounding must be one of"):
        gx.config_grid(rounding=("up",))


# --------------------------------------------------------------------------------------------
# capture


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2, bias=False)

    def forward(self, x, y):
        return None, ((self.b(torch.tanh(self.a(x))) - y) ** 2).mean()


def _batch(step, worker):
    g = torch.Generator().manual_seed(100 * step + worker)
    return torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)


def test_capture_records_each_worker_and_trains_on_the_mean():
    torch.manual_seed(0)
    model = _Tiny()
    ref = _Tiny()
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = gx.capture_gradients(model, _batch, steps=2, workers=3, optimizer=opt)
    assert trace.grads.shape == (2, 3, 4 * 3 + 3 + 3 * 2)
    assert trace.names == ["a.weight", "a.bias", "b.weight"]
    # worker 1 at step 0, by hand
    ref.zero_grad()
    ref(*_batch(0, 1))[1].backward()
    want = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    torch.testing.assert_close(trace.grads[0, 1], want)
    # after step 0 the weights moved by -lr * mean gradient
    start = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    after_two = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(after_two, start - 0.1 * trace.grads.mean(1).sum(0), rtol=1e-5, atol=1e-6)


def test_trace_save_load_roundtrip(tmp_path):
    trace = gx.capture_gradients(_Tiny(), _batch, steps=2, workers=2, meta={"note": "x"})
    trace.save(tmp_path / "t.safetensors")
    back = gx.GradientTrace.load(tmp_path / "t.safetensors")
    assert back.names == trace.names and back.shapes == trace.shapes and back.meta == {"note": "x"}
    assert torch.equal(back.grads, trace.grads)
    with pytest.raises(FileNotFoundError):
        gx.GradientTrace.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a trace")
    with pytest.raises(ValueError, match="not a gradient trace"):
        gx.GradientTrace.load(tmp_path / "bad.safetensors")


def test_default_loss_conventions():
    class Scalar(nn.Module):
        def forward(self, x):
            return x.sum()

    class Out:
        def __init__(self, loss):
            self.loss = loss

    class HF(nn.Module):
        def forward(self, x=None):
            return Out(x.mean())

    x = torch.ones(3)
    assert float(gx.default_loss(Scalar(), x)) == 3.0
    assert float(gx.default_loss(HF(), {"x": x})) == 1.0
    with pytest.raises(TypeError, match="cannot find a scalar loss"):
        gx.default_loss(nn.Identity(), (x,))


def test_iter_gradients_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps must be a positive int"):
        next(gx.iter_gradients(_Tiny(), _batch, 0))
    frozen = _Tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        next(gx.iter_gradients(frozen, _batch, 1))


# --------------------------------------------------------------------------------------------
# the replay and the real hook: the same bits


def _hook_worker(rank, world_size, out_path, steps):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradcomp

    torch.manual_seed(0)
    # ragged sizes: parameters that end mid-block, one shorter than a block
    model = nn.Sequential(nn.Linear(33, 17), nn.Tanh(), nn.Linear(17, 5), nn.Linear(5, 3, bias=False))
    index = {id(p): i for i, p in enumerate(model.parameters())}
    ddp = DDP(model, bucket_cap_mb=25)
    state = gradcomp.QuantizedAllReduceState(
        bits=4, block_size=64, stochastic_rounding=True, seed=7, warmup_steps=1, min_compress_numel=1, log_every=0
    )
    state.track_parameters(model)
    calls = []

    def recording(st, bucket):
        # the real hook, with its input and output recorded
        rec = {"step": st.step, "keys": [index[id(p)] for p in bucket.parameters()],
               "numels": [p.numel() for p in bucket.parameters()], "in": bucket.buffer().clone()}
        calls.append(rec)

        def done(f):
            rec["out"] = f.value().clone()
            return f.value()

        return gradcomp.quantized_allreduce_hook(st, bucket).then(done)

    ddp.register_comm_hook(state, recording)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(8, 33, generator=g)
        ddp(x).pow(2).sum().backward()
        model.zero_grad(set_to_none=True)
    state.synchronize()
    mine = [dict(c) for c in calls if c["step"] >= 1]  # after the warm-up step
    gathered = [None] * world_size
    dist.all_gather_object(gathered, [c["in"] for c in mine])
    if rank == 0:
        for c, *ins in zip(mine, *gathered):
            c["in"] = torch.stack(ins)
        torch.save(mine, out_path)


@pytest.mark.slow
def test_replay_and_real_hook_give_the_same_bits_with_stochastic_rounding(tmp_path):
    spawn(_hook_worker, 2, tmp_path, str(tmp_path / "calls.pt"), 4)
    calls = torch.load(tmp_path / "calls.pt")
    assert len(calls) == 3 and all(len(c["keys"]) == 5 for c in calls)  # one bucket, every parameter
    keys, numels = calls[0]["keys"], calls[0]["numels"]
    assert all(c["keys"] == keys for c in calls)
    cfg = gx.ReplayConfig(4, 64, stochastic=True, error_feedback=True, seed=7)
    sim = gx._Simulator(cfg, [(keys, numels)], 2, first_step=calls[0]["step"])
    for c in calls:
        out = sim.exchange(0, c["in"])
        sim.next_step()
        assert torch.equal(out, c["out"]), f"step {c['step']}: replay and hook differ in {int((out != c['out']).sum())} values"
