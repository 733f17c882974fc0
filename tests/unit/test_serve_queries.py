"""`zsl serve` beyond text: image queries (the features' real encoder, EfficientNet-Lite0) and
predicted labels from a `zsl label` output (`--labels`), with the unseen-only filter."""

from __future__ import annotations

import base64
import io
import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from pipeline.core.config import ServeConfig  # noqa: E402


def test_image_query_finds_the_same_image_first(image_world):
    from pipeline.index.searcher import Searcher
    from pipeline.stages.serve import create_app

    root, blobs, labels, _ = image_world
    s = Searcher(str(root / "index"), load_text=False)
    assert s.manifest.image_encoder == "effnet-lite0" and s.manifest.image_size == 224
    client = TestClient(create_app(ServeConfig(indexes={}, thumbnail_cache=str(root / "thumbs")),
                                   searchers={"animals": s}), base_url="http://localhost")
    for i in (0, 9, 20):
        r = client.post("/search", json={"image": base64.b64encode(blobs[i]).decode(), "k": 5})
        assert r.status_code == 200, r.text
        hits = r.json()["hits"]
        assert hits[0]["image_id"] == f"a{i:02d}" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    # a data: URL (what the page's file picker sends) and clip-retrieval's knn-service
    url = "data:image/png;base64," + base64.b64encode(blobs[3]).decode()
    assert client.post("/search", json={"image": url, "k": 1}).json()["hits"][0]["image_id"] == "a03"
    rows = client.post("/knn-service", json={"image": base64.b64encode(blobs[3]).decode(), "text": None,
                                             "embedding_input": None, "modality": "image", "num_images": 3}).json()
    assert rows[0]["image_id"] == "a03" and rows[0]["caption"] == "cat"


@pytest.mark.parametrize("image, reason", [
    ("not base64!", "not valid base64"),
    (base64.b64encode(b"GIF89a but not really").decode(), "cannot be used"),
    ("BOMB", "decompression bomb"),
])
def test_bad_images_get_400(image_world, image, reason):
    from pipeline.index.searcher import Searcher
    from pipeline.stages.serve import create_app

    root = image_world[0]
    if image == "BOMB":  # a real 9-megapixel PNG (a few kB), above the 4-megapixel limit below
        from PIL import Image

        buf = io.BytesIO()
        Image.new("L", (3000, 3000)).save(buf, format="PNG")
        image = base64.b64encode(buf.getvalue()).decode()
    client = TestClient(create_app(ServeConfig(indexes={"a": str(root / "index")}, preload_text=False,
                                               max_image_pixels=4_000_000, thumbnail_cache=str(root / "t"))),
                        base_url="http://localhost")
    r = client.post("/search", json={"image": image})
    assert r.status_code == 400 and reason in r.json()["detail"], r.text
    assert client.post("/knn-service", json={"image_url": "http://127.0.0.1:1/x.jpg"}).status_code == 400
    del Searcher


@pytest.fixture(scope="module")
def labelled(serve_world, tmp_path_factory):
    """serve_world's features labelled against its 4 classes + 'quagga' (unseen, close to zebra)."""
    from pipeline.semantics.classset import load_class_set, write_class_set
    from pipeline.core.config import LabelConfig
    from pipeline.stages.label import run_label

    s, root, y, names = serve_world
    out = tmp_path_factory.mktemp("labelled")
    cs = load_class_set(str(root / "classes"))
    E = np.asarray(cs.text, np.float32)
    quagga = E[names.index("zebra")] + 0.15 * np.random.default_rng(1).standard_normal(E.shape[1])
    E5 = np.vstack([E, quagga / np.linalg.norm(quagga)])
    write_class_set(str(out / "classes"), [*names, "quagga"], [None] * 5, E5, None, {"text_model": "fake-text"})
    model_dir = s.index_dir + "/model"  # the copy the moved index carries
    run_label(LabelConfig(model=model_dir, features=str(root / "features"), classes=str(out / "classes"),
                          output=str(out / "labels"), top_k=2, calibrated=False), progress=False)
    return str(out / "labels")


