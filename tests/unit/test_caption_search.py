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
