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


def _mlp(seed: int = 0) -> nn.Module:
    """37 -> 333 -> 777 -> 10: DDP's default buckets after its first iteration are a small one (the first
    layer, 12,654 values: under the default min_compress_numel) and a large one (compressed)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(37, 333), nn.ReLU(), nn.Linear(333, 777), nn.ReLU(), nn.Linear(777, 10))


def _mlp_step(ddp, opt, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(7919 * step + rank)
    x, y = torch.randn(32, 37, generator=g), torch.randint(0, 10, (32,), generator=g)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()


def check_default_resume(rank: int, opts: dict, split: int, end: int, make_state=None, ddp_kwargs=None) -> None:
    """With DDP's and gradcomp's default options and AdamW: train to ``end`` in one go, and again from a
    checkpoint taken after step ``split`` in a fresh model, DDP, hook state and optimizer (DDP starts from
    its initial buckets again); assert bit-identical parameters, ranks identical, and the same bytes on
    the wire, step by step. ``make_state(ddp)`` registers the hook (default: ``gradcomp.register(ddp, **opts)``);
    ``ddp_kwargs`` go to both DDP models (``static_graph=True``, ...)."""
    import gradcomp

    make_state = make_state or (lambda ddp: gradcomp.register(ddp, **opts))
    ddp_kwargs = ddp_kwargs or {}
    ddp = DDP(_mlp(), **ddp_kwargs)
    state = make_state(ddp)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    sent = {}
    for step in range(end):
        if step == split:
            ckpt = copy.deepcopy({"model": ddp.module.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()})
        _mlp_step(ddp, opt, rank, step)
        sent[step] = state.stats()["bytes_sent_step"]
    assert state.stats()["compressed_buckets_step"] >= 1, f"{opts}: nothing was compressed after the warm-up"
    expected = [p.detach().clone() for p in ddp.parameters()]
    total = state.stats()["bytes_sent_total"]
    state.close()

    fresh = _mlp(seed=123)
    fresh.load_state_dict(ckpt["model"])
    ddp2 = DDP(fresh, **ddp_kwargs)
    state2 = make_state(ddp2)
    state2.load_state_dict(ckpt["hook"])
    opt2 = torch.optim.AdamW(ddp2.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    for step in range(split, end):
        _mlp_step(ddp2, opt2, rank, step)
        assert state2.stats()["bytes_sent_step"] == sent[step], f"{opts} {ddp_kwargs}: step {step} sent other bytes after the resume"
    diff = max(float((a - b.detach()).abs().max()) for a, b in zip(expected, ddp2.parameters()))
    assert diff == 0.0, f"{opts} {ddp_kwargs}: the resumed run diverged from the uninterrupted one (max |diff| {diff:.3g})"
    assert state2.stats()["bytes_sent_total"] == total
    assert _all_identical(torch.cat([p.detach().reshape(-1) for p in ddp2.parameters()]))
    state2.close()
