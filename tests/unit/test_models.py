"""pipeline.zsl.models: ESZSL against the published closed form, DeViSE on synthetic data, safe save/load."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.zsl.models import METHODS, load_model, make_model, save_model
from pipeline.zsl.models.bilinear import DeViSE, ridge_projection
from pipeline.zsl.models.eszsl import ESZSL


def _eszsl_reference(X_rows, y, S_rows, gamma, lam):
    """Romera-Paredes & Torr (2015), eq. (closed form), transcribed literally with explicit inverses."""
    X = (X_rows / np.linalg.norm(X_rows, axis=1, keepdims=True)).T  # d x m, L2-normalised columns
    m, z = len(y), len(S_rows)
    Y = -np.ones((m, z))
    Y[np.arange(m), y] = 1.0  # m x z in {-1, 1}
    S = S_rows.T  # a x z
    d, a = X.shape[0], S.shape[0]
    return np.linalg.inv(X @ X.T + gamma * np.eye(d)) @ X @ Y @ S.T @ np.linalg.inv(S @ S.T + lam * np.eye(a))


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.1, 10.0), (0.01, 0.1)])
def test_eszsl_matches_published_closed_form(rng, gamma, lam):
    d, m, z, a = 20, 60, 5, 8
    X = rng.standard_normal((m, d)) + 0.5
    y = np.concatenate([np.arange(z), rng.integers(0, z, m - z)])
    S = rng.standard_normal((z, a))
    model = ESZSL(gamma=gamma, lam=lam).fit(X, y, S)
    V = _eszsl_reference(X, y, S, gamma, lam)
    assert model.V.shape == (d, a)
    np.testing.assert_allclose(model.V, V, atol=1e-5, rtol=1e-5)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(model.scores(X, S), Xn @ V @ S.T, atol=1e-4)


def test_eszsl_rejects_bad_inputs(rng):
    S = rng.standard_normal((3, 4))
    with pytest.raises(ValueError, match="do not match"):
        ESZSL().fit(rng.standard_normal((5, 2)), np.zeros(4, int), S)
    with pytest.raises(ValueError, match="out of range"):
        ESZSL().fit(rng.standard_normal((2, 2)), np.array([0, 3]), S)
    with pytest.raises(ValueError, match="NaN or inf"):
        ESZSL().fit(np.array([[np.nan, 1.0]]), np.array([0]), S)


def test_ridge_projection_is_the_normal_equation_solution(rng):
    X, T, r = rng.standard_normal((40, 7)), rng.standard_normal((40, 3)), 2.5
    W = ridge_projection(X, T, r)
    np.testing.assert_allclose(W, np.linalg.inv(X.T @ X + r * np.eye(7)) @ X.T @ T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(X.T @ (X @ W - T) + r * W, 0.0, atol=1e-10)  # zero gradient


@pytest.fixture
def one_torch_thread():
    """Tiny torch problems run far slower with threads fighting over a busy 2-core machine."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _synthetic(rng, noise: float = 0.3):
    """12 classes whose feature-space means are a fixed linear map of their 8-d semantic vectors."""
    C, k, d = 12, 8, 32
    S = rng.standard_normal((C, k))
    M = rng.standard_normal((k, d))

    def sample(classes, n):
        X = np.vstack([S[c] @ M + noise * rng.standard_normal((n, d)) for c in classes])
        return X.astype(np.float32), np.repeat(np.arange(len(classes)), n)

    return S, sample


def test_devise_learns_seen_and_transfers_to_unseen(rng, one_torch_thread):
    S, sample = _synthetic(rng)
    seen, unseen = list(range(10)), [10, 11]
    X, y = sample(seen, 40)
    model = DeViSE(epochs=30, seed=0).fit(X, y, S[seen])
    Xs, ys = sample(seen, 20)
    acc_seen = (model.scores(Xs, S[seen]).argmax(1) == ys).mean()
    Xu, yu = sample(unseen, 30)
    acc_unseen = (model.scores(Xu, S[unseen]).argmax(1) == yu).mean()
    assert acc_seen > 0.9
    assert acc_unseen > 0.8  # chance is 0.5
    Z = model.embed_images(Xs)
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, rtol=1e-5)


