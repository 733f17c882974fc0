"""Standard ZSL / GZSL evaluation protocol.

Follows Xian et al., "Zero-Shot Learning - the Good, the Bad and the Ugly" (TPAMI 2018):

* every accuracy is the **mean of per-class top-1 accuracies**, never the sample accuracy;
* **ZSL**: test samples of unseen classes, prediction restricted to the unseen columns;
* **GZSL**: prediction over all (seen and unseen) columns; ``S`` is the per-class mean over test
  samples of seen classes, ``U`` the same over test samples of unseen classes, and
  ``H = 2 S U / (S + U)``;
* **calibrated stacking** (Chao et al., ECCV 2016) subtracts ``gamma`` from the seen columns;
  sweeping ``gamma`` traces the seen-unseen accuracy curve whose area is **AUSUC**.

Scores are an ``(n, C)`` matrix whose columns are class indices; labels are column indices.

A test set may contain no samples of seen classes (many ZSL splits only hold out unseen-class
images). Then the GZSL seen accuracy is ``nan``, ``H`` is ``nan`` and AUSUC is ``nan``: these are
reported as ``nan`` rather than as a number that would look like a measurement.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.zsl.calibration import (
    _check_split, _class_mean_fn, _gamma_grid, _index, _labels, _scores, _sweep,
    apply_calibrated_stacking,
)

LOG = logging.getLogger(__name__)

__all__ = [
    "GZSLResult", "per_class_accuracy", "mean_per_class_accuracy", "harmonic_mean", "zsl_accuracy",
    "gzsl_accuracy", "seen_unseen_curve", "ausuc", "confusion_matrix", "evaluate_scores",
]


@dataclass
class GZSLResult:
    """GZSL accuracies: per-class mean on seen and unseen test classes and their harmonic mean."""

    seen: float
    unseen: float
    H: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def per_class_accuracy(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[int] | None = None
) -> dict[int, float]:
    """Top-1 accuracy of each class, over the samples whose true label is that class.

    Args:
        y_true: true class index per sample.
        y_pred: predicted class index per sample.
        classes: classes to report; default every class present in ``y_true``. Classes with no
            samples are skipped.
    """
    yt, yp = _labels(y_true), _labels(y_pred, "y_pred")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true shape {yt.shape} != y_pred shape {yp.shape}")
    wanted = np.unique(yt) if classes is None else [int(c) for c in classes]
    out: dict[int, float] = {}
    for c in wanted:
        sel = yt == c
        n = int(sel.sum())
        if n:
            out[int(c)] = float((yp[sel] == c).sum() / n)
    return out


def mean_per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the classes present in ``y_true`` of their top-1 accuracy."""
    accs = per_class_accuracy(y_true, y_pred)
    if not accs:
        raise ValueError("mean_per_class_accuracy got empty y_true")
    return float(np.mean(list(accs.values())))


def harmonic_mean(seen: float, unseen: float) -> float:
    """``2 S U / (S + U)``; 0 when both are 0, ``nan`` if either is ``nan``."""
    s, u = float(seen), float(unseen)
    if math.isnan(s) or math.isnan(u):
        return float("nan")
    if s < 0 or u < 0:
        raise ValueError(f"accuracies must be >= 0, got seen={s}, unseen={u}")
    return 0.0 if s + u == 0 else 2.0 * s * u / (s + u)


def _mean_or_nan(y: np.ndarray, pred: np.ndarray, sel: np.ndarray) -> float:
    return _class_mean_fn(y, sel)(pred == y)


def zsl_accuracy(scores: np.ndarray, y_true: np.ndarray, unseen_idx: Sequence[int]) -> float:
    """Conventional ZSL accuracy: argmax over the unseen columns only, per-class mean top-1.

    Every label must be one of ``unseen_idx``; scores of other (seen) columns are ignored.
    """
    s, y = _scores(scores, y_true)
    unseen = _index(unseen_idx, s.shape[1], "unseen_idx")
    bad = np.setdiff1d(np.unique(y), unseen)
    if bad.size:
        raise ValueError(f"zsl_accuracy labels not in unseen_idx: {bad.tolist()}")
    pred = unseen[np.argmax(s[:, unseen], axis=1)]
    return mean_per_class_accuracy(y, pred)


