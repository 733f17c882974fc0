"""Bridges from image features to a text space: the ridge bridge against its closed form, ASIF's
relative representation against a hand computation, λ chosen on held-out pairs, seeded contrastive
fits, save/load, and the class-supervised `fit`."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.zsl.models import load_model, save_model
from pipeline.core.vectors import l2n
from pipeline.zsl.models.bridge import ASIF, ContrastiveBridge, RidgeBridge, fit_ridge_bridge, pair_recall, \
    relative_representation


def _pairs(n=400, d=24, k=12, seed=0, noise=0.05):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    A = rng.standard_normal((d, k)).astype(np.float32)
    T = (l2n(X) @ A + noise * rng.standard_normal((n, k))).astype(np.float32)
    return X, T


def test_ridge_bridge_is_the_closed_form():
    X, T = _pairs()
    m = RidgeBridge(lam=0.1).fit_pairs(X, T)
    Xn = l2n(X).astype(np.float64)
    Xc = Xn - Xn.mean(0)
    Tn = T / np.linalg.norm(T, axis=1, keepdims=True)
    lam = 0.1 * np.trace(Xc.T @ Xc) / X.shape[1]
    W = np.linalg.inv(Xc.T @ Xc + lam * np.eye(X.shape[1])) @ Xc.T @ Tn  # the textbook formula
    np.testing.assert_allclose(m.W, W, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m.embed_images(X[:3]), l2n((Xn[:3] - Xn.mean(0)) @ W), atol=1e-5)
    # scores are cosines to the class texts
    S = np.eye(12, dtype=np.float32)[:4] * 3
    np.testing.assert_allclose(m.scores(X[:5], S), m.embed_images(X[:5]) @ l2n(S).T, atol=1e-6)


def test_relative_representation_by_hand():
    A = l2n(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], np.float32))
    z = np.array([[3.0, 1.0, -2.0]], np.float32)
    zn = z / np.linalg.norm(z)
    sims = (zn @ A.T)[0]  # [0.802, 0.267, -0.535, 0.756]
    # top 2 anchors are 0 and 3; the others are zeroed; p = 2; then unit length
    want = np.zeros(4)
    want[0], want[3] = sims[0] ** 2, sims[3] ** 2
    want /= np.linalg.norm(want)
    np.testing.assert_allclose(relative_representation(z, A, k=2, p=2.0)[0], want, atol=1e-6)
    # negatives never count, even among the top k
    got = relative_representation(z, A, k=4, p=1.0)[0]
    assert got[2] == 0.0 and got[0] > got[3] > got[1] > 0


def test_asif_scores_compare_relative_representations():
    X, T = _pairs(n=200)
    m = ASIF(k=10, p=8.0).fit_pairs(X, T)
    S = T[:5] + 0.01
    want = relative_representation(X[:7], l2n(X), 10, 8.0) @ relative_representation(S, l2n(T), 10, 8.0).T
    np.testing.assert_allclose(m.scores(X[:7], S), want, atol=1e-5)
    assert m.search_dim == 200 and m.search_images(X[:2]).shape == (2, 200)
    # an anchor image is closest to its own caption among the anchors' captions
    assert (m.scores(X[:50], T[:50]).argmax(1) == np.arange(50)).mean() > 0.9


def test_lambda_is_chosen_on_held_out_pairs_and_recall_beats_chance():
    X, T = _pairs(n=600, noise=0.3)
    m, info = fit_ridge_bridge(X, T, seed=1)
    assert info["n_pairs"] == 600 and info["n_holdout"] == 60
    best = info["recall_at_10"][str(info["lam"])]
    assert best == max(info["recall_at_10"].values()) and best > 0.5  # chance is 10/60
    assert pair_recall(m.embed_images(X), T) > 0.5


def test_contrastive_bridge_is_seeded_and_learns():
    X, T = _pairs(n=300, noise=0.2)
    a = ContrastiveBridge(epochs=5, seed=3).fit_pairs(X, T)
    b = ContrastiveBridge(epochs=5, seed=3).fit_pairs(X, T)
    np.testing.assert_array_equal(a.W, b.W)
    assert pair_recall(a.embed_images(X), T) > 0.5


def test_bridges_save_load_and_fit_from_classes(tmp_path):
    X, T = _pairs(n=120)
    y = np.arange(120) % 4
    S = np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)
    for cls, name in ((RidgeBridge, "bridge"), (ASIF, "asif")):
        m = cls().fit(X, y, S)
        save_model(str(tmp_path / name), m, {"feature_model": "f", "feature_dim": 24, "semantics": "text",
                                             "semantic_dim": 12, "seen": [], "text_model": "t"})
        back, man = load_model(str(tmp_path / name))
        assert man.method == name
        np.testing.assert_allclose(back.scores(X[:4], S), m.scores(X[:4], S), atol=1e-6)
    with pytest.raises(ValueError, match="do not pair up"):
        RidgeBridge().fit_pairs(X, T[:5])


def test_bridged_model_mixes_z_scores_and_never_refits_the_bridge(tmp_path):
    from pipeline.zsl.models.bridge import Bridged
    from pipeline.zsl.models.ensemble import row_zscore
    from pipeline.zsl.models.eszsl import ESZSL

    X, T = _pairs(n=200)
    y = np.arange(200) % 5
    S = np.random.default_rng(1).standard_normal((5, 12)).astype(np.float32)
    bridge = RidgeBridge(lam=0.1).fit_pairs(X, T)
    W0 = bridge.W.copy()
    m = Bridged(base_model=ESZSL(), bridge_model=bridge, weight=0.3).fit(X, y, S)
    np.testing.assert_array_equal(m.bridge.W, W0)  # the corpus bridge is kept as fitted
    want = 0.7 * row_zscore(m.base.scores(X[:9], S)) + 0.3 * row_zscore(bridge.scores(X[:9], S))
    np.testing.assert_allclose(m.scores(X[:9], S), want, atol=1e-5)
    save_model(str(tmp_path / "bd"), m, {"feature_model": "f", "feature_dim": 24, "semantics": "text",
                                         "semantic_dim": 12, "seen": ["a"], "text_model": "t"})
    back, _ = load_model(str(tmp_path / "bd"))
    np.testing.assert_allclose(back.scores(X[:9], S), m.scores(X[:9], S), atol=1e-6)


def _class_world(tmp_path, *, n_classes: int, per: int):
    """Classes ``c0..`` with 12-d text semantics (``tmp_path/cls``), 24-d features around them, and a
    ridge bridge fitted on them (``tmp_path/br``): ``(names, S, y, X, bridge)``."""
    from pipeline.semantics.classset import write_class_set

    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(n_classes)]
    S = rng.standard_normal((n_classes, 12)).astype(np.float32)
    y = np.repeat(np.arange(n_classes), per)
    X = (S[y] @ rng.standard_normal((12, 24)) + 0.5 * rng.standard_normal((len(y), 24))).astype(np.float32)
    write_class_set(str(tmp_path / "cls"), names, [None] * n_classes, S, None, {"text_model": "t"})
    bridge = RidgeBridge(lam=0.1).fit_pairs(X, S[y])
    save_model(str(tmp_path / "br"), bridge, {"feature_model": "f", "feature_dim": 24, "semantics": "text",
                                              "semantic_dim": 12, "seen": [], "text_model": "t"})
    return names, S, y, X, bridge


def test_train_chooses_the_bridge_weight_without_reading_unseen_labels(tmp_path):
    """`zsl train --bridge`: w comes from held-out *seen* classes; relabelling every test-unseen image
    (or dropping them) changes nothing."""
    from pipeline.core.config import TrainConfig
    from pipeline.core.features import write_features
    from pipeline.stages.train import run_train

    names, S, y, X, _ = _class_world(tmp_path, n_classes=8, per=30)
    chosen = []
    for variant, labels in (("real", [names[v] for v in y]),
                            ("relabelled", [names[v] if v < 6 else names[13 - v] for v in y]),
                            ("dropped", [names[v] if v < 6 else None for v in y])):
        write_features(str(tmp_path / variant), image_ids=[f"i{k}" for k in range(240)], uris=["u"] * 240,
                       labels=labels, X=X, model_id="f")
        m = run_train(TrainConfig(features=str(tmp_path / variant), classes=str(tmp_path / "cls"), seen=names[:6],
                                  method="eszsl", bridge=str(tmp_path / "br"), output=str(tmp_path / f"m-{variant}")))
        assert m.method == "bridged" and m.tuning["bridge"]["splits"] == 5
        chosen.append((m.tuning["bridge"]["weight"], m.tuning["bridge"]["val_zsl"], m.gamma))
    assert chosen[0] == chosen[1] == chosen[2]


def test_bridged_features_mode_learns_from_features_and_their_bridge(tmp_path):
    from pipeline.core.config import TrainConfig
    from pipeline.core.features import write_features
    from pipeline.zsl.models.bridge import BridgedFeatures
    from pipeline.stages.train import run_train

    names, S, y, X, bridge = _class_world(tmp_path, n_classes=6, per=20)
    write_features(str(tmp_path / "f"), image_ids=[f"i{k}" for k in range(120)], uris=["u"] * 120,
                   labels=[names[v] for v in y], X=X, model_id="f")
    m = run_train(TrainConfig(features=str(tmp_path / "f"), classes=str(tmp_path / "cls"), seen=names[:4],
                              method="eszsl", bridge=str(tmp_path / "br"), bridge_mode="features",
                              output=str(tmp_path / "m")))
    assert m.method == "bridged-features" and m.tuning["bridge"]["mode"] == "features"
    model, _ = load_model(str(tmp_path / "m"))
    lifted = model.lift(X[:5])
    assert lifted.shape == (5, 24 + 12)
    np.testing.assert_allclose(lifted[:, 24:], bridge.embed_images(X[:5]), atol=1e-6)
    np.testing.assert_allclose(model.scores(X[:5], S), model.base.scores(lifted, S), atol=1e-6)
    np.testing.assert_array_equal(model.bridge.W, bridge.W)
    assert isinstance(model, BridgedFeatures)
