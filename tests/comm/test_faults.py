"""Fault injection: ranks that disagree, peers that stall or fail, checkpoints that lie, resumes that run code.

Every fault must end in a clear error (naming gradcomp and what went wrong) on every rank within
the process group's timeout, with no rank hanging and no state changed by a refused load. The
multi-process tests run 2-3 gloo ranks with timeouts of a few seconds; the spawner kills every
worker that outlives its deadline.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp
from gradcomp.comm import Topology, guard, state_checks
from gradcomp.comm.guard import HookFailedError

from _models import _backward, _model

PG_TIMEOUT = 2.0  # seconds: the timeout of the user's group that DDP and the hook average over
SLACK = 10.0  # what a loaded 2-core machine may add to it


def _entry(rank, fn, world_size, init_file, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),  # setup collectives may wait for a slow rank on a busy machine
    )
    fn(rank, world_size, *args)
    # broken groups can make a tidy shutdown wait: the checks are done, leave at once
    os._exit(0)


def _spawn(fn, world_size, tmp_path, *args, deadline=60.0):
    """Run ``fn`` on ``world_size`` ranks; fail with a worker's traceback; kill them all after ``deadline`` s."""
    init_file = str(tmp_path / f"init_{time.monotonic_ns()}")
    ctx = mp.start_processes(_entry, args=(fn, world_size, init_file, args), nprocs=world_size, join=False, start_method="spawn")
    end = time.monotonic() + deadline
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > end:
                raise TimeoutError(f"{fn.__name__}: a rank was still running after {deadline:.0f} s (hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


def _user_group():
    """The user's group, with a short timeout (a collective: every rank makes it; aligned by a barrier)."""
    group = dist.new_group(timeout=datetime.timedelta(seconds=PG_TIMEOUT))
    dist.barrier()
    return group


def _hooked(group=None, **options):
    model = DDP(_model(), bucket_cap_mb=0.05, process_group=group)
    opts = dict(warmup_steps=1, min_compress_numel=0, log_every=0)
    opts.update(options)
    return model, gradcomp.register(model, **opts)


# ---------------------------------------------------------------------------------------------
# 1. ranks agree or stop


def _disagree_worker(rank, world_size, tmp):
    # rank 1 changes one option; the others leave every option at its default, or spell it out
    cases = [
        ("block_size", dict(block_size=128) if rank == 1 else dict(block_size=256)),  # message sizes may coincide: silent before
        ("bits", dict(bits=4) if rank == 1 else {}),
        # the same bits, other codes: only the format names them apart (int4r's messages are int4's size)
        ("format", dict(format="int4r") if rank == 1 else dict(format="int4")),
        ("format", dict(format="mxfp4") if rank == 1 else dict(format="int4")),
        ("warmup_steps", dict(warmup_steps=3) if rank == 1 else {}),
        ("min_compress_numel", dict(min_compress_numel=0) if rank == 1 else dict(min_compress_numel=16384)),
        ("error_feedback", dict(error_feedback=False) if rank == 1 else {}),
        ("seed", dict(stochastic_rounding=True, seed=rank == 1 and 7 or 0)),
        ("topology", dict(topology=Topology(local_world_size=1 if rank == 1 else 3))),
    ]
    for field, kwargs in cases:
        model = DDP(_model(), bucket_cap_mb=0.05)
        t0 = time.monotonic()
        with pytest.raises(ValueError) as info:
            gradcomp.register(model, **kwargs)
        msg = str(info.value)
        assert time.monotonic() - t0 < SLACK, f"{field}: took {time.monotonic() - t0:.1f} s"
        assert f"{field} (" in msg and "ranks 0, 2:" in msg and "rank 1:" in msg, msg
        # every rank raises the very same message
        gathered = [None] * world_size
        dist.all_gather_object(gathered, msg)
        assert len(set(gathered)) == 1, gathered


def _agreement_worker(rank, world_size, tmp):
    _register_worker(rank, world_size)
    _disagree_worker(rank, world_size, tmp)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_disagreeing_options_double_registration_and_sparse_gradients_stop_before_any_step(tmp_path):
    """Different options: the same ValueError on every rank; register twice and sparse models: refused up front."""
    _spawn(_agreement_worker, 3, tmp_path, str(tmp_path))


def _lonely_worker(rank, world_size, tmp):
    flag = os.path.join(tmp, "done")
    group = _user_group()
    if rank == 1:  # never builds the hook state; waits until rank 0 gave up
        for _ in range(600):
            if os.path.exists(flag):
                return
            time.sleep(0.05)
        raise AssertionError("rank 0 never gave up")
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="gradcomp") as info:
            gradcomp.QuantizedAllReduceState(group, bits=8)
        elapsed = time.monotonic() - t0
        assert elapsed < PG_TIMEOUT + SLACK, elapsed
        assert "Every rank must build the hook state" in str(info.value)
    finally:
        open(flag, "w").close()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_one_rank_without_state_fails_within_the_timeout(tmp_path):
    _spawn(_lonely_worker, 2, tmp_path, str(tmp_path))


