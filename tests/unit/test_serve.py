"""`zsl serve`: the FastAPI app over a small index (TestClient, no network): API, clip-retrieval
compatibility, thumbnails, metrics, the page, bad input as 4xx JSON; a moved index still answers."""

from __future__ import annotations

import base64
import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from pipeline.core.config import ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def served(serve_world):
    from pipeline.stages.serve import create_app

    s, root, y, names = serve_world
    cfg = ServeConfig(indexes={}, max_k=50, thumbnail_cache=str(root / "thumbs"), max_body_bytes=20_000)
    return TestClient(create_app(cfg, searchers={"animals": s}), base_url="http://localhost"), s, y, names


def test_search_by_text_finds_the_class(served):
    client, _, y, names = served
    r = client.post("/search", json={"text": "zebra", "k": 10})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 10 and [h["rank"] for h in hits] == list(range(1, 11))
    assert sum(h["label"] == "zebra" for h in hits) >= 8
    assert hits[0]["score"] >= hits[-1]["score"] and {"faiss_id", "image_id", "uri"} <= set(hits[0])


def test_filters_offset_and_embedding(served):
    client, s, _, _ = served
    only = client.post("/search", json={"text": "zebra", "k": 5, "labels": ["cat"]}).json()["hits"]
    assert only and all(h["label"] == "cat" for h in only)
    first = client.post("/search", json={"text": "dog", "k": 10}).json()["hits"]
    page2 = client.post("/search", json={"text": "dog", "k": 5, "offset": 5}).json()["hits"]
    assert [h["image_id"] for h in page2] == [h["image_id"] for h in first[5:]] and page2[0]["rank"] == 6
    q = s.text_queries(["okapi"])[0].tolist()
    by_vec = client.post("/search", json={"embedding": q, "k": 3}).json()["hits"]
    assert [h["image_id"] for h in by_vec] == [h["image_id"] for h in
                                                client.post("/search", json={"text": "okapi", "k": 3}).json()["hits"]]
    high = client.post("/search", json={"text": "dog", "k": 50, "min_score": first[2]["score"]}).json()["hits"]
    assert len(high) == 3


def test_clip_retrieval_client_requests(served):
    """The JSON clip-retrieval's ClipClient sends (text / embedding_input, modality, num_images, indice_name,
    and its filters, which we ignore) and the shape it reads back."""
    client, s, _, _ = served
    assert client.post("/indices-list").json() == ["animals"]
    body = {"text": "cat", "image": None, "image_url": None, "embedding_input": None,
            "deduplicate": True, "use_safety_model": False, "use_violence_detector": False,
            "indice_name": "animals", "use_mclip": False, "aesthetic_score": 9, "aesthetic_weight": 0.5,
            "modality": "image", "num_images": 6, "num_result_ids": 6}
    r = client.post("/knn-service", json=body)
    assert r.status_code == 200, r.text
    rows = r.json()
    assert len(rows) == 6 and set(rows[0]) >= {"id", "similarity", "url", "caption"}
    assert sum(row["caption"] == "cat" for row in rows) >= 5 and isinstance(rows[0]["id"], int)
    emb = {**body, "text": None, "embedding_input": s.text_queries(["cat"])[0].tolist()}
    assert [x["id"] for x in client.post("/knn-service", json=emb).json()] == [x["id"] for x in rows]


def test_thumbnails_are_made_once_and_only_from_the_index(served, tmp_path):
    client, s, _, _ = served
    r = client.get("/images/7?size=32")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    from PIL import Image
    import io

    assert max(Image.open(io.BytesIO(r.content)).size) <= 32
    cached = list((tmp_path.parent.parent).glob("**/thumbs/*/7-32.jpg"))
    assert client.get("/images/7?size=32").content == r.content
    for bad in ("/images/120", "/images/-1", "/images/..%2F..%2Fetc%2Fpasswd", "/images/5"):
        resp = client.get(bad)
        assert resp.status_code in (404, 422), (bad, resp.status_code)
        assert "detail" in resp.json()
    assert client.get("/images/3?index=nope").status_code == 404
    del cached


@pytest.mark.parametrize("body, status, reason", [
    ({"text": ""}, 400, "empty text"),
    ({"text": "x" * 1001}, 400, "at most 1000"),
    ({"text": "cat", "k": 51}, 400, "above the maximum"),
    ({"text": "cat", "k": 0}, 422, "greater than 0"),
    ({"embedding": [0.1] * 5}, 400, "holds 8-d"),
    ({"embedding": [float("nan")] * 8}, 422, ""),
    ({"text": "cat", "index": "nope"}, 404, "unknown index"),
    ({"text": "cat", "embedding": [0.0] * 8}, 400, "exactly one"),
    ({"text": "cat", "colour": "red"}, 422, "colour"),
    ({}, 400, "exactly one"),
])
def test_bad_requests_get_4xx_with_a_reason(served, body, status, reason):
    client = served[0]
    r = client.post("/search", json=body) if "nan" not in str(body) else client.post(
        "/search", content='{"embedding": [NaN, NaN, NaN, NaN, NaN, NaN, NaN, NaN]}',
        headers={"content-type": "application/json"})
    assert r.status_code in (status, 400, 422) if not reason else r.status_code == status, r.text
    assert reason in str(r.json()["detail"])


