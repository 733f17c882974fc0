"""Calibrated stacking for GZSL (Chao et al., ECCV 2016) and the validation split to tune it.

A GZSL model trained on seen classes scores them too high, so almost every test image is predicted
as a seen class. Calibrated stacking subtracts a constant ``gamma`` from every seen-class score.

``gamma`` is a hyper-parameter and must be chosen **without test-unseen labels**. Following Xian et
al. ("ZSL - the Good, the Bad and the Ugly"), the caller splits the *seen* classes class-wise with
:func:`split_seen_classes` into pseudo-seen classes (trained on) and pseudo-unseen classes (held
out), trains on ``train_mask``, scores the ``val_mask`` samples and passes those scores to
:func:`tune_gamma`. Nothing in this module accepts, or may be given, labels or scores of test
samples of unseen classes: ``tune_gamma`` only ever sees the validation set built from seen
classes.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

LOG = logging.getLogger(__name__)

__all__ = ["apply_calibrated_stacking", "tune_gamma", "split_seen_classes"]

_TIE_TOL = 1e-12


def apply_calibrated_stacking(scores: np.ndarray, seen_mask: np.ndarray, gamma: float, *,
                              inplace: bool = False) -> np.ndarray:
    """Return ``scores - gamma * seen_mask``: a new float64 array (the input is not modified), or,
    with ``inplace``, ``scores`` itself (float32 or wider, writeable) changed in its own dtype in one
    broadcast pass, for bulk labeling where a float64 copy would double the memory of every batch.

    Args:
        scores: ``(n, C)`` class scores.
        seen_mask: ``(C,)`` boolean, True for seen-class columns.
        gamma: amount subtracted from every seen-class score.
        inplace: subtract in place (a copy is made only if ``scores`` is read-only or narrower than float32).
    """
    if inplace:
        arr = np.asarray(scores, dtype=np.result_type(scores, np.float32))
        if not arr.flags.writeable:
            arr = arr.copy()
    else:
        arr = np.asarray(scores, dtype=np.float64)
    mask = np.asarray(seen_mask)
    if arr.ndim != 2:
        raise ValueError(f"scores must be 2-D (n, C), got shape {arr.shape}")
    if mask.dtype != np.bool_:
        raise ValueError(f"seen_mask must be boolean, got dtype {mask.dtype}")
    if mask.shape != (arr.shape[1],):
        raise ValueError(f"seen_mask shape {mask.shape} does not match {arr.shape[1]} score columns")
    g = float(gamma)
    if not np.isfinite(g):
        raise ValueError(f"gamma must be finite, got {gamma!r}")
    offsets = np.where(mask, g, 0.0)
    if inplace:
        arr -= offsets.astype(arr.dtype)
        return arr
    return arr - offsets  # a new array; seen columns get exactly s - g


def tune_gamma(
    scores_val: np.ndarray,
    y_val: np.ndarray,
    seen_idx: Sequence[int],
    unseen_idx: Sequence[int],
    n_points: int = 200,
) -> tuple[float, dict[str, Any]]:
    """Pick the ``gamma`` that maximises GZSL ``H`` on a validation set built from seen classes.

    Args:
        scores_val: ``(n_val, C)`` scores of the validation samples.
        y_val: their labels (column indices), each in ``seen_idx`` or ``unseen_idx``.
        seen_idx: columns of the pseudo-seen classes (those the model was trained on).
        unseen_idx: columns of the pseudo-unseen classes (seen classes held out from training).
        n_points: size of the gamma grid (``gamma = 0`` is always added to it).

    Returns:
        ``(gamma, info)`` with ``info = {"seen", "unseen", "H", "gammas", "H_grid"}``: the
        validation accuracies at the chosen gamma, the grid searched and ``H`` along it. Ties
        are broken towards the smallest ``|gamma|``.
    """
    s, y = _scores(scores_val, y_val)
    if s.shape[0] == 0:
        raise ValueError("tune_gamma got an empty validation set")
    if int(n_points) < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    seen, unseen, is_seen, is_unseen = _check_split(s, y, seen_idx, unseen_idx)
    if not is_seen.any() or not is_unseen.any():
        raise ValueError(f"validation set needs samples of both pseudo-seen and pseudo-unseen "
                         f"classes, got {int(is_seen.sum())} and {int(is_unseen.sum())}")
    gammas = np.union1d(_gamma_grid(s, seen, unseen, int(n_points)), [0.0])
    acc_s, acc_u = _sweep(s, y, seen, unseen, is_seen, is_unseen, gammas)
    tot = acc_s + acc_u
    h = np.divide(2 * acc_s * acc_u, tot, out=np.zeros_like(tot), where=tot > 0)
    best = np.nanmax(h)
    cands = np.flatnonzero(h >= best - _TIE_TOL)
    i = int(min(cands, key=lambda k: (abs(gammas[k]), gammas[k])))
    info = {
        "seen": float(acc_s[i]),
        "unseen": float(acc_u[i]),
        "H": float(h[i]),
        "gammas": gammas.tolist(),
        "H_grid": h.tolist(),
    }
    LOG.debug("tuned gamma=%.6g val S=%.4f U=%.4f H=%.4f", gammas[i], acc_s[i], acc_u[i], h[i])
    return float(gammas[i]), info


def split_seen_classes(
    labels: np.ndarray,
    seen_classes: Sequence[int],
    *,
    val_class_fraction: float,
    val_sample_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """Class-wise split of the seen classes into pseudo-seen / pseudo-unseen (Xian et al.).

    A seeded random ``round(val_class_fraction * k)`` of the ``k`` seen classes (at least 1, at
    most ``k - 2``) becomes pseudo-unseen: all their samples go to validation. From each
    pseudo-seen class ``round(val_sample_fraction * n_c)`` samples (at least 1 and at most
    ``n_c - 1`` when ``n_c >= 2``) also go to validation; the rest form the training set.
    Samples whose label is not in ``seen_classes`` are in neither mask.

    Args:
        labels: class index per sample (training pool, seen classes only in practice).
        seen_classes: the seen classes to split; at least 3.
        val_class_fraction: fraction of seen classes held out as pseudo-unseen, in (0, 1).
        val_sample_fraction: fraction of each pseudo-seen class's samples for validation, in (0, 1).
        seed: random seed; the split is a deterministic function of all arguments.

    Returns:
        ``(train_mask, val_mask, pseudo_seen, pseudo_unseen)``; masks are boolean over samples,
        class lists are sorted.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    classes = sorted({int(c) for c in seen_classes})
    if len(classes) < 3:
        raise ValueError(f"need at least 3 seen classes to split, got {classes}")
    for name, frac in (("val_class_fraction", val_class_fraction),
                       ("val_sample_fraction", val_sample_fraction)):
        if not 0.0 < float(frac) < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {frac!r}")
    rng = np.random.default_rng(seed)
    k = len(classes)
    n_unseen = min(max(1, int(round(val_class_fraction * k))), k - 2)
    chosen = rng.choice(np.array(classes), size=n_unseen, replace=False)
    pseudo_unseen = sorted(int(c) for c in chosen)
    pseudo_seen = [c for c in classes if c not in set(pseudo_unseen)]

    train_mask = np.zeros(y.shape[0], dtype=bool)
    val_mask = np.isin(y, pseudo_unseen)
    for c in pseudo_seen:
        idx = np.flatnonzero(y == c)
        n_c = idx.size
        n_val = 0
        if n_c >= 2:
            n_val = min(max(1, int(round(val_sample_fraction * n_c))), n_c - 1)
        picked = rng.permutation(idx)
        val_mask[picked[:n_val]] = True
        train_mask[picked[n_val:]] = True
    LOG.debug("split %d seen classes: %d pseudo-seen, %d pseudo-unseen; %d train, %d val samples",
              k, len(pseudo_seen), len(pseudo_unseen), int(train_mask.sum()), int(val_mask.sum()))
    return train_mask, val_mask, pseudo_seen, pseudo_unseen