def _gzsl_predict(s: np.ndarray, seen: np.ndarray, unseen: np.ndarray, gamma: float) -> np.ndarray:
    mask = np.zeros(s.shape[1], dtype=bool)
    mask[seen] = True
    cal = apply_calibrated_stacking(s, mask, gamma)
    other = np.setdiff1d(np.arange(s.shape[1]), np.union1d(seen, unseen))
    cal[:, other] = -np.inf  # columns of neither kind can never be predicted
    return np.argmax(cal, axis=1)


def gzsl_accuracy(
    scores: np.ndarray,
    y_true: np.ndarray,
    seen_idx: Sequence[int],
    unseen_idx: Sequence[int],
    gamma: float = 0.0,
) -> GZSLResult:
    """GZSL accuracies after calibrated stacking with ``gamma`` (0 = uncalibrated).

    Prediction is the argmax over all seen and unseen columns. ``seen``/``unseen`` are ``nan``
    when the test set holds no samples of that kind, and ``H`` is then ``nan`` too.
    """
    s, y = _scores(scores, y_true)
    seen, unseen, is_seen, is_unseen = _check_split(s, y, seen_idx, unseen_idx)
    pred = _gzsl_predict(s, seen, unseen, float(gamma))
    acc_s, acc_u = _mean_or_nan(y, pred, is_seen), _mean_or_nan(y, pred, is_unseen)
    return GZSLResult(seen=acc_s, unseen=acc_u, H=harmonic_mean(acc_s, acc_u))


