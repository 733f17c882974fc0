"""From a request's query to hits: the query vectors (text, image or embedding) and the filtered,
paged search; each bad input a 4xx naming it. Shared by ``/search`` and ``/knn-service``."""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Sequence

import numpy as np
from fastapi import HTTPException

from pipeline.index.searcher import Searcher
from pipeline.inputs.images import DecodeError
from pipeline.stages.serve.batching import QueryPair
from pipeline.stages.serve.reload import Served
from pipeline.stages.serve.state import ServeState

LOG = logging.getLogger(__name__)


def query_vectors(state: ServeState, served: Served, *, text: str | None = None, image: str | None = None,
                  embedding: Sequence[float] | None = None) -> QueryPair:
    """``(image-space query (1, d), caption query or None)`` of exactly one of ``text``, ``image``
    (base64 or a data: URL) and ``embedding``, for the index version ``served``."""
    s = served.searcher
    if sum(x is not None for x in (text, image, embedding)) != 1:
        raise HTTPException(400, "give exactly one of 'text', 'image' and 'embedding'")
    if image is not None:
        return image_vector(s, image, max_chars=state.config.max_body_bytes), None
    if text is not None:
        if not text.strip():
            raise HTTPException(400, "empty text")
        if len(text) > state.config.max_text_chars:
            raise HTTPException(400, f"text of {len(text)} characters; at most {state.config.max_text_chars}")
        check_utf8(text)  # before the batch: an encoder error would fail the texts batched with it
        return served.batcher.encode(text)
    return embedding_vector(s, embedding), None


def check_utf8(text: str) -> None:
    """A 400 for a text that is not valid Unicode (a lone surrogate such as the JSON escape
    ``\\ud800``): the tokenizer cannot encode it."""
    try:
        text.encode("utf-8", errors="strict")
    except UnicodeEncodeError as exc:
        reason = f"text cannot be encoded as UTF-8 (a lone surrogate at character {exc.start})"
        raise HTTPException(400, reason) from None


def embedding_vector(s: Searcher, embedding: Sequence[float]) -> np.ndarray:
    """A client's query vector as ``(1, d)`` float32, checked against the index's dimension."""
    try:
        v = np.asarray(embedding, np.float32).reshape(1, -1)
    except (TypeError, ValueError):
        raise HTTPException(400, "embedding must be a list of numbers") from None
    if v.shape[1] != s.dim:
        raise HTTPException(400, f"embedding has {v.shape[1]} values; index {s.index_dir} holds {s.dim}-d vectors")
    if not np.isfinite(v).all():
        raise HTTPException(400, "embedding has NaN or infinite values")
    return v


def image_vector(s: Searcher, image: str, *, max_chars: int) -> np.ndarray:
    """The query vector of a base64 image (or data: URL), encoded as the index's images were."""
    if len(image) > max_chars:
        raise HTTPException(413, f"image of {len(image)} base64 characters; at most {max_chars}")
    if image.startswith("data:"):
        _, sep, data = image.partition(",")
        if not sep:
            raise HTTPException(400, "image is a data: URL without data (no ',')")
    else:
        data = image
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "image is not valid base64") from None
    try:
        return s.image_queries([raw])
    except DecodeError as exc:
        raise HTTPException(400, f"image cannot be used: {exc}") from None
    except ValueError as exc:  # the index cannot encode images (no known encoder)
        raise HTTPException(400, str(exc)) from None


def find(state: ServeState, s: Searcher, q: QueryPair, *, k: int, offset: int = 0,
         labels: Sequence[str] | None = None, min_score: float | None = None, unseen_only: bool = False,
         mode: str = "image", caption_weight: float = 0.5) -> list[dict]:
    """Hits ``offset+1 .. offset+k`` (each with its ``rank``) of the query pair ``q`` that pass the
    filters: label or predicted label in ``labels``, predicted unseen, score at least ``min_score``."""
    _check_search(state, s, q, k=k, offset=offset, unseen_only=unseen_only, mode=mode)
    want = offset + k
    # label filters: every mode searches among the allowed ids only, so rare labels keep recall
    allowed = s.allowed(labels, unseen_only=unseen_only) if labels or unseen_only else None
    hits = s.search_pair(q[0], q[1], want, mode=mode, caption_weight=caption_weight, allowed=allowed)
    if min_score is not None:
        hits = [h for h in hits if h["score"] >= min_score]
    return _page(hits, offset, want)


def _page(hits: list[dict], offset: int, want: int) -> list[dict]:
    """Hits ``offset .. want - 1``, ranked from ``offset + 1``."""
    hits = hits[offset:want]
    for r, h in enumerate(hits):
        h["rank"] = offset + r + 1
    return hits


def _check_search(state: ServeState, s: Searcher, q: QueryPair, *, k: int, offset: int, unseen_only: bool,
                  mode: str) -> None:
    """A 400 for a search the index or the limits cannot answer."""
    max_k = state.config.max_k
    if k > max_k or offset + k > max_k * 10:
        raise HTTPException(400, f"k={k} (offset {offset}) is above the maximum k={max_k}")
    if unseen_only and s.labels is None:
        raise HTTPException(400, "unseen_only needs predicted labels; start zsl serve with --labels")
    if mode != "image" and s.captions is None:
        raise HTTPException(400, f"mode {mode!r}: this index has no caption index (zsl embed-text, then zsl index)")
    if mode != "image" and q[1] is None:
        raise HTTPException(400, f"mode {mode!r} needs a text query (captions are searched by text)")
