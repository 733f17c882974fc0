"""`make bench-pipeline` end to end at a tiny scale: real tars, the real `zsl run` processes, the JSON it writes."""

from __future__ import annotations

import json

from benchmarks.bench_pipeline import main


def test_bench_pipeline_tiny(tmp_path):
    out = tmp_path / "pipeline.json"
    assert main(["--rows", "3000", "--shards", "3", "--classes", "8", "--repeats", "1", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["first_run"]["stages"]["label"]["status"] == "done"
    idle = r["idle_rerun"]["runs"][0]["stages"]
    assert {s["status"] for s in idle.values()} <= {"nothing new", "skipped"}
    rel = r["relabel"]["stages"]
    assert rel["classes"]["status"] == "done" and rel["label"]["status"] == "done"
    assert rel["extract"]["status"] == "nothing new" and rel["index"]["status"] == "nothing new"
    assert r["relabel"]["relabel_vs_fresh_label"] > 0
