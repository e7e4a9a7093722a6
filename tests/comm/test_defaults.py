"""The DDP hook with the options a user gets by default, one shared test per behaviour.

Most tests of the hook set ``warmup_steps=1, min_compress_numel=0`` to compress a tiny model from its
second step. A user's run does not: the first 10 steps are plain all-reduces, buckets under 16,384
values are never compressed, and DDP's buckets change after a process's first step. These tests run
every gradcomp option at its default on ``_models._mlp`` (37 -> 333 -> 777 -> 10, 280K parameters):
DDP's first step puts every parameter in one bucket, the rebuilt buckets are a large one (the last two
layers, 267,298 values, compressed after the warm-up) and a small one (the first layer, 12,654 values,
always plain). With AdamW, on 2 and 3 flat ranks and on 2 "nodes" x 2:

* the warm-up is PyTorch's all-reduce hook bit for bit, and the small bucket stays so after it;
* every rank holds bit-identical gradients at every step;
* the bytes of every step are those of the documented formula, bucket by bucket;
* the error-feedback invariant across processes: at every compressed step,
  ``mean_r(g_r) == out + mean(worker residual changes) + server residual changes`` (fp32 rounding);
* a non-finite step (in the compressed bucket or in the plain one, on one rank) reaches every rank,
  is skipped by the GradScaler and leaves every residual as it was; training goes on;
* chunking (the default one chunk against many) and half-precision gradients change nothing else (2 ranks).

``test_ddp_patterns_with_default_options`` runs PyTorch's DDP patterns (static graph, unused
parameters, bucket views, ``no_sync``, ``join``, BatchNorm buffers, ``torch.compile`` around DDP)
with the default options, and resumes with ``static_graph`` and ``find_unused_parameters``.
Resume with default options is in test_resume.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from gradcomp.codec.formats import HEADER_BYTES
from gradcomp.comm.hierarchical import HierarchicalLayout
from gradcomp.comm.topology import Topology

from _dist import spawn
from _models import STEP_TOL, _all_identical, _mlp, check_default_resume

DEFAULTS = gradcomp.HookConfig()
WARMUP, MIN_NUMEL, BITS, B = DEFAULTS.warmup_steps, DEFAULTS.min_compress_numel, DEFAULTS.bits, DEFAULTS.block_size
# DDP's buckets of _mlp: one bucket in a process's first step, then the rebuilt ones (parameter keys)
FIRST_STEP_BUCKETS = [(5, 4, 3, 2, 1, 0)]
REBUILT_BUCKETS = [(5, 4, 3, 2), (1, 0)]


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(7919 * step + rank)
    return torch.randn(32, 37, generator=g), torch.randint(0, 10, (32,), generator=g)


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _gather(t: torch.Tensor) -> list:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _plain_bytes(numel: int, P: int) -> int:
    """What an fp32 ring all-reduce of ``numel`` values sends per rank (DDP's default all-reduce)."""
    return 2 * (P - 1) * numel * 4 // P


def _compressed_bytes(numels, P: int, topology) -> tuple:
    """The documented bytes of a compressed bucket, ``(sent, of which inside the node)``, from the parameter sizes.

    Flat (docs/hook.md): parameters start on block boundaries; one chunk per 2**20 values per rank (here
    one), cut into P shards of whole blocks; each rank sends 2 (P-1) messages of codes, fp32 scales and
    a 16-byte header. Hierarchical (gradcomp.comm.hierarchical): 2 (M-1) such messages between nodes
    on a chunk of M shards, an fp32 reduce-scatter and an all-gather of messages inside the node.
    """
    blocks = sum(-(-n // B) for n in numels)
    if topology is None:
        assert blocks * B <= P * (1 << 20), "the formula below is that of a single chunk"
        shard_blocks = -(-blocks // P)
        code = shard_blocks * B * BITS // 8
        message = code + (-code) % 4 + 4 * shard_blocks + HEADER_BYTES
        return 2 * (P - 1) * message, 0
    L = topology.local_world_size
    M = P // L
    shard_blocks = -(-blocks // P)
    chunk = M * shard_blocks * B
    code = shard_blocks * B * BITS // 8
    message = code + (-code) % 4 + 4 * shard_blocks + HEADER_BYTES
    intra = (L - 1) * chunk * 4 + (L - 1) * M * message
    return 2 * (M - 1) * message + intra, intra


def _aligned(plan, grads_by_key) -> torch.Tensor:
    """A bucket's values (parameter keys -> flat tensors) in the plan's block-aligned layout, zero-padded."""
    out = torch.zeros(plan.padded_numel)
    for key, off, n in zip(plan.keys, plan.offsets, plan.numels):
        out[off : off + n] = grads_by_key[key].reshape(-1)
    return out


def _real(plan) -> torch.Tensor:
    """Indices of the aligned layout that hold values (not padding)."""
    return torch.cat([torch.arange(off, off + n) for off, n in zip(plan.offsets, plan.numels)])


def _residuals_aligned(state, plan, index, topology, rank, P):
    """Every rank's committed residuals of bucket ``index`` in the aligned layout: (sum of the worker
    residuals, each divided by the ranks it averages over; the server residuals). Zeros before the first commit."""
    n = plan.padded_numel
    has = index in state.residuals.layout and state.residuals.layout[index][0] == plan.keys
    if topology is None:
        w = state.residuals.worker(index) if has else torch.zeros(n)
        s = state.residuals.server(index) if has else torch.zeros(plan.server_numel)
        worker = torch.stack(_gather(w)).sum(0) / P
        server = plan.server_to_aligned(torch.stack(_gather(s)))
        return worker, server
    L = topology.local_world_size
    M = P // L
    lay = HierarchicalLayout(plan.layout.numel, M, L, BITS, B)
    chunk, shard = lay.chunk_numel, lay.shard_numel
    w = state.residuals.worker(index) if has else torch.zeros(chunk)
    s = state.residuals.server(index) if has else torch.zeros(shard)
    worker, server = torch.zeros(n), torch.zeros(n)
    for r, (wr, sr) in enumerate(zip(_gather(w), _gather(s))):
        m, l = r // L, r % L
        worker[l * chunk : (l + 1) * chunk] += wr / M  # rank (m, l) quantizes chunk l of its node's mean
        start = lay.server_offset(m, l)
        server[start : start + shard] = sr
    return worker, server


# ---------------------------------------------------------------------------------------------


def _defaults_worker(rank, world_size, local):
    topology = None if local is None else Topology(local_world_size=local)
    P = world_size
    opts = {} if topology is None else {"topology": topology}

    # PyTorch's own all-reduce hook, same buckets. (DDP without a hook multiplies by 1/P where the hooks
    # divide by P: at P = 3 that differs in the last bit of some values.)
    ref = DDP(_mlp())
    ref.register_comm_hook(None, default_hooks.allreduce_hook)
    model = DDP(_mlp())
    state = gradcomp.register(model, **opts)  # every other option at its default
    single = _mlp()  # this rank's own gradient, without DDP
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = WARMUP + 4
    for step in range(steps):
        x, y = _batch(rank, step)
        for m in (ref, single):
            with torch.no_grad():
                for a, b in zip(m.parameters(), model.parameters()):
                    a.copy_(b)
            m.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(m(x), y).backward()
        plans_before = dict(state.plans)
        before = {i: _residuals_aligned(state, p, i, topology, rank, P) for i, p in plans_before.items()}
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        got, exact = _grads(model), _grads(ref)
        assert _all_identical(got), f"ranks differ at step {step}"
        s = state.stats()

        # bytes: bucket by bucket, as documented
        buckets = FIRST_STEP_BUCKETS if step == 0 else REBUILT_BUCKETS
        numels = [[model.module.get_parameter(n).numel() for n in _names(model.module, keys)] for keys in buckets]
        sent = fp32 = intra = compressed = 0
        for sizes in numels:
            fp32 += _plain_bytes(sum(sizes), P)
            if step >= WARMUP and sum(sizes) >= MIN_NUMEL:
                b, i = _compressed_bytes(sizes, P, topology)
                sent, intra, compressed = sent + b, intra + i, compressed + 1
            else:
                sent += _plain_bytes(sum(sizes), P)
        assert (s["bytes_sent_step"], s["fp32_bytes_step"], s["intra_node_bytes_step"]) == (sent, fp32, intra), (step, s)
        assert (s["compressed_buckets_step"], s["buckets_step"]) == (compressed, len(buckets)), (step, s)

        # plain buckets are DDP's all-reduce bit for bit: everything in the warm-up, the small bucket after it
        small = slice(0, 2)  # the first layer's weight and bias: the small bucket
        exact_params = list(ref.parameters())[small] if step >= WARMUP else list(ref.parameters())
        got_params = list(model.parameters())[small] if step >= WARMUP else list(model.parameters())
        for a, b in zip(got_params, exact_params):
            assert torch.equal(a.grad, b.grad), f"step {step}: a plain bucket differs from PyTorch's all-reduce hook"
        if step >= WARMUP:
            rel = float((got - exact).norm() / exact.norm())
            assert 0 < rel < STEP_TOL[BITS], f"step {step}: relative error {rel} against DDP"

            # the error-feedback invariant across processes, on the compressed bucket
            (index, plan), = state.plans.items()
            keyed = {k: p.grad for k, p in enumerate(single.parameters())}
            mean = torch.stack(_gather(_aligned(plan, keyed))).sum(0) / P
            out = _aligned(plan, {k: p.grad for k, p in enumerate(model.parameters())})
            w0, s0 = before.get(index, (torch.zeros(plan.padded_numel), torch.zeros(plan.padded_numel)))
            w1, s1 = _residuals_aligned(state, plan, index, topology, rank, P)
            real = _real(plan)
            lhs = (mean + (w0 - w1) + (s0 - s1))[real]
            err = float((lhs - out[real]).abs().max())
            scale = float(mean[real].abs().max())
            quant = float((out - mean)[real].abs().max())
            assert err <= 1e-5 * scale, f"step {step}: error feedback invariant off by {err:.3g} (gradients up to {scale:.3g})"
            assert quant > 1e3 * err, f"step {step}: quantization moved the average by {quant:.3g} only; the invariant says nothing"
        opt.step()
    assert _all_identical(_flat_params(model))

    # a non-finite gradient on one rank, in the compressed bucket and then in the plain one: every rank
    # sees it, the GradScaler skips the step, every bucket's residuals stay; then training goes on
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step, layer in ((steps, 4), (steps + 1, 0)):
        keep = state.state_dict()
        params = _flat_params(model)
        x, y = _batch(rank, step)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if rank == P - 1:
            loss = loss + float("inf") * model.module[layer].weight.sum()
        scaler.scale(loss).backward()
        assert not torch.isfinite(model.module[layer].weight.grad).all(), f"rank {rank}: the inf did not reach this rank"
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() < scale and torch.equal(_flat_params(model), params), "the non-finite step was not skipped"
        after = state.state_dict()
        for key in ("worker_residuals", "server_residuals"):
            assert after[key].keys() == keep[key].keys()
            for i, r in keep[key].items():
                assert torch.equal(r, after[key][i]), f"{key}[{i}] changed on a non-finite step (layer {layer})"
    assert state.stats()["nonfinite_steps"] == 2
    x, y = _batch(rank, steps + 2)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.isfinite(_grads(model)).all() and not torch.equal(_flat_params(model), params)
    assert state.stats()["nonfinite_steps"] == 2 and state.stats()["compressed_buckets_step"] == 1
    assert _all_identical(_flat_params(model))
    state.close()

    if topology is not None or P != 2:
        return
    # the default chunks (one here) against chunks of 16 blocks: the same bits; bf16 and fp16 gradients
    runs = []
    for chunk in (None, 16 * B):
        ddp = DDP(_mlp())
        st = gradcomp.register(ddp, chunk_numel=chunk)
        o = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        for step in range(WARMUP + 2):
            x, y = _batch(rank, step)
            o.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            o.step()
        chunks = [len(p.chunks) for p in st.plans.values()]
        assert chunks == [1] if chunk is None else len(chunks) == 1 and chunks[0] >= 20, chunks
        runs.append(_flat_params(ddp))
        st.close()
    assert torch.equal(runs[0], runs[1]), "chunking changed the result"
    for dtype in (torch.bfloat16, torch.float16):
        ddp = DDP(_mlp().to(dtype))
        st = gradcomp.register(ddp)
        for step in range(WARMUP + 2):
            x, y = _batch(rank, step)
            ddp.zero_grad()
            nn.functional.cross_entropy(ddp(x.to(dtype)).float(), y).backward()
            g = _grads(ddp)
            assert g.dtype == dtype and torch.isfinite(g).all() and _all_identical(g.float()), (dtype, step)
        assert st.stats()["compressed_buckets_step"] == 1, (dtype, st.stats())
        st.close()


def _names(module: nn.Module, keys) -> list:
    names = [n for n, _ in module.named_parameters()]
    return [names[k] for k in keys]


@pytest.mark.slow
@pytest.mark.parametrize("world_size, local", [(2, None), (3, None), (4, 2)], ids=["flat-P2", "flat-P3", "hierarchical-2x2"])
def test_identical_ranks_bytes_error_feedback_nonfinite_with_default_options(tmp_path, world_size, local):
    spawn(_defaults_worker, world_size, tmp_path, local, timeout=300)


# ---------------------------------------------------------------------------------------------
# PyTorch's DDP patterns with the default options


class _WithUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp()
        self.unused = nn.Linear(10, 300)

    def forward(self, x):
        return self.body(x)


def _check_against(ref, model, ddp, rank, steps, what, micro=1):
    """Run ``steps`` exchanges on ``ref`` (DDP's own all-reduce) and ``model`` (``ddp`` with the hook) at
    fixed weights (``micro`` micro-batches each, the first ones under ``no_sync``); assert identical ranks,
    DDP's result in the warm-up and the int8 tolerance after it."""
    for step in range(steps):
        for m in (ref, model):
            m.zero_grad(set_to_none=False)
            for k in range(micro):
                x, y = _batch(rank, micro * step + k)
                if k < micro - 1:
                    with m.no_sync():
                        nn.functional.cross_entropy(m(x), y).backward()
                else:
                    nn.functional.cross_entropy(m(x), y).backward()
        got = torch.cat([p.grad.reshape(-1) for p in ddp.module.parameters() if p.grad is not None])
        exact = torch.cat([p.grad.reshape(-1) for p in (ref.module.parameters()) if p.grad is not None])
        assert _all_identical(got), f"{what} step {step}: ranks differ"
        rel = float((got - exact).norm() / exact.norm())
        assert rel < (1e-6 if step < WARMUP else STEP_TOL[BITS]), f"{what} step {step}: relative error {rel}"


def _patterns_worker(rank, world_size):
    steps = WARMUP + 2
    cases = [
        ("static_graph", _WithUnusedHead, dict(static_graph=True)),
        ("find_unused_parameters", _WithUnusedHead, dict(find_unused_parameters=True)),
        ("gradient_as_bucket_view", _mlp, dict(gradient_as_bucket_view=True)),
    ]
    for what, factory, kwargs in cases:
        ref, model = DDP(factory(), **kwargs), DDP(factory(), **kwargs)
        state = gradcomp.register(model)
        _check_against(ref, model, model, rank, steps, what)
        assert state.stats()["compressed_buckets_step"] == 1, (what, state.stats())
        state.close()

    # no_sync: two micro-batches, one exchange per step
    ref, model = DDP(_mlp()), DDP(_mlp())
    state = gradcomp.register(model)
    _check_against(ref, model, model, rank, steps, "no_sync", micro=2)
    assert state.step == steps and state.stats()["compressed_buckets_step"] == 1

    # torch.compile around DDP (Dynamo's DDPOptimizer cuts the graph at DDP's bucket boundaries)
    ref, ddp = DDP(_mlp()), DDP(_mlp())
    state = gradcomp.register(ddp)
    _check_against(ref, torch.compile(ddp, backend="aot_eager"), ddp, rank, steps, "compile around DDP")
    assert state.stats()["compressed_buckets_step"] == 1
    state.close()

    # uneven inputs with join: rank r has steps + 2 r batches; the joined rank shadows the exchanges
    def uneven(model, throw):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            with Join([model], throw_on_early_termination=throw):
                for step in range(steps + 2 * rank):
                    x, y = _batch(rank, step)
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
        except RuntimeError as e:
            if not throw or "exhausted" not in str(e):
                raise
            return True
        return False

    ref, model = DDP(_mlp()), DDP(_mlp())
    uneven(ref, False)
    state = gradcomp.register(model)
    uneven(model, False)
    got, exact = _flat_params(model), _flat_params(ref)
    assert _all_identical(got) and state.step == steps + 2 * (world_size - 1)
    assert float((got - exact).norm() / (exact - _flat_params(_mlp())).norm()) < STEP_TOL[BITS]
    model = DDP(_mlp())
    gradcomp.register(model)
    assert uneven(model, True), "throw_on_early_termination should raise on every rank"
    assert _all_identical(_flat_params(model))

    # BatchNorm: DDP broadcasts rank 0's buffers before each forward; the hook leaves them alone
    torch.manual_seed(0)
    bn = DDP(nn.Sequential(nn.Linear(37, 333), nn.BatchNorm1d(333), nn.ReLU(), nn.Linear(333, 777), nn.ReLU(), nn.Linear(777, 10)))
    state = gradcomp.register(bn)
    opt = torch.optim.AdamW(bn.parameters(), lr=1e-3)
    for step in range(steps):
        x, y = _batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(bn(x), y).backward()
        opt.step()
    assert state.stats()["compressed_buckets_step"] == 1
    bn.eval()
    bn(_batch(rank, 99)[0])
    assert _all_identical(bn.module[1].running_mean) and _all_identical(_flat_params(bn))
    state.close()

    # resume with DDP's other first steps: a static graph regroups after its second iteration,
    # find_unused_parameters never regroups
    for kwargs in (dict(static_graph=True), dict(find_unused_parameters=True)):
        check_default_resume(rank, {}, split=12, end=14, ddp_kwargs=kwargs)


@pytest.mark.slow
def test_ddp_patterns_with_default_options(tmp_path):
    spawn(_patterns_worker, 2, tmp_path, timeout=300)
