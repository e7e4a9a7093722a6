"""FSDP2 with int8 gradients and int8 weights (2 CPU processes, gloo).

    torchrun --standalone --nproc-per-node 2 examples/fsdp2.py
    torchrun --standalone --nproc-per-node 2 examples/fsdp2.py --grad-bits 4 --weight-bits 0

The model is sharded with PyTorch's ``fully_shard`` (each block, then the root); one line,
``gradcomp.register_fsdp``, makes FSDP2's gradient reduce-scatter (and, with ``weight_bits=8``,
its parameter all-gather) travel as codes with block-wise scales. The first 10 steps use FSDP2's own
collectives; rank 0 prints the bytes sent against FSDP2's fp32 collectives.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gradcomp

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--grad-bits", type=int, default=8, choices=(8, 4, 2))
parser.add_argument("--weight-bits", type=int, default=8, choices=(8, 0), help="0: FSDP2's own weight all-gather")
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank = dist.get_rank()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)


class Block(nn.Module):
    def __init__(self, width: int = 256):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


torch.manual_seed(0)  # the same initial weights on every rank; fully_shard keeps each rank's shard
model = nn.Sequential(nn.Linear(32, 256), *[Block() for _ in range(4)], nn.Linear(256, 10)).to(device)
mesh = init_device_mesh(device.type, (dist.get_world_size(),))
for block in model[1:-1]:
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
state = gradcomp.register_fsdp(model, grad_bits=args.grad_bits, weight_bits=args.weight_bits or None)  # <- gradcomp
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

gen = torch.Generator().manual_seed(rank)  # every rank draws its own batches
for step in range(1, args.steps + 1):
    x = torch.randn(64, 32, generator=gen)
    y = x[:, :10].argmax(dim=1)  # the task: which of the first 10 inputs is largest
    loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if rank == 0 and step % 10 == 0:
        s = state.stats()  # this rank's bytes in the last step, against FSDP2's fp32 collectives
        print(f"step {step:3d}  loss {loss.item():.3f}  gradients {s['grad_bytes_step']:7d} bytes ({s['grad_ratio']:.3f}x fp32)"
              f"  weights {s['weight_bytes_step']:7d} bytes ({s['weight_ratio']:.3f}x fp32)", flush=True)

dist.barrier()  # no rank tears its groups down while a peer is still in a collective
dist.destroy_process_group()
