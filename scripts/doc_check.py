"""Check README.md and docs/ against real runs: sample outputs, and the durations they state.

    python scripts/doc_check.py                 # run every marked sample, compare its output with the docs
    python scripts/doc_check.py --times         # also time the quick commands of the durations table
    python scripts/doc_check.py --times --all   # and the long ones (the full suite, the main job, ...)
    python scripts/doc_check.py --list          # what would run
    python scripts/doc_check.py --static        # only what needs no run: markers, tables, README's durations
    python scripts/doc_check.py --update        # write the real outputs into the docs (then: git diff)

The docs mark what is checked with HTML comments (invisible on GitHub) just before a fenced block:

* ``<!-- doc-check: script NAME -->``: the block is saved as ``NAME`` in the scratch folder where the
  samples run (a README snippet is run as it is shown);
* ``<!-- doc-check: run [stderr] [cwd=repo] [timeout=S] -->``: the block's ``$ COMMAND`` lines (a
  line ending in ``\\`` continues on the next) run one after the other in one bash, in the scratch
  folder (``cwd=repo``: the repository root), with ``gradcomp``, ``python`` and ``torchrun`` taken
  from this interpreter; the other lines are the expected stdout (``stderr``: stdout and stderr),
  compared exactly, line by line, trailing blanks aside;
* ``<!-- doc-check: durations -->``: the table of how long commands take (``docs/benchmarks.md``).
  Every ``N s wall, M s CPU`` that README.md states must be a row of it; ``--times`` measures the
  rows again (wall clock, and CPU time of the command and its children) and reports the ratios.

Every relative link of README.md and docs/ must point at a file that exists, and an anchor at one
of its headings.

Exit status: 0 when every sample matches and README's durations are the table's; 1 otherwise
(with a diff); 2 for bad arguments. Timings never fail the check (the machine may be shared) unless
``--strict-times`` is given: then a row off by more than ``--tolerance`` (2x) either way fails it.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^<!--\s*doc-check:\s*(\w+)\s*(.*?)\s*-->\s*$")
DURATION = re.compile(r"(?:(\d+) min )?(\d+(?:\.\d+)?) s")
README_DURATION = re.compile(r"((?:\d+ min )?\d+(?:\.\d+)? s) wall, ((?:\d+ min )?\d+(?:\.\d+)? s) CPU")

# The commands of the durations table and how to time them: (run in, command, quick). A row that is
# not here, or a command here without a row, is an error, so the table and this list stay in step.
TIMED: Dict[str, Tuple[str, str, bool]] = {
    "gradcomp --help": ("scratch", "gradcomp --help", True),
    "gradcomp cost --params 7e9 --workers 8 --bandwidth 10gbit": ("scratch", "gradcomp cost --params 7e9 --workers 8 --bandwidth 10gbit", True),
    "gradcomp grads (TinyGPT cached)": ("scratch", "gradcomp grads --threads 1 --no-progress", True),
    "torchrun --standalone --nproc-per-node 2 examples/ddp.py": ("repo", "torchrun --standalone --nproc-per-node 2 examples/ddp.py", True),
    "torchrun --standalone --nproc-per-node 2 examples/fsdp2.py": ("repo", "torchrun --standalone --nproc-per-node 2 examples/fsdp2.py", True),
    "python examples/weights.py": ("repo", "python examples/weights.py --out {scratch}/minilm.safetensors", True),
    "gradcomp grads (first run: trains TinyGPT)": ("scratch", "gradcomp grads --threads 1 --no-progress --cache-dir {scratch}/cache", False),
    "bash launch/run.sh --hook int8 --steps 200": ("repo", "bash launch/run.sh --hook int8 --steps 200 --out-dir {scratch}/run", False),
    'python -m pytest -q -m "not slow"': ("repo", 'python -m pytest -q -m "not slow" -p no:cacheprovider', False),
    "python -m pytest -q (the full suite)": ("repo", "python -m pytest -q -p no:cacheprovider", False),
    "bash scripts/setup.sh (a fresh clone)": ("clone", "bash scripts/setup.sh", False),
}


@dataclass
class Block:
    """A marked fenced block: where it is, its marker and options, and its lines."""

    path: Path
    line: int
    kind: str
    options: Dict[str, str]
    lines: List[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_options(text: str) -> Dict[str, str]:
    """``"stderr cwd=repo"`` -> ``{"stderr": "", "cwd": "repo"}``."""
    out = {}
    for tok in shlex.split(text):
        key, _, value = tok.partition("=")
        out[key] = value
    return out


def marked_blocks(path: Path) -> List[Block]:
    """Every marked block of one markdown file, in order (a marker must precede a fenced block or table)."""
    lines = path.read_text().splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        m = MARK.match(lines[i].strip())
        if not m:
            i += 1
            continue
        kind, opts = m.group(1), parse_options(m.group(2))
        if kind not in ("script", "run", "durations"):
            raise ValueError(f"{path}:{i + 1}: unknown doc-check marker {kind!r} (expected script, run or durations)")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block = Block(path, i + 1, kind, opts)
        if kind == "durations":
            while j < len(lines) and lines[j].startswith("|"):
                block.lines.append(lines[j])
                j += 1
        else:
            if j >= len(lines) or not lines[j].startswith("```"):
                raise ValueError(f"{path}:{i + 1}: doc-check marker {kind!r} must be followed by a fenced block")
            j += 1
            while j < len(lines) and not lines[j].startswith("```"):
                block.lines.append(lines[j])
                j += 1
        blocks.append(block)
        i = j + 1
    return blocks


def split_commands(lines: List[str]) -> Tuple[List[str], List[str]]:
    """A run block's ``$ `` commands (continuations joined) and its expected output lines."""
    commands, expected, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            cmd = line[2:]
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd + "\n" + lines[i]
            commands.append(cmd)
        else:
            expected.append(line)
        i += 1
    return commands, expected