def _register_worker(rank, world_size):
    made = []
    real = dist.new_group

    def counting(*a, **k):
        made.append(1)
        return real(*a, **k)

    dist.new_group = counting
    try:
        _refused_up_front(rank, made)
    finally:
        dist.new_group = real


def _refused_up_front(rank, made):
    model, state = _hooked()
    n = len(made)
    if rank == 0:
        with pytest.raises(ValueError, match="already has a communication hook"):
            gradcomp.register(model, bits=4)
        assert len(made) == n, "a second register created a process group before refusing"
    # sparse gradients: refused at registration, before any collective ...
    bag = nn.EmbeddingBag(50, 8, mode="sum", sparse=True)
    sparse = DDP(nn.Sequential(bag, nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="sparse=True"):
        gradcomp.register(sparse)
    assert len(made) == n
    # ... and at the first bucket when the hook is registered by hand
    st = gradcomp.QuantizedAllReduceState(warmup_steps=1, min_compress_numel=0, log_every=0)
    sparse.register_comm_hook(st, gradcomp.quantized_allreduce_hook)
    with pytest.raises(ValueError, match="sparse gradients"):
        sparse(torch.tensor([[1, 2], [3, 4]]), ).sum().backward()


# ---------------------------------------------------------------------------------------------
# 2. timeouts like PyTorch's; 3. failure poisons nothing


def _failing_step(model, rank, step=3):
    """Run ``step``, which must fail with gradcomp's error naming the step; return (message, seconds taken)."""
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        _backward(model, rank, step)
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert "gradcomp" in msg and f"at step {step}, bucket" in msg, msg
    return msg, elapsed


def _wide(seed: int = 0) -> nn.Module:
    """129 -> 600 -> 600 -> 7: DDP's default buckets are two, both over the default min_compress_numel
    (the last two layers, 364,807 values; the first, 78,000), so both are compressed after the warm-up."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(129, 600), nn.Tanh(), nn.Linear(600, 600), nn.Tanh(), nn.Linear(600, 7))


def _defaults(group=None):
    """A DDP model whose buckets are compressed after the warm-up, with the hook's default options."""
    model = DDP(_wide(), process_group=group)
    return model, gradcomp.register(model)


WARMUP = gradcomp.HookConfig().warmup_steps


def _stall_worker(rank, world_size, make=_hooked, what="exchange"):
    model, state = make(_user_group())
    assert abs(state.failure.timeout.total_seconds() - PG_TIMEOUT) < 1e-6  # the user's group timeout reached the hook
    for step in range(3):
        _backward(model, rank, step)
    if rank == 1:  # stalls inside backward (a gradient hook sleeps), longer than the timeout
        h = next(model.module.parameters()).register_hook(lambda g: (time.sleep(PG_TIMEOUT + 2), g)[1])
    msg, elapsed = _failing_step(model, rank)
    if rank == 0:
        assert "timed out" in msg and what in msg, msg
        assert elapsed < PG_TIMEOUT + SLACK, f"the survivor waited {elapsed:.1f} s"
    else:
        h.remove()
    # the state refuses further steps on every rank
    with pytest.raises(HookFailedError, match="refuses further steps"):
        state.synchronize()


def _death_worker(rank, world_size, defaults=False):
    # defaults: the peer dies in the warm-up, where the buckets go through plain all-reduce
    model, state = (_defaults if defaults else _hooked)(_user_group())
    for step in range(3):
        _backward(model, rank, step)
    dist.barrier()
    if rank == 1:  # dies between steps, without a word
        os._exit(0)
    msg, elapsed = _failing_step(model, rank)
    assert elapsed < PG_TIMEOUT + SLACK, f"the survivor waited {elapsed:.1f} s"
    assert ("plain all-reduce" in msg) == defaults, msg
    with pytest.raises(HookFailedError):
        state.synchronize()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_dead_peer_makes_the_survivor_raise(tmp_path):
    _spawn(_death_worker, 2, tmp_path)


class InjectedFault(ValueError):
    """An error raised on purpose on the communication thread."""


def _thread_fault_worker(rank, world_size, make=_hooked, fault_step=3):
    model, state = make(_user_group())
    for step in range(fault_step):
        _backward(model, rank, step)
    if rank == 0:
        name = "_run_bucket" if hasattr(state, "_run_bucket") else "_exchange"  # the per-bucket work of the thread
        real = getattr(state, name)
        calls = []

        def failing(*a, **k):
            calls.append(1)
            if len(calls) == 1:
                raise InjectedFault("codec exploded")
            return real(*a, **k)

        setattr(state, name, failing)
    with pytest.raises(RuntimeError) as info:
        _backward(model, rank, fault_step)
    msg = str(info.value)
    if rank == 0:  # the original type and message reach the training loop
        assert "InjectedFault" in msg and "codec exploded" in msg and f"step {fault_step}, bucket" in msg, msg
    else:  # the peer stops within the timeout and says who failed first
        assert "gradcomp" in msg and "rank 0" in msg and "codec exploded" in msg, msg
    # the loop catches it and goes on: every rank refuses the next step instead of pairing it with the next
    with pytest.raises(Exception):
        _backward(model, rank, fault_step + 1)
    with pytest.raises(HookFailedError, match="codec exploded"):
        state.state_dict()




# ---------------------------------------------------------------------------------------------
# 4. checkpoints: the first step after a load compares step and layout across ranks


def _swap_buckets(sd, a, b):
    sd = dict(sd)
    for name in ("bucket_keys", "bucket_numels", "worker_residuals", "server_residuals"):
        d = dict(sd[name])
        d[a], d[b] = d[b], d[a]
        sd[name] = d
    sums = {k: dict(v) for k, v in sd["checksums"].items()}
    for d in sums.values():
        d[a], d[b] = d[b], d[a]
    sd["checksums"] = sums
    return sd


def _load_mismatch_worker(rank, world_size, make=_hooked, steps=4):
    model, state = make()
    for step in range(steps):
        _backward(model, rank, step)
    sd = state.state_dict()
    assert len(sd["bucket_keys"]) >= 2
    variants = {
        "step": dict(sd, step=sd["step"] + 3),
        "bucket layout": _swap_buckets(sd, *sorted(sd["bucket_keys"])[:2]),
    }
    for what, bad in variants.items():
        model, state = make()
        state.load_state_dict(bad if rank == 1 else sd)  # each load alone is a valid checkpoint
        t0 = time.monotonic()
        with pytest.raises(ValueError) as info:
            _backward(model, rank, steps)
        msg = str(info.value)
        assert "the ranks hold different hook states" in msg and what in msg, msg
        assert "timed out" not in msg and time.monotonic() - t0 < SLACK, "the check must not wait for a timeout"
        assert state.verifies_next_step  # the next step checks again
    # the same checkpoints on every rank: the run goes on
    model, state = make()
    state.load_state_dict(sd)
    _backward(model, rank, steps)
    assert state.step == sd["step"] + 1


def _training_faults_worker(rank, world_size):
    # the parts end at different times on different ranks (a survivor raises before the stalled rank
    # wakes): meet on the default group (long timeout) before the next part builds its model and state
    _load_mismatch_worker(rank, world_size)
    dist.barrier()
    _thread_fault_worker(rank, world_size)  # every state of the job fails: the next part builds a new one
    dist.barrier()
    _stall_worker(rank, world_size)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_faults_during_training_stop_every_rank(tmp_path):
    """Ranks that loaded different checkpoints, an exception on one rank's communication thread, a stalled
    peer: each ends in a clear error on every rank within the timeout (one job, a fresh hook state each)."""
    _spawn(_training_faults_worker, 2, tmp_path, deadline=100)


def _training_faults_defaults_worker(rank, world_size):
    # the same faults with every option at its default: checkpoints taken after the warm-up (two
    # compressed buckets), an exception on the communication thread at the first compressed step, and
    # a peer that stalls, then one that dies, in the warm-up, where the buckets go through plain
    # all-reduce on DDP's group
    _load_mismatch_worker(rank, world_size, make=_defaults, steps=WARMUP + 2)
    dist.barrier()
    _thread_fault_worker(rank, world_size, make=_defaults, fault_step=WARMUP)
    dist.barrier()
    _stall_worker(rank, world_size, make=_defaults, what="plain all-reduce")
    dist.barrier()
    _death_worker(rank, world_size, defaults=True)  # rank 1 exits here


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_faults_during_training_with_default_options_stop_every_rank(tmp_path):
    """A checkpoint mismatch, an error on the communication thread, a stalled and a dead peer, with defaults."""
    _spawn(_training_faults_defaults_worker, 2, tmp_path, deadline=100)


# ---------------------------------------------------------------------------------------------
# 4. checkpoints are validated before anything changes (one process)


@pytest.fixture
def world1(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=17))
    yield
    dist.destroy_process_group()


