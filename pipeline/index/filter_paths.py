"""The ways :class:`pipeline.index.filters.FilteredIndex` searches among an allowed id set.

Each function takes float32 queries ``(nq, d)``, a ``k`` already cut to the set's size and the
sorted int64 ids, and returns ``(scores, ids)``, best first. :func:`exact_by_ids` scores the
allowed rows where the Flat storage keeps them (faiss ``knn_inner_products_by_idx``: no copy, no
BLAS threads); :class:`SubsetCopy` is a contiguous float16 copy of one large set, scanned by faiss
and its best candidates rescored exactly; :func:`selector_search` is the index's own search with
a bitmap selector (HNSW ``efSearch`` / IVF ``nprobe`` widened until the rows fill);
:func:`postfilter_search` the last resort. :func:`merge_hits` joins the answers of several sets.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.index.common import import_faiss
from pipeline.index.knn import exact_knn

LOG = logging.getLogger(__name__)

__all__ = ["stored_vectors", "exact_by_ids", "SubsetCopy", "selector_search", "postfilter_search", "merge_hits",
           "empty_hits"]

#: a float16 copy's best ``max(RESCORE_FACTOR * k, RESCORE_MIN)`` candidates are rescored exactly
RESCORE_FACTOR, RESCORE_MIN = 4, 64
_COPY_CHUNK = 65_536  # rows gathered and encoded at a time while a copy is made


def empty_hits(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` columns of no hit (score -inf, id -1) per query."""
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)


def stored_vectors(index) -> np.ndarray | None:
    """A zero-copy ``(ntotal, d)`` float32 view of a Flat or HNSW-Flat index's stored vectors
    (valid while the index lives and gains no rows), else None."""
    faiss = import_faiss()
    flat = faiss.downcast_index(index)
    if isinstance(flat, faiss.IndexHNSW):
        flat = faiss.downcast_index(flat.storage)
    if not isinstance(flat, faiss.IndexFlat) or flat.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def exact_by_ids(xb: np.ndarray | None, index, q: np.ndarray, k: int, ids: np.ndarray):
    """Exact top-``k`` among ``ids``: scored in place in the stored vectors ``xb``, else over the
    vectors ``index`` reconstructs; None when it cannot give them back."""
    if xb is None:
        try:
            vecs = index.reconstruct_batch(ids)
        except RuntimeError:
            return None
        scores, pos = exact_knn(vecs, q, k)
        return scores, ids[pos]
    return _knn_by_ids(xb, q, k, ids, shared=True)


def _knn_by_ids(xb: np.ndarray, q: np.ndarray, k: int, ids: np.ndarray, *, shared: bool):
    """faiss ``knn_inner_products_by_idx``: ``ids`` one set for all queries (``shared``) or one row
    of ``ids`` per query; returns the ids themselves, best first."""
    faiss = import_faiss()
    ids = np.ascontiguousarray(ids, np.int64)
    scores = np.empty((len(q), k), np.float32)
    out = np.empty((len(q), k), np.int64)
    nsub = ids.shape[-1]
    faiss.knn_inner_products_by_idx(faiss.swig_ptr(q), faiss.swig_ptr(xb), faiss.swig_ptr(ids), xb.shape[1],
                                    len(q), xb.shape[0], nsub, k, faiss.swig_ptr(scores), faiss.swig_ptr(out),
                                    0 if shared else nsub)
    return scores, out


