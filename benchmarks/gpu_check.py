"""``make gpu-check``: exercise the GPU paths on a CUDA machine and record their figures.

1. **Extraction** — ``zsl extract --device cuda`` (Ray Data decode tasks + CUDA encoder actors, fp16
   autocast) over ``--images`` real animal-mnist images: images/s over the whole run and in steady
   state (feature shards after the first), against the same run on ``--device cpu`` over a tenth of
   the images.
2. **faiss-gpu** — on ``--vectors`` clustered 384-d vectors: ``IVF{nlist},Flat`` trained and filled on
   the GPU (``use_gpu=True``) vs on CPU, then tuned to recall@10 >= 0.95 and searched (single and
   batched latency), via the same library calls ``zsl index`` makes.

Prints a table and writes ``benchmarks/results/gpu.json``. Without a CUDA GPU it says so and exits 2
(nothing is measured). Sized to finish in well under 8 minutes on one H100/H200.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import typer

from pipeline.core.timing import timed

LOG = logging.getLogger("zsl.gpu_check")
RESULTS = Path(__file__).resolve().parent / "results"
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _zsl(*argv: str) -> float:
    with timed() as t:
        subprocess.run([sys.executable, "-m", "jobs.cli", *argv], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1"})
    return t.seconds


def _steady_rate(features_dir: Path) -> float | None:
    """Images/s between the first and the last feature shard written (fixed costs excluded)."""
    import pyarrow.parquet as pq

    shards = sorted((features_dir / "features").glob("shard-*.parquet"), key=lambda p: p.stat().st_mtime)
    if len(shards) < 3:
        return None
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in shards[1:])
    span = shards[-1].stat().st_mtime - shards[0].stat().st_mtime
    return rows / span if span > 0 else None


def check_extract(work: Path, images: int) -> dict:
    per_class = max(1, images // 10)
    _zsl("demo-data", "--output", str(work / "data"), "--per-class", str(per_class))
    out = {}
    for device, n in (("cuda", per_class), ("cpu", max(1, per_class // 10))):
        src = work / "data" / "train"
        if device == "cpu":  # a tenth of the images, same classes
            src = work / "cpu-subset"
            for cls in (work / "data" / "train").iterdir():
                (src / cls.name).mkdir(parents=True, exist_ok=True)
                for f in sorted(cls.iterdir())[:n]:
                    shutil.copy(f, src / cls.name / f.name)
        dest = work / f"features-{device}"
        secs = _zsl("extract", "--input", str(src), "--output", str(dest), "--device", device,
                    "--shard-size", "1000" if device == "cuda" else "200", "--batch-size", "256")
        manifest = json.loads((dest / "manifest.json").read_text())
        out[device] = {"images": manifest["n_images"], "seconds": round(secs, 2),
                       "images_per_s": round(manifest["n_images"] / secs, 1),
                       "steady_images_per_s": _steady_rate(dest)}
    return out


def check_faiss(n: int, dim: int = 384, seed: int = 0) -> dict:
    import faiss

    from pipeline.index.build import build_index
    from pipeline.index.choose import default_nlist
    from pipeline.index.tune import tune_index

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    x = centres[rng.integers(0, 1000, n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    batches = [x[i : i + 100_000] for i in range(0, n, 100_000)]
    factory = f"IVF{default_nlist(n)},Flat"
    out = {"vectors": n, "dim": dim, "factory": factory, "gpus": faiss.get_num_gpus()}
    for where, use_gpu in (("gpu", True), ("cpu", False)):
        with timed() as build:
            index = build_index(batches, dim=dim, factory=factory, n_total=n, use_gpu=use_gpu)
        tuning = tune_index(index, batches, n_total=n, n_queries=1000)
        out[where] = {"build_s": round(build.seconds, 2), "params": tuning.params, "recall_at_10": tuning.recall_at_10,
                      "latency_ms_mean": tuning.latency_ms_mean, "latency_ms_p99": tuning.latency_ms_p99,
                      "batch_ms_per_query": tuning.batch_ms_per_query}
        if where == "gpu":  # batched search on the GPU itself
            gpu_index = faiss.index_cpu_to_all_gpus(index)
            with timed() as t:
                gpu_index.search(x[:10_000], 10)
            out["gpu"]["gpu_search_ms_per_query"] = round(t.seconds * 1000 / 10_000, 4)
    out["build_speedup"] = round(out["cpu"]["build_s"] / out["gpu"]["build_s"], 2)
    return out


@app.command()
def main(images: int = typer.Option(20_000, help="Images to extract on the GPU (>= 5000)."),
         vectors: int = typer.Option(1_000_000, help="Vectors for the faiss-gpu check."),
         output: Path = typer.Option(RESULTS / "gpu.json")) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    if not torch.cuda.is_available():
        typer.echo("gpu-check: no CUDA GPU visible to torch on this machine; nothing was measured. "
                   "Run `make gpu-check` on a GPU machine (faiss-gpu is installed there by `make install`).")
        raise typer.Exit(2)
    work = Path(tempfile.mkdtemp(prefix="zsl-gpu-check-"))
    try:
        result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "extract": check_extract(work, images), "faiss": check_faiss(vectors)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(output)
    e, f = result["extract"], result["faiss"]
    typer.echo(f"GPU: {result['device']}")
    typer.echo(f"extract: cuda {e['cuda']['images_per_s']} img/s ({e['cuda']['steady_images_per_s']} steady), "
               f"cpu {e['cpu']['images_per_s']} img/s")
    typer.echo(f"faiss {f['factory']} x {f['vectors']}: build gpu {f['gpu']['build_s']} s vs cpu {f['cpu']['build_s']} s "
               f"({f['build_speedup']}x); recall@10 {f['gpu']['recall_at_10']} at {f['gpu']['params']}; "
               f"GPU batched search {f['gpu']['gpu_search_ms_per_query']} ms/query")


if __name__ == "__main__":
    app()
