"""``python -m benchmarks.bench``: pipeline throughput vs bare loops, measured side by side in one run.

Two measurements, each as a RATIO of medians over repeats taken in the same process, interleaved
(pipeline, bare, bare, pipeline, ...) so that load from other work on a shared machine hits both:

1. **Extraction** — :func:`pipeline.stages.extract.run_extract` (Ray Data: decode tasks, encoder actor
   pool, driver-side shard writer) on a folder of real animal-mnist images, against a bare
   in-process loop doing the same work on the same files: read bytes, ``decode_image``, batches of
   ``batch_size``, the encoder's ``encode``. Ray is started once before timing (its start-up is
   reported separately, with one optional cold run); the actor start and model load inside each
   pipeline run are part of its cost. The bare loop runs the encoder as the pipeline's actor does
   (ONNX Runtime on CPUs, the actor's thread count: :func:`pipeline.cluster.extraction.plan_resources`).
   PyTorch against ONNX Runtime, and both against the encoder alone: ``benchmarks.bench_extract``.
2. **Bulk labeling** — :func:`pipeline.stages.label.run_label` over Parquet feature shards of synthetic
   (but feature-like: non-negative, class-clustered) 1280-d rows (written by
   :func:`pipeline.core.features.write_features`) with a real ESZSL model trained by
   :func:`pipeline.stages.train.run_train`, against the same math in bare NumPy on the in-memory matrix:
   ``l2n(X) @ V @ S.T`` and ``np.argpartition`` top-k, no I/O.

Writes one JSON file (atomically; default ``benchmarks/results/results.json``) and prints a short table. Absolute times on a busy machine are
noise; the ratios are the result.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import typer

from benchmarks.cli import run_app

from pipeline.core.timing import timed

LOG = logging.getLogger("zsl.bench")
#: Where the harnesses write their results by default (kept in git).
RESULTS = Path(__file__).resolve().parent / "results"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Extraction and labeling throughput of the pipeline vs bare loops (ratios).")

FEATURE_MODEL = "effnet-lite0"  # the synthetic label features pose as this encoder's output
TEXT_DIM = 384  # minilm's dimension, as in a real class set
LATENT_RANK = 8  # rank of the synthetic class structure behind features and text


# -- small helpers -------------------------------------------------------------------------------

def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")


def interleaved(repeats: int, pipeline: Callable[[int], float], bare: Callable[[int], float]
                 ) -> tuple[list[float], list[float]]:
    """Run both ``repeats`` times, alternating which goes first (ABBA), so drift hits both alike."""
    p_s, b_s = [], []
    for r in range(repeats):
        order = ((pipeline, p_s), (bare, b_s)) if r % 2 == 0 else ((bare, b_s), (pipeline, p_s))
        for fn, acc in order:
            acc.append(fn(r))
    return p_s, b_s


def machine() -> dict:
    import faiss
    import numpy as np
    import pyarrow
    import ray
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "cuda_available": bool(torch.cuda.is_available()),
        "ray": ray.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# -- extraction ----------------------------------------------------------------------------------

def _bare_extract(files: list[str], encoder, *, image_size: int, batch_size: int, max_pixels: int):
    """The pipeline's per-image work without Ray: read, decode, batch, encode."""
    import numpy as np

    from pipeline.core import fs as zio
    from pipeline.inputs.images import decode_image

    out, batch = [], []
    for uri in files:
        px, _, _ = decode_image(zio.read_bytes(uri), size=image_size, max_pixels=max_pixels)
        batch.append(px)
        if len(batch) == batch_size:
            out.append(encoder.encode(np.stack(batch)))
            batch = []
    if batch:
        out.append(encoder.encode(np.stack(batch)))
    return np.concatenate(out)


