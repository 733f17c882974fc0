"""benchmarks.bench_filters: the harness at a tiny scale (both label geometries, every bucket that has
labels, exact filtered truth, the old post-filter beside)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks import bench_filters  # noqa: E402


def test_bench_filters_tiny(tmp_path, monkeypatch):
    out = tmp_path / "filters.json"
    monkeypatch.setattr(sys, "argv", ["bench_filters", "--rows", "60000", "--dim", "16", "--labels", "1000",
                                      "--queries", "4", "--repeats", "2", "--output", str(out)])
    bench_filters.main()
    r = json.loads(out.read_text())
    assert r["factory"] == "HNSW32,Flat" and set(r["geometries"]) == {"clustered", "independent"}
    for geo in r["geometries"].values():
        assert geo["sets_copied"] >= 1 and geo["copies_mb"] > 0 and geo["unfiltered_latency_ms_p99"] > 0
        assert set(geo["buckets"]) == {">=5%", "0.5-5%", "0.05-0.5%", "0.01-0.05%", "<0.01%"}
        for b in geo["buckets"].values():
            assert b["new_recall_at_10"] == 1.0 and b["new_underfilled"] == 0 and b["queries"] == 4
            assert b["new_latency_ms_p99"] > 0 and b["new_p99_over_unfiltered_p99"] > 0
    assert np.mean([b["old_recall_at_10"] for b in r["geometries"]["clustered"]["buckets"].values()]) < 0.5
    assert r["peak_rss_mb"] > 0
