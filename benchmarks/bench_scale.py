"""``python -m benchmarks.bench_scale``: labeling and indexing at scale, and our index next to autofaiss.

For each row count N (``--rows``, repeatable) the harness

1. **writes synthetic feature shards** in the real feature format (``features/shard-NNNNNN.parquet``
   with :func:`pipeline.core.schema.features_schema`, one zstd Parquet file per shard written atomically
   as ``zsl extract`` does, then the :class:`~pipeline.core.schema.FeaturesManifest`), shard by shard:
   non-negative, class-clustered 1280-d rows over many classes with a low-rank latent structure plus
   per-row noise (as :func:`benchmarks.bench._synthetic_features`); never all N rows in memory. One
   class set (synthetic 384-d text embeddings) and one ESZSL model (``semantics == "text"``) are
   made once and reused for every N;
2. **labels** them with the installed CLI (``zsl label``) in a subprocess, against a **bare** NumPy
   script in a subprocess too (read each shard's embedding column with pyarrow, ``l2n(X) @ V @ S.T``,
   ``np.argpartition`` top-k, no writing), interleaved (ABBA), with wall time and the peak RSS of the
   whole process tree (polled every ``--poll-ms``; the root process's own ``VmHWM`` too, whichever
   is larger);
3. **indexes** them with ``zsl index --max-memory`` in a subprocess (same timing and RSS polling) and
   reads its manifest (``factory``, ``index_bytes``, ``estimated_bytes``, ``seconds``, ``nprobe`` and,
   where present, ``search_params``, ``tuning``, ``timings``);
4. measures **recall@1/10/100 and latency** of that index independently: the database vectors are the
   feature shards projected by the model (``model.search_images``, as the index stage does), the
   queries 1,000 held-out rows of the same distribution projected the same way, the ground truth exact
   (blocked NumPy); single-query latency (one query per ``search`` call) and batched latency;
5. builds an **autofaiss** (2.18.0, its own venv, ``.venv-tools/autofaiss``) index of the same
   projected vectors in the same run, with the same wall-time and RSS measurement, and measures it
   exactly as ours (loaded in this venv with ``faiss.read_index``; same queries, same ground truth);
6. optionally (``--extract-images``, default 5000) measures **extraction steady state**: one
   ``run_extract`` (Ray already up) and the bare read/decode/encode loop on the same animal-mnist
   images; steady-state rates come from the shard files' mtimes (pipeline) and per-batch times (bare)
   after the first shard/batch, and the fixed costs (Ray start, actor start + model load) are
   reported separately.

Writes one JSON file atomically (default ``benchmarks/results/scale.json``), a markdown table
(``SCALE.md`` beside it) and prints the table. Scratch data lives in a temp dir outside the repo
(``$TMPDIR``), removed at the end unless ``--keep``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import typer

from benchmarks.bench import FEATURE_MODEL, RESULTS, TEXT_DIM, _interleaved, _machine, _median, _ratio, \
    _synthetic_features

LOG = logging.getLogger("zsl.bench_scale")
REPO = Path(__file__).resolve().parent.parent
AUTOFAISS_VERSION = "2.18.0"
AUTOFAISS_VENV = Path(__file__).resolve().parents[1] / ".venv-tools" / "autofaiss"  # made by `make tools`
AUTOFAISS_PINS = (f"autofaiss=={AUTOFAISS_VERSION}", "numpy<2", "pyarrow<17")
DIM = 1280
RECALL_KS = (1, 10, 100)
#: Goals of the scale issue.
GOALS = {"label_ratio_min": 0.8, "label_rss_growth_max": 1.3, "extract_steady_ratio_min": 0.9}
SUBPROCESS_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
                  "RAY_AUTH_MODE": "disabled"}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Labeling and indexing at scale (subprocesses, peak RSS), our index vs autofaiss.")


# -- processes: wall time and peak RSS of a process tree ------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
try:
    import psutil
except ImportError:  # not a dependency of the project: /proc is read instead (Linux)
    psutil = None


def _proc_children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            pass
    return out


def _proc_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss(pid: int) -> int:
    """Sum of the resident set sizes (bytes) of ``pid`` and all its descendants (0 if gone).

    psutil when it is importable, else ``/proc`` (Linux). Shared pages count once per process.
    """
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _proc_rss(p)
        todo.extend(_proc_children(p))
    return total


def _proc_hwm(pid: int) -> int:
    """``VmHWM`` (the peak RSS of ``pid`` since its last exec) in bytes; 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def self_rss() -> int:
    """This process's resident set size in bytes."""
    return _proc_rss(os.getpid()) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_measured(cmd: list[str], *, log: Path, env: dict | None = None, cwd: str | None = None,
                 poll_s: float = 0.05, what: str = "") -> dict:
    """Run ``cmd`` to completion; wall seconds and the peak RSS of its process tree.

    The main thread blocks in ``waitpid`` (exact end time); a thread polls every ``poll_s`` the summed
    RSS of the process tree and the root process's ``VmHWM`` (its own peak since exec, which also
    catches spikes between two polls). ``peak_rss_bytes`` is the larger of the two (both are lower
    bounds of the true tree peak). The kernel's ``ru_maxrss`` of a child is not used: on Linux it
    is carried over from the parent's memory at a vfork/exec, so it reads as this harness's size.
    Raises ``RuntimeError`` with the tail of the log when the command fails.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    peak = {"bytes": 0, "hwm": 0, "samples": 0}
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)

        def poll() -> None:
            while not stop.is_set():
                hwm = _proc_hwm(proc.pid)
                peak["bytes"] = max(peak["bytes"], tree_rss(proc.pid))
                peak["hwm"] = max(peak["hwm"], hwm)
                peak["samples"] += 1
                stop.wait(poll_s)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            _, status = os.waitpid(proc.pid, 0)
        except BaseException:
            try:
                os.killpg(proc.pid, 9)
            except OSError:
                pass
            stop.set()
            raise
        seconds = time.perf_counter() - t0
        stop.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{what or cmd[0]} exited with status {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return {"seconds": seconds, "peak_rss_bytes": max(peak["bytes"], peak["hwm"]),
            "polled_tree_peak_rss_bytes": peak["bytes"], "root_hwm_bytes": peak["hwm"], "rss_samples": peak["samples"]}


def _mb(b: float | None) -> float | None:
    return None if b is None else round(b / 2**20, 1)


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(SUBPROCESS_ENV)
    env["TMPDIR"] = str(tmp)
    env["ZSL_RAY_TMPDIR"] = env.get("ZSL_RAY_TMPDIR", os.path.join(tempfile.gettempdir(), "zsl-ray"))
    return env


def _zsl() -> list[str]:
    exe = Path(sys.executable).parent / "zsl"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from jobs.cli import run; run()"]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- data ----------------------------------------------------------------------------------------

class World:
    """The synthetic world every N draws from: class centres, text embeddings, the model."""

    def __init__(self, work: Path, *, n_classes: int, n_seen: int, latent_rank: int, noise: float,
                 train_per_class: int, shard_rows: int, seed: int) -> None:
        import numpy as np

        from pipeline.semantics.classset import load_class_set, write_class_set
        from pipeline.core.config import TrainConfig
        from pipeline.zsl.models import load_model
        from pipeline.zsl.models.base import l2n
        from pipeline.zsl.models.scoring import class_semantics
        from pipeline.stages.train import run_train

        t0 = time.perf_counter()
        self.seed, self.noise, self.shard_rows = seed, noise, shard_rows
        rng = np.random.default_rng([seed, 0])
        self.names = [f"class_{i:04d}" for i in range(n_classes)]
        Z = rng.standard_normal((n_classes, latent_rank)).astype(np.float32)
        B = rng.standard_normal((latent_rank, DIM)).astype(np.float32) / math.sqrt(latent_rank)
        self.centers = (np.maximum(Z @ B, 0.0) * 0.6).astype(np.float32)
        A = rng.standard_normal((latent_rank, TEXT_DIM)).astype(np.float32)
        text = l2n(Z @ A + 0.3 * rng.standard_normal((n_classes, TEXT_DIM)).astype(np.float32))
        self.classes_dir, self.model_dir = str(work / "classes"), str(work / "model")
        write_class_set(self.classes_dir, self.names, [None] * n_classes, text, None, {
            "source": "synthetic (benchmarks.bench_scale)", "text_model": "minilm", "text_model_name": "minilm",
            "pretrained": None, "templates": ["a photo of a {name}."], "text_dim": TEXT_DIM, "attribute_names": [],
            "attribute_normalization": "l2", "attribute_stats": None, "missing_attributes": "error",
            "missing_value": -1.0})
        seen = self.names[:n_seen]
        y_train = np.repeat(np.arange(n_seen), train_per_class)
        train_dir = work / "features-train"
        self.write_features(train_dir, y_train, rng, id_prefix="train")
        self.train_manifest = run_train(TrainConfig(features=str(train_dir), classes=self.classes_dir,
                                                    seen=tuple(seen), method="eszsl", semantics="text",
                                                    output=self.model_dir))
        shutil.rmtree(train_dir, ignore_errors=True)
        self.model, self.mman = load_model(self.model_dir, feature_dim=DIM, feature_model=FEATURE_MODEL)
        if self.mman.semantics != "text":
            raise RuntimeError(f"the model has semantics {self.mman.semantics!r}; text search needs 'text'")
        self.S = np.ascontiguousarray(class_semantics(self.mman, load_class_set(self.classes_dir)), np.float32)
        self.V = np.ascontiguousarray(self.model.V, np.float32)
        self.v_path, self.s_path = str(work / "bare_V.npy"), str(work / "bare_S.npy")
        np.save(self.v_path, self.V)
        np.save(self.s_path, self.S)
        self.prep_seconds = time.perf_counter() - t0

    def rows(self, rng, n: int):
        """``n`` fresh feature rows of the world's distribution and their class indices."""
        y = rng.integers(0, len(self.names), n)
        return _synthetic_features(rng, self.centers, y, noise=self.noise), y

    def write_features(self, out: Path, y, rng, *, id_prefix: str, on_shard=None) -> int:
        """A feature directory of ``len(y)`` rows of classes ``y`` (drawn from ``rng`` shard by shard)."""
        import numpy as np
        import pyarrow as pa

        from pipeline.core import fs as zio
        from pipeline.core.features import shard_name
        from pipeline.core.schema import FeaturesManifest, features_schema, write_manifest

        n = len(y)
        names = np.asarray(self.names, dtype=object)
        n_shards = max(1, -(-n // self.shard_rows))
        for sid in range(n_shards):
            s, e = sid * self.shard_rows, min(n, (sid + 1) * self.shard_rows)
            X = _synthetic_features(rng, self.centers, y[s:e], noise=self.noise)
            ids = [f"{id_prefix}/{i:09d}.png" for i in range(s, e)]
            table = pa.table({
                "image_id": ids, "uri": [f"synthetic://{i}" for i in ids], "label": names[y[s:e]].tolist(),
                "caption": pa.nulls(e - s, pa.string()), "width": pa.nulls(e - s, pa.int32()),
                "height": pa.nulls(e - s, pa.int32()), "url": pa.nulls(e - s, pa.string()),
                "key": pa.nulls(e - s, pa.string()), "meta": pa.nulls(e - s, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), pa.float32()), DIM),
            }, schema=features_schema(DIM))
            zio.write_parquet_atomic(zio.join(str(out), "features", shard_name(sid)), table)
            del table, ids
            if on_shard is not None:
                on_shard(sid, X)
            del X
        write_manifest(str(out), FeaturesManifest(
            model_id=FEATURE_MODEL, dim=DIM, n_images=int(n), n_errors=0, n_shards=n_shards,
            notes={"source": "synthetic (benchmarks.bench_scale)", "input": f"synthetic:{id_prefix}",
                   "seed": self.seed}))
        return n_shards

    def project(self, X):
        import numpy as np

        return np.ascontiguousarray(self.model.search_images(X), dtype=np.float32)


