"""``zsl run PIPELINE.yaml``: the living pipeline, one command a scheduler runs every day."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jobs.common import BadInput, key_values, read_yaml, run_guarded


def _deep_set(spec: dict, dotted: str, value) -> None:
    """``a.b.c=v`` into nested mappings (a section given as null becomes a mapping)."""
    keys = dotted.split(".")
    node = spec
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def run(
    spec: Path = typer.Argument(..., help="Pipeline spec (YAML): inputs, encoder, classes, model, label, index, root."),
    set: Optional[list[str]] = typer.Option(None, "--set", help="Override a spec key: --set label.top_k=3 (repeatable)."),
    wait: float = typer.Option(0.0, min=0, help="Seconds to wait for another run of this pipeline to finish "
                                                "(default: exit 75 at once)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars while stages work."),
) -> None:
    """Bring a pipeline up to date: extract new input, embed changed classes, train again only when the seen-class
    data changed, label new shards (relabel with a diff when classes or model changed), add to the index.
    Writes ROOT/runs/<run>/record.json and report.html. Exit 0 done, 2 bad spec or input (nothing changed),
    3 done with failed items (listed; retried next run), 1 failed part-way (rerun resumes), 75 another run holds the lock."""
    code = {"value": 0}

    def body() -> None:
        from pipeline.core.config import build_config
        from pipeline.flows.living import run_pipeline

        values = read_yaml(spec)
        for k, v in key_values(set).items():
            _deep_set(values, k, v)
        if not values:
            raise BadInput(f"{spec}: an empty pipeline spec")
        cfg = build_config("run", (str(spec), values))
        rec = run_pipeline(cfg, spec=str(spec.resolve()), progress=progress, wait_s=wait)
        for s in rec.stages:
            typer.echo(f"{s.name:9s} {s.status:12s} {s.did or ''}" + (f"  [{len(s.failed)} failed]" if s.failed else ""))
            pairs = (s.details.get("diff") or {}).get("pairs") or []
            if pairs:
                typer.echo(" " * 22 + "moved: " + ", ".join(f"{p['old']} -> {p['new']} {p['n']}" for p in pairs[:6])
                           + (f" and {len(pairs) - 6} more" if len(pairs) > 6 else ""))
        report = f"{cfg.root}/runs/{rec.run_id}/report.html"
        typer.echo(f"{rec.status} (exit {rec.exit_code})" + (f": {rec.message}" if rec.message else "")
                   + ("" if rec.exit_code == 75 else f"; report: {report}"))
        code["value"] = rec.exit_code or 0

    run_guarded(body)
    if code["value"]:
        raise typer.Exit(code["value"])
