"""Small model, data and checks shared by the multi-process hook tests."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

# per-step relative error of the averaged gradient against exact DDP, without error feedback
STEP_TOL = {8: 0.03, 4: 0.4}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # 3 x 129 inputs: bucket lengths divisible by neither the world size nor the block size
    return nn.Sequential(nn.Linear(129, 257), nn.Tanh(), nn.Linear(257, 131), nn.Tanh(), nn.Linear(131, 7))


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 129, generator=g), torch.randint(0, 7, (16,), generator=g)


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _all_identical(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(gathered[0].view(torch.int32), g.view(torch.int32)) for g in gathered)


def _backward(model, rank, step):
    x, y = _batch(rank, step)
    model.zero_grad(set_to_none=False)
    nn.functional.cross_entropy(model(x), y).backward()


def _train(model, opt, rank, steps):
    for step in steps:
        _backward(model, rank, step)
        opt.step()


def check_resume_bit_identical(rank: int, opts: dict, split: int, end: int):
    """Train to ``end`` in one go, and again from a checkpoint taken at ``split`` in a fresh model,
    optimizer and hook state; assert both end with bit-identical parameters. Return the resumed state."""
    import gradcomp

    model = DDP(_model(), bucket_cap_mb=0.05)
    state = gradcomp.register(model, **opts)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, rank, range(0, split))
    ckpt = copy.deepcopy({"model": model.module.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()})
    _train(model, opt, rank, range(split, end))
    expected = [p.detach().clone() for p in model.parameters()]

    fresh = _model(seed=123)
    fresh.load_state_dict(ckpt["model"])
    model2 = DDP(fresh, bucket_cap_mb=0.05)
    state2 = gradcomp.register(model2, **opts)
    state2.load_state_dict(ckpt["hook"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, rank, range(split, end))
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b.detach()), f"{opts}: resumed run diverged from the uninterrupted one"
    assert _all_identical(torch.cat([p.detach().reshape(-1) for p in model2.parameters()]))
    return state2


def check_nonfinite_step_skipped(model, state, before: dict, rank: int, next_step: int) -> dict:
    """Assert that a non-finite step left every bucket's residuals as ``before`` held them (not only the
    non-finite bucket's) and was counted, and that step ``next_step`` is finite again. Return the hook
    state dict taken after the non-finite step."""
    after = state.state_dict()
    for key in ("worker_residuals", "server_residuals"):
        for idx, r in before[key].items():
            assert torch.equal(r, after[key][idx]), f"{key}[{idx}] changed on a non-finite step"
    assert state.stats()["nonfinite_steps"] == 1
    _backward(model, rank, next_step)
    assert torch.isfinite(_grads(model)).all()
    return after
