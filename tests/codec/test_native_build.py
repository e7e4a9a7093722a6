"""Installing where no C++ compiler works: gradcomp installs without its native kernels, says so once, and
the exchange runs the eager reference kernels with identical results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradcomp.comm.exchange import exchange_local
from gradcomp.comm.plan import ExchangePlan

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import logging, sys, torch
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
from gradcomp.codec import kernels
from gradcomp.comm.exchange import exchange_local
from gradcomp.comm.plan import ExchangePlan
print("backend", kernels.backend("cpu"))
g = torch.Generator().manual_seed(0)
plan = ExchangePlan.build((300, 5000, 256), 2, 4, 256, chunk_numel=1024)
xs = [torch.randn(plan.numel, generator=g) for _ in range(2)]
res = [torch.zeros(plan.padded_numel) for _ in range(2)]
for _ in range(3):
    out, _ = exchange_local(plan, xs, residuals=res, server_residuals=[torch.zeros(plan.server_numel) for _ in range(2)])
torch.save({"out": out, "res": res}, sys.argv[1])
"""


def _reference(path: Path) -> dict:
    g = torch.Generator().manual_seed(0)
    plan = ExchangePlan.build((300, 5000, 256), 2, 4, 256, chunk_numel=1024)
    xs = [torch.randn(plan.numel, generator=g) for _ in range(2)]
    res = [torch.zeros(plan.padded_numel) for _ in range(2)]
    for _ in range(3):
        out, _ = exchange_local(plan, xs, residuals=res, server_residuals=[torch.zeros(plan.server_numel) for _ in range(2)])
    return {"out": out, "res": res}


@pytest.mark.slow
def test_install_without_a_compiler_falls_back_to_the_eager_kernels(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        dst = src / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((ROOT / f).read_bytes())
    env = dict(os.environ, CC="false", CXX="false")  # a "compiler" that always fails
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]  # the install goes on
    assert "gradcomp: the native kernels were not built" in build.stderr
    assert not list((src / "gradcomp" / "codec" / "kernels").glob("_native*"))
    (tmp_path / "run.py").write_text(_SCRIPT)
    run = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "out.pt")], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(src)), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "backend eager" in run.stdout
    warnings = [line for line in run.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "native kernels are not built here" in warnings[0], run.stdout
    got, want = torch.load(tmp_path / "out.pt"), _reference(tmp_path)  # here: the native kernels
    assert torch.equal(got["out"], want["out"]) and all(torch.equal(a, b) for a, b in zip(got["res"], want["res"]))
