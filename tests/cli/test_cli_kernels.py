"""``gradcomp weights kernels``: the route each quantized layer of a saved model runs, measured on this machine."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from gradcomp.cli import main
from gradcomp.quant import routes

pytestmark = pytest.mark.usefixtures("one_thread")

USER = textwrap.dedent('''
    import torch, torch.nn as nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))

    def batches():
        g = torch.Generator().manual_seed(1)
        return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]
''')


@pytest.fixture
def saved(tmp_path, monkeypatch):
    (tmp_path / "kern_user.py").write_text(USER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    sys.modules.pop("kern_user", None)
    sys.path.insert(0, str(tmp_path))
    import kern_user
    from gradcomp.quant import ActQuantConfig, WeightQuantConfig, quantize_, quantize_activations_, save_quantized

    m = kern_user.build()
    quantize_(m, WeightQuantConfig(bits=8))
    quantize_activations_(m, ActQuantConfig(bits=8, observer="mse"), kern_user.batches())
    save_quantized(m, tmp_path / "m.safetensors")
    sys.path.remove(str(tmp_path))
    sys.modules.pop("kern_user", None)
    routes._CACHE.clear()
    yield tmp_path
    routes._CACHE.clear()


def test_kernels_prints_every_layer_with_its_route(saved, capsys):
    code = main(["weights", "kernels", "m.safetensors", "--model", "kern_user:build", "--data", "kern_user:batches", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "threads=1" in out and "| 0 | conv2d | int8-channel | A8 mse | 8x3x8x8 | int8 |" in out
    assert "| 3 | linear |" in out and "the same layers in fp32" in out


def test_kernels_json_and_cache(saved, capsys):
    code = main(["weights", "kernels", "m.safetensors", "--model", "kern_user:build", "--data", "kern_user:batches",
                 "--json", "--cache", "routes.json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert {r["layer"] for r in doc["layers"]} == {"0", "3"} and doc["machine"]["cpu"]
    for r in doc["layers"]:
        assert r["route"] in r["times_ms"] and r["source"] == "measured"
    assert (saved / "routes.json").exists()
    routes._CACHE.clear()
    code = main(["weights", "kernels", "m.safetensors", "--model", "kern_user:build", "--data", "kern_user:batches",
                 "--json", "--cache", "routes.json"])
    doc = json.loads(capsys.readouterr()[0])
    assert code == 0 and {r["source"] for r in doc["layers"]} == {"cache"}


def test_kernels_refuses_a_file_that_does_not_fit(saved, capsys):
    torch.save(torch.nn.Linear(2, 2).state_dict(), saved / "plain.pt")
    code = main(["weights", "kernels", "plain.pt", "--model", "kern_user:build", "--data", "kern_user:batches"])
    err = capsys.readouterr()[1]
    assert code == 2 and "plain.pt is not a readable safetensors file" in err and len(err.strip().splitlines()) == 1


CONV_USER = textwrap.dedent('''
    import torch, torch.nn as nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))

    def batches():
        g = torch.Generator().manual_seed(1)
        return [torch.randn(4, 3, 10, 10, generator=g) for _ in range(2)]
''')


def test_quantize_covers_convolutions_and_strict_refuses_what_a_method_skips(tmp_path, monkeypatch, capsys):
    (tmp_path / "conv_user.py").write_text(CONV_USER)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("conv_user", None)
    sys.path.insert(0, str(tmp_path))
    import conv_user

    torch.save(conv_user.build().state_dict(), tmp_path / "c.pt")
    sys.path.remove(str(tmp_path))
    sys.modules.pop("conv_user", None)
    common = ["--bits", "4", "--granularity", "per_channel", "--model", "conv_user:build", "--data", "conv_user:batches",
              "--no-progress", "--strict"]
    assert main(["weights", "quantize", "c.pt", "g.safetensors", "--method", "gptq", *common]) == 0
    capsys.readouterr()
    code = main(["weights", "quantize", "c.pt", "s.safetensors", "--method", "awq_scale", *common])
    err = capsys.readouterr()[1]
    assert code == 2 and "does not cover 2 layers (strict=True): '0'" in err and not (tmp_path / "s.safetensors").exists()