def shims(folder: Path) -> Dict[str, str]:
    """An environment whose ``gradcomp``, ``python`` and ``torchrun`` are this interpreter's, importing this checkout."""
    folder.mkdir(parents=True, exist_ok=True)
    py = shlex.quote(sys.executable)
    for name, body in (("gradcomp", f'exec {py} -m gradcomp "$@"'), ("python", f'exec {py} "$@"'),
                       ("torchrun", f'exec {py} -m torch.distributed.run "$@"')):
        p = folder / name
        p.write_text(f"#!/usr/bin/env bash\n{body}\n")
        p.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{folder}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHON"] = sys.executable
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _clean(lines: List[str]) -> List[str]:
    out = [line.rstrip() for line in lines]
    while out and not out[-1]:
        out.pop()
    return out


def run_block(block: Block, scratch: Path, env: Dict[str, str]) -> Tuple[Optional[str], List[str]]:
    """Run one ``run`` block; return (None when its output matches, else a diff; the output's lines)."""
    commands, expected = split_commands(block.lines)
    if not commands:
        return f"{block.where}: a run block without a '$ ' command", []
    cwd = ROOT if block.options.get("cwd") == "repo" else scratch
    script = "set -o pipefail\n" + "\n".join(commands) + "\n"
    stderr = subprocess.STDOUT if "stderr" in block.options else subprocess.DEVNULL
    timeout = float(block.options.get("timeout") or 900)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=timeout)
        got = r.stdout
    except subprocess.TimeoutExpired:
        return f"{block.where}: timed out after {timeout:.0f} s: {commands[0][:80]}", []
    print(f"  {block.where}: {commands[0][:70]}{' ...' if len(commands) > 1 else ''} ({time.perf_counter() - t0:.1f} s)", flush=True)
    want, have = _clean(expected), _clean(got.splitlines())
    if want == have:
        return None, have
    diff = "\n".join(difflib.unified_diff(want, have, "docs", "this run", lineterm="", n=1))
    return f"{block.where}: the output differs from the docs ({commands[0][:80]}):\n{diff}", have


