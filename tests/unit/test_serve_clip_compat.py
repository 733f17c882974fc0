"""clip-retrieval compatibility of `zsl serve` at the HTTP level: bodies without (or with a wrong)
Content-Type, GET /indices-list, POST /metadata, captions, num_result_ids, deduplicate, CORS."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from pipeline.core.config import ServeConfig  # noqa: E402

BODY = {"text": "cat", "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
        "use_safety_model": True, "use_violence_detector": True, "indice_name": "animals", "use_mclip": False,
        "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 6, "num_result_ids": 6}


def _client(serve_world, **kw):
    from pipeline.stages.serve import create_app

    s, root, _, _ = serve_world
    cfg = ServeConfig(indexes={}, max_k=50, thumbnail_cache=str(root / "thumbs"), max_body_bytes=20_000, **kw)
    return TestClient(create_app(cfg, searchers={"animals": s}), base_url="http://localhost")


@pytest.fixture(scope="module")
def client(serve_world):
    return _client(serve_world)


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "application/json"])
def test_knn_service_reads_json_whatever_the_content_type(client, ctype):
    """ClipClient posts ``data=json.dumps(...)`` with no Content-Type (requests adds none for str)."""
    headers = {} if ctype is None else {"content-type": ctype}
    r = client.post("/knn-service", content=json.dumps(BODY).encode(), headers=headers)
    assert r.status_code == 200, r.text
    rows = r.json()
    assert isinstance(rows, list) and len(rows) == 6 and isinstance(rows[0]["id"], int)


@pytest.fixture(scope="module")
def two(serve_world, caption_world):
    from pipeline.stages.serve import create_app

    s, root, _, _ = serve_world
    cfg = ServeConfig(indexes={}, max_k=50, thumbnail_cache=str(root / "thumbs"), max_body_bytes=20_000,
                      allowed_hosts=["localhost", "zsl.example"])
    return TestClient(create_app(cfg, searchers={"animals": s, "captioned": caption_world[0]}),
                      base_url="http://localhost")


def _knn(client, **kw):
    r = client.post("/knn-service", content=json.dumps({**BODY, **kw}))
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("raw,why", [(b'{"text": "cat"', "not valid JSON"), (b"\xff\xfe{}", "not valid JSON"),
                                     (b'["cat"]', "JSON object"), (b"", "not valid JSON"), (b"[" * 5000, "")])
def test_bad_bodies_are_a_400_without_the_body(client, raw, why):
    r = client.post("/knn-service", content=raw)
    assert r.status_code == 400 and why in r.json()["detail"], r.text
    assert "cat" not in r.text and len(r.text) < 200


def test_indices_list_by_get_and_post(two):
    assert two.get("/indices-list").json() == ["animals", "captioned"]
    assert two.post("/indices-list", content=b"").json() == ["animals", "captioned"]


def test_rows_carry_caption_label_and_predicted_label_never_null(two, caption_world):
    plain = _knn(two, num_images=8, num_result_ids=8, deduplicate=False)
    assert all(isinstance(r["caption"], str) and r["caption"] == r["label"] for r in plain)
    assert {"id", "similarity", "url", "caption", "label", "predicted_label", "image_id"} <= set(plain[0])
    rows = _knn(two, indice_name="captioned", num_images=24, num_result_ids=24, deduplicate=False)
    assert len(rows) == 24 and all(isinstance(r["caption"], str) and r["caption"] for r in rows)
    by_id = {r["id"]: r for r in rows}
    for i in range(24):  # faiss id i is feature row i here (shards in order)
        want = f"a drawing of a {by_id[i]['label']}, number {i}" if i % 3 != 2 else by_id[i]["label"]
        assert by_id[i]["caption"] == want and by_id[i]["image_id"] == f"cap{i:02d}"
        assert by_id[i]["url"] == f"http://localhost/images/{i}?index=captioned"


def test_num_result_ids_and_deduplicate_as_clip_back(two):
    """clip_back searches num_result_ids, drops duplicates, returns them all: the first num_images
    with metadata, the rest id and similarity only."""
    rows = _knn(two, indice_name="captioned", num_images=3, num_result_ids=10, deduplicate=False)
    assert len(rows) == 10 and all("caption" in r for r in rows[:3]) and all(set(r) == {"id", "similarity"}
                                                                             for r in rows[3:])
    full = _knn(two, indice_name="captioned", num_images=24, num_result_ids=24, deduplicate=False)
    dedup = _knn(two, indice_name="captioned", num_images=24, num_result_ids=24, deduplicate=True)
    assert len(dedup) == 23 and len({0, 1} & {r["id"] for r in dedup}) == 1
    assert [r["id"] for r in dedup] == [r["id"] for r in full if r["id"] != max(
        (x for x in full if x["id"] in (0, 1)), key=lambda x: full.index(x))["id"]]
    assert len(_knn(two, deduplicate=True, num_images=6)) == 6  # near, not identical, vectors are kept


def test_deduplicate_without_stored_vectors_falls_back_to_the_uri():
    from pipeline.stages.serve.clip_retrieval import deduplicate

    class NoVectors:
        def reconstruct_batch(self, ids):
            raise RuntimeError("no direct map")

    hits = [{"faiss_id": i, "uri": u} for i, u in enumerate(["a", "b", "a", "c"])]
    assert [h["faiss_id"] for h in deduplicate(NoVectors(), hits)] == [0, 1, 3]


def test_metadata_endpoint(two):
    r = two.post("/metadata", content=json.dumps({"ids": [3, 0], "indice_name": "captioned"}))
    assert r.status_code == 200, r.text
    got = r.json()
    assert [g["id"] for g in got] == [3, 0]
    assert got[1]["metadata"]["caption"].endswith("number 0") and got[1]["metadata"]["image_id"] == "cap00"
    assert {"caption", "url", "label", "predicted_label", "image_id"} <= set(got[0]["metadata"])
    assert two.post("/metadata", content=json.dumps({"ids": [], "indice_name": "captioned"})).json() == []
    for bad in ({"ids": [999]}, {"ids": "1"}, {"ids": [1.5]}, {"ids": [-1]}):
        assert two.post("/metadata", content=json.dumps(bad)).status_code == 400
    assert two.post("/metadata", content=json.dumps({"ids": [1], "indice_name": "nope"})).status_code == 404


def test_urls_are_this_servers_thumbnails_never_local_paths(two, serve_world, caption_world):
    """A browser cannot load a local path (clip-retrieval's front hides a result whose image fails):
    ``url`` is the absolute url of the hit's thumbnail here, at the host the request came to."""
    root = serve_world[1]
    r = two.post("/knn-service", content=json.dumps({**BODY, "text": "dog", "num_images": 5, "num_result_ids": 5}),
                 headers={"host": "zsl.example:8123"})
    assert r.status_code == 200 and str(root) not in r.text and str(caption_world[1]) not in r.text
    rows = r.json()
    assert [x["url"] for x in rows] == [f"http://zsl.example:8123/images/{x['id']}?index=animals" for x in rows]
    shown = two.get(rows[0]["url"].replace("http://zsl.example:8123", ""))
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/jpeg"
    meta = two.post("/metadata", content=json.dumps({"ids": [7], "indice_name": "captioned"}))
    assert meta.json()[0]["metadata"]["url"] == "http://localhost/images/7?index=captioned"
    assert str(caption_world[1]) not in meta.text


def test_http_source_urls_are_kept(monkeypatch):
    from pipeline.stages.serve import feature_meta

    class Meta:
        def get(self, faiss_ids, image_ids):
            return [{"caption": None, "url": u} for u in
                    ("https://img.example/a.jpg", "/data/b.jpg", "file:///c.jpg", None, "HTTP://x/e.png")]

    monkeypatch.setattr(feature_meta, "feature_meta", lambda s: Meta())
    rows = [{"faiss_id": i, "image_id": str(i), "uri": f"/data/{i}.jpg", "label": "cat"} for i in range(5)]
    rows[3]["uri"] = "https://img.example/d.jpg"  # an http(s) uri is a source url too
    got = [d["url"] for d in feature_meta.describe(None, rows, lambda i: f"http://here/images/{i}")]
    assert got == ["https://img.example/a.jpg", "http://here/images/1", "http://here/images/2",
                   "https://img.example/d.jpg", "HTTP://x/e.png"]


def test_cors_headers_only_when_configured(client, serve_world):
    origin = {"origin": "http://front.example"}
    assert "access-control-allow-origin" not in client.get("/indices-list", headers=origin).headers
    cors = _client(serve_world, cors_origins=["http://front.example"])
    assert cors.get("/indices-list", headers=origin).headers["access-control-allow-origin"] == "http://front.example"
    pre = cors.options("/knn-service", headers={**origin, "access-control-request-method": "POST"})
    assert pre.status_code == 200 and "POST" in pre.headers["access-control-allow-methods"]
    assert "access-control-allow-origin" not in cors.get("/indices-list", headers={"origin": "http://evil"}).headers
