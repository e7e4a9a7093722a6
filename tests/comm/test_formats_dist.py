"""Every wire format in every path across processes on gloo: the DDP hook (flat and hierarchical), FSDP2's
reduce-scatter and weight all-gather, and the error budget's per-bucket choice; ranks bit-identical, bytes
equal to the plan's, error feedback's drift small, resume bit-exact."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from gradcomp.codec.formats import HEADER_BYTES, wire_format
from gradcomp.comm.budget import BudgetVerdict, decide
from gradcomp.comm.cost import CodecThroughput
from gradcomp.comm.hierarchical import HierarchicalLayout
from gradcomp.comm.plan import ShardLayout
from gradcomp.comm.policy import PLAIN, CommPolicy, LinkFit, NetworkFit, PolicyConfig
from gradcomp.comm.topology import Topology

from _dist import spawn
from _models import _all_identical, _backward, _grads, _model, check_default_resume

NEW = ("fp8_e4m3", "fp8_e5m2", "mxint8", "mxfp8", "mxfp4", "int2r", "int4r", "mxfp4r", "fp8_e4m3r")
# relative error of one step's average against the exact one, without error feedback
STEP_TOL = {"fp8_e4m3": 0.06, "fp8_e5m2": 0.12, "mxint8": 0.03, "mxfp8": 0.08, "mxfp4": 0.35, "int2r": 0.6,
            "int4r": 0.3, "mxfp4r": 0.35, "fp8_e4m3r": 0.06}


def _hooked(fmt, error_feedback=True, **opts):
    model = DDP(_model(), bucket_cap_mb=0.05)
    state = gradcomp.register(model, format=fmt, error_feedback=error_feedback, warmup_steps=2, min_compress_numel=0,
                              log_every=1, **opts)
    return model, state


# ---------------------------------------------------------------------------------------------
# the DDP hook, flat


def _flat_worker(rank, world_size):
    for fmt in NEW:
        ref = DDP(_model(), bucket_cap_mb=0.05)
        model, state = _hooked(fmt, error_feedback=False)
        for step in range(4):
            _backward(ref, rank, step)
            _backward(model, rank, step)
            exact, got = _grads(ref), _grads(model)
            assert _all_identical(got), f"{fmt}: ranks differ at step {step}"
            rel = float((got - exact).norm() / exact.norm())
            assert rel < (1e-6 if step < 2 else STEP_TOL[fmt]), f"{fmt} step {step}: rel error {rel}"
        s = state.stats()
        plans = list(state.plans.values())
        for plan in plans:  # the message bytes of the format, the plan's, the statistics'
            assert plan.format is wire_format(fmt)
            assert plan.layout == ShardLayout(plan.layout.numel, world_size, fmt, 256)
            assert plan.bytes_sent == plan.layout.bytes_sent + 2 * (world_size - 1) * HEADER_BYTES * len(plan.chunks)
            assert plan.chunks[0].message_bytes == wire_format(fmt).message_bytes(plan.chunks[0].shard_blocks, 256)
        assert s["bytes_sent_step"] == sum(p.bytes_sent for p in plans)
        assert s["compressed_buckets_step"] == s["buckets_step"] == len(plans)
        # with error feedback and frozen weights: the sum of transmitted gradients tracks the true sum
        ref = DDP(_model(), bucket_cap_mb=0.05)
        model, state = _hooked(fmt)
        true_sum, sent_sum = 0, 0
        for step in range(20):
            _backward(ref, rank, step % 3)
            _backward(model, rank, step % 3)
            if step >= 2:
                true_sum = true_sum + _grads(ref)
                sent_sum = sent_sum + _grads(model)
            assert _all_identical(_grads(model))
        drift = float((sent_sum - true_sum).norm() / true_sum.norm())
        assert drift < STEP_TOL[fmt] / 3, f"{fmt}: error feedback drift {drift}"
        assert 0 < state.stats()["rel_error"] < 1
        state.close()


@pytest.mark.slow
def test_every_format_through_the_flat_hook(tmp_path):
    spawn(_flat_worker, 3, tmp_path, timeout=400)


# ---------------------------------------------------------------------------------------------
# the DDP hook, hierarchical


def _hierarchical_worker(rank, world_size):
    local = 2
    for fmt in ("int4r", "mxfp4"):
        ref = DDP(_model(), bucket_cap_mb=0.05)
        model, state = _hooked(fmt, error_feedback=False, topology=Topology(local_world_size=local))
        for step in range(3):
            _backward(ref, rank, step)
            _backward(model, rank, step)
            assert _all_identical(_grads(model)), f"{fmt}: ranks differ at step {step}"
        rel = float((_grads(model) - _grads(ref)).norm() / _grads(ref).norm())
        assert rel < STEP_TOL[fmt], f"{fmt}: rel error {rel}"
        lays = [HierarchicalLayout(p.layout.numel, world_size // local, local, fmt, 256) for p in state.plans.values()]
        assert state.stats()["bytes_sent_step"] == sum(h.inter_bytes_sent + h.intra_bytes_sent for h in lays)
        # error feedback: the rotated residuals of a node's chunk track the true sum
        ref = DDP(_model(), bucket_cap_mb=0.05)
        model, state = _hooked(fmt, topology=Topology(local_world_size=local))
        true_sum, sent_sum = 0, 0
        for step in range(14):
            _backward(ref, rank, step % 3)
            _backward(model, rank, step % 3)
            if step >= 2:
                true_sum, sent_sum = true_sum + _grads(ref), sent_sum + _grads(model)
        assert float((sent_sum - true_sum).norm() / true_sum.norm()) < STEP_TOL[fmt] / 3
        state.close()


@pytest.mark.slow
def test_rotated_and_mx_formats_in_hierarchical_mode(tmp_path):
    spawn(_hierarchical_worker, 4, tmp_path, timeout=300)


# ---------------------------------------------------------------------------------------------
# FSDP2: gradient reduce-scatter and weight all-gather


def _fsdp_worker(rank, world_size):
    from torch.distributed.fsdp import fully_shard

    from tests.comm.test_fsdp import _build, _full, _rel
    from tests.comm.test_fsdp import _train as _fsdp_train

    def train(net, opt, steps):
        _fsdp_train(net, opt, rank, steps)

    def run(grad, weight, steps=range(6)):
        net = _build()
        state = gradcomp.register_fsdp(net, grad_bits=grad, weight_bits=weight, warmup_steps=1, min_compress_numel=0) if grad else None
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        train(net, opt, steps)
        return net, opt, state

    assert fully_shard is not None
    ref = _full(run(None, None)[0])
    for grad, weight, tol in (("mxfp4", None, 5e-2), ("int4r", "fp8_e4m3", 5e-2), ("fp8_e4m3", "mxfp8", 1e-2), ("int2r", None, 0.2)):
        net, opt, state = run(grad, weight)
        got = _full(net)
        assert _rel(got, ref) < tol, f"{grad}/{weight}: {_rel(got, ref):.3g} from default FSDP2"
        assert _all_identical(got)
        s = state.stats()
        assert s["nonfinite_steps"] == 0
        assert s["grad_bytes_step"] == _expected_grad_bytes(net, world_size, grad), f"{grad}: bytes differ from the format's messages"
        if weight is not None:
            assert s["weight_bytes_step"] > 0
    # resume bit-exact in a rotated format with fp8 weights
    net, opt, state = run("int4r", "fp8_e4m3", range(3))
    ckpt = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict(), "comm": state.state_dict()})
    train(net, opt, range(3, 6))
    expected = _full(net)
    net2 = _build()
    state2 = gradcomp.register_fsdp(net2, grad_bits="int4r", weight_bits="fp8_e4m3", warmup_steps=1, min_compress_numel=0)
    net2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["opt"])
    state2.load_state_dict(ckpt["comm"])
    train(net2, opt2, range(3, 6))
    assert torch.equal(_full(net2), expected), "resumed int4r run diverged from the uninterrupted one"
    with pytest.raises(ValueError, match="grad_bits"):
        gradcomp.register_fsdp(_build(), grad_bits="int4", warmup_steps=1, min_compress_numel=0).load_state_dict(ckpt["comm"])


def _expected_grad_bytes(net, P, fmt, B=256):
    """Per module, (P - 1) messages of the aligned row in the format's own layout (e8m0 bytes, padding, header)."""
    from gradcomp.comm.fsdp import _param_segments

    total = 0
    for m in (net.a, net.b, net.c, net):
        aligned = sum(-(-s // B) * B for s in _param_segments(m)[0])
        total += (P - 1) * wire_format(fmt).message_bytes(aligned // B, B)
    return total


@pytest.mark.slow
def test_fsdp2_reduce_scatter_and_weight_all_gather_in_the_new_formats(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    spawn(_fsdp_worker, 2, tmp_path, timeout=400)


def test_fsdp_config_takes_the_new_formats_and_refuses_4_bit_weights():
    from gradcomp.comm.fsdp import WEIGHT_FORMATS, FSDPCompressConfig

    assert FSDPCompressConfig(grad_bits="mxfp4", weight_bits="fp8_e4m3").grad_format is wire_format("mxfp4")
    assert set(WEIGHT_FORMATS) == {n for n in gradcomp.codec.FORMATS if wire_format(n).bits == 8}
    with pytest.raises(ValueError, match="weight_bits must be one of"):
        FSDPCompressConfig(weight_bits="mxfp4")
    with pytest.raises(ValueError, match=r"block_size \(grad_bits=mxfp4\) must be a multiple of 32"):
        FSDPCompressConfig(grad_bits="mxfp4", block_size=48)


# ---------------------------------------------------------------------------------------------
# the error budget


def _fit():
    codec = CodecThroughput(2e9, 2e9, "given")
    # 1 Gbit/s: a quantized width is faster than plain all-reduce, and fewer bytes are faster
    return NetworkFit(LinkFit(5e-5, 1.25e8), codec=((8, codec), ("int4r", codec), ("int2r", codec)))


def test_decide_keeps_what_meets_the_budget_and_falls_back_to_the_most_accurate():
    cands = (PLAIN, 8, "int4r", "int2r")
    assert decide(cands, (0.01, 0.15, 0.4), 0.2) == ((PLAIN, 8, "int4r"), True)
    assert decide((8, "int4r"), (0.3, 0.5), 0.2) == ((8,), False)
    with pytest.raises(ValueError, match="one error per quantized candidate"):
        decide(cands, (0.1,), 0.2)
    policy = CommPolicy(PolicyConfig(candidates=cands, min_bits=2, fit=_fit(), error_budget=0.2), _fit(), workers=2)
    assert policy.choose(4_000_000) == "int2r"  # the network alone: the fewest bytes
    assert policy.choose(4_000_000, (PLAIN, 8, "int4r")) == "int4r"  # within the budget: int4r
    with pytest.raises(ValueError, match="keeps none of the policy's candidates"):
        policy.choose(4_000_000, ("mxfp4",))
    v = BudgetVerdict(12, (0, 1), (("int8", 0.01), ("int4r", 0.15)), (PLAIN, 8, "int4r"), "int4r")
    assert BudgetVerdict.from_dict(v.to_dict()) == v
    with pytest.raises(ValueError, match="its choice among allowed"):
        BudgetVerdict.from_dict({**v.to_dict(), "choice": "int2r"})
    with pytest.raises(ValueError, match=r"error_budget must be a relative error in \(0, 10\)"):
        PolicyConfig(error_budget=0)
    with pytest.raises(ValueError, match="measure_every must be an int >= 0"):
        PolicyConfig(error_budget=0.1, measure_every=-1)


def _budget_worker(rank, world_size):
    logging.getLogger("gradcomp").setLevel(logging.INFO)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("gradcomp").addHandler(Keep())
    cfg = PolicyConfig(candidates=(PLAIN, 8, "int4r", "int2r"), min_bits=2, fit=_fit(), error_budget=0.5, measure_every=3)

    def make():
        model = DDP(_model(), bucket_cap_mb=0.05)
        return model, gradcomp.register(model, warmup_steps=2, min_compress_numel=0, log_every=0, policy=cfg)

    model, state = make()
    for step in range(6):
        _backward(model, rank, step)
        assert _all_identical(_grads(model))
    verdicts = state.budget
    assert verdicts and all(v["step"] in (2, 5) for v in verdicts.values())
    gathered = [None] * world_size
    dist.all_gather_object(gathered, verdicts)
    assert all(g == verdicts for g in gathered), "ranks disagree on the error budget's verdicts"
    for index, v in verdicts.items():
        errors = dict(v["errors"])
        assert set(errors) == {"int8", "int4r", "int2r"} and errors["int8"] < errors["int4r"] < errors["int2r"]
        assert all(errors[wire_format(c).name] <= 0.5 for c in v["allowed"] if c != PLAIN)
        assert state.plans[index].format is wire_format(v["choice"])
    if rank == 0:
        assert any("error budget" in m and "budget 0.5" in m for m in records), records
    # a checkpoint carries the verdicts and the residuals' space
    sd = state.state_dict()
    assert sd["budget"] == {i: v for i, v in verdicts.items()} and set(sd["residuals_rotated"]) == set(sd["worker_residuals"])
    state.close()
    # resume bit-exact with every default option and the budget, re-measured across the split
    check_default_resume(rank, {}, split=12, end=16, make_state=lambda ddp: gradcomp.register(ddp, policy=cfg))


@pytest.mark.slow
def test_error_budget_picks_per_bucket_the_same_on_every_rank_and_resumes(tmp_path):
    spawn(_budget_worker, 2, tmp_path, timeout=400)


def test_a_bucket_moving_between_a_plain_and_a_rotating_format_keeps_its_residual():
    """The residual store rotates a bucket's residuals over when the policy moves it to a rotating format, and back."""
    from gradcomp.codec import kernels
    from gradcomp.comm.plan import ExchangePlan
    from gradcomp.comm.residuals import ResidualStore

    store = ResidualStore()
    plain = ExchangePlan.build((300, 700), 2, "int4", 256, None, keys=(0, 1))
    rotating = ExchangePlan.build((300, 700), 2, "int4r", 256, None, keys=(0, 1))
    slices = (0, plain.padded_numel, lambda a: plain.server_of(a, 0))
    w_in, s_in, w_out, s_out = store.take(plain, 0, "cpu", slices, lambda: None)
    w_out.copy_(torch.randn_like(w_out))
    s_out.copy_(torch.randn_like(s_out))
    store.commit(True)
    committed = store.worker(0).clone()
    w_in, s_in, w_out, s_out = store.take(rotating, 0, "cpu", slices, lambda: None)
    assert torch.allclose(w_in, kernels.rotate_blocks(committed.view(-1, 256)).view(-1), atol=1e-6)
    assert torch.allclose(w_in.norm(), committed.norm(), rtol=1e-5)
    w_out.copy_(w_in)  # a step that leaves the residual as it was
    s_out.copy_(s_in)
    store.commit(True)
    assert store.export()["rotated"] == {0: True}
    back, _, _, _ = store.take(plain, 0, "cpu", slices, lambda: None)
    assert torch.allclose(back, committed, atol=1e-5)
