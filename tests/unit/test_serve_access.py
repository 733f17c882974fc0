"""`zsl serve` hardened (issue 17, part 3): the optional API key, the Host allow-list, uvicorn's
limits (what reaches uvicorn, and a real server refusing a 100 KB request head) and no absolute
path in a reply unless ``debug_paths``."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from pipeline.core.config import ServeConfig, build_config  # noqa: E402


def _app(serve_world, **cfg):
    from pipeline.stages.serve import create_app

    s, root, _, _ = serve_world
    return create_app(ServeConfig(indexes={}, thumbnail_cache=str(root / "thumbs-access"), **cfg),
                      searchers={"animals": s})


def test_api_key_from_a_file_guards_all_but_the_page_and_health(serve_world, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    client = TestClient(_app(serve_world, api_key_file=str(key_file)), base_url="http://localhost")
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    for r in (client.get("/indices"), client.get("/metrics"), client.post("/search", json={"text": "cat"}),
              client.get("/images/0"), client.get("/indices-list"),
              client.post("/search", json={"text": "cat"}, headers={"X-API-Key": "wrong"}),
              client.get("/indices", headers={"Authorization": "Bearer s3cret-keyX"})):
        assert r.status_code == 401, (r.request.url, r.text)
        assert "key" in r.json()["detail"] and "s3cret" not in r.text
    assert client.get("/indices", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
    assert client.post("/search", json={"text": "cat"}, headers={"X-API-Key": "s3cret-key"}).status_code == 200


def test_api_key_from_the_environment_and_none_by_default(serve_world, monkeypatch):
    assert TestClient(_app(serve_world), base_url="http://localhost").get("/indices").status_code == 200
    monkeypatch.setenv("ZSL_API_KEY", "from-env")
    client = TestClient(_app(serve_world), base_url="http://localhost")
    assert client.get("/indices").status_code == 401
    assert client.get("/indices", headers={"x-api-key": "from-env"}).status_code == 200


def test_the_page_sends_the_key_of_its_url_fragment(serve_world):
    page = TestClient(_app(serve_world), base_url="http://localhost").get("/").text
    assert "location.hash" in page and "X-API-Key" in page


def test_host_allow_list_refuses_other_hosts(serve_world):
    from pipeline.stages.serve.security import allowed_hosts

    cfg = ServeConfig(indexes={}, host="10.1.2.3")
    assert allowed_hosts(cfg) == ["127.0.0.1", "localhost", "[::1]", "10.1.2.3"]
    assert allowed_hosts(ServeConfig(indexes={}, host="0.0.0.0")) == ["127.0.0.1", "localhost", "[::1]"]
    client = TestClient(_app(serve_world))  # the check is create_app's own
    assert client.get("/health", headers={"host": "evil.example:8000"}).status_code == 400
    assert client.get("/health").status_code == 400  # TestClient's 'testserver'
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host
    anyone = TestClient(_app(serve_world, allowed_hosts=["*"]))
    assert anyone.get("/health", headers={"host": "evil.example"}).status_code == 200


def test_ray_serve_replicas_check_the_host_too(serve_world, tmp_path, monkeypatch):
    """The app each Ray Serve replica builds (``build_app_from_env``, config from ZSL_SERVE_CONFIG)
    refuses a foreign Host as uvicorn's does: Ray's proxy passes the client's Host header on."""
    from pipeline.stages.serve.runner import CONFIG_ENV, build_app_from_env

    cfg = ServeConfig(indexes={"animals": str(serve_world[1] / "moved")}, host="0.0.0.0", preload_text=False,
                      text_workers=1, thumbnail_cache=str(tmp_path / "thumbs"),
                      allowed_hosts=["zsl.internal", "localhost"])
    monkeypatch.setenv(CONFIG_ENV, json.dumps(cfg.model_dump(mode="json")))
    monkeypatch.setattr("gc.freeze", lambda: None)  # a server process's setting, not the test process's
    client = TestClient(build_app_from_env())
    for host in ("evil.example", "evil.example:8000", "127.0.0.1"):
        r = client.get("/health", headers={"host": host})
        assert r.status_code == 400 and "animals" not in r.text, (host, r.text)
    assert client.post("/search", json={"embedding": [0.5, 0.5], "k": 1}, headers={"host": "evil.example"}
                       ).status_code == 400
    for host in ("zsl.internal:8000", "localhost"):
        assert client.get("/health", headers={"host": host}).json() == {"status": "ok", "indices": ["animals"]}


