"""pipeline.stages.label: top-k selection, and an end-to-end resumable ``run_label`` on hand-made inputs."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.semantics.classset import write_class_set
from pipeline.core.config import LabelConfig
from pipeline.stages.label import run_label
from pipeline.core.vectors import topk
from pipeline.zsl.models import load_model, save_model
from pipeline.zsl.models.eszsl import ESZSL
from pipeline.core.schema import LABELS_SCHEMA, features_schema
from pipeline.core.manifests import FEATURES_FORMAT

# ---------------------------------------------------------------- topk


@pytest.mark.parametrize("k", [1, 3, 7, 12, 50])
def test_topk_matches_argsort_on_distinct_scores(rng, k):
    s = rng.standard_normal((40, 12)).astype(np.float32)
    idx, vals = topk(s, k)
    kk = min(k, 12)
    ref = np.argsort(-s, axis=1)[:, :kk]
    assert idx.shape == (40, kk) and vals.shape == (40, kk)
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_array_equal(vals, np.take_along_axis(s, ref, axis=1))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_values_with_ties(rng, k):
    s = rng.integers(0, 4, (50, 30)).astype(np.float32)  # many ties
    idx, vals = topk(s, k)
    np.testing.assert_array_equal(vals, -np.sort(-s, axis=1)[:, :k])
    np.testing.assert_array_equal(np.take_along_axis(s, idx, axis=1), vals)
    assert (np.sort(idx, axis=1)[:, 1:] != np.sort(idx, axis=1)[:, :-1]).all()  # no index twice


def test_topk_ties_inside_the_selection_are_ordered_by_index():
    s = np.array([[1.0, 5.0, 5.0, 0.0, 5.0]], np.float32)
    idx, vals = topk(s, 5)
    assert idx.tolist() == [[1, 2, 4, 0, 3]] and vals.tolist() == [[5, 5, 5, 1, 0]]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_ties_at_the_cut_prefer_lower_index(rng, k):
    s = rng.integers(0, 4, (50, 30)).astype(np.float32)
    idx, _ = topk(s, k)
    np.testing.assert_array_equal(idx, np.argsort(-s, axis=1, kind="stable")[:, :k])


# ---------------------------------------------------------------- run_label end to end

DIM, K = 6, 4
NAMES = ["cat", "dog", "okapi", "zebra"]
SEEN = ["cat", "dog"]
SHARDS = {"shard-000000.parquet": 3, "shard-000003.parquet": 2}


def _features_dir(root: str, X: np.ndarray) -> None:
    start = 0
    for name, n in SHARDS.items():
        rows = range(start, start + n)
        table = pa.table({
            "image_id": [f"img{i}" for i in rows],
            "uri": [f"file:///img{i}.png" for i in rows],
            "label": [NAMES[i % 4] if i != 1 else None for i in rows],
            "caption": [None] * n,
            "width": [28] * n,
            "height": [28] * n, "url": [None] * n, "key": [None] * n, "meta": [None] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X[start:start + n].reshape(-1), pa.float32()),
                                                           DIM),
        }, schema=features_schema(DIM))
        zpq.write_parquet_atomic(zio.join(root, "features", name), table)
        start += n
    zio.write_json_atomic(zio.join(root, "manifest.json"), {
        "format": FEATURES_FORMAT, "model_id": "fake-feat", "dim": DIM, "image_size": 28,
        "n_shards": len(SHARDS), "n_images": start, "n_errors": 0,
        "config": {"input": "somewhere", "encoder": "fake-feat"}, "resources": None, "seconds_last_run": 0.0})


@pytest.fixture
def label_inputs(tmp_path, rng):
    feats, model_dir, classes = (str(tmp_path / d) for d in ("features", "model", "classes"))
    text = rng.standard_normal((len(NAMES), K)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    write_class_set(classes, NAMES, [None] * len(NAMES), text, None, {"text_model": "fake-text"})
    Xtr = rng.standard_normal((20, DIM)).astype(np.float32)
    model = ESZSL(gamma=1.0, lam=1.0).fit(Xtr, np.arange(20) % 2, text[:2])
    X = rng.standard_normal((sum(SHARDS.values()), DIM)).astype(np.float32)
    _features_dir(feats, X)
    raw = model.scores(X, text)
    # a gamma that flips some but not all top-1 decisions from a seen to an unseen class
    margin = raw[:, :2].max(1) - raw[:, 2:].max(1)
    gamma = float(np.median(margin[margin > 0])) if (margin > 0).any() else 0.1
    save_model(model_dir, model, {
        "feature_model": "fake-feat", "feature_dim": DIM, "semantics": "text", "semantic_dim": K,
        "text_model": "fake-text", "text_model_name": "fake", "text_pretrained": None, "templates": ["{name}"],
        "seen": SEEN, "gamma": gamma, "calibration": None})
    return dict(features=feats, model=model_dir, classes=classes, X=X, text=text, gamma=gamma)


def _cfg(inp, out, **kw) -> LabelConfig:
    return LabelConfig(model=inp["model"], features=inp["features"], classes=inp["classes"], output=out, **kw)


def _labels(out: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(os.path.join(out, "labels", n)) for n in sorted(SHARDS))


def test_run_label_end_to_end(label_inputs, tmp_path):
    inp, out = label_inputs, str(tmp_path / "labels-out")
    manifest = run_label(_cfg(inp, out, top_k=3), progress=False)
    assert sorted(os.listdir(os.path.join(out, "labels"))) == sorted(SHARDS)  # names mirror the feature shards
    assert manifest.n_labeled_this_run == 5 and manifest.n_shards == 2
    assert manifest.classes == NAMES and manifest.gamma == inp["gamma"]
    t = _labels(out)
    assert t.schema.equals(LABELS_SCHEMA)
    assert t.column("image_id").to_pylist() == [f"img{i}" for i in range(5)]
    assert t.column("label").to_pylist() == ["cat", None, "okapi", "zebra", "cat"]

    model, _ = load_model(inp["model"])
    raw = model.scores(inp["X"], inp["text"])
    calibrated = raw - inp["gamma"] * np.array([1, 1, 0, 0], np.float32)
    expected_top1 = [NAMES[i] for i in calibrated.argmax(1)]
    assert t.column("top1").to_pylist() == expected_top1
    assert expected_top1 != [NAMES[i] for i in raw.argmax(1)]  # gamma really changed something
    np.testing.assert_allclose(t.column("top1_score").to_numpy(), calibrated.max(1), rtol=1e-5, atol=1e-6)
    assert t.column("top1_is_unseen").to_pylist() == [n not in SEEN for n in expected_top1]
    topk_scores = np.array(t.column("topk_scores").to_pylist())
    np.testing.assert_allclose(topk_scores, -np.sort(-calibrated, axis=1)[:, :3], rtol=1e-5, atol=1e-6)
    assert [r[0] for r in t.column("topk").to_pylist()] == expected_top1


def test_run_label_uncalibrated_is_plain_argmax(label_inputs, tmp_path):
    inp, out = label_inputs, str(tmp_path / "o")
    manifest = run_label(_cfg(inp, out, calibrated=False), progress=False)
    model, _ = load_model(inp["model"])
    raw = model.scores(inp["X"], inp["text"])
    assert _labels(out).column("top1").to_pylist() == [NAMES[i] for i in raw.argmax(1)]
    assert manifest.gamma == 0.0


def test_run_label_small_batches_give_the_same_labels(label_inputs, tmp_path):
    inp = label_inputs
    run_label(_cfg(inp, str(tmp_path / "a")), progress=False)
    run_label(_cfg(inp, str(tmp_path / "b"), batch_size=1), progress=False)
    a, b = _labels(str(tmp_path / "a")), _labels(str(tmp_path / "b"))
    assert a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
    # float32 BLAS may round differently for another batch shape: equal to the last few ulps
    sa, sb = np.array(a.column("topk_scores").to_pylist()), np.array(b.column("topk_scores").to_pylist())
    np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)
    # ... so only classes whose scores differ by more than that must come in the same order
    distinct = np.all(np.abs(np.diff(sa, axis=1)) > 1e-5, axis=1)
    assert distinct.mean() > 0.5
    for col in ("top1", "top1_is_unseen", "topk"):
        ca, cb = a.column(col).to_pylist(), b.column(col).to_pylist()
        assert [x for x, d in zip(ca, distinct) if d] == [x for x, d in zip(cb, distinct) if d]


def test_rerun_does_nothing_and_resumes_missing_shards(label_inputs, tmp_path):
    inp, out = label_inputs, str(tmp_path / "o")
    run_label(_cfg(inp, out), progress=False)
    files = {n: os.stat(os.path.join(out, "labels", n)).st_mtime_ns for n in SHARDS}
    again = run_label(_cfg(inp, out), progress=False)
    assert again.n_labeled_this_run == 0
    assert {n: os.stat(os.path.join(out, "labels", n)).st_mtime_ns for n in SHARDS} == files
    os.remove(os.path.join(out, "labels", "shard-000003.parquet"))  # as if killed before this shard
    resumed = run_label(_cfg(inp, out), progress=False)
    assert resumed.n_labeled_this_run == SHARDS["shard-000003.parquet"]
    assert os.stat(os.path.join(out, "labels", "shard-000000.parquet")).st_mtime_ns == files["shard-000000.parquet"]
    assert sorted(os.listdir(os.path.join(out, "labels"))) == sorted(SHARDS)


def test_rerun_after_class_set_change_needs_overwrite(label_inputs, tmp_path, rng):
    inp, out = label_inputs, str(tmp_path / "o")
    run_label(_cfg(inp, out), progress=False)
    before = _labels(out)
    extra = rng.standard_normal((1, K)).astype(np.float32)
    write_class_set(inp["classes"], NAMES + ["tapir"], [None] * 5, np.vstack([inp["text"], extra]), None,
                    {"text_model": "fake-text"})
    with pytest.raises(ValueError, match="made from other inputs or settings"):
        run_label(_cfg(inp, out), progress=False)
    assert _labels(out).equals(before)  # refused before touching anything
    manifest = run_label(_cfg(inp, out, overwrite=True), progress=False)
    assert manifest.n_labeled_this_run == 5 and manifest.classes == NAMES + ["tapir"]
    t = _labels(out)
    assert all(len(r) == 5 for r in t.column("topk").to_pylist())  # top_k=5 over 5 classes: all of them
    assert all("tapir" in r for r in t.column("topk").to_pylist())


def test_rerun_with_another_top_k_needs_overwrite(label_inputs, tmp_path):
    inp, out = label_inputs, str(tmp_path / "o")
    run_label(_cfg(inp, out, top_k=2), progress=False)
    with pytest.raises(ValueError, match="made from other inputs or settings"):
        run_label(_cfg(inp, out, top_k=3), progress=False)


def test_run_label_refuses_features_of_another_model(label_inputs, tmp_path):
    inp = label_inputs
    m = zio.read_json(zio.join(inp["features"], "manifest.json"))
    zio.write_json_atomic(zio.join(inp["features"], "manifest.json"), {**m, "model_id": "effnet-lite0"})
    with pytest.raises(ValueError, match="trained on 'fake-feat' features, these are 'effnet-lite0'"):
        run_label(_cfg(inp, str(tmp_path / "o")), progress=False)
    assert not os.path.exists(tmp_path / "o")