def bench_extract(work: Path, *, images_per_class: int, repeats: int, shard_size: int, batch_size: int,
                  cold: bool) -> dict:
    import numpy as np
    import ray

    from pipeline.core.config import ExtractConfig
    from pipeline.core.features import load_features
    from pipeline.cluster.session import init_ray
    from pipeline.cluster.extraction import plan_resources
    from pipeline.core.manifests import FeaturesManifest
    from pipeline.stages.extract import run_extract

    data, files = _demo_files(work, images_per_class=images_per_class, shard_size=shard_size,
                              batch_size=batch_size, repeats=repeats)
    n = len(files)

    def cfg(tag: str) -> ExtractConfig:
        return ExtractConfig(input=str(data / "train"), output=str(work / f"extract-{tag}"), input_format="folder",
                             encoder=FEATURE_MODEL, shard_size=shard_size, batch_size=batch_size)

    def pipeline_run(tag: str) -> tuple[float, FeaturesManifest]:
        c = cfg(tag)
        shutil.rmtree(c.output, ignore_errors=True)
        with timed() as t:
            manifest = run_extract(c, progress=False)
        if manifest.n_images != n or manifest.n_errors:
            raise RuntimeError(f"pipeline run {tag}: {manifest.n_images} images, {manifest.n_errors} errors "
                               f"(expected {n}, 0)")
        return t.seconds, manifest

    ray_was_running = ray.is_initialized()
    with timed() as ray_init:
        init_ray()
    cold_result = None
    if cold and not ray_was_running:
        # One CLI-like run: Ray start-up + actor start + model load + work (single sample).
        secs, _ = pipeline_run("cold")
        shutil.rmtree(cfg("cold").output, ignore_errors=True)
        cold_result = {"seconds_incl_ray_init": ray_init.seconds + secs, "seconds_excl_ray_init": secs}

    res = ray.cluster_resources()
    plan = plan_resources(cpus=res.get("CPU", 1), gpus=res.get("GPU", 0), num_actors=None, device="auto")
    bare_out: dict = {}
    bare_rep, load_s, prev_threads = _bare_side(files, plan=plan, batch_size=batch_size,
                                                max_pixels=cfg("bare").max_image_pixels, out=bare_out)
    manifests: dict[str, FeaturesManifest] = {}

    def pipeline_rep(r: int) -> float:
        secs, manifests["last"] = pipeline_run(f"r{r}")
        if r < repeats - 1:
            shutil.rmtree(cfg(f"r{r}").output, ignore_errors=True)
        return secs

    p_s, b_s = interleaved(repeats, pipeline_rep, bare_rep)

    # Same numbers out of both? (per image, matched by uri)
    feats = load_features(cfg(f"r{repeats - 1}").output)
    pos = {u: i for i, u in enumerate(feats.uris)}
    max_abs_diff = float(np.abs(feats.X[[pos[u] for u in files]] - bare_out["X"]).max())
    out = _extract_result(n, p_s, b_s, cold_result, ray_init_s=ray_init.seconds, ray_was_running=ray_was_running,
                          load_s=load_s, threads={"pipeline_actor": plan.threads, "bare_loop": plan.threads,
                                                  "driver_default": prev_threads},
                          resources=dict(manifests["last"].resources or {}), max_abs_diff=max_abs_diff)
    shutil.rmtree(data, ignore_errors=True)
    return out


def _bare_side(files: list[str], *, plan, batch_size: int, max_pixels: int, out: dict):
    """The bare loop's repeat function (torch threads as the pipeline's encoder actor; it leaves its
    embeddings in ``out["X"]``), its encoder's load seconds (loaded once, here) and the driver's torch threads."""
    import torch

    from pipeline.encoders.image import image_encoder_info, load_image_encoder

    info_enc = image_encoder_info(FEATURE_MODEL)
    with timed() as load:
        encoder = load_image_encoder(FEATURE_MODEL, device=plan.device, threads=plan.threads)  # as the actor runs it
    prev_threads = torch.get_num_threads()

    def bare_rep(r: int) -> float:
        torch.set_num_threads(plan.threads)
        try:
            with timed() as t:
                out["X"] = _bare_extract(files, encoder, image_size=info_enc.image_size, batch_size=batch_size,
                                         max_pixels=max_pixels)
        finally:
            torch.set_num_threads(prev_threads)
        return t.seconds
    return bare_rep, load.seconds, prev_threads


