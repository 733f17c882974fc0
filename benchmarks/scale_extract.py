"""Extraction steady state: one ``run_extract`` (Ray already up) against the bare read/decode/encode loop
on the same animal-mnist images, interleaved. Steady-state rates come from the feature shard files'
mtimes (pipeline) and per-batch completion times (bare) after the first shard/batch; the fixed costs
(Ray start, actor start + model load) are reported separately.

Imports torch and Ray: ``benchmarks.bench_scale`` imports this module only when it measures extraction.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import ray
import torch

from benchmarks.bench import FEATURE_MODEL, interleaved, median, ratio
from pipeline.cluster.extraction import plan_resources
from pipeline.cluster.session import init_ray
from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.core.config import ExtractConfig
from pipeline.core.features import load_features
from pipeline.core.timing import timed
from pipeline.encoders.image import image_encoder_info, load_image_encoder
from pipeline.inputs.demo_data import ANIMAL_MNIST_CLASSES, write_demo_data
from pipeline.inputs.images import decode_image
from pipeline.inputs.registry import list_shards
from pipeline.stages.extract import run_extract

LOG = logging.getLogger("zsl.bench_scale")


def bench_extract_steady(work: Path, *, n_images: int, shard_size: int, batch_size: int, repeats: int) -> dict:
    """Both sides ``repeats`` times on ``n_images`` demo images (written under ``work``, removed after)."""
    per_class = -(-n_images // len(ANIMAL_MNIST_CLASSES))
    data = work / "images"
    write_demo_data(str(data), per_class=per_class)
    src = str(data / "train")
    files = [f for s in list_shards(src, input_format="folder", shard_size=shard_size) for f in s.members]
    LOG.info("extraction steady state: %d images, shard_size %d, batch %d, %d repeat(s)", len(files), shard_size,
             batch_size, repeats)
    started = not ray.is_initialized()
    with timed() as ray_init:
        init_ray()
    try:
        res = ray.cluster_resources()
        plan = plan_resources(cpus=res.get("CPU", 1), gpus=res.get("GPU", 0), num_actors=None, device="auto")
        runs = _Runs(work, src, files, plan=plan, shard_size=shard_size, batch_size=batch_size, repeats=repeats)
        interleaved(repeats, runs.pipeline, runs.bare)
        diff = runs.max_abs_diff()
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(data, ignore_errors=True)
    return _result(runs, ray_init_s=ray_init.seconds, ray_was_running=not started, diff=diff)


class _Runs:
    """The two sides, one repeat per call (for :func:`benchmarks.bench.interleaved`), each run's record kept."""

    def __init__(self, work: Path, src: str, files: list[str], *, plan, shard_size: int, batch_size: int,
                 repeats: int) -> None:
        self.work, self.src, self.files, self.plan = work, src, files, plan
        self.shard_size, self.batch_size, self.repeats = shard_size, batch_size, repeats
        self.info_enc = image_encoder_info(FEATURE_MODEL)
        self.max_pixels = self.config(0).max_image_pixels
        with timed() as load:
            self.encoder = load_image_encoder(FEATURE_MODEL, device=plan.device, threads=plan.threads)  # as the actor
        self.load_s = load.seconds
        self.prev_threads = torch.get_num_threads()
        self.pipeline_runs: list[dict] = []
        self.bare_runs: list[dict] = []
        self.pipeline_out: str | None = None  # the last pipeline run's features, compared with the bare loop's
        self.bare_X = None

    def config(self, r: int) -> ExtractConfig:
        return ExtractConfig(input=self.src, output=str(self.work / f"extract-r{r}"), input_format="folder",
                             encoder=FEATURE_MODEL, shard_size=self.shard_size, batch_size=self.batch_size)

    def pipeline(self, r: int) -> float:
        c = self.config(r)
        n = len(self.files)
        shutil.rmtree(c.output, ignore_errors=True)
        wall0 = time.time()  # shard files' mtimes are wall-clock times
        with timed() as clock:
            man = run_extract(c, progress=False)
        total = clock.seconds
        if man.n_images != n or man.n_errors:
            raise RuntimeError(f"run_extract: {man.n_images} images, {man.n_errors} errors (expected {n}, 0)")
        shards = sorted(Path(c.output, "features").glob("shard-*.parquet"), key=lambda p: p.stat().st_mtime)
        times = [p.stat().st_mtime - wall0 for p in shards]
        counts = [zpq.parquet_num_rows(str(p)) for p in shards]
        rate = _steady(times, counts)
        self.pipeline_runs.append({"seconds": total, "first_shard_s": times[0] if times else None,
                                   "steady_images_per_s": rate, "fixed_s": (total - n / rate) if rate else None,
                                   "n_shards": len(shards), "resources": man.resources})
        if r == self.repeats - 1:
            self.pipeline_out = c.output
        else:
            shutil.rmtree(c.output, ignore_errors=True)
        return total

    def bare(self, r: int) -> float:
        torch.set_num_threads(self.plan.threads)
        stamps, counts, out, batch = [], [], [], []
        with timed() as clock:
            def encode() -> None:
                out.append(self.encoder.encode(np.stack(batch)))
                stamps.append(clock.elapsed())
                counts.append(len(batch))

            try:
                for uri in self.files:
                    px, _, _ = decode_image(zio.read_bytes(uri), size=self.info_enc.image_size,
                                            max_pixels=self.max_pixels)
                    batch.append(px)
                    if len(batch) == self.batch_size:
                        encode()
                        batch = []
                if batch:
                    encode()
            finally:
                torch.set_num_threads(self.prev_threads)
        total, n, rate = clock.seconds, len(self.files), _steady(stamps, counts)
        self.bare_runs.append({"seconds": total, "first_batch_s": stamps[0] if stamps else None,
                               "steady_images_per_s": rate, "fixed_s": (total - n / rate) if rate else None,
                               "n_batches": len(stamps)})
        self.bare_X = np.concatenate(out)
        return total

    def max_abs_diff(self) -> float:
        """Largest difference between the pipeline's and the bare loop's embeddings, matched by uri."""
        feats = load_features(self.pipeline_out)
        pos = {u: i for i, u in enumerate(feats.uris)}
        return float(np.abs(feats.X[[pos[u] for u in self.files]] - self.bare_X).max())