def test_make_model_registry():
    assert set(METHODS) >= {"eszsl", "devise"}
    assert isinstance(make_model("eszsl", gamma=2.0), ESZSL)
    with pytest.raises(ValueError, match="unknown method 'svm'"):
        make_model("svm")


MANIFEST = {"feature_model": "fake-feat", "feature_dim": 20, "semantics": "text", "semantic_dim": 8, "seen": ["a", "b"]}


@pytest.mark.parametrize("method", ["eszsl", "devise"])
def test_save_load_round_trip(tmp_path, rng, method, one_torch_thread):
    X = rng.standard_normal((50, 20)).astype(np.float32)
    y = np.concatenate([np.arange(5), rng.integers(0, 5, 45)])
    S = rng.standard_normal((5, 8)).astype(np.float32)
    params = {"gamma": 0.5, "lam": 2.0} if method == "eszsl" else {"epochs": 2}
    model = make_model(method, **params).fit(X, y, S)
    model.fit_search_centers(X, S)
    out = str(tmp_path / "model")
    save_model(out, model, {**MANIFEST, "seen": list("abcde")})
    loaded, manifest = load_model(out, feature_dim=20, feature_model="fake-feat")
    assert type(loaded) is type(model) and loaded.params == model.params
    assert manifest.method == method and manifest.format == "zsl-model/1" and manifest.seen == list("abcde")
    S_new = rng.standard_normal((7, 8)).astype(np.float32)  # any class set, not only the training one
    np.testing.assert_array_equal(loaded.scores(X, S_new), model.scores(X, S_new))
    np.testing.assert_array_equal(loaded.image_center, model.image_center)
    np.testing.assert_array_equal(loaded.text_center, model.text_center)
    np.testing.assert_array_equal(loaded.search_images(X), model.search_images(X))


def test_weights_are_safetensors_not_pickle(tmp_path, rng):
    import json
    import struct

    model = ESZSL().fit(rng.standard_normal((10, 20)), np.arange(10) % 2, rng.standard_normal((2, 8)))
    save_model(str(tmp_path), model, MANIFEST)
    raw = (tmp_path / "weights.safetensors").read_bytes()
    assert not raw.startswith(b"\x80")  # pickle protocol 2+ magic
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, then a JSON header
    header = json.loads(raw[8 : 8 + n])
    assert header["V"]["dtype"] == "F32" and header["V"]["shape"] == [20, 8]
    assert "search.image_center" not in header  # no centres were fitted


def test_load_model_checks_features(tmp_path, rng):
    model = ESZSL().fit(rng.standard_normal((10, 20)), np.arange(10) % 2, rng.standard_normal((2, 8)))
    save_model(str(tmp_path), model, MANIFEST)
    with pytest.raises(ValueError, match="expects 20-d features, got 1280-d"):
        load_model(str(tmp_path), feature_dim=1280)
    with pytest.raises(ValueError, match="trained on 'fake-feat' features, these are 'effnet-lite0'"):
        load_model(str(tmp_path), feature_dim=20, feature_model="effnet-lite0")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_model(str(tmp_path / "nope"))


def test_load_model_rejects_other_formats(tmp_path, rng):
    from pipeline.core import fs as zio

    model = ESZSL().fit(rng.standard_normal((10, 20)), np.arange(10) % 2, rng.standard_normal((2, 8)))
    save_model(str(tmp_path), model, MANIFEST)
    m = zio.read_json(str(tmp_path / "manifest.json"))
    zio.write_json_atomic(str(tmp_path / "manifest.json"), {**m, "method": "svm"})
    with pytest.raises(ValueError, match="unknown method 'svm'"):
        load_model(str(tmp_path))
    zio.write_json_atomic(str(tmp_path / "manifest.json"), {**m, "format": "zsl-model/0"})
    with pytest.raises(ValueError, match="format 'zsl-model/0', expected 'zsl-model/1'"):
        load_model(str(tmp_path))
