"""Filtered search that keeps recall: per-label id sets and a search restricted to an allowed id set.

Filtering the top ``4k`` candidates after the search loses most hits of rare labels (a label on
0.1 % of the rows rarely has one of them among the first 100). Instead :class:`LabelSets` maps each
label to its sorted faiss ids (built once, from the id table's ``label`` column or from the predicted
labels) and :class:`FilteredIndex` searches only the allowed ids. Never fewer than
``min(k, len(allowed))`` hits per query. Which way, by the set's size (a list of sets, e.g. one per
label and label source, is searched set by set and merged):

1. up to ``EXACT_MAX`` (10,000) ids: exact, each allowed row scored where the Flat storage keeps it
   (faiss ``knn_inner_products_by_idx``: no gathered copy, no BLAS threads); an index without Flat
   storage reconstructs the rows;
2. a set copied by :meth:`FilteredIndex.prepare` (``zsl serve`` does it at load for every label
   set above ``EXACT_MAX``, largest first, up to a float16 copy of every row, i.e. half the stored
   vectors' bytes): a faiss scan of the contiguous float16 copy, its best ``max(4k, 64)`` rescored
   exactly in the stored vectors;
3. other sets up to ``EXACT_SHARE`` (a quarter) of the rows, with Flat storage: as 1;
4. else the index's own search with a faiss ``IDSelectorBitmap`` (HNSW ``efSearch``, IVF ``nprobe``
   widened until every query has its hits), and as a last resort an ever wider plain search, filtered.

Measured (``benchmarks/bench_filters.py``'s 1M x 128-d ``HNSW32,Flat`` index, one thread, single
queries, 2 shared cores; p50 / p99 ms): in place 0.19 / 0.8 for 5k random ids, 0.41 / 1.1 for 10k,
1.95 / 2.8 for 20k, 5.9 / 7.3 for 50k, 22.8 / 25.5 for 230k (~100 ns per id once the rows leave the
cache); the float16 copy 0.07 / 0.15 for 5k, 0.19 / 0.35 for 20k, 0.40 / 0.78 for 50k, 3.0 / 3.4 for
230k (made in 131 ms, 59 MB); the unfiltered search (efSearch 3584 for recall@10 0.95) 15 / 43.
Hence ``EXACT_MAX``: a copy costs 2·d bytes per row and pays off from ~10k ids. HNSW's own search
with a selector is no substitute for a set that is a region of the space away from the query
(recall@10 0.03-0.5 for labels of 0.05-23 % of the rows whose rows cluster, even with efSearch x4 or
entry points taken inside the set; 0.80-0.96 for the same labels spread at random), and an
``IDSelectorBatch`` alone took 16 ms to build for 230k ids (a bitmap: 0.5 ms, built per query, not
cached: only step 4 uses it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from pipeline.index.common import as_matrix
from pipeline.index.filter_paths import (SubsetCopy, empty_hits, exact_by_ids, merge_hits, postfilter_search,
                                         selector_search, stored_vectors)

if TYPE_CHECKING:  # pragma: no cover
    import faiss

LOG = logging.getLogger(__name__)

__all__ = ["LabelSets", "FilteredIndex", "filtered_search", "EXACT_MAX"]

#: sets up to this many ids: exact, scored in place in the stored vectors
EXACT_MAX = 10_000
#: larger sets without a copy, up to this share of the rows: exact as well (Flat storage)
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


class FilteredIndex:
    """A faiss index ready for searches among allowed ids: a view of its stored vectors and, made
    ahead by :meth:`prepare`, float16 copies of the sets larger than ``exact_max``. Searches only
    read, so threads may share one."""

    def __init__(self, index: "faiss.Index", *, exact_max: int = EXACT_MAX) -> None:
        self.index, self.exact_max = index, int(exact_max)
        self._copies: dict[int, SubsetCopy] = {}
        self._xb, self._xb_rows = None, -1

    @property
    def xb(self) -> np.ndarray | None:
        """The stored vectors (a zero-copy view; None without Flat storage), looked up again if the index grew."""
        if self._xb_rows != self.index.ntotal:
            self._xb, self._xb_rows = stored_vectors(self.index), int(self.index.ntotal)
        return self._xb

    @property
    def copy_bytes(self) -> int:
        return sum(c.nbytes for c in self._copies.values())

    def prepare(self, sets: Iterable[np.ndarray], *, max_bytes: int | None = None) -> int:
        """Copy the sets of more than ``exact_max`` ids (largest first) while the copies fit in
        ``max_bytes`` (default: a float16 copy of every row, half the stored vectors); later
        searches with the same array objects (e.g. :attr:`LabelSets.sets` values) scan the copy.
        Returns the number of sets copied."""
        xb = self.xb
        if xb is None:  # no Flat storage: the index's own search with a selector
            return 0
        budget = 2 * xb.size if max_bytes is None else int(max_bytes)
        used, made = self.copy_bytes, 0
        for ids in sorted((s for s in sets if len(s) > self.exact_max), key=len, reverse=True):
            need = 2 * len(ids) * xb.shape[1]
            if id(ids) in self._copies or used + need > budget:
                continue
            self._copies[id(ids)] = SubsetCopy(xb, self._checked(ids))
            used, made = used + need, made + 1
        if made:
            LOG.info("filters: %d large id set(s) copied as float16 (%.1f MB)", made, used / 2**20)
        return made

    def search(self, queries: np.ndarray, k: int, allowed) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product among the allowed ids: one sorted, unique int64 array, or a
        list of them (the union; e.g. one per label). Returns ``(scores, ids)`` with
        ``min(k, allowed)`` columns, best first; an approximate index may leave -1 ids only where no
        strategy could fill the row (never with Flat storage)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = as_matrix(queries, self.index.d, "queries")
        parts = allowed if isinstance(allowed, (list, tuple)) else [allowed]
        parts = [p for p in (np.asarray(p, np.int64) for p in parts) if len(p)]
        if not parts:
            return empty_hits(len(q), 0)
        if len(parts) == 1:
            return self._search_set(q, int(k), parts[0])
        return merge_hits([self._search_set(q, int(k), p) for p in parts], int(k))

    def _checked(self, ids: np.ndarray) -> np.ndarray:
        lo, hi = int(ids.min()), int(ids.max())  # the exact paths read the rows these ids name
        if lo < 0 or hi >= self.index.ntotal:
            raise ValueError(f"allowed ids must be faiss ids in [0, {self.index.ntotal}), got {lo} .. {hi}")
        return ids

    def _search_set(self, q: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kk = min(k, len(ids))
        copy = self._copies.get(id(ids))
        if copy is not None and copy.ids is ids:
            return copy.search(self.xb, q, kk)
        xb = self.xb
        self._checked(ids)
        if len(ids) <= self.exact_max or (xb is not None and len(ids) <= EXACT_SHARE * self.index.ntotal):
            got = exact_by_ids(xb, self.index, q, kk, ids)
            if got is not None:
                return got
        try:
            scores, out = selector_search(self.index, q, kk, ids)
        except RuntimeError as exc:  # wrappers (PreTransform, ...) that take no selector
            LOG.debug("selector search refused (%s); post-filtering", str(exc).strip().splitlines()[-1])
            scores, out = None, None
        if out is None or (out < 0).any():
            scores, out = postfilter_search(self.index, q, kk, ids)
        return scores, out


def filtered_search(index: "faiss.Index", queries: np.ndarray, k: int, allowed, *,
                    exact_max: int = EXACT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`FilteredIndex.search` without prepared copies (one-shot searches, tests)."""
    return FilteredIndex(index, exact_max=exact_max).search(queries, k, allowed)
