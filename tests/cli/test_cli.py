"""The ``gradcomp`` command line: top-level behaviour, and the cost, grads and doctor subcommands."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from gradcomp.cli import _units as units
from gradcomp.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------
# top level


def test_help_lists_the_subcommands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for cmd in ("cost", "grads", "doctor"):
        assert cmd in out
    assert "exit codes" in out


def test_missing_and_unknown_command_exit_2(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "COMMAND" in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice: 'frobnicate'" in err


def test_module_entry_point_runs_in_a_fresh_process():
    r = subprocess.run([sys.executable, "-m", "gradcomp.cli", "cost", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--bandwidth" in r.stdout and "pays below" not in r.stderr


def test_python_dash_m_gradcomp_is_the_command():
    r = subprocess.run([sys.executable, "-m", "gradcomp", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: gradcomp") and "exit codes" in r.stdout
    r = subprocess.run([sys.executable, "-m", "gradcomp", "frobnicate"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice: 'frobnicate'" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------
# cost


COST = ("cost", "--params", "7e9", "--workers", "8", "--bandwidth", "10gbit", "--codec-throughput", "200GB/s")


def test_cost_table(capsys):
    code, out, _ = run(capsys, *COST)
    assert code == 0
    assert "| ring-fp32 | 49 GB |" in out
    assert "twophase-int8" in out and "allgather-int8" in out and "hier-int8" not in out
    assert "pays below" in out and "fastest here" in out


def test_cost_json_and_plot(capsys, tmp_path):
    png = tmp_path / "cost.png"
    code, out, _ = run(capsys, *COST, "--nodes", "2", "--json", "--plot", str(png))
    assert code == 0
    data = json.loads(out)
    by = {s["scheme"]: s for s in data["schemes"]}
    assert by["ring-fp32"]["bytes_per_rank"] == pytest.approx(49e9)
    assert "hier-int4" in by and data["cluster"]["nodes"] == 2
    assert data["codec"]["quantize_elements_per_s"] == pytest.approx(50e9)
    assert by["ring-bf16"]["break_even_bandwidth_bytes_per_s"] == "inf"
    assert by["ring-fp32"]["break_even_bandwidth_bytes_per_s"] is None  # the baseline itself
    assert png.stat().st_size > 10_000


def test_cost_measures_the_codec_by_default(capsys):
    code, out, _ = run(capsys, "cost", "--params", "1e6", "--workers", "4", "--bandwidth", "1gbit",
                       "--schemes", "ring-fp32,twophase-int4")
    assert code == 0
    assert "measured: int8" in out and "twophase-int4" in out and "tree-fp32" not in out
    # where the throughput came from is said on stdout, with what a CPU figure means for GPU training
    from gradcomp.codec import kernels

    device = "CUDA" if torch.cuda.is_available() else "CPU"
    assert f"MEASURED on this machine's {device} [measured: int8" in out and kernels.backend(device.lower()) in out
    if device == "CPU":
        assert "note: a CPU codec; for GPU training give the GPU's codec throughput with --codec-throughput" in out


def test_cost_pipelines_in_the_hooks_own_chunks_by_default(capsys):
    from gradcomp.comm.plan import chunk_numel_for

    def latency(*extra):
        code, out, _ = run(capsys, "cost", "--params", "7e9", "--workers", "8", "--bandwidth", "10gbit",
                           "--codec-throughput", "500GB/s", "--schemes", "twophase-int8", "--json", *extra)
        assert code == 0
        return json.loads(out)["schemes"][0]["latency_s"]

    chunks = math.ceil(7e9 / chunk_numel_for(8))  # the hook's default: 2**20 values per rank
    assert latency() == pytest.approx(chunks * 2 * 7 * 5e-6, rel=0.01)
    assert latency("--chunk-numel", "1048576") == pytest.approx(math.ceil(7e9 / 1048576) * 2 * 7 * 5e-6, rel=0.01)


def test_cost_says_a_given_codec_throughput_is_assumed(capsys):
    code, out, _ = run(capsys, *COST)
    assert code == 0
    assert "codec: 200 GB/s quantize, 200 GB/s dequantize of fp32 input, ASSUMED (given with --codec-throughput)" in out
    code, out, _ = run(capsys, *COST, "--json")
    assert json.loads(out)["codec"]["origin"] == "given"
    code, out, _ = run(capsys, "cost", "--params", "7e9", "--workers", "8", "--bandwidth", "10gbit", "--no-codec")
    assert "codec: not counted (--no-codec)" in out


@pytest.mark.parametrize("args,needle", [
    (("--bandwidth", "10gigs"), "argument --bandwidth"),
    (("--bandwidth", "10"), "argument --bandwidth"),
    (("--latency", "5"), "argument --latency"),
    (("--params", "seven"), "argument --params"),
    (("--workers", "0"), "argument --workers"),
    (("--nodes", "3"), "workers must be a multiple of nodes"),
    (("--schemes", "ring-fp32,warp-int8"), "--schemes"),
    (("--plot", "x.jpg"), "argument --plot: expected a .png file"),
    (("--plot", "/nonexistent/dir/x.png"), "argument --plot: the folder of '/nonexistent/dir/x.png' does not exist"),
    (("--codec-throughput", "fast"), "argument --codec-throughput"),
])
def test_cost_bad_input_names_the_argument(capsys, args, needle):
    base = {"--params": "7e9", "--workers": "8", "--bandwidth": "10gbit"}
    extra = []
    for k, v in zip(args[::2], args[1::2]):
        if k in base:
            base[k] = v
        else:
            extra += [k, v]
    argv = ["cost", "--no-codec"] if "--codec-throughput" not in args else ["cost"]
    for k, v in base.items():
        argv += [k, v]
    code, _, err = run(capsys, *argv, *extra)
    assert code == 2
    assert needle in err


def test_cost_advises_the_fastest_scheme_within_an_error_budget(capsys, tmp_path):
    from gradcomp.analysis import gradexp as gx

    schemes = "ring-fp32,twophase-int8,twophase-int4,twophase-int4r,twophase-int2r,twophase-mxfp4"
    base = ("cost", "--params", "20M", "--workers", "2", "--bandwidth", "1gbit", "--codec-throughput", "200GB/s", "--schemes", schemes)
    code, out, err = run(capsys, *base, "--error-budget", "0.2", "--json")
    assert code == 0, err
    data = json.loads(out)
    errors = {s["scheme"]: s["rel_error"] for s in data["schemes"]}
    assert errors["ring-fp32"] == 0 and errors["twophase-int8"] < 0.01 < errors["twophase-int4r"] < 0.2 < errors["twophase-int2r"]
    assert data["error_budget"]["errors_on"] == "2**20 Gaussian values"
    # int2r is the fastest at 1 Gbit/s but over the budget: the advice is the next one within it
    within = data["error_budget"]["fastest_within"]
    assert within != "twophase-int2r" and errors[within] <= 0.2
    assert min(data["schemes"], key=lambda s: s["total_s"])["scheme"] == "twophase-int2r"
    code, out, _ = run(capsys, *base, "--error-budget", "0.2")
    assert f"fastest within the error budget 0.2 (relative error on 2**20 Gaussian values): {within}" in out and "(over)" in out
    # on a gradient trace: its own errors
    g = torch.Generator().manual_seed(0)
    trace = gx.GradientTrace(["w"], [(64, 64)], torch.randn(2, 2, 4096, generator=g) * torch.rand(4096, generator=g) ** 4)
    trace.save(tmp_path / "t.safetensors")
    code, out, err = run(capsys, *base, "--error-budget", "0.2", "--grads", str(tmp_path / "t.safetensors"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["error_budget"]["errors_on"].startswith("the gradients of")
    heavy = {s["scheme"]: s["rel_error"] for s in data["schemes"]}
    assert heavy["twophase-int4r"] < heavy["twophase-int4"]  # heavy-tailed values: the rotation pays
    for bad, needle in ((("--error-budget", "0"), "argument --error-budget"),
                        (("--error-budget", "0.2", "--grads", str(tmp_path / "missing.safetensors")), "argument --grads")):
        code, _, err = run(capsys, *base, *bad)
        assert code == 2 and needle in err, err


def test_cost_requires_its_arguments(capsys):
    code, _, err = run(capsys, "cost", "--params", "7e9")
    assert code == 2 and "--workers" in err and "--bandwidth" in err


# --------------------------------------------------------------------------------------------
# doctor


def test_doctor_json(capsys):
    code, out, _ = run(capsys, "doctor", "--json", "--no-netns")
    assert code == 0
    rep = json.loads(out)
    assert rep["torch"] == torch.__version__
    assert rep["distributed"]["gloo"] is True
    assert rep["cuda"]["available"] == torch.cuda.is_available()
    assert set(rep["emulated_cluster"]) >= {"root", "ip", "tc", "netns", "can_run"}
    assert rep["required_missing"] == []


def test_doctor_table_and_require(capsys):
    code, out, _ = run(capsys, "doctor", "--no-netns", "--require", "gloo")
    assert code == 0 and "| gloo | yes |" in out and "emulated cluster" in out
    # --no-netns skips the namespace check, so the emulated cluster counts as unavailable
    code, _, err = run(capsys, "doctor", "--no-netns", "--require", "netns")
    assert code == 3 and "netns" in err
    code, _, err = run(capsys, "doctor", "--require", "teleport")
    assert code == 2 and "argument --require" in err


# --------------------------------------------------------------------------------------------
# grads


def test_grads_streaming_on_tinygpt(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    code, out, err = run(capsys, "grads", "--init", "random", "--steps", "2", "--workers", "2", "--batch-size", "2",
                         "--bits", "8", "--rounding", "nearest", "--error-feedback", "on,off", "--top", "3",
                         "--out", str(out_json), "--no-progress")
    assert code == 0, err
    assert "int8 b256 nearest ef" in out and "int8 b256 nearest no-ef" in out
    assert "relative error per layer (the 3 worst of" in out and "relative error per DDP bucket" in out
    data = json.loads(out_json.read_text())
    assert data["meta"]["workers"] == 2 and data["meta"]["steps"] == 2
    assert len(data["summary"]) == 2 and data["summary"][0]["rel_error"] < 0.1


def test_grads_trace_roundtrip_json_and_plots(capsys, tmp_path):
    from gradcomp.analysis import gradexp as gx

    g = torch.Generator().manual_seed(0)
    trace = gx.GradientTrace(["a.weight", "a.bias"], [(64, 16), (16,)], torch.randn(3, 2, 64 * 16 + 16, generator=g))
    trace.save(tmp_path / "t.safetensors")
    code, out, err = run(capsys, "grads", "--load-trace", str(tmp_path / "t.safetensors"), "--replay-steps", "5",
                         "--format", "int4,int2", "--block-sizes", "32", "--json", "--plot-dir", str(tmp_path / "p"), "--no-progress")
    assert code == 0, err
    data = json.loads(out)
    assert data["meta"]["steps"] == 5 and data["meta"]["captured_steps"] == 3
    assert {r["bits"] for r in data["summary"]} == {4, 2} and len(data["summary"]) == 8
    assert len(data["plots"]) == 3
    for p in data["plots"]:
        assert (tmp_path / "p" / p.split("/")[-1]).stat().st_size > 5_000


@pytest.mark.parametrize("args,needle", [
    (("--bits", "3"), "--bits must be a comma-separated list of (8, 4, 2)"),
    (("--bits", "eight"), "--bits"),
    (("--format", "int5"), "--format must be a comma-separated list of ('int8', 'int4', 'int2', 'fp8_e4m3', 'fp8_e5m2'"),
    (("--format", "int8", "--bits", "8"), "give --bits or --format, not both"),
    (("--rounding", "up"), "--rounding"),
    (("--error-feedback", "maybe"), "--error-feedback"),
    (("--block-sizes", "6", "--bits", "2"), "--block-sizes"),
    (("--load-trace", "/nonexistent/t.safetensors"), "--load-trace: no such file"),
    (("--model", "no_such_module_xyz:build", "--data", "x:y"), "--model: cannot import module"),
    (("--model", "torch.nn:Linear"), "--model needs --data"),
    (("--model", "torch.nn"), "--model must look like MODULE:NAME"),
    (("--data", "x:y"), "--data and --loss go with --model"),
    (("--lr", "-1"), "argument --lr: expected a number >= 0"),
    (("--steps", "0"), "argument --steps"),
    (("--out", "/nonexistent/dir/r.json"), "argument --out: the folder"),
])
def test_grads_bad_input_names_the_argument(capsys, args, needle):
    code, _, err = run(capsys, "grads", "--init", "random", "--no-progress", *args)
    assert code == 2
    assert needle in err


def test_grads_replays_the_rotated_fp8_and_mx_formats(capsys, tmp_path):
    from gradcomp.analysis import gradexp as gx

    g = torch.Generator().manual_seed(1)
    trace = gx.GradientTrace(["a.weight", "a.bias"], [(64, 16), (16,)], torch.randn(3, 2, 64 * 16 + 16, generator=g))
    trace.save(tmp_path / "t.safetensors")
    names = "int4,int4r,int2r,fp8_e4m3,mxfp4,mxfp4r"
    code, out, err = run(capsys, "grads", "--load-trace", str(tmp_path / "t.safetensors"), "--format", names,
                         "--block-sizes", "64", "--rounding", "nearest", "--error-feedback", "off", "--json", "--no-progress")
    assert code == 0, err
    rows = {r["format"]: r for r in json.loads(out)["summary"]}
    assert set(rows) == set(names.split(","))
    assert rows["fp8_e4m3"]["sqnr_db"] > rows["int4"]["sqnr_db"] > rows["int2r"]["sqnr_db"] > 5
    code, _, err = run(capsys, "grads", "--load-trace", str(tmp_path / "t.safetensors"), "--format", "int4r", "--block-sizes", "96",
                       "--no-progress")
    assert code == 2 and "power of two" in err, err


def test_grads_bad_trace_file(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    code, _, err = run(capsys, "grads", "--load-trace", str(bad))
    assert code == 2 and "not a gradient trace" in err


def test_grads_with_your_own_model_and_data(capsys, tmp_path, monkeypatch):
    (tmp_path / "mymodels_gc.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))\n"
        "def batch(step, worker):\n"
        "    g = torch.Generator().manual_seed(step * 10 + worker)\n"
        "    return torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)\n"
        "def loss(model, batch):\n"
        "    x, y = batch\n"
        "    return ((model(x) - y) ** 2).mean()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run(capsys, "grads", "--model", "mymodels_gc:build", "--data", "mymodels_gc:batch",
                         "--loss", "mymodels_gc:loss", "--steps", "3", "--workers", "3", "--bits", "8",
                         "--rounding", "nearest", "--error-feedback", "on", "--json", "--no-progress")
    assert code == 0, err
    data = json.loads(out)
    assert data["meta"]["params"] == 8 * 16 + 16 + 16 + 1 and data["meta"]["workers"] == 3
    assert [r["layer"] for r in data["per_layer"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # without --loss the model's output is not a loss: the error says what to do
    code, _, err = run(capsys, "grads", "--model", "mymodels_gc:build", "--data", "mymodels_gc:batch", "--steps", "1")
    assert code == 2 and "calling the model as model(*batch) failed" in err and "pass loss_fn" in err


def test_every_subcommand_has_help_and_json():
    import argparse

    from gradcomp.cli import build_parser

    def leaves(p, prefix):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield prefix, p
            return
        for name, child in subs[0].choices.items():
            yield from leaves(child, f"{prefix} {name}")

    found = dict(leaves(build_parser(), "gradcomp"))
    assert {"gradcomp cost", "gradcomp grads", "gradcomp doctor"} <= set(found)
    for name, p in found.items():
        flags = {s for a in p._actions for s in a.option_strings}
        assert "--json" in flags, f"{name} has no --json"
        assert p.description or p.format_help(), f"{name} has no help"


def test_grads_save_trace_then_replay_it(capsys, tmp_path):
    trace = tmp_path / "g.safetensors"
    code, out, err = run(capsys, "grads", "--init", "random", "--steps", "2", "--workers", "2", "--batch-size", "2",
                         "--bits", "4", "--rounding", "nearest", "--error-feedback", "on", "--save-trace", str(trace),
                         "--replay-steps", "4", "--json", "--no-progress")
    assert code == 0, err
    first = json.loads(out)
    assert first["meta"]["steps"] == 4 and first["meta"]["captured_steps"] == 2 and trace.exists()
    code, out, err = run(capsys, "grads", "--load-trace", str(trace), "--replay-steps", "4", "--bits", "4",
                         "--rounding", "nearest", "--error-feedback", "on", "--json", "--no-progress")
    assert code == 0, err
    again = json.loads(out)
    assert again["summary"][0]["rel_error"] == first["summary"][0]["rel_error"]  # same gradients, same numbers
    assert again["meta"]["trace"]["model"] == "TinyGPT small (random)"


def test_a_command_that_cannot_load_does_not_break_the_others(capsys, monkeypatch):
    import pkgutil

    import gradcomp.cli as cli

    real = pkgutil.iter_modules

    def with_broken(path):
        yield from real(path)
        yield pkgutil.ModuleInfo(None, "zz_missing_cmd", False)

    monkeypatch.setattr(cli.pkgutil, "iter_modules", with_broken)
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "zz_missing_cmd" in out and "cost" in out
    code, _, err = run(capsys, "zz_missing_cmd")
    assert code == 3 and "could not be loaded" in err


def test_calibrate_names_take_layer_patterns(capsys):
    code, _, err = run(capsys, "calibrate", "--names", "re:((", "--json")
    assert code == 2 and "--names" in err and "invalid regular expression" in err


# --------------------------------------------------------------------------------------------
# units (gradcomp.cli._units)


@pytest.mark.parametrize("text,want", [
    ("10gbit", 1.25e9), ("10Gbit/s", 1.25e9), ("100mbit", 12.5e6), ("10gbps", 1.25e9), ("10Gb/s", 1.25e9),
    ("25GB/s", 25e9), ("1GiB/s", 2**30), ("3.5MB/s", 3.5e6), ("1e9B/s", 1e9), ("800 kbit", 1e5),
])
def test_parse_bandwidth(text, want):
    assert units.parse_bandwidth(text) == pytest.approx(want)


@pytest.mark.parametrize("text", ["10", "10gigs", "-5gbit", "0gbit", "gbit", "10 GB", "1e999gbit", ""])
def test_parse_bandwidth_rejects_and_names_the_argument(text):
    with pytest.raises(ValueError, match="--bandwidth"):
        units.parse_bandwidth(text, "--bandwidth")


def test_parsers_for_durations_counts_and_sizes():
    assert units.parse_duration("5us") == pytest.approx(5e-6)
    assert units.parse_duration("0.5ms") == pytest.approx(5e-4)
    assert units.parse_duration("2s") == 2.0 and units.parse_duration("0") == 0.0
    assert units.parse_duration("100ns") == pytest.approx(1e-7)
    assert units.parse_count("7e9") == 7_000_000_000 and units.parse_count("7B") == 7_000_000_000
    assert units.parse_count("350M") == 350_000_000 and units.parse_count("1_000") == 1000
    assert units.parse_bytes("25MB") == 25_000_000 and units.parse_bytes("1MiB") == 1 << 20
    for bad, fn, name in [("5", units.parse_duration, "--latency"), ("5 parsecs", units.parse_duration, "--latency"),
                          ("abc", units.parse_count, "--params"), ("0", units.parse_count, "--params"),
                          ("-3", units.parse_count, "--params"), ("25", units.parse_bytes, "--size")]:
        with pytest.raises(ValueError, match=name):
            fn(bad, name)
    with pytest.raises(TypeError):
        units.parse_bandwidth(10)


def test_formatters():
    assert units.format_bandwidth(1.25e9) == "10 Gbit/s"
    assert units.format_bandwidth(math.inf) == "any" and units.format_bandwidth(0.0) == "never"
    assert units.format_bytes(4.9e10) == "49 GB"
    assert units.format_duration(0.0123) == "12.3 ms" and units.format_duration(5e-6) == "5 us"