def make_scale_data(world: World, work: Path, n_rows: int) -> dict:
    """Feature shards of ``n_rows`` rows + their projected vectors as ``emb/part-NNN.npy``."""
    import numpy as np

    from pipeline.core.features import check_feature_shards, feature_shards, open_features

    feats, emb = work / "features", work / "emb"
    emb.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([world.seed, 1, n_rows])
    y = rng.integers(0, len(world.names), n_rows)
    proj_s = [0.0]

    def on_shard(sid: int, X) -> None:  # the values just written, exactly as read back (float32)
        t = time.perf_counter()
        np.save(emb / f"part-{sid:06d}.npy", world.project(X))
        proj_s[0] += time.perf_counter() - t

    t0 = time.perf_counter()
    n_shards = world.write_features(feats, y, rng, id_prefix=f"n{n_rows}", on_shard=on_shard)
    total = time.perf_counter() - t0
    man = open_features(str(feats))
    files = feature_shards(str(feats))
    check_feature_shards(files, man.dim)
    if man.n_images != n_rows or len(files) != n_shards:
        raise RuntimeError(f"{feats}: manifest says {man.n_images} rows / {len(files)} shards, expected "
                           f"{n_rows} / {n_shards}")
    return {"features_dir": str(feats), "emb_dir": str(emb), "n_shards": n_shards, "shard_files": files,
            "emb_files": sorted(str(p) for p in emb.glob("part-*.npy")),
            "write_seconds": round(total - proj_s[0], 2), "project_seconds": round(proj_s[0], 2),
            "feature_bytes_on_disk": _dir_bytes(feats), "emb_bytes_on_disk": _dir_bytes(emb)}


