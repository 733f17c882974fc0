"""The library is layers, not a stack: each module imports only modules of lower layers.

base       io, config, schema, resume
artifacts  features, shards, shard_readers, images, encoders, text_onnx, semantics, classset, wordvectors, models/*,
           calibration, metrics, transductive, faiss_index, report, ray_stages, demo_data
stages     stages/* : side by side, never importing one another
jobs       the CLI: config + logging + one stage call
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pipeline"

BASE = {"pipeline.core.fs", "pipeline.core.config", "pipeline.core.schema", "pipeline.core.resume"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``pipeline.*`` module a file imports, at top level or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pipeline")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from pipeline.core import fs as io`
    return out - {"pipeline"}


def _modules() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def _stage(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def _layer(name: str) -> int:
    if name in BASE:
        return 0
    if name.startswith("pipeline.stages"):
        return 2
    return 1


MODULES = _modules()


def test_the_map_is_complete():
    stages = {_stage(m) for m in MODULES if _stage(m)}
    assert {"extract", "classes", "train", "evaluate", "label", "index", "search", "report"} <= stages


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _stage(m)))
def test_no_stage_imports_another_stage(module):
    others = sorted(i for i in MODULES[module] if _stage(i) and _stage(i) != _stage(module))
    assert not others, f"{module} imports the stage(s) {others}; move what they share to a lower layer"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module):
    known = [i for i in MODULES[module] if i in MODULES]
    higher = sorted(i for i in known if _layer(i) > _layer(module))
    assert not higher, f"{module} (layer {_layer(module)}) imports higher-layer modules {higher}"


def test_the_checker_sees_a_stage_importing_a_stage(tmp_path):
    """The guard can fail: a stage importing a sibling is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pipeline.stages.train import run_train\n")
    assert "pipeline.stages.train.run_train" in _imports(bad)
    assert _stage("pipeline.stages.train") == "train" and _stage("pipeline.stages.label") == "label"


def test_importing_a_stage_loads_no_other_stage():
    """At run time too: ``import pipeline.stages.search`` loads no sibling stage and no Ray."""
    code = ("import sys, pipeline.stages.search; "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.stages.') or m == 'ray'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "['pipeline.stages.search']"
