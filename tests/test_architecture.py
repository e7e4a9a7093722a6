"""Guards over the whole package: module sizes, no import circles, the layers, tests laid out like the source.

Imports are read from the source with ``ast``, every one of them: at module level, inside functions
(an import inside a function to dodge a circle is still a circle) and under ``TYPE_CHECKING``.
``from pkg import name`` counts as an import of ``pkg.name`` where that is a module, else of ``pkg``.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gradcomp"
MAX_LINES = 600

#: bottom up; a module may import its own layer and the ones below, nothing above
LAYERS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("base", ("gradcomp._version", "gradcomp._deprecated", "gradcomp.checks", "gradcomp.batches", "gradcomp.files")),
    ("codec", ("gradcomp.codec",)),
    ("comm", ("gradcomp.comm",)),
    ("quant", ("gradcomp.quant",)),
    ("analysis", ("gradcomp.analysis",)),
    ("top", ("gradcomp", "gradcomp.integrations", "gradcomp.plots", "gradcomp.examples", "gradcomp.cli")),
)
#: comm and quant are peers: neither imports the other
PEERS = {"comm": "quant", "quant": "comm"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=1)
def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


@lru_cache(maxsize=1)
def _extensions() -> Set[str]:
    """Compiled extension modules (the native kernels): leaves of the graph."""
    out = set()
    for p in PKG.rglob("*"):
        if p.suffix in (".so", ".pyd"):
            rel = p.relative_to(ROOT)
            out.add(".".join(list(rel.parts[:-1]) + [rel.name.split(".")[0]]))
    return out


def _imports(name: str) -> List[Tuple[str, int, bool]]:
    """``(imported gradcomp module, line, inside a function)`` of every import statement in module ``name``."""
    mods, path = _modules(), _modules()[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: List[Tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name in mods:
                        found.append((a.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if not target.startswith("gradcomp"):
                    continue
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    if sub in _extensions():
                        continue
                    found.append((sub if sub in mods else target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return [(t, line, f) for t, line, f in found if t != name]


@lru_cache(maxsize=1)
def _graph() -> Dict[str, Set[str]]:
    return {m: {t for t, _, _ in _imports(m)} for m in _modules()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """Return one import cycle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search, iterative)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {m: WHITE for m in graph}
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        color[start] = GREY
        while stack:
            node, children = stack[-1]
            for child in children:
                if color.get(child, BLACK) == GREY:
                    return path[path.index(child):] + [child]
                if color.get(child) == WHITE:
                    color[child] = GREY
                    path.append(child)
                    stack.append((child, iter(sorted(graph[child]))))
                    break
            else:
                color[node] = BLACK
                path.pop()
                stack.pop()
    return None


def layer_of(module: str) -> str:
    """The layer a module belongs to: the longest matching prefix in :data:`LAYERS`."""
    best, best_len = None, -1
    for layer, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = layer, len(p)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_architecture.py's LAYERS: place it there")
    return best


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py")))
def test_no_module_over_600_lines(path):
    lines = len((PKG / path).read_text().splitlines())
    assert lines <= MAX_LINES, f"gradcomp/{path} has {lines} lines (at most {MAX_LINES}): split it by its users"


