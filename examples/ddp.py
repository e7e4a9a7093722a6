"""DDP with int8 gradients: the smallest complete gradcomp job (2 CPU processes, gloo).

    torchrun --standalone --nproc-per-node 2 examples/ddp.py             # CPU: gloo
    torchrun --standalone --nproc-per-node 2 examples/ddp.py --bits 4    # 7.7x fewer bytes

With CUDA it takes NCCL and one GPU per process. The first 10 steps use plain all-reduce while DDP
settles its buckets; from step 11 the gradients travel as int8 codes: rank 0 prints the ratio.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import gradcomp

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--bits", type=int, default=8, choices=(8, 4, 2))
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR
rank = dist.get_rank()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)

torch.manual_seed(0)  # the same initial weights on every rank
model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).to(device)
ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
state = gradcomp.register(ddp, bits=args.bits)  # <- gradcomp: every rank, before the first step
opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)

gen = torch.Generator().manual_seed(rank)  # every rank draws its own batches
for step in range(1, args.steps + 1):
    x = torch.randn(128, 64, generator=gen)
    y = x[:, :10].argmax(dim=1)  # the task: which of the first 10 inputs is largest
    loss = nn.functional.cross_entropy(ddp(x.to(device)), y.to(device))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if rank == 0 and step % 10 == 0:
        s = state.stats()  # this rank's bytes in the last step, and what fp32 all-reduce sends
        print(f"step {step:3d}  loss {loss.item():.3f}  sent {s['bytes_sent_step']:7d} bytes"
              f"  fp32 all-reduce {s['fp32_bytes_step']:7d}  {s['compression_ratio']:.2f}x", flush=True)

state.close()  # finish the hook's work and stop its thread before the process group goes
dist.destroy_process_group()
