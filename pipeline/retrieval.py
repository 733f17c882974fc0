"""Index image features in the model's semantic (text) space and search them with free text.

``build`` maps every feature shard through the model's image projection (so any backbone is
searchable by text), picks a FAISS index under the memory budget, and writes ``index.faiss``,
``ids.parquet`` and ``manifest.json``. ``search`` embeds the query with the text model the model
was trained against and returns the nearest images.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from pipeline import io as zio
from pipeline.config import IndexConfig, parse_memory
from pipeline.extract import check_feature_shards, features_identity, read_features_manifest, table_embeddings
from pipeline.index import build_index, choose_index, estimate_memory, load_index, save_index
from pipeline.index import search as index_search
from pipeline.labeling import model_fingerprint
from pipeline.models import load_model
from pipeline.schema import INDEX_IDS_SCHEMA

LOG = logging.getLogger(__name__)

__all__ = ["run_index", "search_text", "Searcher"]


class _CachedVectors:
    """Re-iterable over the cached per-shard vectors, in shard order (lets FAISS draw a uniform sample)."""

    def __init__(self, files: list[str], dim: int) -> None:
        self.files, self.dim = files, dim

    def __iter__(self):
        for f in self.files:
            yield zio.read_npy(f)


def _project_shards(model, files: list[str], rows: list[int], dim_in: int, dim: int, cache: str,
                    progress: bool) -> tuple[list[str], int]:
    """Project every feature shard into the search space once: ``cache/shard-N.npy`` (atomic, no pickle).

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
        t = zio.read_parquet(f, columns=["embedding"])
        Z = np.ascontiguousarray(model.search_images(table_embeddings(t, dim_in, f)), dtype=np.float32)
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


