"""scripts/doc_check.py: the docs' sample outputs and durations against real runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "doc_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gradcomp_doc_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


doc_check = _load()


def test_markers_table_and_readme_durations_agree():
    r = subprocess.run([sys.executable, str(SCRIPT), "--static"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_stale_sample_is_caught(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("<!-- doc-check: run stderr -->\n```\n$ echo 672552 3.91x\n672552 3.91x\n$ echo 667680 3.93x\n667680 3.92x\n```\n")
    (block,) = doc_check.marked_blocks(doc)
    assert doc_check.split_commands(block.lines) == (["echo 672552 3.91x", "echo 667680 3.93x"], ["672552 3.91x", "667680 3.92x"])
    block.path = ROOT / "x.md"  # for its name in the message only
    problem, output = doc_check.run_block(block, tmp_path, doc_check.shims(tmp_path / "bin"))
    assert output == ["672552 3.91x", "667680 3.93x"]
    assert problem and "-667680 3.92x" in problem and "+667680 3.93x" in problem


def test_broken_links_are_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(doc_check, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "hook.md").write_text("# The DDP hook\n## How a bucket travels\n")
    readme = tmp_path / "README.md"
    readme.write_text("[a](docs/hook.md#how-a-bucket-travels) [b](docs/hook.md#gone) [c](docs/nope.md) [d](https://x.org/y)\n")
    assert doc_check.check_links([readme]) == [
        "README.md: link to docs/hook.md#gone: no such heading in docs/hook.md",
        "README.md: link to docs/nope.md: no such file",
    ]


def test_durations_parse_and_format():
    assert doc_check.parse_duration("1 min 15 s") == 75.0 and doc_check.parse_duration("54 s") == 54.0
    assert doc_check.format_duration(75.2) == "1 min 15 s" and doc_check.format_duration(9.3) == "9 s"
    assert doc_check.README_DURATION.findall("took 1 min 24 s wall, 54 s CPU") == [("1 min 24 s", "54 s")]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_marked_sample_in_the_docs_matches_a_real_run():
    # runs every `<!-- doc-check: run -->` block (the CLI tour, the README's hook snippet on 2 gloo
    # ranks, gradcomp grads, which trains and caches TinyGPT on its first run) and compares outputs
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=880)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
