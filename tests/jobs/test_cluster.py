"""`zsl label` and `zsl index` with --address: the per-shard work runs on a real (local) Ray cluster
started with `ray start --head`, and gives what the local path gives, under the same names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("ray")

from pipeline.core import parquet as zpq  # noqa: E402

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
            "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def cluster(free_port):
    """A one-node Ray cluster of 2 CPUs on loopback, stopped afterwards."""
    port, temp = free_port(), f"/tmp/zr-{os.getpid()}"
    start = subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=2", f"--port={port}",
                            "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp}",
                            "--disable-usage-stats"], env=_env(), capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=_env(), capture_output=True, timeout=120)


def _zsl(*argv: str) -> str:
    p = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], env=_env(), capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipeline.semantics.classset import write_class_set
    from pipeline.core.features import write_features
    from pipeline.zsl.models import save_model
    from pipeline.zsl.models.eszsl import ESZSL

    root = tmp_path_factory.mktemp("cluster")
    rng = np.random.default_rng(11)
    names = [f"c{i}" for i in range(8)]
    text = rng.standard_normal((8, 12)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    write_class_set(str(root / "classes"), names, [None] * 8, text, None, {"text_model": "fake-text"})
    centres = rng.standard_normal((8, 24)).astype(np.float32) * 2
    y = rng.integers(0, 8, 3000)
    X = (centres[y] + rng.standard_normal((3000, 24))).astype(np.float32)
    model = ESZSL(gamma=1.0, lam=1.0).fit(X[:500], y[:500] % 4, text[:4])
    save_model(str(root / "model"), model, {
        "feature_model": "fake-feat", "feature_dim": 24, "semantics": "text", "semantic_dim": 12,
        "text_model": "fake-text", "text_model_name": "fake", "text_pretrained": None, "templates": ["{name}"],
        "seen": names[:4], "gamma": 0.1, "calibration": None})
    write_features(str(root / "features"), image_ids=[f"i{n:05d}" for n in range(3000)],
                   uris=[f"mem://{n}" for n in range(3000)], labels=[names[c] for c in y], X=X,
                   model_id="fake-feat", shard_size=500)
    return root


def test_label_and_index_on_a_ray_cluster_match_the_local_run(cluster, world, tmp_path):
    common = ["--model", str(world / "model"), "--features", str(world / "features")]
    _zsl("label", *common, "--classes", str(world / "classes"), "--output", str(tmp_path / "local-labels"))
    log = _zsl("label", *common, "--classes", str(world / "classes"), "--output", str(tmp_path / "labels"),
               "--address", cluster)
    assert "labeled 3000 images in 6 shards" in log
    a = zpq.read_parquet_dir(str(tmp_path / "local-labels" / "labels"))
    b = zpq.read_parquet_dir(str(tmp_path / "labels" / "labels"))
    assert a.column("image_id").equals(b.column("image_id")) and a.column("topk").equals(b.column("topk"))
    assert sorted(os.listdir(tmp_path / "labels" / "labels")) == [f"shard-{i:06d}.parquet" for i in range(6)]

    idx = ["--index-factory", "IVF16,Flat", "--nprobe", "4", "--use-gpu", "no"]
    _zsl("index", *common, "--output", str(tmp_path / "local-index"), *idx)
    log = _zsl("index", *common, "--output", str(tmp_path / "index"), *idx, "--address", cluster,
               "--num-workers", "2")
    assert "partitions" in log
    m = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert m["build"] == "partitions" and m["ntotal"] == 3000 and m["data_files"]["index.ivfdata"] > 0

    from pipeline.index.knn import search
    from pipeline.index.store import load_index

    (ia, ids_a, _), (ib, ids_b, _) = load_index(str(tmp_path / "local-index")), load_index(str(tmp_path / "index"))
    q = np.random.default_rng(0).standard_normal((50, 12)).astype(np.float32)
    for x, y in zip(search(ia, q, 10), search(ib, q, 10)):
        np.testing.assert_array_equal(x, y)
    assert ids_a.equals(ids_b)
