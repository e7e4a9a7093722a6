"""PyTorch's own DDP hook test patterns, run with gradcomp's hook (2 gloo ranks).

Uneven inputs with ``join`` (with and without ``throw_on_early_termination``), BatchNorm buffer
broadcast, several buckets at ``bucket_cap_mb=1``, and ``torch.compile`` inside and outside DDP.
(``no_sync``, ``static_graph``, ``gradient_as_bucket_view`` and unused parameters are in test_hook.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp

from _dist import spawn
from _models import STEP_TOL, _all_identical, _batch, _grads, _model

EXACT = dict(bits=8, warmup_steps=1, min_compress_numel=0, error_feedback=False)


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train_uneven(model, rank, throw):
    """Rank r has 3 + 2 r batches; returns whether this rank saw the early-termination error."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with Join([model], throw_on_early_termination=throw):
            for step in range(3 + 2 * rank):
                x, y = _batch(rank, step)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    except RuntimeError as e:
        if not throw or "exhausted" not in str(e):
            raise
        return True
    return False


def _join_worker(rank, world_size):
    # without throwing: the joined rank shadows the collectives, with the hook on zero buckets
    ref = DDP(_model(), bucket_cap_mb=0.05)
    _train_uneven(ref, rank, throw=False)
    model = DDP(_model(), bucket_cap_mb=0.05)
    state = gradcomp.register(model, **EXACT)
    _train_uneven(model, rank, throw=False)
    got, exact = _params(model), _params(ref)
    assert _all_identical(got), "ranks differ after join"
    assert float((got - exact).norm() / (exact - _params(_model())).norm()) < STEP_TOL[8]
    assert state.step == 3 + 2 * (world_size - 1), "every step of the longest rank is one hook step"

    # throwing: every rank stops at the first step one rank cannot take, with identical weights
    model = DDP(_model(), bucket_cap_mb=0.05)
    gradcomp.register(model, **EXACT)
    threw = _train_uneven(model, rank, throw=True)
    assert threw, "throw_on_early_termination should raise on every rank"
    assert _all_identical(_params(model))


@pytest.mark.slow
def test_join_uneven_inputs_with_and_without_throw(tmp_path):
    spawn(_join_worker, 2, tmp_path)


def _check_steps_against(ref, model, ddp, rank, what=""):
    """Run 3 steps on ``ref`` (plain DDP) and ``model``; assert ``ddp``'s gradients agree on every rank
    and stay within the int8 step tolerance of ``ref``'s."""
    for step in range(3):
        for m in (ref, model):
            x, y = _batch(rank, step)
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        got, exact = _grads(ddp), _grads(ref)
        assert _all_identical(got), what
        assert float((got - exact).norm() / exact.norm()) < STEP_TOL[8], what


def _buffers_buckets_compile_worker(rank, world_size):
    # BatchNorm: DDP broadcasts rank 0's buffers before each forward; the hook leaves them alone
    def bn_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(129, 64), nn.BatchNorm1d(64), nn.Tanh(), nn.Linear(64, 7))

    model = DDP(bn_model())  # broadcast_buffers=True by default
    gradcomp.register(model, **EXACT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        x, y = _batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    model(_batch(rank, 9)[0])  # DDP broadcasts rank 0's running statistics; eval mode leaves them as they came
    assert _all_identical(model.module[1].running_mean) and _all_identical(_params(model))

    # bucket_cap_mb=1 with 2.6 MB of parameters: several buckets per step, in DDP's order on every rank
    def big():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(129, 1024), nn.Tanh(), nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, 7))

    ref, model = DDP(big(), bucket_cap_mb=1), DDP(big(), bucket_cap_mb=1)
    state = gradcomp.register(model, **EXACT)
    _check_steps_against(ref, model, model, rank)
    assert state.stats()["buckets_step"] >= 2, state.stats()

    # torch.compile inside DDP and around it (Dynamo's DDPOptimizer splits graphs at bucket boundaries;
    # it refuses buckets smaller than DDP's 1 MB first bucket)
    for name, build in (
        ("compile inside DDP", lambda: DDP(torch.compile(_model(), backend="aot_eager"), bucket_cap_mb=1)),
        ("compile around DDP", lambda: DDP(_model(), bucket_cap_mb=1)),
    ):
        ref = DDP(_model(), bucket_cap_mb=1)
        ddp = build()
        gradcomp.register(ddp, **EXACT)
        model = ddp if name == "compile inside DDP" else torch.compile(ddp, backend="aot_eager")
        _check_steps_against(ref, model, ddp, rank, name)


@pytest.mark.slow
def test_batchnorm_buffers_several_buckets_and_torch_compile(tmp_path):
    spawn(_buffers_buckets_compile_worker, 2, tmp_path, timeout=240)
