"""The benchmark's verdicts on made-up results: the targets, the policy against the best fixed choice, the first steps.

No timing is measured here: the figures are written by hand so every verdict is known in advance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import benchmark_tables as bt  # noqa: E402


def _run(step_s: float, first_s: float = 30.0, n_steps: int = 60, **extra):
    """A summary as run_hook returns it: median step, records with elapsed_s (first 50 steps take first_s)."""
    records = [{"step": k, "loss": 3.0, "step_time_s": step_s, "elapsed_s": first_s * k / 50} for k in range(1, n_steps + 1)]
    return {
        "median_step_time_s": step_s, "final_val_loss": 3.0, "parameters": 19_079_168, "records": records,
        "wire_per_step": [{"wire_per_step": {"tx_bytes": 1e6}}], "hook_stats": {"buckets_step": 4}, "steps": n_steps, **extra,
    }


def _part(name="steps2", hosts=2, rate="1gbit", **steps):
    results = {h: _run(s) if not isinstance(s, dict) else s for h, s in steps.items()}
    return {
        "name": name, "hosts": hosts, "rate": rate, "batch_size": 2, "block_size": 64, "threads": 1, "steps": 60,
        "time_after": 30, "first_steps": 50, "eval_every": 0, "results": results, "failed": {},
        "started": "2026-12-07 08:00 UTC", "ended": "2026-12-07 08:10 UTC", "load_start": [0.1, 0.2, 0.3], "load_end": [1.9, 1.0, 0.5],
    }


def test_step_targets_of_the_multi_bucket_preset():
    part = _part(allreduce=1.0, fp16=0.6, int8=0.38, int4=0.36, policy=0.37)
    assert bt.targets("gpt20m", part, "int8", 50) == [
        "<= 0.40x fp32: met", "<= 0.75x fp16: met", "first 50 steps < fp16: NOT met",  # same first-50 time as fp16
    ]
    int4 = bt.targets("gpt20m", part, "int4", 50)
    assert "<= 0.35x fp32: NOT met" in int4 and "faster than int8: met" in int4
    # 4 hosts have their own bounds; comm17m's are last round's figures, with no fp16 bound
    part4 = _part(hosts=4, allreduce=1.0, fp16=0.6, int8=0.45, int4=0.401)
    assert bt.targets("gpt20m", part4, "int8", 50)[0] == "<= 0.45x fp32: met"
    assert bt.targets("gpt20m", part4, "int4", 50)[0] == "<= 0.40x fp32: NOT met"
    c = bt.targets("comm17m", _part(allreduce=1.0, fp16=0.6, int8=0.39, int4=0.2), "int8", 50)
    assert c[0] == "<= 0.389x fp32: NOT met" and not any("fp16:" in t and "x fp16" in t for t in c)
    # the step-time targets are set for 1 Gbit/s links only
    assert bt.targets("gpt20m", _part(rate="100mbit", allreduce=1.0, int8=0.1), "int8", 50) == []


def test_first_steps_compare_whole_runs_from_the_hook_setup():
    part = _part(allreduce=1.0, fp16=_run(0.6, first_s=40.0), int8=_run(0.3, first_s=35.0), int4=_run(0.25, first_s=45.0))
    assert "first 50 steps < fp16: met" in bt.targets("gpt20m", part, "int8", 50)
    assert "first 50 steps < fp16: NOT met" in bt.targets("gpt20m", part, "int4", 50)
    assert bt.first_steps_wall(part["results"]["int4"], 50) == (50, pytest.approx(45.0))
    assert bt.first_steps_wall(_run(0.3, n_steps=6), 50)[0] == 6  # a short run: its last step
    no_fp16 = _part(allreduce=1.0, int8=0.3)
    assert "first 50 steps < fp16: no comparable fp16 run" in bt.targets("gpt20m", no_fp16, "int8", 50)


def test_policy_is_judged_against_the_best_fixed_choice_of_the_same_part():
    part = _part(allreduce=1.0, int8=0.40, int4=0.30, policy=0.314)
    assert bt.best_fixed(part["results"]) == ("int4", 0.30)
    assert bt.targets("gpt20m", part, "policy", 50) == ["<= 1.05x best fixed (int4): met"]
    assert "1.047x" in bt.policy_line(part) and "met" in bt.policy_line(part)
    slow = _part(allreduce=1.0, int8=0.40, int4=0.30, policy=0.316)
    assert bt.targets("gpt20m", slow, "policy", 50) == ["<= 1.05x best fixed (int4): NOT met"]
    # without a rate limit plain all-reduce is usually best, and the policy is held to fp32 too
    nolimit = _part(name="nolimit2", rate="100gbit", allreduce=0.20, int8=0.26, int4=0.25, policy=0.215)
    assert bt.targets("gpt20m", nolimit, "policy", 50) == ["<= 1.05x best fixed (allreduce): NOT met", "<= 1.05x fp32 (no hook): NOT met"]
    partial = _part(allreduce=1.0, policy=0.5)  # a best of fewer choices says so
    assert bt.targets("gpt20m", partial, "policy", 50) == ["<= 1.05x best fixed (allreduce, of allreduce only): met"]
    assert bt.best_fixed(_part(fp16=0.5, policy=0.4)["results"]) is None
    assert bt.targets("gpt20m", _part(fp16=0.5, policy=0.4), "policy", 50) == ["<= 1.05x best fixed: no fixed choice ran"]


def test_render_prints_every_baseline_ratio_and_the_conditions():
    part = _part(local=0.2, allreduce=1.0, fp16=0.5, powersgd=0.4, int8=0.38, int4=0.3,
                 policy=_run(0.31, policy_choices={"7355392": "twophase-int4", "1050112": "ring-fp32"}))
    nolimit = _part(name="nolimit2", rate="100gbit", allreduce=0.2, int8=0.3, int4=0.28, policy=0.2)
    saved = {
        "command": ["python", "benchmarks/benchmark.py", "--models", "gpt20m"],
        "machine": {"cpu": "AMD EPYC", "cores": 2, "memory_gib": "24", "torch": "2.13.0"},
        "models": {"gpt20m": {"parts": {"steps2": part, "nolimit2": nolimit}, "memory": None}},
        "started": "2026-12-07 07:50 UTC", "ended": "2026-12-07 08:20 UTC", "load_start": [0.0, 0.0, 0.0], "load_end": [2.0, 1.5, 1.0],
    }
    md = bt.render(saved)
    row = next(line for line in md.splitlines() if line.startswith("| gradcomp int8"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:7] == ["0.380", "0.760", "0.950"]  # vs fp32, vs fp16 hook, vs PowerSGD
    assert "AMD EPYC (2 cores" in md and "0.10/0.20/0.30 at the start, 1.90/1.00/0.50 at the end" in md
    assert "`python benchmarks/benchmark.py --models gpt20m`" in md and "2026-12-07 08:00 UTC" in md
    assert "| gpt20m | 2 hosts, 1gbit | 310.0 | int4 | 300.0 | 1.033 | met | 1000.0 / 380.0 / 300.0 | 0.310 | 0.620 | 0.775 |" in md
    assert "| gpt20m | 2 hosts, no limit (100gbit token bucket) | 200.0 | allreduce | 200.0 | 1.000 | met | 200.0 / 300.0 / 280.0 | 1.000 | - | - |" in md
    assert "7.4M: twophase-int4" in md
    assert md.rstrip().splitlines()[-1].startswith("Measured 2026-12-07 07:50 UTC to 2026-12-07 08:20 UTC")  # under the policy table


def test_old_results_are_upgraded_to_the_per_preset_layout():
    old = {"config": {"model": "comm17m", "rate": "1gbit", "batch_size": 4, "steps": 30, "time_after": 14, "tta_steps": 150,
                      "tta_eval_every": 10, "threads": 1},
           "parts": {"steps2": {"hosts": 2, "results": {"allreduce": _run(0.68)}, "failed": {}}}, "memory": None}
    new = bt.upgrade(old)
    assert list(new["models"]) == ["comm17m"] and new["models"]["comm17m"]["parts"]["steps2"]["time_after"] == 14
    assert "comm17m" in bt.render(new)