class SubsetCopy:
    """One large id set's vectors, copied contiguously as float16 (half the bytes of float32, read
    in order instead of gathered; the indexed vectors are L2-normalised, well inside float16's
    range): faiss scans the copy, and the best candidates are rescored exactly in the stored
    vectors, so the scores are the index's own."""

    def __init__(self, xb: np.ndarray, ids: np.ndarray) -> None:
        faiss = import_faiss()
        self.ids = ids
        self.codes = faiss.IndexScalarQuantizer(xb.shape[1], faiss.ScalarQuantizer.QT_fp16,
                                                faiss.METRIC_INNER_PRODUCT)
        for s in range(0, len(ids), _COPY_CHUNK):
            self.codes.add(np.ascontiguousarray(xb[ids[s:s + _COPY_CHUNK]]))

    @property
    def nbytes(self) -> int:
        return int(self.codes.ntotal) * int(self.codes.code_size)

    def search(self, xb: np.ndarray, q: np.ndarray, k: int):
        """Exact top-``k`` of the set (up to float16 rounding in the candidates' order)."""
        fetch = min(len(self.ids), max(RESCORE_FACTOR * k, RESCORE_MIN))
        _, pos = self.codes.search(q, fetch)
        cand = self.ids[np.maximum(pos, 0)]  # fetch <= len(ids): every row is filled
        return _knn_by_ids(xb, q, k, cand, shared=False)


def bitmap_selector(ids: np.ndarray, ntotal: int):
    """A faiss ``IDSelectorBitmap`` of ``ids`` (an O(1) test per id; ~1 ms to build at 1M rows) and
    the bitmap it points to, which the caller keeps alive while the selector is used."""
    faiss = import_faiss()
    mask = np.zeros(ntotal, bool)
    mask[ids] = True
    bits = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(ntotal, faiss.swig_ptr(bits)), bits


def selector_search(index, q: np.ndarray, k: int, ids: np.ndarray):
    """The index's own search with a bitmap selector, widening efSearch / nprobe until the rows fill."""
    faiss = import_faiss()
    sel, _bits = bitmap_selector(ids, int(index.ntotal))
    share = len(ids) / max(1, index.ntotal)
    hnsw = faiss.downcast_index(index)
    if isinstance(hnsw, faiss.IndexHNSW):
        ef = max(int(hnsw.hnsw.efSearch), 4 * k, int(8 * k / max(share, 1e-3)) if share < 0.5 else 0, 64)
        for _ in range(6):
            scores, out = index.search(q, k, params=faiss.SearchParametersHNSW(sel=sel, efSearch=ef))
            if not (out < 0).any() or ef >= index.ntotal:
                break
            ef *= 4
        return scores, out
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        nprobe = max(int(ivf.nprobe), 1)
        while True:
            params = faiss.SearchParametersIVF(sel=sel, nprobe=min(nprobe, ivf.nlist))
            scores, out = index.search(q, k, params=params)
            if not (out < 0).any() or nprobe >= ivf.nlist:
                return scores, out
            nprobe *= 4
    return index.search(q, k, params=faiss.SearchParameters(sel=sel))


def postfilter_search(index, q: np.ndarray, k: int, ids: np.ndarray):
    """Plain searches of growing width, filtered to ``ids``, until each row has ``k`` hits."""
    fetch = max(8 * k, 100)
    while True:
        fetch = min(fetch, int(index.ntotal))
        s, i = index.search(q, fetch)
        ok = np.isin(i, ids) & (i >= 0)
        out_s, out_i = empty_hits(len(q), k)
        for r in range(len(q)):
            sel = np.flatnonzero(ok[r])[:k]
            out_s[r, :len(sel)], out_i[r, :len(sel)] = s[r, sel], i[r, sel]
        if not (out_i < 0).any() or fetch >= index.ntotal:
            return out_s, out_i
        fetch *= 4


def merge_hits(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` distinct ids per query over the answers of several sets (the top-k of a union
    is among the union of the sets' top-k); as many columns as the fullest row has, -1 padded."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    rows = []
    for s, i in zip(scores, ids):
        order = np.lexsort((i, -s))
        s, i = s[order], i[order]
        first = np.sort(np.unique(i, return_index=True)[1])  # an id found in several sets counts once
        first = first[i[first] >= 0][:k]
        rows.append((s[first], i[first]))
    width = max(len(r[1]) for r in rows)
    out_s, out_i = empty_hits(len(rows), width)
    for r, (s, i) in enumerate(rows):
        out_s[r, :len(s)], out_i[r, :len(i)] = s, i
    return out_s, out_i
