"""`zsl export --model` writes what autofaiss reads: the real autofaiss 2.18.0 (its own venv from
`make tools`) builds an index from the exported `img_emb/`, and it answers queries like our
`zsl index` of the same features and model (same neighbours, by image id through `metadata/`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("ZSL_TOOLS_DIR", ROOT / ".venv-tools")) / "autofaiss"

SEARCH = """
import sys, faiss, numpy as np
index = faiss.read_index(sys.argv[1])
_, ids = index.search(np.load(sys.argv[2]).astype("float32"), 10)
np.save(sys.argv[3], ids)
"""


def test_autofaiss_builds_from_our_export_and_answers_like_our_index(tmp_path):
    if not (VENV / "bin" / "autofaiss").exists():
        pytest.fail(f"{VENV} is missing: run `make tools` (autofaiss in its own venv)")
    from pipeline.core.config import ExportConfig, IndexConfig
    from pipeline.core.features import write_features
    from pipeline.zsl.models import save_model
    from pipeline.zsl.models.eszsl import ESZSL
    from pipeline.index.searcher import Searcher
    from pipeline.stages.index import run_index
    from pipeline.stages.interop import run_export

    rng = np.random.default_rng(0)
    n, d, k, c = 6000, 96, 48, 40
    S = rng.standard_normal((c, k)).astype(np.float32)
    centres = rng.standard_normal((c, d)).astype(np.float32) * 2
    y = rng.integers(0, c, n)
    X = (centres[y] + rng.standard_normal((n, d))).astype(np.float32)
    write_features(str(tmp_path / "f"), image_ids=[f"img{i:05d}" for i in range(n)], uris=[f"/x/{i}.jpg" for i in range(n)],
                   labels=[f"c{v}" for v in y], X=X, model_id="fake-feat", shard_size=500)  # 12 parts: 10, 11 sort
    save_model(str(tmp_path / "m"), ESZSL(gamma=1.0, lam=1.0).fit(X, y, S), {
        "feature_model": "fake-feat", "feature_dim": d, "semantics": "text", "semantic_dim": k,
        "text_model": "fake-text", "text_model_name": "fake", "text_pretrained": None, "templates": ["{name}"],
        "seen": [f"c{i}" for i in range(c)], "gamma": 0.0, "calibration": None})
    run_index(IndexConfig(features=str(tmp_path / "f"), model=str(tmp_path / "m"), output=str(tmp_path / "ours"),
                          use_gpu="no", tune_queries=200), progress=False)
    run_export(ExportConfig(features=str(tmp_path / "f"), model=str(tmp_path / "m"), output=str(tmp_path / "e"),
                            dtype="float32"), progress=False)
    out = tmp_path / "af"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    r = subprocess.run([str(VENV / "bin" / "autofaiss"), "build_index", f"--embeddings={tmp_path / 'e' / 'img_emb'}",
                        f"--index_path={out / 'knn.index'}", f"--index_infos_path={out / 'infos.json'}",
                        "--metric_type=ip", "--max_index_memory_usage=1G", "--current_memory_available=2G"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    infos = json.loads((out / "infos.json").read_text())
    assert infos["nb vectors"] == n

    ours = Searcher(str(tmp_path / "ours"), load_text=False)
    parts = sorted((tmp_path / "e" / "img_emb").glob("*.npy"))
    assert len(parts) == 12
    V = np.concatenate([np.load(f) for f in parts])
    Q = V[rng.choice(n, 100, replace=False)] + 0.05 * rng.standard_normal((100, k)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    np.save(tmp_path / "q.npy", Q)
    r = subprocess.run([str(VENV / "bin" / "python"), "-c", SEARCH, str(out / "knn.index"), str(tmp_path / "q.npy"),
                        str(tmp_path / "ids.npy")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    af_ids = np.load(tmp_path / "ids.npy")
    # autofaiss numbers rows in the order it reads the parts: metadata_{i} gives their image ids
    meta_ids = sum((pq.read_table(f).column("image_id").to_pylist()
                    for f in sorted((tmp_path / "e" / "metadata").glob("*.parquet"))), [])
    assert meta_ids == [f"img{i:05d}" for i in range(n)]  # parts in shard order
    exact = np.argsort(-(Q @ V.T), axis=1)[:, :10]
    overlap_af = overlap_ours = agree = 0.0
    for q in range(len(Q)):
        want = {meta_ids[i] for i in exact[q]}
        theirs = {meta_ids[i] for i in af_ids[q] if i >= 0}
        mine = {h["image_id"] for h in ours.search_vectors(Q[q:q + 1], 10)[0]}
        overlap_af += len(theirs & want) / 10
        overlap_ours += len(mine & want) / 10
        agree += len(theirs & mine) / 10
    overlap_af, overlap_ours, agree = overlap_af / len(Q), overlap_ours / len(Q), agree / len(Q)
    print(f"recall@10 vs exact: autofaiss {overlap_af:.3f}, zsl index {overlap_ours:.3f}; agreement {agree:.3f}; "
          f"autofaiss chose {infos['index_key']}")
    assert overlap_af >= 0.9 and overlap_ours >= 0.9, (overlap_af, overlap_ours)
    assert agree >= 0.85, (agree, overlap_af, overlap_ours)
