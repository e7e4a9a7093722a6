"""Worked example: quantize CHGNet, a pretrained interatomic potential nobody tuned gradcomp for.

CHGNet 0.3.0 (412k parameters, 51 Linear layers and an Embedding) ships its weights inside the PyPI
wheel ``chgnet==0.4.2``; the structures are built here from ``ase.collections.dcdft`` (the elemental
crystals of the Delta-code benchmark) and textbook binary compounds, as small perturbed supercells.
Every figure is a mean absolute deviation from the fp32 model itself (energy per atom, forces,
stress, magnetic moments), on structures not used for calibration.

    pip install chgnet==0.4.2        # not a gradcomp dependency
    python examples/chgnet_quantize.py [--quick] [--out chgnet_results.json]

Sections: (1) weight-only int8 and int4 with round-to-nearest vs GPTQ vs activation-aware clipping;
(2) the knapsack plan at 4.5 bits vs uniform int4, from a sensitivity run that scores every output;
(3) dynamic W8A8 with the straight-through estimator (forces and stress are gradients of the energy);
(1g) AutoRound, trained against all four outputs, vs round-to-nearest and awq_clip;
(1h) AutoRound on 2679 calibration structures (2430 of them generated: ``--pool-cache`` keeps them).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from typing import Any, Dict, List

import numpy as np
import torch

import gradcomp.quant as q
from gradcomp.analysis.mixed_precision import allocate_bits, uniform_plan
from gradcomp.quant.activation_quant import prepare_activation_quant_
from gradcomp.quant.algorithms import GPTQ, HQQ, AutoRound
from gradcomp.quant.configs import ActQuantConfig
from gradcomp.analysis.sensitivity import SensitivityConfig, measure_sensitivity

OUTPUTS = {"e": ("energy", "meV/atom", 1000.0), "f": ("forces", "meV/A", 1000.0), "s": ("stress", "GPa", 1.0), "m": ("magmom", "mu_B", 1.0)}

# textbook binary compounds: (formula, prototype, lattice constant in Angstrom)
COMPOUNDS = [
    ("NaCl", "rocksalt", 5.64), ("MgO", "rocksalt", 4.21), ("LiF", "rocksalt", 4.03), ("KCl", "rocksalt", 6.29),
    ("CaO", "rocksalt", 4.81), ("NiO", "rocksalt", 4.18), ("FeO", "rocksalt", 4.33), ("TiN", "rocksalt", 4.24),
    ("GaAs", "zincblende", 5.65), ("ZnS", "zincblende", 5.41), ("SiC", "zincblende", 4.36), ("InP", "zincblende", 5.87),
    ("AlP", "zincblende", 5.46), ("CuCl", "zincblende", 5.41), ("CsCl", "cscl", 4.12), ("NiAl", "cscl", 2.88),
    ("FeAl", "cscl", 2.91), ("CuZn", "cscl", 2.95), ("CaF2", "fluorite", 5.46), ("Li2O", "fluorite", 4.61),
    ("CeO2", "fluorite", 5.41), ("ZrO2", "fluorite", 5.07), ("MnO", "rocksalt", 4.44), ("CoO", "rocksalt", 4.26),
    ("AlN", "zincblende", 4.38), ("BN", "zincblende", 3.62), ("GaN", "zincblende", 4.50), ("ZnSe", "zincblende", 5.67),
]


def compound(formula: str, proto: str, a: float):
    from pymatgen.core import Lattice, Structure
    from pymatgen.core.composition import Composition

    els = [str(e) for e in Composition(formula).elements]
    if proto == "cscl":
        return Structure(Lattice.cubic(a), els, [[0, 0, 0], [0.5, 0.5, 0.5]])
    if proto == "rocksalt":
        return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), els, [[0, 0, 0], [0.5, 0.5, 0.5]]).get_primitive_structure()
    if proto == "zincblende":
        return Structure.from_spacegroup("F-43m", Lattice.cubic(a), els, [[0, 0, 0], [0.25, 0.25, 0.25]]).get_primitive_structure()
    # fluorite: cation at 4a, anion at 8c
    comp = Composition(formula)
    cat = [str(e) for e in comp if comp[e] == 1][0]
    an = [str(e) for e in comp if comp[e] == 2][0]
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [cat, an], [[0, 0, 0], [0.25, 0.25, 0.25]]).get_primitive_structure()


def structures(seed: int = 0) -> List[Any]:
    """Elemental crystals of dcdft and the binary compounds above, as perturbed supercells of 8-32 atoms."""
    from ase.collections import dcdft
    from pymatgen.io.ase import AseAtomsAdaptor

    rng = np.random.default_rng(seed)
    out = []
    for name in dcdft.names:
        s = AseAtomsAdaptor.get_structure(dcdft[name])
        out.append((name, s))
    out += [(f, compound(f, p, a)) for f, p, a in COMPOUNDS]
    result = []
    for i, (name, s) in enumerate(out):
        s = s.copy()
        reps = [1, 1, 1]
        while len(s) * reps[0] * reps[1] * reps[2] < 8:
            i = int(np.argmin([s.lattice.abc[k] * reps[k] for k in range(3)]))
            reps[i] += 1
        s.make_supercell(reps)
        s.perturb(0.05 + 0.05 * rng.random(), seed=seed + i)   # move every atom by 0.05-0.1 A: nonzero forces
        result.append((name, s))
    return result


ANIONS = ("O", "F", "Cl", "N", "S", "Se", "P", "As", "Br", "I", "C", "Te", "Sb", "H", "B")


def _supercell_and_perturb(s, rng, seed: int, strain: float = 0.0):
    s = s.copy()
    if strain:
        s.apply_strain(rng.uniform(-strain, strain, size=3).tolist())
    reps = [1, 1, 1]
    while len(s) * reps[0] * reps[1] * reps[2] < 8:
        k = int(np.argmin([s.lattice.abc[j] * reps[j] for j in range(3)]))
        reps[k] += 1
    s.make_supercell(reps)
    s.perturb(0.05 + 0.1 * rng.random(), seed=seed)
    return s


def extra_calibration(base_calib: List[Any], test_names: set, n_compounds: int, n_variants: int, seed: int = 1,
                      n_alloys: int = 0) -> List[Any]:
    """More calibration structures, disjoint from the test set.

    1. ``n_variants`` strained (up to 3% per axis) and perturbed (0.05-0.15 A) copies of each
       calibration structure;
    2. ``n_compounds`` binary compounds in the same four prototypes (rocksalt, zincblende, CsCl,
       fluorite) from random (metal, anion) pairs over the elements of the data set, the lattice
       constant from the atomic radii; formulas of the test set are skipped;
    3. ``n_alloys`` binary intermetallics (CsCl or rocksalt) from random pairs of two different
       metals of the data set, the lattice constant from the atomic radii; formulas of the test set
       are skipped.
    """
    from pymatgen.core import Element

    rng = np.random.default_rng(seed)
    out = []
    for i, (name, s) in enumerate(base_calib):
        for v in range(n_variants):
            out.append((f"{name}~{v}", _supercell_and_perturb(s, rng, seed=1000 + 31 * i + v, strain=0.03)))
    from ase.collections import dcdft

    metals = sorted({n for n in dcdft.names if Element(n).is_metal and Element(n).atomic_radius is not None})
    anions = [a for a in ANIONS if Element(a).atomic_radius is not None]
    protos = ("rocksalt", "zincblende", "cscl", "fluorite")
    tries = 0
    while len(out) < n_variants * len(base_calib) + n_compounds and tries < 20 * max(n_compounds, 1):
        tries += 1
        m, a = str(rng.choice(metals)), str(rng.choice(anions))
        proto = protos[int(rng.integers(4))]
        formula = f"{m}{a}2" if proto == "fluorite" else f"{m}{a}"
        if formula in test_names:
            continue
        d = float(Element(m).atomic_radius) + float(Element(a).atomic_radius)   # bond length, A
        lat = {"rocksalt": 2 * d, "zincblende": 4 * d / 3 ** 0.5, "cscl": 2 * d / 3 ** 0.5, "fluorite": 4 * d / 3 ** 0.5}[proto]
        try:
            st = compound(formula, proto, lat)
        except Exception:   # pymatgen refuses some odd combinations
            continue
        out.append((f"{formula}-{proto}", _supercell_and_perturb(st, rng, seed=int(rng.integers(1 << 30)), strain=0.02)))
    want = len(out) + n_alloys
    tries = 0
    while len(out) < want and tries < 20 * max(n_alloys, 1):
        tries += 1
        m1, m2 = (str(x) for x in rng.choice(metals, size=2, replace=False))
        proto = ("cscl", "rocksalt")[int(rng.integers(2))]
        formula = f"{m1}{m2}"
        if formula in test_names or f"{m2}{m1}" in test_names:
            continue
        d = float(Element(m1).atomic_radius) + float(Element(m2).atomic_radius)
        lat = {"rocksalt": 2 * d, "cscl": 2 * d / 3 ** 0.5}[proto]
        try:
            st = compound(formula, proto, lat)
        except Exception:
            continue
        out.append((f"{formula}-{proto}", _supercell_and_perturb(st, rng, seed=int(rng.integers(1 << 30)), strain=0.02)))
    return out


def calibration_pool(conv, base_cal, test_names, args) -> List[Any]:
    """Section 1h's generated calibration graphs (seed 7, disjoint from the test set), from ``--pool-cache`` when it exists."""
    import os
    import pickle

    if args.pool_cache and os.path.exists(args.pool_cache):
        with open(args.pool_cache, "rb") as f:
            pool = pickle.load(f)
        print(f"calibration pool: {len(pool)} graphs from {args.pool_cache}", flush=True)
        return pool
    t = time.time()
    scale = 8 if args.quick else 1
    extra = extra_calibration(base_cal, test_names, args.pool_compounds // scale, args.pool_variants // scale, seed=7,
                              n_alloys=args.pool_alloys // scale)
    pool = to_graphs(conv, extra)
    print(f"calibration pool: {len(pool)} structures generated in {time.time() - t:.0f} s", flush=True)
    if args.pool_cache:
        with open(args.pool_cache, "wb") as f:
            pickle.dump(pool, f)
    return pool


def to_graphs(conv, named) -> List[Any]:
    """Convert ``(name, structure)`` pairs to CHGNet graphs, skipping (with a warning) any the converter refuses."""
    out = []
    for n, s in named:
        try:
            out.append(conv(s, graph_id=n))
        except Exception as exc:   # an odd generated compound the converter refuses
            logging.warning("skipped calibration structure %s: %s", n, exc)
    return out


def calib_forward(model, graphs):
    """Energies and magnetic moments: every Linear layer runs on the same inputs, and no force or stress
    backward pass is needed."""
    out = model(list(graphs), task="em")
    return out["e"]


def train_forward(model, graphs) -> Dict[str, torch.Tensor]:
    """The adapter: CHGNet takes a list of CrystalGraphs and needs autograd for forces and stress.

    The outputs stay attached to the graph (forces and stress come from ``create_graph=True``), so
    AutoRound can train through all four of them."""
    with torch.enable_grad():
        out = model(list(graphs), task="efsm")
    return {k: (torch.cat([t.reshape(-1) for t in out[k]]) if isinstance(out[k], (list, tuple)) else out[k].reshape(-1))
            for k in ("e", "f", "s", "m")}


def forward(model, graphs) -> Dict[str, torch.Tensor]:
    """The adapter for evaluation and analysis: :func:`train_forward`, detached."""
    return {k: v.detach() for k, v in train_forward(model, graphs).items()}


def evaluate(model, batches, ref) -> Dict[str, float]:
    got = [forward(model, b) for b in batches]
    res = {}
    for k, (name, unit, mult) in OUTPUTS.items():
        a = torch.cat([g[k] for g in got])
        r = torch.cat([x[k] for x in ref])
        res[name] = float((a - r).abs().mean()) * mult
    return res


def fmt(res: Dict[str, float]) -> str:
    return " | ".join(f"{res[n]:.3g}" for n, _, _ in OUTPUTS.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer structures (a smoke run)")
    ap.add_argument("--out", default="chgnet_results.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sensitivity-batches", type=int, default=1, help="calibration batches (of 6 structures) for the sensitivity run")
    ap.add_argument("--extra-compounds", type=int, default=150, help="extra calibration compounds (section 1b)")
    ap.add_argument("--extra-variants", type=int, default=2, help="strained/perturbed copies of each calibration structure (section 1b)")
    ap.add_argument("--sections", default="0,1,1b,1c,1d,1e,1f,1g,1h,2,3", help="sections to run, comma-separated")
    ap.add_argument("--pool-variants", type=int, default=10, help="section 1h: strained/perturbed copies of each calibration structure")
    ap.add_argument("--pool-compounds", type=int, default=1200, help="section 1h: generated metal-anion compounds")
    ap.add_argument("--pool-alloys", type=int, default=900, help="section 1h: generated two-metal compounds")
    ap.add_argument("--pool-cache", default=None, help="section 1h: a pickle of the generated pool's graphs (written if missing, "
                                                         "read if present: generating them takes about 10 minutes)")
    ap.add_argument("--pool-g64", default="angle_layers.2.twoBody_bond.mlp_core.layers.1",
                    help="section 1h: the layer put at group 64 to pay back the reference layer's int8 bits (the default's "
                         "output is never read by CHGNet's forward; bond_conv_layers.2.mlp_out.layers.1 is a live one)")
    ap.add_argument("--pool-steps", type=int, default=400, help="section 1h: AutoRound steps on the large pool")
    ap.add_argument("--pool-rows", default="rtn,exact,fc8",
                    help="section 1h rows: rtn and exact (the reference layer at int8, one layer at group 64: 4.4986 bits/weight; "
                         "RTN and AutoRound), fc8 (the reference layer at int8, nothing paid back: 4.5012)")
    ap.add_argument("--autoround-steps", type=int, default=100, help="AutoRound steps with 33 structures (4 times as many with "
                                                                   "the extended set; section 1g)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logging.basicConfig(level=logging.WARNING)
    from chgnet.graph import CrystalGraphConverter
    from chgnet.model import CHGNet

    t0 = time.time()
    base = CHGNet.load(verbose=False)
    base.eval()
    conv = CrystalGraphConverter(atom_graph_cutoff=6, bond_graph_cutoff=3)
    named = structures()
    if args.quick:
        named = named[::4]
    graphs = [(n, conv(s, graph_id=n)) for n, s in named]
    # calibration: every third structure; the rest is the test set
    calib = [g for i, (_, g) in enumerate(graphs) if i % 3 == 0]
    test = [g for i, (_, g) in enumerate(graphs) if i % 3 != 0]
    batch = 6
    cal_batches = [calib[i:i + batch] for i in range(0, len(calib), batch)]
    test_batches = [test[i:i + batch] for i in range(0, len(test), batch)]
    t = time.time()
    ref = [forward(base, b) for b in test_batches]
    print(f"fp32 reference pass over the test set: {time.time() - t:.1f} s", flush=True)
    print(f"{len(named)} structures ({len(calib)} calibration, {len(test)} test, {sum(len(g.atomic_number) for g in test)} test atoms); "
          f"setup {time.time() - t0:.0f} s", flush=True)
    results: Dict[str, Any] = {"structures": len(named), "calibration": len(calib), "test": len(test)}
    head = " | ".join(f"{n} MAE ({u})" for n, u, _ in OUTPUTS.values())
    sections = set(args.sections.split(","))
    big_batches = cal_batches
    extra_graphs, big = [], calib
    if sections & {"1b", "1c", "1d", "1e", "1f", "1g", "1h"}:
        t = time.time()
        test_names = {n for i, (n, _) in enumerate(named) if i % 3 != 0}
        base_cal = [(n, s) for i, (n, s) in enumerate(named) if i % 3 == 0]
        scale = 4 if args.quick else 1
        extra = extra_calibration(base_cal, test_names, args.extra_compounds // scale, args.extra_variants)
        extra_graphs = to_graphs(conv, extra)
        big = calib + extra_graphs
        big_batches = [big[i:i + batch] for i in range(0, len(big), batch)]
        print(f"extended calibration: {len(big)} structures ({len(calib)} + {len(extra_graphs)} generated, "
              f"{sum(len(g.atomic_number) for g in big)} atoms, {len({int(z) for g in big for z in g.atomic_number})} elements; "
              f"test set: {len({int(z) for g in test for z in g.atomic_number})} elements); {time.time() - t:.0f} s", flush=True)
        results["extended_calibration"] = len(big)

    def variant(rules, method=None, cal=None, fwd=calib_forward, **kw):
        m = copy.deepcopy(base)
        cal = cal_batches if cal is None else cal
        q.quantize_(m, rules, method=method, calibration=cal if method not in (None, "hqq") else None,
                    forward=fwd, **kw)
        return m

    bits = lambda m: 8.0 * sum(p.packed.nbytes if hasattr(p, "packed") else 0 for p in m.modules()) / sum(
        p.packed.shape[0] * int(np.prod(p.packed.shape[1:])) for p in m.modules() if hasattr(p, "packed"))

    int8 = q.WeightQuantConfig(bits=8)
    g32 = q.WeightQuantConfig(bits=4, granularity="per_group", group_size=32)
    keep8 = [("composition_model.fc", int8), ("*", g32)]   # the per-element reference energies at int8
    if "0" in sections:
        section0(base, cal_batches, int8, g32, results)
    if "1" in sections:
        section1(variant, bits, evaluate, test_batches, ref, head, int8, g32, keep8, results)
    if "1b" in sections:
        section1b(variant, bits, test_batches, ref, head, g32, keep8, big_batches, results)
    if "1e" in sections:
        section1e(variant, bits, test_batches, ref, head, g32, keep8, big_batches, results)
    if "1f" in sections:
        # which calibration structures hurt GPTQ: the 33 alone, plus their strained copies, plus the generated compounds
        n_var = len(extra_graphs) and min(len(extra_graphs), args.extra_variants * len(calib))
        sets = {"33": cal_batches, f"33 + {n_var} strained copies": [
            (calib + extra_graphs[:n_var])[i:i + batch] for i in range(0, len(calib) + n_var, batch)], f"{len(big)}": big_batches}
        rows = [(f"int4 g32 + composition_model.fc int8, GPTQ damp 0.1 ({k})", (lambda c: lambda: variant(keep8, GPTQ(damp=0.1), cal=c))(c))
                for k, c in sets.items()]
        _rows("GPTQ and the calibration set", rows, variant, bits, test_batches, ref, head, results, "gptq_calibration_sets")
    if "1d" in sections:
        n = sum(len(b) for b in big_batches)
        rows = [
            (f"int4 g32, awq_scale ({n})", lambda: variant(g32, "awq_scale", cal=big_batches)),
            (f"int4 g32 + composition_model.fc int8, awq_scale ({n})", lambda: variant(keep8, "awq_scale", cal=big_batches)),
            ("int4 g32 + composition_model.fc int8, awq_scale (33)", lambda: variant(keep8, "awq_scale")),
        ]
        _rows("AWQ channel scaling (input_scale stored, counted in bits/weight)", rows, variant, bits, test_batches, ref, head,
              results, "awq_scale")
    if "1h" in sections:
        test_names = {n for i, (n, _) in enumerate(named) if i % 3 != 0}
        base_cal = [(n, s) for i, (n, s) in enumerate(named) if i % 3 == 0]
        pool = calibration_pool(conv, base_cal, test_names, args)
        section1h(variant, bits, test_batches, ref, head, g32, big, pool, args, results)
    if "1g" in sections:
        section1g(variant, bits, test_batches, ref, head, g32, keep8, big_batches, args, results)
    if "1c" in sections:
        section1c(base, variant, bits, test_batches, ref, head, int8, g32, big_batches, results)
    if "2" in sections:
        section2(base, variant, cal_batches, test_batches, ref, head, g32, int8, args, results)
    if "3" in sections:
        section3(variant, test_batches, ref, head, int8, results)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\ntotal {time.time() - t0:.0f} s; results in {args.out}")


def section0(base, cal_batches, int8, g32, results) -> None:
    """(0) the weight report with data: output SNR per layer, flags where SQNR looks safe."""
    from gradcomp.quant import analyze_weights

    t = time.time()
    # propagate: each layer quantized alone, its share of the model-output error (1 batch: 6 structures)
    wr = analyze_weights(base, [int8, g32], calibration=cal_batches[:1], forward=forward, propagate=True, progress=True)
    print(f"\n## Weight report with calibration data ({time.time() - t:.0f} s)\n")
    print(f"model-output rel. MSE with every layer quantized, per output: {wr.model_rel_mse_per_output}")
    print("| flag | layer | config | weight SQNR dB | output SNR dB | output | share of that output's error |\n|---|---|---|---:|---:|---|---:|")
    for f in wr.flags:
        print(f"| {f['kind']} | {f['layer']} | {f['config']} | {f['sqnr_db']:.1f} | {f['output_snr_db']:.1f} | "
              f"{f.get('model_output', '')} | {f.get('model_error_share', float('nan')):.2f} |")
    top = sorted(((lq.model_error_share, n, c, lq.model_error_output) for n, d in wr.quality.items() for c, lq in d.items()), reverse=True)[:10]
    print("largest shares: " + ", ".join(f"{n} [{c}] {s:.2f} of {o}" for s, n, c, o in top))
    comp = wr.quality.get("composition_model.fc", {})
    for c, lq in comp.items():
        print(f"composition_model.fc [{c}]: SQNR {lq.sqnr_db:.1f} dB, output SNR {lq.output_snr_db:.1f} dB, "
              f"output RMS error {lq.output_rms_error:.4g} eV, share of the model-output error {lq.model_error_share:.2f} "
              f"(of output {lq.model_error_output!r})")
    results["flags"] = wr.flags


def section1(variant, bits, evaluate, test_batches, ref, head, int8, g32, keep8, results) -> None:
    """(1) weight-only: RTN vs data-aware, calibrated on the 33 calibration structures."""
    print(f"\n## Weight-only quantization of every Linear and the Embedding\n\n| variant | bits/weight | {head} |\n|---|---:|---:|---:|---:|---:|")
    table1 = {}
    for label, rules, method in [
        ("int8 per channel, RTN", int8, None),
        ("int4 g32, RTN", g32, None),
        ("int4 g32, awq_clip", g32, "awq_clip"),
        ("int4 g32, GPTQ (damp 0.01, the paper's)", g32, GPTQ()),
        ("int4 g32, GPTQ (damp 0.1)", g32, GPTQ(damp=0.1)),
        ("int4 g32, GPTQ act-order (damp 0.1)", g32, GPTQ(damp=0.1, act_order=True)),
        ("int4 g32 + composition_model.fc int8, RTN", keep8, None),
        ("int4 g32 + composition_model.fc int8, awq_clip", keep8, "awq_clip"),
        ("int4 g32 + composition_model.fc int8, GPTQ (damp 0.1)", keep8, GPTQ(damp=0.1)),
    ]:
        t = time.time()
        m = variant(rules, method)
        r = evaluate(m, test_batches, ref)
        table1[label] = dict(r, bits=bits(m), seconds=time.time() - t)
        print(f"| {label} | {bits(m):.4f} | {fmt(r)} |", flush=True)
    results["weight_only"] = table1


def _rows(title, rows, variant, bits, test_batches, ref, head, results, key) -> None:
    print(f"\n## {title}\n\n| variant | bits/weight | {head} | seconds |\n|---|---:|---:|---:|---:|---:|---:|")
    table = {}
    for label, make in rows:
        t = time.time()
        m = make()
        r = evaluate(m, test_batches, ref)
        table[label] = dict(r, bits=bits(m), seconds=time.time() - t)
        print(f"| {label} | {bits(m):.4f} | {fmt(r)} | {time.time() - t:.0f} |", flush=True)
        del m
    results[key] = table


def section1b(variant, bits, test_batches, ref, head, g32, keep8, big, results) -> None:
    """(1b) more calibration data: GPTQ (damping, act-order, sequential), awq_clip and HQQ at uniform int4."""
    n = sum(len(b) for b in big)
    rows = [
        ("int4 g32, RTN", lambda: variant(g32)),
        ("int4 g32, HQQ (no data)", lambda: variant(g32, "hqq")),
        (f"int4 g32, HQQ weighted by data ({n})", lambda: variant(g32, HQQ(), cal=big)),
        (f"int4 g32, awq_clip ({n})", lambda: variant(g32, "awq_clip", cal=big)),
        (f"int4 g32, GPTQ damp 0.01 ({n})", lambda: variant(g32, GPTQ(), cal=big)),
        (f"int4 g32, GPTQ damp 0.1 ({n})", lambda: variant(g32, GPTQ(damp=0.1), cal=big)),
        (f"int4 g32, GPTQ act-order damp 0.1 ({n})", lambda: variant(g32, GPTQ(damp=0.1, act_order=True), cal=big)),
    ]
    _rows(f"Uniform int4 with {n} calibration structures", rows, variant, bits, test_batches, ref, head, results, "weight_only_big_calibration")


def section1e(variant, bits, test_batches, ref, head, g32, keep8, big, results) -> None:
    """(1e) sequential calibration (each stage on the quantized earlier ones) and the reference layer kept at int8."""
    n = sum(len(b) for b in big)
    rows = [
        (f"int4 g32 + composition_model.fc int8, awq_clip ({n})", lambda: variant(keep8, "awq_clip", cal=big)),
        (f"int4 g32 + composition_model.fc int8, GPTQ damp 0.1 ({n})", lambda: variant(keep8, GPTQ(damp=0.1), cal=big)),
        (f"int4 g32 + composition_model.fc int8, GPTQ damp 0.1, sequential 4 stages ({n})",
         lambda: variant(keep8, GPTQ(damp=0.1), cal=big, sequential=4)),
        (f"int4 g32 + composition_model.fc int8, awq_clip, sequential 4 stages ({n})",
         lambda: variant(keep8, "awq_clip", cal=big, sequential=4)),
        ("int4 g32 + composition_model.fc int8, HQQ (no data)", lambda: variant(keep8, "hqq")),
    ]
    _rows(f"int4 with the reference layer at int8, {n} calibration structures", rows, variant, bits, test_batches, ref, head,
          results, "weight_only_keep8")


def section1g(variant, bits, test_batches, ref, head, g32, keep8, big, args, results) -> None:
    """(1g) AutoRound: rounding offsets trained against the four outputs, vs RTN and awq_clip in the same run."""
    n = args.autoround_steps
    ar = lambda **kw: AutoRound(steps=n, holdout=1, **kw)   # the last batch (3 structures) picks the best step
    # the extended set in a seeded random order, so that the 6 held-out batches mix every kind of structure
    flat = [g for b in big for g in b]
    order = np.random.default_rng(0).permutation(len(flat))
    mixed = [[flat[j] for j in order[i:i + 6]] for i in range(0, len(flat), 6)]
    nb = len(flat)
    fc8 = "int4 g32 + composition_model.fc int8"
    rows = [
        ("int4 g32, RTN", lambda: variant(g32)),
        ("int4 g32, awq_clip (33)", lambda: variant(g32, "awq_clip")),
        (f"int4 g32, autoround {n} steps (33)", lambda: variant(g32, ar(), fwd=train_forward, progress=True)),
        (f"{fc8}, RTN", lambda: variant(keep8)),
        (f"{fc8}, awq_clip (33)", lambda: variant(keep8, "awq_clip")),
        (f"{fc8}, autoround {n} steps (33)", lambda: variant(keep8, ar(), fwd=train_forward, progress=True)),
        (f"{fc8}, autoround {n} steps, ranges learnt too (33)", lambda: variant(keep8, ar(ranges=True), fwd=train_forward,
                                                                                 progress=True)),
        (f"{fc8}, autoround {n} steps, normalize=power (33)", lambda: variant(keep8, ar(normalize="power"), fwd=train_forward,
                                                                               progress=True)),
        (f"int4 g32, awq_clip ({nb})", lambda: variant(g32, "awq_clip", cal=big)),
        (f"int4 g32, autoround {4 * n} steps, lr 0.005 ({nb}, 6 batches held out)",
         lambda: variant(g32, AutoRound(steps=4 * n, lr=0.005, holdout=6), cal=mixed, fwd=train_forward, progress=True)),
        (f"{fc8}, awq_clip ({nb})", lambda: variant(keep8, "awq_clip", cal=big)),
        (f"{fc8}, autoround {4 * n} steps, lr 0.005 ({nb}, 6 batches held out)",
         lambda: variant(keep8, AutoRound(steps=4 * n, lr=0.005, holdout=6), cal=mixed, fwd=train_forward, progress=True)),
    ]
    _rows(f"AutoRound against the model's outputs (one 6-structure batch per step; selection every {max(1, n // 10)} steps)",
          rows, variant, bits, test_batches, ref, head, results, "autoround")


def section1h(variant, bits, test_batches, ref, head, g32, big, pool, args, results) -> None:
    """(1h) AutoRound on a large generated calibration set, each training structure seen about once."""
    int8 = q.WeightQuantConfig(bits=8)
    g64 = q.WeightQuantConfig(bits=4, granularity="per_group", group_size=64)
    keep8 = [("composition_model.fc", int8), ("*", g32)]
    # the reference layer's int8 costs 0.0012 bits/weight over 4.5; one more layer at group 64 pays it back
    exact = [("composition_model.fc", int8), (args.pool_g64, g64), ("*", g32)]
    flat = list(big)   # the 249 structures of section 1b, in order
    flat += [pool[j] for j in np.random.default_rng(1).permutation(len(pool))]
    order = np.random.default_rng(0).permutation(len(flat))
    mixed = [[flat[j] for j in order[i:i + 6]] for i in range(0, len(flat), 6)]
    n, steps = len(flat), args.pool_steps
    ar = lambda **kw: AutoRound(steps=steps, lr=0.005, holdout=6, **kw)
    fc8 = "int4 g32 + composition_model.fc int8"
    ex = f"{fc8} + {args.pool_g64} g64"
    want = set(args.pool_rows.split(","))
    if not want <= {"rtn", "exact", "fc8"}:
        raise SystemExit(f"--pool-rows takes rtn, exact and fc8, got {args.pool_rows!r}")
    rows = []
    if "rtn" in want:
        rows.append((f"{ex}, RTN", lambda: variant(exact)))
    if "exact" in want:
        rows.append((f"{ex}, autoround {steps} steps, lr 0.005 ({n}, 6 batches held out)",
                     lambda: variant(exact, ar(), cal=mixed, fwd=train_forward, progress=True)))
    if "fc8" in want:
        rows.append((f"{fc8}, autoround {steps} steps, lr 0.005 ({n}, 6 batches held out)",
                     lambda: variant(keep8, ar(), cal=mixed, fwd=train_forward, progress=True)))
    _rows(f"AutoRound on {n} calibration structures ({len(mixed) - 6} training batches for {steps} steps)", rows, variant, bits,
          test_batches, ref, head, results, "autoround_pool")


def section1c(base, variant, bits, test_batches, ref, head, int8, g32, big, results) -> None:
    """(1c) the per-element reference energies alone: composition_model.fc quantized, everything else fp32."""
    w = base.composition_model.fc.weight.detach()
    g = w.reshape(-1)[: (w.numel() // 32) * 32].reshape(-1, 32)
    print(f"\ncomposition_model.fc: weight {tuple(w.shape)}, values {float(w.min()):.3g} .. {float(w.max()):.3g} eV; "
          f"int4 g32 step per group (symmetric, absmax / 7): {[round(float(x), 3) for x in g.abs().amax(1) / 7]} eV", flush=True)
    only = lambda cfg: [("composition_model.fc", cfg)]
    n = sum(len(b) for b in big)
    rows = [
        ("composition_model.fc only, int8 per channel", lambda: variant(only(int8))),
        ("composition_model.fc only, int4 g32 RTN", lambda: variant(only(g32))),
        ("composition_model.fc only, int4 g32 HQQ (no data)", lambda: variant(only(g32), "hqq")),
        (f"composition_model.fc only, int4 g32 awq_clip ({n})", lambda: variant(only(g32), "awq_clip", cal=big)),
        (f"composition_model.fc only, int4 g32 GPTQ damp 0.1 ({n})", lambda: variant(only(g32), GPTQ(damp=0.1), cal=big)),
        ("everything but composition_model.fc, int4 g32 RTN", lambda: variant([("composition_model.fc", None), ("*", g32)])),
    ]
    _rows("The reference-energy layer alone (the rest fp32)", rows, variant, bits, test_batches, ref, head, results, "composition_layer")


def section2(base, variant, cal_batches, test_batches, ref, head, g32, int8, args, results) -> None:
    """(2) sensitivity over every output, knapsack plan at 4.5 bits vs uniform int4."""
    t = time.time()
    cands = (q.WeightQuantConfig(bits=2, granularity="per_group", group_size=32), g32, int8)
    report = measure_sensitivity(base, cal_batches[:args.sensitivity_batches], SensitivityConfig(candidates=cands, metrics=("rel_mse",)), forward=forward)
    print(f"\nsensitivity: {len(report.layers)} layers x {len(cands)} candidates in {time.time() - t:.0f} s; "
          f"outputs {report.metadata['outputs']} scored as {report.metadata['output_kind']} ({report.metadata['output_kind_reason']})")
    plan = allocate_bits(report, avg_bits=4.5)
    uni = uniform_plan(report, g32.name)
    print(f"\n## Knapsack plan vs uniform int4 (sensitivity: rel_mse summed over the 4 outputs)\n\n| plan | avg bits | {head} |\n|---|---:|---:|---:|---:|---:|")
    table2 = {}
    for label, p, method in [("uniform int4 g32, RTN", uni, None), ("knapsack 4.5 bits, RTN", plan, None),
                             ("uniform int4 g32, awq_clip", uni, "awq_clip"), ("knapsack 4.5 bits, awq_clip", plan, "awq_clip")]:
        m = variant(p.to_rules(), method)
        r = evaluate(m, test_batches, ref)
        table2[label] = dict(r, avg_bits=p.avg_bits)
        print(f"| {label} | {p.avg_bits:.3f} | {fmt(r)} |", flush=True)
    results["plans"] = table2
    results["plan_bits"] = plan.bits_by_layer()


def section3(variant, test_batches, ref, head, int8, results) -> None:
    """(3) dynamic W8A8: int8 weights and per-token int8 activations on every Linear input."""
    print(f"\n## Dynamic W8A8 (int8 per-channel weights, per-token int8 activations)\n\n| variant | {head} |\n|---|---:|---:|---:|---:|")
    table3 = {}
    act = ActQuantConfig(bits=8, dynamic=True, granularity="per_token")
    from gradcomp.quant import fake_quant

    fixed_mask = fake_quant._ste_mask

    def float_range_mask(x, scale, zero_point, bits, axis):
        # the rule before the fix: gradient only where (qmin - zp) s <= x <= (qmax - zp) s
        from gradcomp.codec import qrange

        qmin, qmax, _ = qrange(bits, zero_point is None)
        s = scale.float()
        z = torch.zeros_like(s) if zero_point is None else zero_point.float()
        return (x >= (qmin - z) * s) & (x <= (qmax - z) * s)

    for label, mask in [("weight-only int8 (reference)", None), ("W8A8, STE masked in the code domain (fixed)", fixed_mask),
                        ("W8A8, STE masked on the float range (before the fix)", float_range_mask)]:
        m = variant(int8)
        if mask is not None:
            prepare_activation_quant_(m, act)
            fake_quant._ste_mask = mask
        try:
            r = evaluate(m, test_batches, ref)
        finally:
            fake_quant._ste_mask = fixed_mask
        table3[label] = r
        print(f"| {label} | {fmt(r)} |", flush=True)
    results["w8a8"] = table3


if __name__ == "__main__":
    main()
