"""The four sides :mod:`benchmarks.bench_extract` times, one repeat per call, each run's record kept.

* ``torch``  — ``run_extract`` as before issue 19: ``image_backend=torch``, ``jpeg_draft=false``;
* ``onnx``   — ``run_extract`` with the defaults (ONNX Runtime on the CPU, draft JPEG decoding);
* ``bare``   — the ONNX Runtime encoder in an in-process loop: read, decode (as ``onnx`` decodes),
  batches of the ``onnx`` side's size, encode; each stage timed;
* ``encode`` — the same encoder over the same images decoded beforehand: the bare ONNX Runtime loop
  over decoded images, what the pipeline's encoding could reach alone.

Steady-state rates: feature shard files' mtimes after the first shard (pipelines), per-batch completion
times after the first batch (loops); fixed cost = total - images / steady rate.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.bench import FEATURE_MODEL
from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.core.config import ExtractConfig
from pipeline.core.timing import timed
from pipeline.encoders.image import load_image_encoder
from pipeline.inputs.images import decode_image
from pipeline.stages.extract import run_extract

SIDES = ("torch", "onnx", "bare", "encode")
#: settings of each pipeline side (``torch``: zsl extract as it ran before ONNX Runtime, draft decoding
#: and the plan's batch size; ``onnx``: the defaults)
PIPELINES = {"torch": {"image_backend": "torch", "jpeg_draft": False, "batch_size": 64}, "onnx": {}}


def steady(times: list[float], counts: list[int]) -> float | None:
    """Rate over the units after the first: ``sum(counts[1:]) / (times[-1] - times[0])``."""
    if len(times) < 3 or times[-1] <= times[0]:
        return None
    return sum(counts[1:]) / (times[-1] - times[0])


class Sides:
    """Runs the sides on ``files`` (``src`` as a folder input) and keeps every run's record."""

    def __init__(self, work: Path, src: str, files: list[str], *, plan, shard_size: int, repeats: int,
                 batch_size: int | None = None) -> None:
        """``plan``: the ``onnx`` side's resource plan (the loops use its threads and batch size);
        ``batch_size``: every side's instead (default: each side's own)."""
        self.work, self.src, self.files, self.plan = work, src, files, plan
        self.shard_size, self.repeats, self.forced_batch = shard_size, repeats, batch_size
        self.batch_size = batch_size or plan.batch_size
        self.max_pixels = ExtractConfig(input=src, output=str(work)).max_image_pixels
        with timed() as load:
            self.encoder = load_image_encoder(FEATURE_MODEL, device="cpu", backend="onnx", threads=plan.threads)
        self.load_s = load.seconds
        self.runs: dict[str, list[dict]] = {s: [] for s in SIDES}
        self.outputs: dict[str, str] = {}
        self.pixels: np.ndarray | None = None  # the images decoded once, for the encode-only loop
        self.bare_X: np.ndarray | None = None

    def run(self, side: str, r: int) -> float:
        return self.pipeline(side, r) if side in PIPELINES else getattr(self, side)(r)

    def pipeline(self, side: str, r: int) -> float:
        out = str(self.work / f"extract-{side}-r{r}")
        settings = {**PIPELINES[side], **({"batch_size": self.forced_batch} if self.forced_batch else {})}
        cfg = ExtractConfig(input=self.src, output=out, input_format="folder", encoder=FEATURE_MODEL,
                            shard_size=self.shard_size, **settings)
        shutil.rmtree(out, ignore_errors=True)
        wall0 = time.time()  # shard files' mtimes are wall-clock times
        with timed() as clock:
            man = run_extract(cfg, progress=False)
        n = len(self.files)
        if man.n_images != n or man.n_errors:
            raise RuntimeError(f"run_extract ({side}): {man.n_images} images, {man.n_errors} errors (expected {n}, 0)")
        shards = sorted(Path(out, "features").glob("shard-*.parquet"), key=lambda p: p.stat().st_mtime)
        times = [p.stat().st_mtime - wall0 for p in shards]
        rate = steady(times, [zpq.parquet_num_rows(str(p)) for p in shards])
        self.runs[side].append({
            "seconds": clock.seconds, "first_shard_s": times[0], "steady_images_per_s": rate,
            "fixed_s": clock.seconds - n / rate if rate else None, "n_shards": len(shards),
            "stage_ms_per_image": {k: 1000 * v / n for k, v in (man.stage_seconds or {}).items()},
            "resources": man.resources})
        if r == self.repeats - 1:
            self.outputs[side] = out
        else:
            shutil.rmtree(out, ignore_errors=True)
        return clock.seconds

    def bare(self, r: int) -> float:
        """Read, decode (as the onnx pipeline does) and encode in one loop; each stage timed."""
        stamps, counts, out, batch = [], [], [], []
        spent = dict.fromkeys(("read", "decode", "encode"), 0.0)
        with timed() as clock:
            for i, uri in enumerate(self.files):
                t0 = time.perf_counter()
                data = zio.read_bytes(uri)
                t1 = time.perf_counter()
                batch.append(decode_image(data, size=self.encoder.image_size, max_pixels=self.max_pixels, draft=True)[0])
                t2 = time.perf_counter()
                spent["read"] += t1 - t0
                spent["decode"] += t2 - t1
                if len(batch) == self.batch_size or i == len(self.files) - 1:
                    out.append(self.encoder.encode(np.stack(batch)))
                    spent["encode"] += time.perf_counter() - t2
                    stamps.append(clock.elapsed())
                    counts.append(len(batch))
                    batch = []
        self.bare_X = np.concatenate(out)
        self._loop_record("bare", clock.seconds, stamps, counts, spent)
        return clock.seconds

    def encode(self, r: int) -> float:
        """The encoder alone over the images decoded beforehand (outside the timing)."""
        if self.pixels is None:
            self.pixels = np.stack([decode_image(zio.read_bytes(u), size=self.encoder.image_size,
                                                 max_pixels=self.max_pixels, draft=True)[0] for u in self.files])
        stamps, counts = [], []
        with timed() as clock:
            for s in range(0, len(self.pixels), self.batch_size):
                self.encoder.encode(self.pixels[s:s + self.batch_size])
                stamps.append(clock.elapsed())
                counts.append(min(self.batch_size, len(self.pixels) - s))
        self._loop_record("encode", clock.seconds, stamps, counts, {"encode": clock.seconds})
        return clock.seconds

    def _loop_record(self, side: str, total: float, stamps: list[float], counts: list[int], spent: dict) -> None:
        n, rate = len(self.files), steady(stamps, counts)
        self.runs[side].append({"seconds": total, "first_batch_s": stamps[0], "steady_images_per_s": rate,
                                "fixed_s": total - n / rate if rate else None, "n_batches": len(stamps),
                                "stage_ms_per_image": {k: 1000 * v / n for k, v in spent.items()}})