def test_hits_carry_predicted_labels_and_unseen_only_filters(serve_world, labelled, tmp_path):
    from pipeline.core import fs as zio
    from pipeline.core import parquet as zpq
    from pipeline.stages.serve import create_app

    s, root, _, _ = serve_world
    table = zpq.read_parquet_dir(zio.join(labelled, "labels")).to_pandas().set_index("image_id")
    cfg = ServeConfig(indexes={}, labels={"animals": labelled}, thumbnail_cache=str(tmp_path))
    try:
        client = TestClient(create_app(cfg, searchers={"animals": s}), base_url="http://localhost")
        hits = client.post("/search", json={"text": "zebra", "k": 40}).json()["hits"]
        for h in hits:
            row = table.loc[h["image_id"]]
            assert h["predicted"] == row["top1"] and h["predicted_score"] == pytest.approx(row["top1_score"])
            assert h["predicted_unseen"] == bool(row["top1_is_unseen"])
        assert any(h["predicted"] == "quagga" for h in hits), "the fixture should predict the unseen class"
        unseen = client.post("/search", json={"text": "zebra", "k": 10, "unseen_only": True}).json()["hits"]
        assert unseen and all(h["predicted"] == "quagga" and h["predicted_unseen"] for h in unseen)
        cats = client.post("/search", json={"text": "cat", "k": 5, "unseen_only": True}).json()["hits"]
        assert cats and all(h["predicted_unseen"] for h in cats)  # the cats themselves are filtered out
        by_pred = client.post("/search", json={"text": "zebra", "k": 10, "labels": ["quagga"]}).json()["hits"]
        assert by_pred and all(h["predicted"] == "quagga" for h in by_pred)
        assert client.get("/indices").json()[0]["labels"] == labelled.rsplit("/", 1)[-1]  # no absolute path
    finally:
        s.labels = None  # the session's searcher is shared with other tests
    no_labels = TestClient(create_app(ServeConfig(indexes={}, thumbnail_cache=str(tmp_path)),
                                      searchers={"animals": s}), base_url="http://localhost")
    r = no_labels.post("/search", json={"text": "zebra", "unseen_only": True})
    assert r.status_code == 400 and "--labels" in r.json()["detail"]


def test_labels_of_other_features_or_missing_shards_are_refused(serve_world, labelled, tmp_path):
    import shutil

    from pipeline.index.searcher import PredictedLabels

    s = serve_world[0]
    bad = tmp_path / "labels"
    shutil.copytree(labelled, bad)
    first = sorted((bad / "labels").iterdir())[0]
    first.unlink()
    with pytest.raises(ValueError, match="no labels for 1 indexed shard"):
        PredictedLabels(str(bad), s.manifest)
    other = s.manifest.model_copy(update={"identity": {**s.manifest.identity, "features": "other"}})
    with pytest.raises(ValueError, match="labels of"):
        PredictedLabels(labelled, other)
    with pytest.raises(ValueError, match="unserved index"):
        ServeConfig(indexes={"a": "x"}, labels={"b": "y"})


def test_filters_search_among_the_allowed_ids_exactly(serve_world, labelled, tmp_path):
    """/search with labels / unseen_only (issue 17): every allowed row is a candidate, so a filtered,
    paged search is the exact filtered ranking (true or predicted label; unseen predicted)."""
    from pipeline.core import fs as zio
    from pipeline.core import parquet as zpq
    from pipeline.index.knn import exact_knn
    from pipeline.index.store import read_ids
    from pipeline.stages.serve import create_app

    s, root, _, _ = serve_world
    ids = read_ids(s.index_dir).to_pandas()
    pred = zpq.read_parquet_dir(zio.join(labelled, "labels")).to_pandas().set_index("image_id").loc[ids["image_id"]]
    x = s.index.reconstruct_n(0, s.index.ntotal)
    q = s.text_queries(["zebra"])
    cfg = ServeConfig(indexes={}, labels={"animals": labelled}, thumbnail_cache=str(tmp_path))
    try:
        client = TestClient(create_app(cfg, searchers={"animals": s}), base_url="http://localhost")
        cat = (ids["label"] == "cat").to_numpy() | (pred["top1"] == "cat").to_numpy()
        unseen = pred["top1_is_unseen"].to_numpy(bool)
        zebra = (ids["label"] == "zebra").to_numpy() | (pred["top1"] == "zebra").to_numpy()
        for body, mask in [({"labels": ["cat"]}, cat), ({"unseen_only": True}, unseen),
                           ({"labels": ["zebra", "cat"], "unseen_only": True}, (zebra | cat) & unseen)]:
            allowed = np.flatnonzero(mask)
            want = allowed[exact_knn(x[allowed], q, len(allowed))[1][0]]
            got = [client.post("/search", json={"text": "zebra", "k": 3, "offset": o, **body}).json()["hits"]
                   for o in range(0, len(allowed) + 3, 3)]
            assert [h["faiss_id"] for page in got for h in page] == want.tolist()
            assert [h["rank"] for page in got for h in page] == list(range(1, len(allowed) + 1))
    finally:
        s.labels = None


