"""`zsl serve` follows its indexes: a new version (shards added, a rebuild) is loaded beside the
old one and swapped in; requests keep the version they started on; a version that fails to load
leaves the old one serving and says so; an index being written is left alone; SIGHUP checks now."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from pipeline.core.config import IndexConfig, ServeConfig  # noqa: E402


@pytest.fixture
def growing(small_world, tmp_path):
    """``(world, grow(n_shards), index config)``: an index of the first 3 of 6 shards (8 images each);
    ``grow(n)`` gives the feature directory its first ``n`` shards."""
    from pipeline.stages.index import run_index

    w = small_world(n_images=48, shard_size=8)
    src, feats = Path(w["features"]), tmp_path / "feats"
    (feats / "features").mkdir(parents=True)

    def grow(n: int) -> None:
        for i in range(n):
            name = f"shard-{i:06d}.parquet"
            if not (feats / "features" / name).exists():
                shutil.copy(src / "features" / name, feats / "features" / name)
        man = json.loads((src / "manifest.json").read_text())
        man.update(n_shards=n, n_images=8 * n)
        (feats / "manifest.json").write_text(json.dumps(man))

    grow(3)
    cfg = IndexConfig(features=str(feats), model=w["model"], output=str(tmp_path / "idx"), use_gpu="no",
                      index_factory="Flat")
    run_index(cfg, progress=False)
    return w, grow, cfg


def _app(cfg: IndexConfig, tmp_path, **kw):
    from pipeline.stages.serve import create_app

    scfg = ServeConfig(indexes={"g": cfg.output}, preload_text=False, reload_interval_s=0,
                       thumbnail_cache=str(tmp_path / "thumbs"), **kw)
    app = create_app(scfg)
    return TestClient(app, base_url="http://localhost"), app.state.serve


def _query(w, i: int) -> list[float]:
    """The index-space vector of world image ``i`` (what the index stores for it)."""
    from pipeline.zsl.models import load_model

    model, _ = load_model(w["model"])
    return np.asarray(model.search_images(w["X"][i:i + 1]), np.float32)[0].tolist()


def _found(client, w, i: int = 0) -> tuple[set[str], str]:
    """The image ids an exhaustive search (k = 50, more than the world holds) returns, and the version."""
    r = client.post("/search", json={"embedding": _query(w, i), "k": 50})
    assert r.status_code == 200, r.text
    return {h["image_id"] for h in r.json()["hits"]}, r.json()["version"]


def test_added_shards_are_served_after_the_check(growing, tmp_path):
    from pipeline.stages.index import run_index

    w, grow, cfg = growing
    client, state = _app(cfg, tmp_path)
    first = client.get("/indices").json()[0]
    assert first["ntotal"] == 24 and first["reload_error"] is None and first["loaded_at"]
    old = state.served("g")
    grow(6)
    assert run_index(cfg, progress=False).build == "add"
    assert client.get("/indices").json()[0]["ntotal"] == 24  # not checked yet
    assert "img0040" not in _found(client, w)[0] and len(_found(client, w)[0]) == 24
    assert state.watcher.check() == ["g"]
    now = client.get("/indices").json()[0]
    assert now["ntotal"] == 48 and now["version"] != first["version"]
    found, version = _found(client, w)
    assert len(found) == 48 and "img0040" in found and version == now["version"]
    # a request that began on the old version finishes on it
    hits = old.searcher.search_vectors(np.asarray([_query(w, 40)], np.float32), 3)[0]
    assert all(h["faiss_id"] < 24 for h in hits) and old.batcher.closed
    metrics = client.get("/metrics").text
    assert f'zsl_index_info{{index="g",version="{now["version"]}"}} 1.0' in metrics
    assert 'zsl_index_reloads_total{index="g"} 1.0' in metrics and 'zsl_index_vectors{index="g"} 48.0' in metrics
    assert state.watcher.check() == []  # nothing new


def test_a_rebuild_is_served_with_its_own_ids(growing, tmp_path):
    from pipeline.index.store import read_ids
    from pipeline.stages.index import run_index

    w, grow, cfg = growing
    client, state = _app(cfg, tmp_path)
    grow(6)
    run_index(cfg.model_copy(update={"index_factory": "HNSW8,Flat", "overwrite": True}), progress=False)
    assert state.watcher.check() == ["g"]
    ids = read_ids(cfg.output).to_pydict()
    uri = dict(zip(ids["faiss_id"], ids["uri"]))
    r = client.post("/search", json={"embedding": _query(w, 33), "k": 50}).json()
    assert len(r["hits"]) >= 20 and r["version"] == client.get("/indices").json()[0]["version"]
    assert all(h["uri"] == uri[h["faiss_id"]] for h in r["hits"])
    assert client.get("/indices").json()[0]["factory"].startswith("HNSW")


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(growing, tmp_path):
    from pipeline.stages.index import run_index

    w, grow, cfg = growing
    client, state = _app(cfg, tmp_path)
    v0 = client.get("/indices").json()[0]["version"]
    grow(6)
    run_index(cfg, progress=False)
    path = Path(cfg.output) / "index.faiss"
    good = path.read_bytes()
    path.write_bytes(good[:-100])  # truncated: the manifest says otherwise
    assert state.watcher.check() == []
    health = client.get("/health").json()
    assert health["status"] == "degraded" and "truncated" in health["errors"]["g"]
    assert str(tmp_path) not in json.dumps(health)  # no absolute path in the reply
    assert client.get("/indices").json()[0]["version"] == v0 and _found(client, w) == (_found(client, w)[0], v0)
    assert len(_found(client, w)[0]) == 24
    metrics = client.get("/metrics").text
    assert 'zsl_index_reload_ok{index="g"} 0.0' in metrics
    assert 'zsl_index_reload_failures_total{index="g"} 1.0' in metrics
    assert state.watcher.check() == []  # the same version is not tried again ...
    assert 'zsl_index_reload_failures_total{index="g"} 1.0' in client.get("/metrics").text
    path.write_bytes(good)
    assert state.watcher.check(retry=True) == ["g"]  # ... unless asked (SIGHUP)
    assert client.get("/health").json() == {"status": "ok", "indices": ["g"]}
    assert len(_found(client, w)[0]) == 48


def test_an_index_being_written_is_left_alone(growing, tmp_path):
    w, _, cfg = growing
    client, state = _app(cfg, tmp_path)
    os.remove(Path(cfg.output) / "manifest.json")  # what a `zsl index` run does first
    assert state.watcher.check() == [] and client.get("/health").json()["status"] == "ok"
    assert len(_found(client, w)[0]) == 24


def test_the_watcher_polls_while_the_app_runs(growing, tmp_path):
    import time

    from pipeline.stages.index import run_index

    w, grow, cfg = growing
    from pipeline.stages.serve import create_app

    app = create_app(ServeConfig(indexes={"g": cfg.output}, preload_text=False, reload_interval_s=0.05,
                                 thumbnail_cache=str(tmp_path / "thumbs")))
    with TestClient(app, base_url="http://localhost") as client:  # the lifespan starts the watcher
        grow(6)
        run_index(cfg, progress=False)
        deadline = time.monotonic() + 20
        while client.get("/indices").json()[0]["ntotal"] != 48 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/indices").json()[0]["ntotal"] == 48
    assert app.state.serve.watcher._stop.is_set()


def test_sighup_wakes_the_watcher(growing, tmp_path):
    import signal

    from pipeline.stages.serve.runner import follow_sighup

    _, _, cfg = growing
    client, state = _app(cfg, tmp_path)
    before = signal.getsignal(signal.SIGHUP)
    try:
        follow_sighup(client.app)
        os.kill(os.getpid(), signal.SIGHUP)
        assert state.watcher._wake.wait(5) and state.watcher._retry
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_closed_text_batcher_still_answers_late_texts():
    """A request that took the old version before the swap encodes its text in its own thread."""
    import threading

    from pipeline.stages.serve.batching import TextBatcher

    class Stub:
        encoder = type("E", (), {"encode": staticmethod(lambda texts: None)})()

        def text_query_pairs(self, texts):
            return [(np.full(3, len(t), np.float32), None) for t in texts]

    b = TextBatcher(Stub(), workers=2)
    assert b.encode("abc")[0].tolist() == [[3.0, 3.0, 3.0]]
    b.close()
    for t in b.threads:
        t.join(5)
    assert not any(t.is_alive() for t in b.threads)
    assert b.encode("abcd")[0].tolist() == [[4.0, 4.0, 4.0]]


def test_new_shards_wait_for_their_labels(growing, tmp_path):
    """Predicted labels are part of a version: an index grown past its labels keeps the old version
    (degraded, saying to run `zsl label`); labelling the new shards brings the new one in."""
    from pipeline.core.config import LabelConfig
    from pipeline.stages.index import run_index
    from pipeline.stages.label import run_label

    w, grow, cfg = growing
    label = LabelConfig(model=w["model"], features=cfg.features, classes=w["classes"],
                        output=str(tmp_path / "labels"), calibrated=False)
    run_label(label, progress=False)
    client, state = _app(cfg, tmp_path, labels={"g": label.output})
    grow(6)
    run_index(cfg, progress=False)
    assert state.watcher.check() == []
    health = client.get("/health").json()
    assert health["status"] == "degraded" and "zsl label" in health["errors"]["g"]
    assert len(_found(client, w)[0]) == 24
    run_label(label, progress=False)  # the labels manifest changes: a new version to try
    assert state.watcher.check() == ["g"]
    hits = client.post("/search", json={"embedding": _query(w, 0), "k": 50}).json()["hits"]
    assert len(hits) == 48 and all(h["predicted"] is not None for h in hits)
    assert client.get("/health").json()["status"] == "ok"
