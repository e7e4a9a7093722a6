"""Fault injection: ranks that disagree, peers that stall or fail, checkpoints that lie, resumes that run code.

Every fault must end in a clear error (naming gradcomp and what went wrong) on every rank within
the process group's timeout, with no rank hanging and no state changed by a refused load. The
multi-process tests run 2-3 gloo ranks with timeouts of a few seconds; the spawner kills every
worker that outlives its deadline.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from gradcomp.comm import Topology, guard
from gradcomp.comm.guard import HookFailedError

from _models import _backward, _model

PG_TIMEOUT = 2.0  # seconds: the user's process-group timeout in these tests
SLACK = 10.0  # what a loaded 2-core machine may add to it


def _entry(rank, fn, world_size, init_file, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT),
    )
    fn(rank, world_size, *args)
    # broken groups can make a tidy shutdown wait: the checks are done, leave at once
    os._exit(0)


def _spawn(fn, world_size, tmp_path, *args, deadline=60.0):
    """Run ``fn`` on ``world_size`` ranks; fail with a worker's traceback; kill them all after ``deadline`` s."""
    init_file = str(tmp_path / f"init_{time.monotonic_ns()}")
    ctx = mp.start_processes(_entry, args=(fn, world_size, init_file, args), nprocs=world_size, join=False, start_method="spawn")
    end = time.monotonic() + deadline
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > end:
                raise TimeoutError(f"{fn.__name__}: a rank was still running after {deadline:.0f} s (hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


def _hooked(model_seed=0, **options):
    model = DDP(_model(), bucket_cap_mb=0.05)
    opts = dict(warmup_steps=1, min_compress_numel=0, log_every=0)
    opts.update(options)
    return model, gradcomp.register(model, **opts)


# ---------------------------------------------------------------------------------------------
# 1. ranks agree or stop


def _disagree_worker(rank, world_size, tmp):
    cases = [
        ("block_size", dict(block_size=128 if rank == 1 else 256)),  # message sizes may coincide: silent before
        ("bits", dict(bits=4 if rank == 1 else 8)),
        ("warmup_steps", dict(warmup_steps=3 if rank == 1 else 1)),
        ("min_compress_numel", dict(min_compress_numel=1 if rank == 1 else 0)),
        ("error_feedback", dict(error_feedback=rank != 1)),
        ("seed", dict(stochastic_rounding=True, seed=rank == 1 and 7 or 0)),
        ("topology", dict(topology=Topology(local_world_size=1 if rank == 1 else 3))),
    ]
    for field, opts in cases:
        model = DDP(_model(), bucket_cap_mb=0.05)
        t0 = time.monotonic()
        kwargs = dict(warmup_steps=1, min_compress_numel=0, log_every=0)
        kwargs.update(opts)
        with pytest.raises(ValueError) as info:
            gradcomp.register(model, **kwargs)
        msg = str(info.value)
        assert time.monotonic() - t0 < PG_TIMEOUT, f"{field}: took {time.monotonic() - t0:.1f} s"
        assert f"{field} (" in msg and "ranks 0, 2:" in msg and "rank 1:" in msg, msg
        # every rank raises the very same message
        gathered = [None] * world_size
        dist.all_gather_object(gathered, msg)
        assert len(set(gathered)) == 1, gathered


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_ranks_with_different_options_all_raise_the_same_error(tmp_path):
    _spawn(_disagree_worker, 3, tmp_path, str(tmp_path))


def _lonely_worker(rank, world_size, tmp):
    flag = os.path.join(tmp, "done")
    if rank == 1:  # never builds the hook state; waits until rank 0 gave up
        for _ in range(600):
            if os.path.exists(flag):
                return
            time.sleep(0.05)
        raise AssertionError("rank 0 never gave up")
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="gradcomp") as info:
            gradcomp.QuantizedAllReduceState(bits=8)
        elapsed = time.monotonic() - t0
        assert elapsed < PG_TIMEOUT + SLACK, elapsed
        assert "Every rank must build the hook state" in str(info.value)
    finally:
        open(flag, "w").close()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_one_rank_without_state_fails_within_the_timeout(tmp_path):
    _spawn(_lonely_worker, 2, tmp_path, str(tmp_path))