def seen_unseen_curve(
    scores: np.ndarray,
    y_true: np.ndarray,
    seen_idx: Sequence[int],
    unseen_idx: Sequence[int],
    n_points: int = 200,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sweep calibrated-stacking ``gamma`` and return ``(gammas, seen_acc, unseen_acc)``.

    The grid spans from below the smallest to above the largest per-sample gap
    ``max seen score - max unseen score`` (plus a margin), so its first point predicts every sample
    as seen and its last every sample as unseen.
    """
    if int(n_points) < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    s, y = _scores(scores, y_true)
    if s.shape[0] == 0:
        raise ValueError("seen_unseen_curve got no samples")
    seen, unseen, is_seen, is_unseen = _check_split(s, y, seen_idx, unseen_idx)
    gammas = _gamma_grid(s, seen, unseen, int(n_points))
    acc_s, acc_u = _sweep(s, y, seen, unseen, is_seen, is_unseen, gammas)
    return gammas, acc_s, acc_u


def ausuc(seen_acc: Sequence[float], unseen_acc: Sequence[float]) -> float:
    """Area under the seen (y) vs unseen (x) accuracy curve (Chao et al. 2016).

    Points are sorted by unseen accuracy; the curve is extended horizontally to ``x = 0`` and
    dropped vertically to ``y = 0`` at its largest ``x``, then integrated with the trapezoid rule.
    A perfect classifier gives 1.0. Returns ``nan`` if any accuracy is ``nan``.
    """
    ys, xs = np.asarray(seen_acc, dtype=np.float64), np.asarray(unseen_acc, dtype=np.float64)
    if ys.ndim != 1 or ys.shape != xs.shape or ys.size == 0:
        raise ValueError(f"seen_acc and unseen_acc must be non-empty 1-D of equal length, "
                         f"got shapes {ys.shape} and {xs.shape}")
    if np.isnan(ys).any() or np.isnan(xs).any():
        return float("nan")
    if (ys < 0).any() or (ys > 1).any() or (xs < 0).any() or (xs > 1).any():
        raise ValueError("accuracies must lie in [0, 1]")
    order = np.lexsort((-ys, xs))  # by x ascending, then y descending
    xs, ys = xs[order], ys[order]
    x = np.concatenate([[0.0], xs, [xs[-1]]])
    y = np.concatenate([[ys[0]], ys, [0.0]])
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Row-normalised confusion matrix over ``labels`` (rows: true, columns: predicted).

    Row ``i`` is divided by the number of samples whose true label is ``labels[i]``, so a row sums
    to less than 1 when some predictions fall outside ``labels``; rows without samples are 0.
    """
    yt, yp = _labels(y_true), _labels(y_pred, "y_pred")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true shape {yt.shape} != y_pred shape {yp.shape}")
    labs = [int(v) for v in labels]
    if len(set(labs)) != len(labs):
        raise ValueError(f"labels has duplicates: {labs}")
    pos = {c: i for i, c in enumerate(labs)}
    m = np.zeros((len(labs), len(labs)), dtype=np.float64)
    for t, p in zip(yt.tolist(), yp.tolist()):
        if t in pos and p in pos:
            m[pos[t], pos[p]] += 1
    counts = np.array([(yt == c).sum() for c in labs], dtype=np.float64)
    return np.divide(m, counts[:, None], out=np.zeros_like(m), where=counts[:, None] > 0)


def evaluate_scores(
    scores: np.ndarray,
    y_true: np.ndarray,
    *,
    class_names: Sequence[str],
    seen_idx: Sequence[int],
    unseen_idx: Sequence[int],
    gamma: float,
) -> dict[str, Any]:
    """All metrics of one method as a dict of builtins (``nan`` where undefined, see module doc).

    ``per_class`` holds, for each class with test samples, the ZSL accuracy (unseen columns only)
    of unseen classes and the calibrated-GZSL accuracy of seen classes; ``per_class_gzsl`` the
    calibrated-GZSL accuracy of every class. ``gamma`` must have been tuned on validation data.
    """
    s, y = _scores(scores, y_true)
    names = [str(n) for n in class_names]
    if len(names) != s.shape[1]:
        raise ValueError(f"class_names has {len(names)} names but scores has {s.shape[1]} columns")
    seen, unseen, is_seen, is_unseen = _check_split(s, y, seen_idx, unseen_idx)
    zsl = zsl_accuracy(s[is_unseen], y[is_unseen], unseen) if is_unseen.any() else float("nan")
    raw = gzsl_accuracy(s, y, seen, unseen, 0.0)
    cal = gzsl_accuracy(s, y, seen, unseen, float(gamma))
    gammas, cs, cu = seen_unseen_curve(s, y, seen, unseen)

    pred_cal = _gzsl_predict(s, seen, unseen, float(gamma))
    pred_zsl = unseen[np.argmax(s[:, unseen], axis=1)]
    gz = per_class_accuracy(y, pred_cal)
    zs = per_class_accuracy(y[is_unseen], pred_zsl[is_unseen])
    unseen_set = set(unseen.tolist())
    per_class = {names[c]: (zs[c] if c in unseen_set else a) for c, a in gz.items()}
    present = sorted(gz)
    if is_unseen.any() and not is_seen.any():
        LOG.info("test set has no seen-class samples: GZSL seen accuracy, H and AUSUC are nan")
    return {
        "zsl_unseen_top1": float(zsl),
        "gzsl": raw.to_dict(),
        "gzsl_calibrated": {**cal.to_dict(), "gamma": float(gamma)},
        "ausuc": ausuc(cs, cu),
        "per_class": per_class,
        "per_class_gzsl": {names[c]: a for c, a in gz.items()},
        "seen_classes": [names[c] for c in present if c not in unseen_set],
        "unseen_classes": [names[c] for c in present if c in unseen_set],
        "n_test_seen": int(is_seen.sum()),
        "n_test_unseen": int(is_unseen.sum()),
        "curve": {"unseen": cu.tolist(), "seen": cs.tolist(), "gamma": gammas.tolist()},
    }