def _demo_files(work: Path, *, images_per_class: int, shard_size: int, batch_size: int,
                repeats: int) -> tuple[Path, list[str]]:
    """The animal-mnist demo images under ``work/images``, and its train images in shard order."""
    from pipeline.inputs.demo_data import write_demo_data
    from pipeline.inputs.registry import list_shards

    data = work / "images"
    info = write_demo_data(str(data), per_class=images_per_class)
    src = str(data / "train")
    files = [f for s in list_shards(src, input_format="folder", shard_size=shard_size) for f in s.members]
    LOG.info("extraction bench: %d images (%d classes), shard_size %d, batch %d, %d repeats",
             len(files), len(info["classes"]), shard_size, batch_size, repeats)
    return data, files


def _extract_result(n: int, p_s: list[float], b_s: list[float], cold_result: dict | None, *, ray_init_s: float,
                    ray_was_running: bool, load_s: float, threads: dict, resources: dict,
                    max_abs_diff: float) -> dict:
    p_ips, b_ips = [n / s for s in p_s], [n / s for s in b_s]
    p_med, b_med = median(p_ips), median(b_ips)
    out = {
        "n_images": n,
        "pipeline": {"seconds": p_s, "images_per_s": p_ips, "median_images_per_s": p_med,
                     "includes": "run_extract with Ray already up: listing, actor start + model load, "
                                 "decode tasks, encode, driver-side shard grouping, Parquet writes, manifest"},
        "bare": {"seconds": b_s, "images_per_s": b_ips, "median_images_per_s": b_med,
                 "includes": "read bytes + decode_image + np.stack + encode in batches; encoder loaded "
                             "once outside the timed region"},
        "ratio": ratio(p_med, b_med),
        "pipeline_overhead_s_median": median(p_s) - median(b_s),
        "ray_init_s": ray_init_s,
        "ray_was_already_running": ray_was_running,
        "bare_encoder_load_s": load_s,
        "cold": None,
        "torch_threads": threads,
        "resource_plan": resources,
        "embeddings_max_abs_diff_pipeline_vs_bare": max_abs_diff,
        "notes": ("Both sides run on the same machine in the same process, interleaved. With Ray up the "
                  "pipeline still starts its encoder actor and loads the model on every run; the bare "
                  "loop's encoder is loaded once (bare_encoder_load_s)."),
    }
    if cold_result is not None:
        cold_ips = n / cold_result["seconds_incl_ray_init"]
        out["cold"] = {**cold_result, "images_per_s_incl_ray_init": cold_ips,
                       # against the bare loop charged with its own one-off encoder load
                       "bare_images_per_s_incl_encoder_load": n / (load_s + median(b_s)),
                       "ratio_vs_bare_incl_encoder_load": ratio(cold_ips, n / (load_s + median(b_s))),
                       "samples": 1,
                       "includes": "init_ray + the first run_extract of this process (a CLI invocation)"}
    return out


# -- labeling ------------------------------------------------------------------------------------

def _write_feature_dir(out: str, X, labels: list[str], *, shard_rows: int, id_prefix: str):
    """A feature directory of synthetic rows, written by the library's writer (same layout as ``zsl extract``)."""
    from pipeline.core.features import write_features

    ids = [f"{id_prefix}/{i:08d}.png" for i in range(len(labels))]
    return write_features(out, image_ids=ids, uris=[f"synthetic://{i}" for i in ids], labels=labels, X=X,
                          model_id=FEATURE_MODEL, shard_size=shard_rows,
                          notes={"source": "synthetic (benchmarks.bench)", "input": f"synthetic:{id_prefix}"})


