"""Relabelling under a new class set shows what changed, exactly once even when killed; a broken feature
shard fails alone (the others are labelled, the manifest and the exit code say so, the next run retries it)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from pipeline.core import parquet as zpq
from pipeline.core.config import LabelConfig
from pipeline.semantics.classset import write_class_set
from pipeline.stages import label as labeling
from tests.unit.conftest import WORLD_NAMES


class Killed(Exception):
    pass


def _cfg(w, out, classes=None, **kw) -> LabelConfig:
    return LabelConfig(model=w["model"], features=w["features"], classes=classes or w["classes"], output=str(out), **kw)


def _grown_classes(w, tmp_path) -> str:
    """The world's class set plus `okapi2`, next to `cat` in the text space (some cat images move to it)."""
    rng = np.random.default_rng(3)
    text = np.vstack([w["text"], w["text"][0] + 0.05 * rng.standard_normal(w["text"].shape[1])]).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    out = str(tmp_path / "classes2")
    write_class_set(out, WORLD_NAMES + ["okapi2"], [None] * 5, text, None, {
        "text_model": "fake-text", "text_model_name": "fake", "pretrained": None, "templates": ["{name}"],
        "attribute_names": [], "attribute_normalization": "l2", "missing_attributes": "error", "missing_value": -1.0})
    return out


def _top1(out) -> dict:
    t = zpq.read_parquet_dir(str(out / "labels"))
    return dict(zip(t.column("image_id").to_pylist(), zip(t.column("top1").to_pylist(),
                                                          t.column("top1_score").to_pylist())))


def _diff(out, where: str) -> dict:
    t = zpq.read_parquet_dir(str(out / where))
    assert t.column_names == list(labeling.DIFF_COLUMNS)
    rows = zip(*(t.column(c).to_pylist() for c in t.column_names))
    return {r[0]: r[2:] for r in rows}


def test_relabel_writes_exactly_the_moves(small_world, tmp_path):
    w = small_world(n_images=60, shard_size=8)
    out = tmp_path / "labels"
    labeling.run_label(_cfg(w, out), progress=False)
    before = _top1(out)
    classes2 = _grown_classes(w, tmp_path)
    m = labeling.run_label(_cfg(w, out, classes2, overwrite=True), progress=False)
    after = _top1(out)
    moved = {i: (before[i][0], after[i][0]) for i in before if before[i][0] != after[i][0]}
    assert moved, "the test world must move some images"
    assert m.last_diff == "diffs/0001" and m.n_labeled_this_run == 60
    got = _diff(out, m.last_diff)
    assert {i: v[:2] for i, v in got.items()} == moved
    for i, (_, _, old_s, new_s) in got.items():
        assert old_s == pytest.approx(before[i][1]) and new_s == pytest.approx(after[i][1])
    summary = json.loads((out / m.last_diff / "summary.json").read_text())
    assert summary["moved"] == len(moved) and summary["compared"] == 60 and "classes" in summary["changed"]
    assert sum(p["n"] for p in summary["pairs"]) == len(moved)
    # a second relabel with the same classes: nothing to do, no new diff, no file rewritten
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.endswith(".lock")}
    again = labeling.run_label(_cfg(w, out, classes2, overwrite=True), progress=False)
    assert again.n_labeled_this_run == 0 and again.last_diff == "diffs/0001"
    assert stamp == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


@pytest.mark.parametrize("module,name,match", [
    ("parquet", "write_parquet_atomic", "/labels/"),  # the 4th shard's diff written, its labels not
    ("fs", "write_json_atomic", "run.json"),  # the 4th shard's labels written, the progress record not
])
def test_relabel_killed_part_way_then_rerun_gives_the_same_labels_and_diff(small_world, tmp_path, monkeypatch,
                                                                           module, name, match):
    from pipeline.core import fs as zio

    w = small_world(n_images=60, shard_size=8)
    classes2 = _grown_classes(w, tmp_path)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    labeling.run_label(_cfg(w, ref), progress=False)
    shutil.copytree(ref, out)
    m_ref = labeling.run_label(_cfg(w, ref, classes2, overwrite=True), progress=False)
    mod = {"parquet": zpq, "fs": zio}[module]
    real, calls = getattr(mod, name), []

    def dying(uri, data):
        if match in uri and "/killed/" in uri:
            if len(calls) == 4:  # run.json: the identity switch, then one write per relabelled shard
                raise Killed
            calls.append(uri)
        return real(uri, data)

    monkeypatch.setattr(mod, name, dying)
    with pytest.raises(Killed):
        labeling.run_label(_cfg(w, out, classes2, overwrite=True), progress=False)
    assert not (out / "manifest.json").exists()  # unfinished: readers refuse it
    monkeypatch.setattr(mod, name, real)
    m = labeling.run_label(_cfg(w, out, classes2, overwrite=True), progress=False)
    assert _top1(out) == _top1(ref)
    assert m.last_diff == m_ref.last_diff and _diff(out, m.last_diff) == _diff(ref, m_ref.last_diff)
    assert json.loads((out / m.last_diff / "summary.json").read_text()) == \
        json.loads((ref / m_ref.last_diff / "summary.json").read_text())


def test_a_broken_feature_shard_fails_alone_and_is_retried(small_world, tmp_path, capsys):
    from jobs.cli import main

    w = small_world(n_images=40, shard_size=8)
    shard = os.path.join(w["features"], "features", "shard-000002.parquet")
    good = open(shard, "rb").read()
    open(shard, "wb").write(good[: len(good) // 2])  # truncated to half
    out = tmp_path / "labels"
    argv = ["label", "--model", w["model"], "--features", w["features"], "--classes", w["classes"], "--output", str(out)]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "shard-000002.parquet" in err and "a rerun retries" in err
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["failed_shards"]) == ["shard-000002.parquet"] and m["n_images"] == 32
    assert sorted(os.listdir(out / "labels")) == [f"shard-{i:06d}.parquet" for i in (0, 1, 3, 4)]
    open(shard, "wb").write(good)  # restored: the next run labels it and the failure is gone
    assert main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["failed_shards"] == {} and m["n_images"] == 40 and m["n_labeled_this_run"] == 8


def test_index_leaves_out_a_broken_shard_and_adds_it_once_restored(small_world, tmp_path, capsys):
    import faiss

    from jobs.cli import main

    w = small_world(n_images=40, shard_size=8)
    shard = os.path.join(w["features"], "features", "shard-000002.parquet")
    good = open(shard, "rb").read()
    open(shard, "wb").write(good[: len(good) // 2])
    out = tmp_path / "index"
    argv = ["index", "--features", w["features"], "--model", w["model"], "--output", str(out),
            "--index-factory", "Flat"]
    assert main(argv) == 3
    assert "shard-000002.parquet" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["failed_shards"]) == ["shard-000002.parquet"] and m["ntotal"] == 32
    open(shard, "wb").write(good)
    assert main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["failed_shards"] == {} and m["ntotal"] == 40 and m["added_last_run"] == 8
    ids = zpq.read_parquet(str(out / "ids.parquet")).column("image_id").to_pylist()
    assert sorted(ids) == [f"img{i:04d}" for i in range(40)]  # each image once
    assert faiss.read_index(str(out / "index.faiss")).ntotal == 40
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert main(argv) == 0 and (out / "manifest.json").stat().st_mtime_ns == stamp  # nothing new: nothing written