def test_no_import_circles():
    cycle = find_cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_circles_hidden_in_functions():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # the reader counts an import inside a function like any other: pick a real one
    lazy = [(m, t) for m in _modules() for t, _, inside in _imports(m) if inside]
    assert lazy, "no function-level import found: the reader no longer sees them"
    m, t = lazy[0]
    assert t in _graph()[m]


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_ones():
    order = [name for name, _ in LAYERS]
    bad = []
    for m in sorted(_modules()):
        lm = layer_of(m)
        for t, line, _ in _imports(m):
            lt = layer_of(t)
            if order.index(lt) > order.index(lm) or PEERS.get(lm) == lt:
                bad.append(f"{m}:{line} ({lm}) imports {t} ({lt})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_codec_imports_neither_comm_quant_nor_analysis():
    for m in _modules():
        if layer_of(m) == "codec":
            assert not {layer_of(t) for t in _graph()[m]} & {"comm", "quant", "analysis", "top"}, m


def test_comm_and_quant_do_not_import_the_analysis_layer():
    for m in _modules():
        if layer_of(m) in ("comm", "quant"):
            assert "analysis" not in {layer_of(t) for t in _graph()[m]}, m


def test_cli_integrations_examples_are_imported_by_nobody_below_and_plots_only_lazily():
    bad = []
    for m in sorted(_modules()):
        for t, line, inside in _imports(m):
            for top in ("gradcomp.cli", "gradcomp.integrations", "gradcomp.examples"):
                # gradcomp.__main__ is the top: `python -m gradcomp` runs the command line
                if (t == top or t.startswith(top + ".")) and not (m == top or m.startswith(top + ".")) and not m.startswith("gradcomp.cli") \
                        and m != "gradcomp.__main__":
                    bad.append(f"{m}:{line} imports {t}")
            if (t == "gradcomp.plots" or t.startswith("gradcomp.plots.")) and not m.startswith("gradcomp.plots") and not inside:
                bad.append(f"{m}:{line} imports {t} at module level (plots need matplotlib: import them inside the function)")
    assert not bad, "\n".join(bad)


def test_tests_are_laid_out_like_the_source():
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    dirs = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    project = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name in ("launch", "examples", "scripts")}
    extra = dirs - packages - project
    assert not extra, f"tests/{sorted(extra)} match no gradcomp/<package> (nor launch/, examples/, scripts/): move them where their code is"
    # a test file sits next to the others of its package: at the top only the package-wide ones and those
    # of gradcomp's top-level modules (tests/test_files.py for gradcomp/files.py)
    modules = {f"test_{p.stem}.py" for p in PKG.glob("*.py") if not p.name.startswith("_")}
    top = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert top <= {"test_architecture.py", "test_layout.py"} | modules, top


# ---------------------------------------------------------------------------------------------
# docs/architecture.md is true to the tree


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_the_architecture_page_names_every_module_and_only_real_ones():
    import re

    page = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`(gradcomp/[\w/]+\.py)`", _section(page, "Modules")))
    tree = {str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert not tree - named, f"docs/architecture.md does not describe {sorted(tree - named)}"
    everywhere = set(re.findall(r"`(gradcomp/[\w/]+\.py)`", page))
    missing = {p for p in everywhere if not (ROOT / p).exists()}
    assert not missing, f"docs/architecture.md names modules that do not exist: {sorted(missing)}"


def test_the_architecture_page_shows_the_layers_the_test_enforces():
    import re

    page = (ROOT / "docs" / "architecture.md").read_text()
    rows = [line for line in _section(page, "Layers").splitlines()
            if line.startswith("| ") and not line.startswith("| layer") and not line.startswith("|---")]
    shown = tuple((cells[0], tuple(re.findall(r"`([\w.]+)`", cells[1])))
                  for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows))
    assert shown == LAYERS, f"docs/architecture.md's layer table {shown} is not the enforced one {LAYERS}"


ALIAS_MODULES = ("gradcomp.sensitivity", "gradcomp.mixed_precision", "gradcomp.costmodel", "gradcomp.gradexp",
                 "gradcomp.weights", "gradcomp.activations", "gradcomp.fsdp")


def test_nothing_of_the_project_uses_an_old_import_path():
    """The package, the CLI, launch/, benchmarks/, examples/ and tests import the new paths (aliases are for users)."""
    files = [p for d in ("gradcomp", "launch", "benchmarks", "examples", "tests") for p in (ROOT / d).rglob("*.py")]
    allowed = {PKG / "__init__.py", ROOT / "tests" / "test_layout.py", ROOT / "tests" / "test_architecture.py"}
    allowed |= {PKG / (m.split(".")[1] + ".py") for m in ALIAS_MODULES}
    bad = []
    for path in files:
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "gradcomp":
                names = [f"gradcomp.{node.attr}"]  # gradcomp.fsdp.compress_(...) after `import gradcomp`
            used = [n for n in names if n in ALIAS_MODULES]
            if used:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {used[0]}")
    assert not bad, "old import paths (warned aliases) used inside the project:\n" + "\n".join(bad)
