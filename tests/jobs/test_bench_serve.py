"""benchmarks.bench_serve: the load-test harness at a tiny scale (index build, `zsl serve` subprocess on
loopback, both query phases, cache hit rate from /metrics)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks import bench_serve, serve_mixed  # noqa: E402


def test_query_streams():
    pool = bench_serve.phrases(0)
    assert len(pool) == len(set(pool)) == 30 * 40 * 14
    unique = bench_serve.Queries(pool[:50], False, 0)
    assert [unique() for _ in range(50)] == pool[:50]  # each phrase once
    zipf = bench_serve.Queries(pool[:1000], True, 0)
    drawn = [zipf() for _ in range(5000)]
    top = drawn.count(pool[0]) / len(drawn)
    assert 0.09 < top < 0.2  # Zipf(1) over 1,000 ranks: the first has 1/H(1000) = 13 %
    assert set(drawn) <= set(pool[:1000])


def test_mixed_requests_and_their_outcomes(tmp_path):
    images = serve_mixed.write_images(tmp_path / "im", 3, seed=0, size=(64, 48))
    assert [p.read_bytes() for p in images] == [p.read_bytes() for p in serve_mixed.write_images(
        tmp_path / "again", 3, seed=0, size=(64, 48))]  # seeded
    texts = iter(f"text {i}" for i in range(10_000))
    mix = serve_mixed.Mix(texts=lambda: next(texts), images=images, labels=["a", "b"], rows=100)
    rng = np.random.default_rng(0)
    drawn = [mix.draw(rng) for _ in range(4000)]
    share = {k: sum(d[0] == k for d in drawn) / len(drawn) for k in serve_mixed.KINDS}
    assert all(abs(share[k] - w) < 0.03 for k, w in serve_mixed.KINDS.items()), share
    kind, method, path, body = next(d for d in drawn if d[0] == "knn_image")
    assert (method, path) == ("POST", "/knn-service") and json.loads(body)["image"]
    assert next(d for d in drawn if d[0] == "thumbnail")[1:3][0] == "GET"
    assert json.loads(next(d for d in drawn if d[0] == "filtered")[3])["labels"][0] in ("a", "b")
    hits = json.dumps({"hits": [{}] * 10}).encode()
    assert serve_mixed.outcome("text", 200, {}, hits) == "ok"
    assert serve_mixed.outcome("text", 200, {}, json.dumps({"hits": []}).encode()) == "0 hits"
    assert serve_mixed.outcome("filtered", 200, {}, json.dumps({"hits": [{}] * 3}).encode()) == "ok"
    assert serve_mixed.outcome("image", 503, {"retry-after": "1"}, b"") == "busy"
    assert serve_mixed.outcome("knn_image", 503, {}, b"") == "HTTP 503"  # no Retry-After: an error
    assert serve_mixed.outcome("text", 503, {"retry-after": "1"}, b"") == "HTTP 503"  # text is never refused
    assert serve_mixed.outcome("thumbnail", 200, {}, b"\xff\xd8...") == "ok"
    assert serve_mixed.outcome("thumbnail", 200, {}, b"<html>") == "not a JPEG"


def test_mixed_summary_and_goals():
    recs = [("text", "ok", 0.010 * (i + 1)) for i in range(100)] + [("image", "busy", 0.001)] * 5 + [
        ("image", "ok", 2.0), ("knn_image", "HTTP 500", 0.1), ("health", "ok", 0.004)]
    kinds = serve_mixed.summarize(recs)
    assert kinds["text"]["requests"] == 100 and kinds["text"]["p50_ms"] == pytest.approx(505, abs=1)
    assert kinds["image"] == {**kinds["image"], "requests": 6, "ok": 1, "busy_503": 5, "errors": 0}
    assert kinds["knn_image"]["errors"] == 1 and kinds["knn_image"]["error_reasons"] == {"HTTP 500": 1}
    assert kinds["thumbnail"]["requests"] == 0 and kinds["thumbnail"]["p99_ms"] is None
    g = serve_mixed.goals(kinds)
    assert g["errors"] == 1 and g["met"] == {"errors": False, "text_p99": False, "health_p99": True}
    fast = serve_mixed.summarize([("text", "ok", 0.05), ("image", "ok", 1.0), ("health", "ok", 0.01)])
    assert serve_mixed.goals(fast)["all_met"]
    assert not serve_mixed.goals(serve_mixed.summarize([("text", "ok", 0.05), ("health", "ok", 0.01)]))["all_met"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_serve_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "serve.json"
    with pytest.raises(SystemExit) as done:
        bench_serve.app(["--rows", "3000", "--clients", "2", "--seconds", "2", "--pool", "200",
                         "--server", "text_backend=onnx,text_workers=1", "--output", str(out), "--images", "4",
                         "--mixed-clients", "6", "--mixed-seconds", "3", "--mixed-repeats", "1"])
    assert done.value.code == 0
    r = json.loads(out.read_text())
    assert r["servers"]["text_backend=onnx,text_workers=1"]["text_backend"] == "onnx"
    phases = r["servers"]["text_backend=onnx,text_workers=1"]["phases"]
    assert set(phases) == {"zipf", "unique"}
    assert phases["unique"]["cache_hit_rate"] == 0.0 and phases["zipf"]["cache_hit_rate"] > 0.3
    for p in phases.values():
        assert p["errors"] == 0 and p["requests"] > 0 and p["p99_ms"] >= p["p50_ms"] > 0
    mixed = r["mixed"]["runs"][0]["kinds"]
    assert sum(k["errors"] for k in mixed.values()) == 0, mixed
    assert mixed["thumbnail"]["ok"] > 0 and mixed["text"]["ok"] > 0 and mixed["health"]["ok"] > 0
    assert mixed["image"]["ok"] + mixed["knn_image"]["ok"] > 0  # the real encoder answered image queries
    assert r["mixed"]["median"]["kinds"]["text"]["p99_ms"] >= r["mixed"]["median"]["kinds"]["text"]["p50_ms"]
