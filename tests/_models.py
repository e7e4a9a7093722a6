"""Small model, data and checks shared by the multi-process hook tests."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

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
