"""Text-to-image retrieval over a ``zsl index`` output: load once, answer many queries.

:class:`Searcher` holds the memory-mapped index, its lazily read id table, the model (the copy the
index directory carries, so the directory can move) and the text encoder. Free text is embedded
like a class name (the mean over the class prompt templates) and mapped like the training classes
(``search_queries``); vectors already in the index's space can be searched directly. Used by
``zsl search`` and by the HTTP service (``zsl serve``).
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline import io as zio
from pipeline.faiss_index import load_index
from pipeline.faiss_index import search as index_search
from pipeline.models import load_model
from pipeline.models.scoring import model_fingerprint

LOG = logging.getLogger(__name__)

__all__ = ["Searcher", "MODEL_COPY"]

#: Where an index directory keeps a copy of the model it was built with.
MODEL_COPY = "model"


class Searcher:
    """Loaded index (memory-mapped) + model + text encoder; reuse it for many queries."""

    def __init__(self, index_dir: str, *, load_text: bool = True) -> None:
        self.index_dir = index_dir
        self.index, self.ids, self.manifest = load_index(index_dir, lazy_ids=True)
        m = self.manifest
        if not m.model_dir or not m.model_fingerprint:
            raise ValueError(f"{index_dir}: manifest names no model; was it built by `zsl index`?")
        # the copy the index carries (so it can move), else the model it was built with
        model_dir = zio.join(index_dir, MODEL_COPY) if zio.exists(zio.join(index_dir, MODEL_COPY, "manifest.json")) \
            else m.model_dir
        self.model, mman = load_model(model_dir)
        if model_fingerprint(model_dir, mman) != m.model_fingerprint:
            raise ValueError(f"{index_dir}: the model at {model_dir} is not the one the index was built with; "
                             "rebuild the index")
        self.templates = m.templates or ["{name}"]
        self._encoder = None
        if load_text:
            self.encoder  # noqa: B018 - load now, not on the first query

    @property
    def encoder(self):
        """The text model the index's model was trained against (loaded on first use)."""
        if self._encoder is None:
            from pipeline.encoders import load_text_encoder

            m = self.manifest
            if not m.text_model:
                raise ValueError(f"{self.index_dir}: manifest names no text model; cannot embed text queries")
            enc = load_text_encoder(m.text_model_name or m.text_model.split("@", 1)[0], m.text_pretrained)
            if enc.dim != m.dim:
                raise ValueError(f"text model gives {enc.dim}-d vectors, index holds {m.dim}-d")
            self._encoder = enc
        return self._encoder

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def text_queries(self, texts: list[str]) -> np.ndarray:
        """Query vectors of free texts, embedded like class names (mean over the class prompt templates)."""
        for t in texts:
            if not t.strip():
                raise ValueError("empty search text")
        prompts = [tpl.format(name=t.strip()) for t in texts for tpl in self.templates]
        emb = self.encoder.encode(prompts).reshape(len(texts), len(self.templates), -1).mean(1)
        return self.model.search_queries(emb)

    def search(self, text: str, k: int = 10) -> list[dict]:
        return self.search_vectors(self.text_queries([text]), k)[0]

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> list[list[dict]]:
        """Hits of each query vector (already in the index's space): rank, score, image_id, uri, label."""
        scores, ids = index_search(self.index, queries, k)
        return [self._hits(s, i) for s, i in zip(scores, ids)]

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[dict]:
        keep = ids >= 0
        rows = self.ids.take(ids[keep]).select(["faiss_id", "image_id", "uri", "label"]).to_pylist()
        return [{"rank": r + 1, "score": float(s), **row} for r, (s, row) in enumerate(zip(scores[keep], rows))]
