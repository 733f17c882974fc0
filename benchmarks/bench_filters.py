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
turn, one faiss thread, single-query, once per round in 3 rounds (``--repeats``), its median kept
(the first round's single-shot p99 is reported beside); p99 per bucket vs the unfiltered p99 over
all of the run's queries. Peak RSS covers the data, the index, the truth and the copies.

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


def _plan(sets: LabelSets, x: np.ndarray, queries: np.ndarray, *, k: int, per_bucket: int, seed: int) -> list:
    """Per bucket: its labels and ``per_bucket`` (query, allowed ids, exact filtered top-k) cases."""
    counts, rng, plan = sets.counts(), np.random.default_rng(seed + 2), []
    for b, (name, lo, hi) in enumerate(BUCKETS):
        names = sorted(n for n, c in counts.items() if lo <= c / len(x) < hi)
        cases = []
        for j in range(per_bucket if names else 0):
            q = queries[b * per_bucket + j: b * per_bucket + j + 1]
            allowed = sets.sets[names[rng.integers(len(names))]]
            ts, tp = exact_knn(x[allowed], q, min(k, len(allowed)))
            cases.append((q, allowed, _padded(allowed[tp[0]], ts[0], k)))
        if cases:
            plan.append((name, len(names), cases))
    return plan


def _padded(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    pad = k - len(ids)
    return np.concatenate([ids, np.full(pad, -1, np.int64)]), np.concatenate([scores, np.full(pad, -np.inf, np.float32)])


def _time_rounds(index, fi: FilteredIndex, plan: list, *, k: int, repeats: int):
    """``(unfiltered, old, new)`` seconds per case and round: every case once per round, the three
    methods in turn (a busy moment of the machine hits all three), rounds seconds apart."""
    took, answers = [], []
    for r in range(repeats):
        round_ = []
        for _, _, cases in plan:
            for q, allowed, _ in cases:
                t0 = time.perf_counter()
                index.search(q, k)
                t1 = time.perf_counter()
                old = old_postfilter(index, q, k, allowed)
                t2 = time.perf_counter()
                s_new, i_new = fi.search(q, k, allowed)
                round_.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
                if r == 0:
                    answers.append((old, _padded(i_new[0], s_new[0], k)))
        took.append(round_)
    return np.array(took), answers


def run_geometry(index, x: np.ndarray, labels: np.ndarray, queries: np.ndarray, *, k: int, per_bucket: int,
                 seed: int, repeats: int = 3) -> dict:
    """Old vs new per selectivity bucket for one label geometry; each query timed once per round,
    ``repeats`` rounds, its median kept (and the first round's timing, single-shot, beside)."""
    t = time.perf_counter()
    sets = LabelSets([f"l{v}" for v in labels])
    fi = FilteredIndex(index)
    copied = fi.prepare(sets.sets.values())
    prepare_s = time.perf_counter() - t
    plan = _plan(sets, x, queries, k=k, per_bucket=per_bucket, seed=seed)
    took, answers = _time_rounds(index, fi, plan, k=k, repeats=repeats)  # (rounds, cases, 3)
    med, first = np.median(took, axis=0), took[0]
    out, at = {}, 0
    for name, n_labels, cases in plan:
        sl = slice(at, at + len(cases))
        at += len(cases)
        old = np.stack([a[0] for a in answers[sl]])
        new, new_s = np.stack([a[1][0] for a in answers[sl]]), np.stack([a[1][1] for a in answers[sl]])
        truth, truth_s = np.stack([c[2][0] for c in cases]), np.stack([c[2][1] for c in cases])
        sizes = np.array([len(c[1]) for c in cases])
        want = np.minimum(k, sizes)
        out[name] = {
            "labels_in_bucket": n_labels, "queries": len(cases),
            "rows_per_label_median": int(np.median(sizes)), "rows_per_label_max": int(sizes.max()),
            f"old_recall_at_{k}": round(recall_at_k(old, truth), 4),
            f"new_recall_at_{k}": round(recall_at_k(new, truth, approx_scores=new_s, exact_scores=truth_s), 4),
            "old_underfilled": int(((old >= 0).sum(1) < want).sum()),
            "new_underfilled": int(((new >= 0).sum(1) < want).sum()),
            **{f"{m}_latency_ms_p{p}": _ms(med[sl, c], p) for m, c in (("old", 1), ("new", 2)) for p in (50, 99)},
            "new_latency_ms_p99_single_shot": _ms(first[sl, 2], 99)}
    unf_p99 = _ms(med[:, 0], 99)
    for b in out.values():
        b["new_p99_over_unfiltered_p99"] = round(b["new_latency_ms_p99"] / unf_p99, 2)
    return {"prepare_seconds": round(prepare_s, 2), "sets_copied": copied, "copies_mb": round(fi.copy_bytes / 2**20, 1),
            "timing_rounds": repeats, "unfiltered_latency_ms_p50": _ms(med[:, 0], 50),
            "unfiltered_latency_ms_p99": unf_p99, "unfiltered_latency_ms_p99_single_shot": _ms(first[:, 0], 99),
            "buckets": out}


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
    ap.add_argument("--repeats", type=int, default=3, help="timing rounds (each query's median is kept)")
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