def _valid_checkpoint(state, model, step=5):
    """A consistent checkpoint for a 1-rank state: two buckets of real parameter keys, small residuals."""
    numels = [p.numel() for p in model.parameters()]
    buckets = {0: [4, 5, 2], 1: [3, 0, 1]}
    sd = {
        "config": {k: v for k, v in vars(state.config).items()}, "world_size": 1, "rank": 0, "step": step,
        "param_keys": "index", "bucket_keys": {}, "bucket_numels": {}, "worker_residuals": {}, "server_residuals": {},
        "network_fit": None,
    }
    g = torch.Generator().manual_seed(step)
    for b, keys in buckets.items():
        wn, sn = state.residual_sizes(tuple(keys), tuple(numels[k] for k in keys))
        sd["bucket_keys"][b] = list(keys)
        sd["bucket_numels"][b] = [numels[k] for k in keys]
        sd["worker_residuals"][b] = 1e-3 * torch.randn(wn, generator=g)
        sd["server_residuals"][b] = 1e-3 * torch.randn(sn, generator=g)
    sd["checksums"] = state_checks.checksums_of(sd["worker_residuals"], sd["server_residuals"])
    return sd


def _flip(sd, nbytes=40):
    """Flip the low mantissa byte of ``nbytes`` values of a worker residual: still finite, silently wrong."""
    t = sd["worker_residuals"][0].clone()
    t.view(torch.uint8).view(-1, 4)[100 : 100 + nbytes, 0] ^= 0xFF
    return _with(sd, "worker_residuals", 0, t)


