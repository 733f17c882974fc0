"""SAE — "Semantic Autoencoder for Zero-Shot Learning" (Kodirov, Xiang & Gong, CVPR 2017).

A linear autoencoder whose code is forced to be the class semantics: the encoder ``W`` maps a
feature to its class's semantic vector and the tied decoder ``Wᵀ`` maps it back,

    min_W ||X - Wᵀ S||²_F + λ ||W X - S||²_F,

with ``X`` (d, N) the image features and ``S`` (k, N) the semantic vector of each image's class.
Setting the gradient to zero gives the Sylvester equation (paper, eq. 8)

    A W + W B = C,    A = S Sᵀ,    B = λ X Xᵀ,    C = (1 + λ) S Xᵀ,

solved exactly for ``W`` (k, d) by ``scipy.linalg.solve_sylvester`` (Bartels-Stewart).
The paper evaluates both directions, and so does this module:

* ``f2s`` (feature -> semantic): score = cos(W x, s);
* ``s2f`` (semantic -> feature): score = cos(x, Wᵀ s).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np

from pipeline.zsl.models.base import ZSLModel, check_fit_inputs, register
from pipeline.core.vectors import l2n

LOG = logging.getLogger(__name__)

__all__ = ["SAE", "sae_closed_form"]

DIRECTIONS = ("f2s", "s2f")


def sae_closed_form(X: np.ndarray, S: np.ndarray, lam: float) -> np.ndarray:
    """Solve the SAE Sylvester equation ``A W + W B = C`` exactly (paper, eq. 8).

    Args:
        X: ``(d, N)`` features, one column per image.
        S: ``(k, N)`` semantics, column ``i`` is the semantic vector of image ``i``'s class.
        lam: λ > 0, weight of the encoder term ``||W X - S||²``.

    Returns:
        ``W`` ``(k, d)`` solving ``A W + W B = C`` with ``A = S Sᵀ``, ``B = λ X Xᵀ``,
        ``C = (1 + λ) S Xᵀ``.

    The solution is unique iff ``A`` and ``-B`` share no eigenvalue. Both are positive
    semi-definite, so this fails only if both are singular (fewer seen classes than semantic
    dimensions *and* rank-deficient features); a warning is logged in that case.
    """
    from scipy.linalg import solve_sylvester

    X = np.asarray(X, np.float64)
    S = np.asarray(S, np.float64)
    if X.shape[1] != S.shape[1]:
        raise ValueError(f"X has {X.shape[1]} columns but S has {S.shape[1]}; both must be (dim, N)")
    A = S @ S.T
    B = lam * (X @ X.T)
    C = (1.0 + lam) * (S @ X.T)
    a_min = float(np.linalg.eigvalsh(A)[0])
    b_min = float(np.linalg.eigvalsh(B)[0])
    scale = max(float(np.trace(A)), float(np.trace(B)), 1e-300)
    if a_min + b_min <= 1e-10 * scale:
        LOG.warning("SAE: S Sᵀ and λ X Xᵀ are both (near-)singular (smallest eigenvalues %.3g, %.3g); "
                    "the Sylvester solution is not unique and may be unstable", a_min, b_min)
    return solve_sylvester(A, B, C)


@register
class SAE(ZSLModel):
    """Semantic autoencoder with a selectable evaluation direction.

    Image features and class semantics are both L2-normalised per row before the fit, so the two
    terms of the objective have comparable scale and ``lam`` does not depend on the units of the
    semantics (raw 0-100 attributes vs unit-norm text embeddings).

    Args:
        lam: λ, weight of the encoder (``W x ≈ s``) term relative to the decoder
            (``Wᵀ s ≈ x``) term. Default 0.2, the value of the authors' released CUB demo. The
            best value depends on the feature/semantic scaling (their AwA demo, with features
            normalised per dimension instead of per image, uses 5e5); the paper picks it by
            cross-validation on the seen classes, which is what one should do here too.
        direction: ``"f2s"`` scores by cos(W x, s); ``"s2f"`` by cos(x, Wᵀ s).
    """

    method = "sae"
    grid: ClassVar[dict[str, list]] = {"lam": [0.05, 0.2, 1.0, 5.0, 25.0], "direction": ["f2s", "s2f"]}

    def __init__(self, *, lam: float = 0.2, direction: str = "f2s", **params) -> None:
        if not (np.isfinite(lam) and lam > 0):
            raise ValueError(f"sae: lam must be a finite positive number, got {lam!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"sae: direction must be one of {DIRECTIONS}, got {direction!r}")
        super().__init__(lam=float(lam), direction=direction, **params)
        self.W: np.ndarray | None = None

    def fit(self, X, y, S):
        X, y, S = np.asarray(X), np.asarray(y), np.asarray(S)
        check_fit_inputs(X, y, S)
        Xn = l2n(X).astype(np.float64)
        Sn = l2n(S).astype(np.float64)
        W = sae_closed_form(Xn.T, Sn[y].T, self.params["lam"])
        if not np.isfinite(W).all():
            raise ValueError("sae: the Sylvester solution is not finite; try another lam")
        self.W = W.astype(np.float32)
        LOG.debug("sae: fit W %s with lam=%g on %d images", self.W.shape, self.params["lam"], len(X))
        return self

    def _need_fit(self) -> np.ndarray:
        if self.W is None:
            raise ValueError("sae: model is not fitted (W is None); call fit() or load_state() first")
        return self.W

    def embed_images(self, X):
        """Images in the semantic space, ``l2n(W x)``, whatever the scoring direction."""
        return l2n(l2n(X) @ self._need_fit().T)

    def scores(self, X, S):
        W = self._need_fit()
        S = np.asarray(S, np.float32)
        if S.ndim != 2 or S.shape[1] != W.shape[0]:
            raise ValueError(f"sae: semantics must be (C, {W.shape[0]}), got {S.shape}")
        if self.params["direction"] == "f2s":
            return self.embed_images(X) @ l2n(S).T
        return l2n(X) @ l2n(l2n(S) @ W).T

    def state(self):
        return {"W": self._need_fit()}

    def load_state(self, state):
        self.W = np.asarray(state["W"], np.float32)
