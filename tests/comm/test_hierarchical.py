"""The hierarchical hook on gloo, 2 "nodes" x 2 and 2 x 3 ranks: parity with DDP, identical ranks, bytes,
non-finite steps, resume; and the layout and topology arithmetic in one process."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from gradcomp.comm.plan import ShardLayout
from gradcomp.comm.hierarchical import HierarchicalLayout
from gradcomp.comm.topology import Topology

from _dist import spawn

from _models import STEP_TOL, _all_identical, _backward, _batch, _grads, _model, check_nonfinite_step_skipped, check_resume_bit_identical


def _hooked(bits, error_feedback, local, **opts):
    model = DDP(_model(), bucket_cap_mb=0.05)
    state = gradcomp.register(
        model, bits=bits, error_feedback=error_feedback, warmup_steps=2, min_compress_numel=0, log_every=1,
        topology=Topology(local_world_size=local), **opts,
    )
    return model, state


# ---------------------------------------------------------------------------------------------
# one process: arithmetic


def test_layout_matches_the_flat_padding_and_cuts_slow_bytes_by_ranks_per_node():
    lay = HierarchicalLayout(1_000_000, nodes=2, local_size=2, bits=8, block_size=256)
    assert (lay.shard_numel, lay.chunk_numel, lay.padded_numel) == (250112, 500224, 1000448)
    assert lay.padded_numel == ShardLayout(1_000_000, 4, 8, 256).padded_numel
    assert lay.inter_bytes_sent == 508072  # 2 messages of 250112 code bytes, 977 scales and a 16-byte header
    assert lay.intra_bytes_sent == 1 * 500224 * 4 + 1 * 2 * 254036  # fp32 reduce-scatter, then the messages
    # a node's NIC: L inter-node exchanges against the flat exchange's L (P - L) shard messages
    for nodes, local, bits in [(2, 2, 8), (2, 3, 8), (2, 2, 4), (4, 2, 8)]:
        lay = HierarchicalLayout(3_000_000, nodes, local, bits, 256)
        flat = lay.flat
        node_flat = 2 * local * (nodes * local - local) * flat.message_bytes
        node_hier = local * lay.inter_bytes_sent
        assert node_flat / node_hier == pytest.approx(local, rel=1e-3)
    assert HierarchicalLayout(1000, 2, 2, 8, 256).server_offset(node=1, local_rank=1) == 3 * 256
    with pytest.raises(ValueError, match="nodes must be a positive int"):
        HierarchicalLayout(1000, 0, 2, 8, 256)


def test_topology_groups_and_environment():
    t = Topology(local_world_size=3)
    assert t.node_groups(6) == [[0, 1, 2], [3, 4, 5]]
    assert t.cross_groups(6) == [[0, 3], [1, 4], [2, 5]]
    assert (t.node_of(4), t.local_rank(4), t.num_nodes(6)) == (1, 1, 2)
    env = {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4", "RANK": "3", "GROUP_RANK": "1", "LOCAL_RANK": "1"}
    assert Topology.from_env(env) == Topology(2)
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE is not set"):
        Topology.from_env({"WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="numbered node by node"):
        Topology.from_env({**env, "RANK": "2"})
    with pytest.raises(ValueError, match="multiple of local_world_size=2"):
        Topology.from_env({**env, "WORLD_SIZE": "5"})
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE must be an integer, got 'two'"):
        Topology.from_env({"LOCAL_WORLD_SIZE": "two"})
    with pytest.raises(TypeError, match="local_world_size must be an int"):
        Topology(2.0)
    with pytest.raises(ValueError, match="must be >= 1"):
        Topology(0)
    with pytest.raises(TypeError, match="topology must be a gradcomp Topology"):
        gradcomp.HookConfig(topology=2)


# ---------------------------------------------------------------------------------------------
# across processes


def _parity_worker(rank, world_size, local):
    steps = 4
    for bits in (8, 4):
        ref = DDP(_model(), bucket_cap_mb=0.05)
        model, state = _hooked(bits, False, local)
        flat = DDP(_model(), bucket_cap_mb=0.05)
        gradcomp.register(flat, bits=bits, error_feedback=False, warmup_steps=2, min_compress_numel=0)
        err_h = err_f = 0.0
        for step in range(steps):
            for m in (ref, model, flat):
                _backward(m, rank, step)
            exact, got = _grads(ref), _grads(model)
            assert _all_identical(got), f"ranks differ at step {step} (bits={bits})"
            rel = float((got - exact).norm() / exact.norm())
            if step < 2:
                assert rel < 1e-6, f"warm-up step {step} should be plain all-reduce, rel error {rel}"
            else:
                assert rel < STEP_TOL[bits], f"bits={bits} step {step}: rel error {rel} > {STEP_TOL[bits]}"
                err_h += rel
                err_f += float((_grads(flat) - exact).norm() / exact.norm())
        # quantized once per slow link instead of over all ranks: no worse than the flat exchange
        assert err_h <= err_f * 1.05, f"bits={bits}: hierarchical error {err_h} vs flat {err_f}"
        s = state.stats()
        plans = list(state.plans.values())
        assert len(plans) >= 2
        nodes = world_size // local
        lays = [HierarchicalLayout(p.layout.numel, nodes, local, bits, 256) for p in plans]
        assert s["bytes_sent_step"] == sum(h.inter_bytes_sent + h.intra_bytes_sent for h in lays)
        assert s["intra_node_bytes_step"] == sum(h.intra_bytes_sent for h in lays)
        assert s["compressed_buckets_step"] == s["buckets_step"] == len(plans)

        if bits == 8:
            continue  # error feedback: int4, where it matters most (each state costs new process groups)
        # with error feedback and frozen weights: the sum of transmitted gradients tracks the true sum
        ref = DDP(_model(), bucket_cap_mb=0.05)
        model, state = _hooked(bits, True, local)
        true_sum, sent_sum = 0, 0
        for step in range(14):
            _backward(ref, rank, step % 3)
            _backward(model, rank, step % 3)
            if step >= 2:
                true_sum = true_sum + _grads(ref)
                sent_sum = sent_sum + _grads(model)
        drift = float((sent_sum - true_sum).norm() / true_sum.norm())
        assert drift < STEP_TOL[bits] / 4, f"bits={bits}: error feedback drift {drift}"
        # the residuals: one chunk of the node's sum and one inter-node shard per rank
        for index, plan in state.plans.items():
            lay = HierarchicalLayout(plan.layout.numel, nodes, local, bits, 256)
            assert state.residuals.worker(index).numel() == lay.chunk_numel
            assert state.residuals.server(index).numel() == lay.shard_numel

    # one node holding every rank: nothing crosses a slow link, so nothing is quantized
    ref = DDP(_model(), bucket_cap_mb=0.05)
    model, state = _hooked(4, True, world_size)
    for step in range(3):
        _backward(ref, rank, step)
        _backward(model, rank, step)
        assert float((_grads(model) - _grads(ref)).norm() / _grads(ref).norm()) < 1e-6
        assert _all_identical(_grads(model))


def _nonfinite_and_resume_worker(rank, world_size, local):
    # a non-finite gradient on one rank reaches every rank, and leaves the residuals untouched
    model, state = _hooked(4, True, local)
    for step in range(4):
        _backward(model, rank, step)
    before = state.state_dict()
    x, y = _batch(rank, 9)
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    if rank == world_size - 1:  # only one rank, on the last node, overflows
        loss = loss * float("inf")
    loss.backward()
    g = _grads(model)
    assert not torch.isfinite(g).all(), "every rank must see a non-finite gradient"
    assert _all_identical(g)
    check_nonfinite_step_skipped(model, state, before, rank, 10)

    # a fresh job from a checkpoint continues bit-identically (the buckets are rebuilt on resume,
    # so the residuals are relocated across the node and inter-node groups)
    # round-to-nearest at 2 x 2, stochastic rounding (noise drawn per node and per shard owner) at 2 x 3
    for bits, stochastic in ((8, False),) if local == 2 else ((4, True),):
        opts = dict(bits=bits, warmup_steps=2, min_compress_numel=0, stochastic_rounding=stochastic, seed=3, topology=Topology(local))
        check_resume_bit_identical(rank, opts, split=4, end=7)

    # a checkpoint of another node layout is refused before anything changes
    flat_state = gradcomp.QuantizedAllReduceState(bits=state.config.bits, warmup_steps=2)
    with pytest.raises(ValueError, match="checkpoint has topology"):
        flat_state.load_state_dict(state.state_dict())


def _bad_topology(rank, world_size):
    model = DDP(_model())
    groups_before = dist.distributed_c10d._world.group_count
    bad = world_size - 1
    with pytest.raises(ValueError, match=f"multiple of local_world_size={bad}"):
        gradcomp.register(model, bits=8, topology=Topology(bad))
    assert dist.distributed_c10d._world.group_count == groups_before, "no group may be created for a bad topology"
    _backward(model, rank, 0)  # plain DDP still works: nothing was registered


def _worker(rank, world_size, local):
    _bad_topology(rank, world_size)
    _parity_worker(rank, world_size, local)
    _nonfinite_and_resume_worker(rank, world_size, local)


# one spawn per layout: starting processes is what costs on a busy machine
@pytest.mark.slow
@pytest.mark.parametrize("world_size,local", [(4, 2), (6, 3)])
def test_parity_bytes_nonfinite_resume(tmp_path, world_size, local):
    """2 nodes x 2 and 2 x 3: DDP parity, identical ranks, bytes, error feedback, non-finite, resume, bad topology."""
    spawn(_worker, world_size, tmp_path, local, timeout=240.0)
