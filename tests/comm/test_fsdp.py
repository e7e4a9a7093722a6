"""FSDP2 quantized reduce-scatter and all-gather: the comms against a reference, and FSDP training on gloo."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from gradcomp import codec
from gradcomp.codec.formats import HEADER_BYTES
from gradcomp.comm.fsdp import FSDPCompressConfig, FSDPCompressState
from gradcomp.comm.fsdp_collectives import QuantizedAllGather, QuantizedReduceScatter
from gradcomp.comm.fsdp_plan import ModuleComm, RowPlan
from tests._dist import spawn

_fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(getattr(_fsdp, "FSDPModule", None), "set_custom_reduce_scatter"):
    pytest.skip("this torch has no FSDP2 custom collectives (FSDPModule.set_custom_reduce_scatter)", allow_module_level=True)

# relative distance of the parameters after STEPS steps from default FSDP2 (error feedback on)
PARITY_TOL = {8: 2e-3, 4: 2e-2}
STEPS = 6


# ---------------------------------------------------------------- one process


def test_config_rejects_bad_input():
    with pytest.raises(ValueError, match="grad_bits must be one of"):
        FSDPCompressConfig(grad_bits=3)
    with pytest.raises(ValueError, match="grad_bits must be one of"):
        FSDPCompressConfig(grad_bits="int5")
    with pytest.raises(ValueError, match="weight_bits must be one of"):
        FSDPCompressConfig(weight_bits=4)
    with pytest.raises(ValueError, match="weight_bits must be one of"):
        FSDPCompressConfig(weight_bits="int4")
    with pytest.raises(ValueError, match="block_size"):
        FSDPCompressConfig(block_size=100)
    with pytest.raises(TypeError, match="error_feedback must be a bool"):
        FSDPCompressConfig(error_feedback=1)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        FSDPCompressConfig(warmup_steps=-1)


def test_config_takes_format_names_as_well_as_bits():
    from gradcomp.codec.formats import wire_format

    named = FSDPCompressConfig(grad_bits="int4", weight_bits="int8")
    assert named == FSDPCompressConfig(grad_bits=4, weight_bits=8)  # the short spelling: checkpoints read the same
    assert named.grad_format is wire_format("int4") and named.weight_format is wire_format("int8")
    assert FSDPCompressConfig(grad_bits=None).grad_format is None


def test_compress_rejects_a_plain_model():
    import gradcomp

    with pytest.raises(TypeError, match="no FSDP module"):
        gradcomp.register_fsdp(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="unknown option"):
        gradcomp.register_fsdp(nn.Linear(4, 4), bits=8)


def test_row_plan_aligns_every_parameter_to_a_block():
    plan = RowPlan.build(320, (300, 20), 256)
    assert plan.aligned == 768
    x = torch.arange(2 * 320, dtype=torch.float32).view(2, 320)
    y = plan.align(x)
    assert torch.equal(y[:, :300], x[:, :300]) and torch.equal(y[:, 512:532], x[:, 300:])
    assert not y[:, 300:512].any() and not y[:, 532:].any()
    assert torch.equal(plan.unalign(y), x)
    assert RowPlan.build(512, (512,), 256).index is None  # nothing to move: no copy
    assert RowPlan.build(10, (3, 4), 256).aligned == 256  # segments that do not add up: one segment


# ---------------------------------------------------------------- the comms against a reference


def _encode_ref(x, residual, bits, B):
    """Codes, scales and new residual of aligned rows ``x`` with the codec's own kernel."""
    res_out = torch.empty(x.shape, dtype=torch.float32)
    codes, scale = codec.encode_blocks(x, bits, residual=residual, residual_out=None if residual is None else res_out)
    return codes, scale, res_out


def _reference_rs(inputs, residuals, plan, bits, B, op):
    """Rank k's output from every rank's input: quantize (with residual), decode row k, sum in rank order, apply op."""
    P = len(inputs)
    deq = []
    for x, r in zip(inputs, residuals):
        xa = plan.align(x).reshape(-1, B)
        codes, scale, _ = _encode_ref(xa, r.view_as(xa), bits, B)
        deq.append(codec.decode_blocks(codes, scale, bits).view(P, -1))
    total = deq[0]
    for d in deq[1:]:
        total = total + d
    kind, f = op
    total = total / f if kind == "div" else (total * f if f != 1.0 else total)
    return plan.unalign(total)


