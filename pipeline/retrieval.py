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
import pyarrow.parquet as pq

from pipeline import io as zio
from pipeline.config import IndexConfig, parse_memory
from pipeline.extract import read_features_manifest, table_embeddings
from pipeline.index import build_index, choose_index, estimate_memory, load_index, save_index
from pipeline.index import search as index_search
from pipeline.models import load_model
from pipeline.schema import INDEX_IDS_SCHEMA

LOG = logging.getLogger(__name__)

__all__ = ["run_index", "search_text", "Searcher"]


def run_index(cfg: IndexConfig, *, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    fman = read_features_manifest(cfg.features)
    dim_in = int(fman["dim"])
    model, mman = load_model(cfg.model, feature_dim=dim_in, feature_model=fman["model_id"])
    if mman["semantics"] != "text":
        raise ValueError(f"{cfg.model}: model scores against '{mman['semantics']}' semantics; text search needs "
                         "a model trained with --semantics text")
    files = list(zio.iter_parquet_files(zio.join(cfg.features, "features")))
    fs, _ = zio.filesystem(cfg.features)
    n_total = sum(pq.ParquetFile(fs.open(zio.filesystem(f)[1], "rb")).metadata.num_rows for f in files)
    if n_total == 0:
        raise ValueError(f"{cfg.features}: no features to index")
    dim = int(mman["semantic_dim"])
    factory = cfg.index_factory or choose_index(n_total, dim, max_memory_bytes=parse_memory(cfg.max_memory))
    LOG.info("indexing %d images (%d-d) with %s", n_total, dim, factory)
    ids_parts: list[pa.Table] = []

    def batches():
        offset = 0
        for f in files:
            t = pq.read_table(zio.filesystem(f)[1], filesystem=fs, columns=["image_id", "uri", "label", "embedding"])
            Z = model.search_images(table_embeddings(t, dim_in, f)).astype(np.float32)
            ids_parts.append(pa.table({
                "faiss_id": pa.array(np.arange(offset, offset + len(t)), pa.int64()),
                "image_id": t.column("image_id"), "uri": t.column("uri"), "label": t.column("label"),
            }, schema=INDEX_IDS_SCHEMA))
            offset += len(t)
            yield Z

    use_gpu = {"auto": None, "yes": True, "no": False}[cfg.use_gpu]
    index = build_index(batches(), dim=dim, factory=factory, n_total=n_total, use_gpu=use_gpu, progress=progress)
    manifest = {
        "model_dir": cfg.model,
        "model_fingerprint": zio.fingerprint(mman),
        "feature_model": fman["model_id"],
        "text_model": mman.get("text_model"),
        "text_pretrained": mman.get("text_pretrained"),
        "text_model_name": mman.get("text_model_name"),
        "templates": mman.get("templates"),
        "features_dir": cfg.features,
        "factory": factory,
        "max_memory": cfg.max_memory,
        "estimated_bytes": estimate_memory(factory, n_total, dim),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if cfg.nprobe:
        manifest["nprobe"] = cfg.nprobe
    save_index(index, cfg.output, ids=pa.concat_tables(ids_parts), manifest=manifest)
    return zio.read_json(zio.join(cfg.output, "manifest.json"))


class Searcher:
    """Loaded index + text encoder; reuse it for many queries."""

    def __init__(self, index_dir: str) -> None:
        from pipeline.encoders import load_text_encoder

        self.index, self.ids, self.manifest = load_index(index_dir)
        self.model, mman = load_model(self.manifest["model_dir"])
        if zio.fingerprint(mman) != self.manifest["model_fingerprint"]:
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