def exact_topk(Q, emb_files: list[str], k: int, *, block: int = 50_000):
    """Exact top-``k`` ids (by inner product, best first) of ``Q`` over the concatenated ``emb_files``."""
    import numpy as np

    nq = len(Q)
    best_s = np.empty((nq, 0), np.float32)
    best_i = np.empty((nq, 0), np.int64)
    offset = 0
    for f in emb_files:
        Z = np.load(f)
        for s in range(0, len(Z), block):
            sims = Q @ Z[s : s + block].T
            kk = min(k, sims.shape[1])
            part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
            cand_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], axis=1)
            cand_i = np.concatenate([best_i, part + offset + s], axis=1)
            if cand_s.shape[1] > k:
                keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
                cand_s, cand_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
            best_s, best_i = cand_s, cand_i
        offset += len(Z)
        del Z
    order = np.lexsort((best_i, -best_s), axis=1) if best_s.size else np.zeros_like(best_i)
    return np.take_along_axis(best_i, order, 1), np.take_along_axis(best_s, order, 1), offset


# -- labeling ------------------------------------------------------------------------------------

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
        m = run_measured([*_zsl(), "label", "--model", world.model_dir, "--features", data["features_dir"],
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

    _interleaved(repeats, pipeline_rep, bare_rep)

    def side(runs: list[dict]) -> dict:
        secs = [r["seconds"] for r in runs]
        rps = [n_rows / s for s in secs]
        inproc = [r["inprocess_seconds"] for r in runs]
        return {"seconds": secs, "rows_per_s": rps, "median_rows_per_s": _median(rps),
                "inprocess_seconds": inproc,
                "median_inprocess_rows_per_s": (_median([n_rows / s for s in inproc])
                                                if all(s for s in inproc) else None),
                "peak_rss_mb": [_mb(r["peak_rss_bytes"]) for r in runs],
                "median_peak_rss_mb": _median([_mb(r["peak_rss_bytes"]) for r in runs]),
                "polled_tree_peak_rss_mb": [_mb(r["polled_tree_peak_rss_bytes"]) for r in runs],
                "root_hwm_mb": [_mb(r["root_hwm_bytes"]) for r in runs]}

    p, b = side(p_runs), side(b_runs)
    return {"n_rows": n_rows, "repeats": repeats, "batch_size": batch, "top_k": top_k,
            "pipeline": p, "bare": b,
            "ratio": _ratio(p["median_rows_per_s"], b["median_rows_per_s"]),
            "ratio_inprocess": (_ratio(p["median_inprocess_rows_per_s"], b["median_inprocess_rows_per_s"])
                                if p["median_inprocess_rows_per_s"] and b["median_inprocess_rows_per_s"] else None)}


# -- indexes -------------------------------------------------------------------------------------

def _effective_params(index) -> dict:
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


def _apply_params(index, params: str | None) -> str | None:
    """``faiss.ParameterSpace().set_index_parameters``; returns an error string or None."""
    import faiss

    if not params:
        return None
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except Exception as exc:  # noqa: BLE001 - reported, the measurement goes on with the index as loaded
        return f"{type(exc).__name__}: {exc}"
    return None


def measure_recall(index, Q, gt_ids) -> dict:
    """Recall@1/10/100 of one batched search of all queries against the exact ids ``gt_ids``."""
    from pipeline.index.faiss_index import recall_at_k

    k = min(max(RECALL_KS), int(index.ntotal))
    _, ids = index.search(Q, k)
    return {f"recall_at_{r}": float(recall_at_k(ids[:, :r], gt_ids[:, :r])) for r in RECALL_KS if r <= k}


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
    t = time.perf_counter()
    index.search(Q, k)
    return {"single_s": single, "batched_s": time.perf_counter() - t, "latency_k": lk, "batched_k": k}


def latency_summary(rounds: list[dict], n_queries: int) -> dict:
    import numpy as np

    ms = np.concatenate([np.asarray(r["single_s"]) for r in rounds]) * 1e3
    batched = [r["batched_s"] for r in rounds]
    return {"single_query_mean_ms": float(ms.mean()), "single_query_p50_ms": float(np.median(ms)),
            "single_query_p99_ms": float(np.percentile(ms, 99)), "single_queries": len(rounds[0]["single_s"]),
            "latency_rounds": len(rounds), "latency_k": rounds[0]["latency_k"],
            "batched_ms_per_query": float(_median(batched) / n_queries * 1e3), "batched_queries": n_queries,
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
    from pipeline.core.config import parse_memory
    from pipeline.index.faiss_index import load_index

    out = work / "index-ours"
    shutil.rmtree(out, ignore_errors=True)
    m = run_measured([*_zsl(), "index", "--features", data["features_dir"], "--model", world.model_dir,
                      "--output", str(out), "--max-memory", max_memory],
                     log=work / "logs" / "index.log", env=env, cwd=str(work), poll_s=poll_s, what="zsl index")
    man = json.loads((out / "manifest.json").read_text())
    timings = man.get("timings") or {}
    project_s = timings.get("project_s") if isinstance(timings, dict) else None
    gc.collect()
    rss0 = self_rss()
    t = time.perf_counter()
    index, _ids, _ = load_index(str(out))
    load_s = time.perf_counter() - t
    del _ids
    gc.collect()
    rss_delta = self_rss() - rss0
    params_error = _apply_params(index, man.get("search_params"))
    res = {
        "factory": man.get("factory"), "search_params": man.get("search_params"), "nprobe": man.get("nprobe"),
        "effective_params": _effective_params(index), "search_params_error": params_error,
        "tuning": man.get("tuning"), "timings": man.get("timings"),
        "build_seconds": m["seconds"], "manifest_seconds": man.get("seconds"),
        "build_seconds_minus_projection": (m["seconds"] - project_s) if project_s is not None else None,
        "peak_rss_mb": _mb(m["peak_rss_bytes"]), "polled_tree_peak_rss_mb": _mb(m["polled_tree_peak_rss_bytes"]),
        "root_hwm_mb": _mb(m["root_hwm_bytes"]),
        "index_file_bytes": (out / "index.faiss").stat().st_size + sum((man.get("data_files") or {}).values()),
        "data_files": man.get("data_files"), "index_bytes": man.get("index_bytes"),
        "load": "pipeline.index.faiss_index.load_index(dir) with its defaults (memory-mapped where the index type allows)",
        "estimated_bytes": man.get("estimated_bytes"),
        "estimated_over_file": _ratio(man["estimated_bytes"], (out / "index.faiss").stat().st_size)
        if man.get("estimated_bytes") else None,
        "max_memory_bytes": parse_memory(max_memory),
        "load_seconds": load_s, "loaded_rss_delta_mb": _mb(rss_delta), "ntotal": int(index.ntotal),
    }
    res["within_budget"] = res["index_file_bytes"] <= res["max_memory_bytes"]
    res.update(measure_recall(index, Q, gt_ids))
    return res, index


def repo_relative(obj):
    """``obj`` with paths inside the repository written relative to it (results are committed; the
    machine's checkout path means nothing elsewhere)."""
    if isinstance(obj, dict):
        return {k: repo_relative(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [repo_relative(v) for v in obj]
    if isinstance(obj, str) and obj.startswith(f"{REPO}/"):
        return obj[len(f"{REPO}/"):]
    return obj


def ensure_autofaiss(venv: Path, *, log: Path) -> dict:
    """autofaiss ``AUTOFAISS_VERSION`` in its own venv: reused when it imports, else (re)created."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import importlib.metadata as m, faiss, autofaiss, numpy; "
             "print(m.version('autofaiss'), faiss.__version__, numpy.__version__)"]

    def check() -> list[str] | None:
        if not py.exists():
            return None
        r = subprocess.run(probe, capture_output=True, text=True)
        parts = r.stdout.split()
        return parts if r.returncode == 0 and parts and parts[0] == AUTOFAISS_VERSION else None

    t0 = time.perf_counter()
    found = check()
    created = False
    if found is None:
        LOG.info("creating %s with %s (pip, a minute or so)", venv, " ".join(AUTOFAISS_PINS))
        shutil.rmtree(venv, ignore_errors=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as fh:
            for cmd in ([sys.executable, "-m", "venv", str(venv)],
                        [str(venv / "bin" / "pip"), "install", "--quiet", *AUTOFAISS_PINS]):
                r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
                if r.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed (status {r.returncode}); see {log}:\n"
                                       f"{log.read_text(errors='replace')[-2000:]}")
        found = check()
        created = True
        if found is None:
            raise RuntimeError(f"{venv}: autofaiss {AUTOFAISS_VERSION} does not import after installing it")
    return {"venv": str(venv), "autofaiss": found[0], "faiss": found[1], "numpy": found[2], "created": created,
            "seconds": round(time.perf_counter() - t0, 1), "pins": list(AUTOFAISS_PINS)}


def autofaiss_command(venv: Path, emb_dir: str, out: Path, *, max_memory: str, memory_available: str) -> list[str]:
    return [str(venv / "bin" / "autofaiss"), "build_index", f"--embeddings={emb_dir}",
            f"--index_path={out / 'knn.index'}", f"--index_infos_path={out / 'infos.json'}", "--metric_type=ip",
            f"--max_index_memory_usage={max_memory}", f"--current_memory_available={memory_available}"]


def autofaiss_timings(log: str) -> dict:
    """Seconds of autofaiss's top-level steps, from its ``>>> Finished "STEP" in N secs`` log lines."""
    out: dict = {}
    for m in re.finditer(r'>>> Finished "([^"]+)" in ([0-9.]+) secs', log):
        name = re.sub(r" /\S+", "", m.group(1)).strip(" ->")  # drop paths ("... for index /tmp/...")
        out[name] = out.get(name, 0.0) + float(m.group(2))
    return out


def bench_autofaiss(venv: Path, data: dict, work: Path, Q, gt_ids, *, max_memory: str, memory_available: str,
                    env: dict, poll_s: float) -> tuple[dict, object]:
    """``autofaiss build_index`` of the projected vectors (wall time, peak RSS), load time and recall."""
    import faiss

    from pipeline.core.config import parse_memory

    out = work / "index-autofaiss"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = autofaiss_command(venv, data["emb_dir"], out, max_memory=max_memory, memory_available=memory_available)
    m = run_measured(cmd, log=work / "logs" / "autofaiss.log", env=env, cwd=str(out), poll_s=poll_s,
                     what="autofaiss build_index")
    infos = json.loads((out / "infos.json").read_text()) if (out / "infos.json").exists() else {}
    timings = autofaiss_timings((work / "logs" / "autofaiss.log").read_text(errors="replace"))
    gc.collect()
    rss0 = self_rss()
    t = time.perf_counter()
    index = faiss.read_index(str(out / "knn.index"))
    load_s = time.perf_counter() - t
    gc.collect()
    rss_delta = self_rss() - rss0
    params = infos.get("index_param")
    params_error = _apply_params(index, params)
    res = {
        "factory": infos.get("index_key"), "search_params": params, "effective_params": _effective_params(index),
        "search_params_error": params_error, "infos": infos, "command": cmd, "timings": timings,
        "build_seconds": m["seconds"], "peak_rss_mb": _mb(m["peak_rss_bytes"]),
        "polled_tree_peak_rss_mb": _mb(m["polled_tree_peak_rss_bytes"]),
        "root_hwm_mb": _mb(m["root_hwm_bytes"]),
        "index_file_bytes": (out / "knn.index").stat().st_size, "max_memory_bytes": parse_memory(max_memory),
        "load_seconds": load_s, "loaded_rss_delta_mb": _mb(rss_delta), "ntotal": int(index.ntotal),
        "load": "faiss.read_index(path) (read into memory)",
    }
    metrics_s = timings.get("Compute fast metrics")
    res["build_seconds_minus_fast_metrics"] = m["seconds"] - metrics_s if metrics_s is not None else None
    res["within_budget"] = res["index_file_bytes"] <= res["max_memory_bytes"]
    if index.ntotal != data["n_rows"]:
        raise RuntimeError(f"autofaiss index holds {index.ntotal} vectors, expected {data['n_rows']}")
    res.update(measure_recall(index, Q, gt_ids))
    return res, index


# -- extraction steady state ---------------------------------------------------------------------

def _steady(times: list[float], counts: list[int]) -> float | None:
    """Rate over the units after the first: ``sum(counts[1:]) / (times[-1] - times[0])``."""
    if len(times) < 3 or times[-1] <= times[0]:
        return None
    return sum(counts[1:]) / (times[-1] - times[0])


def bench_extract_steady(work: Path, *, n_images: int, shard_size: int, batch_size: int, repeats: int) -> dict:
    import numpy as np
    import ray
    import torch

    from pipeline.core import fs as zio
    from pipeline.core.config import ExtractConfig
    from pipeline.inputs.demo_data import ANIMAL_MNIST_CLASSES, write_demo_data
    from pipeline.encoders.models import image_encoder_info, load_image_encoder
    from pipeline.core.features import load_features
    from pipeline.inputs.images import decode_image
    from pipeline.cluster.session import init_ray
    from pipeline.cluster.extraction import plan_resources
    from pipeline.inputs.shards import list_shards
    from pipeline.stages.extract import run_extract

    per_class = -(-n_images // len(ANIMAL_MNIST_CLASSES))
    data = work / "images"
    info = write_demo_data(str(data), per_class=per_class)
    src = str(data / "train")
    files = [f for s in list_shards(src, input_format="folder", shard_size=shard_size) for f in s.members]
    n = len(files)
    LOG.info("extraction steady state: %d images, shard_size %d, batch %d, %d repeat(s)", n, shard_size,
             batch_size, repeats)
    started = not ray.is_initialized()
    t = time.perf_counter()
    init_ray()
    ray_init_s = time.perf_counter() - t
    try:
        res = ray.cluster_resources()
        plan = plan_resources(cpus=res.get("CPU", 1), gpus=res.get("GPU", 0), num_actors=None, device="auto")
        info_enc = image_encoder_info(FEATURE_MODEL)

        def cfg(r: int) -> ExtractConfig:
            return ExtractConfig(input=src, output=str(work / f"extract-r{r}"), input_format="folder",
                                 encoder=FEATURE_MODEL, shard_size=shard_size, batch_size=batch_size)

        max_pixels = cfg(0).max_image_pixels
        t = time.perf_counter()
        encoder = load_image_encoder(FEATURE_MODEL, device=plan.device)
        load_s = time.perf_counter() - t
        prev_threads = torch.get_num_threads()
        p_runs: list[dict] = []
        b_runs: list[dict] = []
        bare_X: dict = {}

        def pipeline_rep(r: int) -> float:
            c = cfg(r)
            shutil.rmtree(c.output, ignore_errors=True)
            wall0, t0 = time.time(), time.perf_counter()
            man = run_extract(c, progress=False)
            total = time.perf_counter() - t0
            if man.n_images != n or man.n_errors:
                raise RuntimeError(f"run_extract: {man.n_images} images, {man.n_errors} errors (expected {n}, 0)")
            shards = sorted(Path(c.output, "features").glob("shard-*.parquet"), key=lambda p: p.stat().st_mtime)
            times = [p.stat().st_mtime - wall0 for p in shards]
            counts = [zio.parquet_num_rows(str(p)) for p in shards]
            rate = _steady(times, counts)
            p_runs.append({"seconds": total, "first_shard_s": times[0] if times else None, "steady_images_per_s": rate,
                           "fixed_s": (total - n / rate) if rate else None, "n_shards": len(shards),
                           "resources": man.resources})
            if r == repeats - 1:
                bare_X["pipeline"] = c.output
            else:
                shutil.rmtree(c.output, ignore_errors=True)
            return total

        def bare_rep(r: int) -> float:
            from pipeline.core import fs as zio_

            torch.set_num_threads(plan.threads)
            stamps, counts, out, batch = [], [], [], []
            t0 = time.perf_counter()
            try:
                for uri in files:
                    px, _, _ = decode_image(zio_.read_bytes(uri), size=info_enc.image_size, max_pixels=max_pixels)
                    batch.append(px)
                    if len(batch) == batch_size:
                        out.append(encoder.encode(np.stack(batch)))
                        stamps.append(time.perf_counter() - t0)
                        counts.append(len(batch))
                        batch = []
                if batch:
                    out.append(encoder.encode(np.stack(batch)))
                    stamps.append(time.perf_counter() - t0)
                    counts.append(len(batch))
            finally:
                torch.set_num_threads(prev_threads)
            total = time.perf_counter() - t0
            rate = _steady(stamps, counts)
            b_runs.append({"seconds": total, "first_batch_s": stamps[0] if stamps else None,
                           "steady_images_per_s": rate, "fixed_s": (total - n / rate) if rate else None,
                           "n_batches": len(stamps)})
            bare_X["X"] = np.concatenate(out)
            return total

        _interleaved(repeats, pipeline_rep, bare_rep)
        feats = load_features(bare_X["pipeline"])
        pos = {u: i for i, u in enumerate(feats.uris)}
        diff = float(np.abs(feats.X[[pos[u] for u in files]] - bare_X["X"]).max())
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(data, ignore_errors=True)

    def summary(runs: list[dict], unit: str) -> dict:
        steady = [r["steady_images_per_s"] for r in runs if r["steady_images_per_s"]]
        fixed = [r["fixed_s"] for r in runs if r["fixed_s"] is not None]
        return {"runs": runs, "median_seconds": _median([r["seconds"] for r in runs]),
                "median_images_per_s": _median([n / r["seconds"] for r in runs]),
                "median_steady_images_per_s": _median(steady) if steady else None,
                "median_fixed_s": _median(fixed) if fixed else None, "steady_state_from": unit}

    p = summary(p_runs, "feature shard files' mtimes, shards after the first")
    b = summary(b_runs, "per-batch completion times, batches after the first")
    return {
        "n_images": n, "shard_size": shard_size, "batch_size": batch_size, "repeats": repeats,
        "pipeline": p, "bare": b,
        "ratio_steady": (_ratio(p["median_steady_images_per_s"], b["median_steady_images_per_s"])
                         if p["median_steady_images_per_s"] and b["median_steady_images_per_s"] else None),
        "ratio_total": _ratio(p["median_images_per_s"], b["median_images_per_s"]),
        "fixed_costs_s": {"ray_init": ray_init_s, "pipeline_actor_start_model_load_and_ramp": p["median_fixed_s"],
                          "bare_encoder_load": load_s, "bare_ramp": b["median_fixed_s"]},
        "ray_was_already_running": not started,
        "torch_threads": {"pipeline_actor": plan.threads, "bare_loop": plan.threads},
        "embeddings_max_abs_diff_pipeline_vs_bare": diff,
        "notes": ("run_extract with Ray already up (Ray start-up is ray_init, once); the pipeline's fixed cost is "
                  "its total minus n_images / steady rate (actor start, model load, pipeline ramp-up and the "
                  "tail); the bare loop's encoder is loaded once outside its timed region (bare_encoder_load)."),
    }


# -- report --------------------------------------------------------------------------------------

def _fmt(v, spec: str = ".3g", none: str = "—") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    return str(v)


def rss_growth(scales: list[dict]) -> dict:
    """Peak-RSS ratios, largest N over smallest N, for every side that has both."""
    if len(scales) < 2:
        return {}
    lo, hi = min(scales, key=lambda s: s["n_rows"]), max(scales, key=lambda s: s["n_rows"])
    out = {"n_small": lo["n_rows"], "n_large": hi["n_rows"], "rows_ratio": hi["n_rows"] / lo["n_rows"]}
    out["label_pipeline"] = _ratio(hi["label"]["pipeline"]["median_peak_rss_mb"],
                                   lo["label"]["pipeline"]["median_peak_rss_mb"])
    out["label_bare"] = _ratio(hi["label"]["bare"]["median_peak_rss_mb"], lo["label"]["bare"]["median_peak_rss_mb"])
    out["index_ours"] = _ratio(hi["index"]["ours"]["peak_rss_mb"], lo["index"]["ours"]["peak_rss_mb"])
    if hi["index"].get("autofaiss") and lo["index"].get("autofaiss"):
        out["index_autofaiss"] = _ratio(hi["index"]["autofaiss"]["peak_rss_mb"], lo["index"]["autofaiss"]["peak_rss_mb"])
    return out


def interpretation(result: dict) -> str:
    parts = []
    for s in result["scales"]:
        lb, ix = s["label"], s["index"]
        ok = lb["ratio"] >= GOALS["label_ratio_min"]
        parts.append(f"N={s['n_rows']:,}: zsl label ran at {lb['ratio']:.2f}x the bare script "
                     f"({lb['pipeline']['median_rows_per_s']:,.0f} vs {lb['bare']['median_rows_per_s']:,.0f} rows/s, "
                     f"goal >= {GOALS['label_ratio_min']}: {'met' if ok else 'MISSED'}), peak RSS "
                     f"{lb['pipeline']['median_peak_rss_mb']:,.0f} vs {lb['bare']['median_peak_rss_mb']:,.0f} MB.")
        o, a = ix["ours"], ix.get("autofaiss")
        txt = (f"Our index ({o['factory']}, {o.get('search_params') or 'no search params'}) built in "
               f"{o['build_seconds']:.1f}s, peak RSS {o['peak_rss_mb']:,.0f} MB, recall@10 {o.get('recall_at_10', 0):.3f}, "
               f"single query {o['single_query_mean_ms']:.2f} ms mean / {o['single_query_p99_ms']:.2f} ms p99")
        if a:
            txt += (f"; autofaiss ({a['factory']}, {a.get('search_params')}) built in {a['build_seconds']:.1f}s "
                    f"from pre-projected vectors, peak RSS {a['peak_rss_mb']:,.0f} MB, recall@10 "
                    f"{a.get('recall_at_10', 0):.3f}, single query {a['single_query_mean_ms']:.2f} ms mean / "
                    f"{a['single_query_p99_ms']:.2f} ms p99")
        parts.append(txt + ".")
    g = result.get("rss_growth") or {}
    if g.get("label_pipeline") is not None:
        ok = g["label_pipeline"] <= GOALS["label_rss_growth_max"]
        parts.append(f"zsl label peak RSS grew {g['label_pipeline']:.2f}x from N={g['n_small']:,} to "
                     f"N={g['n_large']:,} ({g['rows_ratio']:.3g}x the rows; goal <= {GOALS['label_rss_growth_max']}: "
                     f"{'met' if ok else 'MISSED'}).")
        if g["n_small"] < result["parameters"]["shard_rows"]:
            parts.append(f"(At N={g['n_small']:,} the shards hold fewer than --shard-rows "
                         f"{result['parameters']['shard_rows']:,} rows, so this growth also measures the shard size, "
                         f"which bounds the memory of a streaming job; compare Ns with full shards.)")
    ex = result.get("extraction")
    if ex:
        r = ex.get("ratio_steady")
        if r is None:
            parts.append("Extraction: too few shards/batches for a steady-state rate.")
        else:
            ok = r >= GOALS["extract_steady_ratio_min"]
            fc = ex["fixed_costs_s"]
            parts.append(f"Extraction steady state ({ex['n_images']:,} images): the pipeline ran at {r:.2f}x the bare "
                         f"loop ({ex['pipeline']['median_steady_images_per_s']:.1f} vs "
                         f"{ex['bare']['median_steady_images_per_s']:.1f} images/s; goal >= "
                         f"{GOALS['extract_steady_ratio_min']}: {'met' if ok else 'MISSED'}); fixed costs: Ray start "
                         f"{fc['ray_init']:.1f}s, actor start + model load + ramp "
                         f"{_fmt(fc['pipeline_actor_start_model_load_and_ramp'], '.1f')}s per run "
                         f"(bare encoder load {fc['bare_encoder_load']:.1f}s); overall {ex['ratio_total']:.2f}x.")
    return " ".join(parts)


def markdown(result: dict) -> str:
    p = result["parameters"]
    lines = [
        "# Scale benchmark: `zsl label` / `zsl index` vs bare loops and autofaiss",
        "",
        f"Generated by `python -m benchmarks.bench_scale` on {result['date']} "
        f"({result['machine']['cpu_count']} CPUs, {result['machine']['platform']}); "
        f"{p['classes']} classes, {DIM}-d features, {p['shard_rows']:,} rows per shard, index budget "
        f"`--max-memory {p['max_memory']}`, {p['queries']:,} held-out queries. Nothing here is typed by hand.",
        "",
        "## Labeling (subprocesses; medians over interleaved repeats)",
        "",
        f"| rows | repeats | `zsl label` rows/s | bare rows/s | ratio (goal ≥ {GOALS['label_ratio_min']}) | "
        "ratio in-process | `zsl label` peak RSS MB | bare peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result["scales"]:
        lb = s["label"]
        lines.append(f"| {s['n_rows']:,} | {lb['repeats']} | {lb['pipeline']['median_rows_per_s']:,.0f} | "
                     f"{lb['bare']['median_rows_per_s']:,.0f} | {lb['ratio']:.3f} | {_fmt(lb['ratio_inprocess'], '.3f')} | "
                     f"{lb['pipeline']['median_peak_rss_mb']:,.0f} | {lb['bare']['median_peak_rss_mb']:,.0f} |")
    g = result.get("rss_growth") or {}
    if g:
        lines += ["", f"Peak-RSS growth from {g['n_small']:,} to {g['n_large']:,} rows: `zsl label` "
                      f"{_fmt(g.get('label_pipeline'), '.2f')}x (goal ≤ {GOALS['label_rss_growth_max']}), bare "
                      f"{_fmt(g.get('label_bare'), '.2f')}x, `zsl index` {_fmt(g.get('index_ours'), '.2f')}x, autofaiss "
                      f"{_fmt(g.get('index_autofaiss'), '.2f')}x."]
    lines += ["", "## Index: ours (`zsl index`) vs autofaiss, same vectors, same queries, exact ground truth", ""]
    for s in result["scales"]:
        o, a = s["index"]["ours"], s["index"].get("autofaiss") or {}
        rows = [
            ("index (factory / key)", f"`{o.get('factory')}`", f"`{a['factory']}`" if a else "—"),
            ("search params", f"`{o.get('search_params')}`" if o.get("search_params") else "—",
             f"`{a['search_params']}`" if a.get("search_params") else "—"),
            ("effective params", json.dumps(o.get("effective_params")), json.dumps(a["effective_params"]) if a else "—"),
            ("build s (total)", _fmt(o["build_seconds"], ".1f"), _fmt(a.get("build_seconds"), ".1f")),
            ("build s minus projection (ours) / minus its fast-metrics step (autofaiss)",
             _fmt(o.get("build_seconds_minus_projection"), ".1f"), _fmt(a.get("build_seconds_minus_fast_metrics"), ".1f")),
            ("build peak RSS MB", _fmt(o["peak_rss_mb"], ",.0f"), _fmt(a.get("peak_rss_mb"), ",.0f")),
            ("index file MB", _fmt(o["index_file_bytes"] / 2**20, ",.1f"),
             _fmt(a["index_file_bytes"] / 2**20, ",.1f") if a else "—"),
            ("estimated MB (ours) / file", f"{_fmt((o.get('estimated_bytes') or 0) / 2**20, ',.1f')} "
             f"({_fmt(o.get('estimated_over_file'), '.2f')}x)", "—"),
            ("load s", _fmt(o["load_seconds"], ".3f"), _fmt(a.get("load_seconds"), ".3f")),
            *[(f"recall@{k}", _fmt(o.get(f"recall_at_{k}"), ".4f"), _fmt(a.get(f"recall_at_{k}"), ".4f"))
              for k in RECALL_KS],
            (f"single query mean ms (k={o['latency_k']})", _fmt(o["single_query_mean_ms"], ".3f"),
             _fmt(a.get("single_query_mean_ms"), ".3f")),
            ("single query p99 ms", _fmt(o["single_query_p99_ms"], ".3f"), _fmt(a.get("single_query_p99_ms"), ".3f")),
            (f"batched ms/query ({o['batched_queries']} queries, k={o['batched_k']})",
             _fmt(o["batched_ms_per_query"], ".4f"), _fmt(a.get("batched_ms_per_query"), ".4f")),
        ]
        def stages(t, keep=None) -> str:
            if not isinstance(t, dict) or not t:
                return "—"
            return ", ".join(f"{k} {_fmt(v, '.1f')}" for k, v in t.items() if isinstance(v, (int, float))
                             and (keep is None or any(w in k.lower() for w in keep))) or "—"

        # autofaiss logs nested steps; show the ones that take time and do not overlap
        rows.append(("stage timings s", stages(o.get("timings")),
                     stages(a.get("timings"), ("train", "hyperparameters", "fast metrics", "whole pipeline"))))
        if isinstance(o.get("tuning"), dict):
            rows.append(("tuning (ours, from its manifest)", ", ".join(
                f"{k} {_fmt(v, '.3g')}" for k, v in o["tuning"].items()
                if v not in (None, "") and not isinstance(v, (dict, list))), "—"))
        if o.get("loadavg_before"):
            rows.append(("1-min load average before → after the latency rounds",
                         f"{o['loadavg_before'][0]:.1f} → {o['loadavg_after'][0]:.1f}", "(the same rounds)" if a else "—"))
        lines += [f"### {s['n_rows']:,} rows ({s['data']['n_shards']} shards)", "",
                  "| | ours | autofaiss |", "|---|---:|---:|", *[f"| {a_} | {b_} | {c_} |" for a_, b_, c_ in rows], ""]
    ex = result.get("extraction")
    if ex:
        fc = ex["fixed_costs_s"]
        lines += [
            f"## Extraction steady state ({ex['n_images']:,} animal-mnist images, shard size {ex['shard_size']}, "
            f"batch {ex['batch_size']})", "",
            "| | pipeline (`run_extract`, Ray up) | bare loop |", "|---|---:|---:|",
            f"| images/s, steady state | {_fmt(ex['pipeline']['median_steady_images_per_s'], '.1f')} | "
            f"{_fmt(ex['bare']['median_steady_images_per_s'], '.1f')} |",
            f"| images/s, whole run | {ex['pipeline']['median_images_per_s']:.1f} | {ex['bare']['median_images_per_s']:.1f} |",
            f"| fixed costs s | actor start + model load + ramp {_fmt(fc['pipeline_actor_start_model_load_and_ramp'], '.1f')}; "
            f"Ray start {fc['ray_init']:.1f} (once) | encoder load {fc['bare_encoder_load']:.1f}; ramp "
            f"{_fmt(fc['bare_ramp'], '.1f')} |",
            f"| ratio steady (goal ≥ {GOALS['extract_steady_ratio_min']}) | {_fmt(ex['ratio_steady'], '.3f')} | |",
            f"| ratio whole run | {ex['ratio_total']:.3f} | |", ""]
    lines += ["## Interpretation", "", result["interpretation"], "", "## Notes", "",
              *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(lines)


NOTES = [
    "Feature rows are synthetic (non-negative, class-clustered, low-rank class structure plus per-row noise), "
    "written in the real shard format; the model is ESZSL trained on them (semantics text).",
    "Labeling: both sides are subprocesses timed from spawn to exit (interpreter start and imports included); "
    "'in-process' uses the labels manifest's seconds_last_run vs the bare script's own timing of its loop. "
    "The bare script computes (l2n(X) @ V) @ S.T with np.argpartition top-k in batches of LabelConfig.batch_size, "
    "writes nothing and applies no calibration.",
    "Peak RSS: the larger of the polled sum of RSS over the process tree (every --poll-ms) and the root "
    "process's VmHWM (its own peak, which also catches spikes between polls).",
    "Index build: our total runs zsl index on the feature shards, so it includes projecting them with the "
    "model; 'minus projection' subtracts the manifest's timings.project_s when the manifest has it. autofaiss "
    "gets the pre-projected vectors (emb/part-*.npy, float32) and never pays for the projection; its total "
    "includes its own hyper-parameter search (efSearch/nprobe to fit --max_index_query_time_ms, default 10 ms) "
    "and a 'Compute fast metrics' step (its own latency/recall report), which 'minus fast metrics' removes.",
    "Recall: exact top-100 by brute force over the same projected vectors; both indexes are searched with the "
    "same 1,000 held-out queries (new rows of the same distribution, projected the same way) in this process; "
    "recall@k = |approx top-k ∩ exact top-k| / k. Our index is loaded with pipeline.index.faiss_index.load_index and "
    "its manifest's search_params (if any) applied with faiss.ParameterSpace; autofaiss's with faiss.read_index "
    "and its infos.json index_param (load times differ in kind: load_index memory-maps where it can, "
    "read_index reads the whole file; 'index file MB' of ours includes its data_files). faiss threads at their default. Latency is measured after both indexes "
    "are built, in --latency-rounds rounds interleaved between them (ours, autofaiss, autofaiss, ours): a "
    "round is one query per search call (after a 10-query warm-up) for --single-queries queries, then one "
    "batched call with all queries at k=100; mean/p99 over all rounds' single queries, batched = median. On a "
    "loaded 2-core machine OpenMP makes single-query latency of exhaustive (Flat) search swing by 10x; the "
    "load average around the measurement is recorded.",
]


# -- entry point ---------------------------------------------------------------------------------

@app.command()
def scale(
    rows: list[int] = typer.Option([100_000, 1_000_000], "--rows", help="Row counts to run (repeatable)."),
    output: str = typer.Option(str(RESULTS / "scale.json"), help="JSON file to write (atomically)."),
    markdown_out: str | None = typer.Option(None, "--markdown", help="Markdown table (default: SCALE.md beside --output)."),
    max_memory: str = typer.Option("2G", help="Index memory budget for zsl index and autofaiss."),
    shard_rows: int = typer.Option(100_000, min=1, help="Rows per feature shard."),
    classes: int = typer.Option(1000, min=3, help="Classes in the class set."),
    seen: int | None = typer.Option(None, help="Seen (training) classes; default 80% of the classes."),
    train_per_class: int = typer.Option(30, min=2, help="Training rows per seen class."),
    latent_rank: int = typer.Option(32, min=1, help="Rank of the synthetic class structure."),
    noise: float = typer.Option(0.5, min=0.0, help="Per-dimension noise of the synthetic rows."),
    top_k: int = typer.Option(5, min=1, help="top-k of the labeling runs."),
    repeats: int | None = typer.Option(None, min=1, help="Labeling repeats per side (default 3 up to 100k rows, else 1)."),
    queries: int = typer.Option(1000, min=1, help="Held-out queries for recall and batched latency."),
    single_queries: int = typer.Option(200, min=1, help="Queries timed one per search call."),
    latency_k: int = typer.Option(10, min=1, help="k of the single-query latency searches."),
    latency_rounds: int = typer.Option(2, min=1, help="Latency rounds per index, interleaved between the indexes."),
    autofaiss: bool = typer.Option(True, "--autofaiss/--no-autofaiss", help="Build and measure an autofaiss index too."),
    autofaiss_venv: str = typer.Option(str(AUTOFAISS_VENV), help="autofaiss's own venv (created if missing)."),
    autofaiss_memory_available: str = typer.Option("8G", help="autofaiss --current_memory_available."),
    extract_images: int = typer.Option(5000, min=0, max=5000, help="Images for the extraction steady-state run (0: skip)."),
    extract_shard_size: int = typer.Option(250, min=1, help="Images per extraction shard."),
    extract_batch_size: int = typer.Option(64, min=1, help="Images per encoder batch."),
    extract_repeats: int = typer.Option(1, min=1, help="Extraction repeats per side."),
    poll_ms: float = typer.Option(50.0, min=1.0, help="RSS polling interval."),
    workdir: str | None = typer.Option(None, help="Scratch folder (default: a new dir under $TMPDIR)."),
    keep: bool = typer.Option(False, help="Keep the scratch folder."),
    seed: int = typer.Option(0),
) -> None:
    """Label and index N synthetic rows per --rows; compare with bare loops and autofaiss; write JSON + markdown."""
    import numpy as np

    from pipeline.core import fs as zio

    n_seen = seen if seen is not None else max(2, round(0.8 * classes))
    if not 2 <= n_seen < classes:
        raise typer.BadParameter(f"--seen must be in [2, {classes - 1}]")
    if top_k > classes:
        raise typer.BadParameter("--top-k must not exceed --classes")
    row_counts = sorted(set(rows))
    params = dict(rows=row_counts, max_memory=max_memory, shard_rows=shard_rows, classes=classes, seen=n_seen,
                  train_per_class=train_per_class, latent_rank=latent_rank, noise=noise, top_k=top_k,
                  repeats=repeats, queries=queries, single_queries=single_queries, latency_k=latency_k,
                  latency_rounds=latency_rounds,
                  autofaiss=autofaiss, autofaiss_memory_available=autofaiss_memory_available,
                  extract_images=extract_images, extract_shard_size=extract_shard_size,
                  extract_batch_size=extract_batch_size, extract_repeats=extract_repeats, poll_ms=poll_ms, seed=seed,
                  encoder=FEATURE_MODEL, dim=DIM)
    md_path = markdown_out or str(Path(output).with_name("SCALE.md"))
    t_start = time.perf_counter()
    result: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "machine": _machine(), "parameters": params, "goals": GOALS, "extraction": None,
                    "autofaiss_env": None, "scales": []}
    result["machine"]["rss_polling"] = "psutil" if psutil is not None else "/proc (psutil is not installed)"
    own_work = workdir is None
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="zsl-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    env = _env(tmp)
    poll_s = poll_ms / 1000.0
    try:
        if extract_images:
            result["extraction"] = bench_extract_steady(work / "extract", n_images=extract_images,
                                                        shard_size=extract_shard_size, batch_size=extract_batch_size,
                                                        repeats=extract_repeats)
        venv = Path(autofaiss_venv)
        if autofaiss:
            result["autofaiss_env"] = ensure_autofaiss(venv, log=work / "logs" / "autofaiss-venv.log")
        LOG.info("preparing the class set and the ESZSL model (%d classes, %d seen)", classes, n_seen)
        world = World(work / "shared", n_classes=classes, n_seen=n_seen, latent_rank=latent_rank, noise=noise,
                      train_per_class=train_per_class, shard_rows=shard_rows, seed=seed)
        qX, _ = world.rows(np.random.default_rng([seed, 2]), queries)
        Q = world.project(qX)
        result["model"] = {"method": world.train_manifest.method, "semantics": world.mman.semantics,
                           "gamma": float(world.train_manifest.gamma), "n_train": world.train_manifest.n_train,
                           "semantic_dim": world.mman.semantic_dim, "prep_seconds": round(world.prep_seconds, 1)}
        for n in row_counts:
            nwork = work / f"n{n}"
            reps = repeats or (3 if n <= 100_000 else 1)
            LOG.info("N=%d: writing %d feature shards", n, -(-n // shard_rows))
            data = make_scale_data(world, nwork, n)
            data["n_rows"] = n
            t = time.perf_counter()
            gt_ids, _, n_db = exact_topk(Q, data["emb_files"], max(RECALL_KS))
            gt_s = time.perf_counter() - t
            if n_db != n:
                raise RuntimeError(f"{n_db} projected vectors for {n} rows")
            LOG.info("N=%d: labeling (%d repeat(s) per side)", n, reps)
            label = bench_label_scale(world, data, nwork, n_rows=n, repeats=reps, top_k=top_k, env=env, poll_s=poll_s)
            LOG.info("N=%d: zsl index", n)
            ours, ours_index = bench_our_index(world, data, nwork, Q, gt_ids, max_memory=max_memory, env=env,
                                               poll_s=poll_s)
            indexes = {"ours": ours_index}
            af = None
            if autofaiss:
                LOG.info("N=%d: autofaiss build_index", n)
                af, indexes["autofaiss"] = bench_autofaiss(venv, data, nwork, Q, gt_ids, max_memory=max_memory,
                                                           memory_available=autofaiss_memory_available, env=env,
                                                           poll_s=poll_s)
            LOG.info("N=%d: latency, %d round(s) per index", n, latency_rounds)
            lat = measure_latencies(indexes, Q, rounds=latency_rounds, single_queries=single_queries,
                                    latency_k=latency_k)
            ours.update(lat["ours"])
            if af is not None:
                af.update(lat["autofaiss"])
            del indexes, ours_index, lat
            gc.collect()
            result["scales"].append({
                "n_rows": n,
                "data": {**{k: data[k] for k in ("n_shards", "write_seconds", "project_seconds",
                                                  "feature_bytes_on_disk", "emb_bytes_on_disk")},
                         "ground_truth_seconds": round(gt_s, 2)},
                "label": label, "index": {"ours": ours, "autofaiss": af}})
            if not keep:
                shutil.rmtree(nwork, ignore_errors=True)
    except BaseException as exc:
        # an hour-long run that fails at its largest N keeps what it measured (never over the results)
        partial = Path(output).with_suffix(".partial.json")
        zio.write_json_atomic(str(partial), repo_relative({**result, "error": f"{type(exc).__name__}: {exc}"}))
        LOG.error("failed; the results measured so far are in %s", partial)
        raise
    finally:
        if own_work and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif keep:
            LOG.info("kept the scratch folder %s", work)
    result["rss_growth"] = rss_growth(result["scales"])
    result["ratios"] = {"label": {str(s["n_rows"]): s["label"]["ratio"] for s in result["scales"]},
                        "extract_steady": (result["extraction"] or {}).get("ratio_steady")}
    result["interpretation"] = interpretation(result)
    result["notes"] = NOTES
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    for s in result["scales"]:
        r = s["label"]["ratio"]
        if not (math.isfinite(r) and r > 0):
            raise RuntimeError(f"N={s['n_rows']}: labeling ratio {r!r} is not a positive finite number")
    result = repo_relative(result)
    zio.write_json_atomic(output, result)
    md = markdown(result)
    zio.write_bytes_atomic(md_path, md.encode())
    typer.echo(md)
    typer.echo(f"total {result['total_seconds']:.0f}s -> {output}, {md_path}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark in-process; return the exit status (2 for usage errors)."""
    for key, value in SUBPROCESS_ENV.items():
        os.environ.setdefault(key, value)
    from jobs.common import setup_logging

    setup_logging()
    cmd = typer.main.get_command(app)
    try:
        cmd.main(args=list(argv if argv is not None else sys.argv[1:]), prog_name="zsl-bench-scale",
                 standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
