"""Searching FAISS indexes, and the exact ground truth they are measured against.

:func:`search` asks a built (or loaded) index for the top-k by inner product; :func:`set_search_params`
applies a faiss ``ParameterSpace`` string (``nprobe``, ``efSearch``, ...). :func:`exact_knn` is the
one brute-force k-NN of the project (numpy, streamed batch by batch, ties to the smaller id) and
:func:`recall_at_k` the one recall measure (ties at the k-th exact score count as hits when the
scores are exact): the tuner's figures, the tests and the benchmarks all use these two.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

import numpy as np

from pipeline.core.vectors import topk
from pipeline.index.common import as_matrix, factory_of, import_faiss

if TYPE_CHECKING:  # pragma: no cover
    import faiss

LOG = logging.getLogger(__name__)

__all__ = ["search", "set_search_params", "set_nprobe", "exact_knn", "recall_at_k"]


def set_nprobe(index: "faiss.Index", nprobe: int) -> int | None:
    """Set an IVF index's nprobe (also under OPQ); return the old one, or None if not IVF."""
    faiss = import_faiss()
    if int(nprobe) < 1:
        raise ValueError(f"nprobe must be >= 1, got {nprobe}")
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        LOG.debug("nprobe=%s ignored: not an IVF index", nprobe)
        return None
    old, ivf.nprobe = ivf.nprobe, int(nprobe)
    return old


def set_search_params(index: "faiss.Index", params: str) -> None:
    """Apply a faiss ``ParameterSpace`` string (``"nprobe=32"``, ``"efSearch=64"``,
    ``"nprobe=64,quantizer_efSearch=128"``; ``""`` sets nothing); ValueError naming a bad one."""
    if not params:
        return
    faiss = import_faiss()
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as exc:
        raise ValueError(f"cannot set search parameters {params!r} on a {factory_of(index)} index: "
                         f"{str(exc).strip().splitlines()[-1]}") from None


def search(index: "faiss.Index", queries: np.ndarray, k: int, *,
           nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product: FAISS's raw ``(scores float32, ids int64)``, shape (nq, k).

    ``k`` is clamped to ``index.ntotal``. Where fewer than ``k`` hits are found (IVF with a small
    nprobe) FAISS pads ids with -1 and scores with -inf; trimming them is the caller's choice.
    ``nprobe`` (IVF only; ignored otherwise) applies to this call and is then restored, so do
    not share one index between threads that pass different nprobe. A 1-D query is one row.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = as_matrix(queries, index.d, "queries")
    k = min(int(k), int(index.ntotal))
    if k == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    old = set_nprobe(index, nprobe) if nprobe is not None else None
    try:
        scores, ids = index.search(q, k)
    finally:
        if old is not None:
            set_nprobe(index, old)
    return scores, ids


def exact_knn(vectors: np.ndarray | Iterable[np.ndarray], queries: np.ndarray, k: int, *,
              exclude: np.ndarray | None = None, block: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product with numpy: ``(scores float32, ids int64)``, best first.

    ``vectors`` is one ``(n, dim)`` array or batches of rows in id order (a list, a re-iterable or
    a one-shot iterator: read once). Ties go to the smaller id. Streams: holds
    ``len(queries) * (block + k)`` scores at a time. ``exclude[i]`` (a row id) is never returned
    for query ``i`` (its own vector). Returns ``min(k, n)`` columns. A 1-D query is one row.

    >>> v = np.eye(3, dtype=np.float32)
    >>> exact_knn(v, np.array([[0.0, 0.6, 0.8]]), 2)[1]
    array([[2, 1]])
    >>> exact_knn([v[:2], v[2:]], np.array([[1.0, 1.0, 0.0]]), 2)[1]  # a tie: the smaller id first
    array([[0, 1]])
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = as_matrix(queries, np.shape(queries)[-1], "queries")
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    start = 0
    for b in ([vectors] if isinstance(vectors, np.ndarray) else vectors):
        b = np.asarray(b, np.float32)
        if b.ndim != 2 or b.shape[1] != q.shape[1]:
            raise ValueError(f"vectors: expected batches of shape (n, {q.shape[1]}), got {b.shape}")
        for s in range(0, len(b), block):
            part = b[s : s + block]
            sim = q @ part.T
            if exclude is not None:
                rows = np.nonzero((exclude >= start + s) & (exclude < start + s + len(part)))[0]
                sim[rows, exclude[rows] - start - s] = -np.inf
            top = topk(sim, k)[0]
            cat_s = np.concatenate([best_s, np.take_along_axis(sim, top, axis=1)], axis=1)
            cat_i = np.concatenate([best_i, top + (start + s)], axis=1)
            order = np.lexsort((cat_i, -cat_s), axis=1)[:, : min(k, cat_s.shape[1])]
            best_s = np.take_along_axis(cat_s, order, axis=1)
            best_i = np.take_along_axis(cat_i, order, axis=1)
        start += len(b)
    return best_s, best_i


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, *, approx_scores: np.ndarray | None = None,
                exact_scores: np.ndarray | None = None) -> float:
    """Recall@k of an approximate search, k being the columns of ``exact_ids`` (the exact top-k).

    The share of exact ids (ignoring -1 padding), over all rows, matched in the same row of
    ``approx_ids`` cut to its first k columns (-1 ignored). A match is the same id; with
    ``approx_scores`` (from an index that scores with the stored vectors, e.g. ``Flat`` storage)
    and ``exact_scores``, any returned vector scoring at least the k-th exact score (within 1e-5,
    relative) is one, so ties (duplicate images) are never misses (ann-benchmarks' rule).

    >>> recall_at_k(np.array([[1, 2, -1]]), np.array([[1, 3, 2]]))
    0.6666666666666666
    >>> recall_at_k(np.array([[4, 1]]), np.array([[1, 2]]), approx_scores=np.array([[0.9, 0.9]]),
    ...             exact_scores=np.array([[0.9, 0.9]]))  # 4 ties with the 2nd exact hit
    1.0
    """
    a, e = np.asarray(approx_ids), np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or len(a) != len(e):
        raise ValueError(f"need two 2-D id arrays with the same rows, got {a.shape} and {e.shape}")
    if (approx_scores is None) != (exact_scores is None):
        raise ValueError("give both approx_scores and exact_scores, or neither")
    k = e.shape[1]
    hits = total = 0
    for i, (ra, re_) in enumerate(zip(a[:, :k], e)):
        keep, want = ra >= 0, re_[re_ >= 0]
        if approx_scores is not None and len(want):
            kth = exact_scores[i, len(want) - 1]
            got = np.asarray(approx_scores[i][: ra.shape[0]])[keep]
            hits += min(len(want), int((got >= kth - 1e-5 * max(1.0, abs(kth))).sum()))
        else:
            hits += len(np.intersect1d(ra[keep], want))
        total += len(want)
    if total == 0:
        raise ValueError("exact_ids holds no valid ids (all -1 or empty)")
    return hits / total
