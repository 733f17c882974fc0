"""`zsl index` with unreadable feature shards: the others are indexed, the manifest names the ones
left out (``failed_shards``) and what the run did and why (``last_action``, ``last_reason``), the
CLI exits 3; a rerun adds a shard readable again (not a rebuild), giving the index a build from
scratch gives; when no shard can be read, nothing is changed. Small seeded world, Flat indexes
(exact, so neighbours compare exactly)."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest

pytest.importorskip("faiss")

from pipeline.core.config import IndexConfig  # noqa: E402

DIM, K, N_CLASSES, SHARD_ROWS, N_SHARDS = 32, 16, 12, 300, 4
NAMES = [f"shard-{i:06d}.parquet" for i in range(N_SHARDS)]


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Clustered 32-d features in 4 shards of 300 rows, and a text-semantics ESZSL model into 16-d."""
    from pipeline.core.features import write_features
    from pipeline.zsl.models import save_model
    from pipeline.zsl.models.eszsl import ESZSL

    root = tmp_path_factory.mktemp("partial")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((N_CLASSES, DIM)).astype(np.float32) * 2
    text = rng.standard_normal((N_CLASSES, K)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    names = [f"c{i:02d}" for i in range(N_CLASSES)]

    def clustered(n):
        y = rng.integers(0, N_CLASSES, n)
        return np.maximum(centres[y] + 1.2 * rng.standard_normal((n, DIM)), 0).astype(np.float32), y

    Xtr, ytr = clustered(600)
    save_model(str(root / "model"), ESZSL(gamma=1.0, lam=1.0).fit(Xtr, ytr, text), {
        "feature_model": "fake-feat", "feature_dim": DIM, "semantics": "text", "semantic_dim": K,
        "text_model": "fake-text", "text_model_name": "fake", "text_pretrained": None, "templates": ["{name}"],
        "seen": names, "gamma": 0.0, "calibration": None})
    save_model(str(root / "model2"), ESZSL(gamma=10.0, lam=0.1).fit(Xtr, ytr, text), {
        "feature_model": "fake-feat", "feature_dim": DIM, "semantics": "text", "semantic_dim": K,
        "text_model": "fake-text", "text_model_name": "fake", "text_pretrained": None, "templates": ["{name}"],
        "seen": names, "gamma": 0.0, "calibration": None})
    X, y = clustered(SHARD_ROWS * N_SHARDS)
    ids = [f"img{i:05d}" for i in range(len(X))]
    write_features(str(root / "all"), image_ids=ids, uris=[f"mem://{i}.png" for i in ids],
                   labels=[names[c] for c in y], X=X, model_id="fake-feat", shard_size=SHARD_ROWS)
    return {"model": str(root / "model"), "model2": str(root / "model2"), "all": str(root / "all"), "X": X, "ids": ids}


def _features(world, tmp_path) -> str:
    """A copy of the world's feature directory (its shards can then be broken and restored)."""
    out = tmp_path / "features"
    if not out.exists():
        shutil.copytree(world["all"], out)
    return str(out)


def _shard(features: str, name: str) -> str:
    return os.path.join(features, "features", name)


def truncate(features: str, name: str) -> None:
    """Cut a shard to half its bytes: its footer is gone ("Parquet magic bytes not found")."""
    path = _shard(features, name)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def break_pages(features: str, name: str) -> None:
    """Overwrite a shard's data pages, keeping its footer: it opens, its rows cannot be read."""
    path = _shard(features, name)
    data = bytearray(open(path, "rb").read())
    footer = struct.unpack("<i", data[-8:-4])[0]
    end = len(data) - 8 - footer
    data[4:end] = b"\xff" * (end - 4)
    open(path, "wb").write(bytes(data))


def restore(world, features: str, name: str) -> None:
    shutil.copy(_shard(world["all"], name), _shard(features, name))


def _cfg(world, features, out, **kw) -> IndexConfig:
    return IndexConfig(features=features, model=world["model"], output=str(out), use_gpu="no",
                       index_factory="Flat", tune_queries=50, **kw)


def _rows_of(*shards: int) -> list[int]:
    return [r for s in shards for r in range(s * SHARD_ROWS, (s + 1) * SHARD_ROWS)]


def _projected(world, rows) -> np.ndarray:
    from pipeline.zsl.models import load_model

    return np.asarray(load_model(world["model"])[0].search_images(world["X"][rows]), np.float32)


def _neighbours(out, queries: np.ndarray, k: int = 10) -> list[list[str]]:
    """The image ids of each query's top ``k`` in the index at ``out``."""
    from pipeline.index.knn import search
    from pipeline.index.store import load_index

    index, ids, _ = load_index(str(out))
    image_ids = ids.column("image_id").to_pylist()
    return [[image_ids[i] for i in row] for row in search(index, queries, k)[1]]


def _check_ids(out, want_rows: list[int], world) -> list[str]:
    """ids.parquet maps faiss ids 0..n-1 in order, each image once, exactly the images of ``want_rows``."""
    from pipeline.index.store import load_index

    index, ids, m = load_index(str(out))
    got = ids.column("image_id").to_pylist()
    assert index.ntotal == m.ntotal == len(got) == len(want_rows)
    assert ids.column("faiss_id").to_pylist() == list(range(len(got)))
    assert len(set(got)) == len(got) and set(got) == {world["ids"][r] for r in want_rows}
    return got


def _files(out) -> dict[str, bytes]:
    """Every file under an output directory and its bytes (to show a run changed nothing)."""
    found = {}
    for d, _, names in os.walk(out):
        for n in names:
            p = os.path.join(d, n)
            found[os.path.relpath(p, out)] = open(p, "rb").read()
    return found


# ------------------------------------------------------------------------------------------ tests

def test_a_truncated_shard_is_left_out_named_and_added_once_restored(world, tmp_path):
    from pipeline.stages.index import run_index

    feats = _features(world, tmp_path)
    truncate(feats, NAMES[1])
    cfg = _cfg(world, feats, tmp_path / "idx")
    m = run_index(cfg, progress=False)
    assert list(m.failed_shards) == [NAMES[1]] and "Parquet magic bytes not found" in m.failed_shards[NAMES[1]]
    assert m.shards == [NAMES[0], NAMES[2], NAMES[3]] and m.ntotal == 3 * SHARD_ROWS
    assert m.last_action == m.build == "build" and "leaving out 1 unreadable shard(s)" in m.last_reason
    assert "1 unreadable shard(s) left out: shard-000001.parquet" in m.last_run_summary()
    _check_ids(tmp_path / "idx", _rows_of(0, 2, 3), world)
    # the good shards' images are found (each its own top hit), each once; the left-out ones are not there
    probe = _rows_of(0, 2, 3)[::37] + _rows_of(1)[::60]
    hits = _neighbours(tmp_path / "idx", _projected(world, probe))
    for r, row in zip(probe, hits):
        assert len(set(row)) == len(row)
        assert not {world["ids"][i] for i in _rows_of(1)} & set(row)
        if r // SHARD_ROWS != 1:
            assert row[0] == world["ids"][r]
    # a rerun with the shard still broken: nothing changes, it is still named
    again = run_index(cfg, progress=False)
    assert again.version() == m.version() and list(again.failed_shards) == [NAMES[1]]

    restore(world, feats, NAMES[1])
    grown = run_index(cfg, progress=False)
    assert grown.last_action == grown.build == "add" and grown.failed_shards == {}
    assert grown.shards_added_last_run == 1 and grown.added_last_run == SHARD_ROWS
    assert "left out as unreadable by an earlier run" in grown.last_reason
    assert grown.shards == [NAMES[0], NAMES[2], NAMES[3], NAMES[1]]  # appended: faiss ids continue
    assert grown.last_run_summary().startswith(f"added 1 shard(s) ({SHARD_ROWS:,} vectors")
    got = _check_ids(tmp_path / "idx", _rows_of(0, 1, 2, 3), world)

    # the same index as one built from scratch on every shard (other faiss ids, same images and neighbours)
    scratch = run_index(_cfg(world, world["all"], tmp_path / "scratch"), progress=False)
    assert scratch.ntotal == grown.ntotal and set(got) == set(_check_ids(tmp_path / "scratch", _rows_of(0, 1, 2, 3),
                                                                          world))
    queries = _projected(world, list(range(0, N_SHARDS * SHARD_ROWS, 97)))
    assert _neighbours(tmp_path / "idx", queries) == _neighbours(tmp_path / "scratch", queries)
    # and it stays as it is: the features listing its shards in another order is not a change
    assert run_index(cfg, progress=False).version() == grown.version()


def test_a_shard_whose_pages_cannot_be_read_fails_only_itself(world, tmp_path, caplog):
    from pipeline.stages.index import run_index

    feats = _features(world, tmp_path)
    break_pages(feats, NAMES[2])
    cfg = _cfg(world, feats, tmp_path / "idx")
    m = run_index(cfg, progress=False)  # the footer is fine: it fails while projecting
    assert list(m.failed_shards) == [NAMES[2]] and m.failed_shards[NAMES[2]].startswith("OSError: ")
    assert "\n" not in m.failed_shards[NAMES[2]] and len(m.failed_shards[NAMES[2]]) <= 200
    assert m.shards == [NAMES[0], NAMES[1], NAMES[3]] and m.last_action == "build"
    _check_ids(tmp_path / "idx", _rows_of(0, 1, 3), world)
    assert not os.path.exists(tmp_path / "idx" / "vectors")  # the cache is gone, nothing of it half-written
    restore(world, feats, NAMES[2])
    grown = run_index(cfg, progress=False)
    assert grown.last_action == "add" and grown.failed_shards == {} and grown.ntotal == N_SHARDS * SHARD_ROWS
    _check_ids(tmp_path / "idx", _rows_of(0, 1, 3, 2), world)


def test_an_indexed_shard_unreadable_later_rebuilds_without_it_and_says_why(world, tmp_path):
    from pipeline.stages.index import run_index

    feats = _features(world, tmp_path)
    cfg = _cfg(world, feats, tmp_path / "idx")
    assert run_index(cfg, progress=False).failed_shards == {}
    truncate(feats, NAMES[0])  # indexed, now unreadable: the index cannot be kept as the features' index
    m = run_index(cfg, progress=False)
    assert m.last_action == "rebuild" and m.build == "build"
    assert "1 indexed shard(s) cannot be read now (shard-000000.parquet)" in m.last_reason
    assert m.last_run_summary().startswith("rebuilt from 3 shard(s) (900 vectors): the index there cannot be kept")
    assert list(m.failed_shards) == [NAMES[0]]
    _check_ids(tmp_path / "idx", _rows_of(1, 2, 3), world)
    restore(world, feats, NAMES[0])
    assert run_index(cfg, progress=False).last_action == "add"
    _check_ids(tmp_path / "idx", _rows_of(1, 2, 3, 0), world)


def test_a_new_unreadable_shard_alone_updates_only_the_manifest(world, tmp_path):
    from pipeline.core.features import write_features
    from pipeline.stages.index import run_index

    feats = str(tmp_path / "features")
    write_features(feats, image_ids=world["ids"][:600], uris=world["ids"][:600], labels=[None] * 600,
                   X=world["X"][:600], model_id="fake-feat", shard_size=SHARD_ROWS)
    cfg = _cfg(world, feats, tmp_path / "idx")
    first = run_index(cfg, progress=False)
    index_bytes = open(tmp_path / "idx" / "index.faiss", "rb").read()
    shutil.copy(_shard(world["all"], NAMES[2]), _shard(feats, NAMES[2]))
    truncate(feats, NAMES[2])
    m = run_index(cfg, progress=False)
    assert m.last_action == "nothing" and list(m.failed_shards) == [NAMES[2]] and m.version() != first.version()
    assert m.sha256 == first.sha256 and open(tmp_path / "idx" / "index.faiss", "rb").read() == index_bytes
    os.remove(_shard(feats, NAMES[2]))  # gone from the features: no longer named
    assert run_index(cfg, progress=False).failed_shards == {}


def test_an_index_of_another_model_replaced_says_so(world, tmp_path):
    from pipeline.stages.index import run_index

    cfg = _cfg(world, world["all"], tmp_path / "idx")
    assert run_index(cfg, progress=False).last_action == "build"
    other = cfg.model_copy(update={"model": world["model2"], "overwrite": True})
    m = run_index(other, progress=False)
    assert m.last_action == "rebuild" and "made from another model and is replaced" in m.last_reason
    assert m.last_run_summary().startswith("rebuilt from 4 shard(s) (1,200 vectors): the index there was made from")
    assert run_index(other, progress=False).last_action == "rebuild"  # nothing to do: the manifest stays


@pytest.mark.parametrize("breaker", [truncate, break_pages])
def test_when_no_shard_can_be_read_nothing_is_changed(world, tmp_path, breaker):
    from pipeline.stages.index import run_index

    feats = _features(world, tmp_path)
    for n in NAMES[2:]:
        os.remove(_shard(feats, n))
    cfg = _cfg(world, feats, tmp_path / "idx")
    run_index(cfg, progress=False)
    before = _files(tmp_path / "idx")
    for n in NAMES[2:]:  # the features gain two shards (so the run has shards to read), and every one breaks
        restore(world, feats, n)
    for n in NAMES:
        breaker(feats, n)
    with pytest.raises(ValueError, match=r"feature shard\(s\) can be read|no feature shard can be read") as err:
        run_index(cfg, progress=False)
    assert "nothing was indexed or changed" in str(err.value) and NAMES[0] in str(err.value)
    after = _files(tmp_path / "idx")
    after.pop(".zsl.lock", None), before.pop(".zsl.lock", None)
    assert after == before
    with pytest.raises(ValueError, match="can be read"):
        run_index(_cfg(world, feats, tmp_path / "fresh"), progress=False)
    if breaker is truncate:  # unreadable footers are found before the output is opened: not even created
        assert not os.path.exists(tmp_path / "fresh")
    else:  # only what the resume protocol opens it with: no index, no manifest, no cache
        assert set(_files(tmp_path / "fresh")) <= {".zsl.lock", "run.json"}


def test_cli_exit_status_3_lists_the_shards_left_out_0_when_all_are_in_2_when_none_can_be_read(
        world, tmp_path, capsys):
    from jobs.cli import main

    feats = _features(world, tmp_path)
    truncate(feats, NAMES[3])
    argv = ["index", "--features", feats, "--model", world["model"], "--output", str(tmp_path / "idx"),
            "--index-factory", "Flat", "--use-gpu", "no", "--set", "tune_queries=50"]
    assert main(argv) == 3
    out, err = capsys.readouterr()
    assert f"zsl: feature shard {NAMES[3]} not indexed: not a readable feature shard" in err
    assert "1 of 4 feature shards not indexed" in err and "index: built from 3 shard(s) (900 vectors)" in out
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert list(m["failed_shards"]) == [NAMES[3]] and m["ntotal"] == 900
    restore(world, feats, NAMES[3])
    assert main(argv) == 0
    assert "index: added 1 shard(s) (300 vectors; 1,200 in all)" in capsys.readouterr().out
    for n in NAMES:
        truncate(feats, n)
    assert main(argv) == 2
    assert "none of its 4 feature shard(s) can be read" in capsys.readouterr().err


def test_on_ray_a_shard_failing_on_a_worker_fails_only_itself(world, tmp_path, ray_start_2_cpus):
    """The projection on Ray workers (``address``; Ray is already up, so the local one is used):
    an exception there would fail the whole job, so the worker reports the shard instead."""
    from pipeline.stages.index import run_index

    feats = _features(world, tmp_path)
    break_pages(feats, NAMES[0])
    m = run_index(_cfg(world, feats, tmp_path / "idx", address="auto", num_workers=1), progress=False)
    assert list(m.failed_shards) == [NAMES[0]] and m.failed_shards[NAMES[0]].startswith("OSError: ")
    _check_ids(tmp_path / "idx", _rows_of(1, 2, 3), world)
