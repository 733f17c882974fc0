"""Vector helpers every layer shares: L2 normalisation and top-k with a fixed tie rule."""

from __future__ import annotations

import numpy as np


def l2n(x: np.ndarray, *, dtype=np.float32) -> np.ndarray:
    """Rows (the last axis) scaled to unit L2 norm; zero rows stay zero. ``dtype``: of the result
    (float32 by default; ``None`` keeps the input's).

    >>> l2n(np.array([[3.0, 4.0], [0.0, 0.0]]))
    array([[0.6, 0.8],
           [0. , 0. ]], dtype=float32)
    """
    x = np.asarray(x, dtype=dtype)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` best columns per row, best first (ties: lower index first).

    Partitions (linear time) then sorts only the k when there are many more columns than k; rows
    with a tie across the cut are redone with a stable full sort, so ties still go to lower indices.

    >>> topk(np.array([[0.1, 0.9, 0.9]]), 2)[0]
    array([[1, 2]])
    """
    k = min(k, scores.shape[1])
    if scores.shape[1] <= 4 * k or k == 0:
        idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return idx, np.take_along_axis(scores, idx, axis=1)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    cut = vals[:, -1:]
    tied = np.flatnonzero((scores == cut).sum(axis=1) > (vals == cut).sum(axis=1))
    if len(tied):
        idx[tied] = np.argsort(-scores[tied], axis=1, kind="stable")[:, :k]
        vals[tied] = np.take_along_axis(scores[tied], idx[tied], axis=1)
    return idx, vals
