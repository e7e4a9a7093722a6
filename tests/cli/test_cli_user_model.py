"""The CLI on a user's own model and checkpoint: nested state dicts, --key, --plan, data-aware methods, imports from cwd."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn as nn

from gradcomp.cli import main
from gradcomp.quant import load_quantized_state_dict, load_tensor_file

USER_MODULE = textwrap.dedent('''
    import torch, torch.nn as nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 32))

    def batches():
        g = torch.Generator().manual_seed(1)
        mix = torch.randn(64, 64, generator=g)
        return [torch.randn(32, 64, generator=g) @ mix for _ in range(4)]
''')


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A directory with the user's model file, as the current directory (no PYTHONPATH)."""
    (tmp_path / "user_model_cli.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    import sys

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    sys.modules.pop("user_model_cli", None)
    return tmp_path


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 32))


def test_nested_checkpoints_are_found_or_named(tmp_path):
    sd = _model().state_dict()
    nested = tmp_path / "ckpt.pth.tar"
    torch.save({"model": {"state_dict": sd, "model_args": {"width": 64}}, "optimizer": {"state": {}, "lr": torch.tensor(0.1)}, "epoch": 3}, nested)
    got = load_tensor_file(nested)
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert set(load_tensor_file(nested, key="model.state_dict")) == set(sd)
    with pytest.raises(ValueError, match="no entry 'weights'"):
        load_tensor_file(nested, key="model.weights")
    lightning = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 10}, lightning)
    assert set(load_tensor_file(lightning, strip_prefix="model.")) == set(sd)


