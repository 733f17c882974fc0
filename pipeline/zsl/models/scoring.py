"""Scoring a trained model against a class set: what label, evaluate, index and search share.

``class_scores`` is the one place calibrated stacking's γ is applied at inference;
``model_fingerprint`` is what a model *is* (manifest and weights) for outputs derived from it;
``check_model_classes`` proves, before a job writes anything, that a model can score a class set.
"""

from __future__ import annotations

import numpy as np

from pipeline.core import fs as zio
from pipeline.zsl.models.base import ZSLModel
from pipeline.core.manifests import ModelManifest
from pipeline.zsl.calibration import apply_calibrated_stacking
from pipeline.semantics.classset import ClassSet

__all__ = ["class_semantics", "seen_mask", "class_scores", "model_fingerprint", "check_model_classes"]


def class_semantics(manifest: ModelManifest, classes: ClassSet) -> np.ndarray:
    """The semantic matrix of ``classes`` in the model's space (its sources, weights and text model)."""
    S = classes.semantics(manifest.semantics, manifest.semantic_weights)
    if S.shape[1] != manifest.semantic_dim:
        raise ValueError(f"class semantics are {S.shape[1]}-d, the model expects {manifest.semantic_dim}-d "
                         "(were the classes embedded with another text model or attribute table?)")
    if manifest.uses_text and manifest.text_model and classes.manifest.text_model != manifest.text_model:
        raise ValueError(f"classes were embedded with '{classes.manifest.text_model}', "
                         f"the model was trained with '{manifest.text_model}'")
    return S


def seen_mask(manifest: ModelManifest, names: list[str]) -> np.ndarray:
    """Boolean ``(C,)``: which of ``names`` the model was trained on."""
    seen = set(manifest.seen)
    return np.array([n in seen for n in names], bool)


def class_scores(model: ZSLModel, manifest: ModelManifest, X: np.ndarray, classes: ClassSet, *,
                 calibrated: bool) -> np.ndarray:
    """Scores ``(n, C)`` of images against every class of ``classes``; γ subtracted from seen classes if calibrated."""
    scores = model.scores(X, class_semantics(manifest, classes))
    if calibrated and manifest.gamma:
        scores = apply_calibrated_stacking(scores, seen_mask(manifest, classes.names), manifest.gamma, inplace=True)
    return scores


def model_fingerprint(model_dir: str, manifest: ModelManifest) -> str:
    """What a model is: its manifest *and* its weights (two trainings may share a manifest)."""
    weights = zio.join(model_dir, "weights.safetensors")
    return zio.fingerprint({"manifest": manifest.to_json(), "weights": zio.sha256_file(weights)})


def check_model_classes(model: ZSLModel, manifest: ModelManifest, classes: ClassSet, where: str) -> None:
    """Score one blank image against ``classes`` so that any mismatch (dimensions, text model, missing
    semantics, attribute names) stops the job before it writes anything."""
    want, have = manifest.attribute_names, classes.manifest.attribute_names
    if "attributes" in manifest.semantics.split("+") and want and have and list(want) != list(have):
        if sorted(want) == sorted(have):
            raise ValueError(f"{where}: the class set has the model's {len(want)} attributes in another order; "
                             "rebuild it with the attribute columns in the training order")
        missing = [a for a in want if a not in have]
        extra = [a for a in have if a not in want]
        raise ValueError(f"{where}: the class set's attributes are not the {len(want)} the model was trained on "
                         f"(missing: {', '.join(missing[:5]) or '-'}; unexpected: {', '.join(extra[:5]) or '-'})")
    try:
        s = class_scores(model, manifest, np.zeros((1, manifest.feature_dim), np.float32), classes, calibrated=False)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if s.shape != (1, len(classes.names)):
        raise ValueError(f"{where}: model gives scores of shape {s.shape} for 1 image and {len(classes.names)} classes")


