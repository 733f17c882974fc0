"""benchmarks.compare_revisions: the summary flags a moved exact figure and gives medians and ratios."""

from __future__ import annotations

from benchmarks.compare_revisions import _summary


def _run(factory: str, recall: float, qps: float) -> dict:
    return {"index.factory": factory, "index.recall_at_10": recall, "serve.zipf.qps": qps}


def test_summary_medians_ratios_and_exact_figures():
    same = _summary({"base": [_run("HNSW32,Flat", 0.95, 100), _run("HNSW32,Flat", 0.95, 300), _run("HNSW32,Flat", 0.95, 200)],
                     "this": [_run("HNSW32,Flat", 0.95, 190), _run("HNSW32,Flat", 0.95, 210), _run("HNSW32,Flat", 0.95, 500)]})
    assert same["index.factory"]["same"] and same["index.recall_at_10"]["same"]
    assert same["serve.zipf.qps"]["base_median"] == 200 and same["serve.zipf.qps"]["this_median"] == 210
    assert same["serve.zipf.qps"]["ratio"] == 1.05
    moved = _summary({"base": [_run("HNSW32,Flat", 0.95, 1)], "this": [_run("IVF256,Flat", 0.94, 1)]})
    assert not moved["index.factory"]["same"] and not moved["index.recall_at_10"]["same"]