def run_index(cfg: IndexConfig, *, progress: bool = True) -> dict:
    """Build the text-searchable index of a feature directory, resumably.

    Projected vectors are cached per feature shard under ``OUT/vectors/<build fingerprint>/`` (the
    fingerprint covers the model, the features' identity and the shard list), so a rerun after a kill
    projects only the shards that were missing; ``index.faiss``, ``ids.parquet`` and, last,
    ``manifest.json`` are written at the end and the cache is removed. A rerun of a finished build
    with the same inputs and settings does nothing; one with other inputs rebuilds from scratch.
    """
    t0 = time.perf_counter()
    fman = read_features_manifest(cfg.features)
    dim_in = int(fman["dim"])
    model, mman = load_model(cfg.model, feature_dim=dim_in, feature_model=fman["model_id"])
    if mman["semantics"] != "text":
        raise ValueError(f"{cfg.model}: model scores against '{mman['semantics']}' semantics; text search needs "
                         "a model trained with --semantics text")
    files = list(zio.iter_parquet_files(zio.join(cfg.features, "features")))
    check_feature_shards(files, dim_in)
    rows = [zio.parquet_num_rows(f) for f in files]
    n_total = sum(rows)
    if n_total == 0:
        raise ValueError(f"{cfg.features}: no features to index")
    dim = int(mman["semantic_dim"])
    factory = cfg.index_factory or choose_index(n_total, dim, max_memory_bytes=parse_memory(cfg.max_memory))
    model_fp = model_fingerprint(cfg.model, mman)
    build = zio.fingerprint({"model": model_fp, "features": features_identity(cfg.features, fman),
                             "shards": [f.rsplit("/", 1)[-1] for f in files], "rows": rows, "dim": dim})
    with zio.output_lock(cfg.output):
        muri = zio.join(cfg.output, "manifest.json")
        if zio.exists(muri):
            prev = zio.read_json(muri)
            if prev.get("build") == build and prev.get("factory") == factory and prev.get("nprobe") == cfg.nprobe:
                LOG.info("%s: index of these features with this model is complete; nothing to do", cfg.output)
                return prev
            LOG.warning("%s: holds an index built from other features, model or settings; rebuilding it", cfg.output)
        zio.remove_temp_files(cfg.output)
        cache_root = zio.join(cfg.output, "vectors")
        fs, root = zio.filesystem(cache_root)
        if fs.exists(root):  # caches of other builds can never be used again
            for d in fs.ls(root, detail=False):
                if d.rstrip("/").rsplit("/", 1)[-1] != build:
                    fs.rm(d, recursive=True)
        cache = zio.join(cache_root, build)
        LOG.info("indexing %d images (%d-d) with %s", n_total, dim, factory)
        vec_files, n_new = _project_shards(model, files, rows, dim_in, dim, cache, progress)
        LOG.info("projected %d of %d shards (%d cached by an earlier run)", n_new, len(files), len(files) - n_new)
        use_gpu = {"auto": None, "yes": True, "no": False}[cfg.use_gpu]
        index = build_index(_CachedVectors(vec_files, dim), dim=dim, factory=factory, n_total=n_total,
                            use_gpu=use_gpu, progress=progress)
        manifest = {
            "model_dir": cfg.model,
            "model_fingerprint": model_fp,
            "feature_model": fman["model_id"],
            "text_model": mman.get("text_model"),
            "text_pretrained": mman.get("text_pretrained"),
            "text_model_name": mman.get("text_model_name"),
            "templates": mman.get("templates"),
            "features_dir": cfg.features,
            "build": build,
            "factory": factory,
            "max_memory": cfg.max_memory,
            "estimated_bytes": estimate_memory(factory, n_total, dim),
            "shards_projected_last_run": n_new,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if cfg.nprobe:
            manifest["nprobe"] = cfg.nprobe
        save_index(index, cfg.output, ids=_id_table(files), manifest=manifest)
        zio.remove(cache_root)
        return zio.read_json(muri)


class Searcher:
    """Loaded index + text encoder; reuse it for many queries."""

    def __init__(self, index_dir: str) -> None:
        from pipeline.encoders import load_text_encoder

        self.index, self.ids, self.manifest = load_index(index_dir)
        self.model, mman = load_model(self.manifest["model_dir"])
        if model_fingerprint(self.manifest["model_dir"], mman) != self.manifest["model_fingerprint"]:
            raise ValueError(f"{index_dir}: the model at {self.manifest['model_dir']} changed since the index "
                             "was built; rebuild the index")
        self.templates = self.manifest.get("templates") or ["{name}"]
        name = self.manifest.get("text_model")
        if not name:
            raise ValueError(f"{index_dir}: manifest names no text model; cannot embed text queries")
        self.encoder = load_text_encoder(self.manifest.get("text_model_name") or name.split("@", 1)[0],
                                         self.manifest.get("text_pretrained"))
        if self.encoder.dim != self.manifest["dim"]:
            raise ValueError(f"text model gives {self.encoder.dim}-d vectors, index holds {self.manifest['dim']}-d")
        self._uri = self.ids.column("uri").to_pylist()
        self._image_id = self.ids.column("image_id").to_pylist()
        self._label = self.ids.column("label").to_pylist()
        fid = self.ids.column("faiss_id").to_numpy()
        if not np.array_equal(fid, np.arange(len(fid))):
            raise ValueError(f"{index_dir}: ids.parquet is not a dense 0..n-1 id map")

    def search(self, text: str, k: int = 10) -> list[dict]:
        if not text.strip():
            raise ValueError("empty search text")
        # the query is embedded like a class name: the mean over the class prompt templates
        prompts = [t.format(name=text.strip()) for t in self.templates]
        q = self.model.search_queries(self.encoder.encode(prompts).mean(0, keepdims=True))
        scores, ids = index_search(self.index, q, k)
        return [{"rank": r + 1, "score": float(s), "image_id": self._image_id[i], "uri": self._uri[i],
                 "label": self._label[i]}
                for r, (s, i) in enumerate(zip(scores[0], ids[0])) if i >= 0]


def search_text(index_dir: str, text: str, k: int = 10) -> list[dict]:
    return Searcher(index_dir).search(text, k)
