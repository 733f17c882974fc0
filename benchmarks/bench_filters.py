"""Label filters that keep recall (issue 17): the old post-filter vs the search among the allowed ids.

N rows (default 200,000) of clustered synthetic embeddings, 1,000 labels with Zipf frequencies
(label r on a share proportional to 1/r), indexed as ``zsl index`` would (:func:`choose_index`,
:func:`build_index`, efSearch tuned by :func:`tune_index` for unfiltered recall@10 >= 0.95). Per
selectivity bucket (the filter label on >= 5 %, 0.5-5 %, 0.05-0.5 %, < 0.05 % of the rows), 40
held-out queries (drawn like the rows, not indexed), each filtered to a label of that bucket drawn
at random, k=10, against the exact filtered top-10 (numpy over the label's rows). OLD: the top
max(4k, 100) of a plain search, then the filter (what ``zsl serve`` did); NEW:
:func:`pipeline.index.filters.filtered_search`. Single-query latencies (one thread each).

    python -m benchmarks.bench_filters --rows 200000 --output benchmarks/results/filters.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from pipeline.index.build import build_index
from pipeline.index.choose import choose_index
from pipeline.index.common import import_faiss
from pipeline.index.filters import LabelSets, filtered_search
from pipeline.index.knn import exact_knn, recall_at_k
from pipeline.index.tune import tune_index

BUCKETS = [(">=5%", 0.05, 1.01), ("0.5-5%", 0.005, 0.05), ("0.05-0.5%", 0.0005, 0.005), ("<0.05%", 0.0, 0.0005)]


def make_data(n: int, dim: int, n_labels: int, seed: int):
    """Rows near their label's centroid, labels Zipf-distributed; a sampler for held-out queries."""
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((n_labels, dim)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    p = 1.0 / np.arange(1, n_labels + 1)
    p /= p.sum()

    def draw(m: int, r: np.random.Generator):
        lab = r.choice(n_labels, size=m, p=p)
        v = cent[lab] + 1.2 * r.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        return v / np.linalg.norm(v, axis=1, keepdims=True), lab

    x, lab = draw(n, rng)
    return x.astype(np.float32), lab, lambda m: draw(m, np.random.default_rng(seed + 1))[0].astype(np.float32)


def old_postfilter(index, q: np.ndarray, k: int, allowed: np.ndarray) -> np.ndarray:
    _, i = index.search(q, min(max(4 * k, 100), index.ntotal))
    got = i[0][np.isin(i[0], allowed)][:k]
    return np.concatenate([got, np.full(k - len(got), -1, np.int64)])


def run(rows: int, dim: int, n_labels: int, per_bucket: int, k: int, seed: int) -> dict:
    t0 = time.perf_counter()
    x, lab, queries_of = make_data(rows, dim, n_labels, seed)
    sets = LabelSets([f"l{v}" for v in lab])
    counts = sets.counts()
    factory = choose_index(rows, dim, max_memory_bytes=4 << 30)
    tb = time.perf_counter()
    index = build_index(x, dim=dim, factory=factory, n_total=rows, use_gpu=False)
    build_s = time.perf_counter() - tb
    tuning = tune_index(index, [x], n_total=rows, target_recall=0.95, k=k, n_queries=200, seed=seed)
    import_faiss().omp_set_num_threads(1)
    rng = np.random.default_rng(seed + 2)
    q_all = queries_of(per_bucket * len(BUCKETS))
    out, lat = {}, {"unfiltered": [], "old": [], "new": []}
    for b, (name, lo, hi) in enumerate(BUCKETS):
        names = [n for n, c in counts.items() if lo <= c / rows < hi]
        if not names:
            continue
        res = {"labels_in_bucket": len(names), "old": [], "new": [], "truth": [], "sizes": []}
        n_lat = len(lat["new"])
        for j in range(per_bucket):
            q = q_all[b * per_bucket + j: b * per_bucket + j + 1]
            allowed = sets.ids_of([names[rng.integers(len(names))]])
            truth = np.full(k, -1, np.int64)
            t_ids = allowed[exact_knn(x[allowed], q, min(k, len(allowed)))[1][0]]
            truth[:len(t_ids)] = t_ids
            for key, fn in (("old", lambda: old_postfilter(index, q, k, allowed)),
                            ("new", lambda: filtered_search(index, q, k, allowed)[1][0])):
                t = time.perf_counter()
                got = fn()
                lat[key].append(time.perf_counter() - t)
                res[key].append(np.concatenate([got, np.full(k - len(got), -1, np.int64)]))
            t = time.perf_counter()
            index.search(q, k)
            lat["unfiltered"].append(time.perf_counter() - t)
            res["truth"].append(truth)
            res["sizes"].append(len(allowed))
        truth = np.stack(res["truth"])
        want = np.minimum(k, np.array(res["sizes"]))
        out[name] = {"labels_in_bucket": len(names), "queries": per_bucket,
                     "rows_per_label_median": int(np.median(res["sizes"])),
                     "new_latency_ms_p99": round(float(np.percentile(lat["new"][n_lat:], 99)) * 1e3, 3),
                     **{f"{m}_recall_at_{k}": round(recall_at_k(np.stack(res[m]), truth), 4) for m in ("old", "new")},
                     **{f"{m}_underfilled": int(((np.stack(res[m]) >= 0).sum(1) < want).sum()) for m in ("old", "new")}}
    p99 = {m: round(float(np.percentile(v, 99)) * 1e3, 3) for m, v in lat.items()}
    p50 = {m: round(float(np.percentile(v, 50)) * 1e3, 3) for m, v in lat.items()}
    return {"rows": rows, "dim": dim, "labels": n_labels, "k": k, "seed": seed, "factory": factory,
            "search_params": tuning.params if tuning else None,
            "unfiltered_recall_at_10": tuning.recall_at_10 if tuning else None,
            "build_seconds": round(build_s, 1), "buckets": out, "latency_ms_p99": p99, "latency_ms_p50": p50,
            "total_seconds": round(time.perf_counter() - t0, 1), "machine": platform.platform(),
            "date": time.strftime("%Y-%m-%d")}


def table(r: dict) -> str:
    lines = ["| bucket | labels | rows/label (median) | recall@10 old | recall@10 new | under-filled old "
             "| under-filled new | new p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for name, b in r["buckets"].items():
        lines.append(f"| {name} | {b['labels_in_bucket']} | {b['rows_per_label_median']:,} | {b['old_recall_at_10']:.3f} "
                     f"| **{b['new_recall_at_10']:.3f}** | {b['old_underfilled']}/{b['queries']} "
                     f"| {b['new_underfilled']}/{b['queries']} | {b['new_latency_ms_p99']} |")
    p = r["latency_ms_p99"]
    lines.append(f"\np99 single-query latency: unfiltered {p['unfiltered']} ms, old {p['old']} ms, new {p['new']} ms")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=40, help="held-out queries per selectivity bucket")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    r = run(a.rows, a.dim, a.labels, a.queries, a.k, a.seed)
    print(json.dumps(r, indent=2))
    print(table(r))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
