"""A small, complete zsl world on disk (features, class set, model) for label/index tests without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.semantics.classset import write_class_set
from pipeline.core.features import write_features
from pipeline.zsl.models import save_model
from pipeline.zsl.models.eszsl import ESZSL

WORLD_DIM, WORLD_K = 6, 4
WORLD_NAMES = ["cat", "dog", "okapi", "zebra"]
WORLD_SEEN = ["cat", "dog"]


@pytest.fixture
def small_world(tmp_path):
    """``make(n_images=40, shard_size=8)`` -> dict(features, classes, model, X, text) under ``tmp_path``.

    Features come from ``write_features`` (shards ``features/shard-NNNNNN.parquet``), the class set
    from ``write_class_set`` (text semantics only), the model is ESZSL in the text space (it can
    also embed images, so it serves text search).
    """
    def make(n_images: int = 40, shard_size: int = 8, name: str = "world", seed: int = 7) -> dict:
        rng = np.random.default_rng(seed)
        root = tmp_path / name
        feats, classes, model_dir = (str(root / d) for d in ("features", "classes", "model"))
        text = rng.standard_normal((len(WORLD_NAMES), WORLD_K)).astype(np.float32)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        write_class_set(classes, WORLD_NAMES, [None] * len(WORLD_NAMES), text, None, {
            "text_model": "fake-text", "text_model_name": "fake", "pretrained": None, "templates": ["{name}"],
            "attribute_names": [], "attribute_normalization": "l2", "missing_attributes": "error",
            "missing_value": -1.0})
        model = ESZSL(gamma=1.0, lam=1.0).fit(rng.standard_normal((20, WORLD_DIM)).astype(np.float32),
                                              np.arange(20) % 2, text[:2])
        save_model(model_dir, model, {
            "feature_model": "fake-feat", "feature_dim": WORLD_DIM, "semantics": "text", "semantic_dim": WORLD_K,
            "text_model": "fake-text", "text_model_name": "fake", "text_pretrained": None, "templates": ["{name}"],
            "seen": WORLD_SEEN, "gamma": 0.1, "calibration": None})
        X = rng.standard_normal((n_images, WORLD_DIM)).astype(np.float32)
        write_features(feats, image_ids=[f"img{i:04d}" for i in range(n_images)],
                       uris=[f"file:///img{i:04d}.png" for i in range(n_images)],
                       labels=[WORLD_NAMES[i % 4] for i in range(n_images)], X=X, model_id="fake-feat",
                       shard_size=shard_size)
        return {"features": feats, "classes": classes, "model": model_dir, "X": X, "text": text, "root": root}

    return make


@pytest.fixture(scope="module")
def one_faiss_thread():
    """Tiny k-means runs are slower with OpenMP threads spinning on a shared, busy CPU: one faiss thread
    for a module's tests (``pytestmark = pytest.mark.usefixtures("one_faiss_thread")``)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
