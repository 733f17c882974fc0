"""``python -m benchmarks.bench_scale``: labeling and indexing at scale, and our index next to autofaiss.

For each row count N (``--rows``, repeatable) the harness

1. **writes synthetic feature shards** in the real feature format (``features/shard-NNNNNN.parquet``
   with :func:`pipeline.core.schema.features_schema`, one zstd Parquet file per shard written atomically
   as ``zsl extract`` does, then the :class:`~pipeline.core.manifests.FeaturesManifest`), shard by shard:
   non-negative, class-clustered 1280-d rows over many classes with a low-rank latent structure plus
   per-row noise (as :func:`benchmarks.bench.synthetic_features`); never all N rows in memory. One
   class set (synthetic 384-d text embeddings) and one ESZSL model (``semantics == "text"``) are
   made once and reused for every N;
2. **labels** them with the installed CLI (``zsl label``) in a subprocess, against a **bare** NumPy
   script in a subprocess too (read each shard's embedding column with pyarrow, ``l2n(X) @ V @ S.T``,
   ``np.argpartition`` top-k, no writing), interleaved (ABBA), with wall time and the peak RSS of the
   whole process tree (polled every ``--poll-ms``; the root process's own ``VmHWM`` too, whichever
   is larger);
3. **indexes** them with ``zsl index --max-memory`` in a subprocess (same timing and RSS polling) and
   reads its manifest (``factory``, ``index_bytes``, ``estimated_bytes``, ``seconds``, ``nprobe`` and,
   where present, ``search_params``, ``tuning``, ``timings``);
4. measures **recall@1/10/100 and latency** of that index independently: the database vectors are the
   feature shards projected by the model (``model.search_images``, as the index stage does), the
   queries 1,000 held-out rows of the same distribution projected the same way, the ground truth exact
   (blocked NumPy); single-query latency (one query per ``search`` call) and batched latency;
5. builds an **autofaiss** (2.18.0, its own venv, ``.venv-tools/autofaiss``) index of the same
   projected vectors in the same run, with the same wall-time and RSS measurement, and measures it
   exactly as ours (loaded in this venv with ``faiss.read_index``; same queries, same ground truth);
6. optionally (``--extract-images``, default 5000) measures **extraction steady state**: one
   ``run_extract`` (Ray already up) and the bare read/decode/encode loop on the same animal-mnist
   images; steady-state rates come from the shard files' mtimes (pipeline) and per-batch times (bare)
   after the first shard/batch, and the fixed costs (Ray start, actor start + model load) are
   reported separately.

Writes one JSON file atomically (default ``benchmarks/results/scale.json``), a markdown table
(``SCALE.md`` beside it) and prints the table. Scratch data lives in a temp dir outside the repo
(``$TMPDIR``), removed at the end unless ``--keep``.

The pieces, beside this module: :mod:`benchmarks.scale_data` (the seeded synthetic world, feature shards,
exact ground truth and recall), :mod:`benchmarks.scale_memory` (subprocesses: wall time, peak RSS),
:mod:`benchmarks.scale_label`, :mod:`benchmarks.scale_index`, :mod:`benchmarks.scale_autofaiss`,
:mod:`benchmarks.scale_extract` and :mod:`benchmarks.scale_report` (SCALE.md, the JSON's interpretation).
"""

from __future__ import annotations

import datetime as _dt
import gc
import logging
import math
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from benchmarks.cli import run_app

from benchmarks.bench import FEATURE_MODEL, RESULTS, machine
from benchmarks.scale_autofaiss import AUTOFAISS_VENV, bench_autofaiss, ensure_autofaiss
from benchmarks.scale_data import DIM, World, ground_truth, make_scale_data
from benchmarks.scale_index import bench_our_index, measure_latencies
from benchmarks.scale_label import bench_label_scale
from benchmarks.scale_memory import rss_polling, subprocess_env
from benchmarks.scale_report import GOALS, NOTES, interpretation, markdown, repo_relative, rss_growth
from pipeline.core.timing import timed

LOG = logging.getLogger("zsl.bench_scale")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Labeling and indexing at scale (subprocesses, peak RSS), our index vs autofaiss.")


@dataclass(frozen=True)
class Settings:
    """What is measured, and how (recorded as the results' ``parameters``)."""

    rows: list[int]
    max_memory: str
    shard_rows: int
    classes: int
    seen: int
    train_per_class: int
    latent_rank: int
    noise: float
    top_k: int
    repeats: int | None
    queries: int
    single_queries: int
    latency_k: int
    latency_rounds: int
    autofaiss: bool
    autofaiss_memory_available: str
    extract_images: int
    extract_shard_size: int
    extract_batch_size: int
    extract_repeats: int
    poll_ms: float
    seed: int

    def parameters(self) -> dict:
        return {**asdict(self), "encoder": FEATURE_MODEL, "dim": DIM}


