"""jobs/ is thin and acyclic: no jobs module imports (at the top or inside a function) a jobs module
that imports it back, and every console command is registered once."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _jobs_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("jobs.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "jobs":
                out |= {f"jobs.{a.name}" for a in node.names}
            elif node.module.startswith("jobs."):
                out.add(node.module)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Modules from which an import chain leads back to themselves."""
    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph.get(m, ()))
        return seen
    return sorted(m for m in graph if m in reachable(m))


def test_no_jobs_module_imports_one_that_imports_it_back():
    cycles = _cycles({f"jobs.{p.stem}": _jobs_imports(p) for p in (ROOT / "jobs").glob("*.py")})
    assert not cycles, f"import cycle through {cycles}"


def test_the_checker_sees_a_function_level_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from jobs.cli import main\n    from jobs import common\n")
    assert _jobs_imports(bad) == {"jobs.cli", "jobs.common"}
    assert _cycles({"jobs.cli": {"jobs.interop"}, "jobs.interop": {"jobs.cli"}, "jobs.common": set()}) == \
        ["jobs.cli", "jobs.interop"]


def test_every_command_is_registered_once():
    from jobs.cli import app

    names = [c.name for c in app.registered_commands]
    assert len(names) == len(set(names)) == 18
    assert {"run", "embed-text", "export", "import", "demo-data", "add-classes"} <= set(names)
