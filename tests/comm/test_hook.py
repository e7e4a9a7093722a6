"""The DDP hook across processes on gloo: parity with DDP, identical ranks, bytes, non-finite steps, resume."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from gradcomp.comm.plan import ShardLayout
from gradcomp.comm import plan as comm_plan
from gradcomp.codec.formats import HEADER_BYTES

from _dist import init_gloo, spawn

from _models import (STEP_TOL, _all_identical, _backward, _batch, _grads, _mlp, _mlp_step, _model, check_nonfinite_step_skipped,
                     check_resume_bit_identical)


def _hooked(bits, error_feedback, **ddp_kwargs):
    model = DDP(_model(), bucket_cap_mb=0.05, **ddp_kwargs)
    state = gradcomp.register(
        model, bits=bits, error_feedback=error_feedback, warmup_steps=2, min_compress_numel=0, log_every=1
    )
    return model, state


def _int8_hooked(**options):
    """A DDP model with the int8 hook compressing every bucket from step 1 on (eager kernels)."""
    model = DDP(_model(), bucket_cap_mb=0.05)
    state = gradcomp.register(model, bits=8, warmup_steps=1, min_compress_numel=0, **options)
    return model, state


# ---------------------------------------------------------------------------------------------


def _parity_worker(rank, world_size):
    steps = 6
    for bits in (8, 4):
        # without error feedback: each step's average is close to the exact one
        ref = DDP(_model(), bucket_cap_mb=0.05)
        model, state = _hooked(bits, error_feedback=False)
        for step in range(steps):
            _backward(ref, rank, step)
            _backward(model, rank, step)
            exact, got = _grads(ref), _grads(model)
            assert _all_identical(got), f"ranks differ at step {step} (bits={bits})"
            rel = float((got - exact).norm() / exact.norm())
            if step < 2:
                assert rel < 1e-6, f"warm-up step {step} should be plain all-reduce, rel error {rel}"
            else:
                assert rel < STEP_TOL[bits], f"bits={bits} step {step}: rel error {rel} > {STEP_TOL[bits]}"
        # bytes: exactly the formula, per bucket, and the ratio promised
        s = state.stats()
        plans = list(state.plans.values())
        assert len(plans) >= 2
        # parameters start on block boundaries: the aligned length is the sum of whole blocks
        for plan in plans:
            assert plan.layout.numel == sum(-(-n // 256) * 256 for n in plan.numels)
            assert plan.layout == ShardLayout(plan.layout.numel, world_size, bits, 256)
            # chunks hold a multiple of P blocks: the payload is that of one shard cut, plus a header per message
            assert plan.bytes_sent == plan.layout.bytes_sent + 2 * (world_size - 1) * HEADER_BYTES * len(plan.chunks)
        assert s["bytes_sent_step"] == sum(p.bytes_sent for p in plans)
        assert s["fp32_bytes_step"] == sum(2 * (world_size - 1) * sum(p.numels) * 4 // world_size for p in plans)
        assert s["compressed_buckets_step"] == s["buckets_step"] == len(plans)

        # with error feedback and frozen weights: the sum of transmitted gradients tracks the true sum
        ref = DDP(_model(), bucket_cap_mb=0.05)
        model, state = _hooked(bits, error_feedback=True)
        true_sum, sent_sum = 0, 0
        for step in range(30):
            _backward(ref, rank, step % 3)
            _backward(model, rank, step % 3)
            if step >= 2:
                true_sum = true_sum + _grads(ref)
                sent_sum = sent_sum + _grads(model)
        drift = float((sent_sum - true_sum).norm() / true_sum.norm())
        assert drift < STEP_TOL[bits] / 4, f"bits={bits}: error feedback drift {drift}"
        assert 0 < state.stats()["rel_error"] < 1


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_parity_identical_ranks_bytes(tmp_path, world_size):
    spawn(_parity_worker, world_size, tmp_path)


# ---------------------------------------------------------------------------------------------


def _nonfinite_worker(rank, world_size):
    model, state = _hooked(4, error_feedback=True)
    for step in range(4):
        _backward(model, rank, step)
    before = state.state_dict()
    x, y = _batch(rank, 9)
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    if rank == 1:
        loss = loss * float("inf")  # only one rank overflows
    loss.backward()
    g = _grads(model)
    assert not torch.isfinite(g).all(), "every rank must see a non-finite gradient"
    assert _all_identical(g)
    after = state.state_dict()
    for key in ("worker_residuals", "server_residuals"):
        for idx, r in before[key].items():
            assert torch.equal(r, after[key][idx]), f"{key}[{idx}] changed on a non-finite step"
    assert state.stats()["nonfinite_steps"] == 1
    _backward(model, rank, 10)  # and training goes on
    assert torch.isfinite(_grads(model)).all()


@pytest.mark.slow
def test_nonfinite_on_one_rank_reaches_all_and_keeps_residuals(tmp_path):
    spawn(_nonfinite_worker, 3, tmp_path)


# ---------------------------------------------------------------------------------------------


def _resume_worker(rank, world_size, bits, stochastic):
    opts = dict(bits=bits, warmup_steps=2, min_compress_numel=0, stochastic_rounding=stochastic, seed=3)
    state2 = check_resume_bit_identical(rank, opts, split=5, end=10)
    assert state2.step == 10


@pytest.mark.slow
@pytest.mark.parametrize("bits,stochastic", [(8, False), (4, True)])
def test_checkpoint_resume_is_bit_identical(tmp_path, bits, stochastic):
    spawn(_resume_worker, 2, tmp_path, bits, stochastic)


# ---------------------------------------------------------------------------------------------


def _ddp_modes_worker(rank, world_size):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _model()
            self.unused = nn.Linear(7, 300)

        def forward(self, x):
            return self.body(x)

    class Plain(nn.Module):  # every parameter is used
        def __init__(self):
            super().__init__()
            self.body = _model()

        def forward(self, x):
            return self.body(x)

    cases = [
        (TwoHeads, dict(static_graph=True)),
        (TwoHeads, dict(find_unused_parameters=True)),
        (Plain, dict(gradient_as_bucket_view=True)),
    ]
    for factory, kwargs in cases:
        torch.manual_seed(0)
        ref = DDP(factory(), bucket_cap_mb=0.05, **kwargs)
        torch.manual_seed(0)
        model = DDP(factory(), bucket_cap_mb=0.05, **kwargs)
        gradcomp.register(model, bits=8, warmup_steps=2, min_compress_numel=0, error_feedback=False)
        for step in range(5):
            for m in (ref, model):
                x, y = _batch(rank, step)
                m.zero_grad(set_to_none=False)
                nn.functional.cross_entropy(m(x), y).backward()
            got = torch.cat([p.grad.reshape(-1) for p in model.module.body.parameters()])
            exact = torch.cat([p.grad.reshape(-1) for p in ref.module.body.parameters()])
            assert _all_identical(got), f"{kwargs} step {step}: ranks differ"
            rel = float((got - exact).norm() / exact.norm())
            assert rel < STEP_TOL[8], f"{kwargs} step {step}: {rel}"

    # no_sync: two micro-batches accumulated locally, one exchange
    ref = DDP(_model(), bucket_cap_mb=0.05)
    model = DDP(_model(), bucket_cap_mb=0.05)
    state = gradcomp.register(model, bits=8, warmup_steps=1, min_compress_numel=0, error_feedback=False)
    for step in range(4):
        for m in (ref, model):
            m.zero_grad()
            with m.no_sync():
                x, y = _batch(rank, 2 * step)
                nn.functional.cross_entropy(m(x), y).backward()
            x, y = _batch(rank, 2 * step + 1)
            nn.functional.cross_entropy(m(x), y).backward()
        got, exact = _grads(model), _grads(ref)
        assert _all_identical(got)
        assert float((got - exact).norm() / exact.norm()) < STEP_TOL[8]
    assert state.step == 4


@pytest.mark.slow
def test_static_graph_unused_parameters_bucket_view_and_no_sync(tmp_path):
    spawn(_ddp_modes_worker, 2, tmp_path)


# ---------------------------------------------------------------------------------------------


def _grad_scaler_worker(rank, world_size):
    model, state = _int8_hooked()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    losses = []
    for step in range(12):
        x, y = _batch(rank, step % 4)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if step == 5 and rank == 0:
            loss = loss + float("inf") * model.module[0].weight.sum()
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step == 5:
            assert scaler.get_scale() < scale, "GradScaler should have seen the inf and backed off"
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "the inf step must be skipped"
        else:
            losses.append(float(loss))
    assert state.stats()["nonfinite_steps"] == 1
    assert losses[-1] < losses[0]
    assert _all_identical(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


@pytest.mark.slow
def test_grad_scaler_skips_inf_step_and_trains_on(tmp_path):
    spawn(_grad_scaler_worker, 2, tmp_path)


# ---------------------------------------------------------------------------------------------


def _dtype_worker(rank, world_size):
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        model = DDP(_model().to(dtype), bucket_cap_mb=0.05)
        gradcomp.register(model, bits=8, warmup_steps=1, min_compress_numel=0)
        for step in range(3):
            x, y = _batch(rank, step)
            model.zero_grad()
            nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
            g = _grads(model)
            assert g.dtype == dtype and torch.isfinite(g).all()
            assert _all_identical(g.float())


@pytest.mark.slow
def test_half_precision_gradients(tmp_path):
    spawn(_dtype_worker, 3, tmp_path)


def _world_one_worker(rank, world_size):
    # compressing from step 0, and with every option at its default past the warm-up: nothing to exchange
    for opts, steps in ((dict(bits=4, warmup_steps=0, error_feedback=False, min_compress_numel=0), 1), ({}, 12)):
        model = DDP(_model())
        ref = DDP(_model())
        gradcomp.register(model, **opts)
        for step in range(steps):
            _backward(model, 0, step)
            _backward(ref, 0, step)
            assert torch.equal(_grads(model), _grads(ref)), (opts, step)


@pytest.mark.slow
def test_world_size_one_is_a_no_op(tmp_path):
    spawn(_world_one_worker, 1, tmp_path)


# ---------------------------------------------------------------------------------------------
# configuration errors, in this process


@pytest.fixture
def world1(tmp_path):
    init_gloo(0, 1, str(tmp_path / "init"))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(bits=3), ValueError, r"bits must be one of \(2, 4, 8\), got 3"),
        (dict(bits="8"), TypeError, "bits must be an int"),
        (dict(block_size=0), ValueError, "block_size must be a positive multiple of 8"),
        (dict(block_size=100), ValueError, "got 100"),
        (dict(warmup_steps=0), ValueError, "warmup_steps must be >= 1 when error_feedback is on"),
        (dict(warmup_steps=-1, error_feedback=False), ValueError, "warmup_steps must be >= 0"),
        (dict(error_feedback=1), TypeError, "error_feedback must be a bool"),
        (dict(process_group="world"), TypeError, "process_group must be a torch.distributed.ProcessGroup"),
        (dict(blocksize=64), TypeError, r"unknown option\(s\) \['blocksize'\]"),
    ],
)
def test_bad_configuration_is_refused_before_training(world1, kwargs, exc, match):
    model = DDP(_model())
    with pytest.raises(exc, match=match):
        gradcomp.register(model, **kwargs)
    # the model still trains with DDP's default all-reduce: nothing was registered
    _backward(model, 0, 0)


def test_warmup_zero_allowed_without_error_feedback(world1):
    state = gradcomp.QuantizedAllReduceState(bits=4, warmup_steps=0, error_feedback=False)
    assert state.config.bits == 4 and state.world_size == 1


def test_register_needs_a_ddp_model(world1):
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        gradcomp.register(_model())


def test_state_pickles_without_process_group(world1):
    import pickle

    state = gradcomp.QuantizedAllReduceState(bits=8)
    clone = pickle.loads(pickle.dumps(state))
    assert clone.process_group is None and clone.config == state.config


def test_state_dict_refuses_other_config(world1):
    a = gradcomp.QuantizedAllReduceState(bits=8)
    b = gradcomp.QuantizedAllReduceState(bits=4)
    with pytest.raises(ValueError, match="checkpoint has bits=8, this state has bits=4"):
        b.load_state_dict(a.state_dict())
    # the same bits, other codes: the format is part of the checkpoint's config
    c, d = gradcomp.QuantizedAllReduceState(format="int4"), gradcomp.QuantizedAllReduceState(format="int4r")
    with pytest.raises(ValueError, match="checkpoint has format='int4', this state has format='int4r'"):
        d.load_state_dict(c.state_dict())
    e = gradcomp.QuantizedAllReduceState(format="mxfp4")
    with pytest.raises(ValueError, match="checkpoint has format='int4', this state has format='mxfp4'"):
        e.load_state_dict(c.state_dict())


# ---------------------------------------------------------------------------------------------


def _nccl_worker(rank, world_size):  # pragma: no cover - needs GPUs
    torch.cuda.set_device(rank)
    model = DDP(_model().cuda(), device_ids=[rank], bucket_cap_mb=0.05)
    ref = DDP(_model().cuda(), device_ids=[rank], bucket_cap_mb=0.05)
    gradcomp.register(model, bits=8, warmup_steps=1, min_compress_numel=0, error_feedback=False)
    for step in range(4):
        for m in (ref, model):
            x, y = _batch(rank, step)
            m.zero_grad()
            nn.functional.cross_entropy(m(x.cuda()), y.cuda()).backward()
        got, exact = _grads(model), _grads(ref)
        assert float((got - exact).norm() / exact.norm()) < STEP_TOL[8]


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not dist.is_nccl_available(), reason="needs 2 CUDA GPUs and NCCL")
def test_nccl_parity(tmp_path):  # pragma: no cover - needs GPUs
    spawn(_nccl_worker, 2, tmp_path, backend="nccl")


# ---------------------------------------------------------------------------------------------
# the pipelined, chunked exchange


def _chunked_worker(rank, world_size):
    # many chunks per bucket and several buckets in flight: the same bits as one chunk per bucket,
    # since a block's arithmetic does not depend on the chunks
    runs = []
    for chunk in (comm_plan.DEFAULT_CHUNK_NUMEL, 4 * 256):
        model = DDP(_model(), bucket_cap_mb=0.05)
        state = gradcomp.register(
            model, bits=4, warmup_steps=1, min_compress_numel=0, chunk_numel=chunk, stochastic_rounding=True
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(5):
            _backward(model, rank, step)
            assert _all_identical(_grads(model)), f"chunk_numel={chunk} step {step}: ranks differ"
            opt.step()
        plans = list(state.plans.values())
        assert len(plans) >= 2
        if chunk < 2048:
            assert all(len(p.chunks) >= 3 for p in plans)
        assert state.stats()["bytes_sent_step"] == sum(p.bytes_sent for p in plans)
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        state.close()
    assert torch.equal(runs[0], runs[1]), "chunking changed the result"


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_chunked_pipeline_matches_one_chunk_bit_for_bit(tmp_path, world_size):
    spawn(_chunked_worker, world_size, tmp_path)


def _nonfinite_one_bucket_worker(rank, world_size):
    model, state = _int8_hooked(chunk_numel=1024)
    for step in range(3):
        _backward(model, rank, step)
    before = state.state_dict()
    assert len(before["worker_residuals"]) >= 2
    first = model.module[0].weight
    handle = first.register_hook(lambda g: g * float("inf")) if rank == 1 else None
    _backward(model, rank, 3)
    if handle is not None:
        handle.remove()
    g = _grads(model)
    assert not torch.isfinite(first.grad).all() and torch.isfinite(model.module[4].weight.grad).all()
    assert _all_identical(torch.nan_to_num(g, nan=0.0))
    after = check_nonfinite_step_skipped(model, state, before, rank, 4)
    assert any(not torch.equal(r, state.state_dict()["worker_residuals"][i]) for i, r in after["worker_residuals"].items())


@pytest.mark.slow
def test_nonfinite_in_one_bucket_keeps_every_buckets_residuals(tmp_path):
    spawn(_nonfinite_one_bucket_worker, 2, tmp_path)


def _out_of_step_worker(rank, world_size):
    # every option at its default, past the warm-up (plain all-reduces carry no header)
    model = DDP(_mlp())
    state = gradcomp.register(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    steps = state.config.warmup_steps + 1
    for step in range(steps):
        _mlp_step(model, opt, rank, step)
    assert state.stats()["compressed_buckets_step"] == 1
    if rank == 1:
        state.step += 1  # this rank believes it is one step further
    with pytest.raises(RuntimeError, match=r"ranks out of step in the all-to-all: rank \d sent step \d+, bucket 0"):
        _mlp_step(model, opt, rank, steps)


@pytest.mark.slow
def test_rank_out_of_step_is_detected_by_its_peers(tmp_path):
    spawn(_out_of_step_worker, 2, tmp_path)


def _defaults_vs_eager_worker(rank, world_size):
    # every option at its default (fused kernels, 10 warm-up steps, min_compress_numel) against the eager
    # reference kernels, with AdamW (whose numerics branch on torch.compiler.is_compiling()): nothing
    # compiles beside the training, so the two runs are bit-identical from the first step on
    results, kernels = [], []
    for fused in (True, False):
        model = DDP(_model())
        state = gradcomp.register(model, bits=4, **({} if fused else {"fused": False}))
        kernels.append(state.kernels)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(14):
            _backward(model, rank, step)
            assert _all_identical(_grads(model))
            opt.step()
            opt.zero_grad()
        assert state.stats()["compressed_buckets_step"] == 1, "the default run must compress its bucket after the warm-up"
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        state.close()
    assert kernels[0].startswith("native") and kernels[1] == "eager", kernels
    assert torch.equal(results[0], results[1]), "the fused and eager kernels gave different bits"


@pytest.mark.slow
def test_default_run_is_bit_identical_to_the_eager_kernels(tmp_path):
    spawn(_defaults_vs_eager_worker, 2, tmp_path, timeout=300.0)


def _nothing_beside_worker(rank, world_size):
    # A plain AdamW model (no gradcomp) trained on this thread, once alone and once while a hook state
    # with every default option trains a DDP model step for step beside it, its communication thread
    # busy with the compressed bucket. torch.compiler.is_compiling() is process-global: a compile on any
    # thread makes AdamW (and any code that branches on it) take another path here. Polled from the
    # optimizers' step hooks and from a gradient hook that fires while the thread exchanges a bucket;
    # each poll also notes the Python threads alive: nothing but the hook's communication thread may
    # run beside the training (a background compile is a thread of its own, whatever its timing).
    import threading

    steps = 24
    polls, threads = [], set()

    def poll(*_):
        polls.append(torch.compiler.is_compiling())
        threads.update(t.name for t in threading.enumerate())

    def plain_run(beside=None):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        if beside is not None:
            opt.register_step_pre_hook(poll)
            opt.register_step_post_hook(poll)
        for step in range(steps):
            if beside is not None:
                beside(step)
            x = torch.randn(32, 64, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    alone = plain_run()
    before = {t.name for t in threading.enumerate()}

    ddp = DDP(_mlp())
    state = gradcomp.register(ddp)  # every option at its default
    ddp_opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    ddp_opt.register_step_pre_hook(poll)
    # the first layer's gradient comes last, while the large bucket is on the communication thread
    ddp.module[0].weight.register_hook(lambda g: poll())
    compressed = []

    def hooked_step(step):
        _mlp_step(ddp, ddp_opt, rank, step)
        compressed.append(state.stats()["compressed_buckets_step"])

    beside = plain_run(hooked_step)
    assert len(polls) == 4 * steps, len(polls)
    diff = float((beside - alone).abs().max())
    assert not any(polls) and diff == 0.0, (
        f"torch.compiler.is_compiling() read True on the training thread in {sum(polls)} of {len(polls)} polls; the model "
        f"trained beside the hook ends {diff:.3g} (max |diff|) from the same model trained alone")
    assert threads - before == {"gradcomp-comm"}, f"threads beside the training: {sorted(threads - before)}; expected only gradcomp-comm"
    assert compressed[:10] == [0] * 10 and compressed[10:] == [1] * (steps - 10), compressed
    assert state.kernels.startswith("native"), state.kernels
    state.close()


@pytest.mark.slow
def test_nothing_compiles_beside_the_training_with_default_options(tmp_path):
    spawn(_nothing_beside_worker, 2, tmp_path, timeout=300.0)


def test_compile_is_a_deprecated_name_of_fused():
    with pytest.warns(DeprecationWarning, match="use fused="):
        cfg = gradcomp.HookConfig(compile=False)
    assert cfg.fused is False and cfg.compile is None


def test_config_object_is_accepted(world1):
    cfg = gradcomp.HookConfig(bits=4, warmup_steps=3, chunk_numel=4096)
    state = gradcomp.QuantizedAllReduceState(config=cfg)
    assert state.config is cfg
    with pytest.raises(TypeError, match=r"either config=HookConfig\(...\) or bits/options, not both; got config and \['bits', 'seed'\]"):
        gradcomp.QuantizedAllReduceState(config=cfg, bits=8, seed=1)
    with pytest.raises(TypeError, match="config must be a gradcomp HookConfig"):
        gradcomp.QuantizedAllReduceState(config={"bits": 4})
    with pytest.raises(ValueError, match="chunk_numel must be >= block_size=256, got 100"):
        gradcomp.HookConfig(chunk_numel=100)


def test_default_chunk_size_grows_with_the_group(world1):
    # None: 2**20 values per rank of every chunk, so each collective's messages stay large as P grows
    assert gradcomp.HookConfig().chunk_numel is None
    assert [comm_plan.chunk_numel_for(p) for p in (1, 2, 4, 8)] == [1 << 21, 1 << 21, 1 << 22, 1 << 23]
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        comm_plan.chunk_numel_for(0)
    state = gradcomp.QuantizedAllReduceState(bits=8)
    assert state.chunk_numel == comm_plan.chunk_numel_for(1)
    # the plan of a bucket of 5M values: chunks of 2M (the last one shorter), not of the old 1M
    assert len(state.plan_for((0,), (5_000_000,), 8).chunks) == 3
    assert gradcomp.QuantizedAllReduceState(bits=8, chunk_numel=1 << 20).chunk_numel == 1 << 20
    # a rank that spells the default out agrees with one that leaves it to the hook
    from gradcomp.comm.guard import wire_config

    assert wire_config(gradcomp.HookConfig(), 4) == wire_config(gradcomp.HookConfig(chunk_numel=1 << 22), 4)
    assert wire_config(gradcomp.HookConfig(), 4) != wire_config(gradcomp.HookConfig(chunk_numel=1 << 20), 4)


# ---------------------------------------------------------------------------------------------


def _busy_at_exit_worker(rank, world_size):
    import time

    model = DDP(_mlp())
    state = gradcomp.register(model)  # every option at its default
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(state.config.warmup_steps + 1):  # past the warm-up: the communication thread runs
        _mlp_step(model, opt, rank, step)
    thread = state._thread._thread
    t = torch.ones(1 << 16)
    if rank == 0:
        # leave the thread inside a collective (GIL released in C++) as this process exits: the
        # state's exit finalizer must join it, else taking the GIL back during interpreter teardown
        # aborts with "terminate called without an active exception"
        state._thread.submit(lambda: dist.all_reduce(t, group=state._comm_group), torch.futures.Future())
    else:
        time.sleep(1.0)  # rank 0 is exiting by now
        dist.all_reduce(t, group=state._comm_group)
        state.close()
        assert not thread.is_alive(), "close() must join the communication thread"
        state.close()  # twice is harmless


@pytest.mark.slow
def test_comm_thread_busy_at_exit_does_not_abort(tmp_path):
    spawn(_busy_at_exit_worker, 2, tmp_path)
