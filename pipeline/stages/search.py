"""Search stage: free text -> the nearest images of a ``zsl index`` output.

The query is embedded with the text model the index's model was trained against (the mean over
the class prompt templates, as a class name would be), mapped like the training classes
(``search_queries``) and looked up in the FAISS index by inner product.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.config import SearchConfig
from pipeline.faiss_index import load_index
from pipeline.faiss_index import search as index_search
from pipeline.models import load_model
from pipeline.models.scoring import model_fingerprint

LOG = logging.getLogger(__name__)

__all__ = ["Searcher", "run_search"]


class Searcher:
    """Loaded index (memory-mapped) + model + text encoder; reuse it for many queries."""

    def __init__(self, index_dir: str) -> None:
        from pipeline.encoders import load_text_encoder

        self.index, self.ids, self.manifest = load_index(index_dir, lazy_ids=True)
        m = self.manifest
        if not m.model_dir or not m.model_fingerprint:
            raise ValueError(f"{index_dir}: manifest names no model; was it built by `zsl index`?")
        self.model, mman = load_model(m.model_dir)
        if model_fingerprint(m.model_dir, mman) != m.model_fingerprint:
            raise ValueError(f"{index_dir}: the model at {m.model_dir} changed since the index was built; "
                             "rebuild the index")
        self.templates = m.templates or ["{name}"]
        if not m.text_model:
            raise ValueError(f"{index_dir}: manifest names no text model; cannot embed text queries")
        self.encoder = load_text_encoder(m.text_model_name or m.text_model.split("@", 1)[0], m.text_pretrained)
        if self.encoder.dim != m.dim:
            raise ValueError(f"text model gives {self.encoder.dim}-d vectors, index holds {m.dim}-d")
        # row i of ids.parquet is faiss id i (checked when written); only the row groups holding
        # a query's hits are read (IdTable), never every uri of a large index

    def search(self, text: str, k: int = 10) -> list[dict]:
        if not text.strip():
            raise ValueError("empty search text")
        # the query is embedded like a class name: the mean over the class prompt templates
        prompts = [t.format(name=text.strip()) for t in self.templates]
        q = self.model.search_queries(self.encoder.encode(prompts).mean(0, keepdims=True))
        scores, ids = index_search(self.index, q, k)
        keep = ids[0] >= 0
        rows = self.ids.take(ids[0][keep]).select(["image_id", "uri", "label"]).to_pylist()
        return [{"rank": r + 1, "score": float(s), **row} for r, (s, row) in enumerate(zip(scores[0][keep], rows))]


def run_search(cfg: SearchConfig) -> dict:
    """``{"query": text, "k": k, "hits": [...]}`` for one query (what ``zsl search --json`` prints)."""
    hits = Searcher(cfg.index).search(cfg.text, cfg.k)
    return {"query": cfg.text, "k": cfg.k, "hits": hits}
