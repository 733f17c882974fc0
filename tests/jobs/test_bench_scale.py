"""benchmarks.bench_scale: the whole harness at a tiny scale (subprocess `zsl label` / `zsl index`, bare
script, recall against exact ground truth), without autofaiss (its venv is only made by `make bench-scale`)."""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks import bench_scale, scale_autofaiss, scale_memory, scale_report  # noqa: E402

TINY = ["--rows", "3000", "--rows", "6000", "--shard-rows", "1000", "--classes", "20", "--train-per-class", "20",
        "--repeats", "1", "--queries", "200", "--single-queries", "50", "--extract-images", "0", "--no-autofaiss"]


@pytest.mark.timeout(180)
def test_bench_scale_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the harness's scratch dir lands here
    out = tmp_path / "results" / "scale.json"
    rc = bench_scale.main([*TINY, "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    for key in ("date", "machine", "parameters", "goals", "model", "scales", "rss_growth", "ratios",
                "interpretation", "notes", "extraction", "autofaiss_env", "total_seconds"):
        assert key in result, key
    assert result["extraction"] is None and result["autofaiss_env"] is None
    assert result["model"]["semantics"] == "text"
    assert [s["n_rows"] for s in result["scales"]] == [3000, 6000]
    for s in result["scales"]:
        n, lb = s["n_rows"], s["label"]
        assert s["data"]["n_shards"] == n // 1000
        for side in ("pipeline", "bare"):
            d = lb[side]
            assert len(d["seconds"]) == len(d["rows_per_s"]) == len(d["peak_rss_mb"]) == 1
            assert all(math.isclose(r, n / t) for r, t in zip(d["rows_per_s"], d["seconds"]))
            assert d["median_rows_per_s"] == statistics.median(d["rows_per_s"])
            assert all(x > 0 for x in d["peak_rss_mb"]) and d["median_peak_rss_mb"] > 0
        assert math.isclose(lb["ratio"], lb["pipeline"]["median_rows_per_s"] / lb["bare"]["median_rows_per_s"])
        assert result["ratios"]["label"][str(n)] == lb["ratio"]
        ours = s["index"]["ours"]
        assert s["index"]["autofaiss"] is None
        assert ours["factory"] == "Flat" and ours["ntotal"] == n  # <= 20k vectors: exact search
        for k in (1, 10, 100):
            assert 0.0 <= ours[f"recall_at_{k}"] <= 1.0
        assert ours["recall_at_10"] >= 0.99  # Flat is exact up to float ties
        assert ours["peak_rss_mb"] > 0 and ours["index_file_bytes"] > 0 and ours["load_seconds"] > 0
        assert ours["single_query_p99_ms"] >= ours["single_query_p50_ms"] > 0
        assert ours["batched_ms_per_query"] > 0 and ours["single_queries"] == 50 and ours["batched_queries"] == 200
    lo, hi = result["scales"]
    g = result["rss_growth"]
    assert g["n_small"] == 3000 and g["n_large"] == 6000
    assert math.isclose(g["label_pipeline"],
                        hi["label"]["pipeline"]["median_peak_rss_mb"] / lo["label"]["pipeline"]["median_peak_rss_mb"])
    assert math.isclose(g["index_ours"], hi["index"]["ours"]["peak_rss_mb"] / lo["index"]["ours"]["peak_rss_mb"])
    assert "zsl label ran at" in result["interpretation"]
    md = (out.parent / "SCALE.md").read_text()
    assert "| 3,000 |" in md and "| 6,000 |" in md and "| | ours | autofaiss |" in md
    # scratch data removed, nothing half-written left beside the results
    assert not list(tmp_path.glob("zsl-bench-scale-*"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["SCALE.md", "scale.json"]


def test_run_measured_sees_a_child_allocation(tmp_path):
    code = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.3)"
    m = scale_memory.run_measured([sys.executable, "-c", code], log=tmp_path / "log", poll_s=0.02)
    assert m["peak_rss_bytes"] >= 300 * 2**20 and m["rss_samples"] >= 1
    assert m["seconds"] >= 0.3


def test_run_measured_reports_failures(tmp_path):
    with pytest.raises(RuntimeError, match="status 3"):
        scale_memory.run_measured([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log=tmp_path / "log")


def test_autofaiss_command_and_timings(tmp_path):
    cmd = scale_autofaiss.autofaiss_command(Path("/v"), "/e", tmp_path, max_memory="2G", memory_available="8G")
    assert cmd[1:] == ["build_index", "--embeddings=/e", f"--index_path={tmp_path / 'knn.index'}",
                       f"--index_infos_path={tmp_path / 'infos.json'}", "--metric_type=ip",
                       "--max_index_memory_usage=2G", "--current_memory_available=8G"]
    log = ('2026 [INFO]: \t>>> Finished "Computing best hyperparameters for index /tmp/x/knn.index" in 7.9 secs\n'
           '2026 [INFO]: \t>>> Finished "Compute fast metrics" in 10.25 secs\n')
    assert scale_autofaiss.autofaiss_timings(log) == {"Computing best hyperparameters for index": 7.9,
                                                      "Compute fast metrics": 10.25}


def test_bad_seen_count_is_a_usage_error(tmp_path):
    rc = bench_scale.main(["--classes", "5", "--seen", "5", "--output", str(tmp_path / "r.json")])
    assert rc == 2
    assert not (tmp_path / "r.json").exists()


def test_results_hold_repository_relative_paths():
    inside = f"{scale_report.REPO}/.venv-tools/autofaiss/bin/autofaiss"
    got = scale_report.repo_relative({"command": [inside, "--embeddings=/tmp/x"], "venv": inside, "n": 3})
    assert got == {"command": [".venv-tools/autofaiss/bin/autofaiss", "--embeddings=/tmp/x"],
                   "venv": ".venv-tools/autofaiss/bin/autofaiss", "n": 3}