def test_zsl_search_label_filter_is_exact_among_the_label(serve_world, monkeypatch):
    """`zsl search --label`: the k best of the label's rows (every one a candidate)."""
    from pipeline.core.config import SearchConfig
    from pipeline.index.knn import exact_knn
    from pipeline.index.store import read_ids
    from pipeline.stages import search as stage

    s = serve_world[0]
    monkeypatch.setattr(stage, "Searcher", lambda index: s)
    labels = read_ids(s.index_dir).column("label").to_numpy(zero_copy_only=False)
    allowed = np.flatnonzero(labels == "okapi")
    x = s.index.reconstruct_n(0, s.index.ntotal)
    want = allowed[exact_knn(x[allowed], s.text_queries(["zebra"]), 7)[1][0]]
    out = stage.run_search(SearchConfig(index=s.index_dir, text="zebra", k=7, labels=["okapi"]))
    assert [h["faiss_id"] for h in out["hits"]] == want.tolist() and out["labels"] == ["okapi"]
    with pytest.raises(ValueError, match="no caption index"):
        stage.run_search(SearchConfig(index=s.index_dir, text="zebra", labels=["okapi"], mode="caption"))


def test_filters_are_prepared_at_load_not_on_the_first_query(serve_world, labelled, tmp_path, monkeypatch):
    """zsl serve builds the label id sets (true and predicted) and the large sets' copies when it loads
    an index, so the first filtered query builds nothing (here a label of 30 rows counts as large)."""
    from pipeline.index import filters
    from pipeline.index import searcher as searcher_mod
    from pipeline.index.filters import FilteredIndex
    from pipeline.stages.serve import create_app

    s = serve_world[0]
    s._label_sets, s.filtered = None, FilteredIndex(s.index, exact_max=10)  # as a freshly loaded index
    try:
        client = TestClient(create_app(ServeConfig(indexes={}, labels={"animals": labelled},
                                                   thumbnail_cache=str(tmp_path)), searchers={"animals": s}),
                            base_url="http://localhost")
        assert s.filters_ready and s.labels.sets_ready
        assert s.label_sets.counts()["cat"] == 30 and s.filtered.copy_bytes >= 4 * 30 * 2 * s.dim

        def boom(*a, **kw):
            raise AssertionError("built on the query path")

        monkeypatch.setattr(searcher_mod, "LabelSets", boom)
        monkeypatch.setattr(filters, "SubsetCopy", boom)
        for body in ({"labels": ["cat"]}, {"labels": ["cat", "zebra"]}, {"unseen_only": True}):
            r = client.post("/search", json={"text": "zebra", "k": 3, **body})
            assert r.status_code == 200 and len(r.json()["hits"]) == 3, r.text
    finally:
        s.labels, s.filtered = None, FilteredIndex(s.index)


def test_allowed_ids_join_true_and_predicted_labels_and_intersect_unseen(serve_world, monkeypatch):
    """A label matches the true or the predicted label; unseen_only keeps the predicted-unseen ones."""
    from types import SimpleNamespace

    from pipeline.index.filters import LabelSets
    from pipeline.index.store import read_ids

    s = serve_world[0]
    n = s.index.ntotal
    rng = np.random.default_rng(5)
    top1 = rng.choice(["cat", "dog", "okapi", "quagga"], n)
    unseen = rng.random(n) < 0.4
    monkeypatch.setattr(s, "labels", SimpleNamespace(label_sets=LabelSets(list(top1), flags=unseen)))
    true = read_ids(s.index_dir).column("label").to_numpy(zero_copy_only=False)
    for labels in (["cat"], ["zebra", "quagga"], ["nope"]):
        match = np.isin(true, labels) | np.isin(top1, labels)
        assert s.allowed_ids(labels).tolist() == np.flatnonzero(match).tolist()
        assert s.allowed_ids(labels, unseen_only=True).tolist() == np.flatnonzero(match & unseen).tolist()
    assert s.allowed_ids(unseen_only=True).tolist() == np.flatnonzero(unseen).tolist()
    assert len(s.allowed(["cat"])) == 2  # one id set per source: the prepared arrays themselves