def synthetic_features(rng, centers, y, *, noise: float, chunk: int = 20_000):
    """Non-negative, class-clustered rows (like pooled CNN features), generated in chunks."""
    import numpy as np

    X = np.empty((len(y), centers.shape[1]), np.float32)
    for s in range(0, len(y), chunk):
        e = min(len(y), s + chunk)
        block = rng.standard_normal((e - s, centers.shape[1]), dtype=np.float32)
        block *= noise
        block += centers[y[s:e]]
        np.maximum(block, 0.0, out=block)
        X[s:e] = block
    return X


def _label_data(work: Path, *, dim: int, rows: int, shard_rows: int, n_classes: int, n_seen: int,
                seed: int) -> dict:
    """A seeded synthetic class set, an ESZSL model trained on it and ``rows`` feature rows to label; with
    the seconds it took to write them and train (``prep_s``)."""
    import numpy as np

    from pipeline.semantics.classset import write_class_set
    from pipeline.core.config import TrainConfig
    from pipeline.core.vectors import l2n
    from pipeline.stages.train import run_train

    rng = np.random.default_rng(seed)
    names = [f"class_{i:03d}" for i in range(n_classes)]
    # Classes share a low-rank latent description; feature-space centres (non-negative) and text
    # embeddings are both images of it, so the trained model transfers to unseen classes somewhat
    # and calibration tunes a non-zero gamma (checked: |gamma| > 0 with the defaults).
    Z = rng.standard_normal((n_classes, LATENT_RANK)).astype(np.float32)
    B = rng.standard_normal((LATENT_RANK, dim)).astype(np.float32) / math.sqrt(LATENT_RANK)
    centers = (np.maximum(Z @ B, 0.0) * 0.6).astype(np.float32)
    A = rng.standard_normal((LATENT_RANK, TEXT_DIM)).astype(np.float32)
    text = l2n(Z @ A + 0.3 * rng.standard_normal((n_classes, TEXT_DIM)).astype(np.float32))

    with timed() as prep:
        classes_dir, model_dir = str(work / "classes"), str(work / "model")
        write_class_set(classes_dir, names, [None] * n_classes, text, None, {
            "source": "synthetic (benchmarks.bench)", "text_model": "minilm", "text_model_name": "minilm",
            "pretrained": None, "templates": ["a photo of a {name}."], "text_dim": TEXT_DIM, "attribute_names": [],
            "attribute_normalization": "l2", "attribute_stats": None, "missing_attributes": "error",
            "missing_value": -1.0})
        y_train = np.repeat(np.arange(n_seen), 60)
        train_dir = str(work / "features-train")
        _write_feature_dir(train_dir, synthetic_features(rng, centers, y_train, noise=0.5),
                           [names[i] for i in y_train], shard_rows=shard_rows, id_prefix="train")
        train_manifest = run_train(TrainConfig(features=train_dir, classes=classes_dir, seen=tuple(names[:n_seen]),
                                               method="eszsl", output=model_dir))
        y = rng.integers(0, n_classes, rows)
        X = synthetic_features(rng, centers, y, noise=0.5)
        feats_dir = str(work / "features-label")
        _write_feature_dir(feats_dir, X, [names[i] for i in y], shard_rows=shard_rows, id_prefix="label")
    return {"classes_dir": classes_dir, "model_dir": model_dir, "feats_dir": feats_dir, "X": X,
            "train_manifest": train_manifest, "prep_s": prep.seconds}


