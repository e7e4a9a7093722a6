"""launch/train.py loaded as a module (it is a script, not part of the package), for the tests that call into it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def load_train():
    """Import ``launch/train.py`` under the name ``gradcomp_launch_train`` (once per process)."""
    import sys

    name = "gradcomp_launch_train"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, LAUNCH / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


train = load_train()