def _with(sd, name, bucket, value):
    return dict(sd, **{name: {**sd[name], bucket: value}})


BAD_CHECKPOINTS = [
    ("40 flipped bytes", _flip, ValueError, r"worker_residuals\[0\] does not match its checksum"),
    ("a NaN residual", lambda sd: _with(sd, "server_residuals", 1, sd["server_residuals"][1].clone().index_fill_(0, torch.tensor([3]), float("nan"))),
     ValueError, r"server_residuals\[1\] holds 1 non-finite"),
    ("a 1e30 residual", lambda sd: _with(sd, "worker_residuals", 1, sd["worker_residuals"][1].clone().index_fill_(0, torch.tensor([0]), 1e30)),
     ValueError, "does not match its checksum"),
    ("wrong length", lambda sd: _with(sd, "worker_residuals", 0, sd["worker_residuals"][0][:-8].clone()), ValueError,
     r"worker_residuals\[0\] must be a dense 1-D float32 tensor of \d+ elements"),
    ("float64", lambda sd: _with(sd, "server_residuals", 0, sd["server_residuals"][0].double()), ValueError, "torch.float64"),
    ("list instead of tensor", lambda sd: _with(sd, "worker_residuals", 1, sd["worker_residuals"][1].tolist()), TypeError,
     r"worker_residuals\[1\] must be a tensor, got list"),
    ("missing key", lambda sd: {k: v for k, v in sd.items() if k != "server_residuals"}, ValueError, r"missing key\(s\) \['server_residuals'\]"),
    ("unknown key", lambda sd: dict(sd, extra=1), ValueError, r"unknown key\(s\) \['extra'\]"),
    ("non-int step", lambda sd: dict(sd, step=5.0), TypeError, "step must be an int, got float"),
    ("negative step", lambda sd: dict(sd, step=-5), ValueError, "step must be >= 0, got -5"),
    ("a parameter the model lacks", lambda sd: _with(sd, "bucket_keys", 0, [4, 5, 99]), ValueError, "names parameter 99"),
    ("a parameter of another size", lambda sd: _with(sd, "bucket_keys", 0, [4, 5, 3]), ValueError, "gives parameter 3"),
    ("a parameter in two buckets", lambda sd: _with(sd, "bucket_keys", 1, [3, 0, 5]), ValueError, "appears in buckets"),
    ("residuals of another bucket", lambda sd: _with(sd, "worker_residuals", 7, sd["worker_residuals"][0]), ValueError, "covers buckets"),
    ("no checksums", lambda sd: {k: v for k, v in sd.items() if k != "checksums"}, ValueError, "no checksums"),
    ("another rank's", lambda sd: dict(sd, rank=1, world_size=2), ValueError, "rank 1 of 2"),
    ("another block size", lambda sd: dict(sd, config=dict(sd["config"], block_size=128)), ValueError, "block_size=128"),
    ("not a dict", lambda sd: [sd], TypeError, "must be a dict"),
]


