"""Inputs written by the real img2dataset (1.47, its own venv from `make tools`): the demo's animal
silhouettes served over loopback HTTP, with one URL that 404s and one file that is not an image,
downloaded into all three of its output formats; `zsl` must recognise each layout, keep ids, urls,
captions, keys and labels, and put img2dataset's failures in errors/ with its message."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.usefixtures("ray_down_after")  # `zsl extract` runs in-process here

from pipeline.inputs.registry import read_shard
from pipeline.inputs.registry import describe_input, list_shards

ROOT = Path(__file__).resolve().parents[2]
IMG2DATASET = Path(os.environ.get("ZSL_TOOLS_DIR", ROOT / ".venv-tools")) / "img2dataset" / "bin" / "img2dataset"
N_IMAGES = 200
FORMATS = ("files", "webdataset", "parquet")


@pytest.fixture(scope="session")
def img2dataset_outputs(tmp_path_factory, free_port):
    """{format: output dir} written by img2dataset from a loopback server, plus the url table."""
    if not IMG2DATASET.exists():
        pytest.fail(f"{IMG2DATASET} is missing: run `make tools` (img2dataset in its own venv)")
    from PIL import Image

    from pipeline.inputs.demo_data import ANIMAL_MNIST_CLASSES, load_animal_mnist

    root = tmp_path_factory.mktemp("i2d")
    www = root / "www"
    www.mkdir()
    x, y = load_animal_mnist()
    rows = []
    for i in range(N_IMAGES):
        Image.fromarray(x[i]).resize((56, 56)).save(www / f"{i:03d}.png")
        name = ANIMAL_MNIST_CLASSES[y[i]]
        rows.append({"url": f"/{i:03d}.png", "caption": f"a silhouette of a {name}, number {i}", "animal": name})
    (www / "notimage.jpg").write_text("this is text, not a JPEG")
    rows.insert(57, {"url": "/notimage.jpg", "caption": "not an image", "animal": "none"})
    rows.insert(123, {"url": "/missing.png", "caption": "a 404", "animal": "none"})
    port = free_port()
    handler = functools.partial(_QuietHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for r in rows:
            r["url"] = f"http://127.0.0.1:{port}{r['url']}"
        pq.write_table(pa.Table.from_pylist(rows), root / "urls.parquet")
        outs = {}
        for fmt in FORMATS:
            out = root / f"out_{fmt}"
            cmd = [str(IMG2DATASET), "--url_list", str(root / "urls.parquet"), "--input_format", "parquet",
                   "--url_col", "url", "--caption_col", "caption", "--save_additional_columns", '["animal"]',
                   "--output_format", fmt, "--output_folder", str(out), "--processes_count", "1",
                   "--thread_count", "8", "--resize_mode", "no", "--number_sample_per_shard", "120",
                   "--distributor", "multiprocessing", "--enable_wandb", "False", "--retries", "0"]
            env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
            assert proc.returncode == 0, proc.stderr[-3000:]
            outs[fmt] = out
    finally:
        server.shutdown()
    return outs, rows


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # noqa: D401 - no request log in the test output
        pass


def _records(out: Path, **kw) -> list:
    return [r for s in list_shards(str(out), **kw) for r in read_shard(s, **kw.get("read", {}))]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_img2dataset_layout_is_recognised_and_read_whole(img2dataset_outputs, fmt):
    outs, rows = img2dataset_outputs
    found, why = describe_input(str(outs[fmt]))
    assert found == fmt and "img2dataset" in why or fmt == "parquet" and "'jpg'" in why, (found, why)
    shards = list_shards(str(outs[fmt]))
    recs = [r for s in shards for r in read_shard(s, label_field="animal")]
    by_url = {r["url"]: r for r in rows}
    assert len(recs) == len(rows) and {r.url for r in recs} == set(by_url)  # every row, failed ones too
    ok = [r for r in recs if r.error is None]
    bad = {r.url.rsplit("/", 1)[-1]: r for r in recs if r.error is not None}
    assert len(ok) == N_IMAGES and set(bad) == {"notimage.jpg", "missing.png"}
    assert bad["missing.png"].stage == "download" and "404" in bad["missing.png"].error
    assert bad["notimage.jpg"].stage == "download" and "decoding" in bad["notimage.jpg"].error.lower()
    for r in ok:
        src = by_url[r.url]
        assert r.caption == src["caption"] and r.label == src["animal"]
        assert r.key and r.image_id == f"{r.key[:5]}/{r.key}"  # shard/key, the same in every layout
        assert r.meta.get("sha256") and r.data[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb")
    assert len({r.image_id for r in recs}) == len(recs)


def test_files_layout_takes_no_labels_from_folder_names(img2dataset_outputs):
    outs, _ = img2dataset_outputs
    recs = _records(outs["files"])
    assert all(r.label is None for r in recs)  # '00000' is a shard, not a class
    recs = _records(outs["files"], input_format="folder")  # forced as a folder, it would be
    assert {r.label for r in recs} == {"00000", "00001"}


def test_same_images_same_ids_in_all_three_layouts(img2dataset_outputs):
    outs, _ = img2dataset_outputs
    seen = {}
    for fmt in FORMATS:
        recs = [r for s in list_shards(str(outs[fmt])) for r in read_shard(s)]
        seen[fmt] = {r.image_id: (r.url, r.data is not None) for r in recs}
    assert seen["files"] == seen["webdataset"] == seen["parquet"]


def test_brace_patterns_select_shards(img2dataset_outputs):
    outs, _ = img2dataset_outputs
    one = list_shards(f"{outs['webdataset']}/{{00001..00001}}.tar")
    assert [s.source.rsplit("/", 1)[-1] for s in one] == ["00001.tar"]
    both = list_shards(f"{outs['parquet']}/{{00000..00001}}.parquet")
    assert {s.source.rsplit("/", 1)[-1] for s in both} == {"00000.parquet", "00001.parquet"}
    with pytest.raises(FileNotFoundError, match=r"6 of its 8 files do not exist \(00002.tar, 00003.tar"):
        list_shards(f"{outs['webdataset']}/{{00000..00007}}.tar")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_zsl_extract_reads_each_layout_into_features_and_errors(img2dataset_outputs, tmp_path, fmt):
    from jobs.cli import main

    outs, rows = img2dataset_outputs
    out = tmp_path / "features"
    src = str(outs[fmt]) if fmt != "webdataset" else f"{outs[fmt]}/{{00000..00001}}.tar"  # a brace pattern
    assert main(["extract", "--input", src, "--output", str(out), "--label-field", "animal"]) == 0
    feats = pq.ParquetDataset(str(out / "features")).read().to_pylist()
    errors = pq.ParquetDataset(str(out / "errors")).read().to_pylist()
    by_url = {r["url"]: r for r in rows}
    assert len(feats) == N_IMAGES and {f["url"] for f in feats} <= set(by_url)
    for f in feats:
        assert f["caption"] == by_url[f["url"]]["caption"] and f["label"] == by_url[f["url"]]["animal"]
        assert f["key"] and json.loads(f["meta"])["sha256"] and f["width"] == 56
        assert np.isfinite(f["embedding"]).all()
    assert sorted((e["uri"].rsplit("/", 1)[-1], e["stage"]) for e in errors) == [
        ("missing.png", "download"), ("notimage.jpg", "download")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_images"] == N_IMAGES and manifest["n_errors"] == 2
    # the captions img2dataset kept are embedded row for row
    assert main(["embed-text", "--features", str(out)]) == 0
    caps = json.loads((out / "text" / "manifest.json").read_text())
    assert caps["n_captions"] == caps["n_rows"] == N_IMAGES
