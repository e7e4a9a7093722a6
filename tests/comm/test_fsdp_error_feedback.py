"""FSDP2 error feedback follows its parameter: conditional branches, alternating experts, frozen parameters.

FSDP2 reduce-scatters only the parameters of a module that got a gradient in the step: a branch taken
on some steps, the expert a step routed to, a parameter frozen for a while. Each parameter must keep
its own residual across the steps in which it has no gradient, and never get another's.

The measure: with lr 0 and the same batch every step, a parameter's true gradient is the same every
step it has one. Over the compressed steps in which it has a gradient, ``ratio = ||sum_t e_t|| /
mean_t ||e_t||`` with ``e_t`` the delivered minus the exact gradient. With working error feedback the
sum telescopes to minus the last residual and the ratio stays about 1; when the residual is lost (or
given to another parameter) the same error repeats and the ratio grows with the number of steps.

Every test runs with the options a user gets by default (``warm-up 10``, ``min_compress_numel
16384``, fused kernels), on a model large enough that each module compresses even when only part of
it has a gradient.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Sequence, Set, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from gradcomp import codec
from gradcomp.codec.formats import HEADER_BYTES
from gradcomp.comm.fsdp import FSDPCompressConfig, FSDPCompressState
from gradcomp.comm.fsdp_collectives import QuantizedReduceScatter
from gradcomp.comm.fsdp_plan import ModuleComm, RowPlan
from gradcomp.comm.plan import ExchangePlan
from tests._dist import spawn

_fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(getattr(_fsdp, "FSDPModule", None), "set_custom_reduce_scatter"):
    pytest.skip("this torch has no FSDP2 custom collectives (FSDPModule.set_custom_reduce_scatter)", allow_module_level=True)

STEPS = 40
WARMUP = 10  # FSDPCompressConfig's default warm-up: the first 10 reduce-scatters of a module are FSDP2's own
WIDTH = 128  # one Linear(128, 128) is 16,512 values: over the default min_compress_numel (16,384) on its own
RATIO_MAX = 2.0  # about 1 with working error feedback; lost residuals give 5 to 30 here


class _Block(nn.Module):
    """A trunk and two same-shaped layers ``a`` and ``b`` (a branch, or two experts): one FSDP module."""

    def __init__(self, w: int):
        super().__init__()
        self.trunk, self.a, self.b = nn.Linear(w, w), nn.Linear(w, w), nn.Linear(w, w)

    def forward(self, h: torch.Tensor, use: str) -> torch.Tensor:
        h = torch.tanh(self.trunk(h))
        for name in use:
            h = h + torch.tanh(getattr(self, name)(h))
        return h


class _Net(nn.Module):
    """The block, a side layer that is its own FSDP module (used on some steps only), and a small root."""

    def __init__(self, w: int = WIDTH):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(16, w)
        self.m = _Block(w)
        self.side = nn.Linear(w, w)
        self.head = nn.Linear(w, 4)

    def forward(self, x: torch.Tensor, use: str, side: bool) -> torch.Tensor:
        h = self.m(torch.tanh(self.inp(x)), use)
        if side:
            h = h + torch.tanh(self.side(h))
        return self.head(h)


def _build(unused_params: bool = False) -> _Net:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    net = _Net()
    fully_shard(net.m, mesh=mesh)
    fully_shard(net.side, mesh=mesh)
    fully_shard(net, mesh=mesh)
    if unused_params:  # FSDP2 hands over a zero-filled row for a parameter without a gradient
        net.set_reduce_scatter_unused_params(True)
    return net


# a schedule: step -> (layers of the block used, whether the side module runs, parameters frozen)
Schedule = Callable[[int], tuple]


def _schedule(case: str) -> Schedule:
    if case == "branch":  # a: a branch taken on even steps; b: used every step (the control)
        return lambda t: ("ab" if t % 2 == 0 else "b", t % 2 == 0, set())
    if case == "experts":  # a and b: two experts of the same shape, used in turn
        return lambda t: ("a" if t % 2 == 0 else "b", True, set())
    if case == "frozen":  # a: frozen for 3 steps, then trained for 3, and so on; b: always trained
        return lambda t: ("ab", True, {"m.a.weight", "m.a.bias"} if (t // 3) % 2 else set())
    raise ValueError(case)


def _measure(rank: int, case: str, unused_params: bool = False) -> Dict[str, float]:
    """Run ``STEPS`` steps of the compressed and the plain FSDP2 model; return each measured parameter's ratio."""
    import gradcomp

    net, ref = _build(unused_params), _build(unused_params)
    state = gradcomp.register_fsdp(net, grad_bits=8)  # every option at its default
    schedule = _schedule(case)
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)  # the same batch every step
    measured = [n for n, _ in net.named_parameters() if n.startswith(("m.", "side."))]
    owner = {n: n.split(".")[0] for n in measured}
    total = {n: torch.zeros(p.to_local().shape, dtype=torch.float64) for n, p in net.named_parameters() if n in measured}
    norms: Dict[str, list] = {n: [] for n in measured}
    for t in range(STEPS):
        use, side, frozen = schedule(t)
        for model in (net, ref):
            for n, p in model.named_parameters():
                p.requires_grad_(n not in frozen)
        before = {k: state.modules[k].step for k in ("m", "side")}
        for model in (net, ref):
            (model(x, use, side) - y).square().mean().backward()
        grads = dict(net.named_parameters())
        for n, p in ref.named_parameters():
            if n not in measured:
                continue
            q = grads[n]
            if p.grad is None:
                assert q.grad is None, f"step {t}: {n} got a gradient that plain FSDP2 did not give"
                continue
            assert q.grad is not None, f"step {t}: {n} got no gradient, plain FSDP2 gave one"
            if before[owner[n]] < WARMUP:  # the module's warm-up: FSDP2's own reduce-scatter
                continue
            e = q.grad.to_local().double() - p.grad.to_local().double()
            total[n] += e
            sq = e.square().sum()
            dist.all_reduce(sq)
            norms[n].append(float(sq.sqrt()))
        net.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    ratios = {}
    for n in measured:
        sq = total[n].square().sum()
        dist.all_reduce(sq)
        assert norms[n] and min(norms[n]) > 0, f"{n}: no compressed step with a gradient ({norms[n]})"
        ratios[n] = float(sq.sqrt()) / (sum(norms[n]) / len(norms[n]))
    return ratios