@pytest.mark.parametrize("what,corrupt,exc,match", BAD_CHECKPOINTS, ids=[b[0] for b in BAD_CHECKPOINTS])
def test_bad_checkpoint_is_refused_and_changes_nothing(world1, what, corrupt, exc, match):
    model = _model()
    state = gradcomp.QuantizedAllReduceState()  # every option at its default
    state.track_parameters(model)
    good = _valid_checkpoint(state, model)
    state.load_state_dict(good)
    before = {k: v for k, v in vars(state).items() if not k.startswith("_lock")}
    snapshot = {k: (dict(v) if isinstance(v, dict) else v) for k, v in before.items()}
    residuals = {k: state.residuals.worker(k).clone() for k in state.residuals.layout}
    with pytest.raises(exc, match=match):
        state.load_state_dict(corrupt(_valid_checkpoint(state, model, step=9)))
    assert state.step == 5
    for k, v in snapshot.items():
        assert vars(state)[k] is before[k] or vars(state)[k] == v, f"{what}: {k} changed by a refused load"
    assert all(torch.equal(residuals[k], state.residuals.worker(k)) for k in residuals)


def test_checkpoint_round_trip_through_a_file_with_stats(world1, tmp_path):
    model = _model()
    state = gradcomp.QuantizedAllReduceState(bits=8, log_every=0)
    state.track_parameters(model)
    sd = _valid_checkpoint(state, model)
    state.load_state_dict(sd)
    out = state.state_dict()
    assert out["checksums"] == sd["checksums"]
    torch.save(dict(out, stats={"bytes_sent_total": 3}), tmp_path / "hook.pt")
    back = torch.load(tmp_path / "hook.pt", weights_only=True)
    fresh = gradcomp.QuantizedAllReduceState(bits=8, log_every=0)
    fresh.track_parameters(model)
    fresh.load_state_dict(back)  # an optional "stats" entry is accepted
    assert fresh.step == 5 and all(torch.equal(fresh.residuals.worker(b), sd["worker_residuals"][b]) for b in (0, 1))