def test_cli_quantizes_a_nested_checkpoint(tmp_path, capsys):
    nested = tmp_path / "ckpt.pth.tar"
    torch.save({"model": {"state_dict": _model().state_dict(), "model_args": {}}}, nested)
    assert main(["weights", "analyze", str(nested), "--json", "--no-progress"]) == 0
    assert len(json.loads(capsys.readouterr().out)["layers"]) >= 2
    out = tmp_path / "q.safetensors"
    assert main(["weights", "quantize", str(nested), str(out), "--key", "model.state_dict", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["quantized_layers"] == 2
    assert main(["weights", "quantize", str(nested), str(tmp_path / "x.safetensors"), "--key", "nope"]) == 2


def test_cli_quantize_from_a_plan(tmp_path, capsys):
    sd_file = tmp_path / "m.pt"
    torch.save(_model().state_dict(), sd_file)
    from gradcomp.analysis.mixed_precision import plan_from_rules
    from gradcomp.quant import WeightQuantConfig

    p = plan_from_rules(_model(), [("0", WeightQuantConfig(bits=4, granularity="per_group", group_size=32)), ("2", WeightQuantConfig(bits=8))])
    p.to_json(tmp_path / "plan.json")
    out = tmp_path / "q.safetensors"
    assert main(["weights", "quantize", str(sd_file), str(out), "--plan", str(tmp_path / "plan.json"), "--json", "--no-progress"]) == 0
    layers = {r["layer"]: r["config"] for r in json.loads(capsys.readouterr().out)["layers"]}
    assert layers == {"0": "int4-g32", "2": "int8-channel"}
    _, configs = load_quantized_state_dict(out)
    assert {k: v.name for k, v in configs.items()} == layers


def test_cli_data_aware_method_with_a_model_from_the_current_directory(user_dir, capsys):
    import importlib

    sd_file = user_dir / "m.pt"
    torch.save(_model().state_dict(), sd_file)
    common = ["--bits", "4", "--granularity", "per_group", "--group-size", "32", "--json", "--no-progress"]
    assert main(["weights", "quantize", str(sd_file), "rtn.safetensors", *common]) == 0
    rtn = json.loads(capsys.readouterr().out)
    assert main(["weights", "quantize", str(sd_file), "gptq.safetensors", *common, "--method", "gptq",
                 "--model", "user_model_cli:build", "--data", "user_model_cli:batches"]) == 0
    gq = json.loads(capsys.readouterr().out)
    assert gq["summary"]["output_tensor_bytes"] == rtn["summary"]["output_tensor_bytes"]
    # same format; better on the layer outputs of the calibration inputs
    user = importlib.import_module("user_model_cli")
    model = user.build()
    a, _ = load_quantized_state_dict(user_dir / "rtn.safetensors")
    b, _ = load_quantized_state_dict(user_dir / "gptq.safetensors")
    x = torch.cat(user.batches())
    err = {}
    with torch.no_grad():
        ref = model(x)
        for name, sd in (("rtn", a), ("gptq", b)):
            m = user.build()
            m.load_state_dict(sd)
            err[name] = float(((m(x) - ref) ** 2).mean())
    assert err["gptq"] < err["rtn"]
    assert main(["weights", "quantize", str(sd_file), "y.safetensors", "--method", "gptq"]) == 2   # no --model/--data


def test_calibrate_saves_scales_that_load_back(user_dir, capsys):
    import importlib

    from gradcomp.quant.activation_quant import load_activation_scales_

    scales = user_dir / "scales.safetensors"
    assert main(["calibrate", "--model", "user_model_cli:build", "--data", "user_model_cli:batches", "--observer", "minmax",
                 "--batches", "4", "--save", str(scales), "--json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    user = importlib.import_module("user_model_cli")
    fresh = user.build()
    names = load_activation_scales_(fresh, scales)
    assert sorted(names) == sorted(r["layer"] for r in doc["layers"]) == ["0", "2"]
    by_name = {r["layer"]: r for r in doc["layers"]}
    assert float(fresh[0].input_quantizer.scale) == pytest.approx(by_name["0"]["scale"], rel=1e-5)
    x = torch.cat(user.batches())
    with torch.no_grad():
        assert not torch.equal(fresh(x), user.build()(x))     # inputs are fake-quantized now
    assert main(["calibrate", "--model", "user_model_cli:build", "--data", "user_model_cli:batches", "--dynamic",
                 "--save", str(user_dir / "x.safetensors"), "--no-progress"]) == 2


def test_activation_plots_show_every_layer(tmp_path):
    pytest.importorskip("matplotlib")
    from gradcomp.plots.activations import _grid, _pick

    class R:
        layers = {f"l{i}:input": None for i in range(51)}

    assert len(_pick(R(), None, None)) == 51
    rows, cols = _grid(51)
    assert rows * cols >= 51 and cols == 8


def test_plan_evaluate_with_a_user_metric(user_dir, capsys):
    (user_dir / "user_task_cli.py").write_text(textwrap.dedent('''
        import torch
        from user_model_cli import batches, build

        def task():
            return build(), batches()

        def error(model):                       # deviation from the fp32 model: 0 for the model itself
            ref = build()
            with torch.no_grad():
                return float(sum(((model(x) - ref(x)) ** 2).mean() for x in batches()))
    '''))
    import sys

    sys.modules.pop("user_task_cli", None)
    scores = user_dir / "s.json"
    assert main(["sensitivity", "--model", "user_task_cli:task", "--candidates", "int2-channel,int8-channel",
                 "--out", str(scores), "--no-progress", "--json"]) == 0
    capsys.readouterr()
    assert main(["plan", "--scores", str(scores), "--avg-bits", "5", "--evaluate", "--model", "user_task_cli:task",
                 "--eval", "user_task_cli:error", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)["evaluation"]
    assert ev["base_loss"] == 0.0 and ev["loss"] > 0.0 and ev["bytes"] < ev["base_bytes"]
    assert main(["plan", "--scores", str(scores), "--avg-bits", "5", "--evaluate"]) == 2   # own model, no --model/--eval


def test_cli_hqq_without_data_and_awq_scale_sequential(user_dir, capsys):
    sd_file = user_dir / "m.pt"
    torch.save(_model().state_dict(), sd_file)
    common = ["--bits", "4", "--granularity", "per_group", "--group-size", "32", "--json", "--no-progress"]
    assert main(["weights", "quantize", str(sd_file), "rtn.safetensors", *common]) == 0
    rtn = json.loads(capsys.readouterr().out)["summary"]
    assert main(["weights", "quantize", str(sd_file), "hqq.safetensors", *common, "--method", "hqq", "--model", "user_model_cli:build"]) == 0
    hqq = json.loads(capsys.readouterr().out)["summary"]
    assert hqq["output_tensor_bytes"] == rtn["output_tensor_bytes"]       # same format, other scale values
    assert main(["weights", "quantize", str(sd_file), "awq.safetensors", *common, "--method", "awq_scale", "--sequential", "2",
                 "--model", "user_model_cli:build", "--data", "user_model_cli:batches"]) == 0
    awq = json.loads(capsys.readouterr().out)["summary"]
    assert awq["output_tensor_bytes"] >= rtn["output_tensor_bytes"]       # plus 4 bytes per input channel of scaled layers
    for name in ("hqq", "awq"):
        sd, configs = load_quantized_state_dict(user_dir / f"{name}.safetensors")
        assert set(configs) and all(torch.isfinite(t).all() for t in sd.values() if t.is_floating_point())
    assert main(["weights", "quantize", str(sd_file), "z.safetensors", "--method", "awq_scale", "--model", "user_model_cli:build"]) == 2


def test_cli_autoround_trains_against_the_model_output(user_dir, capsys):
    import importlib

    sd_file = user_dir / "m.pt"
    torch.save(_model().state_dict(), sd_file)
    common = ["--bits", "3", "--granularity", "per_group", "--group-size", "32", "--json", "--no-progress"]
    data = ["--model", "user_model_cli:build", "--data", "user_model_cli:batches"]
    assert main(["weights", "quantize", str(sd_file), "rtn.safetensors", *common]) == 0
    rtn = json.loads(capsys.readouterr().out)["summary"]
    assert main(["weights", "quantize", str(sd_file), "ar.safetensors", *common, "--method", "autoround", "--steps", "30",
                 "--holdout", "1", *data]) == 0
    ar = json.loads(capsys.readouterr().out)["summary"]
    assert ar["output_tensor_bytes"] == rtn["output_tensor_bytes"]
    user = importlib.import_module("user_model_cli")
    x = user.batches()[-1]   # the held-out batch: it only picked the best step
    err = {}
    with torch.no_grad():
        ref = user.build()(x)
        for name in ("rtn", "ar"):
            m = user.build()
            m.load_state_dict(load_quantized_state_dict(user_dir / f"{name}.safetensors")[0])
            err[name] = float(((m(x) - ref) ** 2).mean())
    assert err["ar"] < err["rtn"]
    assert main(["weights", "quantize", str(sd_file), "y.safetensors", *common, "--steps", "5"]) == 2      # not autoround
    assert main(["weights", "quantize", str(sd_file), "y.safetensors", *common, "--method", "autoround", "--steps", "-1", *data]) == 2
    assert main(["weights", "quantize", str(sd_file), "y.safetensors", *common, "--method", "autoround", "--holdout", "4", *data]) == 2
    # --output-weights: autoround only, NAME=W with W >= 0, names the model's outputs (a plain tensor is "output")
    assert main(["weights", "quantize", str(sd_file), "y.safetensors", *common, "--output-weights", "output=2"]) == 2
    for bad in ("output", "output=-1", "output=x", "output=1,output=2"):
        assert main(["weights", "quantize", str(sd_file), "y.safetensors", *common, "--method", "autoround", "--steps", "2",
                     "--output-weights", bad, *data]) == 2, bad
    assert main(["weights", "quantize", str(sd_file), "y.safetensors", *common, "--method", "autoround", "--steps", "2",
                 "--output-weights", "energy=2", *data]) == 2
    capsys.readouterr()
    assert main(["weights", "quantize", str(sd_file), "w.safetensors", *common, "--method", "autoround", "--steps", "2",
                 "--output-weights", "output=2", *data]) == 0
    assert not (user_dir / "y.safetensors").exists()
