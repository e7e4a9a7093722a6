"""A whole pickled module or a TorchScript file given to the CLI: one line saying what to save instead, exit code 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gradcomp.cli import main
from gradcomp.quant import load_tensor_file

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def _files(tmp_path):
    torch.manual_seed(0)
    paths = {}
    paths["module"] = tmp_path / "module.pt"
    torch.save(Net(), paths["module"])
    paths["sequential"] = tmp_path / "seq.pth"
    torch.save(nn.Sequential(nn.Linear(4, 3)), paths["sequential"])
    paths["script"] = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(Net()), paths["script"])
    paths["traced"] = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(Net(), torch.randn(2, 4)), paths["traced"])
    return paths


@pytest.mark.parametrize("kind", ["module", "sequential", "script", "traced"])
@pytest.mark.parametrize("action", ["analyze", "quantize", "size"])
def test_one_line_and_exit_code_2(tmp_path, capsys, kind, action):
    path = _files(tmp_path)[kind]
    argv = ["weights", action, str(path)] + ([str(tmp_path / "out.safetensors")] if action == "quantize" else [])
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "\x1b" not in err and "weights_only=False" not in err
    assert "state_dict()" in lines[0]
    if kind in ("script", "traced"):
        assert "TorchScript" in lines[0] and "torch.jit.load" in lines[0]
    else:
        assert "pickled torch.nn.Module" in lines[0]
    assert not (tmp_path / "out.safetensors").exists()


def test_the_library_says_the_same_and_names_the_class(tmp_path):
    paths = _files(tmp_path)
    with pytest.raises(ValueError, match=r"pickled torch.nn.Module \(.*Net\)") as info:
        load_tensor_file(paths["module"])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"Sequential"):
        load_tensor_file(paths["sequential"])


def test_a_state_dict_still_loads(tmp_path):
    torch.save(Net().state_dict(), tmp_path / "sd.pt")
    assert set(load_tensor_file(tmp_path / "sd.pt")) == {"fc.weight", "fc.bias"}


def test_other_pickled_objects_get_one_line_too(tmp_path):
    import fractions

    torch.save({"w": torch.ones(2, 2), "extra": fractions.Fraction(1, 3)}, tmp_path / "odd.pt")
    with pytest.raises(ValueError) as info:
        load_tensor_file(tmp_path / "odd.pt")
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg and "fractions.Fraction" in msg
