"""``make bench-compare BASE=<rev>``: this tree's benchmarks side by side with another revision's.

A refactor claims "behaviour unchanged"; this measures it. The base revision is checked out with
``git worktree`` into a temporary folder and both trees run the same benchmark commands with the same
interpreter and venv (``PYTHONPATH`` picks the tree), in alternating order (base, this, this, base, ...)
so that load from other work on a shared machine hits both alike:

- ``scale``: ``benchmarks.bench_scale --rows N --no-autofaiss --extract-images 0`` (labeling and our
  index at N rows: chosen factory, tuned parameters, recall, latency, build time, peak RSS);
- ``serve``: ``benchmarks.bench_serve --server text_backend=onnx`` (QPS and p50/p99 of ``zsl serve``
  on loopback, zipf and unique phases).

Writes one JSON with every run's headline figures, their medians per side and the ratio this/base of
each median, and prints a table. Figures that must not move at all (factory, search parameters,
recall) are listed separately from timings, which only need to agree within noise.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import typer

LOG = logging.getLogger("zsl.bench_compare")
REPO = Path(__file__).resolve().parent.parent
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

#: figures that a behaviour-preserving change must leave exactly as they were
EXACT = ("index.factory", "index.search_params", "index.recall_at_1", "index.recall_at_10", "index.recall_at_100")


def _scale_figures(path: Path) -> dict:
    s = json.loads(path.read_text())["scales"][0]
    ours, label = s["index"]["ours"], s["label"]
    return {"index.factory": ours["factory"], "index.search_params": ours["search_params"],
            **{f"index.{k}": ours[k] for k in ("recall_at_1", "recall_at_10", "recall_at_100")},
            "index.build_seconds": ours["build_seconds"], "index.single_query_p50_ms": ours["single_query_p50_ms"],
            "index.single_query_p99_ms": ours["single_query_p99_ms"], "index.peak_rss_mb": ours["peak_rss_mb"],
            "label.rows_per_s": label["pipeline"]["median_rows_per_s"],
            "label.peak_rss_mb": label["pipeline"]["median_peak_rss_mb"], "label.ratio_to_bare": label["ratio"]}


def _serve_figures(path: Path) -> dict:
    (server,) = json.loads(path.read_text())["servers"].values()
    return {f"serve.{phase}.{k}": r[k] for phase, r in server["phases"].items()
            for k in ("qps", "p50_ms", "p99_ms", "errors")}


BENCHES = {
    "scale": (lambda rows: ["-m", "benchmarks.bench_scale", "--rows", str(rows), "--no-autofaiss",
                            "--extract-images", "0"], _scale_figures),
    "serve": (lambda rows: ["-m", "benchmarks.bench_serve", "--rows", str(rows), "--server", "text_backend=onnx"],
              _serve_figures),
}


def _run(tree: Path, bench: str, rows: int, out: Path) -> dict:
    args, figures = BENCHES[bench]
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run([sys.executable, *args(rows), "--output", str(out)], cwd=tree, env=env, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    return figures(out)


def _summary(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for key in runs["this"][0]:
        base, this = [r[key] for r in runs["base"]], [r[key] for r in runs["this"]]
        if key in EXACT or isinstance(this[0], str):
            out[key] = {"base": sorted(set(map(str, base))), "this": sorted(set(map(str, this))),
                        "same": set(map(str, base)) == set(map(str, this))}
        else:
            mb, mt = statistics.median(base), statistics.median(this)
            out[key] = {"base_median": mb, "this_median": mt, "ratio": round(mt / mb, 3) if mb else None,
                        "base": base, "this": this}
    return out


@app.command()
def main(base: str = typer.Option(..., help="Git revision to compare with (e.g. the commit before a refactor)."),
         bench: list[str] = typer.Option(["scale", "serve"], help="Benchmarks to run: scale, serve."),
         repeats: int = typer.Option(3, min=1, help="Runs per side, alternating."),
         rows: int = typer.Option(100_000, min=1000),
         output: Path = typer.Option(REPO / "benchmarks" / "results" / "compare.json")) -> None:
    """Run the benchmarks on ``base`` and on this tree, alternating; write medians and ratios."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory(prefix="zsl-compare-") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), base], cwd=REPO, check=True,
                       capture_output=True)
        try:
            result = {"base": base, "this": head.stdout.strip(), "rows": rows, "repeats": repeats, "benches": {}}
            for b in bench:
                runs: dict[str, list[dict]] = {"base": [], "this": []}
                for r in range(repeats):
                    order = [("base", base_tree), ("this", REPO)]
                    for side, tree in (order if r % 2 == 0 else order[::-1]):
                        LOG.info("%s run %d/%d on %s", b, r + 1, repeats, side)
                        runs[side].append(_run(tree, b, rows, Path(tmp) / f"{b}-{side}-{r}.json"))
                result["benches"][b] = _summary(runs)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, capture_output=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    for b, figures in result["benches"].items():
        for key, f in figures.items():
            shown = (f"same: {f['this']}" if f["same"] else f"CHANGED: {f['base']} -> {f['this']}") if "same" in f \
                else f"{f['base_median']:.4g} -> {f['this_median']:.4g} (x{f['ratio']})"
            typer.echo(f"{key:34s} {shown}")


if __name__ == "__main__":
    app()
