"""ESZSL — "An embarrassingly simple approach to zero-shot learning" (Romera-Paredes & Torr, 2015).

Closed form, with X (d, m) features, Y (m, z) in {-1, 1}, S (a, z) class semantics:

    V = (X Xᵀ + γ I)⁻¹ X Y Sᵀ (S Sᵀ + λ I)⁻¹        score(x, s) = xᵀ V s
"""

from __future__ import annotations

import numpy as np

from pipeline.zsl.models.base import ZSLModel, check_fit_inputs, register
from pipeline.core.vectors import l2n


def eszsl_closed_form(X: np.ndarray, Y: np.ndarray, S: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """The published closed form; ``X`` (d, m), ``Y`` (m, z), ``S`` (a, z) -> ``V`` (d, a)."""
    d, a = X.shape[0], S.shape[0]
    left = np.linalg.solve(X @ X.T + gamma * np.eye(d), X @ Y @ S.T)  # (d, a)
    return np.linalg.solve((S @ S.T + lam * np.eye(a)).T, left.T).T


@register
class ESZSL(ZSLModel):
    method = "eszsl"
    grid = {"gamma": [0.01, 0.1, 1.0, 10.0], "lam": [0.01, 0.1, 1.0, 10.0]}

    def __init__(self, *, gamma: float = 1.0, lam: float = 0.1) -> None:
        super().__init__(gamma=gamma, lam=lam)
        self.V: np.ndarray | None = None

    def fit(self, X, y, S):
        check_fit_inputs(X, y, S)
        Xn = l2n(X).astype(np.float64)
        Y = -np.ones((len(y), len(S)))
        Y[np.arange(len(y)), y] = 1.0
        self.V = eszsl_closed_form(Xn.T, Y, np.asarray(S, np.float64).T, self.params["gamma"], self.params["lam"])
        return self

    def scores(self, X, S):
        V, S = self.V.astype(np.float32), np.asarray(S, np.float32)
        d, k, C = V.shape[0], V.shape[1], S.shape[0]
        if d * C <= d * k + k * C:  # few classes: one (d, C) matrix, one product per image
            return l2n(X) @ (V @ S.T)
        return (l2n(X) @ V) @ S.T  # many classes: project into the semantic space first

    def embed_images(self, X):
        return l2n(l2n(X) @ self.V.astype(np.float32))

    def state(self):
        return {"V": self.V.astype(np.float32)}

    def load_state(self, state):
        self.V = state["V"]