def _register_worker(rank, world_size):
    made = []
    real = dist.new_group

    def counting(*a, **k):
        made.append(1)
        return real(*a, **k)

    dist.new_group = counting
    model, state = _hooked()
    n = len(made)
    if rank == 0:
        with pytest.raises(ValueError, match="already has a communication hook"):
            gradcomp.register(model, bits=4)
        assert len(made) == n, "a second register created a process group before refusing"
    # sparse gradients: refused at registration, before any collective ...
    bag = nn.EmbeddingBag(50, 8, mode="sum", sparse=True)
    sparse = DDP(nn.Sequential(bag, nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="sparse=True"):
        gradcomp.register(sparse)
    assert len(made) == n
    # ... and at the first bucket when the hook is registered by hand
    st = gradcomp.QuantizedAllReduceState(warmup_steps=1, min_compress_numel=0, log_every=0)
    sparse.register_comm_hook(st, gradcomp.quantized_allreduce_hook)
    with pytest.raises(ValueError, match="sparse gradients"):
        sparse(torch.tensor([[1, 2], [3, 4]]), ).sum().backward()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_register_twice_and_sparse_gradients_are_refused_up_front(tmp_path):
    _spawn(_register_worker, 2, tmp_path)


# ---------------------------------------------------------------------------------------------
# 2. timeouts like PyTorch's; 3. failure poisons nothing


def _stall_worker(rank, world_size):
    model, state = _hooked()
    assert abs(state._timeout.total_seconds() - PG_TIMEOUT) < 1e-6  # the user's group timeout reached the hook
    for step in range(3):
        _backward(model, rank, step)
    if rank == 1:  # stalls inside backward (a gradient hook sleeps), longer than the timeout
        h = next(model.module.parameters()).register_hook(lambda g: (time.sleep(PG_TIMEOUT + 2), g)[1])
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        _backward(model, rank, 3)
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert "gradcomp" in msg and "at step 3, bucket" in msg, msg
    if rank == 0:
        assert "timed out" in msg and "exchange" in msg, msg
        assert elapsed < PG_TIMEOUT + SLACK, f"the survivor waited {elapsed:.1f} s"
    else:
        h.remove()
    # the state refuses further steps on every rank
    with pytest.raises(HookFailedError, match="refuses further steps"):
        state.synchronize()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_stalled_peer_makes_the_others_raise_within_the_timeout(tmp_path):
    _spawn(_stall_worker, 2, tmp_path)


class InjectedFault(ValueError):
    """An error raised on purpose on the communication thread."""


def _thread_fault_worker(rank, world_size):
    model, state = _hooked()
    for step in range(3):
        _backward(model, rank, step)
    if rank == 0:
        real = state._exchange
        calls = []

        def failing(*a, **k):
            calls.append(1)
            if len(calls) == 1:
                raise InjectedFault("codec exploded")
            return real(*a, **k)

        state._exchange = failing
    with pytest.raises(RuntimeError) as info:
        _backward(model, rank, 3)
    msg = str(info.value)
    if rank == 0:  # the original type and message reach the training loop
        assert "InjectedFault" in msg and "codec exploded" in msg and "step 3, bucket" in msg, msg
    else:  # the peer stops within the timeout and says who failed first
        assert "gradcomp" in msg and "rank 0" in msg and "codec exploded" in msg, msg
    # the loop catches it and goes on: every rank refuses the next step instead of pairing step 3 with 4
    with pytest.raises(Exception):
        _backward(model, rank, 4)
    with pytest.raises(HookFailedError, match="codec exploded"):
        state.state_dict()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_exception_on_the_comm_thread_stops_every_rank(tmp_path):
    _spawn(_thread_fault_worker, 2, tmp_path)


# ---------------------------------------------------------------------------------------------
# 4. checkpoints: the first step after a load compares step and layout across ranks


def _swap_buckets(sd, a, b):
    sd = dict(sd)
    for name in ("bucket_keys", "bucket_numels", "worker_residuals", "server_residuals"):
        d = dict(sd[name])
        d[a], d[b] = d[b], d[a]
        sd[name] = d
    sums = {k: dict(v) for k, v in sd["checksums"].items()}
    for d in sums.values():
        d[a], d[b] = d[b], d[a]
    sd["checksums"] = sums
    return sd


def _load_mismatch_worker(rank, world_size):
    model, state = _hooked()
    for step in range(4):
        _backward(model, rank, step)
    sd = state.state_dict()
    assert len(sd["bucket_keys"]) >= 2
    variants = {
        "step": dict(sd, step=sd["step"] + 3),
        "bucket layout": _swap_buckets(sd, *sorted(sd["bucket_keys"])[:2]),
    }
    for what, bad in variants.items():
        model, state = _hooked()
        state.load_state_dict(bad if rank == 1 else sd)  # each load alone is a valid checkpoint
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as info:
            _backward(model, rank, 4)
        msg = str(info.value)
        assert "the ranks hold different hook states" in msg and what in msg, msg
        assert time.monotonic() - t0 < PG_TIMEOUT, "the check must not wait for a timeout"
    # the same checkpoints on every rank: the run goes on
    model, state = _hooked()
    state.load_state_dict(sd)
    _backward(model, rank, 4)
    assert state.step == sd["step"] + 1


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_ranks_that_loaded_different_checkpoints_stop_at_the_first_step(tmp_path):
    _spawn(_load_mismatch_worker, 2, tmp_path)
