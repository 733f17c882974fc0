"""Label filters that keep recall (issue 17): the old post-filter vs the search among the allowed ids.

N rows (default 200,000) of clustered synthetic embeddings: 1,000 clusters with Zipf sizes
(cluster r holds a share proportional to 1/r^1.2, so the smallest is 0.006 % of the rows), indexed as
``zsl index`` would (:func:`choose_index`, :func:`build_index`, efSearch tuned by :func:`tune_index`
for unfiltered recall@10 >= 0.95). Two label geometries on the same vectors:

- ``clustered``: a row's label is its cluster (a filter label is a region of the space, usually not
  the query's: the hard case for a graph search with a selector);
- ``independent``: the same labels shuffled over the rows (same frequencies, no link to position).

Per selectivity bucket (the filter label on >= 5 %, 0.5-5 %, 0.05-0.5 %, 0.01-0.05 %, < 0.01 % of
the rows), ``--queries`` held-out queries (drawn like the rows, not indexed), each filtered to a
label of that bucket drawn at random, k=10, against the exact filtered top-10 (numpy over the
label's rows). OLD: the top max(4k, 100) of a plain search, then the filter (what ``zsl serve`` did);
NEW: :class:`pipeline.index.filters.FilteredIndex`, prepared as ``zsl serve`` prepares it at load
(the label sets, float16 copies of the large ones). Each query is timed unfiltered, old and new in
turn, one faiss thread, single-query; p99 per bucket vs the unfiltered p99 over all of the run's queries.

    python -m benchmarks.bench_filters --rows 200000 --output benchmarks/results/filters.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import numpy as np

from pipeline.index.build import build_index
from pipeline.index.choose import choose_index
from pipeline.index.common import import_faiss
from pipeline.index.filters import FilteredIndex, LabelSets
from pipeline.index.knn import exact_knn, recall_at_k, set_search_params
from pipeline.index.tune import tune_index

BUCKETS = [(">=5%", 0.05, 1.01), ("0.5-5%", 0.005, 0.05), ("0.05-0.5%", 0.0005, 0.005),
           ("0.01-0.05%", 0.0001, 0.0005), ("<0.01%", 0.0, 0.0001)]
GEOMETRIES = ("clustered", "independent")


def make_data(n: int, dim: int, n_labels: int, seed: int, zipf: float = 1.2):
    """Rows near their cluster's centroid, clusters Zipf-sized; a sampler for held-out queries."""
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((n_labels, dim)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    p = 1.0 / np.arange(1, n_labels + 1) ** zipf
    p /= p.sum()

    def draw(m: int, r: np.random.Generator):
        lab = r.choice(n_labels, size=m, p=p)
        v = cent[lab] + 1.2 * r.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        return v / np.linalg.norm(v, axis=1, keepdims=True), lab

    x, lab = draw(n, rng)
    return x.astype(np.float32), lab, lambda m: draw(m, np.random.default_rng(seed + 1))[0].astype(np.float32)


def labels_of(clusters: np.ndarray, geometry: str, seed: int) -> np.ndarray:
    """The label per row: its cluster, or (``independent``) the clusters shuffled over the rows."""
    if geometry == "clustered":
        return clusters
    return np.random.default_rng(seed + 3).permutation(clusters)


def old_postfilter(index, q: np.ndarray, k: int, allowed: np.ndarray) -> np.ndarray:
    _, i = index.search(q, min(max(4 * k, 100), index.ntotal))
    got = i[0][np.isin(i[0], allowed)][:k]
    return np.concatenate([got, np.full(k - len(got), -1, np.int64)])


def build(x: np.ndarray, *, k: int, seed: int, cache: str | None, key: str = ""):
    """The index ``zsl index`` would build, tuned; read from / written to ``cache`` when given."""
    faiss = import_faiss()
    rows, dim = x.shape
    factory = choose_index(rows, dim, max_memory_bytes=4 << 30)
    path = os.path.join(cache, f"filters_{rows}_{dim}_{key}_{seed}") if cache else None
    if path and os.path.exists(path + ".json"):
        meta = json.load(open(path + ".json"))
        index = faiss.read_index(path + ".faiss")
        set_search_params(index, meta["search_params"])
        return index, meta
    tb = time.perf_counter()
    index = build_index(x, dim=dim, factory=factory, n_total=rows, use_gpu=False)
    build_s = time.perf_counter() - tb
    tuning = tune_index(index, [x], n_total=rows, target_recall=0.95, k=k, n_queries=200, seed=seed)
    meta = {"factory": factory, "search_params": tuning.params if tuning else None,
            "unfiltered_recall_at_10": tuning.recall_at_10 if tuning else None, "build_seconds": round(build_s, 1)}
    if path:
        os.makedirs(cache, exist_ok=True)
        faiss.write_index(index, path + ".faiss")
        json.dump(meta, open(path + ".json", "w"))
    return index, meta


def _ms(v, p: float) -> float:
    return round(float(np.percentile(v, p)) * 1e3, 3)


def run_geometry(index, x: np.ndarray, labels: np.ndarray, queries: np.ndarray, *, k: int, per_bucket: int,
                 seed: int, repeats: int = 3) -> dict:
    """Old vs new per selectivity bucket for one label geometry; each query timed ``repeats`` times
    per method, its median kept (and the first timing, single-shot, reported beside)."""
    rows = len(x)
    t = time.perf_counter()
    sets = LabelSets([f"l{v}" for v in labels])
    fi = FilteredIndex(index)
    copied = fi.prepare(sets.sets.values())
    prepare_s = time.perf_counter() - t
    counts = sets.counts()
    rng = np.random.default_rng(seed + 2)
    out, unfiltered, first = {}, [], []
    for b, (name, lo, hi) in enumerate(BUCKETS):
        names = sorted(n for n, c in counts.items() if lo <= c / rows < hi)
        if not names:
            continue
        res = {"old": [], "new": [], "truth": [], "truth_s": [], "new_s": [], "sizes": []}
        lat, n_first = {"old": [], "new": []}, len(first)
        for j in range(per_bucket):
            q = queries[b * per_bucket + j: b * per_bucket + j + 1]
            allowed = sets.sets[names[rng.integers(len(names))]]
            ts, tp = exact_knn(x[allowed], q, min(k, len(allowed)))
            took = []
            for _ in range(repeats):  # in turn, so that a busy moment of the machine hits all three
                t0 = time.perf_counter()
                index.search(q, k)
                t1 = time.perf_counter()
                old = old_postfilter(index, q, k, allowed)
                t2 = time.perf_counter()
                s_new, i_new = fi.search(q, k, allowed)
                took.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
            first.append(took[0])
            unf, t_old, t_new = np.median(took, axis=0)
            unfiltered.append(unf)
            lat["old"].append(t_old)
            lat["new"].append(t_new)
            pad = k - i_new.shape[1]
            res["old"].append(old)
            res["new"].append(np.concatenate([i_new[0], np.full(pad, -1, np.int64)]))
            res["new_s"].append(np.concatenate([s_new[0], np.full(pad, -np.inf, np.float32)]))
            res["truth"].append(np.concatenate([allowed[tp[0]], np.full(pad, -1, np.int64)]))
            res["truth_s"].append(np.concatenate([ts[0], np.full(pad, -np.inf, np.float32)]))
            res["sizes"].append(len(allowed))
        truth, want = np.stack(res["truth"]), np.minimum(k, np.array(res["sizes"]))
        out[name] = {
            "labels_in_bucket": len(names), "queries": per_bucket,
            "rows_per_label_median": int(np.median(res["sizes"])), "rows_per_label_max": int(max(res["sizes"])),
            f"old_recall_at_{k}": round(recall_at_k(np.stack(res["old"]), truth), 4),
            f"new_recall_at_{k}": round(recall_at_k(np.stack(res["new"]), truth, approx_scores=np.stack(res["new_s"]),
                                                    exact_scores=np.stack(res["truth_s"])), 4),
            **{f"{m}_underfilled": int(((np.stack(res[m]) >= 0).sum(1) < want).sum()) for m in ("old", "new")},
            **{f"{m}_latency_ms_{p}": _ms(lat[m], q) for m in ("old", "new") for p, q in (("p50", 50), ("p99", 99))},
            "new_latency_ms_p99_single_shot": _ms([t[2] for t in first[n_first:]], 99)}
    unf_p99 = _ms(unfiltered, 99)
    for b in out.values():
        b["new_p99_over_unfiltered_p99"] = round(b["new_latency_ms_p99"] / unf_p99, 2)
    return {"prepare_seconds": round(prepare_s, 2), "sets_copied": copied, "copies_mb": round(fi.copy_bytes / 2**20, 1),
            "timings_per_query": repeats, "unfiltered_latency_ms_p50": _ms(unfiltered, 50),
            "unfiltered_latency_ms_p99": unf_p99,
            "unfiltered_latency_ms_p99_single_shot": _ms([t[0] for t in first], 99), "buckets": out}


def run(rows: int, dim: int, n_labels: int, per_bucket: int, k: int, seed: int, *, zipf: float = 1.2,
        repeats: int = 3, cache: str | None = None) -> dict:
    t0 = time.perf_counter()
    x, clusters, queries_of = make_data(rows, dim, n_labels, seed, zipf)
    index, meta = build(x, k=k, seed=seed, cache=cache, key=f"{n_labels}_{zipf}")
    import_faiss().omp_set_num_threads(1)
    queries = queries_of(per_bucket * len(BUCKETS))
    geos = {g: run_geometry(index, x, labels_of(clusters, g, seed), queries, k=k, per_bucket=per_bucket, seed=seed,
                            repeats=repeats) for g in GEOMETRIES}
    return {"rows": rows, "dim": dim, "labels": n_labels, "zipf": zipf, "k": k, "seed": seed, **meta,
            "geometries": geos, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "total_seconds": round(time.perf_counter() - t0, 1), "machine": platform.platform(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}


def table(r: dict) -> str:
    lines = []
    for g, geo in r["geometries"].items():
        lines += [f"\n{g} ({r['rows']:,} rows): unfiltered p50 {geo['unfiltered_latency_ms_p50']} ms, "
                  f"p99 {geo['unfiltered_latency_ms_p99']} ms (single-shot "
                  f"{geo['unfiltered_latency_ms_p99_single_shot']}); prepare {geo['prepare_seconds']} s, "
                  f"{geo['sets_copied']} set(s) copied, {geo['copies_mb']} MB",
                  "| bucket | labels | rows/label (median) | recall@10 old | recall@10 new | under-filled old "
                  "| under-filled new | old p99 ms | new p50 ms | new p99 ms (single-shot) | new p99 / unfiltered p99 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, b in geo["buckets"].items():
            lines.append(f"| {name} | {b['labels_in_bucket']} | {b['rows_per_label_median']:,} "
                         f"| {b['old_recall_at_10']:.3f} | **{b['new_recall_at_10']:.3f}** "
                         f"| {b['old_underfilled']}/{b['queries']} | {b['new_underfilled']}/{b['queries']} "
                         f"| {b['old_latency_ms_p99']} | {b['new_latency_ms_p50']} | {b['new_latency_ms_p99']} "
                         f"({b['new_latency_ms_p99_single_shot']}) "
                         f"| {b['new_p99_over_unfiltered_p99']} |")
    lines.append(f"\npeak RSS {r['peak_rss_mb']} MB, {r['total_seconds']} s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--zipf", type=float, default=1.2, help="label r's share is proportional to 1/r^zipf")
    ap.add_argument("--queries", type=int, default=40, help="held-out queries per selectivity bucket")
    ap.add_argument("--repeats", type=int, default=3, help="timings per query and method (the median is kept)")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="folder to keep the built index in between runs")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    r = run(a.rows, a.dim, a.labels, a.queries, a.k, a.seed, zipf=a.zipf, repeats=a.repeats, cache=a.cache)
    print(table(r))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
