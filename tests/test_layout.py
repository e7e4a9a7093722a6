"""The public API's shape: what gradcomp exports, one import path per name, and the warned aliases of the old paths."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gradcomp
import gradcomp.quant

ROOT = Path(__file__).resolve().parents[1]

#: old module path -> where its names live now (one release of warned aliases)
ALIASES = {
    "gradcomp.sensitivity": "gradcomp.analysis.sensitivity",
    "gradcomp.mixed_precision": "gradcomp.analysis.mixed_precision",
    "gradcomp.costmodel": "gradcomp.analysis.costmodel",
    "gradcomp.gradexp": "gradcomp.analysis.gradexp",
    "gradcomp.weights": "gradcomp.quant",
    "gradcomp.activations": "gradcomp.quant",
    "gradcomp.fsdp": "gradcomp.comm.fsdp",
}


def test_core_never_imports_the_demo_task_the_cli_the_plots_or_an_alias():
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import gradcomp, gradcomp.quant, gradcomp.analysis.sensitivity, gradcomp.analysis.mixed_precision\n"
        "    import gradcomp.analysis.gradexp, gradcomp.analysis.costmodel, gradcomp.batches\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('gradcomp.examples', 'gradcomp.cli', 'gradcomp.plots',\n"
        "             'gradcomp.integrations', 'matplotlib')) or m in %r)\n"
        "ours = [str(w.message) for w in caught if str(w.message).startswith('gradcomp')]\n"
        "print(bad, ours)\n"
        "sys.exit(1 if bad or ours else 0)\n"
    ) % (tuple(ALIASES),)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_all_lists_importable_names_and_the_workflow_steps():
    for name in gradcomp.__all__:
        assert hasattr(gradcomp, name), name
    for step in ("prepare_activation_quant_", "calibrate_", "convert_activation_quant_", "MixedPrecisionPlan", "HookConfig",
                 "register", "register_fsdp"):
        assert step in gradcomp.__all__, step
    assert len(set(gradcomp.__all__)) == len(gradcomp.__all__)
    from gradcomp.comm.fsdp import register_fsdp

    assert gradcomp.register_fsdp is register_fsdp


@pytest.mark.parametrize("old,new", sorted(ALIASES.items()))
def test_old_paths_warn_naming_the_new_one_and_give_the_same_objects(old, new):
    mod = importlib.import_module(old)
    target = importlib.import_module(new)
    assert mod.__all__ and getattr(gradcomp, old.split(".")[1]) is mod  # `import gradcomp; gradcomp.fsdp` still works
    for name in mod.__all__:
        real = "register_fsdp" if (old, name) == ("gradcomp.fsdp", "compress_") else name
        where = "gradcomp" if old == "gradcomp.fsdp" else new
        with pytest.warns(DeprecationWarning, match=rf"^{re.escape(old)}\.{name} is deprecated .*; use {re.escape(where)}\.{real}$"):
            value = getattr(mod, name)
        assert value is getattr(target, real) is getattr(importlib.import_module(where), real), (old, name)
    with pytest.raises(AttributeError, match=f"deprecated alias of {new}|deprecated alias of gradcomp"):
        getattr(mod, "no_such_name")


def test_old_fsdp_entry_point_is_register_fsdp():
    with pytest.warns(DeprecationWarning, match=r"gradcomp\.fsdp\.compress_ is deprecated.*use gradcomp\.register_fsdp"):
        from gradcomp.fsdp import compress_
    assert compress_ is gradcomp.register_fsdp


def test_short_module_names_are_the_quant_package():
    for old in ("gradcomp.weights", "gradcomp.activations"):
        mod = importlib.import_module(old)
        with pytest.warns(DeprecationWarning):
            for name in mod.__all__:
                assert getattr(mod, name) is getattr(gradcomp.quant, name), (old, name)


def test_version_is_in_one_place():
    import tomllib

    from gradcomp._version import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert gradcomp.__version__ == __version__ == project["version"]
