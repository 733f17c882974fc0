"""Tests for pipeline.zsl.metrics against hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.zsl.metrics import (
    GZSLResult,
    ausuc,
    confusion_matrix,
    evaluate_scores,
    gzsl_accuracy,
    harmonic_mean,
    mean_per_class_accuracy,
    per_class_accuracy,
    seen_unseen_curve,
    zsl_accuracy,
)

SEEN, UNSEEN = [0, 1], [2, 3]
# Per-sample gap (best seen - best unseen): a 0.4, b 0.1, c 0.2, d 0.25.
SCORES = np.array(
    [
        [0.9, 0.1, 0.5, 0.2],  # a, y=0
        [0.1, 0.8, 0.7, 0.0],  # b, y=1
        [0.6, 0.0, 0.4, 0.3],  # c, y=2
        [0.0, 0.5, 0.2, 0.25],  # d, y=3
    ]
)
Y = np.array([0, 1, 2, 3])


def test_per_class_mean_differs_from_sample_mean_on_imbalanced_case():
    y_true = np.array([0] * 9 + [1])
    y_pred = np.array([0] * 9 + [0])
    assert per_class_accuracy(y_true, y_pred) == {0: 1.0, 1: 0.0}
    assert mean_per_class_accuracy(y_true, y_pred) == pytest.approx(0.5)
    assert float(np.mean(y_true == y_pred)) == pytest.approx(0.9)


def test_per_class_accuracy_classes_argument_skips_empty_classes():
    acc = per_class_accuracy(np.array([0, 0, 2]), np.array([0, 1, 2]), classes=[0, 1, 2])
    assert acc == {0: 0.5, 2: 1.0}


def test_mean_per_class_accuracy_empty_raises():
    with pytest.raises(ValueError):
        mean_per_class_accuracy(np.array([], dtype=int), np.array([], dtype=int))


def test_harmonic_mean_known_values():
    assert harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(0.0, 0.7) == 0.0
    assert math.isnan(harmonic_mean(float("nan"), 0.5))


def test_ausuc_unit_square_and_diagonal():
    assert ausuc([1.0, 1.0, 0.0], [0.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert ausuc([1.0, 0.0], [0.0, 1.0]) == pytest.approx(0.5)
    t = np.linspace(0, 1, 11)
    assert ausuc(1 - t[::-1], t[::-1]) == pytest.approx(0.5)  # unsorted input
    # A single perfect point still gives 1.0 thanks to the added end points.
    assert ausuc([1.0], [1.0]) == pytest.approx(1.0)
    assert math.isnan(ausuc([float("nan"), 0.0], [0.0, 1.0]))
    with pytest.raises(ValueError):
        ausuc([1.0, 0.5], [0.0])


def test_zsl_accuracy_ignores_seen_columns():
    scores = np.array(
        [
            [9.0, 9.0, 0.5, 0.1],  # y=2 -> 2 right
            [9.0, 9.0, 0.2, 0.6],  # y=3 -> 3 right
            [9.0, 9.0, 0.7, 0.3],  # y=3 -> 2 wrong
        ]
    )
    y = np.array([2, 3, 3])
    # class 2: 1/1, class 3: 1/2 -> 0.75 even though column 0 has the top score everywhere
    assert zsl_accuracy(scores, y, UNSEEN) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="not in unseen_idx"):
        zsl_accuracy(scores, np.array([0, 3, 3]), UNSEEN)


def test_gzsl_gamma_flips_predictions_from_seen_to_unseen():
    # gamma 0: a->0 ok, b->1 ok, c->0 wrong, d->1 wrong: S=1, U=0, H=0
    r0 = gzsl_accuracy(SCORES, Y, SEEN, UNSEEN)
    assert (r0.seen, r0.unseen, r0.H) == (1.0, 0.0, 0.0)
    # gamma 0.3: a->0 ok, b->2 wrong, c->2 ok, d->3 ok: S=0.5, U=1, H=2/3
    r = gzsl_accuracy(SCORES, Y, SEEN, UNSEEN, gamma=0.3)
    assert r.seen == pytest.approx(0.5)
    assert r.unseen == pytest.approx(1.0)
    assert r.H == pytest.approx(2 / 3)
    assert r.to_dict() == {"seen": r.seen, "unseen": r.unseen, "H": r.H}
    # gamma 0.5: everything unseen: a->2 wrong
    r5 = gzsl_accuracy(SCORES, Y, SEEN, UNSEEN, gamma=0.5)
    assert (r5.seen, r5.unseen, r5.H) == (0.0, 1.0, 0.0)


def test_gzsl_without_seen_test_samples_is_nan_not_a_crash():
    r = gzsl_accuracy(SCORES[2:], Y[2:], SEEN, UNSEEN)
    assert math.isnan(r.seen) and math.isnan(r.H)
    assert r.unseen == 0.0


def test_gzsl_rejects_bad_splits():
    with pytest.raises(ValueError, match="both"):
        gzsl_accuracy(SCORES, Y, [0, 1, 2], UNSEEN)
    with pytest.raises(ValueError, match="neither"):
        gzsl_accuracy(SCORES, Y, [0], UNSEEN)


def test_seen_unseen_curve_spans_all_seen_to_all_unseen_and_matches_gzsl():
    gammas, s, u = seen_unseen_curve(SCORES, Y, SEEN, UNSEEN, n_points=50)
    assert len(gammas) == len(s) == len(u) == 50
    assert gammas[0] < 0.1 and gammas[-1] > 0.4
    assert (s[0], u[0]) == (1.0, 0.0)  # everything predicted seen
    assert (s[-1], u[-1]) == (0.0, 1.0)  # everything predicted unseen
    for g, si, ui in zip(gammas, s, u):
        r = gzsl_accuracy(SCORES, Y, SEEN, UNSEEN, gamma=g)
        assert (r.seen, r.unseen) == (si, ui)
    assert ausuc(s, u) == pytest.approx(0.5)


def test_curve_fast_path_matches_gzsl_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(60, 6)).astype(float)  # many exact ties
    y = rng.integers(0, 6, size=60)
    gammas, s, u = seen_unseen_curve(scores, y, [0, 2, 4], [1, 3, 5], n_points=21)
    for g, si, ui in zip(gammas, s, u):
        r = gzsl_accuracy(scores, y, [0, 2, 4], [1, 3, 5], gamma=g)
        assert (r.seen, r.unseen) == (si, ui)
    r0 = gzsl_accuracy(scores, y, [0, 2, 4], [1, 3, 5], gamma=0.0)
    assert isinstance(r0, GZSLResult)


def test_confusion_matrix_row_normalised():
    m = confusion_matrix(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), [0, 1, 2])
    np.testing.assert_allclose(m, [[0.5, 0.5, 0], [1 / 3, 2 / 3, 0], [0, 0, 0]])


def test_evaluate_scores_hand_case():
    names = ["cat", "dog", "zebra", "okapi"]
    out = evaluate_scores(SCORES, Y, class_names=names, seen_idx=SEEN, unseen_idx=UNSEEN, gamma=0.3)
    assert out["zsl_unseen_top1"] == 1.0  # c: 0.4 > 0.3, d: 0.25 > 0.2
    assert out["gzsl"] == {"seen": 1.0, "unseen": 0.0, "H": 0.0}
    cal = out["gzsl_calibrated"]
    assert cal["gamma"] == 0.3
    assert (cal["seen"], cal["unseen"]) == (0.5, 1.0) and cal["H"] == pytest.approx(2 / 3)
    assert out["ausuc"] == pytest.approx(0.5)
    assert out["per_class"] == {"cat": 1.0, "dog": 0.0, "zebra": 1.0, "okapi": 1.0}
    assert out["per_class_gzsl"] == {"cat": 1.0, "dog": 0.0, "zebra": 1.0, "okapi": 1.0}
    assert out["unseen_classes"] == ["zebra", "okapi"] and out["seen_classes"] == ["cat", "dog"]
    assert (out["n_test_seen"], out["n_test_unseen"]) == (2, 2)
    assert len(out["curve"]["seen"]) == len(out["curve"]["unseen"]) == 200


def test_evaluate_scores_per_class_uses_zsl_for_unseen_classes():
    # c is predicted seen (col 0) by calibrated GZSL but right under ZSL (unseen columns only).
    out = evaluate_scores(SCORES, Y, class_names=list("abcd"), seen_idx=SEEN, unseen_idx=UNSEEN,
                          gamma=0.0)
    assert out["per_class"]["c"] == 1.0 and out["per_class_gzsl"]["c"] == 0.0


def test_evaluate_scores_without_seen_test_samples():
    out = evaluate_scores(SCORES[2:], Y[2:], class_names=list("abcd"), seen_idx=SEEN,
                          unseen_idx=UNSEEN, gamma=0.3)
    assert out["n_test_seen"] == 0
    assert math.isnan(out["gzsl"]["seen"]) and math.isnan(out["gzsl"]["H"])
    assert math.isnan(out["gzsl_calibrated"]["H"]) and math.isnan(out["ausuc"])
    assert out["zsl_unseen_top1"] == 1.0


def test_evaluate_scores_validates_class_names():
    with pytest.raises(ValueError, match="class_names"):
        evaluate_scores(SCORES, Y, class_names=["a"], seen_idx=SEEN, unseen_idx=UNSEEN, gamma=0.0)