# ---------------------------------------------------------------------------------------------
# 7. unsupported input, refused up front


def test_unsupported_gradients_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="sparse gradients.*dense gradients"):
        guard.check_bucket(torch.sparse_coo_tensor([[0]], [1.0], (4,), check_invariants=True), 0)
    with pytest.raises(TypeError, match="complex gradients.*view_as_real"):
        guard.check_bucket(torch.zeros(4, dtype=torch.complex64), 1)
    with pytest.raises(TypeError, match="torch.int64 gradients"):
        guard.check_bucket(torch.zeros(4, dtype=torch.int64), 2)
    guard.check_bucket(torch.zeros(4, dtype=torch.float64), 3)  # plain all-reduce carries fp64
    with pytest.raises(ValueError, match=r"module 0 \(Embedding\) has sparse=True"):
        guard.check_model(nn.Sequential(nn.Embedding(10, 4, sparse=True)))
    with pytest.raises(TypeError, match="parameter w is torch.complex64"):
        m = nn.Module()
        m.w = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
        guard.check_model(m)
    guard.check_model(nn.Sequential(nn.Embedding(10, 4)))


def test_timeout_option_and_the_groups_timeout(world1):
    assert guard.group_timeout(None, "gloo").total_seconds() == 17  # init_process_group(timeout=17 s)
    assert guard.group_timeout(None, "gloo", 4.5).total_seconds() == 4.5
    assert gradcomp.QuantizedAllReduceState(timeout=datetime.timedelta(seconds=9)).config.timeout == 9.0
    for bad in (0, -1, float("inf"), "5", True):
        with pytest.raises(ValueError, match="timeout must be None or a positive number of seconds"):
            gradcomp.QuantizedAllReduceState(timeout=bad)


def test_train_dist_timeout_reaches_the_hook(world1):
    from _launch import train

    args = train.build_parser().parse_args(["--hook", "int8", "--dist-timeout", "7"])
    setup = train.setup_hook(args, DDP(nn.Linear(4, 4)), 1, None)
    assert setup.state.config.timeout == 7.0
    for bad in ("0", "-3", "inf"):
        with pytest.raises(ValueError, match="--dist-timeout must be a positive number of seconds"):
            train.check_args(train.build_parser().parse_args(["--dist-timeout", bad]))


# ---------------------------------------------------------------------------------------------
# 5. resume never runs code


