"""The tree is the layer map: each package imports only packages ranked below it, and nothing cycles.

    core                      fs, atomic writes, parquet, config, schema, resume, features, timing
    inputs, encoders          input layouts and decoding | image and text encoders
    semantics                 class tables, class sets, text/attribute/word-vector semantics
    zsl                       models, bridges, calibration, metrics, transductive, report
    index                     choose, build, store, search, tune; the searcher
    cluster                   all Ray code
    stages                    one module per command, side by side, never importing one another
    flows                     the stages put together: the living pipeline (zsl run) and its run records
    jobs                      the ``zsl`` CLI
    benchmarks                harnesses (never imported by the library or the CLI)

Packages of one rank (inputs and encoders) do not import each other either.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "pipeline", ROOT / "jobs", ROOT / "benchmarks"]

RANKS = {
    "pipeline.core": 0,
    "pipeline.inputs": 1,
    "pipeline.encoders": 1,
    "pipeline.semantics": 2,
    "pipeline.zsl": 3,
    "pipeline.index": 4,
    "pipeline.cluster": 5,
    "pipeline.stages": 6,
    "pipeline.flows": 7,
    "jobs": 8,
    "benchmarks": 9,
}
OURS = ("pipeline", "jobs", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, known: set[str] | None = None) -> set[str]:
    """Every project module a file imports, at top level or inside functions (``from a import b``
    counts as ``a.b`` where ``a.b`` is a module, else as ``a``); relative imports resolved."""
    me = _module_name(path) if path.is_relative_to(ROOT) else path.stem
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in OURS}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.split(".")[0] not in OURS:
                continue
            subs = {f"{mod}.{a.name}" for a in node.names}
            hits = subs & known if known is not None else subs
            out |= hits or {mod}
            if known is not None and subs - hits:
                out.add(mod)
    return out - {"pipeline"}


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for src in SOURCES for p in src.rglob("*.py")}


PATHS = _all_modules()
MODULES = {m: _imports(p, set(PATHS)) for m, p in PATHS.items()}


def _package(name: str) -> str | None:
    """The ranked package a module belongs to (``pipeline.stages.serve.app`` -> ``pipeline.stages``)."""
    for pkg in sorted(RANKS, key=len, reverse=True):
        if name == pkg or name.startswith(pkg + "."):
            return pkg
    return None


def _stage(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def test_every_module_lives_in_a_ranked_package():
    loose = sorted(m for m in MODULES if _package(m) is None and m not in ("pipeline",))
    assert not loose, f"modules outside the layer packages {sorted(RANKS)}: {loose}"


def test_the_map_is_complete():
    stages = {_stage(m) for m in MODULES if _stage(m)}
    assert {"extract", "classes", "train", "evaluate", "label", "index", "search", "report", "serve"} <= stages
    assert {_package(m) for m in MODULES} >= set(RANKS)


def _violations(modules: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, imports in sorted(modules.items()):
        pkg = _package(mod)
        for imp in sorted(imports):
            ipkg = _package(imp)
            if pkg is None or ipkg is None or ipkg == pkg:
                continue
            if RANKS[ipkg] >= RANKS[pkg]:
                bad.append(f"{mod} ({pkg}, rank {RANKS[pkg]}) imports {imp} ({ipkg}, rank {RANKS[ipkg]})")
    return bad


def test_no_package_imports_a_package_of_its_rank_or_higher():
    bad = _violations(MODULES)
    assert not bad, "layer violations:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _stage(m)))
def test_no_stage_imports_another_stage(module):
    others = sorted(i for i in MODULES[module] if _stage(i) and _stage(i) != _stage(module))
    assert not others, f"{module} imports the stage(s) {others}; move what they share to a lower layer"


def _cycles(modules: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in modules.get(v, ()):
            if w not in modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in modules.get(v, ()):
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(modules):
        if v not in index:
            visit(v)
    return out


def _without_package_inits(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` importing its own submodules is how registries load; a submodule
    importing a name from its package ``__init__`` is then not a cycle of code."""
    return {m: {i for i in imps if not (m.startswith(i + ".") or i.startswith(m + "."))} for m, imps in modules.items()}


def test_no_import_cycles():
    cycles = _cycles(_without_package_inits(MODULES))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# ---- one job per module: small modules, small functions --------------------------------------------------

MAX_MODULE_LINES = 420  # "about 400"
MAX_FUNCTION_LINES = 60
LIBRARY = {m: p for m, p in PATHS.items() if m.split(".")[0] in ("pipeline", "jobs")}


def _long_functions(path: Path, limit: int) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return [f"{shown}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > limit]


def test_modules_stay_small():
    big = sorted(f"{p.relative_to(ROOT)} ({n} lines)" for p in LIBRARY.values()
                 if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES)
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split them by role): {big}"


def test_functions_stay_small():
    long = [f for p in LIBRARY.values() for f in _long_functions(p, MAX_FUNCTION_LINES)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into steps): {long}"


def test_the_size_checker_sees_a_long_function(tmp_path):
    f = tmp_path / "long.py"
    f.write_text("def short():\n    return 1\n\n\ndef long():\n" + "    x = 1\n" * 70)
    assert _long_functions(f, MAX_FUNCTION_LINES) == ["long.py:5 long (71 lines)"]


# ---- the guard can fail ------------------------------------------------------------------------------------

def test_the_checker_sees_a_lower_layer_importing_a_higher_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pipeline.stages.train import run_train\n")
    imports = _imports(bad, set(PATHS))
    assert "pipeline.stages.train" in imports
    assert _violations({"pipeline.core.fs": imports}) and not _violations({"jobs.cli": imports})
    assert _violations({"pipeline.inputs.images": {"pipeline.encoders.image"}})  # one rank, two packages


def test_the_checker_sees_a_stage_importing_a_stage():
    assert _stage("pipeline.stages.train") == "train" and _stage("pipeline.stages.serve.app") == "serve"


def test_the_checker_sees_a_cycle():
    assert _cycles({"jobs.a": {"jobs.b"}, "jobs.b": {"jobs.c"}, "jobs.c": {"jobs.a"}, "jobs.d": {"jobs.a"}}) == [
        ["jobs.a", "jobs.b", "jobs.c"]]
    assert _cycles({"jobs.a": {"jobs.b"}, "jobs.b": set()}) == []


def test_importing_a_stage_loads_no_other_stage():
    """At run time too: ``import pipeline.stages.search`` loads no sibling stage and no Ray."""
    code = ("import sys, pipeline.stages.search; "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.stages.') or m == 'ray'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "['pipeline.stages.search']"