def bench_label(work: Path, *, rows: int, shard_rows: int, n_classes: int, n_seen: int, top_k: int,
                repeats: int, seed: int) -> dict:
    import numpy as np

    from pipeline.semantics.classset import load_class_set
    from pipeline.core.config import LabelConfig
    from pipeline.zsl.models import load_model
    from pipeline.core.vectors import l2n
    from pipeline.zsl.models.scoring import class_semantics
    from pipeline.stages.label import run_label

    dim = 1280
    d = _label_data(work, dim=dim, rows=rows, shard_rows=shard_rows, n_classes=n_classes, n_seen=n_seen, seed=seed)
    classes_dir, model_dir, feats_dir, X = d["classes_dir"], d["model_dir"], d["feats_dir"], d["X"]
    train_manifest, prep_s = d["train_manifest"], d["prep_s"]
    model, mman = load_model(model_dir, feature_dim=dim, feature_model=FEATURE_MODEL)
    S = class_semantics(mman, load_class_set(classes_dir))
    V = np.asarray(model.V, np.float32)
    LOG.info("labeling bench: %d rows x %d-d in %d shards, %d classes (%d seen), top-%d, %d repeats "
             "(data + model prepared in %.1fs)", rows, dim, math.ceil(rows / shard_rows), n_classes, n_seen,
             top_k, repeats, prep_s)

    def out_dir(r: int) -> str:
        return str(work / f"labels-r{r}")

    def pipeline_rep(r: int) -> float:
        shutil.rmtree(out_dir(r), ignore_errors=True)
        cfg = LabelConfig(model=model_dir, features=feats_dir, classes=classes_dir, output=out_dir(r),
                          top_k=top_k, calibrated=True)
        with timed() as t:
            m = run_label(cfg, progress=False)
        if m.n_labeled_this_run != rows or m.n_images != rows:
            raise RuntimeError(f"run_label labeled {m.n_labeled_this_run} rows ({m.n_images} in all), "
                               f"expected {rows}")
        shutil.rmtree(out_dir(r), ignore_errors=True)
        return t.seconds

    def bare_rep(r: int) -> float:
        with timed() as t:
            scores = (l2n(X) @ V) @ S.T
            idx = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]
        assert idx.shape == (rows, top_k)
        return t.seconds

    p_s, b_s = interleaved(repeats, pipeline_rep, bare_rep)
    batch_size = LabelConfig(model=model_dir, features=feats_dir, classes=classes_dir, output=out_dir(0)).batch_size
    return _label_result(rows, p_s, b_s, train_manifest, dim=dim, shard_rows=shard_rows, n_classes=n_classes,
                         n_seen=n_seen, prep_s=prep_s, batch_size=batch_size)


def _label_result(rows: int, p_s: list[float], b_s: list[float], train_manifest, *, dim: int, shard_rows: int,
                  n_classes: int, n_seen: int, prep_s: float, batch_size: int) -> dict:
    p_rps, b_rps = [rows / s for s in p_s], [rows / s for s in b_s]
    p_med, b_med = median(p_rps), median(b_rps)
    gamma = float(train_manifest.gamma)
    calib = (f"calibrated stacking: gamma={gamma:.4g} subtracted from the {n_seen} seen-class columns" if gamma
             else "calibration skipped: the tuned gamma is 0")
    return {
        "n_rows": rows,
        "dim": dim,
        "n_shards": math.ceil(rows / shard_rows),
        "n_classes": n_classes,
        "n_seen": n_seen,
        "model": {"method": train_manifest.method, "gamma": gamma, "n_train": train_manifest.n_train},
        "pipeline": {"seconds": p_s, "rows_per_s": p_rps, "median_rows_per_s": p_med},
        "bare": {"seconds": b_s, "rows_per_s": b_rps, "median_rows_per_s": b_med},
        "ratio": ratio(p_med, b_med),
        "pipeline_overhead_s_median": median(p_s) - median(b_s),
        "prep_seconds": prep_s,
        "notes": (f"run_label on top of the bare math: reads manifests, model (safetensors) and class set; per "
                  f"shard reads Parquet (zstd; files are in the page cache after being written) and converts "
                  f"the embedding column to NumPy; scores in batches of {batch_size} via class_scores "
                  f"({calib}); sorts the top-k "
                  f"(stable argsort) rather than only partitioning; builds per-row Arrow lists of class names and "
                  f"scores; writes one zstd Parquet labels shard per feature shard atomically (fsync) and a "
                  f"manifest. Bare: l2n(X) @ V @ S.T + np.argpartition on the in-memory matrix, no I/O."),
    }