# ---- shared validation and the O(n)-per-gamma sweep (also used by pipeline.zsl.metrics) ----


def _labels(y: np.ndarray, name: str = "y_true") -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
    return arr


def _scores(scores: np.ndarray, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = _labels(y_true)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (n, C), got shape {s.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores has {s.shape[0]} rows but y_true has {y.shape[0]} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    if y.size and (y.min() < 0 or y.max() >= s.shape[1]):
        raise ValueError(f"y_true holds column indices outside [0, {s.shape[1]}): {np.unique(y)}")
    return s, y


def _index(idx: Sequence[int], n_cols: int, name: str) -> np.ndarray:
    arr = np.unique(np.asarray(list(idx), dtype=np.int64))
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.min() < 0 or arr.max() >= n_cols:
        raise ValueError(f"{name} holds column indices outside [0, {n_cols}): {arr.tolist()}")
    return arr


def _check_split(s: np.ndarray, y: np.ndarray, seen_idx: Sequence[int], unseen_idx: Sequence[int]):
    seen = _index(seen_idx, s.shape[1], "seen_idx")
    unseen = _index(unseen_idx, s.shape[1], "unseen_idx")
    both = np.intersect1d(seen, unseen)
    if both.size:
        raise ValueError(f"classes in both seen_idx and unseen_idx: {both.tolist()}")
    bad = np.setdiff1d(np.unique(y), np.union1d(seen, unseen))
    if bad.size:
        raise ValueError(f"labels in neither seen_idx nor unseen_idx: {bad.tolist()}")
    return seen, unseen, np.isin(y, seen), np.isin(y, unseen)


def _class_mean_fn(y: np.ndarray, sel: np.ndarray):
    """``correct -> per-class mean accuracy over the samples in sel`` (nan if none), vectorised."""
    if not sel.any():
        return lambda correct: float("nan")
    _, inv, counts = np.unique(y[sel], return_inverse=True, return_counts=True)
    return lambda correct: float(np.mean(np.bincount(inv, weights=correct[sel]) / counts))


def _sweep(s, y, seen, unseen, is_seen, is_unseen, gammas: np.ndarray):
    """Seen/unseen per-class accuracies for each gamma, in O(n) per gamma."""
    rows = np.arange(len(s))
    col_s = seen[np.argmax(s[:, seen], axis=1)]
    col_u = unseen[np.argmax(s[:, unseen], axis=1)]
    best_s, best_u = s[rows, col_s], s[rows, col_u]
    tie_seen = col_s < col_u  # argmax over all columns breaks ties towards the lower index
    mean_s, mean_u = _class_mean_fn(y, is_seen), _class_mean_fn(y, is_unseen)
    acc_s, acc_u = np.empty(len(gammas)), np.empty(len(gammas))
    for i, g in enumerate(gammas):
        cal = best_s - g
        pick_seen = (cal > best_u) | ((cal == best_u) & tie_seen)
        correct = np.where(pick_seen, col_s, col_u) == y
        acc_s[i], acc_u[i] = mean_s(correct), mean_u(correct)
    return acc_s, acc_u


def _gamma_grid(s: np.ndarray, seen: np.ndarray, unseen: np.ndarray, n_points: int) -> np.ndarray:
    gap = s[:, seen].max(axis=1) - s[:, unseen].max(axis=1)
    lo, hi = float(gap.min()), float(gap.max())
    margin = max(0.05 * (hi - lo), 1e-6 * max(1.0, abs(lo), abs(hi)))
    return np.linspace(lo - margin, hi + margin, n_points)
