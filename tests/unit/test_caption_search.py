"""Caption search: `zsl embed-text` + `zsl index` add a caption index (same faiss ids) beside the image
index; `mode` caption / both in the Searcher, `zsl search`, the service and clip-retrieval's
modality="text". Real MiniLM (the offline default text model) on both sides."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")

from pipeline.core.config import EmbedTextConfig, IndexConfig  # noqa: E402

ADJ = ["striped", "spotted", "small", "grey", "sleeping", "running"]
NOUN = ["horse", "cat", "bird", "elephant", "dog", "fish", "owl", "goat", "bear", "fox"]


@pytest.fixture(scope="module")
def captioned_index(tmp_path_factory):
    from pipeline.semantics.classset import write_class_set
    from pipeline.encoders.text import load_text_encoder
    from pipeline.core.features import write_features
    from pipeline.zsl.models import save_model
    from pipeline.zsl.models.eszsl import ESZSL
    from pipeline.stages.index import run_index

    root = tmp_path_factory.mktemp("capidx")
    rng = np.random.default_rng(0)
    caps = [f"a {a} {n}" for a in ADJ for n in NOUN]  # 60 distinct captions
    y = np.array([NOUN.index(c.split()[-1]) for c in caps])
    enc = load_text_encoder("minilm")
    S = enc.encode(NOUN)
    centres = rng.standard_normal((len(NOUN), 32)).astype(np.float32) * 3
    X = (centres[y] + 0.5 * rng.standard_normal((len(caps), 32))).astype(np.float32)
    captions = [c if i % 7 else None for i, c in enumerate(caps)]  # every 7th row has no caption
    write_features(str(root / "features"), image_ids=[f"r{i:02d}" for i in range(60)],
                   uris=[f"/x/{i}.jpg" for i in range(60)], labels=[NOUN[v] for v in y], X=X,
                   model_id="fake-feat", shard_size=25, captions=captions)
    write_class_set(str(root / "classes"), NOUN, [None] * len(NOUN), S, None, {"text_model": "minilm"})
    save_model(str(root / "model"), ESZSL(gamma=1.0, lam=0.1).fit(X, y, S), {
        "feature_model": "fake-feat", "feature_dim": 32, "semantics": "text", "semantic_dim": 384,
        "text_model": "minilm", "text_model_name": "minilm", "text_pretrained": None, "templates": ["a photo of a {name}."],
        "seen": NOUN, "gamma": 0.0, "calibration": None})
    cfg = IndexConfig(features=str(root / "features"), model=str(root / "model"), output=str(root / "index"),
                      use_gpu="no", tune_queries=20)
    first = run_index(cfg, progress=False)  # before any captions were embedded: no caption index
    assert not (root / "index" / "captions").exists()
    from pipeline.stages.embed_text import run_embed_text

    run_embed_text(EmbedTextConfig(features=str(root / "features")), progress=False)
    again = run_index(cfg, progress=False)  # adds the caption index, keeps the image index
    assert again.sha256 == first.sha256 and (root / "index" / "captions" / "manifest.json").exists()
    return root, X, captions


def test_caption_mode_finds_the_caption_and_rows_without_one_score_zero(captioned_index):
    from pipeline.index.searcher import Searcher

    root, _, captions = captioned_index
    s = Searcher(str(root / "index"))
    hits = s.search("a sleeping owl", 60, mode="caption")
    assert hits[0]["image_id"] == f"r{captions.index('a sleeping owl'):02d}"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    no_caption = {f"r{i:02d}" for i, c in enumerate(captions) if c is None}
    assert not {h["image_id"] for h in hits} & no_caption  # rows without a caption never come back


def test_both_mode_is_the_weighted_sum_of_exact_scores(captioned_index):
    from pipeline.core import parquet as zpq
    from pipeline.core.features import CAPTIONS_DIR
    from pipeline.index.searcher import Searcher

    root, X, _ = captioned_index
    s = Searcher(str(root / "index"))
    q_img, q_cap = s.text_query_pairs(["a spotted fox"])[0]
    C = np.asarray(zpq.read_parquet_dir(str(root / "features" / CAPTIONS_DIR / "shards")).column("embedding")
                   .to_pylist(), np.float32)
    img = s.model.search_images(X) @ q_img
    cap = C @ q_cap
    want = 0.7 * img + 0.3 * cap
    hits = s.search("a spotted fox", 10, mode="both", caption_weight=0.3)
    got = [int(h["faiss_id"]) for h in hits]
    assert got == list(np.argsort(-want, kind="stable")[:10])
    for h in hits:
        i = h["faiss_id"]
        assert h["image_score"] == pytest.approx(img[i], abs=1e-4) and h["caption_score"] == pytest.approx(cap[i], abs=1e-4)
        assert h["score"] == pytest.approx(want[i], abs=1e-4)
    assert [h["faiss_id"] for h in s.search("a spotted fox", 5)] == \
        [h["faiss_id"] for h in s.search_vectors(q_img[None, :], 5)[0]]


def test_service_modes_and_clip_retrieval_text_modality(captioned_index, serve_world, tmp_path):
    from fastapi.testclient import TestClient

    from pipeline.core.config import ServeConfig
    from pipeline.stages.serve import create_app

    root, _, captions = captioned_index
    client = TestClient(create_app(ServeConfig(indexes={"c": str(root / "index")}, thumbnail_cache=str(tmp_path)),
                                   searchers={"plain": serve_world[0]}), base_url="http://localhost")
    want = f"r{captions.index('a grey goat'):02d}"
    r = client.post("/search", json={"text": "a grey goat", "index": "c", "mode": "caption", "k": 3})
    assert r.status_code == 200 and r.json()["hits"][0]["image_id"] == want, r.text
    both = client.post("/search", json={"text": "a grey goat", "index": "c", "mode": "both", "k": 3}).json()["hits"]
    assert {"image_score", "caption_score"} <= set(both[0])
    rows = client.post("/knn-service", json={"text": "a grey goat", "indice_name": "c", "modality": "text",
                                             "num_images": 2}).json()
    assert rows[0]["image_id"] == want
    ix = {i["name"]: i for i in client.get("/indices").json()}
    assert ix["c"]["captions"] is True and ix["plain"]["captions"] is False
    r = client.post("/search", json={"text": "cat", "index": "plain", "mode": "caption"})
    assert r.status_code == 400 and "no caption index" in r.json()["detail"]
    r = client.post("/search", json={"embedding": [0.0] * 384, "index": "c", "mode": "both"})
    assert r.status_code == 400 and "needs a text query" in r.json()["detail"]


class _FakeText:
    """An 8-d text encoder: ``embed(text)`` per text."""

    dim = 8

    def __init__(self, embed):
        self.embed = embed

    def encode(self, texts, **_):
        return np.stack([self.embed(t) for t in texts])


@pytest.fixture(scope="module")
def rare_captions(tmp_path_factory):
    """400 captioned rows; the label 'rare' on 4 of them, whose captions (one missing) point away from
    the query direction ``qdir``: the last rows of an unfiltered caption search."""
    from pipeline.core.config import IndexConfig
    from pipeline.core.features import write_features
    from pipeline.semantics.classset import write_class_set
    from pipeline.stages import embed_text
    from pipeline.stages.index import run_index
    from pipeline.stages.embed_text import run_embed_text
    from pipeline.zsl.models import save_model
    from pipeline.zsl.models.eszsl import ESZSL

    root = tmp_path_factory.mktemp("rarecap")
    rng = np.random.default_rng(3)
    n, names = 400, ["cat", "dog", "okapi", "zebra"]
    text = rng.standard_normal((4, 8)).astype(np.float32)
    y = np.arange(n) % 4
    X = (3 * rng.standard_normal((4, 16))[y] + 0.3 * rng.standard_normal((n, 16))).astype(np.float32)
    qdir = rng.standard_normal(8).astype(np.float32)
    qdir /= np.linalg.norm(qdir)
    C = rng.standard_normal((n, 8)).astype(np.float32) * 0.3 + 0.5 * qdir
    rare = np.array([50, 150, 250, 350])
    C[rare] = -qdir + 0.2 * rng.standard_normal((4, 8)).astype(np.float32)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    labels = np.array([names[c] for c in y], dtype=object)
    labels[rare] = "rare"
    captions = [f"c{i}" for i in range(n)]
    captions[250] = None
    write_class_set(str(root / "classes"), names, [None] * 4, text, None, {"text_model": "fake-text"})
    save_model(str(root / "model"), ESZSL(gamma=1.0, lam=0.1).fit(X, y, text), {
        "feature_model": "fake-feat", "feature_dim": 16, "semantics": "text", "semantic_dim": 8,
        "text_model": "fake-text", "text_model_name": "fake", "text_pretrained": None, "templates": ["a {name}"],
        "seen": names, "gamma": 0.0, "calibration": None})
    write_features(str(root / "features"), image_ids=[f"r{i:03d}" for i in range(n)],
                   uris=[f"/x/{i}.jpg" for i in range(n)], labels=list(labels), X=X, model_id="fake-feat",
                   shard_size=150, captions=captions)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embed_text, "load_text_encoder", lambda *a, **kw: _FakeText(lambda t: C[int(t[1:])]))
        run_embed_text(EmbedTextConfig(features=str(root / "features"), text_model="fake-text"), progress=False)
    run_index(IndexConfig(features=str(root / "features"), model=str(root / "model"), output=str(root / "index"),
                          use_gpu="no", tune_queries=20), progress=False)
    C[250] = 0.0  # no caption: a zero vector in the caption index
    return root, X, C, qdir, rare


def test_label_filters_search_captions_among_the_allowed_ids(rare_captions, tmp_path, monkeypatch):
    """caption and both modes with a label filter: the label's exact top-k, full, in the service too
    (the old way, the top max(4k, 100) filtered, found none of the 'rare' rows); rows without a
    caption never come back in caption mode, even when every captioned match scores below zero."""
    from fastapi.testclient import TestClient

    from pipeline.core.config import SearchConfig, ServeConfig
    from pipeline.index.searcher import Searcher
    from pipeline.stages import search as stage
    from pipeline.stages.serve import create_app

    root, X, C, qdir, rare = rare_captions
    s = Searcher(str(root / "index"), load_text=False)
    assert s.captions is not None and s.captions.ntotal == 400
    s._encoder = _FakeText(lambda t: qdir)  # every prompt, the query direction
    captioned = rare[rare != 250]
    want_cap = captioned[np.argsort(-(C[captioned] @ qdir))]
    q_img, q_cap = s.text_query_pairs(["anything"])[0]
    hits = s.search_pair(q_img, q_cap, 3, mode="caption", allowed=s.allowed(["rare"]))
    assert [h["faiss_id"] for h in hits] == want_cap.tolist() and all(h["label"] == "rare" for h in hits)
    img = s.model.search_images(X[rare]) @ q_img
    total = 0.6 * img + 0.4 * (C[rare] @ q_cap)
    both = s.search_pair(q_img, q_cap, 4, mode="both", caption_weight=0.4, allowed=s.allowed(["rare"]))
    assert [h["faiss_id"] for h in both] == rare[np.argsort(-total)].tolist()
    assert [h["score"] for h in both] == pytest.approx(np.sort(total)[::-1], abs=1e-4)
    client = TestClient(create_app(ServeConfig(indexes={}, thumbnail_cache=str(tmp_path)), searchers={"r": s}),
                        base_url="http://localhost")
    for mode, want in (("caption", want_cap[:2]), ("both", rare[np.argsort(-total)][:2])):
        r = client.post("/search", json={"text": "anything", "k": 2, "mode": mode, "labels": ["rare"]})
        assert r.status_code == 200 and [h["faiss_id"] for h in r.json()["hits"]] == want.tolist(), r.text
    monkeypatch.setattr(stage, "Searcher", lambda index: s)  # zsl search --label, in caption mode
    out = stage.run_search(SearchConfig(index=s.index_dir, text="anything", k=5, labels=["rare"], mode="caption"))
    assert [h["faiss_id"] for h in out["hits"]] == want_cap.tolist()