# -- report --------------------------------------------------------------------------------------

def interpretation(result: dict) -> str:
    parts = []
    ex = result.get("extraction")
    if ex:
        parts.append(
            f"Extraction: the Ray pipeline ran at {ex['ratio']:.2f}x the bare loop's throughput "
            f"({ex['pipeline']['median_images_per_s']:.1f} vs {ex['bare']['median_images_per_s']:.1f} images/s, "
            f"medians of {len(ex['pipeline']['seconds'])}, Ray already up), i.e. "
            f"{ex['pipeline_overhead_s_median']:+.1f}s per {ex['n_images']} images beyond the bare work; "
            f"Ray start-up took {ex['ray_init_s']:.1f}s once.")
        if ex.get("cold"):
            parts.append(f"A single cold run (Ray start-up included) ran at "
                         f"{ex['cold']['ratio_vs_bare_incl_encoder_load']:.2f}x the bare loop charged with its "
                         f"encoder load.")
        if ex["embeddings_max_abs_diff_pipeline_vs_bare"] > 1e-3:
            parts.append(f"Embeddings differ between pipeline and bare loop (max abs diff "
                         f"{ex['embeddings_max_abs_diff_pipeline_vs_bare']:.2g}).")
    lb = result.get("labeling")
    if lb:
        share = 1.0 - lb["ratio"] if lb["ratio"] < 1 else 0.0
        parts.append(
            f"Labeling: run_label ran at {lb['ratio']:.3f}x the bare NumPy scoring+top-k throughput "
            f"({lb['pipeline']['median_rows_per_s']:,.0f} vs {lb['bare']['median_rows_per_s']:,.0f} rows/s); "
            f"about {100 * share:.0f}% of its time is spent outside the scoring math (I/O, Arrow conversion, "
            f"calibration, top-k sorting, output building).")
    return " ".join(parts)