@app.command()
def scale(
    rows: list[int] = typer.Option([100_000, 1_000_000], "--rows", help="Row counts to run (repeatable)."),
    output: str = typer.Option(str(RESULTS / "scale.json"), help="JSON file to write (atomically)."),
    markdown_out: str | None = typer.Option(None, "--markdown", help="Markdown table (default: SCALE.md beside --output)."),
    max_memory: str = typer.Option("2G", help="Index memory budget for zsl index and autofaiss."),
    shard_rows: int = typer.Option(100_000, min=1, help="Rows per feature shard."),
    classes: int = typer.Option(1000, min=3, help="Classes in the class set."),
    seen: int | None = typer.Option(None, help="Seen (training) classes; default 80% of the classes."),
    train_per_class: int = typer.Option(30, min=2, help="Training rows per seen class."),
    latent_rank: int = typer.Option(32, min=1, help="Rank of the synthetic class structure."),
    noise: float = typer.Option(0.5, min=0.0, help="Per-dimension noise of the synthetic rows."),
    top_k: int = typer.Option(5, min=1, help="top-k of the labeling runs."),
    repeats: int | None = typer.Option(None, min=1, help="Labeling repeats per side (default 3 up to 100k rows, else 1)."),
    queries: int = typer.Option(1000, min=1, help="Held-out queries for recall and batched latency."),
    single_queries: int = typer.Option(200, min=1, help="Queries timed one per search call."),
    latency_k: int = typer.Option(10, min=1, help="k of the single-query latency searches."),
    latency_rounds: int = typer.Option(2, min=1, help="Latency rounds per index, interleaved between the indexes."),
    autofaiss: bool = typer.Option(True, "--autofaiss/--no-autofaiss", help="Build and measure an autofaiss index too."),
    autofaiss_venv: str = typer.Option(str(AUTOFAISS_VENV), help="autofaiss's own venv (created if missing)."),
    autofaiss_memory_available: str = typer.Option("8G", help="autofaiss --current_memory_available."),
    extract_images: int = typer.Option(5000, min=0, max=5000, help="Images for the extraction steady-state run (0: skip)."),
    extract_shard_size: int = typer.Option(250, min=1, help="Images per extraction shard."),
    extract_batch_size: int = typer.Option(64, min=1, help="Images per encoder batch."),
    extract_repeats: int = typer.Option(1, min=1, help="Extraction repeats per side."),
    poll_ms: float = typer.Option(50.0, min=1.0, help="RSS polling interval."),
    workdir: str | None = typer.Option(None, help="Scratch folder (default: a new dir under $TMPDIR)."),
    keep: bool = typer.Option(False, help="Keep the scratch folder."),
    seed: int = typer.Option(0),
) -> None:
    """Label and index N synthetic rows per --rows; compare with bare loops and autofaiss; write JSON + markdown."""
    n_seen = seen if seen is not None else max(2, round(0.8 * classes))
    if not 2 <= n_seen < classes:
        raise typer.BadParameter(f"--seen must be in [2, {classes - 1}]")
    if top_k > classes:
        raise typer.BadParameter("--top-k must not exceed --classes")
    s = Settings(rows=sorted(set(rows)), max_memory=max_memory, shard_rows=shard_rows, classes=classes, seen=n_seen,
                 train_per_class=train_per_class, latent_rank=latent_rank, noise=noise, top_k=top_k, repeats=repeats,
                 queries=queries, single_queries=single_queries, latency_k=latency_k, latency_rounds=latency_rounds,
                 autofaiss=autofaiss, autofaiss_memory_available=autofaiss_memory_available,
                 extract_images=extract_images, extract_shard_size=extract_shard_size,
                 extract_batch_size=extract_batch_size, extract_repeats=extract_repeats, poll_ms=poll_ms, seed=seed)
    result = run_scale(s, output=output, venv=Path(autofaiss_venv), workdir=workdir, keep=keep)
    md_path = markdown_out or str(Path(output).with_name("SCALE.md"))
    write_results(result, output, md_path)


def run_scale(s: Settings, *, output: str, venv: Path, workdir: str | None, keep: bool) -> dict:
    """Measure every N of ``s.rows`` in a scratch folder; the results (what was measured so far go to
    ``<output>.partial.json`` when a step fails)."""
    from pipeline.core import fs as zio

    with timed() as clock:
        result: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        "machine": machine(), "parameters": s.parameters(), "goals": GOALS, "extraction": None,
                        "autofaiss_env": None, "scales": []}
        result["machine"]["rss_polling"] = rss_polling()
        own_work = workdir is None
        work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="zsl-bench-scale-"))
        work.mkdir(parents=True, exist_ok=True)
        tmp = work / "tmp"
        tmp.mkdir(exist_ok=True)
        env = subprocess_env(tmp)
        try:
            _measure(s, result, work, env=env, venv=venv, keep=keep)
        except BaseException as exc:
            # an hour-long run that fails at its largest N keeps what it measured (never over the results)
            partial = Path(output).with_suffix(".partial.json")
            zio.write_json_atomic(str(partial), repo_relative({**result, "error": f"{type(exc).__name__}: {exc}"}))
            LOG.error("failed; the results measured so far are in %s", partial)
            raise
        finally:
            if own_work and not keep:
                shutil.rmtree(work, ignore_errors=True)
            elif keep:
                LOG.info("kept the scratch folder %s", work)
        result["rss_growth"] = rss_growth(result["scales"])
        result["ratios"] = {"label": {str(sc["n_rows"]): sc["label"]["ratio"] for sc in result["scales"]},
                            "extract_steady": (result["extraction"] or {}).get("ratio_steady")}
        result["interpretation"] = interpretation(result)
        result["notes"] = NOTES
        result["total_seconds"] = round(clock.elapsed(), 1)
    for sc in result["scales"]:
        r = sc["label"]["ratio"]
        if not (math.isfinite(r) and r > 0):
            raise RuntimeError(f"N={sc['n_rows']}: labeling ratio {r!r} is not a positive finite number")
    return repo_relative(result)