def test_uvicorn_gets_the_limits(monkeypatch):
    import uvicorn

    from pipeline.stages.serve import runner

    seen = {}
    monkeypatch.setattr(runner, "create_app", lambda cfg: "app")
    monkeypatch.setattr(runner, "follow_sighup", lambda app: seen.update(sighup=app))
    monkeypatch.setattr(runner, "frozen", lambda app: app)  # gc.freeze() is for the server process
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    cfg = build_config("serve", {"indexes": {"a": "/x"}, "text_workers": 1, "limit_concurrency": 7})
    runner.run_serve(cfg)
    assert seen["app"] == "app" and seen["sighup"] == "app"
    assert {k: seen[k] for k in ("limit_concurrency", "timeout_keep_alive", "h11_max_incomplete_event_size",
                                 "timeout_graceful_shutdown", "backlog", "http")} == {
        "limit_concurrency": 7, "timeout_keep_alive": 5, "h11_max_incomplete_event_size": 65536,
        "timeout_graceful_shutdown": 10, "backlog": 2048, "http": "h11"}


def test_a_real_server_refuses_a_huge_request_head_and_keeps_answering(serve_world, free_port, live_server):
    from pipeline.stages.serve.runner import uvicorn_options

    cfg = ServeConfig(indexes={}, port=free_port(), thumbnail_cache=str(serve_world[1] / "thumbs-access"))
    options = {k: v for k, v in uvicorn_options(cfg).items() if k != "port"}
    with live_server(_app(serve_world), cfg.port, **options) as url:
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        assert _status(cfg.port, [head]) == b"431"  # a whole head too big: the app's check
        assert _status(cfg.port, [head[:70_000], head[70_000:]]) in (b"400", b"")  # still arriving: h11's cap
        assert urllib.request.urlopen(url + "/health", timeout=5).status == 200


