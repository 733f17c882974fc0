"""Our index at scale: ``zsl index`` in a subprocess (wall time, peak RSS), then its load time and recall
measured here; and the latency of any loaded indexes, in interleaved rounds.

Single-query latency samples are taken with ``time.perf_counter`` around each ``search`` call, in the loop.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.bench import median, ratio
from benchmarks.scale_data import RECALL_KS, World, measure_recall
from benchmarks.scale_memory import mb, run_measured, self_rss, zsl_command
from pipeline.core.timing import timed

def effective_params(index) -> dict:
    """nprobe / efSearch actually set on a loaded index (under pre-transforms and IVF wrappers)."""
    import faiss

    out: dict = {}
    try:
        out["nprobe"] = int(faiss.extract_index_ivf(index).nprobe)
    except RuntimeError:
        pass
    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if hasattr(inner, "hnsw"):
        out["efSearch"] = int(inner.hnsw.efSearch)
    try:
        ivf = faiss.extract_index_ivf(index)
        q = faiss.downcast_index(ivf.quantizer)
        if hasattr(q, "hnsw"):
            out["quantizer_efSearch"] = int(q.hnsw.efSearch)
    except RuntimeError:
        pass
    return out


def apply_params(index, params: str | None) -> str | None:
    """``faiss.ParameterSpace().set_index_parameters``; returns an error string or None."""
    import faiss

    if not params:
        return None
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except Exception as exc:  # noqa: BLE001 - reported, the measurement goes on with the index as loaded
        return f"{type(exc).__name__}: {exc}"
    return None


def time_index(index, Q, *, single_queries: int, latency_k: int, warmup: int = 10) -> dict:
    """One latency round: ``single_queries`` searches of one query each (after ``warmup`` untimed
    ones), then one batched search of all queries at k=100; raw seconds."""
    k = min(max(RECALL_KS), int(index.ntotal))
    lk = min(latency_k, int(index.ntotal))
    nq = min(single_queries, len(Q))
    for i in range(min(warmup, nq)):
        index.search(Q[i : i + 1], lk)
    single = []
    for i in range(nq):
        q = Q[i : i + 1]
        t = time.perf_counter()
        index.search(q, lk)
        single.append(time.perf_counter() - t)
    with timed() as batched:
        index.search(Q, k)
    return {"single_s": single, "batched_s": batched.seconds, "latency_k": lk, "batched_k": k}


def latency_summary(rounds: list[dict], n_queries: int) -> dict:
    ms = np.concatenate([np.asarray(r["single_s"]) for r in rounds]) * 1e3
    batched = [r["batched_s"] for r in rounds]
    return {"single_query_mean_ms": float(ms.mean()), "single_query_p50_ms": float(np.median(ms)),
            "single_query_p99_ms": float(np.percentile(ms, 99)), "single_queries": len(rounds[0]["single_s"]),
            "latency_rounds": len(rounds), "latency_k": rounds[0]["latency_k"],
            "batched_ms_per_query": float(median(batched) / n_queries * 1e3), "batched_queries": n_queries,
            "batched_k": rounds[0]["batched_k"], "batched_seconds": batched}


def measure_latencies(indexes: dict, Q, *, rounds: int, single_queries: int, latency_k: int) -> dict:
    """Latency of every index in ``indexes`` (name -> index), rounds interleaved (ABBA for two), so
    that load from other work on a shared machine hits them alike; loadavg before and after."""
    names = list(indexes)
    raw: dict[str, list[dict]] = {n: [] for n in names}
    load0 = list(os.getloadavg())
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            raw[n].append(time_index(indexes[n], Q, single_queries=single_queries, latency_k=latency_k))
    load1 = list(os.getloadavg())
    return {n: {**latency_summary(raw[n], len(Q)), "loadavg_before": load0, "loadavg_after": load1} for n in names}


def bench_our_index(world: World, data: dict, work: Path, Q, gt_ids, *, max_memory: str, env: dict,
                    poll_s: float) -> tuple[dict, object]:
    """``zsl index`` in a subprocess (wall time, peak RSS), its manifest, load time and recall."""
    from pipeline.core.units import parse_memory
    from pipeline.index.store import load_index

    out = work / "index-ours"
    shutil.rmtree(out, ignore_errors=True)
    m = run_measured([*zsl_command(), "index", "--features", data["features_dir"], "--model", world.model_dir,
                      "--output", str(out), "--max-memory", max_memory],
                     log=work / "logs" / "index.log", env=env, cwd=str(work), poll_s=poll_s, what="zsl index")
    man = json.loads((out / "manifest.json").read_text())
    timings = man.get("timings") or {}
    project_s = timings.get("project_s") if isinstance(timings, dict) else None
    gc.collect()
    rss0 = self_rss()
    with timed() as load:
        index, _ids, _ = load_index(str(out))
    del _ids
    gc.collect()
    rss_delta = self_rss() - rss0
    params_error = apply_params(index, man.get("search_params"))
    res = {
        "factory": man.get("factory"), "search_params": man.get("search_params"), "nprobe": man.get("nprobe"),
        "effective_params": effective_params(index), "search_params_error": params_error,
        "tuning": man.get("tuning"), "timings": man.get("timings"),
        "build_seconds": m["seconds"], "manifest_seconds": man.get("seconds"),
        "build_seconds_minus_projection": (m["seconds"] - project_s) if project_s is not None else None,
        "peak_rss_mb": mb(m["peak_rss_bytes"]), "polled_tree_peak_rss_mb": mb(m["polled_tree_peak_rss_bytes"]),
        "root_hwm_mb": mb(m["root_hwm_bytes"]),
        "index_file_bytes": (out / "index.faiss").stat().st_size + sum((man.get("data_files") or {}).values()),
        "data_files": man.get("data_files"), "index_bytes": man.get("index_bytes"),
        "load": "pipeline.index.store.load_index(dir) with its defaults (memory-mapped where the index type allows)",
        "estimated_bytes": man.get("estimated_bytes"),
        "estimated_over_file": ratio(man["estimated_bytes"], (out / "index.faiss").stat().st_size)
        if man.get("estimated_bytes") else None,
        "max_memory_bytes": parse_memory(max_memory),
        "load_seconds": load.seconds, "loaded_rss_delta_mb": mb(rss_delta), "ntotal": int(index.ntotal),
    }
    res["within_budget"] = res["index_file_bytes"] <= res["max_memory_bytes"]
    res.update(measure_recall(index, Q, gt_ids))
    return res, index