def _comms(rank, world_size):
    B, P = 256, world_size
    segments = (300, 20, 700)  # one rank's row: three parameters' shards
    row = sum(segments)
    group = dist.group.WORLD
    ops = [
        (dist.ReduceOp.AVG, ("div", P)),
        (dist.ReduceOp.SUM, ("mul", 1.0)),
        (dist.ReduceOp.PREMUL_SUM(0.3), ("mul", 0.3)),
    ]
    for bits in (8, 4):
        for dtype in (torch.float32, torch.bfloat16):
            for op, factor in ops:
                state = FSDPCompressState(FSDPCompressConfig(grad_bits=bits, warmup_steps=0, min_compress_numel=0))
                mod = ModuleComm("m", 0, segments)
                rs = QuantizedReduceScatter(state.config, mod, state.ledger)
                plan = RowPlan.build(row, segments, B)
                residuals = [torch.zeros(P * plan.aligned) for _ in range(P)]
                for step in range(2):  # the second step uses the residual of the first
                    inputs = [torch.randn(P, row, generator=torch.Generator().manual_seed(100 * step + r)).to(dtype) for r in range(P)]
                    out = rs.allocate((row,), dtype=dtype, device=torch.device("cpu"))
                    rs(out, inputs[rank].reshape(-1).clone(), group, op)
                    ref = _reference_rs(inputs, residuals, plan, bits, B, factor)[rank].to(dtype)
                    assert torch.equal(out, ref), f"bits={bits} dtype={dtype} op={op}: output differs from the reference"
                    for r in range(P):  # the residuals the reference leaves
                        xa = plan.align(inputs[r]).reshape(-1, B)
                        residuals[r] = _encode_ref(xa, residuals[r].view_as(xa), bits, B)[2].reshape(-1)
                    assert torch.equal(mod.residual, residuals[rank])
                    # bytes: (P - 1) messages of aligned codes + fp32 scales + header
                    assert mod.last_grad == ((P - 1) * (plan.aligned * bits // 8 + 4 * plan.aligned // B + HEADER_BYTES), (P - 1) * row * 4)

    # a non-finite value on one rank: every rank's shard is non-finite, every residual stays
    state = FSDPCompressState(FSDPCompressConfig(grad_bits=8, warmup_steps=0, min_compress_numel=0))
    mod = ModuleComm("m", 0, segments)
    rs = QuantizedReduceScatter(state.config, mod, state.ledger)
    x = torch.randn(P, row, generator=torch.Generator().manual_seed(rank))
    out = torch.empty(row)
    rs(out, x.reshape(-1).clone(), group, dist.ReduceOp.AVG)
    kept = mod.residual.clone()
    x2 = torch.randn(P, row, generator=torch.Generator().manual_seed(7 + rank))
    if rank == 1:
        x2[P - 1, 5] = float("inf")  # a block that goes to the last rank only
    rs(out, x2.reshape(-1).clone(), group, dist.ReduceOp.AVG)
    assert not torch.isfinite(out).all(), f"rank {rank}: a non-finite gradient on rank 1 did not reach this rank"
    assert torch.equal(mod.residual, kept), "a non-finite step changed the residual"
    assert state.stats()["nonfinite_steps"] == 1

    # the all-gather: int8 codes of each rank's shard, every rank dequantizes every shard (its own too)
    state = FSDPCompressState(FSDPCompressConfig(grad_bits=None, weight_bits=8, warmup_steps=0, min_compress_numel=0))
    mod = ModuleComm("m", 0, segments)
    ag = QuantizedAllGather(state.config, mod, state.ledger)
    plan = RowPlan.build(row, segments, B)
    for dtype in (torch.float32, torch.bfloat16):
        shards = [torch.randn(row, generator=torch.Generator().manual_seed(50 + r)).to(dtype) for r in range(P)]
        out = ag.allocate((P * row,), dtype=dtype, device=torch.device("cpu"))
        mine = out[rank * row : (rank + 1) * row]
        mine.copy_(shards[rank])
        ag(out, mine, group)
        for r in range(P):
            xa = plan.align(shards[r].view(1, -1)).reshape(-1, B)
            codes, scale, _ = _encode_ref(xa, None, 8, B)
            ref = plan.unalign(codec.decode_blocks(codes, scale, 8).view(1, -1)).view(-1).to(dtype)
            assert torch.equal(out[r * row : (r + 1) * row], ref), f"all-gather slot {r} differs from the reference"
            err = (out[r * row : (r + 1) * row].float() - shards[r].float()).abs().max()
            assert err <= shards[r].float().abs().max() / 127 / 2 * 1.01 + 1e-2 * (dtype == torch.bfloat16)
    assert mod.pending_weight[0] == 2 * (P - 1) * (plan.aligned + 4 * plan.aligned // B + HEADER_BYTES)

    # 1-D parameters (exact_1d_weights, the default) arrive unquantized, the others as before
    mod = ModuleComm("m", 0, segments, (False, True, False))
    ag = QuantizedAllGather(state.config, mod, state.ledger)
    shards = [torch.randn(row, generator=torch.Generator().manual_seed(60 + r)) for r in range(P)]
    out = ag.allocate((P * row,), dtype=torch.float32, device=torch.device("cpu"))
    out[rank * row : (rank + 1) * row].copy_(shards[rank])
    ag(out, out[rank * row : (rank + 1) * row], group)
    exact = slice(300, 320)
    for r in range(P):
        slot = out[r * row : (r + 1) * row]
        assert torch.equal(slot[exact], shards[r][exact]), "a 1-D parameter was quantized"
        assert not torch.equal(slot[:300], shards[r][:300]) and (slot - shards[r]).abs().max() < 0.05
    assert mod.pending_weight[0] == (P - 1) * (plan.aligned + 4 * plan.aligned // B + HEADER_BYTES + 20 * 4)


@pytest.mark.slow
def test_comms_match_the_reference_need_warmup_0_min_compress_numel_0_for_1020_value_rows(tmp_path):
    """The collectives called by hand, on rows of 1,020 values from their first call: with the defaults
    (10 warm-up steps, modules under 16,384 values plain) they would be FSDP2's own. The default options
    are tested in FSDP training (test_bytes_resume_nonfinite_error_feedback_with_default_options)."""
    spawn(_comms, 2, tmp_path, timeout=180)


# ---------------------------------------------------------------- FSDP2 training


class _Net(nn.Module):
    """Three FSDP modules of different sizes (one with a LayerNorm) and a root holding the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Linear(33, 257), nn.Tanh())
        self.b = nn.Sequential(nn.Linear(257, 131), nn.LayerNorm(131), nn.Tanh())
        self.c = nn.Sequential(nn.Linear(131, 64), nn.Tanh())
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        return self.head(self.c(self.b(self.a(x))))


def _build(mp=None, divide=None, force_sum=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    net = _Net()
    kw = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    for m in (net.a, net.b, net.c):
        fully_shard(m, **kw)
    fully_shard(net, **kw)
    for m in (net.a, net.b, net.c, net):
        if divide is not None:
            m.set_gradient_divide_factor(divide)
        if force_sum:
            m.set_force_sum_reduction_for_comms(True)
    return net


def _train(net, opt, rank, steps):
    for step in steps:
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 33, generator=g), torch.randint(0, 5, (8,), generator=g)
        nn.functional.cross_entropy(net(x).float(), y).backward()
        opt.step()
        opt.zero_grad()


def _full(net):
    return torch.cat([p.full_tensor().detach().reshape(-1).float() for p in net.parameters()])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _expected_grad_bytes(net, P, bits, B):
    """The formula: per module (P - 1) * (aligned row * bits / 8 + 4 * blocks)."""
    from gradcomp.comm.fsdp import _param_segments

    total = 0
    for m in (net.a, net.b, net.c, net):
        segs = _param_segments(m)[0]
        aligned = sum(-(-s // B) * B for s in segs)
        total += (P - 1) * (aligned * bits // 8 + 4 * aligned // B + HEADER_BYTES)
    return total


def _fsdp(rank, world_size):
    import gradcomp
    from torch.distributed.fsdp import MixedPrecisionPolicy

    P, opts = world_size, {"warmup_steps": 1, "min_compress_numel": 0}

    def run(bits=None, wbits=None, mp=None, divide=None, force_sum=False, lr=0.1, **o):
        net = _build(mp, divide, force_sum)
        state = gradcomp.register_fsdp(net, grad_bits=bits, weight_bits=wbits, **{**opts, **o}) if (bits or wbits) else None
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        _train(net, opt, rank, range(STEPS))
        return _full(net), state, net

    ref, _, _ = run()
    # parity with default FSDP2, bytes equal to the formula
    for bits in (8, 4):
        got, state, net = run(bits)
        assert _rel(got, ref) < PARITY_TOL[bits], f"int{bits}: {_rel(got, ref):.3g} from default FSDP2"
        s = state.stats()
        assert s["step"] == STEPS and s["nonfinite_steps"] == 0
        assert s["grad_bytes_step"] == _expected_grad_bytes(net, P, bits, 256)
        assert s["grad_ratio"] <= {8: 0.27, 4: 0.14}[bits] * 1.15  # this toy model pads small parameters
    # int8 weights too: the forward runs on dequantized weights
    got, state, _ = run(8, 8)
    assert _rel(got, ref) < 1e-2, f"int8 grads + weights: {_rel(got, ref):.3g} from default FSDP2"
    s = state.stats()
    assert s["weight_bytes_step"] > 0 and s["weight_ratio"] < 0.3, s
    # every reduce op FSDP passes: PREMUL_SUM (a divide factor), SUM (forced sum, post-divided)
    # (gloo has no PREMUL_SUM: the base of a divide factor f is default FSDP2 with the lr times P / f)
    for kw, base_kw in (({"divide": 3.0}, {"lr": 0.1 * P / 3.0}), ({"force_sum": True}, {"force_sum": True})):
        base, _, _ = run(**base_kw)
        got, _, _ = run(8, **kw)
        assert _rel(got, base) < PARITY_TOL[8], f"{kw}: {_rel(got, base):.3g} from default FSDP2"
    # mixed precision: bf16 parameters, fp32 or bf16 reduction
    for mp in (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
               MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)):
        base, _, _ = run(mp=mp)
        got, _, _ = run(8, 8, mp=mp)
        assert _rel(got, base) < 2e-2, f"{mp}: {_rel(got, base):.3g} from default FSDP2"
    # below min_compress_numel or in warm-up: exactly FSDP2
    got, state, _ = run(8, 8, min_compress_numel=10**9)
    assert torch.equal(got, ref) and state.stats()["grad_ratio"] == 1.0
    # resume bit-exact: checkpoint at step 3 into a fresh model, optimizer and state
    net = _build()
    state = gradcomp.register_fsdp(net, grad_bits=4, weight_bits=8, **opts)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    _train(net, opt, rank, range(3))
    ckpt = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict(), "comm": state.state_dict()})
    _train(net, opt, rank, range(3, STEPS))
    expected = _full(net)
    net2 = _build()
    state2 = gradcomp.register_fsdp(net2, grad_bits=4, weight_bits=8, **opts)
    net2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["opt"])
    state2.load_state_dict(ckpt["comm"])
    _train(net2, opt2, rank, range(3, STEPS))
    assert torch.equal(_full(net2), expected), "resumed run diverged from the uninterrupted one"
    with pytest.raises(ValueError, match="grad_bits"):
        gradcomp.register_fsdp(_build(), grad_bits=8, **opts).load_state_dict(ckpt["comm"])


@pytest.mark.slow
def test_fsdp_training_parity_ops_mixed_precision_resume(tmp_path):
    spawn(_fsdp, 2, tmp_path, timeout=300)


def _fsdp_defaults_vs_eager(rank, world_size):
    # every option at its default (fused kernels, warm-up, min_compress_numel) against the eager reference
    # kernels, with AdamW: nothing compiles beside the training, the runs are bit-identical
    import gradcomp
    from torch.distributed.fsdp import MixedPrecisionPolicy

    results, kernels = [], []
    for fused in (True, False):
        net = _build(MixedPrecisionPolicy(reduce_dtype=torch.bfloat16))
        state = gradcomp.register_fsdp(net, grad_bits=8, weight_bits=8, **({} if fused else {"fused": False}))
        kernels.append(state.kernels)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        _train(net, opt, rank, range(14))
        assert state.stats()["grad_bytes_total"] < state.stats()["grad_default_bytes_total"], "nothing was compressed"
        results.append(_full(net))
    assert kernels[0].startswith("native") and kernels[1] == "eager", kernels
    assert torch.equal(results[0], results[1]), "the fused and eager kernels gave different bits"


@pytest.mark.slow
def test_default_fused_kernels_are_bit_identical_to_eager(tmp_path):
    spawn(_fsdp_defaults_vs_eager, 2, tmp_path, timeout=300)


def _shard_row(module: nn.Module, P: int) -> list:
    """The sizes of one rank's shards of a module's own parameters: FSDP2 cuts dim 0 into P equal, padded parts."""
    return [-(-p.shape[0] // P) * (p.numel() // p.shape[0]) for p in module.parameters(recurse=False)] + [
        seg for child in module.children() if not hasattr(child, "reshard") for seg in _shard_row(child, P)]


def _fsdp_with_defaults(rank, world_size):
    # every option at its default (grad_bits=8, 10 warm-up steps, min_compress_numel=16384), with AdamW:
    # only module b (34,060 values) is compressed, after the warm-up; a, c and the root stay FSDP2's own
    import gradcomp
    from gradcomp.comm.fsdp import FSDPCompressConfig

    P, cfg = world_size, FSDPCompressConfig()
    steps, split = cfg.warmup_steps + 4, cfg.warmup_steps + 2

    def run(compress, begin=0, end=steps, ckpt_at=None, start=None):
        net = _build()
        state = gradcomp.register_fsdp(net) if compress else None
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        if start is not None:
            net.load_state_dict(start["model"])
            opt.load_state_dict(start["opt"])
            state.load_state_dict(start["comm"])
        ckpt = None
        for step in range(begin, end):
            if step == ckpt_at:
                ckpt = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict(), "comm": state.state_dict()})
            _train(net, opt, rank, [step])
            if compress:  # bytes: FSDP2's own below the threshold and in the warm-up, the formula above it
                sent = fp32 = 0
                for m in (net.a, net.b, net.c, net):
                    row = _shard_row(m, P)
                    fp32 += (P - 1) * sum(row) * 4
                    if step >= cfg.warmup_steps and P * sum(row) >= cfg.min_compress_numel:
                        aligned = sum(-(-n // 256) * 256 for n in row)
                        sent += (P - 1) * (aligned * cfg.grad_bits // 8 + 4 * aligned // 256 + HEADER_BYTES)
                    else:
                        sent += (P - 1) * sum(row) * 4
                s = state.stats()
                assert (s["grad_bytes_step"], s["grad_fp32_bytes_step"]) == (sent, fp32), (step, s)
        return net, state, ckpt

    ref, _, _ = run(False)
    net, state, ckpt = run(True, ckpt_at=split)
    got = _full(net)
    assert _rel(got, _full(ref)) < PARITY_TOL[8], f"{_rel(got, _full(ref)):.3g} from default FSDP2"
    assert 0 < state.stats()["grad_ratio"] < 1 and sorted(state.state_dict()["residuals"]) == ["b"], state.state_dict()["residuals"].keys()
    from _models import _all_identical

    assert _all_identical(got)

    # resume after the warm-up into a fresh model, optimizer and state: bit for bit, same bytes
    net2, state2, _ = run(True, begin=split, start=ckpt)
    assert torch.equal(_full(net2), got), f"resume diverged: max |diff| {float((_full(net2) - got).abs().max()):.3g}"
    for key in ("grad_bytes_step", "grad_bytes_total", "grad_fp32_bytes_total", "grad_default_bytes_total", "step"):
        assert state2.stats()[key] == state.stats()[key], (key, state2.stats()[key], state.stats()[key])
    kept = {k: v for k, v in state2.stats().items() if v == v}  # ratios without a denominator are NaN
    with pytest.raises(ValueError, match="checkpoint stats must map"):
        state2.load_state_dict(dict(ckpt["comm"], stats=dict(ckpt["comm"]["stats"], grad_sent=-1)))
    assert {k: v for k, v in state2.stats().items() if v == v} == kept, "a refused load changed the statistics"

    # a non-finite gradient on one rank reaches every rank and leaves the residual as it was
    keep = state.state_dict()["residuals"]["b"]
    g = torch.Generator().manual_seed(rank)
    loss = nn.functional.cross_entropy(net(torch.randn(8, 33, generator=g)), torch.randint(0, 5, (8,), generator=g))
    if rank == P - 1:
        loss = loss * float("inf")  # only one rank overflows
    loss.backward()
    assert not torch.isfinite(net.b[0].weight.grad.to_local()).all(), f"rank {rank}: the inf did not reach this rank"
    def same(a, b):  # residuals per parameter of module b
        return a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)

    assert state.stats()["nonfinite_steps"] == 1 and same(state.state_dict()["residuals"]["b"], keep)
    net.zero_grad()  # the step a GradScaler skips
    _train(net, torch.optim.SGD(net.parameters(), lr=0.0), rank, [steps + 1])
    assert not same(state.state_dict()["residuals"]["b"], keep) and state.stats()["nonfinite_steps"] == 1

    # error feedback at fixed weights and the same batch every step: the sum of what was sent tracks
    # the sum of the true gradients (cumulative error about one step's error; without it, 6 steps' worth)
    sums, errs = [], []
    for compress in (False, True):
        net = _build()
        if compress:
            gradcomp.register_fsdp(net)
        total, per_step = 0, []
        for step in range(cfg.warmup_steps + 6):
            g = torch.Generator().manual_seed(rank)
            nn.functional.cross_entropy(net(torch.randn(8, 33, generator=g)), torch.randint(0, 5, (8,), generator=g)).backward()
            grad = torch.cat([p.grad.full_tensor().reshape(-1) for p in net.b.parameters()])
            net.zero_grad()
            if step >= cfg.warmup_steps:
                total = total + grad
                per_step.append(grad)
        sums.append(total)
        errs.append(per_step)
    step_err = sum(float((a - b).norm()) for a, b in zip(errs[1], errs[0])) / len(errs[0])
    cumulative = float((sums[1] - sums[0]).norm())
    assert step_err > 0 and cumulative < 2 * step_err, f"cumulative error {cumulative:.3g}, one step's {step_err:.3g}"


@pytest.mark.slow
def test_bytes_resume_nonfinite_error_feedback_with_default_options(tmp_path):
    spawn(_fsdp_with_defaults, 2, tmp_path, timeout=300)


# ---------------------------------------------------------------- HSDP: quantized all-reduce across replicas


def _disagree(rank, world_size):
    import gradcomp

    net = _build()
    with pytest.raises(ValueError, match=r"grad_bits \(rank 0: 8; rank 1: 4\)"):
        gradcomp.register_fsdp(net, grad_bits=8 if rank == 0 else 4)
    with pytest.raises(ValueError, match=r"fsdp_modules"):  # a different model on one rank
        gradcomp.register_fsdp(net if rank == 0 else net.a, grad_bits=8)
    state = gradcomp.register_fsdp(net, grad_bits=8)  # agreeing ranks: installed
    assert sorted(state.modules) == ["", "a", "b", "c"]


@pytest.mark.slow
def test_ranks_with_different_options_raise_on_every_rank(tmp_path):
    spawn(_disagree, 2, tmp_path, timeout=120)


def _hsdp(rank, world_size):
    import gradcomp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))

    def run(custom, bits=8, options=None, steps=4):
        net = _Net()
        m = mesh["shard"] if custom else mesh
        for sub in (net.a, net.b, net.c):
            fully_shard(sub, mesh=m)
        fully_shard(net, mesh=m)
        state = None
        if custom:
            state = gradcomp.register_fsdp(net, grad_bits=bits, replicate_group=mesh.get_group("replicate"), **(opts if options is None else options))
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        _train(net, opt, rank, range(steps))
        return _full(net), state, net, opt

    opts = {"warmup_steps": 1, "min_compress_numel": 0}
    ref, _, _, _ = run(False)  # native HSDP, fp32
    got, state, net, opt = run(True)
    assert _rel(got, ref) < PARITY_TOL[8], f"HSDP int8: {_rel(got, ref):.3g} from native HSDP"
    from _models import _all_identical

    assert _all_identical(got), "replicas (and shards) disagree on the parameters"
    s = state.stats()
    assert 0 < s["replicate_ratio"] < 0.3 and s["grad_ratio"] < 0.3, s
    sd = state.state_dict()
    assert set(sd["replicate_residuals"]) == set(state.replicas)
    # every option at its default: after the 10 warm-up steps module b (17,030 values per shard) is
    # compressed in both exchanges, the others stay plain
    ref, _, _, _ = run(False, steps=12)
    got, state, _, _ = run(True, options={}, steps=12)
    assert _rel(got, ref) < PARITY_TOL[8] and _all_identical(got), f"HSDP defaults: {_rel(got, ref):.3g} from native HSDP"
    s = state.stats()
    assert 0.3 < s["replicate_ratio"] < 1 and 0.3 < s["grad_ratio"] < 1, s
    assert sorted(state.state_dict()["replicate_residuals"]) == ["b"]
    with pytest.raises(ValueError, match="native HSDP"):
        native = _Net()
        fully_shard(native, mesh=mesh)
        gradcomp.register_fsdp(native, replicate_group=mesh.get_group("replicate"))


@pytest.mark.slow
def test_hsdp_replicate_allreduce_quantized(tmp_path):
    spawn(_hsdp, 4, tmp_path, timeout=300)


# ---------------------------------------------------------------- NCCL


def _nccl(rank, world_size):
    torch.cuda.set_device(rank)
    import gradcomp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda", (world_size,))
    nets = []
    for q in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512)).cuda()
        fully_shard(net[0], mesh=mesh)
        fully_shard(net, mesh=mesh)
        if q:
            gradcomp.register_fsdp(net, grad_bits=8, weight_bits=8, warmup_steps=1, min_compress_numel=0)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(4):
            g = torch.Generator(device="cuda").manual_seed(step * 10 + rank)
            net(torch.randn(16, 512, device="cuda", generator=g)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        nets.append(torch.cat([p.full_tensor().reshape(-1) for p in net.parameters()]))
    assert _rel(nets[1], nets[0]) < 1e-2


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs and NCCL")
def test_fsdp_nccl(tmp_path):
    spawn(_nccl, 2, tmp_path, timeout=300, backend="nccl")


# ---------------------------------------------------------------- launch/train.py --fsdp


def _train_py(args, out, extra_env=None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHON=sys.executable, NPROC="2", **(extra_env or {}))
    cmd = ["bash", str(root / "launch" / "run.sh"), "--fsdp", *args, "--out-dir", str(out), "--netdev", "none",
           "--batch-size", "4", "--corpus-bytes", str(1 << 18), "--eval-batches", "1", "--log-every", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_train_py_fsdp_arguments(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gradcomp_launch_train_fsdp", Path(__file__).resolve().parents[2] / "launch" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert train.main(["--fsdp", "--hook", "int8", "--out-dir", str(tmp_path / "run")]) == 2
    assert "--fsdp replaces DDP" in capsys.readouterr().err
    assert train.main(["--grad-bits", "8", "--out-dir", str(tmp_path / "run")]) == 2
    assert "need --fsdp" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_py_fsdp_resumes_exactly_with_default_compression_options(tmp_path):
    # every compression option at train.py's default (warm-up 10, min_compress_numel 16384, block 256,
    # error feedback, fused kernels, 1-D weights exact). Not default, and why:
    # --grad-bits 4 --weight-bits 8: --fsdp runs FSDP2's own fp32 collectives by default; these turn
    #   gradcomp's on (the thing resumed);
    # --steps 16 --ckpt-every 12: short, with the checkpoint after the default warm-up of 10 and four
    #   compressed steps after it; _train_py's --batch-size, --corpus-bytes, --eval-batches keep it short too
    import json
    import shutil

    args = ["--grad-bits", "4", "--weight-bits", "8", "--steps", "16", "--ckpt-every", "12"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train_py(args, full)
    shutil.copytree(full, resumed)
    (resumed / "checkpoints" / "latest").write_text("step_00000012\n")
    _train_py([*args, "--resume"], resumed)
    a = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, 17))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical after the resume
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["hook"] == "fsdp_g4_w8" and summary["resumed_from"] == "step_00000012"
    # every module compressed after the warm-up, with the default min_compress_numel
    assert summary["hook_stats"]["grad_ratio"] < 0.16 and summary["hook_stats"]["weight_ratio"] < 0.3
    full_stats = json.loads((full / "summary.json").read_text())["hook_stats"]
    for key in ("grad_bytes_step", "weight_bytes_step"):  # the same bytes in the last step
        assert summary["hook_stats"][key] == full_stats[key], key