def _check(rank: int, world_size: int, case: str, conditional: Set[str], unused_params: bool = False) -> None:
    ratios = _measure(rank, case, unused_params)
    if rank == 0:
        print(f"{case}{' (zero-filled rows)' if unused_params else ''}: " + ", ".join(f"{n} {r:.3g}" for n, r in ratios.items()))
    bad = {n: round(r, 2) for n, r in ratios.items() if r > RATIO_MAX}
    assert not bad, (
        f"{case}: cumulative error / mean per-step error over {STEPS} steps is {bad} (conditional: {sorted(conditional)}); "
        f"about 1 when each parameter keeps its own residual (all: { {n: round(r, 2) for n, r in ratios.items()} })"
    )


@pytest.mark.slow
def test_conditional_branch_keeps_its_residual(tmp_path):
    # m.a: a branch on even steps (FSDP2 hands over a shorter row on odd steps); side: a whole FSDP
    # module on even steps (no reduce-scatter at all on odd steps); m.b and m.trunk: every step
    spawn(_check, 2, tmp_path, "branch", {"m.a.weight", "m.a.bias", "side.weight", "side.bias"}, timeout=240)


@pytest.mark.slow
def test_conditional_branch_with_zero_filled_rows(tmp_path):
    # set_reduce_scatter_unused_params(True): the branch's row is there, filled with zeros, on odd steps
    spawn(_check, 2, tmp_path, "branch", {"m.a.weight", "m.a.bias"}, True, timeout=240)


@pytest.mark.slow
def test_alternating_experts_of_the_same_shape_keep_their_own_residuals(tmp_path):
    # m.a and m.b have the same shape: the rows of the two kinds of step have the same length
    spawn(_check, 2, tmp_path, "experts", {"m.a.weight", "m.a.bias", "m.b.weight", "m.b.bias"}, timeout=240)


@pytest.mark.slow
def test_frozen_then_unfrozen_parameter_resumes_its_residual(tmp_path):
    spawn(_check, 2, tmp_path, "frozen", {"m.a.weight", "m.a.bias"}, timeout=240)


# ---------------------------------------------------------------- the residual store, in one process

SEGMENTS = (300, 20, 700, 300)  # one rank's row of four parameters; 0 and 3 have the same length
B = 256


