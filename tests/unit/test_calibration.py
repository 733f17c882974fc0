"""Tests for pipeline.zsl.calibration: calibrated stacking, gamma tuning, class-wise split."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from pipeline.zsl.calibration import apply_calibrated_stacking, split_seen_classes, tune_gamma
from pipeline.zsl.metrics import gzsl_accuracy

SEEN, UNSEEN = [0, 1], [2, 3]
# gaps (best seen - best unseen): a 0.4, b 0.1, c 0.2, d 0.25
SCORES = np.array(
    [
        [0.9, 0.1, 0.5, 0.2],
        [0.1, 0.8, 0.7, 0.0],
        [0.6, 0.0, 0.4, 0.3],
        [0.0, 0.5, 0.2, 0.25],
    ]
)
Y = np.array([0, 1, 2, 3])


def test_apply_calibrated_stacking_subtracts_from_seen_columns_only_and_copies():
    scores = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    before = scores.copy()
    out = apply_calibrated_stacking(scores, np.array([True, False, True]), 0.5)
    np.testing.assert_allclose(out, [[0.5, 2.0, 2.5]])
    np.testing.assert_array_equal(scores, before)
    with pytest.raises(ValueError, match="seen_mask"):
        apply_calibrated_stacking(scores, np.array([True, False]), 0.5)


def test_tune_gamma_picks_h_maximising_gamma():
    # H by gamma: (<0.1) 0, (0.1, 0.2) 0, (0.2, 0.25) 0.5, (0.25, 0.4) 2/3, (>0.4) 0
    gamma, info = tune_gamma(SCORES, Y, SEEN, UNSEEN, n_points=200)
    assert 0.25 < gamma < 0.4
    assert info["H"] == pytest.approx(2 / 3)
    assert (info["seen"], info["unseen"]) == (0.5, 1.0)
    grid = np.array(info["gammas"])
    assert 0.0 in grid and len(grid) == len(info["H_grid"])
    # ties on the plateau go to the smallest |gamma|
    assert gamma == min(g for g in grid if 0.25 < g < 0.4)
    r = gzsl_accuracy(SCORES, Y, SEEN, UNSEEN, gamma=gamma)
    assert r.H == pytest.approx(info["H"])


def test_tune_gamma_can_choose_negative_gamma_and_prefers_zero_on_ties():
    # Unseen column over-scored. Gaps: a -0.2 (y=0), b 0.8 (y=1), c -0.6 (y=2), so every sample
    # is right for gamma in (-0.6, -0.2); the smallest |gamma| there lies just below -0.2.
    scores = np.array([[0.5, 0.0, 0.7], [0.0, 0.9, 0.1], [0.0, 0.2, 0.8]])
    gamma, info = tune_gamma(scores, np.array([0, 1, 2]), [0, 1], [2])
    assert -0.6 < gamma < -0.2 and info["H"] == pytest.approx(1.0)
    assert gamma == max(g for g in info["gammas"] if g < -0.2)
    # Already perfect at gamma 0: keep 0.
    gamma0, info0 = tune_gamma(np.eye(3), np.array([0, 1, 2]), [0, 1], [2])
    assert gamma0 == 0.0 and info0["H"] == 1.0


def test_tune_gamma_needs_both_kinds_of_validation_samples():
    with pytest.raises(ValueError, match="pseudo-unseen"):
        tune_gamma(SCORES[:2], Y[:2], SEEN, UNSEEN)


def test_tune_gamma_interface_cannot_take_test_data():
    params = set(inspect.signature(tune_gamma).parameters)
    assert params == {"scores_val", "y_val", "seen_idx", "unseen_idx", "n_points"}


def test_split_seen_classes_is_class_wise():
    labels = np.array([c for c in range(10) for _ in range(c + 1)] + [20, 21, 21])  # 20, 21 not seen
    seen = list(range(10))
    train, val, ps, pu = split_seen_classes(labels, seen, val_class_fraction=0.3,
                                            val_sample_fraction=0.2, seed=3)
    assert len(pu) == 3 and len(ps) == 7 and sorted(ps + pu) == seen
    assert not (train & val).any()
    assert not (train | val)[labels >= 20].any()  # non-seen samples are in neither mask
    assert set(labels[train]) <= set(ps)  # pseudo-unseen classes have no training samples
    for c in pu:
        assert val[labels == c].all()
    for c in ps:
        n_c, n_val = (labels == c).sum(), (val & (labels == c)).sum()
        if n_c >= 2:
            assert n_val == min(max(1, round(0.2 * n_c)), n_c - 1)
        else:
            assert n_val == 0


def test_split_seen_classes_is_deterministic_under_seed():
    labels = np.repeat(np.arange(12), 5)
    kw = dict(val_class_fraction=0.25, val_sample_fraction=0.4)
    a = split_seen_classes(labels, range(12), seed=11, **kw)
    b = split_seen_classes(labels, range(12), seed=11, **kw)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2:] == b[2:]
    others = [split_seen_classes(labels, range(12), seed=s, **kw) for s in range(5)]
    assert any(o[3] != a[3] or not np.array_equal(o[1], a[1]) for o in others)


def test_split_seen_classes_keeps_two_pseudo_seen_classes():
    labels = np.repeat(np.arange(3), 4)
    _, _, ps, pu = split_seen_classes(labels, [0, 1, 2], val_class_fraction=0.9,
                                      val_sample_fraction=0.5, seed=0)
    assert len(ps) == 2 and len(pu) == 1


def test_split_seen_classes_rejects_bad_input():
    labels = np.repeat(np.arange(3), 4)
    with pytest.raises(ValueError, match="at least 3"):
        split_seen_classes(labels, [0, 1], val_class_fraction=0.5, val_sample_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="val_class_fraction"):
        split_seen_classes(labels, [0, 1, 2], val_class_fraction=0.0, val_sample_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="val_sample_fraction"):
        split_seen_classes(labels, [0, 1, 2], val_class_fraction=0.5, val_sample_fraction=1.0, seed=0)