def _status(port: int, parts: list[bytes]) -> bytes:
    """The status code of the reply to a request sent in ``parts`` (b'': the server closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        try:
            for p in parts:
                c.sendall(p)
                time.sleep(0.2)
            reply = c.recv(200)
        except ConnectionError:
            return b""
    return reply.split(b" ")[1] if reply else b""


def test_replies_show_no_absolute_path(serve_world, tmp_path, monkeypatch):
    s, root, _, _ = serve_world
    from pipeline.index.filters import LabelSets

    no_sets = LabelSets(None, flags=[])  # what zsl serve prepares at load for predicted labels
    monkeypatch.setattr(s, "labels", SimpleNamespace(labels_dir=str(tmp_path / "labelled"), label_sets=no_sets))
    client = TestClient(_app(serve_world), base_url="http://localhost")
    replies = [client.get("/indices"), client.get("/health"), client.get("/images/99999"),
               client.post("/search", json={"embedding": [0.5, 0.5], "k": 3})]
    assert [r.status_code for r in replies] == [200, 200, 404, 400], [r.text for r in replies]
    for r in replies:
        assert str(root) not in r.text and str(tmp_path) not in r.text, r.text
    assert replies[0].json()[0]["labels"] == "labelled"
    debug = TestClient(_app(serve_world, debug_paths=True), base_url="http://localhost")
    assert debug.get("/indices").json()[0]["labels"] == str(tmp_path / "labelled")
    assert str(root) in debug.post("/search", json={"embedding": [0.5, 0.5], "k": 3}).text


def test_image_queries_have_their_own_bounded_pool(serve_world, monkeypatch):
    from pipeline.stages.serve import routes

    real, started, release = routes.query_vectors, threading.Event(), threading.Event()

    def slow_images(state, name, *, image=None, **kw):
        if image is None:
            return real(state, name, **kw)
        started.set()
        release.wait(10)
        return real(state, name, text="cat")

    monkeypatch.setattr(routes, "query_vectors", slow_images)
    client = TestClient(_app(serve_world, image_workers=1, image_queue=0), base_url="http://localhost")
    first: list = []
    t = threading.Thread(target=lambda: first.append(client.post("/search", json={"image": "aGk=", "k": 3})))
    t.start()
    try:
        assert started.wait(10)
        busy = client.post("/search", json={"image": "aGk=", "k": 3})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
        t0 = time.monotonic()
        assert client.post("/search", json={"text": "cat", "k": 3}).status_code == 200
        assert client.get("/health").status_code == 200 and time.monotonic() - t0 < 5
    finally:
        release.set()
        t.join(timeout=15)
    assert first[0].status_code == 200, first[0].text


def test_knn_service_image_queries_share_the_bounded_image_pool(serve_world, monkeypatch):
    """clip-retrieval's /knn-service image queries wait in the same bounded pool as /search's: while
    one holds the only slot, another image query on either endpoint is a 503 with Retry-After, and
    text queries (both endpoints) and /health answer meanwhile."""
    from pipeline.stages.serve import clip_retrieval, routes

    real, started, release, calls = routes.query_vectors, threading.Event(), threading.Event(), []

    def slow_first_image(state, name, *, image=None, **kw):
        if image is None:
            return real(state, name, **kw)
        calls.append(image)
        if len(calls) == 1:  # the first image query holds its pool thread until released
            started.set()
            release.wait(10)
        return real(state, name, text="cat")

    monkeypatch.setattr(routes, "query_vectors", slow_first_image)
    monkeypatch.setattr(clip_retrieval, "query_vectors", slow_first_image)
    client = TestClient(_app(serve_world, image_workers=1, image_queue=0), base_url="http://localhost")
    knn = lambda **q: client.post("/knn-service", content=json.dumps({"num_images": 3, **q}))  # noqa: E731
    first: list = []
    t = threading.Thread(target=lambda: first.append(knn(image="aGk=")))
    t.start()
    try:
        assert started.wait(10)
        for busy in (knn(image="aGk="), client.post("/search", json={"image": "aGk=", "k": 3})):
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
        t0 = time.monotonic()
        assert knn(text="cat").status_code == 200 and client.post("/search", json={"text": "cat"}).status_code == 200
        assert client.get("/health").status_code == 200 and time.monotonic() - t0 < 5
        assert len(calls) == 1  # the refused ones never reached the encoder
    finally:
        release.set()
        t.join(timeout=15)
    assert first[0].status_code == 200 and len(first[0].json()) == 3, first[0].text


def test_image_work_runs_at_a_lower_cpu_priority():
    """Image queries and thumbnails run `nice` steps below the calling thread (Linux: per thread), so
    that on busy cores text queries and /health go first; nice=0 keeps the priority."""
    import asyncio
    import os

    from pipeline.stages.serve.image_pool import ImagePool

    if not hasattr(os, "getpriority"):
        pytest.skip("no thread priorities on this OS")
    mine = lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # noqa: E731
    base = mine()
    if base + 3 > 19:
        pytest.skip("this process already runs at the lowest priority")

    async def seen(pool):
        return await pool.run(mine), await pool.thumbnail(mine)

    assert asyncio.run(seen(ImagePool(1, 0, thumbnail_workers=1, nice=3))) == (base + 3, base + 3)
    assert asyncio.run(seen(ImagePool(1, 0, thumbnail_workers=1, nice=0))) == (base, base)
    assert mine() == base  # the caller's own priority is untouched
