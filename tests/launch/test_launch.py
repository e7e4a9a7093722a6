"""Tests of launch/: atomic checkpoints, elastic restart with resume, and the emulated cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _launch import LAUNCH, train

PYTHON = sys.executable


def _env(**extra):
    env = dict(os.environ)
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = PYTHON
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# in-process pieces


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "train.pt"
    train.atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def crash_mid_write(obj, fh):
        real_save({"partial": torch.zeros(1000)}, fh)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        train.atomic_torch_save({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.pt"]  # no temp file left


def test_latest_checkpoint_pointer(tmp_path):
    root = tmp_path / "checkpoints"
    assert train.latest_checkpoint(root) is None
    (root / "step_00000004").mkdir(parents=True)
    train.atomic_write_text(root / "latest", "step_00000004\n")
    with pytest.raises(FileNotFoundError, match="no train.pt"):
        train.latest_checkpoint(root)
    train.atomic_torch_save({}, root / "step_00000004" / "train.pt")
    assert train.latest_checkpoint(root) == root / "step_00000004"


def test_payload_counter_matches_ring_allreduce():
    c = train.PayloadCounter(world_size=4)
    c.add(400, 800, last=False)
    c.add(400, 800, last=True)  # two buckets of 100 fp32 elements, half precision on the wire
    s = c.stats()
    assert s["bytes_sent_step"] == 2 * 600 and s["fp32_bytes_step"] == 2 * 1200  # 2 (P-1)/P = 1.5
    assert s["compression_ratio"] == 2.0 and s["buckets_step"] == 2
    c.add(40, 80, last=True)  # the next step: one bucket
    assert c.stats()["buckets_step"] == 1 and c.stats()["bytes_sent_step"] == 60


def test_bad_arguments_exit_2_without_side_effects(tmp_path, capsys):
    assert train.main(["--steps", "0", "--out-dir", str(tmp_path / "run")]) == 2
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
    assert train.main(["--hook", "powersgd", "--powersgd-start-iter", "1", "--out-dir", str(tmp_path / "run")]) == 2
    assert train.main(["--schedule-steps", "0", "--out-dir", str(tmp_path / "run")]) == 2
    assert "--schedule-steps must be >= 1, got 0" in capsys.readouterr().err
    assert train.main(["--target-val-loss", "nan", "--out-dir", str(tmp_path / "run")]) == 2
    assert "--target-val-loss must be a positive finite loss" in capsys.readouterr().err
    # every wire format is a hook; the budget belongs to the policy; weights take 8-bit formats only
    assert train.main(["--hook", "int2r", "--error-budget", "0.2", "--out-dir", str(tmp_path / "run")]) == 2
    assert "--error-budget and --policy-fit need --policy" in capsys.readouterr().err
    assert train.main(["--fsdp", "--weight-bits", "mxfp4", "--out-dir", str(tmp_path / "run")]) == 2
    assert "--weight-bits must be 32 or an 8-bit format" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--hook", "int3", "--out-dir", str(tmp_path / "run")])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    assert {"int2r", "mxfp4", "fp8_e4m3", "int8"} <= set(train.HOOKS)
    assert not (tmp_path / "run").exists()


def test_result_files_get_the_umask_mode(tmp_path):
    # mkstemp's 0600 must not leak into results: the mode is what open() would give (0644 under umask 022)
    old = os.umask(0o022)
    try:
        train.atomic_write_text(tmp_path / "summary.json", "{}")
        train.atomic_torch_save({"w": torch.ones(2)}, tmp_path / "ckpt" / "train.pt")
        assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "ckpt" / "train.pt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        train.atomic_write_text(tmp_path / "private.json", "{}")
        assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "private.json", "summary.json"]  # no temp files


def _args(*argv):
    return train.build_parser().parse_args(list(argv))


def test_default_run_directory_is_never_silently_reused(tmp_path):
    root = tmp_path / "runs"
    assert train.choose_out_dir(_args("--hook", "int8"), "int8", root) == (root / "int8", "")
    (root / "int8").mkdir(parents=True)
    assert train.choose_out_dir(_args("--hook", "int8"), "int8", root) == (root / "int8", "")  # empty: used
    (root / "int8" / "summary.json").write_text("{}")
    out, note = train.choose_out_dir(_args("--hook", "int8"), "int8", root)
    assert out == root / "int8-2" and out.is_dir() and "runs/int8 holds an earlier run" in note and "--overwrite" in note
    assert train.choose_out_dir(_args("--hook", "int8"), "int8", root)[0] == root / "int8-3"  # -2 is claimed now
    assert train.choose_out_dir(_args("--hook", "int8", "--overwrite"), "int8", root) == (root / "int8", "")
    assert train.choose_out_dir(_args("--hook", "int8", "--resume"), "int8", root) == (root / "int8", "")
    # an explicit --out-dir is used as given, and replacing an earlier run there is said, not silent
    out, note = train.choose_out_dir(_args("--out-dir", str(root / "int8")), "int8", root)
    assert out == root / "int8" and "holds an earlier run" in note


def test_run_sh_checks_arguments_before_starting_torchrun(tmp_path):
    for argv, needle in [
        (["--hook", "int3"], "train.py: error: argument --hook: invalid choice: 'int3' (choose from 'allreduce', 'fp16', 'powersgd', 'int8', 'int4', 'int2', 'fp8_e4m3',"),
        (["--steps", "0"], "train.py: error: --steps must be >= 1, got 0"),
        (["--resume", "--overwrite"], "train.py: error: --overwrite and --resume contradict each other"),
    ]:
        r = subprocess.run(["bash", str(LAUNCH / "run.sh"), *argv], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(needle), r.stderr
        assert r.stdout == "" and not (tmp_path / "runs").exists()  # torchrun never started
    r = subprocess.run(["bash", str(LAUNCH / "run.sh")], env=_env(NPROC="two"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "run.sh: error: NPROC must be a positive integer (processes on this node), got 'two'"
    r = subprocess.run(["bash", str(LAUNCH / "run.sh"), "--help"], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count("usage: train.py") == 1 and "--overwrite" in r.stdout


@pytest.mark.slow
def test_target_loss_stops_every_rank_at_the_same_evaluation(tmp_path):
    # the benchmark's time to accuracy: rank 0 evaluates, every rank stops there (no hang, exit 0);
    # the "local" hook (no communication) keeps the run short
    out = tmp_path / "run"
    cmd = [
        "bash", str(LAUNCH / "run.sh"), "--hook", "local", "--steps", "12", "--schedule-steps", "6",
        "--eval-every", "2", "--target-val-loss", "100", "--batch-size", "2", "--corpus-bytes", str(1 << 18),
        "--eval-batches", "1", "--log-every", "0", "--netdev", "none", "--out-dir", str(out),
    ]
    r = subprocess.run(cmd, env=_env(NPROC="2"), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_at_step"] == 2 and summary["final_val_loss"] <= 100
    records = _read_metrics(out / "metrics.jsonl")
    assert [rec["step"] for rec in records] == [1, 2]
    assert summary["hook_stats"]["bytes_sent_step"] == 0  # nothing communicated
    assert summary["hook_stats"]["buckets_step"] >= 1  # what DDP handed the hook in the last step
    # the wall time from the hook's setup grows by at least each step's own time
    assert 0 <= summary["hook_setup_s"] < records[0]["elapsed_s"] < records[1]["elapsed_s"]
    assert records[1]["elapsed_s"] - records[0]["elapsed_s"] >= records[1]["step_time_s"]
    assert summary["kernels"] is None  # no gradcomp hook here


@pytest.mark.slow
def test_second_run_of_a_hook_gets_a_new_folder_with_normal_permissions(tmp_path):
    cmd = ["bash", str(LAUNCH / "run.sh"), "--hook", "local", "--steps", "2", "--batch-size", "2", "--corpus-bytes", str(1 << 16),
           "--eval-batches", "1", "--log-every", "0", "--netdev", "none"]
    old = os.umask(0o022)
    try:
        for _ in range(2):
            r = subprocess.run(cmd, env=_env(NPROC="2"), cwd=tmp_path, capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        os.umask(old)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["local", "local-2"]
    assert "runs/local holds an earlier run, so this one goes to runs/local-2" in r.stdout
    for name in ("local", "local-2"):
        for f in ("summary.json", "metrics.jsonl"):
            assert (tmp_path / "runs" / name / f).stat().st_mode & 0o777 == 0o644, (name, f)


# --------------------------------------------------------------------------------------------
# torchrun: elastic restart after a killed worker


def _worker_pids(parent: int):
    """Return {rank: pid} of the torchrun workers whose parent is ``parent``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                found[int(kv[5:])] = int(entry.name)
    return found


