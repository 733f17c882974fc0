"""Index stage: feature shards -> a FAISS index of the images in the model's text space, tuned.

Every feature shard is mapped through the model's image projection (so any backbone is
searchable by text), streamed row group by row group into a per-shard cache ``OUT/vectors/``
(atomic ``.npy``; a rerun after a kill projects only the shards that are missing). A FAISS index
is chosen under the memory budget, trained on a seeded uniform sample across all shards sized
from the index (:func:`~pipeline.index.faiss_index.training_rows`), filled shard by shard, and its
search parameters are tuned to a recall target against exact neighbours
(:mod:`pipeline.index.tune`). ``ids.parquet`` is streamed shard by shard, ``index.faiss`` is
written by faiss straight to disk, ``manifest.json`` last; the cache is then removed.

Runs under the resume protocol: the identity is the model (manifest and weights), the features
and the index settings. A finished index rerun does nothing, unless the feature directory gained
shards: then only their vectors are added (ids continue, the manifest lists the shards included,
the search parameters are tuned again), or, when the index type could no longer hold them within
the budget, the index is rebuilt (said so in the log).

With ``address`` (a Ray cluster) the projection runs as a Ray Data job (workers read the feature
shards and write the cache files themselves); an IVF index is then built as partitions on the
workers, all from one quantiser trained here, and their inverted lists are merged on disk
(``index.ivfdata``), so the lists need not fit in one process's memory.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import numpy as np
import pyarrow as pa

from pipeline.core import fs as zio
from pipeline.core.config import IndexConfig, parse_memory
from pipeline.index.faiss_index import add_vectors, build_index, choose_index, estimate_memory, load_index, \
    merge_ivf_parts, read_ids, save_index, set_search_params, train_index, training_rows, training_sample, \
    write_index_files
from pipeline.core.features import caption_shards, check_feature_shards, feature_shards, features_identity, \
    iter_shard_batches, open_captions, open_features, read_caption_shard
from pipeline.index.tune import tune_index
from pipeline.zsl.models import load_model
from pipeline.zsl.models.scoring import model_fingerprint
from pipeline.core.resume import OutputDir
from pipeline.index.searcher import CAPTIONS_INDEX, MODEL_COPY
from pipeline.core.schema import INDEX_IDS_SCHEMA, IndexManifest, IndexTuning

LOG = logging.getLogger(__name__)

__all__ = ["run_index"]


class _CachedVectors:
    """Re-iterable over cached per-shard vectors, in id order (lets FAISS draw a uniform sample)."""

    def __init__(self, files: list[str]) -> None:
        self.files = files

    def __iter__(self):
        for f in self.files:
            yield zio.read_npy(f)


def _cache_name(cache: str, shard_uri: str) -> str:
    return zio.join(cache, shard_uri.rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".npy")


def _release_memory() -> None:
    """Hand freed buffers back to the OS (Arrow's pool, glibc's heap), so that memory used to read
    and project a shard does not stay resident under the index built next."""
    pa.default_memory_pool().release_unused()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _Projector:
    """Projects one feature shard into the search space: ``cache/shard-N.npy`` (atomic), unless a
    valid cached file is there (right rows, columns, float32, finite; anything else is recomputed)."""

    def __init__(self, model_dir: str, dim_in: int, dim: int, cache: str, model=None) -> None:
        self.model = model if model is not None else load_model(model_dir, feature_dim=dim_in)[0]
        self.dim_in, self.dim, self.cache = dim_in, dim, cache

    def __call__(self, shard_uri: str) -> dict:
        n = zio.parquet_num_rows(shard_uri)
        target = _cache_name(self.cache, shard_uri)
        if zio.exists(target):
            try:
                Z = zio.read_npy(target)
                if Z.shape == (n, self.dim) and Z.dtype == np.float32 and np.isfinite(Z).all():
                    return {"shard": shard_uri, "projected": False}
                LOG.warning("%s: cached vectors have shape %s %s, expected (%d, %d) float32; recomputing",
                            target, Z.shape, Z.dtype, n, self.dim)
            except ValueError as exc:
                LOG.warning("%s; recomputing", exc)
        Z = np.empty((n, self.dim), np.float32)
        at = 0
        for _, X in iter_shard_batches(shard_uri, self.dim_in, batch_rows=16_384):
            z = np.asarray(self.model.search_images(X), dtype=np.float32)
            if z.shape != (len(X), self.dim):
                raise ValueError(f"{shard_uri}: the model projects {len(X)} images to shape {z.shape}, "
                                 f"expected ({len(X)}, {self.dim})")
            Z[at : at + len(X)] = z
            at += len(X)
        zio.write_npy_atomic(target, Z)
        del Z
        _release_memory()
        return {"shard": shard_uri, "projected": True}


def _projector(model_dir: str, dim_in: int, dim: int, cache: str) -> _Projector:
    """Picklable factory (a Ray worker loads the model itself)."""
    return _Projector(model_dir, dim_in, dim, cache)


def _project(cfg: IndexConfig, model, files: list[str], dim_in: int, dim: int, cache: str, progress: bool) -> int:
    """Project every shard into the cache; return how many were computed (not cached) now."""
    if cfg.address:
        from pipeline.cluster.shard_jobs import run_shard_jobs

        done = run_shard_jobs(files, partial(_projector, cfg.model, dim_in, dim, cache), address=cfg.address,
                              num_workers=cfg.num_workers, what="projections")
        return sum(r["projected"] for r in done)
    from tqdm.auto import tqdm

    proj = _Projector(cfg.model, dim_in, dim, cache, model=model)
    return sum(proj(f)["projected"] for f in tqdm(files, desc="project", unit="shard", disable=not progress))


def _write_ids(out_dir: str, files: list[str], *, keep_existing: bool) -> None:
    """Stream ``ids.parquet``: the existing rows first (when adding), then each shard's rows, ids continuing."""
    uri = zio.join(out_dir, "ids.parquet")
    offset = 0
    with zio.atomic_parquet_writer(uri, INDEX_IDS_SCHEMA) as w:
        if keep_existing:  # the old rows, row group by row group (the old file stays until the rename)
            import pyarrow.parquet as pq

            fs, path = zio.filesystem(uri)
            with fs.open(path, "rb") as fh:
                for rb in pq.ParquetFile(fh).iter_batches(batch_size=65_536):
                    w.write_batch(rb)
                    offset += rb.num_rows
        for f in files:
            t = zio.read_parquet(f, columns=["image_id", "uri", "label"])
            w.write_table(pa.table({
                "faiss_id": pa.array(np.arange(offset, offset + t.num_rows), pa.int64()),
                "image_id": t.column("image_id"), "uri": t.column("uri"), "label": t.column("label"),
            }, schema=INDEX_IDS_SCHEMA))
            offset += t.num_rows


