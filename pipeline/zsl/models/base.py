"""The interface every ZSL method implements, and safe save/load of model directories.

A model is fit on seen-class features and the semantics (class embeddings or attributes) of the
seen classes; it then scores images against *any* class set given that set's semantics, which is
what makes adding classes possible without retraining or re-extracting.

A model directory holds ``weights.safetensors`` (tensors only, no pickle) and ``manifest.json``
(method, hyper-parameters, feature model and dimension, semantic space, class sets, calibration).
"""

from __future__ import annotations

import abc
import logging
from typing import ClassVar

import numpy as np

from pipeline.core import fs as zio
from pipeline.core.manifests import ModelManifest, read_manifest, write_manifest

from pipeline.core.vectors import l2n

LOG = logging.getLogger(__name__)

__all__ = ["ZSLModel", "register", "METHODS", "save_model", "save_weights", "model_manifest", "load_model", "l2n"]

METHODS: dict[str, type["ZSLModel"]] = {}


def register(cls: type["ZSLModel"]) -> type["ZSLModel"]:
    METHODS[cls.method] = cls
    return cls


class ZSLModel(abc.ABC):
    """Fit on seen classes; score images against any class set.

    Subclasses set ``method`` and implement :meth:`fit`, :meth:`scores`, :meth:`state` and
    :meth:`from_state`. Image features are L2-normalised before use by every method.
    """

    method: ClassVar[str]
    #: Hyper-parameter grid searched by ``zsl train --tune`` (name -> candidate values).
    grid: ClassVar[dict[str, list]] = {}

    def __init__(self, **params) -> None:
        self.params = params

    @abc.abstractmethod
    def fit(self, X: np.ndarray, y: np.ndarray, S: np.ndarray) -> "ZSLModel":
        """``X`` (n, d) features, ``y`` (n,) row indices into ``S`` (C_seen, k) semantics."""

    @abc.abstractmethod
    def scores(self, X: np.ndarray, S: np.ndarray) -> np.ndarray:
        """Compatibility scores ``(n, C)`` of images against the classes whose semantics are ``S``."""

    def embed_images(self, X: np.ndarray) -> np.ndarray:
        """Images mapped into the semantic space (L2-normalised)."""
        raise NotImplementedError(f"{self.method} cannot map images into the semantic space")

    # -- text search ------------------------------------------------------------------------------
    # Projected images share a large common component (a "hub") that free-text queries do not
    # have; centring both sides on their training means before the cosine removes it.
    image_center: np.ndarray | None = None
    text_center: np.ndarray | None = None

    def fit_search_centers(self, X: np.ndarray, S: np.ndarray) -> None:
        """Record the mean projected training image and the mean seen-class embedding."""
        self.image_center = self.embed_images(X).mean(0).astype(np.float32)
        self.text_center = l2n(S).mean(0).astype(np.float32)

    def search_images(self, X: np.ndarray) -> np.ndarray:
        """Index vectors: projected images, centred, L2-normalised."""
        Z = self.embed_images(X)
        return l2n(Z - self.image_center) if self.image_center is not None else Z

    def search_queries(self, T: np.ndarray) -> np.ndarray:
        """Query vectors from text embeddings, centred like :meth:`search_images`."""
        T = l2n(T)
        return l2n(T - self.text_center) if self.text_center is not None else T

    @abc.abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """Learned tensors, saved as safetensors."""

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], params: dict) -> "ZSLModel":
        m = cls(**params)
        m.load_state(state)
        return m

    @abc.abstractmethod
    def load_state(self, state: dict[str, np.ndarray]) -> None: ...


def check_fit_inputs(X: np.ndarray, y: np.ndarray, S: np.ndarray) -> None:
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"features {X.shape} and labels {y.shape} do not match")
    if len(X) == 0:
        raise ValueError("no training samples")
    if not np.isfinite(X).all():
        raise ValueError("training features contain NaN or inf")
    if y.min() < 0 or y.max() >= len(S):
        raise ValueError(f"label index out of range [0, {len(S)})")


def save_weights(out_dir: str, model: ZSLModel) -> None:
    """Write ``weights.safetensors`` (tensors only; the search centres as ``search.*``)."""
    from safetensors.numpy import save

    tensors = {k: np.ascontiguousarray(v) for k, v in model.state().items()}
    for key in ("image_center", "text_center"):
        if getattr(model, key) is not None:
            tensors[f"search.{key}"] = getattr(model, key)
    zio.write_bytes_atomic(zio.join(out_dir, "weights.safetensors"), save(tensors))


def model_manifest(model: ZSLModel, fields: dict | ModelManifest) -> ModelManifest:
    """The validated manifest of ``model``: ``fields`` plus its method and hyper-parameters."""
    data = fields.model_dump() if isinstance(fields, ModelManifest) else dict(fields)
    try:
        return ModelManifest(**{**data, "method": model.method, "params": zio.to_jsonable(model.params)})
    except Exception as exc:  # pydantic's ValidationError: a writer bug or bad fields, named
        raise ValueError(f"model manifest: {exc}") from None


def save_model(out_dir: str, model: ZSLModel, manifest: dict | ModelManifest) -> ModelManifest:
    """Write ``weights.safetensors`` then ``manifest.json`` (last: its presence means complete)."""
    m = model_manifest(model, manifest)
    save_weights(out_dir, model)
    write_manifest(out_dir, m)
    return m


def load_model(model_dir: str, *, feature_dim: int | None = None, feature_model: str | None = None
               ) -> tuple[ZSLModel, ModelManifest]:
    """Load a model directory, checking its manifest against the features it will be used on."""
    from safetensors.numpy import load

    manifest = read_manifest(model_dir, ModelManifest)
    if feature_dim is not None and manifest.feature_dim != feature_dim:
        raise ValueError(f"{model_dir}: model expects {manifest.feature_dim}-d features, got {feature_dim}-d")
    if feature_model is not None and manifest.feature_model != feature_model:
        raise ValueError(f"{model_dir}: model was trained on '{manifest.feature_model}' features, "
                         f"these are '{feature_model}'")
    cls = METHODS.get(manifest.method)
    if cls is None:
        raise ValueError(f"{model_dir}: unknown method {manifest.method!r} (known: {', '.join(METHODS)})")
    state = load(zio.read_bytes(zio.join(model_dir, "weights.safetensors")))
    centers = {k.split(".", 1)[1]: state.pop(k) for k in list(state) if k.startswith("search.")}
    model = cls.from_state(state, manifest.params)
    for key, value in centers.items():
        setattr(model, key, value)
    return model, manifest
