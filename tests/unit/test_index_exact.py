"""pipeline.index.knn's ground truth, without faiss: the one exact k-NN (streamed, ties to the
smaller id) and the one recall@k (ties at the k-th exact score are hits when scores are exact)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.index.knn import exact_knn, recall_at_k


def _full_sort(v: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The definition: every score, sorted best first, ties by id (a stable sort of -score)."""
    sim = q @ v.T
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, order, axis=1), order


def test_streamed_batches_and_blocks_equal_one_full_sort():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((2500, 12)).astype(np.float32)
    q = rng.standard_normal((40, 12)).astype(np.float32)
    want_s, want_i = _full_sort(v, q, 25)
    for got in (exact_knn(v, q, 25), exact_knn([v[:900], v[900:1000], v[1000:]], q, 25, block=128),
                exact_knn(iter([v[:1234], v[1234:]]), q, 25, block=7)):
        np.testing.assert_array_equal(got[1], want_i)
        np.testing.assert_allclose(got[0], want_s, rtol=1e-5)
        assert got[0].dtype == np.float32 and got[1].dtype == np.int64


def test_ties_go_to_the_smaller_id_within_and_across_blocks():
    """Many equal vectors (duplicate images): the k best are the k smallest ids among the ties,
    whatever the block boundaries (argpartition alone picks among ties arbitrarily)."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal((1, 8)).astype(np.float32)
    v = np.repeat(base, 300, axis=0)
    v[::7] = rng.standard_normal((len(v[::7]), 8)).astype(np.float32) * 0.01  # weaker rows among the ties
    q = np.concatenate([base, -base])
    for block in (1, 13, 50, 300, 1000):
        s, i = exact_knn([v[:150], v[150:]], q, 10, block=block)
        want_s, want_i = _full_sort(v, q, 10)
        np.testing.assert_array_equal(i, want_i)
        np.testing.assert_allclose(s, want_s, rtol=1e-6)
    assert exact_knn(np.ones((5, 2), np.float32), np.ones((1, 2)), 3)[1].tolist() == [[0, 1, 2]]


def test_exclude_leaves_each_query_out_and_k_is_clamped():
    rng = np.random.default_rng(2)
    v = rng.standard_normal((50, 4)).astype(np.float32)
    rows = np.array([0, 49, 7])
    s, i = exact_knn([v[:20], v[20:]], v[rows], 5, exclude=rows, block=9)
    assert not (i == rows[:, None]).any()
    _, want = _full_sort(v, v[rows], 6)
    for r in range(len(rows)):
        np.testing.assert_array_equal(i[r], want[r][want[r] != rows[r]][:5])
    assert exact_knn(v, v[0], 500)[1].shape == (1, 50)  # a 1-D query is one row; k clamped to n


def test_bad_inputs_are_named():
    v = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="k must be"):
        exact_knn(v, v, 0)
    with pytest.raises(ValueError, match=r"batches of shape \(n, 3\)"):
        exact_knn([np.eye(2, dtype=np.float32)], v, 1)
    with pytest.raises(ValueError, match="row 1 has NaN"):
        exact_knn(v, np.array([[1, 0, 0], [np.nan, 0, 0]]), 1)


def test_recall_by_ids_ignores_padding_and_cuts_to_k():
    assert recall_at_k(np.array([[1, 2, -1]]), np.array([[1, 3, 2]])) == 2 / 3
    assert recall_at_k(np.array([[5, 1, 2]]), np.array([[1, 2]])) == 0.5  # only the first k=2 returned count
    assert recall_at_k(np.array([[1, 1], [3, 4]]), np.array([[1, 2], [4, -1]])) == 2 / 3  # a repeat counts once
    with pytest.raises(ValueError, match="no valid ids"):
        recall_at_k(np.array([[1]]), np.array([[-1]]))
    with pytest.raises(ValueError, match="same rows"):
        recall_at_k(np.array([[1]]), np.array([[1], [2]]))


def test_recall_with_exact_scores_counts_ties_at_the_kth_score_as_hits():
    """Duplicates: the index returns id 9, an equal of exact id 2 — a hit by score, a miss by id."""
    exact_ids, exact_s = np.array([[1, 2]]), np.array([[0.9, 0.5]], np.float32)
    got, got_s = np.array([[1, 9]]), np.array([[0.9, 0.5]], np.float32)
    assert recall_at_k(got, exact_ids) == 0.5
    assert recall_at_k(got, exact_ids, approx_scores=got_s, exact_scores=exact_s) == 1.0
    worse = np.array([[0.9, 0.49]], np.float32)  # below the k-th exact score: a miss
    assert recall_at_k(got, exact_ids, approx_scores=worse, exact_scores=exact_s) == 0.5
    with pytest.raises(ValueError, match="both"):
        recall_at_k(got, exact_ids, approx_scores=got_s)