def update_block(block: Block, output: List[str]) -> None:
    """Write ``output`` into the docs as the block's expected output (blocks of one command; others are reported)."""
    lines = block.path.read_text().split("\n")
    start = block.line  # the marker's line (1-based) is followed by the fence
    while not lines[start].startswith("```"):
        start += 1
    end = start + 1
    while not lines[end].startswith("```"):
        end += 1
    commands, _ = split_commands(block.lines)
    new = ["$ " + commands[0]] + output
    lines[start + 1:end] = new
    block.path.write_text("\n".join(lines))


def parse_duration(text: str) -> Optional[float]:
    """``"1 min 15 s"`` -> 75.0; ``"54 s"`` -> 54.0; None when the cell holds no duration."""
    m = DURATION.search(text)
    if not m:
        return None
    return 60.0 * int(m.group(1) or 0) + float(m.group(2))


def format_duration(seconds: float) -> str:
    """75.2 -> ``"1 min 15 s"``; 9.3 -> ``"9 s"``."""
    s = int(round(seconds))
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def durations_table(blocks: List[Block]) -> Dict[str, Tuple[str, str]]:
    """``{command: (wall, cpu)}`` of the durations table (the first column is the command, in backticks)."""
    tables = [b for b in blocks if b.kind == "durations"]
    if len(tables) != 1:
        raise ValueError(f"expected one doc-check durations table, found {len(tables)}")
    rows = {}
    for line in tables[0].lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        cmd = cells[0].replace("`", "").strip()
        rows[cmd] = (cells[1], cells[2])
    unknown = sorted(set(rows) - set(TIMED))
    missing = sorted(set(TIMED) - set(rows))
    if unknown or missing:
        raise ValueError(f"durations table and scripts/doc_check.py disagree: rows without a command here {unknown}, "
                         f"commands here without a row {missing}")
    return rows


LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def check_links(files: List[Path]) -> List[str]:
    """Every relative link of README.md and docs/ points at a file that exists, and at a heading of it."""
    problems = []
    for f in files:
        text = re.sub(r"```.*?```", "", f.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            dest = (f.parent / path).resolve() if path else f
            if not dest.exists():
                problems.append(f"{f.relative_to(ROOT)}: link to {target}: no such file")
                continue
            if anchor and dest.suffix == ".md":
                heads = {slug(m) for m in re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", dest.read_text(), flags=re.S), re.M)}
                if anchor not in heads:
                    problems.append(f"{f.relative_to(ROOT)}: link to {target}: no such heading in {dest.relative_to(ROOT)}")
    return problems


def check_readme_durations(rows: Dict[str, Tuple[str, str]]) -> List[str]:
    """Every ``X wall, Y CPU`` in README.md must be a row of the table."""
    pairs = {(w, c) for w, c in rows.values()}
    text = (ROOT / "README.md").read_text()
    found = README_DURATION.findall(text)
    problems = [f"README.md states '{w} wall, {c} CPU', which is no row of the durations table in docs/benchmarks.md"
                for w, c in found if (w, c) not in pairs]
    if not found:
        problems.append("README.md states no 'N s wall, M s CPU' duration; the two commands need theirs")
    return problems


def time_command(where: str, cmd: str, scratch: Path, env: Dict[str, str]) -> Tuple[float, float, int]:
    """Run ``cmd`` once; return (wall s, CPU s of the command and its children, exit code)."""
    if where == "clone":
        clone = scratch / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        cwd = clone
    else:
        cwd = ROOT if where == "repo" else scratch
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(["bash", "-c", cmd.format(scratch=scratch)], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, r.returncode


def main(argv: Optional[List[str]] = None) -> int:
    """Run the checks; return the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--times", action="store_true", help="time the quick rows of the durations table again")
    p.add_argument("--all", action="store_true", help="with --times: every row, the long ones too (tens of minutes)")
    p.add_argument("--strict-times", action="store_true", help="fail when a timed row is off by more than --tolerance")
    p.add_argument("--tolerance", type=float, default=2.0, help="allowed factor between measured and stated CPU time (default 2)")
    p.add_argument("--only", default=None, metavar="TEXT", help="run only the samples whose file:line or command contains TEXT")
    p.add_argument("--list", action="store_true", help="list the marked samples and the timed rows, run nothing")
    p.add_argument("--static", action="store_true",
                   help="only the checks that run nothing: the markers, the durations table, README's durations")
    p.add_argument("--update", action="store_true",
                   help="write each differing sample's real output into the docs (review the change with git diff)")
    args = p.parse_args(argv)
    if args.tolerance <= 1:
        p.error(f"--tolerance must be > 1, got {args.tolerance}")

    files = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    blocks = [b for f in files for b in marked_blocks(f)]
    problems: List[str] = []
    try:
        rows = durations_table(blocks)
    except ValueError as exc:
        print(f"doc_check: {exc}", file=sys.stderr)
        return 1
    problems += check_readme_durations(rows)
    problems += check_links(files)
    runs = [b for b in blocks if b.kind == "run"]
    if args.only:
        runs = [b for b in runs if args.only in b.where or args.only in "\n".join(b.lines)]
    for b in runs:
        if not split_commands(b.lines)[0]:
            problems.append(f"{b.where}: a run block without a '$ ' command")
    if args.static:
        for problem in problems:
            print(f"\n{problem}", file=sys.stderr)
        print(f"doc_check (static): {'ok' if not problems else f'{len(problems)} problem(s)'}; "
              f"{len(runs)} samples, {len(rows)} timed rows")
        return 1 if problems else 0
    if args.list:
        for b in blocks:
            print(f"{b.where}: {b.kind} {' '.join(k + ('=' + v if v else '') for k, v in b.options.items())}")
        for name, (_, _, quick) in TIMED.items():
            print(f"timed ({'quick' if quick else 'long'}): {name}")
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="gradcomp-doc-check-"))
    try:
        env = shims(scratch / ".bin")
        for b in blocks:
            if b.kind == "script":
                name = b.options and next(iter(b.options))
                if not name:
                    problems.append(f"{b.where}: doc-check script needs a file name")
                    continue
                (scratch / name).write_text("\n".join(b.lines) + "\n")
        print(f"doc_check: {len(runs)} samples", flush=True)
        for b in reversed(runs) if args.update else runs:  # from the end: rewriting keeps earlier line numbers
            problem, output = run_block(b, scratch, env)
            if problem and args.update and output and len(split_commands(b.lines)[0]) == 1:
                update_block(b, output)
                print(f"  updated {b.where}", flush=True)
            elif problem:
                problems.append(problem)
        if args.times:
            print("doc_check: durations (stated in docs/benchmarks.md -> measured now)", flush=True)
            for name, (where, cmd, quick) in TIMED.items():
                if not (quick or args.all):
                    continue
                wall, cpu, code = time_command(where, cmd, scratch, env)
                stated_wall, stated_cpu = (parse_duration(x) for x in rows[name])
                ratio = cpu / stated_cpu if stated_cpu else float("nan")
                verdict = "ok" if stated_cpu and 1 / args.tolerance <= ratio <= args.tolerance else "DIFFERS"
                if code != 0:
                    verdict = f"FAILED (exit {code})"
                print(f"  {name}: wall {rows[name][0]} -> {format_duration(wall)}, CPU {rows[name][1]} -> "
                      f"{format_duration(cpu)} ({ratio:.2f}x) {verdict}", flush=True)
                if code != 0 or (args.strict_times and verdict != "ok"):
                    problems.append(f"durations: {name}: {verdict}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for problem in problems:
        print(f"\n{problem}", file=sys.stderr)
    print(f"doc_check: {'ok' if not problems else f'{len(problems)} problem(s)'}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
