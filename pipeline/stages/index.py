"""Index stage: feature shards -> a FAISS index of the images in the model's text space.

Every feature shard is mapped through the model's image projection (so any backbone is
searchable by text), a FAISS index is chosen under the memory budget (:mod:`pipeline.faiss_index`)
and ``index.faiss``, ``ids.parquet`` and ``manifest.json`` are written. Runs under the resume
protocol: the identity is the model (manifest and weights), the features and the index settings.
Projected vectors are cached per feature shard under ``OUT/vectors/`` (atomic, no pickle), so a
rerun after a kill projects only the shards that were missing; the cache is removed once the
index is complete. A finished index rerun does nothing unless the feature directory gained
shards (then the index is rebuilt to include them, said so in the log).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from pipeline import io as zio
from pipeline.config import IndexConfig, parse_memory
from pipeline.faiss_index import build_index, choose_index, estimate_memory, write_index_files
from pipeline.features import check_feature_shards, feature_shards, features_identity, open_features, \
    read_shard_embeddings
from pipeline.models import load_model
from pipeline.models.scoring import model_fingerprint
from pipeline.resume import OutputDir
from pipeline.schema import INDEX_IDS_SCHEMA, IndexManifest

LOG = logging.getLogger(__name__)

__all__ = ["run_index"]


class _CachedVectors:
    """Re-iterable over the cached per-shard vectors, in shard order (lets FAISS draw a uniform sample)."""

    def __init__(self, files: list[str], dim: int) -> None:
        self.files, self.dim = files, dim

    def __iter__(self):
        for f in self.files:
            yield zio.read_npy(f)


def _project_shards(model, files: list[str], rows: list[int], dim_in: int, dim: int, cache: str,
                    progress: bool) -> tuple[list[str], int]:
    """Project every feature shard into the search space once: ``cache/shard-N.npy``.

    A cached file is reused when it has the shard's row count, ``dim`` columns, float32 and finite
    values; anything else (a torn or foreign file) is recomputed. Returns the cache files and how
    many shards were projected in this call.
    """
    from tqdm.auto import tqdm

    out, n_new = [], 0
    for f, n in zip(tqdm(files, desc="project", unit="shard", disable=not progress), rows):
        target = zio.join(cache, f.rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".npy")
        out.append(target)
        if zio.exists(target):
            try:
                Z = zio.read_npy(target)
                if Z.shape == (n, dim) and Z.dtype == np.float32 and np.isfinite(Z).all():
                    continue
                LOG.warning("%s: cached vectors have shape %s %s, expected (%d, %d) float32; recomputing",
                            target, Z.shape, Z.dtype, n, dim)
            except ValueError as exc:
                LOG.warning("%s; recomputing", exc)
        _, X = read_shard_embeddings(f, dim_in)
        Z = np.ascontiguousarray(model.search_images(X), dtype=np.float32)
        if Z.shape != (n, dim):
            raise ValueError(f"{f}: the model projects {n} images to shape {Z.shape}, expected ({n}, {dim})")
        zio.write_npy_atomic(target, Z)
        n_new += 1
    return out, n_new


def _id_table(files: list[str]) -> pa.Table:
    parts, offset = [], 0
    for f in files:
        t = zio.read_parquet(f, columns=["image_id", "uri", "label"])
        parts.append(pa.table({
            "faiss_id": pa.array(np.arange(offset, offset + len(t)), pa.int64()),
            "image_id": t.column("image_id"), "uri": t.column("uri"), "label": t.column("label"),
        }, schema=INDEX_IDS_SCHEMA))
        offset += len(t)
    return pa.concat_tables(parts)


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
    rows = [zio.parquet_num_rows(f) for f in files]
    n_total = sum(rows)
    if n_total == 0:
        raise ValueError(f"{cfg.features}: no features to index")
    dim = mman.semantic_dim
    factory = cfg.index_factory or choose_index(n_total, dim, max_memory_bytes=parse_memory(cfg.max_memory))
    model_fp = model_fingerprint(cfg.model, mman)
    identity = {"model": model_fp, "features": features_identity(cfg.features, fman), "dim": dim,
                "index_factory": cfg.index_factory, "max_memory": cfg.max_memory, "nprobe": cfg.nprobe}
    shard_names = [f.rsplit("/", 1)[-1] for f in files]
    with OutputDir(cfg.output, job="index", identity=identity, overwrite=cfg.overwrite,
                   owned=("index.faiss", "ids.parquet", "vectors")) as out:
        done = out.finished(IndexManifest)
        if done is not None and done.shards == shard_names:
            LOG.info("%s: index of these features with this model is complete; nothing to do", cfg.output)
            zio.remove(out.join("vectors"))  # a kill after the manifest, before the cache was removed
            return done
        if done is not None:
            LOG.warning("%s: the features gained %d shard(s) since the index was built; rebuilding it with them",
                        cfg.output, len(set(shard_names) - set(done.shards)))
        out.begin()
        LOG.info("indexing %d images (%d-d) with %s", n_total, dim, factory)
        vec_files, n_new = _project_shards(model, files, rows, fman.dim, dim, out.join("vectors"), progress)
        LOG.info("projected %d of %d shards (%d cached by an earlier run)", n_new, len(files), len(files) - n_new)
        use_gpu = {"auto": None, "yes": True, "no": False}[cfg.use_gpu]
        index = build_index(_CachedVectors(vec_files, dim), dim=dim, factory=factory, n_total=n_total,
                            use_gpu=use_gpu, progress=progress)
        fields = write_index_files(index, cfg.output, ids=_id_table(files))
        manifest = IndexManifest(
            **{**fields, "factory": factory}, nprobe=cfg.nprobe, identity=identity, model_dir=cfg.model,
            model_fingerprint=model_fp, feature_model=fman.model_id, text_model=mman.text_model,
            text_model_name=mman.text_model_name, text_pretrained=mman.text_pretrained, templates=mman.templates,
            features_dir=cfg.features, shards=shard_names, max_memory=cfg.max_memory,
            estimated_bytes=estimate_memory(factory, n_total, dim), shards_projected_last_run=n_new,
            seconds=round(time.perf_counter() - t0, 2))
        out.finish(manifest)
        zio.remove(out.join("vectors"))
        return manifest