def _steady(times: list[float], counts: list[int]) -> float | None:
    """Rate over the units after the first: ``sum(counts[1:]) / (times[-1] - times[0])``."""
    if len(times) < 3 or times[-1] <= times[0]:
        return None
    return sum(counts[1:]) / (times[-1] - times[0])


def _summary(runs: list[dict], n: int, unit: str) -> dict:
    steady = [r["steady_images_per_s"] for r in runs if r["steady_images_per_s"]]
    fixed = [r["fixed_s"] for r in runs if r["fixed_s"] is not None]
    return {"runs": runs, "median_seconds": median([r["seconds"] for r in runs]),
            "median_images_per_s": median([n / r["seconds"] for r in runs]),
            "median_steady_images_per_s": median(steady) if steady else None,
            "median_fixed_s": median(fixed) if fixed else None, "steady_state_from": unit}


def _result(runs: _Runs, *, ray_init_s: float, ray_was_running: bool, diff: float) -> dict:
    n = len(runs.files)
    p = _summary(runs.pipeline_runs, n, "feature shard files' mtimes, shards after the first")
    b = _summary(runs.bare_runs, n, "per-batch completion times, batches after the first")
    return {
        "n_images": n, "shard_size": runs.shard_size, "batch_size": runs.batch_size, "repeats": runs.repeats,
        "pipeline": p, "bare": b,
        "ratio_steady": (ratio(p["median_steady_images_per_s"], b["median_steady_images_per_s"])
                         if p["median_steady_images_per_s"] and b["median_steady_images_per_s"] else None),
        "ratio_total": ratio(p["median_images_per_s"], b["median_images_per_s"]),
        "fixed_costs_s": {"ray_init": ray_init_s, "pipeline_actor_start_model_load_and_ramp": p["median_fixed_s"],
                          "bare_encoder_load": runs.load_s, "bare_ramp": b["median_fixed_s"]},
        "ray_was_already_running": ray_was_running,
        "torch_threads": {"pipeline_actor": runs.plan.threads, "bare_loop": runs.plan.threads},
        "embeddings_max_abs_diff_pipeline_vs_bare": diff,
        "notes": ("run_extract with Ray already up (Ray start-up is ray_init, once); the pipeline's fixed cost is "
                  "its total minus n_images / steady rate (actor start, model load, pipeline ramp-up and the "
                  "tail); the bare loop's encoder is loaded once outside its timed region (bare_encoder_load)."),
    }
