"""``make bench-relabel``: relabelling a labels output in place, with its label diff, against labelling
the same rows fresh.

Synthesizes ``--rows`` feature rows in ``--shards`` shards of ``--dim``-d class-clustered features
(written by the project's feature writer, :func:`pipeline.core.features.write_feature_shard`), a class
set of ``--classes`` classes whose text embeddings share the features' latent structure, an ESZSL-form
model mapping the features onto their class's text embedding, and the same class set with ``--added`` more classes
(what ``zsl add-classes`` makes, without a text model). A labels output against the first set is
labelled once (not timed). Then, alternating which goes first, ``--repeats`` times, each a
``zsl label`` process against the enlarged set:

- **fresh**: into an empty directory;
- **relabel**: ``--overwrite`` on a copy of the old output (copied before, not timed): relabelled in
  place, shard by shard, writing ``diffs/0001`` (the rows whose top-1 changed) and its summary.

Reports medians of ``run_label``'s own seconds (the manifest's ``seconds_last_run``; the goal is
relabel <= 1.2x fresh) and of the processes' wall seconds, the peak RSS of each process tree, and
the diff (rows compared and moved, bytes on disk). Checks that the relabelled labels equal the fresh
ones and that the diff lists exactly the rows whose top-1 differs from the old output's. Writes
``benchmarks/results/relabel.json``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from benchmarks.bench import interleaved, median, ratio, synthetic_features
from benchmarks.cli import run_app
from benchmarks.scale_memory import mb, run_measured, subprocess_env

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
GOAL_RATIO = 1.2
app = typer.Typer(add_completion=False)


def make_world(work: Path, *, rows: int, shards: int, dim: int, n_classes: int, added: int, seed: int = 0) -> dict:
    """Features, the two class sets and the model under ``work`` (see the module docstring)."""
    from pipeline.core.features import write_feature_shard
    from pipeline.core.manifests import FeaturesManifest, write_manifest
    from pipeline.core.vectors import l2n
    from pipeline.semantics.classset import write_class_set
    from pipeline.zsl.models import save_model
    from pipeline.zsl.models.eszsl import ESZSL

    rng = np.random.default_rng(seed)
    total, rank, text_dim = n_classes + added, 16, 384
    Z = rng.standard_normal((total, rank)).astype(np.float32)
    B = rng.standard_normal((rank, dim)).astype(np.float32) / math.sqrt(rank)
    centers = (np.maximum(Z @ B, 0.0) * 0.6).astype(np.float32)
    A = rng.standard_normal((rank, text_dim)).astype(np.float32)
    text = l2n(Z @ A + 0.3 * rng.standard_normal((total, text_dim)).astype(np.float32))
    names = [f"class_{i:04d}" for i in range(total)]
    meta = {"source": "synthetic (benchmarks.bench_relabel)", "text_model": "minilm", "text_model_name": "minilm",
            "pretrained": None, "templates": ["a photo of a {name}."], "text_dim": text_dim}
    write_class_set(str(work / "classes"), names[:n_classes], [None] * n_classes, text[:n_classes], None, meta)
    write_class_set(str(work / "classes-added"), names, [None] * total, text, None, meta)
    # an ESZSL-form model (image -> text space by V) whose V maps feature rows onto their class's text
    # embedding (least squares on a sample of every class): its labels are meaningful, and the added
    # classes take their images, as a good model trained on them would do
    n_seen = max(2, n_classes * 3 // 4)
    y_fit = np.repeat(np.arange(total), 8)
    X_fit = l2n(synthetic_features(rng, centers, y_fit, noise=0.5))
    model = ESZSL()
    model.V = np.linalg.lstsq(X_fit, text[y_fit], rcond=None)[0].astype(np.float32)
    save_model(str(work / "model"), model, {
        "feature_model": "synthetic", "feature_dim": dim, "semantics": "text", "semantic_dim": text_dim,
        "text_model": "minilm", "text_model_name": "minilm", "text_pretrained": None,
        "templates": ["a photo of a {name}."], "seen": names[:n_seen], "gamma": 0.0, "calibration": None})
    per = -(-rows // shards)
    for sid in range(shards):  # every class, the added ones too: their images move to them
        s, e = sid * per, min(rows, (sid + 1) * per)
        y = rng.integers(0, total, e - s)
        ids = [f"img/{i:09d}" for i in range(s, e)]
        write_feature_shard(str(work / "features"), sid, image_ids=ids, uris=[f"synthetic://{i}" for i in ids],
                            labels=np.asarray(names, object)[y].tolist(),
                            X=synthetic_features(rng, centers, y, noise=0.5))
    write_manifest(str(work / "features"), FeaturesManifest(model_id="synthetic", dim=dim, n_images=rows,
                                                            n_shards=shards, notes={"seed": seed}))
    return {k: str(work / k) for k in ("features", "classes", "classes-added", "model")}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _check(old: Path, fresh: Path, relabelled: Path) -> dict:
    """Relabelled labels == fresh labels; the diff holds exactly the rows whose top-1 changed."""
    import pyarrow.compute as pc

    from pipeline.core import fs as zio
    from pipeline.core import parquet as zpq
    from pipeline.core.manifests import LabelsManifest, read_manifest

    cols = ["image_id", "top1", "topk"]
    a = zpq.read_parquet_dir(str(old / "labels"), ["image_id", "top1"])
    f = zpq.read_parquet_dir(str(fresh / "labels"), cols)
    r = zpq.read_parquet_dir(str(relabelled / "labels"), cols)
    if not r.equals(f):
        raise RuntimeError("the relabelled labels differ from the fresh ones")
    moved = pc.not_equal(a.column("top1"), f.column("top1"))
    where = relabelled / read_manifest(str(relabelled), LabelsManifest).last_diff
    diff, summary = zpq.read_parquet_dir(str(where)), zio.read_json(str(where / "summary.json"))
    if sorted(diff.column("image_id").to_pylist()) != sorted(pc.filter(a.column("image_id"), moved).to_pylist()):
        raise RuntimeError("the diff does not list exactly the rows whose top-1 changed")
    return {"rows_compared": summary["compared"], "moved": summary["moved"],
            "moved_share": round(summary["moved"] / max(1, summary["compared"]), 4),
            "pairs": len(summary["pairs"]), "shards": len(list(where.glob("shard-*.parquet"))),
            "bytes": _dir_bytes(relabelled / "diffs"), "labels_bytes": _dir_bytes(relabelled / "labels"),
            "checked": "relabelled == fresh labels; diff == rows whose top-1 changed"}


@app.command()
def run(rows: int = typer.Option(1_000_000), shards: int = typer.Option(10), dim: int = typer.Option(384),
        classes: int = typer.Option(200, help="Classes before the relabel."),
        added: int = typer.Option(50, help="Classes added before the relabel."),
        repeats: int = typer.Option(3), output: Path = typer.Option(RESULTS / "relabel.json"),
        keep: bool = typer.Option(False, help="Keep the work directory.")) -> None:
    """Time `zsl label` fresh vs an in-place relabel with its diff (medians, alternating)."""
    from pipeline.core.config import LabelConfig
    from pipeline.stages.label import run_label

    work = Path(tempfile.mkdtemp(prefix="zsl-bench-relabel-"))
    env = subprocess_env(work)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TQDM_DISABLE"] = "1"
    try:
        t0 = time.perf_counter()
        w = make_world(work, rows=rows, shards=shards, dim=dim, n_classes=classes, added=added)
        old = work / "old"
        run_label(LabelConfig(model=w["model"], features=w["features"], classes=w["classes"], output=str(old)),
                  progress=False)
        prep_s = time.perf_counter() - t0
        runs: dict[str, list[dict]] = {"fresh": [], "relabel": []}

        def label(kind: str, r: int, out: Path, *extra: str) -> float:
            cmd = [sys.executable, "-c", "from jobs.cli import run; run()", "label", "--model", w["model"],
                   "--features", w["features"], "--classes", w["classes-added"], "--output", str(out), *extra]
            m = run_measured(cmd, log=work / "logs" / f"{kind}-{r}.log", env=env, cwd=str(REPO),
                             what=f"zsl label ({kind})")
            man = json.loads((out / "manifest.json").read_text())
            if man["n_labeled_this_run"] != rows:
                raise RuntimeError(f"{kind}: labelled {man['n_labeled_this_run']} of {rows} rows")
            runs[kind].append({"seconds": round(man["seconds_last_run"], 3), "wall_s": round(m["seconds"], 3),
                               "peak_rss_mb": mb(m["peak_rss_bytes"])})
            return man["seconds_last_run"]

        def fresh(r: int) -> float:
            shutil.rmtree(work / "fresh", ignore_errors=True)
            return label("fresh", r, work / "fresh")

        def relabel(r: int) -> float:
            shutil.rmtree(work / "relabel", ignore_errors=True)
            shutil.copytree(old, work / "relabel")  # a finished output against the old classes (not timed)
            return label("relabel", r, work / "relabel", "--overwrite")

        relabel_s, fresh_s = interleaved(repeats, relabel, fresh)
        diff = _check(old, work / "fresh", work / "relabel")
        med = {k: {"seconds": median([x["seconds"] for x in v]), "wall_s": median([x["wall_s"] for x in v]),
                   "peak_rss_mb": median([x["peak_rss_mb"] for x in v])} for k, v in runs.items()}
        result = {
            "rows": rows, "shards": shards, "dim": dim, "classes_before": classes, "classes_after": classes + added,
            "repeats": repeats, "fresh": med["fresh"], "relabel": med["relabel"], "runs": runs,
            "ratio": round(ratio(med["relabel"]["seconds"], med["fresh"]["seconds"]), 3),
            "wall_ratio": round(ratio(med["relabel"]["wall_s"], med["fresh"]["wall_s"]), 3),
            "goal_ratio": GOAL_RATIO,
            "meets_goal": ratio(med["relabel"]["seconds"], med["fresh"]["seconds"]) <= GOAL_RATIO,
            "diff": diff, "features_bytes": _dir_bytes(work / "features"), "prep_s": round(prep_s, 1),
            "what": "zsl label against the enlarged class set: into an empty directory (fresh) vs --overwrite "
                    "of a finished output against the old set (relabel in place + label diff); seconds = "
                    "run_label's own (manifest seconds_last_run), wall_s = the process; medians, alternating",
            "cpus": os.cpu_count(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark in-process; return the exit status (2 for usage errors)."""
    return run_app(app, argv, "zsl-bench-relabel")


if __name__ == "__main__":
    sys.exit(main())
