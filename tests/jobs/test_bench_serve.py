"""benchmarks.bench_serve: the load-test harness at a tiny scale (index build, `zsl serve` subprocess on
loopback, both query phases, cache hit rate from /metrics)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks import bench_serve  # noqa: E402


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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_serve_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "serve.json"
    with pytest.raises(SystemExit) as done:
        bench_serve.app(["--rows", "3000", "--clients", "2", "--seconds", "2", "--pool", "200",
                         "--server", "text_backend=onnx,text_workers=1", "--output", str(out)])
    assert done.value.code == 0
    r = json.loads(out.read_text())
    assert r["servers"]["text_backend=onnx,text_workers=1"]["text_backend"] == "onnx"
    phases = r["servers"]["text_backend=onnx,text_workers=1"]["phases"]
    assert set(phases) == {"zipf", "unique"}
    assert phases["unique"]["cache_hit_rate"] == 0.0 and phases["zipf"]["cache_hit_rate"] > 0.3
    for p in phases.values():
        assert p["errors"] == 0 and p["requests"] > 0 and p["p99_ms"] >= p["p50_ms"] > 0
