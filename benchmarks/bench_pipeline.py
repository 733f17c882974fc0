"""``make bench-pipeline``: the living pipeline (``zsl run``) at ``--rows`` images (default 1,000,000).

What is timed, each a real ``zsl run`` process on one pipeline root:

* **idle rerun** (``--repeats`` times): nothing new arrived; every stage finds nothing to do (extract lists
  the input and compares it with its recorded shard plan; classes, label and index check their outputs);
* **relabel from stored features**: a class is added to the class table; the run embeds the class set again
  and relabels every row from the stored features (no image is read), writing the label diff. Set beside the
  first run's fresh labelling of the same rows (the label stage's seconds, same machine, same session).

The input is real: ``--shards`` webdataset tars (img2dataset's layout) of tiny PNGs with a json sidecar
naming the label. Encoding a million images takes ~2 h on 2 cores, so the first run (untimed setup) writes
each shard's features through the extract stage itself (its shard plan, resume protocol and feature writer)
with synthetic class-clustered 1280-d embeddings in place of the encoder's, after reading every image of the
shard; everything after extraction is the real pipeline. The model is an ESZSL text model trained by
``zsl train`` on a labelled sample (the spec names it: ``model:``); the cost of deciding whether to train
again (the seen-class rows' fingerprint) is timed apart, on the same rows. Writes
``benchmarks/results/pipeline.json``.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import typer
import yaml

from benchmarks.bench import machine, synthetic_features
from benchmarks.cli import OFFLINE_ENV, run_app
from pipeline.core.timing import timed

LOG = logging.getLogger("zsl.bench_pipeline")
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
DIM = 1280
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.splitlines()[0])


def _pngs(n: int, seed: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_tars(folder: Path, *, rows: int, shards: int, names: list[str], seed: int) -> list[str]:
    """``shards`` webdataset tars of ``rows`` tiny PNGs in all; each member's json names its label."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pngs = _pngs(64, seed)
    per = -(-rows // shards)
    keys: list[str] = []
    for s in range(shards):
        n = min(per, rows - s * per)
        y = rng.integers(0, len(names), n)
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for j in range(n):
                key = f"{s:05d}{j:05d}"
                for ext, data in (("png", pngs[(s * per + j) % len(pngs)]),
                                  ("json", json.dumps({"label": names[y[j]], "key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
    return keys


def _class_table(path: Path, names: list[str]) -> None:
    path.write_text(yaml.safe_dump({"classes": [{"name": n, "description": f"a picture of things of kind {n}"}
                                                for n in names]}))


class _FakeEncoder:
    """Stands in for the extract stage's encoding step (``pipeline.stages.extract._encode``): every image of
    each pending shard is read (the real reader), and the shard is written by the real feature writer with
    class-clustered synthetic embeddings for its labels."""

    def __init__(self, names: list[str], seed: int) -> None:
        rng = np.random.default_rng([seed, 1])
        self.pos = {n: i for i, n in enumerate(names)}
        self.centers = np.maximum(rng.standard_normal((len(names), DIM)).astype(np.float32), 0) * 0.6
        self.rng = np.random.default_rng([seed, 2])

    def __call__(self, cfg, info, shards, pending, progress, **_):
        from tqdm.auto import tqdm

        from pipeline.core.features import write_error_shard, write_feature_shard
        from pipeline.inputs.registry import read_shard

        for shard in tqdm(pending, desc="extract (synthetic embeddings)", unit="shard", disable=not progress):
            recs = [r for r in read_shard(shard, image_column=cfg.image_column, label_field=cfg.label_field)
                    if r.error is None and r.data]
            recs.sort(key=lambda r: r.image_id)
            y = np.array([self.pos[r.label] for r in recs], np.int64)
            X = synthetic_features(self.rng, self.centers, y, noise=0.5)
            write_error_shard(cfg.output, shard.shard_id, image_ids=np.array([], object), uris=np.array([], object),
                              stages=np.array([], object), reasons=np.array([], object))
            write_feature_shard(cfg.output, shard.shard_id, image_ids=[r.image_id for r in recs],
                                uris=[r.uri for r in recs], X=X, labels=[r.label for r in recs])
        return {"synthetic_embeddings": True}, {}


def _train_model(work: Path, classes_dir: str, names: list[str], seen: list[str], fake: _FakeEncoder) -> str:
    """An ESZSL text model trained by ``zsl train`` on 200 labelled rows of each seen class."""
    from pipeline.core.config import TrainConfig
    from pipeline.core.features import write_feature_shard
    from pipeline.core.manifests import FeaturesManifest, write_manifest
    from pipeline.stages.train import run_train

    feats = work / "train-features"
    y = np.repeat([fake.pos[n] for n in seen], 200)
    X = synthetic_features(fake.rng, fake.centers, y, noise=0.5)
    write_feature_shard(str(feats), 0, image_ids=[f"train/{i:06d}" for i in range(len(y))],
                        uris=[f"synthetic://train/{i}" for i in range(len(y))], X=X, labels=[names[i] for i in y])
    write_manifest(str(feats), FeaturesManifest(model_id="effnet-lite0", dim=DIM, n_shards=1, n_images=len(y),
                                                config={"encoder": "effnet-lite0"},
                                                notes={"source": "synthetic (benchmarks.bench_pipeline)"}))
    out = str(work / "model")
    run_train(TrainConfig(features=str(feats), classes=classes_dir, seen=tuple(seen), method="eszsl",
                          semantics="text", calibration=False, output=out))
    return out


def _zsl_run(spec: Path, log: Path) -> tuple[float, dict]:
    env = {**os.environ, **OFFLINE_ENV, "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(spec), "--no-progress"], cwd=ROOT, env=env,
                       stdout=open(log, "w"), stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    root = Path(yaml.safe_load(spec.read_text())["root"])
    rec = json.loads(sorted((root / "runs").glob("*/record.json"))[-1].read_text())
    if p.returncode != 0:
        raise RuntimeError(f"zsl run exited {p.returncode}: {log.read_text()[-2000:]}")
    return seconds, rec


def _stages(rec: dict) -> dict:
    return {s["name"]: {"status": s["status"], "seconds": s["seconds"], "did": s["did"],
                        "peak_rss_mb": s["peak_rss_mb"]} for s in rec["stages"]}


@app.command()
def bench(rows: int = typer.Option(1_000_000, min=1000), shards: int = typer.Option(100, min=2),
          classes: int = typer.Option(100, min=3), repeats: int = typer.Option(3, min=1),
          seed: int = typer.Option(0), output: str = typer.Option(str(RESULTS / "pipeline.json")),
          workdir: str | None = typer.Option(None, help="Scratch folder (default: a temp dir, removed after).")) -> None:
    """Idle rerun and relabel-from-features times of `zsl run` at ROWS images."""
    from pipeline.core import fs as zio
    from pipeline.core.config import ClassesConfig, build_config
    from pipeline.flows import living
    from pipeline.stages import extract as extract_stage
    from pipeline.stages.classes import run_classes

    work = Path(workdir or tempfile.mkdtemp(prefix="zsl-bench-pipeline-"))
    result: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                    "parameters": {"rows": rows, "shards": shards, "classes": classes, "repeats": repeats, "seed": seed},
                    "notes": __doc__.split("\n\n", 1)[1].strip()}
    try:
        names = [f"kind{i:03d}" for i in range(classes)]
        seen = names[: int(classes * 0.8)]
        with timed() as t:
            write_tars(work / "tars", rows=rows, shards=shards, names=names, seed=seed)
        LOG.info("%d images in %d tars: %.0f s", rows, shards, t.seconds)
        _class_table(work / "classes.yaml", names)
        fake = _FakeEncoder(names, seed)
        run_classes(ClassesConfig(input=str(work / "classes.yaml"), output=str(work / "classes-for-model"),
                                  word_vectors=False))
        model = _train_model(work, str(work / "classes-for-model"), names, seen, fake)
        spec_values = {"name": "bench", "root": str(work / "root"), "inputs": [str(work / "tars")],
                       "extract": {"input_format": "webdataset", "label_field": "label"},
                       "classes": {"input": str(work / "classes.yaml"), "word_vectors": False},
                       "model": model, "label": {"top_k": 5},
                       "index": {"index_factory": "IVF1024,Flat", "nprobe": 16, "max_memory": "4G"}}
        spec = work / "pipeline.yaml"
        spec.write_text(yaml.safe_dump(spec_values))
        cfg = build_config("run", (str(spec), spec_values))

        real = extract_stage._encode
        extract_stage._encode = fake
        try:
            with timed() as first:
                rec = living.run_pipeline(cfg, spec=str(spec), progress=True)
        finally:
            extract_stage._encode = real
        if rec.exit_code != 0:
            raise RuntimeError(f"first run: {rec.status}: {rec.message}")
        result["first_run"] = {"seconds": round(first.seconds, 1), "stages": _stages(rec.to_json()),
                               "note": "extract wrote synthetic embeddings (see notes); the rest is real"}
        label_fresh = result["first_run"]["stages"]["label"]["seconds"]

        idle = []
        for r in range(repeats):
            secs, rec_i = _zsl_run(spec, work / f"idle-{r}.log")
            changed = [s["name"] for s in rec_i["stages"] if s["status"] not in ("nothing new", "skipped")]
            if changed:
                raise RuntimeError(f"idle rerun {r} changed {changed}")
            idle.append({"seconds": round(secs, 2), "stages": _stages(rec_i)})
        result["idle_rerun"] = {"runs": idle, "median_s": median(x["seconds"] for x in idle)}

        with timed() as tk:
            living.train_key({"seen": seen, "semantics": "text"}, zio.join(cfg.root, "features"),
                             zio.join(cfg.root, "classes"))
        result["train_decision_s"] = round(tk.seconds, 2)

        _class_table(work / "classes.yaml", names + ["kind_new"])
        secs, rec_r = _zsl_run(spec, work / "relabel.log")
        st = _stages(rec_r)
        diff = next(s for s in rec_r["stages"] if s["name"] == "label")["details"].get("diff", {})
        result["relabel"] = {"seconds": round(secs, 2), "stages": st, "label_s": st["label"]["seconds"],
                             "fresh_label_s": label_fresh,
                             "relabel_vs_fresh_label": round(st["label"]["seconds"] / label_fresh, 3),
                             "goal_max": 1.2, "diff": {k: v for k, v in diff.items() if k != "pairs"},
                             "top_moves": (diff.get("pairs") or [])[:10]}
        zio.write_json_atomic(output, result)
        typer.echo(json.dumps({"idle_median_s": result["idle_rerun"]["median_s"],
                               "relabel_vs_fresh_label": result["relabel"]["relabel_vs_fresh_label"],
                               "train_decision_s": result["train_decision_s"]}, indent=1))
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    return run_app(app, argv, "zsl-bench-pipeline")


if __name__ == "__main__":
    sys.exit(main())