def _measure(s: Settings, result: dict, work: Path, *, env: dict, venv: Path, keep: bool) -> None:
    """Extraction (unless 0 images), the autofaiss venv, the world, then each N: into ``result``."""
    import numpy as np

    if s.extract_images:
        from benchmarks.scale_extract import bench_extract_steady  # imports torch and Ray

        result["extraction"] = bench_extract_steady(work / "extract", n_images=s.extract_images,
                                                    shard_size=s.extract_shard_size,
                                                    batch_size=s.extract_batch_size, repeats=s.extract_repeats)
    if s.autofaiss:
        result["autofaiss_env"] = ensure_autofaiss(venv, log=work / "logs" / "autofaiss-venv.log")
    LOG.info("preparing the class set and the ESZSL model (%d classes, %d seen)", s.classes, s.seen)
    world = World(work / "shared", n_classes=s.classes, n_seen=s.seen, latent_rank=s.latent_rank, noise=s.noise,
                  train_per_class=s.train_per_class, shard_rows=s.shard_rows, seed=s.seed)
    qX, _ = world.rows(np.random.default_rng([s.seed, 2]), s.queries)
    Q = world.project(qX)
    result["model"] = {"method": world.train_manifest.method, "semantics": world.mman.semantics,
                       "gamma": float(world.train_manifest.gamma), "n_train": world.train_manifest.n_train,
                       "semantic_dim": world.mman.semantic_dim, "prep_seconds": round(world.prep_seconds, 1)}
    for n in s.rows:
        nwork = work / f"n{n}"
        result["scales"].append(_measure_n(s, world, Q, nwork, n, env=env, venv=venv))
        if not keep:
            shutil.rmtree(nwork, ignore_errors=True)


def _measure_n(s: Settings, world: World, Q, work: Path, n: int, *, env: dict, venv: Path) -> dict:
    """One N: its data, labeling, our index and autofaiss's, and their latencies."""
    poll_s = s.poll_ms / 1000.0
    reps = s.repeats or (3 if n <= 100_000 else 1)
    LOG.info("N=%d: writing %d feature shards", n, -(-n // s.shard_rows))
    data = make_scale_data(world, work, n)
    data["n_rows"] = n
    gt_ids, gt_s = ground_truth(Q, data)
    LOG.info("N=%d: labeling (%d repeat(s) per side)", n, reps)
    label = bench_label_scale(world, data, work, n_rows=n, repeats=reps, top_k=s.top_k, env=env, poll_s=poll_s)
    LOG.info("N=%d: zsl index", n)
    ours, ours_index = bench_our_index(world, data, work, Q, gt_ids, max_memory=s.max_memory, env=env, poll_s=poll_s)
    indexes = {"ours": ours_index}
    af = None
    if s.autofaiss:
        LOG.info("N=%d: autofaiss build_index", n)
        af, indexes["autofaiss"] = bench_autofaiss(venv, data, work, Q, gt_ids, max_memory=s.max_memory,
                                                   memory_available=s.autofaiss_memory_available, env=env,
                                                   poll_s=poll_s)
    LOG.info("N=%d: latency, %d round(s) per index", n, s.latency_rounds)
    lat = measure_latencies(indexes, Q, rounds=s.latency_rounds, single_queries=s.single_queries,
                            latency_k=s.latency_k)
    ours.update(lat["ours"])
    if af is not None:
        af.update(lat["autofaiss"])
    del indexes, ours_index, lat
    gc.collect()
    return {"n_rows": n,
            "data": {**{k: data[k] for k in ("n_shards", "write_seconds", "project_seconds",
                                              "feature_bytes_on_disk", "emb_bytes_on_disk")},
                     "ground_truth_seconds": round(gt_s, 2)},
            "label": label, "index": {"ours": ours, "autofaiss": af}}


def write_results(result: dict, output: str, md_path: str) -> None:
    """The JSON (atomically), SCALE.md beside it, and the table on stdout."""
    from pipeline.core import fs as zio

    zio.write_json_atomic(output, result)
    md = markdown(result)
    zio.write_bytes_atomic(md_path, md.encode())
    typer.echo(md)
    typer.echo(f"total {result['total_seconds']:.0f}s -> {output}, {md_path}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark in-process; return the exit status (2 for usage errors)."""
    return run_app(app, argv, "zsl-bench-scale")


if __name__ == "__main__":
    sys.exit(main())
