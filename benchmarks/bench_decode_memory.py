"""``make bench-decode``: peak memory of one decode task on a large webdataset tar, whole vs streamed.

img2dataset writes 10,000 images per tar by default, and ``zsl extract`` decodes one shard per Ray
task. A task that returns the whole shard's pixels at once holds them all (and a stacked copy);
:func:`pipeline.cluster.extraction.decode_chunks` yields blocks of ``DECODE_CHUNK_ROWS`` rows instead.

Writes a tar of ``--images`` JPEGs (10,000: img2dataset's default shard; sizes and contents vary, seeded), then decodes it at
``--image-size`` in a fresh subprocess per run, alternating the two modes, ``--repeats`` times each:

- ``whole``: :func:`pipeline.cluster.extraction.decode_shard` (every row of the shard in one batch);
- ``streamed``: :func:`pipeline.cluster.extraction.decode_chunks` (blocks consumed one at a time, as Ray
  Data hands them on).

Reports the subprocess's peak RSS (``ru_maxrss``) and wall time, medians over the repeats, and
their ratios, to ``benchmarks/results/decode_memory.json``.
"""

from __future__ import annotations

import io
import json
import logging
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

LOG = logging.getLogger("zsl.bench_decode")
RESULTS = Path(__file__).resolve().parent / "results"
app = typer.Typer(add_completion=False)


def write_tar(path: Path, n: int, seed: int = 0) -> int:
    """A webdataset tar of ``n`` JPEGs (``NNNNNNNNN.jpg`` + ``.json``) of varied sizes; its bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            w, h = (int(v) for v in rng.integers(96, 320, 2))
            base = rng.integers(0, 255, (1, 1, 3))
            img = np.clip(base + rng.normal(0, 40, (h // 8 + 1, w // 8 + 1, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).resize((w, h)).save(buf, "JPEG", quality=85)
            for name, data in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.json", json.dumps({"key": f"{i:09d}"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path.stat().st_size


def _child(tar: str, mode: str, image_size: int) -> None:
    """Runs in a fresh interpreter: decode the tar one way, print peak RSS and counts."""
    from pipeline.cluster.extraction import DECODE_CHUNK_ROWS, decode_chunks, decode_shard
    from pipeline.core.timing import timed
    from pipeline.inputs.base import Shard

    batch = {"shard": np.array([Shard(shard_id=0, kind="tar", source=tar).to_json()], dtype=object)}
    kw = dict(image_size=image_size, max_pixels=10**8, read={"image_column": "auto", "label_column": "label"})
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = errors = blocks = 0
    checksum = 0
    with timed() as t:
        if mode == "whole":
            out = decode_shard(batch, **kw)
            rows, errors, blocks = len(out["image_id"]), int((out["error"] != "").sum()), 1
            checksum = int(out["pixels"][:, 0, 0, 0].astype(np.int64).sum())
        else:
            for b in decode_chunks(batch, **kw):  # each block dropped before the next: as Ray hands them on
                rows += len(b["image_id"])
                errors += int((b["error"] != "").sum())
                blocks += 1
                checksum += int(b["pixels"][:, 0, 0, 0].astype(np.int64).sum())
    print(json.dumps({"mode": mode, "rows": rows, "errors": errors, "blocks": blocks, "checksum": checksum,
                      "chunk_rows": DECODE_CHUNK_ROWS, "seconds": round(t.seconds, 3),
                      "rss_before_mb": round(base / 1024, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


@app.command()
def main(images: int = typer.Option(10_000), image_size: int = typer.Option(224), repeats: int = typer.Option(3),
         output: Path = typer.Option(RESULTS / "decode_memory.json"),
         child: str = typer.Option("", hidden=True), tar: str = typer.Option("", hidden=True)) -> None:
    if child:
        _child(tar, child, image_size)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="zsl-bench-decode-"))
    try:
        tar_path = work / "00000.tar"
        size = write_tar(tar_path, images)
        LOG.info("wrote %s: %d images, %.1f MB", tar_path, images, size / 1e6)
        runs: dict[str, list[dict]] = {"whole": [], "streamed": []}
        for r in range(repeats):
            for mode in ("whole", "streamed") if r % 2 == 0 else ("streamed", "whole"):
                out = subprocess.run([sys.executable, "-m", "benchmarks.bench_decode_memory", "--child", mode,
                                      "--tar", str(tar_path), "--image-size", str(image_size)],
                                     check=True, capture_output=True, text=True)
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
                LOG.info("%s: %s", mode, runs[mode][-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {m: {k: statistics.median(x[k] for x in v) for k in ("peak_rss_mb", "seconds", "rss_before_mb")}
           for m, v in runs.items()}
    for m, v in runs.items():
        med[m].update(rows=v[0]["rows"], errors=v[0]["errors"], blocks=v[0]["blocks"])
    if runs["whole"][0]["checksum"] != runs["streamed"][0]["checksum"] or med["whole"]["rows"] != med["streamed"]["rows"]:
        raise SystemExit("the two modes decoded different pixels")
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "images": images, "image_size": image_size,
        "tar_mb": round(size / 1e6, 1), "repeats": repeats, "chunk_rows": runs["streamed"][0]["chunk_rows"],
        "pixels_mb": round(images * image_size * image_size * 3 / 2**20, 1),
        "notes": "one decode task on one webdataset tar, fresh subprocess per run, modes alternated; peak RSS = "
                 "ru_maxrss of the subprocess (includes the interpreter and libraries: rss_before_mb); medians",
        "median": med,
        "peak_rss_ratio_whole_over_streamed": round(med["whole"]["peak_rss_mb"] / med["streamed"]["peak_rss_mb"], 2),
        "time_ratio_streamed_over_whole": round(med["streamed"]["seconds"] / med["whole"]["seconds"], 3),
        "runs": runs,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(output)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    app()
