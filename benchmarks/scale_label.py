"""Labeling at scale: ``zsl label`` in a subprocess against a bare NumPy script in a subprocess, interleaved,
each with wall time and the peak RSS of its process tree.

The bare script (:data:`BARE_LABEL`) imports nothing of the project: it reads each shard's embedding
column with pyarrow, scores ``l2n(X) @ V @ S.T``, takes ``np.argpartition`` top-k and writes nothing;
it times itself with ``time.perf_counter`` (it must run with NumPy and pyarrow alone).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from benchmarks.bench import interleaved, median, ratio
from benchmarks.scale_data import DIM, World
from benchmarks.scale_memory import mb, run_measured, zsl_command

BARE_LABEL = r'''
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

a = json.load(open(sys.argv[1]))
V, S, k, bs, dim = np.load(a["V"]), np.load(a["S"]), a["k"], a["batch"], a["dim"]


def l2n(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


t1 = time.perf_counter()
n = check = 0
for f in a["files"]:
    col = pq.read_table(f, columns=["embedding"]).column("embedding")
    X = pa.concat_arrays([c.flatten() for c in col.chunks]).to_numpy(zero_copy_only=False).reshape(-1, dim)
    for i in range(0, len(X), bs):
        scores = l2n(X[i : i + bs]) @ V @ S.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        check += int(top[0].sum())
    n += len(X)
    del X, col
print(json.dumps({"rows": n, "seconds": time.perf_counter() - t1, "seconds_incl_imports": time.perf_counter() - t0,
                  "check": check}))
'''


def bench_label_scale(world: World, data: dict, work: Path, *, n_rows: int, repeats: int, top_k: int,
                      env: dict, poll_s: float) -> dict:
    from pipeline.core.config import LabelConfig

    batch = LabelConfig(model=world.model_dir, features=data["features_dir"], classes=world.classes_dir,
                        output=str(work / "x")).batch_size
    script = work / "bare_label.py"
    script.write_text(BARE_LABEL)
    args = work / "bare_label.json"
    args.write_text(json.dumps({"V": world.v_path, "S": world.s_path, "k": top_k, "batch": batch, "dim": DIM,
                                "files": data["shard_files"]}))
    p_runs: list[dict] = []
    b_runs: list[dict] = []

    def pipeline_rep(r: int) -> float:
        out = work / f"labels-r{r}"
        shutil.rmtree(out, ignore_errors=True)
        m = run_measured([*zsl_command(), "label", "--model", world.model_dir, "--features", data["features_dir"],
                          "--classes", world.classes_dir, "--output", str(out), "--top-k", str(top_k)],
                         log=work / "logs" / f"label-r{r}.log", env=env, cwd=str(work), poll_s=poll_s,
                         what="zsl label")
        man = json.loads((out / "manifest.json").read_text())
        if man.get("n_images") != n_rows or man.get("n_labeled_this_run") != n_rows:
            raise RuntimeError(f"zsl label labeled {man.get('n_labeled_this_run')} of {n_rows} rows")
        m["inprocess_seconds"] = man.get("seconds_last_run")
        p_runs.append(m)
        shutil.rmtree(out, ignore_errors=True)
        return m["seconds"]

    def bare_rep(r: int) -> float:
        log = work / "logs" / f"bare-label-r{r}.log"
        m = run_measured([sys.executable, str(script), str(args)], log=log, env=env, cwd=str(work), poll_s=poll_s,
                         what="bare labeling script")
        res = json.loads(log.read_text().strip().splitlines()[-1])
        if res["rows"] != n_rows:
            raise RuntimeError(f"bare labeling read {res['rows']} of {n_rows} rows")
        m["inprocess_seconds"] = res["seconds"]
        b_runs.append(m)
        return m["seconds"]

    interleaved(repeats, pipeline_rep, bare_rep)

    p, b = _side(p_runs, n_rows), _side(b_runs, n_rows)
    return {"n_rows": n_rows, "repeats": repeats, "batch_size": batch, "top_k": top_k,
            "pipeline": p, "bare": b,
            "ratio": ratio(p["median_rows_per_s"], b["median_rows_per_s"]),
            "ratio_inprocess": (ratio(p["median_inprocess_rows_per_s"], b["median_inprocess_rows_per_s"])
                                if p["median_inprocess_rows_per_s"] and b["median_inprocess_rows_per_s"] else None)}


def _side(runs: list[dict], n_rows: int) -> dict:
    """One side's repeats: seconds and rows/s (spawn to exit, and in-process), peak RSS, and medians."""
    secs = [r["seconds"] for r in runs]
    rps = [n_rows / s for s in secs]
    inproc = [r["inprocess_seconds"] for r in runs]
    return {"seconds": secs, "rows_per_s": rps, "median_rows_per_s": median(rps),
            "inprocess_seconds": inproc,
            "median_inprocess_rows_per_s": (median([n_rows / s for s in inproc])
                                            if all(s for s in inproc) else None),
            "peak_rss_mb": [mb(r["peak_rss_bytes"]) for r in runs],
            "median_peak_rss_mb": median([mb(r["peak_rss_bytes"]) for r in runs]),
            "polled_tree_peak_rss_mb": [mb(r["polled_tree_peak_rss_bytes"]) for r in runs],
            "root_hwm_mb": [mb(r["root_hwm_bytes"]) for r in runs]}
