"""The relabel benchmark (benchmarks.bench_relabel) at a tiny scale: it runs end to end, checks its
own results (relabelled labels == fresh ones, the diff == the rows whose top-1 changed) and writes
every field the committed 1M-row results carry."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks import bench_relabel  # noqa: E402


def test_bench_relabel_tiny_writes_its_results(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "relabel.json"
    assert bench_relabel.main(["--rows", "20000", "--shards", "4", "--repeats", "1", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["rows"], r["shards"], r["dim"], r["repeats"]) == (20000, 4, 384, 1)
    assert (r["classes_before"], r["classes_after"]) == (200, 250)
    for kind in ("fresh", "relabel"):
        assert r[kind]["seconds"] > 0 and r[kind]["wall_s"] >= r[kind]["seconds"] and r[kind]["peak_rss_mb"] > 50
        assert len(r["runs"][kind]) == 1
    assert r["ratio"] == round(r["relabel"]["seconds"] / r["fresh"]["seconds"], 3) and r["goal_ratio"] == 1.2
    assert isinstance(r["meets_goal"], bool) and r["wall_ratio"] > 0
    d = r["diff"]
    assert d["rows_compared"] == 20000 and d["shards"] == 4 and 0 < d["moved"] < 20000
    assert d["moved_share"] == round(d["moved"] / 20000, 4) and d["bytes"] > 0 and d["pairs"] > 0
    assert d["checked"].startswith("relabelled == fresh labels")
    assert not list(tmp_path.glob("zsl-bench-relabel-*"))  # the work directory is removed