def test_oversized_body_and_non_json(served):
    client = served[0]
    r = client.post("/search", content=b"{" + b" " * 30_000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and "at most 20000" in r.json()["detail"]
    r = client.post("/search", content=b"\x89PNG not json", headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and r.json()["detail"]
    assert client.post("/knn-service", json={"image": base64.b64encode(b"x").decode()}).status_code == 400


def test_health_indices_metrics_page(served):
    client = served[0]
    assert client.get("/health").json() == {"status": "ok", "indices": ["animals"]}
    ix = client.get("/indices").json()[0]
    assert ix["name"] == "animals" and ix["ntotal"] == 120 and ix["dim"] == 8
    client.post("/search", json={"text": ""})
    assert client.post("/search", json={"text": "zebra", "k": 3}).status_code == 200
    m = client.get("/metrics").text
    assert 'zsl_requests_total{path="/search",status="200"}' in m
    assert 'zsl_errors_total{path="/search",status="400"}' in m and "zsl_request_seconds_bucket" in m
    page = client.get("/")
    assert page.status_code == 200 and 'id="gallery"' in page.text and "http://" not in page.text.replace(
        'http://www.w3.org', '')  # no external CDN or font
    assert client.get("/redoc").status_code == 404  # off: ReDoc would load from a CDN (/docs is local)


def test_each_app_has_its_own_metrics_in_the_prometheus_text_format(served, tmp_path):
    """Two apps in one process: each /metrics counts only its own requests (a registry per app),
    served as the Prometheus text format a scraper parses."""
    from prometheus_client.parser import text_string_to_metric_families

    from pipeline.stages.serve import create_app

    _, s, _, _ = served
    apps = [TestClient(create_app(ServeConfig(indexes={}, thumbnail_cache=str(tmp_path)), searchers={"animals": s}),
                       base_url="http://localhost")
            for _ in range(2)]
    for _ in range(3):
        apps[0].get("/health")
    apps[1].get("/indices")
    r = apps[0].get("/metrics")
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    counts = {(x.labels["path"], x.labels["status"]): x.value for f in text_string_to_metric_families(r.text)
              if f.name == "zsl_requests" for x in f.samples if x.name == "zsl_requests_total"}
    assert counts == {("/health", "200"): 3.0}
    other = apps[1].get("/metrics").text
    assert 'zsl_requests_total{path="/indices",status="200"} 1.0' in other and 'path="/health"' not in other


def test_openapi_schema_is_served(served):
    """/openapi.json (for clients and generators; /docs is off): every route's types resolve."""
    schema = served[0].get("/openapi.json")
    assert schema.status_code == 200, schema.text
    assert {"/search", "/images/{faiss_id}", "/metrics", "/knn-service", "/indices-list"} <= set(schema.json()["paths"])


def _counting_client(s, tmp_path, monkeypatch, **cfg):
    """A client of an app over ``s`` whose encoder calls are recorded (the list of each call's texts)."""
    from pipeline.stages.serve import create_app

    calls: list[list[str]] = []
    real = s.text_queries
    monkeypatch.setattr(s, "text_queries", lambda texts: (calls.append(list(texts)), real(texts))[1])
    return TestClient(create_app(ServeConfig(indexes={}, thumbnail_cache=str(tmp_path), **cfg),
                                 searchers={"animals": s}), base_url="http://localhost"), calls


def test_concurrent_text_queries_are_batched_and_each_gets_its_own_answer(served, monkeypatch, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    _, s, _, names = served
    client, calls = _counting_client(s, tmp_path, monkeypatch, query_cache=0)
    asks = [names[i % 4] for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        tops = list(pool.map(lambda t: client.post("/search", json={"text": t, "k": 1}).json()["hits"][0]["label"],
                             asks))
    sizes = [len(c) for c in calls]
    assert tops == asks and sum(sizes) == 64 and max(sizes) > 1  # several texts per encoder call


def test_query_cache_encodes_each_text_once_and_evicts_the_oldest(served, monkeypatch, tmp_path):
    _, s, _, names = served
    client, calls = _counting_client(s, tmp_path, monkeypatch, query_cache=2)
    first = client.post("/search", json={"text": "zebra", "k": 5}).json()["hits"]
    again = client.post("/search", json={"text": " zebra ", "k": 5}).json()["hits"]
    encoded = lambda: [t for c in calls for t in c]  # noqa: E731 - texts in encoder-call order
    assert first == again and encoded() == ["zebra"]  # the second came from the cache
    client.post("/search", json={"text": "cat", "k": 5})
    client.post("/search", json={"text": "dog", "k": 5})  # evicts zebra (cache of 2)
    client.post("/search", json={"text": "zebra", "k": 5})
    assert encoded() == ["zebra", "cat", "dog", "zebra"]
    m = client.get("/metrics").text
    assert 'zsl_query_cache_hits_total{index="animals"} 1' in m and 'zsl_query_cache_misses_total{index="animals"} 4' in m


def test_malformed_fields_are_4xx_never_500(served):
    client = served[0]
    for path, body, status in [
        ("/search", {"image": "data:image/png;base64"}, 400),  # a data: URL with no data
        ("/knn-service", {"image": "data:abc"}, 400),
        ("/knn-service", {"text": "cat", "indice_name": [1]}, 400),
        ("/knn-service", {"text": ["cat"]}, 400),
        ("/search", {"embedding": {"a": 1}}, 422),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == status and r.json()["detail"], (path, body, r.status_code, r.text)
    r = client.post("/knn-service", content=b'{"text": "cat", "num_images": 1e400}',  # Python reads inf
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "num_images" in r.json()["detail"]
    chunked = client.post("/search", content=iter([b'{"text": "cat"}']), headers={"content-type": "application/json"})
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["detail"]
