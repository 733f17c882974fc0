"""Hostile requests to `zsl serve` (issue 17), each sent as the exact bytes a client could send
(``content=`` with explicit headers: ``json=`` can send neither NaN nor a lone surrogate escape):
huge lists, NaN/inf numbers, texts the encoder cannot take, and docs that would load a CDN."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from pipeline.core.config import ServeConfig  # noqa: E402

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(serve_world):
    """An app with the default body limit (4 MB), so that a 600 KB body reaches validation."""
    from pipeline.stages.serve import create_app

    s, root, _, _ = serve_world
    return TestClient(create_app(ServeConfig(indexes={}, thumbnail_cache=str(root / "thumbs-hostile")),
                                 searchers={"animals": s}), base_url="http://localhost")


def _post(client, body: bytes | str, path: str = "/search"):
    data = body.encode() if isinstance(body, str) else body
    return client.post(path, content=data, headers={**JSON, "content-length": str(len(data))})


def test_a_huge_labels_list_is_refused_fast_with_a_small_reply(client):
    body = b'{"text": "cat", "labels": [' + b",".join([b'"a"'] * 300_000) + b"]}"
    assert 500_000 < len(body) < 4 << 20
    t0 = time.perf_counter()
    r = _post(client, body)
    took = time.perf_counter() - t0
    assert r.status_code in (400, 413, 422), r.text[:300]
    assert len(r.content) < 2000 and "labels" in r.text, r.text[:300]
    assert took < 0.5, f"{took:.2f} s"


@pytest.mark.parametrize("body, field", [
    ('{"text": "cat", "labels": ["' + "x" * 201 + '"]}', "labels"),
    ('{"text": "' + "x" * 5000 + '"}', "text"),
    ('{"embedding": [' + ",".join(["0.5"] * 5000) + "]}", "embedding"),
    ('{"text": "cat", "index": "' + "i" * 1000 + '"}', "index"),
])
def test_long_fields_are_refused_without_echoing_them(client, body, field):
    r = _post(client, body)
    assert r.status_code in (400, 422) and field in r.text, r.text[:300]
    assert len(r.content) < 1000 and "xxxxxxxxxx" not in r.text and "iiiiiiiiii" not in r.text, r.text[:300]


def test_validation_errors_name_the_field_and_never_echo_the_input(client):
    r = _post(client, '{"text": "cat", "k": "secret-value", "colour": "red"}')
    assert r.status_code == 422, r.text
    assert "secret-value" not in r.text and "red" not in r.text.replace("colour", "")
    assert "k" in str(r.json()["detail"]) and "colour" in str(r.json()["detail"])


@pytest.mark.parametrize("field, value", [
    ("k", "NaN"), ("k", "Infinity"), ("caption_weight", "NaN"), ("caption_weight", "-Infinity"),
    ("min_score", "NaN"), ("min_score", "Infinity"), ("offset", "NaN"), ("k", "1e400"),
])
def test_nan_and_inf_numbers_are_4xx(client, field, value):
    r = _post(client, f'{{"text": "cat", "{field}": {value}}}')
    assert r.status_code in (400, 422), r.text
    assert field in r.text


def test_nan_in_an_embedding_is_4xx(client):
    r = _post(client, '{"embedding": [NaN, 0, 0, 0, 0, 0, 0, 0]}')
    assert r.status_code in (400, 422), r.text
    r = _post(client, '{"embedding_input": [Infinity, 0, 0, 0, 0, 0, 0, 0]}', path="/knn-service")
    assert r.status_code in (400, 422), r.text


@pytest.mark.parametrize("path, key", [("/search", "text"), ("/knn-service", "text")])
def test_a_lone_surrogate_text_is_a_400_of_its_own(client, path, key):
    """/search's model refuses it while parsing (422 naming ``text``); /knn-service reads its body
    itself and query_vectors refuses it (400) before it reaches an encoder batch."""
    r = _post(client, f'{{"{key}": "\\ud800 x"}}', path=path)
    assert r.status_code in (400, 422) and "text" in r.json()["detail"], r.text
    if path == "/knn-service":
        assert r.status_code == 400 and "UTF-8" in r.json()["detail"], r.text
    assert _post(client, '{"text": "cat", "k": 1}').json()["hits"][0]["label"] == "cat"


class _FakeSearcher:
    """``text_query_pairs`` of a text is its length; a batch holding ``"bad"`` raises."""

    class encoder:  # noqa: N801 - the batcher's warm-up calls searcher.encoder.encode
        @staticmethod
        def encode(texts):
            return np.zeros((len(texts), 2), np.float32)

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def text_query_pairs(self, texts):
        self.calls.append(list(texts))
        if "bad" in texts:
            raise ValueError("cannot encode 'bad'")
        return [(np.full(2, len(t), np.float32), None) for t in texts]


def test_query_vectors_refuses_a_lone_surrogate_before_the_batcher():
    from fastapi import HTTPException

    from pipeline.stages.serve.queries import check_utf8

    check_utf8("zebra \u00e9\U0001f993")
    with pytest.raises(HTTPException) as e:
        check_utf8("\ud800 x")
    assert e.value.status_code == 400 and "UTF-8" in e.value.detail


def test_one_bad_text_fails_only_its_own_request_in_a_batch():
    from pipeline.stages.serve.batching import TextBatcher

    fake = _FakeSearcher()
    b = TextBatcher(fake, max_batch=8, wait_ms=200, workers=1)
    texts = ["a", "bb", "bad", "cccc", "ddddd"]
    out: dict[str, object] = {}

    def ask(t):
        try:
            out[t] = float(b.encode(t)[0][0, 0])
        except ValueError as exc:
            out[t] = exc

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert any(len(c) > 1 and "bad" in c for c in fake.calls), fake.calls  # they were batched together
    assert isinstance(out["bad"], ValueError)
    assert {t: v for t, v in out.items() if t != "bad"} == {t: float(len(t)) for t in texts if t != "bad"}


def test_no_reply_references_an_external_asset_host(client):
    """FastAPI's /docs and /redoc load Swagger UI / ReDoc from a CDN: /docs is served from a local
    package instead (its assets under /docs-assets), /redoc is off."""
    for path in ("/", "/docs", "/redoc", "/docs/oauth2-redirect", "/openapi.json"):
        r = client.get(path)
        hosts = [u for u in re.findall(r"""(?:src|href)\s*=\s*["']?(https?://[^"' >]+)""", r.text)]
        assert not hosts, (path, hosts)
        assert "cdn.jsdelivr" not in r.text and "unpkg.com" not in r.text and "fonts.googleapis" not in r.text, path
    assert client.get("/openapi.json").status_code == 200
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    for asset in re.findall(r"""(?:src|href)\s*=\s*["'](/docs-assets/[^"']+)""", page.text):
        assert client.get(asset).status_code == 200, asset
    assert client.get("/redoc").status_code == 404


def test_an_unhandled_error_is_a_json_500_counted_in_the_metrics(client, monkeypatch):
    """The middleware turns an exception no handler took into a JSON 500 naming its type (never the
    message, which may hold a path) and counts it."""
    from pipeline.stages.serve import routes

    def broken(*a, **kw):
        raise RuntimeError("boom in /very/private/dir")

    monkeypatch.setattr(routes, "query_vectors", broken)
    r = client.post("/search", json={"text": "cat"})
    assert r.status_code == 500 and r.json() == {"detail": "internal error: RuntimeError"}
    assert "private" not in r.text
    assert 'zsl_errors_total{path="/search",status="500"}' in client.get("/metrics").text
