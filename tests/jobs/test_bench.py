"""benchmarks.bench: the whole benchmark code path on a tiny input (Ray extraction + labeling), in-process."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks import bench  # noqa: E402

TINY = ["--repeats", "1", "--images-per-class", "1", "--shard-size", "5", "--batch-size", "4",
        "--label-rows", "1000", "--label-shard-rows", "500", "--label-classes", "10", "--top-k", "3"]


def _check(result: dict, repeats: int) -> None:
    for key in ("date", "machine", "parameters", "extraction", "labeling", "ratios", "interpretation"):
        assert key in result, key
    assert result["machine"]["cpu_count"] >= 1
    for v in ("torch", "ray", "faiss"):
        assert result["machine"][v]
    assert set(result["ratios"]) == {"extraction", "labeling"}
    for name, r in result["ratios"].items():
        assert math.isfinite(r) and r > 0, (name, r)
    ex, lb = result["extraction"], result["labeling"]
    assert ex["n_images"] == 10 and lb["n_rows"] == 1000
    for side, unit in ((ex["pipeline"], "images_per_s"), (ex["bare"], "images_per_s"),
                       (lb["pipeline"], "rows_per_s"), (lb["bare"], "rows_per_s")):
        assert len(side["seconds"]) == len(side[unit]) == repeats
        assert all(math.isfinite(x) and x > 0 for x in side[unit])
        assert side[f"median_{unit}"] > 0
    assert ex["torch_threads"]["bare_loop"] == ex["torch_threads"]["pipeline_actor"] == ex["resource_plan"]["threads"]
    # the pipeline and the bare loop compute the same features
    assert ex["embeddings_max_abs_diff_pipeline_vs_bare"] < 1e-3
    text = result["interpretation"]
    assert "Extraction" in text and "Labeling" in text


@pytest.mark.timeout(180)
def test_bench_tiny_writes_ratios(tmp_path):
    out = tmp_path / "results.json"
    rc = bench.main([*TINY, "--no-cold", "--output", str(out), "--workdir", str(tmp_path / "work")])
    assert rc == 0
    result = json.loads(out.read_text())
    _check(result, repeats=1)
    assert result["extraction"]["cold"] is None
    assert not list(tmp_path.glob("results.json.*")) and not list(tmp_path.glob("._tmp-*"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_tiny_cold_and_repeats(tmp_path):
    out = tmp_path / "results.json"
    rc = bench.main([*TINY, "--repeats", "2", "--cold", "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    _check(result, repeats=2)
    cold = result["extraction"]["cold"]
    if not result["extraction"]["ray_was_already_running"]:
        assert cold["seconds_incl_ray_init"] >= cold["seconds_excl_ray_init"] > 0
        assert math.isfinite(cold["ratio_vs_bare_incl_encoder_load"]) and cold["ratio_vs_bare_incl_encoder_load"] > 0


def test_interleaved_alternates_order():
    calls = []
    p, b = bench.interleaved(4, lambda r: calls.append(("p", r)) or 1.0, lambda r: calls.append(("b", r)) or 2.0)
    assert p == [1.0] * 4 and b == [2.0] * 4
    assert [c[0] for c in calls] == ["p", "b", "b", "p", "p", "b", "b", "p"]


def test_bad_seen_count_is_a_usage_error(tmp_path):
    rc = bench.main(["--skip-extract", "--label-classes", "5", "--label-seen", "5",
                     "--output", str(tmp_path / "r.json")])
    assert rc == 2
    assert not (tmp_path / "r.json").exists()