class _Payload:
    """Pickles to a call that creates a file: what a crafted checkpoint would run on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_resume_refuses_a_crafted_pickle(tmp_path):
    from _launch import train

    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    folder = out / "checkpoints" / "step_00000002"
    folder.mkdir(parents=True)
    torch.save({"step": 2, "world_size": 1, "hook": "int8", "model_preset": "small", "x": _Payload(str(marker))}, folder / "train.pt")
    (out / "checkpoints" / "latest").write_text("step_00000002\n")
    with pytest.raises(ValueError, match=r"train.pt could not be loaded as data \(torch.load with weights_only=True\)"):
        train.main(["--hook", "int8", "--steps", "3", "--batch-size", "2", "--corpus-bytes", str(1 << 16),
                    "--eval-batches", "1", "--log-every", "0", "--resume", "--out-dir", str(out)])
    assert not marker.exists(), "loading the checkpoint ran code"
    with pytest.raises(ValueError, match="weights_only=True"):
        train.load_checkpoint_file(folder / "train.pt")
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("hook", ["int8", "powersgd"])
def test_train_checkpoints_load_as_data_and_resume_with_warmup_1_to_checkpoint_residuals(tmp_path, hook):
    from _launch import train

    out = tmp_path / "run"
    common = ["--hook", hook, "--batch-size", "2", "--corpus-bytes", str(1 << 16), "--eval-batches", "1", "--log-every", "0",
              "--warmup-steps", "1", "--powersgd-start-iter", "2", "--ckpt-every", "2", "--out-dir", str(out)]
    assert train.main(common + ["--steps", "2"]) == 0
    for f in (out / "checkpoints" / "step_00000002").glob("*.pt"):
        train.load_checkpoint_file(f)  # weights_only=True
    assert train.main(common + ["--steps", "3", "--resume"]) == 0
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == "step_00000002"


# ---------------------------------------------------------------------------------------------
# 8. the CLI: one line naming the argument, exit 2, before any work


def _cli(capsys, *argv):
    from gradcomp.cli import main

    t0 = time.monotonic()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, err, time.monotonic() - t0


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"l.weight": torch.randn(16, 64), "l.bias": torch.randn(16)}, path)
    return path


def _cli_cases(tmp):
    sd = str(tmp / "sd.pt")
    return [
        (("weights", "quantize", sd, str(tmp / "missing" / "q.safetensors")), "argument output: the folder of"),
        (("weights", "quantize", sd, str(tmp / "q.safetensors"), "--group-size", "99999999999999999999"), "argument --group-size"),
        (("weights", "size", "--params", "inf"), "argument --params: expected a finite number"),
        (("weights", "size", "--params", "nan"), "argument --params: expected a finite number"),
        (("weights", "analyze", str(tmp / "nothing.pt")), "argument file: no such file"),
        (("plan", "--scores", str(tmp), "--avg-bits", "4"), "argument --scores: expected a file, got the folder"),
        (("sensitivity", "--threads", "-1"), "argument --threads"),
        (("cost", "--params", "1e400", "--workers", "8", "--bandwidth", "10gbit", "--no-codec"), "must be a finite count"),
        (("cost", "--params", "7e9", "--workers", "1e30", "--bandwidth", "10gbit", "--no-codec"), "argument --workers"),
        (("cost", "--params", "7e9", "--workers", "8", "--bandwidth", "10gbit", "--block-size", "7", "--no-codec"),
         "argument --block-size: block size must be a positive multiple of 8"),
        (("calibrate", "--names", "re:(("), "argument --names"),
        (("calibrate", "--out", sd), "argument --out: expected a folder"),
        (("grads", "--plot-dir", str(tmp / "sd.pt" / "x")), "argument --plot-dir: cannot create the folder"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_cli_bad_input_is_one_line_exit_2_before_any_work(capsys, tmp_path, weights_file, case):
    argv, needle = _cli_cases(tmp_path)[case]
    code, err, seconds = _cli(capsys, *argv)
    assert code == 2, err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert seconds < 5, f"{argv}: validation took {seconds:.1f} s (work was done first?)"
    assert not (tmp_path / "q.safetensors").exists()


def test_cli_bad_weights_files_are_one_line_exit_2(capsys, tmp_path, weights_file):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    code, err, _ = _cli(capsys, "weights", "quantize", str(weights_file), str(tmp_path / "q.safetensors"), "--no-progress")
    assert code == 0, err
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad = json.loads(meta["quantization_map"])
    bad["layers"] = list(bad["layers"].values())  # a map whose layers is a list
    save_file(tensors, str(tmp_path / "map.safetensors"), metadata=dict(meta, quantization_map=json.dumps(bad)))
    scale = next(k for k in tensors if k.endswith("scale"))
    nan = dict(tensors, **{scale: tensors[scale].clone().index_fill_(0, torch.tensor([0]), float("nan"))})
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata=meta)  # NaN scales
    for name in ("map", "nan"):
        code, err, _ = _cli(capsys, "weights", "analyze", str(tmp_path / f"{name}.safetensors"), "--no-progress")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_cli_unexpected_failure_is_one_line(capsys, monkeypatch):
    import gradcomp.cli.cost as cost

    def broken(args):
        raise RuntimeError("something broke\n  frame 1\n  frame 2 (a C++ stack)")

    monkeypatch.setattr(cost, "run", broken)
    code, err, _ = _cli(capsys, "cost", "--params", "7e9", "--workers", "8", "--bandwidth", "10gbit", "--no-codec")
    assert code == 1 and err.strip() == "gradcomp cost: error: RuntimeError: something broke (run with -v for the traceback)", err
