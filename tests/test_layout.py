"""The package's shape: what the core imports, what it exports, and where public names live."""

from __future__ import annotations

import subprocess
import sys

import gradcomp
import gradcomp.activations
import gradcomp.quant
import gradcomp.weights


def test_core_never_imports_the_demo_task_the_cli_or_the_plots():
    code = (
        "import sys, gradcomp, gradcomp.quant, gradcomp.sensitivity, gradcomp.mixed_precision, gradcomp.gradexp, "
        "gradcomp.costmodel, gradcomp.weights, gradcomp.activations, gradcomp.batches\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('gradcomp.examples', 'gradcomp.cli', 'gradcomp.plots', 'matplotlib')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_all_lists_importable_names_and_the_workflow_steps():
    for name in gradcomp.__all__:
        assert hasattr(gradcomp, name), name
    for step in ("prepare_activation_quant_", "calibrate_", "convert_activation_quant_", "MixedPrecisionPlan", "HookConfig"):
        assert step in gradcomp.__all__, step
    assert len(set(gradcomp.__all__)) == len(gradcomp.__all__)


def test_short_module_names_are_the_quant_package():
    for mod in (gradcomp.weights, gradcomp.activations):
        for name in mod.__all__:
            assert getattr(mod, name) is getattr(gradcomp.quant, name), (mod.__name__, name)
    assert gradcomp.weights.quantize_ is gradcomp.quantize_
    assert gradcomp.activations.ActQuantConfig is gradcomp.ActQuantConfig


def test_quant_modules_stay_small():
    from pathlib import Path

    sizes = {p.name: len(p.read_text().splitlines()) for p in Path(gradcomp.quant.__file__).parent.glob("*.py")}
    assert max(sizes.values()) <= 600, sizes