def _read_metrics(path: Path):
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_killed_worker_restarts_and_resumes_exactly(tmp_path):
    out = tmp_path / "run"
    steps, every = 24, 4
    cmd = [
        "bash", str(LAUNCH / "run.sh"),
        "--hook", "int8", "--warmup-steps", "2", "--min-compress-numel", "1024",
        "--steps", str(steps), "--batch-size", "4", "--corpus-bytes", str(1 << 18), "--eval-batches", "1",
        "--ckpt-every", str(every), "--keep-ckpts", "2", "--resume", "--log-every", "0",
        "--out-dir", str(out),
    ]
    env = _env(NPROC="2", MAX_RESTARTS="1", TORCHRUN_ARGS="--monitor-interval 0.1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        killed_after = None
        while time.monotonic() < deadline and proc.poll() is None:
            recs = _read_metrics(out / "metrics.jsonl")
            if recs and recs[-1]["step"] >= every + 2:
                pids = _worker_pids(proc.pid)
                if 1 in pids:
                    before_kill = {r["step"]: r["loss"] for r in recs}
                    os.kill(pids[1], signal.SIGKILL)
                    killed_after = max(before_kill)
                    break
            time.sleep(0.02)
        assert killed_after is not None, "never saw the run reach the kill point"
        assert killed_after < steps, "the run finished before the worker could be killed"
        log, _ = proc.communicate(timeout=max(5.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            # torchrun puts its workers in sessions of their own: stop them by pid, then torchrun
            for pid in _worker_pids(proc.pid).values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["restart_count"] == 1, text[-3000:]
    resumed = int(summary["resumed_from"].split("_")[1])
    assert resumed % every == 0 and killed_after - every < resumed <= killed_after + 1
    recs = _read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, steps + 1))  # every step exactly once
    # steps up to the checkpoint were kept, the ones after it were taken again, identically
    for step, loss in before_kill.items():
        assert recs[step - 1]["loss"] == loss, (step, loss, recs[step - 1]["loss"])
    assert recs[-1]["loss"] < recs[0]["loss"]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{steps - every:08d}", f"step_{steps:08d}"]  # the latest two are kept
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"


# --------------------------------------------------------------------------------------------
# the emulated cluster (root and network namespaces)


def _netns_ok() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


requires_netns = pytest.mark.skipif(not _netns_ok(), reason="needs root, iproute2 and network namespaces")

SENDER = r"""
import os, socket, time
rank, n = int(os.environ["NODE_RANK"]), int(os.environ["NBYTES"])
assert os.environ["NNODES"] == "2" and os.environ["MASTER_ADDR"] == "10.213.0.1"
if rank == 0:
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))); srv.listen(1)
    conn, _ = srv.accept(); got = 0; t0 = None
    while True:
        b = conn.recv(1 << 20)
        t0 = t0 or time.perf_counter()
        if not b: break
        got += len(b)
    print("RECEIVED", got, "SECONDS", time.perf_counter() - t0)
else:
    for _ in range(200):
        try:
            c = socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))); break
        except OSError:
            time.sleep(0.02)
    c.sendall(b"x" * n); c.close()
"""


def _namespaces():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _ours(stderr: str):
    """Namespaces still present of the netsim run whose stderr this is (other runs may be going on)."""
    m = re.search(r"\(run ([0-9a-f]+)\)", stderr)
    assert m, f"netsim did not print its run id: {stderr!r}"
    return {ns for ns in _namespaces() if ns.endswith("-" + m.group(1))}


@pytest.mark.slow
@pytest.mark.netns
@requires_netns
def test_netsim_counts_bytes_limits_rate_and_cleans_up(tmp_path):
    report = tmp_path / "report.json"
    nbytes = 3_000_000
    res = subprocess.run(
        ["bash", str(LAUNCH / "netsim.sh"), "--hosts", "2", "--rate", "40mbit", "--report", str(report), "--timeout", "60",
         "--", PYTHON, "-c", SENDER],
        env=_env(NBYTES=str(nbytes)), capture_output=True, text=True, timeout=90,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    line = next(l for l in res.stdout.splitlines() if "RECEIVED" in l)
    assert line.startswith("[host0] ")
    got, seconds = int(line.split()[2]), float(line.split()[4])
    assert got == nbytes
    # 3 MB at 40 Mbit/s is 0.6 s; allow the token bucket's burst and scheduling noise
    assert 0.45 < seconds < 1.5, seconds
    rep = json.loads(report.read_text())
    assert rep["hosts"] == 2 and rep["exit_code"] == 0 and rep["rate_bps"] == 40_000_000
    h0, h1 = rep["per_host"]
    # payload plus TCP/IP/Ethernet headers (about 3%)
    assert nbytes < h1["tx_bytes"] < 1.06 * nbytes
    # what one sends the other receives, up to a few ARP frames still in flight at the end
    assert abs(h1["tx_bytes"] - h0["rx_bytes"]) < 500 and abs(h0["tx_bytes"] - h1["rx_bytes"]) < 500
    assert h0["tx_bytes"] < 0.05 * nbytes  # the receiver sends only ACKs
    assert _ours(res.stderr) == set()  # everything removed


@pytest.mark.slow
@pytest.mark.netns
@requires_netns
def test_netsim_exit_codes_and_interrupt_cleanup(tmp_path):
    res = subprocess.run(
        ["bash", str(LAUNCH / "netsim.sh"), "--hosts", "3", "--grace", "0", "--", "sh", "-c", 'test "$NODE_RANK" != 2 || exit 7'],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 7, res.stderr
    assert _ours(res.stderr) == set()
    # Ctrl-C while the hosts run: the script stops them and removes its namespaces
    # as a terminal's Ctrl-C does, the signal goes to the script's whole foreground process group (bash
    # acts on a SIGINT that arrives while it waits for a foreground command only if that command got it too)
    proc = subprocess.Popen(["bash", str(LAUNCH / "netsim.sh"), "--hosts", "2", "--", "sleep", "60"], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        banner = proc.stderr.readline()  # printed once the network is up, just before the hosts start
        m = re.search(r"\(run ([0-9a-f]+)\)", banner)
        assert m, banner
        assert len({ns for ns in _namespaces() if ns.endswith("-" + m.group(1))}) == 3  # 2 hosts + switch
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, proc.stderr.read()
    assert {ns for ns in _namespaces() if ns.endswith("-" + m.group(1))} == set()


def test_netsim_refuses_without_root_or_bad_args():
    res = subprocess.run(["bash", str(LAUNCH / "netsim.sh"), "--hosts", "0", "--", "true"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "--hosts must be an integer" in res.stderr
    if os.geteuid() == 0 and shutil.which("setpriv"):
        cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "bash", str(LAUNCH / "netsim.sh"), "--", "true"]
    elif os.geteuid() != 0:
        cmd = ["bash", str(LAUNCH / "netsim.sh"), "--", "true"]
    else:
        pytest.skip("root without setpriv: cannot run the script unprivileged")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert res.returncode == 3 and "needs root" in res.stderr