def _ivf_partitioned(factory: str) -> bool:
    return factory.split(",")[0].startswith("IVF") or (
        factory.startswith("OPQ") and len(factory.split(",")) > 1 and factory.split(",")[1].startswith("IVF"))


def _build_part(trained_file: str, part_file: str, vec_files: list[str], start_id: int) -> dict:
    """One IVF partition: the trained (empty) index + these vectors with ids from ``start_id``."""
    import faiss

    index = faiss.read_index(zio.local_path(trained_file))
    n = add_vectors(index, _CachedVectors(vec_files), start_id=start_id)
    with zio.atomic_local_file(part_file) as tmp:
        faiss.write_index(index, tmp)
    return {"part": part_file, "rows": n}


def _part_worker():
    return lambda spec: _build_part(**__import__("json").loads(spec))


def _build_partitions(cfg: IndexConfig, out: OutputDir, vec_files: list[str], rows: list[int], factory: str,
                      dim: int, n_total: int, use_gpu, timings: dict) -> tuple[object, int]:
    """Train one quantiser here, build IVF partitions (on Ray workers with ``address``), merge on disk."""
    import json

    import faiss

    t = time.perf_counter()
    n_train = training_rows(factory, n_total)
    sample, _ = training_sample(_CachedVectors(vec_files), dim, n_total, n_train, 0)
    trained = train_index(sample, dim=dim, factory=factory, use_gpu=use_gpu)
    del sample
    trained_file = out.join("parts", "trained.faiss")
    with zio.atomic_local_file(trained_file) as tmp:
        faiss.write_index(trained, tmp)
    timings["train_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    n_parts = min(len(vec_files), cfg.partitions or cfg.num_workers or max(1, len(vec_files) // 2))
    bounds = np.linspace(0, len(vec_files), n_parts + 1).astype(int)
    specs, start = [], 0
    for p in range(n_parts):
        files = vec_files[bounds[p] : bounds[p + 1]]
        specs.append(json.dumps({"trained_file": trained_file, "part_file": out.join("parts", f"part-{p:05d}.faiss"),
                                 "vec_files": files, "start_id": start}))
        start += sum(rows[bounds[p] : bounds[p + 1]])
    if cfg.address:
        from pipeline.cluster.shard_jobs import run_shard_jobs

        done = run_shard_jobs(specs, _part_worker, address=cfg.address, num_workers=cfg.num_workers,
                              what="IVF partitions")
    else:
        done = [_build_part(**json.loads(s)) for s in specs]
    parts = sorted(d["part"] for d in done)
    timings["add_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    index = merge_ivf_parts(trained, parts, cfg.output)
    timings["merge_s"] = round(time.perf_counter() - t, 2)
    LOG.info("merged %d IVF partitions (%d vectors) on disk", len(parts), index.ntotal)
    return index, n_train


def _copy_model(model_dir: str, dest: str) -> None:
    """The index carries the model it was built with (weights + manifest, a few MB), so the
    directory can be moved or copied to another machine and still answer text queries."""
    for name in ("weights.safetensors", "manifest.json"):
        zio.write_bytes_atomic(zio.join(dest, name), zio.read_bytes(zio.join(model_dir, name)))


def _check_plan(cfg: IndexConfig, dim: int, factory: str, partitioned: bool) -> None:
    """Stop before any work what would fail at the end: fixed search parameters the index type
    lacks (``--nprobe`` on HNSW), a partitioned build into a directory faiss cannot merge into."""
    from pipeline.index.faiss_index import new_index

    fixed = _fixed_params(cfg)
    if fixed:
        set_search_params(new_index(dim, factory), fixed)
    if partitioned and not zio.is_local(cfg.output):
        raise ValueError(f"{cfg.output}: IVF partitions are merged into index.ivfdata on a local (or mounted) "
                         "disk; give a local --output or drop --address/--partitions")


def _plan_add(done: IndexManifest | None, names: list[str], rows: dict[str, int], dim: int,
              budget: int, output: str) -> list[str] | None:
    """The new shards to add to a finished index, or None when it must be (re)built from scratch."""
    if done is None:
        return None
    old, new = set(done.shards), [n for n in names if n not in set(done.shards)]
    why = None
    if not old <= set(names):
        why = f"{len(old - set(names))} indexed shard(s) are gone from the features"
    elif sum(rows[n] for n in done.shards) != done.ntotal:
        why = "indexed shards changed size"
    elif done.data_files:
        why = "an on-disk merged IVF index is rebuilt, not appended to"
    elif estimate_memory(done.factory, sum(rows.values()), dim) > budget:
        why = f"{done.factory} can no longer hold {sum(rows.values())} vectors within {budget} bytes"
    if why:
        LOG.warning("%s: the features changed since the index was built (%s); rebuilding it", output, why)
        return None
    LOG.info("%s: the features gained %d shard(s) since the index was built; adding their vectors", output, len(new))
    return new


def _fixed_params(cfg: IndexConfig) -> str | None:
    return cfg.search_params or (f"nprobe={cfg.nprobe}" if cfg.nprobe else None)


def _tuning_settings(cfg: IndexConfig, n_total: int) -> dict:
    """What the search parameters were chosen by: changing it re-tunes, never rebuilds."""
    return {"target_recall": cfg.target_recall, "k": min(cfg.tune_k, 100, n_total), "max_query_ms": cfg.max_query_ms,
            "fixed": _fixed_params(cfg), "n_queries": min(cfg.tune_queries, n_total)}


def _tuned_by(t: IndexTuning | None) -> dict | None:
    if t is None:
        return None
    return {"target_recall": t.target_recall, "k": t.k, "max_query_ms": t.max_query_ms,
            "fixed": t.params if not t.tried else None, "n_queries": t.n_queries}


def _tune(cfg: IndexConfig, index, vectors: _CachedVectors, n_total: int) -> IndexTuning | None:
    fixed = _fixed_params(cfg)
    return tune_index(index, vectors, n_total=n_total, target_recall=cfg.target_recall, k=cfg.tune_k,
                      max_query_ms=cfg.max_query_ms, n_queries=cfg.tune_queries, params=fixed)


def _image_encoder(fman) -> dict:
    """How the features were made (for image queries); a checkpoint path is stored absolute."""
    enc, pre = fman.config.get("encoder"), fman.config.get("pretrained")
    if pre and pre != "random" and zio.is_local(pre) and zio.exists(pre):
        pre = zio.absolute_uri(pre)
    return {"image_encoder": enc, "image_pretrained": pre, "image_size": fman.image_size}


class _CaptionBatches:
    """Re-iterable caption embeddings in index order, one shard at a time (checked row by row)."""

    def __init__(self, features: str, files: list[str], caps: dict[str, str], dim: int) -> None:
        self.features, self.files, self.caps, self.dim = features, files, caps, dim

    def __iter__(self):
        for f in self.files:
            ids = zio.read_parquet(f, columns=["image_id"]).column("image_id")
            yield read_caption_shard(self.features, self.caps, f, ids, self.dim)[1]


def _caption_index(cfg: IndexConfig, out: OutputDir, mman, files: list[str], n_total: int, budget: int,
                   progress: bool) -> bool:
    """The caption index (``OUT/captions/``, an index directory of its own with the same faiss ids):
    built from ``FEATURES/text`` when the captions were embedded with the model's text model;
    kept when its inputs are unchanged, removed when the features have no (usable) captions.
    Rows without a caption hold zero vectors (score 0; caption-only searches drop them).
    Returns whether it was built."""
    dest = out.join(CAPTIONS_INDEX)
    cman = open_captions(cfg.features)
    caps = caption_shards(cfg.features) if cman else {}
    names = [f.rsplit("/", 1)[-1] for f in files]
    why = ("no caption embeddings (`zsl embed-text`)" if cman is None
           else f"captions embedded with {cman.text_model}, the model's text space is {mman.text_model}"
           if cman.text_model != mman.text_model
           else f"no caption embeddings for {sum(n not in caps for n in names)} shard(s); run `zsl embed-text`"
           if any(n not in caps for n in names) else None)
    if why:
        if cman is not None:
            LOG.warning("%s: no caption index: %s", cfg.output, why)
        zio.remove(dest)
        return False
    ident = {"text_model": cman.text_model, "captions": zio.fingerprint(cman.to_json()), "shards": names,
             "sizes": [zio.filesystem(caps[n])[0].size(zio.filesystem(caps[n])[1]) for n in names],
             "max_memory": cfg.max_memory, "target_recall": cfg.target_recall}
    if zio.exists(zio.join(dest, "manifest.json")) and zio.read_json(zio.join(dest, "manifest.json")).get(
            "identity") == ident:
        return False
    batches = _CaptionBatches(cfg.features, files, caps, cman.dim)
    factory = choose_index(n_total, cman.dim, max_memory_bytes=budget)
    LOG.info("caption index: %d captions (%d rows) in %s", cman.n_captions, n_total, factory)
    index = build_index(batches, dim=cman.dim, factory=factory, n_total=n_total, use_gpu=False, progress=progress)
    tuning = tune_index(index, batches, n_total=n_total, target_recall=cfg.target_recall, k=cfg.tune_k,
                        max_query_ms=cfg.max_query_ms, n_queries=min(cfg.tune_queries, n_total))
    save_index(index, dest, ids=read_ids(out.uri), manifest={
        "factory": factory, "search_params": tuning.params if tuning else None, "tuning": tuning,
        "build": "build", "identity": ident, "text_model": cman.text_model,
        "text_model_name": cman.text_model_name, "text_pretrained": cman.text_pretrained,
        "features_dir": cfg.features, "shards": names, "max_memory": cfg.max_memory})
    return True


def run_index(cfg: IndexConfig, *, progress: bool = True) -> IndexManifest:
    """Build (or resume, or bring up to date) the text-searchable index of a feature directory."""
    t0 = time.perf_counter()
    fman = open_features(cfg.features)
    model, mman = load_model(cfg.model, feature_dim=fman.dim, feature_model=fman.model_id)
    if mman.semantics != "text":
        raise ValueError(f"{cfg.model}: model scores against '{mman.semantics}' semantics; text search needs "
                         "a model trained with --semantics text")
    files = feature_shards(cfg.features)
    check_feature_shards(files, fman.dim)
    names = [f.rsplit("/", 1)[-1] for f in files]
    rows = {n: zio.parquet_num_rows(f) for n, f in zip(names, files)}
    n_total = sum(rows.values())
    if n_total == 0:
        raise ValueError(f"{cfg.features}: no features to index")
    dim, budget = mman.search_dim or mman.semantic_dim, parse_memory(cfg.max_memory)
    model_fp = model_fingerprint(cfg.model, mman)
    # what the vectors and the index type are; the tuning settings only re-tune a finished index
    identity = {"model": model_fp, "features": features_identity(cfg.features, fman), "dim": dim,
                "index_factory": cfg.index_factory, "max_memory": cfg.max_memory, "nprobe": cfg.nprobe}
    with OutputDir(cfg.output, job="index", identity=identity, overwrite=cfg.overwrite,
                   owned=("index.faiss", "index.ivfdata", "ids.parquet", "vectors", "parts", MODEL_COPY,
                          CAPTIONS_INDEX)) as out:
        done = out.finished(IndexManifest)
        retune = done is not None and done.shards == names
        if retune and (_tuned_by(done.tuning) == _tuning_settings(cfg, n_total) or n_total < 2):
            LOG.info("%s: index of these features with this model is complete; nothing to do", cfg.output)
            zio.remove(out.join("vectors"))  # a kill after the manifest, before the cache was removed
            zio.remove(out.join("parts"))
            # captions embedded since (or gone): the caption index is its own directory, written
            # manifest last, so the image index's manifest stays as it is
            _caption_index(cfg, out, mman, files, n_total, budget, progress)
            return done
        if retune:
            LOG.info("%s: the tuning settings changed; re-tuning the search parameters (the index is kept)",
                     cfg.output)
        new = [] if retune else _plan_add(done, names, rows, dim, budget, cfg.output)
        order = names if new is None else [*done.shards, *new]
        by_name = dict(zip(names, files))
        ordered_files = [by_name[n] for n in order]
        use_gpu = {"auto": None, "yes": True, "no": False}[cfg.use_gpu]
        timings: dict[str, float] = {}
        index = None
        if new is not None:
            factory = done.factory
            # writable to add to, before the manifest goes; mapped when only re-tuning
            index, _, _ = load_index(cfg.output, mmap=not new)
        else:
            factory = cfg.index_factory or choose_index(n_total, dim, max_memory_bytes=budget)
        partitioned = new is None and _ivf_partitioned(factory) and bool(cfg.address or cfg.partitions) \
            and len(files) > 1
        _check_plan(cfg, dim, factory, partitioned)
        out.begin()
        LOG.info("indexing %d images (%d-d) with %s", n_total, dim, factory)
        t = time.perf_counter()
        n_new = _project(cfg, model, ordered_files, fman.dim, dim, out.join("vectors"), progress)
        timings["project_s"] = round(time.perf_counter() - t, 2)
        LOG.info("projected %d of %d shards (%d cached by an earlier run)", n_new, len(files), len(files) - n_new)
        vec_files = [_cache_name(out.join("vectors"), f) for f in ordered_files]
        vectors = _CachedVectors(vec_files)
        n_train, build = None, "build"
        if new is not None:
            t = time.perf_counter()
            added = add_vectors(index, _CachedVectors(vec_files[len(done.shards):]), progress=progress,
                                desc=f"add to {factory}")
            timings["add_s"] = round(time.perf_counter() - t, 2)
            build, n_train = ("add" if new else "retune"), done.train_rows
        elif partitioned:
            index, n_train = _build_partitions(cfg, out, vec_files, [rows[n] for n in order], factory, dim, n_total,
                                               use_gpu, timings)
            build, added = "partitions", n_total
        else:
            t = time.perf_counter()
            n_train = training_rows(factory, n_total) or None
            index = build_index(vectors, dim=dim, factory=factory, n_total=n_total, use_gpu=use_gpu,
                                progress=progress)
            timings["build_s"] = round(time.perf_counter() - t, 2)
            added = n_total
        t = time.perf_counter()
        tuning = _tune(cfg, index, vectors, n_total)
        timings["tune_s"] = round(time.perf_counter() - t, 2)
        if tuning is not None:
            LOG.info("search parameters %s: recall@1 %.3f, @10 %.3f, single query %.2f ms mean / %.2f ms p99",
                     tuning.params or "(none)", tuning.recall_at_1, tuning.recall_at_10, tuning.latency_ms_mean,
                     tuning.latency_ms_p99)
        t = time.perf_counter()
        if build == "retune":  # the files stay; only the manifest changes
            fields = {k: getattr(done, k) for k in ("ntotal", "dim", "index_bytes", "sha256", "data_files")}
        else:
            _write_ids(cfg.output, ordered_files[len(done.shards):] if new is not None else ordered_files,
                       keep_existing=new is not None)
            fields = write_index_files(index, cfg.output)
        timings["write_s"] = round(time.perf_counter() - t, 2)
        est = estimate_memory(factory, n_total, dim)
        if fields["index_bytes"] + sum(fields["data_files"].values()) > budget:
            LOG.warning("%s: the index takes %d bytes, above the %s budget (estimated %d)", cfg.output,
                        fields["index_bytes"], cfg.max_memory, est)
        manifest = IndexManifest(
            **{**fields, "factory": factory}, nprobe=cfg.nprobe, search_params=tuning.params if tuning else None,
            tuning=tuning, build=build, added_last_run=added, train_rows=n_train, timings=timings,
            identity=identity, model_dir=cfg.model,
            model_fingerprint=model_fp, feature_model=fman.model_id, **_image_encoder(fman),
            text_model=mman.text_model,
            text_model_name=mman.text_model_name, text_pretrained=mman.text_pretrained, templates=mman.templates,
            features_dir=cfg.features, shards=order, max_memory=cfg.max_memory,
            estimated_bytes=est, shards_projected_last_run=n_new, seconds=round(time.perf_counter() - t0, 2))
        _copy_model(cfg.model, out.join(MODEL_COPY))
        _caption_index(cfg, out, mman, ordered_files, n_total, budget, progress)
        out.finish(manifest)
        zio.remove(out.join("vectors"))
        zio.remove(out.join("parts"))
        return manifest
