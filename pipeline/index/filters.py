"""Filtered search that keeps recall: per-label id sets and a search restricted to an allowed id set.

Filtering the top ``4k`` candidates after the search loses most hits of rare labels (a label on
0.1 % of the rows rarely has one of them among the first 100). Instead :class:`LabelSets` maps each
label to its sorted faiss ids (built once, from the id table's ``label`` column or from the predicted
labels) and :func:`filtered_search` searches only the allowed ids: exactly over their stored vectors
when the set is small (and the index can give vectors back), by a scan of the Flat storage with a
faiss ``IDSelectorBatch`` up to a quarter of the rows (Flat, HNSW-Flat), else with the selector in
the index's own search (HNSW: ``efSearch``, IVF: ``nprobe`` widened until every query has
``min(k, len(allowed))`` hits),
and as a last resort by post-filtering an ever wider plain search. Never fewer than
``min(k, len(allowed))`` hits per query.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from pipeline.index.common import as_matrix, import_faiss
from pipeline.index.knn import exact_knn

if TYPE_CHECKING:  # pragma: no cover
    import faiss

LOG = logging.getLogger(__name__)

__all__ = ["LabelSets", "filtered_search", "EXACT_MAX"]

#: allowed sets up to this many ids are searched exactly over their reconstructed vectors
EXACT_MAX = 20_000
#: with Flat storage (Flat, HNSW-Flat), sets up to this share of the rows are searched exactly by a scan
EXACT_SHARE = 0.25


class LabelSets:
    """label -> sorted int64 faiss ids, and the ids flagged by a boolean column (e.g. predicted unseen)."""

    def __init__(self, labels: Sequence | np.ndarray | None, flags: np.ndarray | None = None) -> None:
        """``labels[i]``: the label of faiss id ``i`` (None: unlabelled); ``flags[i]``: a boolean per id."""
        self.sets: dict[str, np.ndarray] = {}
        if labels is not None:
            import pyarrow as pa

            col = pa.array(labels, pa.string()) if not isinstance(labels, (pa.Array, pa.ChunkedArray)) else labels
            if isinstance(col, pa.ChunkedArray):  # one dictionary over all chunks
                col = col.combine_chunks() if col.num_chunks else pa.array([], pa.string())
            enc = col.dictionary_encode()
            codes = enc.indices.to_numpy(zero_copy_only=False)
            codes = np.where(enc.indices.is_null().to_numpy(zero_copy_only=False), -1, codes).astype(np.int64)
            order = np.argsort(codes, kind="stable")
            bounds = np.searchsorted(codes[order], np.arange(len(enc.dictionary) + 1))
            for j, name in enumerate(enc.dictionary.to_pylist()):
                if bounds[j + 1] > bounds[j]:
                    self.sets[name] = order[bounds[j]:bounds[j + 1]].astype(np.int64)
        self.flagged = None if flags is None else np.flatnonzero(np.asarray(flags, bool)).astype(np.int64)

    def ids_of(self, labels: Iterable[str]) -> np.ndarray:
        """Sorted faiss ids whose label is one of ``labels`` (unknown labels match nothing)."""
        parts = [self.sets[x] for x in set(labels) if x in self.sets]
        if not parts:
            return np.zeros(0, np.int64)
        return parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.sets.items()}


def filtered_search(index: "faiss.Index", queries: np.ndarray, k: int, allowed: np.ndarray, *,
                    exact_max: int = EXACT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product among the faiss ids ``allowed`` (sorted, unique int64).

    Returns ``(scores, ids)`` of shape ``(nq, min(k, len(allowed)))``, best first; an approximate
    index may leave -1 ids only where no strategy could fill the row (never with Flat storage)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = as_matrix(queries, index.d, "queries")
    allowed = np.asarray(allowed, np.int64)
    kk = min(int(k), len(allowed))
    if kk == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    if len(allowed) <= exact_max:
        got = _exact_subset(index, q, kk, allowed)
        if got is not None:
            return got
    flat = _flat_storage(index)
    if flat is not None and len(allowed) <= max(exact_max, EXACT_SHARE * index.ntotal):
        # exact: the stored vectors scanned with the selector (a graph search strays from a
        # mid-sized set far from the query; a scan computes only the allowed rows' scores)
        faiss = import_faiss()
        return flat.search(q, kk, params=faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed)))
    try:
        scores, ids = _selector_search(index, q, kk, allowed)
    except RuntimeError as exc:  # wrappers (PreTransform, ...) that take no selector
        LOG.debug("selector search refused (%s); post-filtering", str(exc).strip().splitlines()[-1])
        scores, ids = None, None
    if ids is None or (ids < 0).any():
        scores, ids = _postfilter_search(index, q, kk, allowed)
    return scores, ids


def _exact_subset(index, q: np.ndarray, k: int, allowed: np.ndarray):
    """Exact search over the allowed ids' stored vectors; None if the index cannot give them back."""
    try:
        vecs = index.reconstruct_batch(allowed)
    except RuntimeError:
        return None
    scores, pos = exact_knn(vecs, q, k)
    return scores, allowed[pos]


def _selector_search(index, q: np.ndarray, k: int, allowed: np.ndarray):
    """faiss search with an ``IDSelectorBatch``, widening efSearch / nprobe until the rows fill."""
    faiss = import_faiss()
    sel = faiss.IDSelectorBatch(allowed)
    share = len(allowed) / max(1, index.ntotal)
    hnsw = _find(index, faiss.IndexHNSW)
    if hnsw is not None:
        ef = max(int(hnsw.hnsw.efSearch), 4 * k, int(8 * k / max(share, 1e-3)) if share < 0.5 else 0, 64)
        for _ in range(6):
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
            scores, ids = index.search(q, k, params=params)
            if not (ids < 0).any() or ef >= index.ntotal:
                break
            ef *= 4
        return scores, ids
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        nprobe = max(int(ivf.nprobe), 1)
        while True:
            params = faiss.SearchParametersIVF(sel=sel, nprobe=min(nprobe, ivf.nlist))
            scores, ids = index.search(q, k, params=params)
            if not (ids < 0).any() or nprobe >= ivf.nlist:
                return scores, ids
            nprobe *= 4
    return index.search(q, k, params=faiss.SearchParameters(sel=sel))


def _flat_storage(index):
    """The ``IndexFlat`` holding the vectors of a Flat or HNSW-Flat index (same ids), else None."""
    faiss = import_faiss()
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    return index if isinstance(index, faiss.IndexFlat) else None


def _find(index, cls):
    faiss = import_faiss()
    index = faiss.downcast_index(index)
    return index if isinstance(index, cls) else None


def _postfilter_search(index, q: np.ndarray, k: int, allowed: np.ndarray):
    """Plain searches of doubling width, filtered to ``allowed``, until each row has ``k`` hits."""
    fetch = max(8 * k, 100)
    while True:
        fetch = min(fetch, int(index.ntotal))
        s, i = index.search(q, fetch)
        ok = np.isin(i, allowed) & (i >= 0)
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        for r in range(len(q)):
            sel = np.flatnonzero(ok[r])[:k]
            out_s[r, :len(sel)], out_i[r, :len(sel)] = s[r, sel], i[r, sel]
        if not (out_i < 0).any() or fetch >= index.ntotal:
            return out_s, out_i
        fetch *= 4