def print_table(result: dict) -> None:
    rows = [("stage", "pipeline (median)", "bare (median)", "ratio p/b", "repeats")]
    ex, lb = result.get("extraction"), result.get("labeling")
    if ex:
        rows.append(("extraction [img/s]", f"{ex['pipeline']['median_images_per_s']:.1f}",
                     f"{ex['bare']['median_images_per_s']:.1f}", f"{ex['ratio']:.3f}",
                     str(len(ex["pipeline"]["seconds"]))))
        if ex.get("cold"):
            c = ex["cold"]
            rows.append(("  cold, incl. Ray init", f"{c['images_per_s_incl_ray_init']:.1f}",
                         f"{c['bare_images_per_s_incl_encoder_load']:.1f}",
                         f"{c['ratio_vs_bare_incl_encoder_load']:.3f}", "1"))
    if lb:
        rows.append(("labeling [rows/s]", f"{lb['pipeline']['median_rows_per_s']:,.0f}",
                     f"{lb['bare']['median_rows_per_s']:,.0f}", f"{lb['ratio']:.4f}",
                     str(len(lb["pipeline"]["seconds"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        typer.echo("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            typer.echo("  ".join("-" * w for w in widths))


def _check_finite(result: dict) -> None:
    for key in ("extraction", "labeling"):
        if result.get(key) is not None:
            r = result[key]["ratio"]
            if not (math.isfinite(r) and r > 0):
                raise RuntimeError(f"{key}: ratio {r!r} is not a positive finite number")


# -- entry point ---------------------------------------------------------------------------------

@app.command()
def bench(
    output: str = typer.Option(str(RESULTS / "results.json"), help="JSON file to write (atomically)."),
    repeats: int = typer.Option(3, min=1, help="Timed repeats of each side (medians are reported)."),
    images_per_class: int = typer.Option(40, min=1, help="animal-mnist images per class (10 classes)."),
    shard_size: int = typer.Option(100, min=1, help="Images per extraction shard."),
    batch_size: int = typer.Option(64, min=1, help="Images per encoder batch (pipeline and bare loop)."),
    cold: bool = typer.Option(True, "--cold/--no-cold", help="Also time one cold run including Ray start-up."),
    label_rows: int = typer.Option(200_000, min=1, help="Feature rows to label."),
    label_shard_rows: int = typer.Option(20_000, min=1, help="Rows per feature shard."),
    label_classes: int = typer.Option(50, min=3, help="Classes in the class set."),
    label_seen: int | None = typer.Option(None, help="Seen (training) classes; default 80% of the classes."),
    top_k: int = typer.Option(5, min=1, help="top-k of the labeling run."),
    skip_extract: bool = typer.Option(False, help="Skip the extraction benchmark."),
    skip_label: bool = typer.Option(False, help="Skip the labeling benchmark."),
    workdir: str | None = typer.Option(None, help="Scratch folder (default: a new temp dir, removed after)."),
    seed: int = typer.Option(0),
) -> None:
    """Measure pipeline vs bare-loop throughput for extraction and labeling; write ratios as JSON."""
    from pipeline.core import fs as zio

    seen = label_seen if label_seen is not None else max(2, round(0.8 * label_classes))
    if not 2 <= seen < label_classes:
        raise typer.BadParameter(f"--label-seen must be in [2, {label_classes - 1}]")
    params = dict(repeats=repeats, images_per_class=images_per_class, shard_size=shard_size, batch_size=batch_size,
                  cold=cold, label_rows=label_rows, label_shard_rows=label_shard_rows, label_classes=label_classes,
                  label_seen=seen, top_k=top_k, skip_extract=skip_extract, skip_label=skip_label, seed=seed,
                  encoder=FEATURE_MODEL)
    with timed() as clock:
        result: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        "machine": machine(), "parameters": params, "extraction": None, "labeling": None}
        own_work = workdir is None
        work = Path(workdir or tempfile.mkdtemp(prefix="zsl-bench-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            _run_benches(result, work, extract=None if skip_extract else dict(
                images_per_class=images_per_class, repeats=repeats, shard_size=shard_size, batch_size=batch_size,
                cold=cold), label=None if skip_label else dict(
                rows=label_rows, shard_rows=label_shard_rows, n_classes=label_classes, n_seen=seen, top_k=top_k,
                repeats=repeats, seed=seed))
        finally:
            if own_work:
                shutil.rmtree(work, ignore_errors=True)
        result["ratios"] = {k: result[k]["ratio"] for k in ("extraction", "labeling") if result[k] is not None}
        result["interpretation"] = interpretation(result)
        result["total_seconds"] = clock.elapsed()
    _check_finite(result)
    zio.write_json_atomic(output, result)
    print_table(result)
    typer.echo(result["interpretation"])
    typer.echo(f"total {result['total_seconds']:.0f}s -> {output}")


def _run_benches(result: dict, work: Path, *, extract: dict | None, label: dict | None) -> None:
    """``bench_extract(**extract)`` and ``bench_label(**label)`` (None: skipped) into ``result``; a Ray
    started here is shut down before labeling."""
    started_ray = False
    try:
        if extract is not None:
            import ray

            started_ray = not ray.is_initialized()
            result["extraction"] = bench_extract(work, **extract)
            if started_ray:  # idle Ray processes should not share the CPUs with the labeling bench
                ray.shutdown()
                started_ray = False
        if label is not None:
            result["labeling"] = bench_label(work, **label)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark in-process; return the exit status (2 for usage errors)."""
    return run_app(app, argv, "zsl-bench")


if __name__ == "__main__":
    sys.exit(main())
