"""benchmarks.bench_decode_memory: the harness at a tiny scale (tar writing, both modes, same pixels)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks import bench_decode_memory  # noqa: E402


def test_bench_decode_tiny(tmp_path):
    out = tmp_path / "decode.json"
    with pytest.raises(SystemExit) as done:
        bench_decode_memory.app(["--images", "300", "--image-size", "32", "--repeats", "1", "--output", str(out)])
    assert done.value.code == 0
    r = json.loads(out.read_text())
    whole, streamed = r["median"]["whole"], r["median"]["streamed"]
    assert whole["rows"] == streamed["rows"] == 300 and whole["errors"] == streamed["errors"] == 0
    assert whole["blocks"] == 1 and streamed["blocks"] == 2  # 256 + 44 rows
    assert streamed["peak_rss_mb"] >= streamed["rss_before_mb"] > 0 and r["peak_rss_ratio_whole_over_streamed"] > 0
