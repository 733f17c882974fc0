"""Ranking losses, CLIP-style zero-shot, word vectors, combined semantics, tuning, transductive mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.zsl.models import make_model, method_params
from pipeline.core.vectors import l2n
from pipeline.zsl.models.bilinear import ranking_loss
from pipeline.semantics.classset import ClassSet
from pipeline.zsl.transductive import transductive_scores
from pipeline.semantics.wordvectors import GloVe, class_word_vectors


# ---------------------------------------------------------------- ranking losses (hand-computed)

F = torch.tensor([[0.9, 0.8, 0.1, 0.85]])  # true class 0; margin 0.2 -> violators: 1 (0.1), 3 (0.15)
Y = torch.tensor([0])


def test_devise_hinge_sums_violations():
    assert float(ranking_loss(F, Y, loss="devise", margin=0.2)) == pytest.approx(0.1 + 0.15)


def test_ale_weights_by_rank():
    # r = 2 violators -> beta_2 = 1 + 1/2; loss = beta_r / r * sum = 0.75 * 0.25
    assert float(ranking_loss(F, Y, loss="ale", margin=0.2)) == pytest.approx(0.75 * 0.25)


def test_sje_takes_structured_max():
    # max_j (margin * [j != y] + F_j) - F_y = max(0.9, 1.0, 0.3, 1.05) - 0.9
    assert float(ranking_loss(F, Y, loss="sje", margin=0.2)) == pytest.approx(0.15)


def test_no_violation_no_loss():
    f = torch.tensor([[1.0, 0.1, 0.2]])
    for loss in ("devise", "ale", "sje"):
        assert float(ranking_loss(f, torch.tensor([0]), loss=loss, margin=0.2)) == pytest.approx(0.0)


def _linear_problem(seed=0, C=10, k=16, d=48, per=30, noise=0.05):
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(C, k)).astype(np.float32)
    M = rng.normal(size=(k, d)).astype(np.float32)
    y = np.repeat(np.arange(C), per)
    X = (S[y] @ M + noise * rng.normal(size=(len(y), d))).astype(np.float32)
    return X, y, S


@pytest.mark.parametrize("method", ["devise", "ale", "sje"])
def test_bilinear_methods_transfer_to_unseen_classes(method):
    torch.set_num_threads(1)
    X, y, S = _linear_problem()
    seen = y < 7
    model = make_model(method, epochs=15).fit(X[seen], y[seen], S[:7])
    pred = np.argmax(model.scores(X[~seen], S[7:]), axis=1) + 7
    assert (pred == y[~seen]).mean() > 0.8


def test_unknown_parameter_is_rejected_with_known_ones():
    with pytest.raises(ValueError, match="unknown parameter.*bogus.*margin"):
        make_model("devise", bogus=1)
    assert "direction" in method_params("sae")


# ---------------------------------------------------------------- CLIP-style zero-shot

def test_clip_method_needs_no_training_when_spaces_match():
    rng = np.random.default_rng(0)
    S = l2n(rng.normal(size=(5, 8)))
    X = S[[0, 1, 2, 3, 4, 0]] + 0.01 * rng.normal(size=(6, 8)).astype(np.float32)
    model = make_model("clip").fit(X[:3], np.array([0, 1, 2]), S[:3])
    assert model.W is None  # identity: images and texts share a space (open_clip)
    np.testing.assert_allclose(model.scores(X, S), l2n(X) @ S.T, atol=1e-6)
    assert np.argmax(model.scores(X, S), axis=1).tolist() == [0, 1, 2, 3, 4, 0]


def test_clip_projection_none_with_other_dims_is_an_error():
    with pytest.raises(ValueError, match="open_clip"):
        make_model("clip", projection="none").fit(np.ones((2, 5)), np.array([0, 1]), np.eye(2, 3))


# ---------------------------------------------------------------- word vectors

def _toy_glove():
    words = ["polar", "bear", "zebra", "the"]
    vecs = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], np.float32)
    return GloVe(vecs, {w: i for i, w in enumerate(words)})


def test_multi_word_names_are_averaged_and_oov_reported():
    v, report = class_word_vectors(["polar+bear", "zebra_xyzzy"], glove=_toy_glove())
    np.testing.assert_allclose(v[0], l2n(np.array([[0.5, 0.5, 0.0]]))[0], atol=1e-6)
    np.testing.assert_allclose(v[1], [0, 0, 1], atol=1e-6)
    assert report.oov_words == {"zebra_xyzzy": ["xyzzy"]}


def test_class_with_no_known_word_is_an_error_not_a_random_vector():
    with pytest.raises(ValueError, match="qqq"):
        class_word_vectors(["qqq"], glove=_toy_glove())
    v, report = class_word_vectors(["qqq"], glove=_toy_glove(), missing="zero")
    assert report.empty_classes == ["qqq"] and not v.any()


def test_real_glove_neighbours_are_meaningful():
    v, _ = class_word_vectors(["zebra", "horse", "airplane"])
    assert v[0] @ v[1] > v[0] @ v[2]


def _classes(text, attrs=None, wv=None, names=None):
    names = names or [f"c{i}" for i in range(len(text))]
    return ClassSet(names, [None] * len(names), text, attrs, {}, wv)


def test_combined_semantics_weighted_concatenation():
    rng = np.random.default_rng(0)
    T, A = rng.normal(size=(4, 5)).astype(np.float32), rng.random((4, 3)).astype(np.float32)
    cs = _classes(T, A)
    S = cs.semantics("text+attributes", {"text": 3.0, "attributes": 1.0})
    np.testing.assert_allclose(S[:, :5], l2n(T) * np.sqrt(0.75), atol=1e-6)
    np.testing.assert_allclose(S[:, 5:], l2n(A) * np.sqrt(0.25), atol=1e-6)
    # dot products are the weighted sums of per-source cosines
    np.testing.assert_allclose(S @ S.T, 0.75 * l2n(T) @ l2n(T).T + 0.25 * l2n(A) @ l2n(A).T, atol=1e-5)


def test_missing_word_vector_names_the_class():
    wv = np.ones((2, 3), np.float32)
    wv[1] = np.nan
    cs = _classes(np.eye(2, 4, dtype=np.float32), wv=wv, names=["zebra", "xyzzy"])
    with pytest.raises(ValueError, match="xyzzy"):
        cs.semantics("glove")


# ---------------------------------------------------------------- transductive

def test_transductive_refinement_fixes_shifted_prototypes():
    """Unseen images cluster around points shifted from their semantic prototypes; refinement
    moves the prototypes onto the clusters and recovers the labels."""
    rng = np.random.default_rng(1)
    k = 16
    S = l2n(rng.normal(size=(4, k)))
    shift = 0.6 * l2n(rng.normal(size=(4, k)))
    centers = l2n(S + shift)
    y = np.repeat(np.arange(4), 50)
    Z = l2n(centers[y] + 0.15 * rng.normal(size=(len(y), k)))
    model = make_model("clip").fit(Z[:4], np.arange(4), S)  # identity model: scores = cos(Z, S)
    inductive = (np.argmax(model.scores(Z, S), axis=1) == y).mean()
    refined = transductive_scores(model, S, Z, seen_mask=np.zeros(4), alpha=0.3)
    transductive = (np.argmax(refined, axis=1) == y).mean()
    assert transductive >= inductive and transductive > 0.95


def test_transductive_refuses_non_cosine_models():
    X, y, S = _linear_problem(C=4, per=5)
    model = make_model("eszsl").fit(X, y, S)
    with pytest.raises(ValueError, match="cosine"):
        transductive_scores(model, S, X, seen_mask=np.zeros(4))


def test_column_standardisation_removes_a_hub_class():
    """Any model: a class every image scores high on stops winning once each class's scores are
    standardised over the unlabelled images."""
    from pipeline.zsl.transductive import column_standardized_scores

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    s = rng.normal(size=(120, 3)) * 0.1
    s[np.arange(120), y] += 0.5
    s[:, 2] += 1.0  # class 2 is a hub: it wins every image inductively
    assert (np.argmax(s, 1) == 2).all()
    z = column_standardized_scores(s)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-5)
    assert (np.argmax(z, 1) == y).mean() > 0.9


# ---------------------------------------------------------------- tuning through run_train

def test_tune_records_grid_and_choice(tmp_path):
    from pipeline.semantics.classset import write_class_set
    from pipeline.core.config import build_config
    from pipeline.core.features import write_features
    from pipeline.stages.train import run_train

    X, y, S = _linear_problem(C=8, per=20)
    names = [f"class{i}" for i in range(8)]
    write_features(str(tmp_path / "f"), image_ids=[str(i) for i in range(len(y))], uris=["u"] * len(y),
                   labels=[names[c] for c in y], X=X, model_id="toy")
    write_class_set(str(tmp_path / "c"), names, [None] * 8, l2n(S), None, {"text_model": "toy"})
    cfg = build_config("train", dict(features=str(tmp_path / "f"), classes=str(tmp_path / "c"), seen=names[:6],
                                     method="eszsl", tune=True, output=str(tmp_path / "m")))
    manifest = run_train(cfg)
    tuning = manifest.tuning
    assert len(tuning["results"]) == 16
    best = max(r["val_zsl"] for r in tuning["results"])
    assert tuning["chosen"]["val_zsl"] == best
    saved = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert {k: saved["params"][k] for k in ("gamma", "lam")} == tuning["chosen"]["params"]
    # validation classes are seen classes only
    assert set(saved["calibration"]["pseudo_unseen"]) <= set(names[:6])
