"""Transductive correction: refine class prototypes on unlabelled target features.

Inductive models score an image against fixed class semantics. Given the (unlabelled) images to
be labelled, we can do better: map them into the model's semantic space and run k-means seeded
from the class prototypes (Fu et al. 2015, Wan et al. 2019 in spirit):

1. assign every target image to its best class under the calibrated inductive scores
   (γ removes the seen bias before any prototype moves);
2. move each class prototype towards the mean of its assigned images,
   ``P_c = normalize(α · s_c + (1 − α) · mean(z_i : i ∈ c))``, keeping an anchor ``α`` on the
   semantic prototype so a class cannot drift onto another one;
3. reassign with the refined prototypes (again minus γ on seen classes) and repeat.

No labels are used. Results are reported separately from inductive ones.

Models that cannot map images into the semantic space (DAP, relation network, ESZSL's bilinear
form, ensembles of them) get a model-agnostic correction instead, :func:`column_standardized_scores`:
each class's scores are standardised over the unlabelled target images, so a class that every
image scores high on (a hub, or a seen class favoured by training) no longer wins by default.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.core.vectors import l2n

LOG = logging.getLogger(__name__)

__all__ = ["transductive_scores", "column_standardized_scores"]


def column_standardized_scores(scores: np.ndarray) -> np.ndarray:
    """``(s - mean over images) / std over images``, per class (column); zero-spread columns -> 0."""
    s = np.asarray(scores, np.float64)
    mu, sd = s.mean(0, keepdims=True), s.std(0, keepdims=True)
    return np.divide(s - mu, sd, out=np.zeros_like(s), where=sd > 0).astype(np.float32)


def transductive_scores(model, S: np.ndarray, X: np.ndarray, *, seen_mask: np.ndarray, gamma: float = 0.0,
                        iters: int = 10, alpha: float = 0.5) -> np.ndarray:
    """Scores ``(n, C)`` of ``X`` against classes with semantics ``S`` after prototype refinement."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    try:
        Z = model.embed_images(X)
    except NotImplementedError:
        raise ValueError(f"transductive mode needs a model that maps images into the semantic space; "
                         f"'{model.method}' does not") from None
    S0 = l2n(S)
    if Z.shape[1] != S0.shape[1]:
        raise ValueError(f"model embeds images in {Z.shape[1]}-d, class semantics are {S0.shape[1]}-d")
    base = model.scores(X, S)
    # γ was calibrated on the model's scores; refinement works on cosines, so the two must coincide.
    if not np.allclose(base, Z @ S0.T, atol=1e-4):
        raise ValueError(f"transductive mode needs a model that scores by cosine in its embedding space "
                         f"(devise, ale, sje, clip, sae with direction f2s); '{model.method}' does not")
    bias = gamma * np.asarray(seen_mask, np.float32)
    assign = np.argmax(base - bias, axis=1)
    P = S0.copy()
    for it in range(iters):
        new_P = S0.copy()
        for c in np.unique(assign):
            members = Z[assign == c]
            new_P[c] = alpha * S0[c] + (1.0 - alpha) * l2n(members.mean(0))
        P = l2n(new_P)
        new_assign = np.argmax(Z @ P.T - bias, axis=1)
        changed = int((new_assign != assign).sum())
        assign = new_assign
        LOG.debug("transductive iteration %d: %d reassigned", it, changed)
        if changed == 0:
            break
    return Z @ P.T