def _cols(present: Sequence[int], segments: Sequence[int] = SEGMENTS) -> torch.Tensor:
    """Element columns of ``present`` in a full block-aligned row."""
    starts, pos = [], 0
    for n in segments:
        starts.append(pos)
        pos += -(-n // B) * B
    return torch.cat([torch.arange(starts[i], starts[i] + -(-segments[i] // B) * B) for i in present])


def _plan(present: Sequence[int], P: int = 2) -> ExchangePlan:
    segs = tuple(SEGMENTS[i] for i in present)
    return ExchangePlan.build(segs * P, P, 8, B, chunk_numel=None)


def _all_residuals(mod: ModuleComm, P: int = 2) -> torch.Tensor:
    """Every parameter's residual, side by side in the full row's layout: ``(P, A)``."""
    return torch.cat([mod.param_residual(i, P, B) for i in range(len(SEGMENTS))], dim=1)


def _encode_step(mod: ModuleComm, present: Tuple[int, ...], finite: bool, change: Callable) -> torch.Tensor:
    """What a reduce-scatter of ``present`` does to the residuals: take them, write new ones (``change``), commit.

    Returns the residual the exchange was given (a copy) and the two buffers' addresses.
    """
    res, spare = mod.residuals(_plan(present), torch.device("cpu"), present)
    given = res.clone()
    spare.copy_(change(res))
    mod.commit_residual(torch.tensor(finite))
    return given, {res.data_ptr(), spare.data_ptr()}


def test_a_partial_row_reads_and_writes_only_its_parameters_residuals():
    P, A = 2, sum(-(-n // B) * B for n in SEGMENTS)
    mod = ModuleComm("m", 0, SEGMENTS)
    start = torch.randn(P * A, generator=torch.Generator().manual_seed(0))
    res, _ = _encode_step(mod, (0, 1, 2, 3), True, lambda r: start)  # a full row: the residual is laid out as the row
    assert res.numel() == P * A and not res.any(), "the first residuals are not zeros"
    before = _all_residuals(mod).clone()
    assert torch.equal(before.reshape(-1), start)
    for present in [(0, 2), (0, 2), (3,), (1, 2, 3), (0, 1, 2, 3), (1,), (0, 3)]:
        res, _ = _encode_step(mod, present, True, lambda r: r + 1.0)
        assert torch.equal(res.view(P, -1), before[:, _cols(present)]), f"{present}: not their own residuals"
        after = _all_residuals(mod)
        absent = [i for i in range(4) if i not in present]
        assert torch.equal(after[:, _cols(present)], before[:, _cols(present)] + 1.0), f"{present}: new residuals lost"
        if absent:
            assert torch.equal(after[:, _cols(absent)], before[:, _cols(absent)]), f"{present}: an absent parameter's residual changed"
        before = after.clone()
        # a step in which a rank was not finite changes nothing
        _encode_step(mod, present, False, lambda r: r + 5.0)
        assert torch.equal(_all_residuals(mod), before), f"{present}: a non-finite step changed the residuals"
    # rows that keep holding the same parameters use the residual in place: no copy, no new buffer
    _, bufs = _encode_step(mod, (0, 2), True, lambda r: r)
    for _ in range(3):
        assert _encode_step(mod, (0, 2), True, lambda r: r)[1] == bufs
    assert mod.fingerprint((0, 1, 2, 3)) == 0 and mod.fingerprint((0,)) != mod.fingerprint((3,))


def test_present_parameters_are_named_from_fsdps_list_not_from_the_length():
    params = [object() for _ in SEGMENTS]
    mod = ModuleComm("m", 0, SEGMENTS, (), params)
    assert mod.present_of(None, sum(SEGMENTS)) == (0, 1, 2, 3)  # a direct call of the full row
    assert mod.present_of(None, 300) is None  # a shorter row of unknown parameters: not attributed
    assert mod.present_of([params[0]], 300) == (0,) and mod.present_of([params[3]], 300) == (3,)
    assert mod.present_of([params[1], params[2]], 720) == (1, 2)
    assert mod.present_of([params[2], params[1]], 720) is None  # not in FSDP's order
    assert mod.present_of([params[0]], 301) is None and mod.present_of([object()], 300) is None


def _state(residual: torch.Tensor = None) -> FSDPCompressState:
    state = FSDPCompressState(FSDPCompressConfig())
    state.world_size, state.rank = 2, 0
    state.modules["m"] = ModuleComm("m", 0, SEGMENTS)
    state.modules["m"].residual = residual
    return state


def test_checkpoint_holds_each_parameters_residual_and_refuses_a_bad_one():
    P, A = 2, sum(-(-n // B) * B for n in SEGMENTS)
    full = torch.randn(P * A, generator=torch.Generator().manual_seed(1))
    sd = _state(full.clone()).state_dict()
    per = sd["residuals"]["m"]
    assert sorted(per) == [0, 1, 2, 3]
    for i in per:
        assert per[i].shape == (P, -(-SEGMENTS[i] // B) * B) and torch.equal(per[i], full.view(P, A)[:, _cols((i,))])
    other = _state()
    other.load_state_dict(copy.deepcopy(sd))
    assert torch.equal(other.modules["m"].residual, full)
    # the earlier form (the module residual as one tensor of the full row's layout) loads per parameter
    old = copy.deepcopy(sd)
    old["residuals"]["m"] = full.clone()
    other = _state()
    other.load_state_dict(old)
    assert torch.equal(other.modules["m"].residual, full)
    # a parameter missing from the checkpoint starts from zeros
    part = copy.deepcopy(sd)
    del part["residuals"]["m"][1]
    other = _state()
    other.load_state_dict(part)
    assert not other.modules["m"].residual.view(P, A)[:, _cols((1,))].any()
    assert torch.equal(other.modules["m"].residual.view(P, A)[:, _cols((0, 2, 3))], full.view(P, A)[:, _cols((0, 2, 3))])
    bad: List[Tuple[Callable, str]] = [
        (lambda d: d["residuals"]["m"].__setitem__(7, per[0].clone()), "parameter index 7"),
        (lambda d: d["residuals"]["m"].__setitem__(1, torch.zeros(P, 512)), r"shape \(P, 256\)"),
        (lambda d: d["residuals"]["m"].__setitem__(1, torch.zeros(P, 256, dtype=torch.float16)), "float32"),
        (lambda d: d["residuals"]["m"].__setitem__(1, torch.zeros(3, 256)), "different numbers of rows"),
        (lambda d: d["residuals"]["m"][2].__setitem__((0, 5), float("nan")), "non-finite"),
        (lambda d: d["residuals"].__setitem__("m", torch.zeros(P * A + 256)), "full row's layout"),
    ]
    for spoil, match in bad:
        d = copy.deepcopy(sd)
        spoil(d)
        target = _state(torch.ones(P * A))
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(d)
        assert torch.equal(target.modules["m"].residual, torch.ones(P * A)), "a refused checkpoint changed the state"


# ---------------------------------------------------------------- partial rows against a reference, 2 ranks


def foreach_reduce(fsdp_params, rs, out, inp, group, op):
    """Call ``rs`` as FSDP2's ``foreach_reduce`` does (by keyword), with the parameters it reduces in this frame."""
    return rs(output_tensor=out, input_tensor=inp, group=group, op=op)


def _partial_rows(rank, world_size):
    P = world_size
    group = dist.group.WORLD
    params = [object() for _ in SEGMENTS]
    A = sum(-(-n // B) * B for n in SEGMENTS)
    # warmup_steps=0, min_compress_numel=0: the collective alone on rows of a few hundred values,
    # quantized from the first call (warm-up and the size threshold are tested in FSDP2 training)
    state = FSDPCompressState(FSDPCompressConfig(grad_bits=8, warmup_steps=0, min_compress_numel=0))
    mod = ModuleComm("m", 0, SEGMENTS, (), params)
    rs = QuantizedReduceScatter(state.config, mod, state.ledger)
    ref = [torch.zeros(P, A) for _ in range(P)]  # every rank's residual, full-row layout
    steps = [(0, 1, 2, 3), (0, 2), (3,), (0,), (1, 2, 3), (0, 1, 2, 3), (3,), (0, 3)]
    for step, present in enumerate(steps):
        segs = tuple(SEGMENTS[i] for i in present)
        row = sum(segs)
        rp = RowPlan.build(row, segs, B)
        cols = _cols(present)
        inputs = [torch.randn(P, row, generator=torch.Generator().manual_seed(100 * step + r)) for r in range(P)]
        out = torch.empty(row)
        foreach_reduce([params[i] for i in present], rs, out, inputs[rank].reshape(-1).clone(), group, dist.ReduceOp.AVG)
        total = 0
        for r in range(P):  # the reference: each parameter with its own residual
            xa = rp.align(inputs[r]).reshape(-1, B)
            res_out = torch.empty(xa.shape)
            codes, scale = codec.encode_blocks(xa, 8, residual=ref[r][:, cols].reshape(-1, B), residual_out=res_out)
            total = total + codec.decode_blocks(codes, scale, 8).view(P, -1)
            ref[r][:, cols] = res_out.view(P, -1)
        assert torch.equal(out, rp.unalign(total / P)[rank]), f"step {step}, parameters {present}: output differs"
        assert torch.equal(_all_residuals(mod, P), ref[rank]), f"step {step}, parameters {present}: residuals differ"
        aligned = rp.aligned
        assert mod.last_grad[0] == (P - 1) * (aligned + 4 * aligned // B + HEADER_BYTES), f"step {step}: bytes"
    # a non-finite value in a partial row: every rank's output is non-finite, every residual stays
    kept = _all_residuals(mod, P).clone()
    x = torch.randn(P, 600, generator=torch.Generator().manual_seed(9 + rank))
    if rank == 1:
        x[0, 3] = float("inf")
    out = torch.empty(600)
    foreach_reduce([params[0], params[3]], rs, out, x.reshape(-1).clone(), group, dist.ReduceOp.AVG)
    assert not torch.isfinite(out).all() and torch.equal(_all_residuals(mod, P), kept)
    # a shorter row whose parameters cannot be named (a direct call) goes uncompressed, residuals untouched
    x = torch.randn(P, 300, generator=torch.Generator().manual_seed(20 + rank))
    out = torch.empty(300)
    rs(out, x.reshape(-1).clone(), group, dist.ReduceOp.AVG)
    xs = [torch.randn(P, 300, generator=torch.Generator().manual_seed(20 + r)) for r in range(P)]
    assert torch.allclose(out, sum(xs)[rank] / P, atol=1e-6) and torch.equal(_all_residuals(mod, P), kept)
    # ranks that reduce different parameters of the same length: a clear error on every rank
    x = torch.randn(P, 300, generator=torch.Generator().manual_seed(30 + rank))
    with pytest.raises(RuntimeError, match="ranks reduced different parameters of FSDP module .m. at step"):
        foreach_reduce([params[0] if rank == 0 else params[3]], rs, torch.empty(300), x.reshape(-1).clone(), group, dist.ReduceOp.AVG)


@pytest.mark.slow
def test_partial_rows_match_a_per_parameter_reference(tmp_path):
    spawn(_partial_rows, 2, tmp_path, timeout=180)


# ---------------------------------------------------------------- FSDP2 training: resume, bytes, ranks


def _mixed(t: int) -> tuple:
    """Experts in turn, the side module on two steps of three, the trunk frozen on every fifth step."""
    return ("a" if t % 2 == 0 else "b", t % 3 != 0, {"m.trunk.weight", "m.trunk.bias"} if t % 5 == 4 else set())


def _train_mixed(net, opt, state, rank, steps, record):
    from gradcomp.comm.fsdp import _param_segments

    segs = _param_segments(net.m)[0]
    names = [n for n, _ in net.m.named_parameters()]
    for t in steps:
        use, side, frozen = _mixed(t)
        for n, p in net.named_parameters():
            p.requires_grad_(n not in frozen)
        g = torch.Generator().manual_seed(1000 * t + rank)
        x, y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)
        (net(x, use, side) - y).square().mean().backward()
        present = [i for i, (n, p) in enumerate(net.m.named_parameters()) if p.grad is not None]
        if t >= WARMUP:  # the bytes of the formula, for the parameters reduced
            aligned = sum(-(-segs[i] // 256) * 256 for i in present)
            want = (dist.get_world_size() - 1) * (aligned + 4 * aligned // 256 + HEADER_BYTES)
            assert state.modules["m"].last_grad[0] == want, f"step {t}: {[names[i] for i in present]}"
        record.append((state.modules["m"].last_grad, state.modules["side"].last_grad))
        opt.step()
        opt.zero_grad(set_to_none=True)


def _resume(rank, world_size):
    import gradcomp
    from tests._models import _all_identical

    def full(net):
        return torch.cat([p.full_tensor().detach().reshape(-1) for p in net.parameters()])

    net = _build()
    state = gradcomp.register_fsdp(net, grad_bits=8)  # every option at its default
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    first, rest = range(0, 17), range(17, 26)
    _train_mixed(net, opt, state, rank, first, [])
    ckpt = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict(), "comm": state.state_dict()})
    bytes_a: list = []
    _train_mixed(net, opt, state, rank, rest, bytes_a)
    expected, residuals = full(net), state.state_dict()["residuals"]
    assert _all_identical(expected), "ranks disagree on the parameters"

    net2 = _build()
    state2 = gradcomp.register_fsdp(net2, grad_bits=8)
    net2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    state2.load_state_dict(ckpt["comm"])
    bytes_b: list = []
    _train_mixed(net2, opt2, state2, rank, rest, bytes_b)
    assert torch.equal(full(net2), expected), "the resumed run diverged from the uninterrupted one"
    assert bytes_a == bytes_b, "the resumed run sent other bytes"
    got = state2.state_dict()["residuals"]
    assert got.keys() == residuals.keys()
    for k in residuals:
        assert got[k].keys() == residuals[k].keys()
        assert all(torch.equal(got[k][i], residuals[k][i]) for i in residuals[k]), f"module {k!r}: residuals differ"


@pytest.mark.slow
def test_resume_is_bit_exact_with_conditional_parameters_and_default_options(tmp_path):
    spawn(_resume, 2, tmp_path, timeout=240)


def _frozen_keeps(rank, world_size):
    # a parameter frozen for 6 steps comes back with the very residual it had when it was frozen
    import gradcomp

    net = _build()
    state = gradcomp.register_fsdp(net, grad_bits=8)  # every option at its default
    names = [n for n, _ in net.m.named_parameters()]
    ia = names.index("a.weight")
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)
    kept = None
    for t in range(24):
        frozen = 14 <= t < 20
        net.m.a.weight.requires_grad_(not frozen)
        (net(x, "ab", True) - y).square().mean().backward()
        net.zero_grad(set_to_none=True)
        if t < 13:  # the warm-up (10 steps, no residual yet), then three compressed steps
            continue
        r = state.state_dict()["residuals"]["m"][ia]
        if t == 13:
            kept = r
            assert kept.abs().sum() > 0, "no residual after the warm-up"
        elif 14 <= t < 20:
            assert torch.equal(r, kept), f"step {t}: the frozen parameter's residual changed"
        elif t == 20:
            assert not torch.equal(r, kept), "the unfrozen parameter's residual was not used"


@pytest.mark.slow
def test_a_frozen_parameter_keeps_its_residual_bit_for_bit(tmp_path):
    spawn(_frozen_keeps, 2, tmp_path, timeout=240)


def _hsdp_partial(rank, world_size):
    # HSDP with replicate_group: a step that reduces some of a module's parameters all-reduces its
    # shard across the replicas uncompressed and leaves that exchange's residuals as they were
    import gradcomp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests._models import _all_identical

    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    net = _Net()
    for sub in (net.m, net.side, net):
        fully_shard(sub, mesh=mesh["shard"])
    state = gradcomp.register_fsdp(net, grad_bits=8, replicate_group=mesh.get_group("replicate"))  # defaults otherwise
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)
    rep = state.replicas["m"]
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for t in range(16):
        before = None if rep.residual is None else (rep.residual.clone(), rep.server_residual.clone())
        (net(x, "ab" if t % 2 == 0 else "b", True) - y).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sent, fp32 = rep.last
        if t < WARMUP:
            continue
        if t % 2:  # the branch had no gradient: the trunk and b's shard went uncompressed
            assert sent == fp32, f"step {t}: a partial shard was compressed ({sent} of {fp32} bytes)"
            assert before is not None and torch.equal(rep.residual, before[0]) and torch.equal(rep.server_residual, before[1])
        else:
            assert sent < 0.3 * fp32, f"step {t}: a full shard was not compressed ({sent} of {fp32} bytes)"
    # the replicas hold the same shards: the replicate all-reduce gave them identical gradients
    assert _all_identical(torch.cat([p.full_tensor().detach().reshape(-1) for p in net.parameters()]))


@pytest.mark.slow
def test_hsdp_replicate_allreduce_of_a_partial_shard_goes_uncompressed(tmp_path):
    spawn(_hsdp_partial, 4, tmp_path, timeout=300)
