"""DAP — Direct Attribute Prediction (Lampert, Nickisch & Harmeling, "Attribute-Based
Classification for Zero-Shot Visual Object Categorization", TPAMI 2013).

One probabilistic classifier per attribute ``a_m`` is trained on seen-class images (the label of
an image is the binarised attribute of its class). A class ``c`` with binary signature
``a^c`` then gets the MAP posterior (paper, eq. 2-3, uniform class prior)

    log p(c | x) = Σ_m  log p(a_m = a^c_m | x) - log p(a_m = a^c_m),

where the attribute prior ``p(a_m = 1)`` is the mean of the binarised attribute over the seen
classes. Probabilities and priors are clipped to ``[1e-4, 1 - 1e-4]`` so no score is ``-inf``.

The per-attribute classifiers are one L2-regularised multi-output logistic regression, fit for
all attributes at once with full-batch L-BFGS in torch (the paper used SVMs with Platt scaling).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np

from pipeline.zsl.models.base import ZSLModel, check_fit_inputs, register
from pipeline.core.vectors import l2n

LOG = logging.getLogger(__name__)

__all__ = ["DAP", "binarize_attributes", "dap_log_posterior"]

EPS = 1e-4
_CHUNK = 65_536


def _check_attributes(S: np.ndarray) -> np.ndarray:
    S = np.asarray(S, np.float64)
    if S.ndim != 2:
        raise ValueError(f"dap: class semantics must be 2-D (C, n_attributes), got shape {S.shape}")
    if not np.isfinite(S).all():
        raise ValueError("dap: class attributes contain NaN or inf")
    if S.size and S.min() < 0:
        raise ValueError(f"dap: semantics have negative values (min {S.min():.4g}); DAP needs attributes "
                         "(binary or continuous >= 0), not text embeddings or z-scored attributes")
    return S


def binarize_attributes(S: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """``a^c_m = 1`` iff ``S[c, m] > threshold[m]`` (float 0/1 array of S's shape)."""
    return (_check_attributes(S) > threshold).astype(np.float64)


def dap_log_posterior(P: np.ndarray, A: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """``log p(c|x) = Σ_m log p(a_m = A[c,m] | x) - log p(a_m = A[c,m])``.

    Args:
        P: ``(n, M)`` attribute probabilities ``p(a_m = 1 | x)``.
        A: ``(C, M)`` binary class signatures.
        prior: ``(M,)`` ``p(a_m = 1)``.

    Returns:
        ``(n, C)`` log posteriors (up to the class-independent ``log p(x)``).
    """
    P = np.clip(np.asarray(P, np.float64), EPS, 1 - EPS)
    prior = np.clip(np.asarray(prior, np.float64), EPS, 1 - EPS)
    on = np.log(P) - np.log(prior)  # term when a^c_m = 1
    off = np.log1p(-P) - np.log1p(-prior)  # term when a^c_m = 0
    return off.sum(1, keepdims=True) + (on - off) @ np.asarray(A, np.float64).T


@register
class DAP(ZSLModel):
    """Direct attribute prediction with multi-output logistic regression.

    Args:
        threshold: attribute values above it are "present". ``None`` (default): per attribute,
            the mean of that attribute over the seen classes (how the binary AwA matrix was
            derived from the continuous one); this is scale-free, so it works for 0/1, 0-100
            and L2-normalised attributes alike. A float applies to every attribute and must be
            in the attributes' units. Thresholds are fixed at fit time and reused for any class set.
        l2: L2 penalty on the weights, ``loss = mean BCE + l2/2 * ||W||²`` (features are
            standardised per dimension inside the fit).
        epochs: maximum L-BFGS iterations (full batch).
        lr: L-BFGS step size (strong-Wolfe line search).
        seed: seeds the small random initialisation of the weights.

    Attributes constant over the seen classes cannot be learned: their classifier predicts the
    (clipped) constant prior, so they add exactly 0 to every class's log posterior.
    """

    method = "dap"
    grid: ClassVar[dict[str, list]] = {"l2": [1e-4, 1e-3, 1e-2, 1e-1]}

    def __init__(self, *, threshold: float | None = None, l2: float = 1e-2, epochs: int = 100,
                 lr: float = 1.0, seed: int = 0, **params) -> None:
        if threshold is not None and not np.isfinite(threshold):
            raise ValueError(f"dap: threshold must be a finite number or None, got {threshold!r}")
        if not (np.isfinite(l2) and l2 >= 0):
            raise ValueError(f"dap: l2 must be >= 0, got {l2!r}")
        if int(epochs) < 1:
            raise ValueError(f"dap: epochs must be >= 1, got {epochs!r}")
        if not (np.isfinite(lr) and lr > 0):
            raise ValueError(f"dap: lr must be > 0, got {lr!r}")
        super().__init__(threshold=None if threshold is None else float(threshold), l2=float(l2),
                         epochs=int(epochs), lr=float(lr), seed=int(seed), **params)
        self.W: np.ndarray | None = None  # (d, M)
        self.b: np.ndarray | None = None  # (M,)
        self.threshold: np.ndarray | None = None  # (M,)
        self.prior: np.ndarray | None = None  # (M,), clipped

    def fit(self, X, y, S):
        import torch

        X, y = np.asarray(X), np.asarray(y)
        S = _check_attributes(S)
        check_fit_inputs(X, y, S)
        p = self.params
        thr = S.mean(0) if p["threshold"] is None else np.full(S.shape[1], p["threshold"])
        A = binarize_attributes(S, thr)  # (C_seen, M)
        prior = np.clip(A.mean(0), EPS, 1 - EPS)
        varying = np.flatnonzero(A.min(0) != A.max(0))
        Xn = l2n(X)
        d, M = Xn.shape[1], S.shape[1]
        W = np.zeros((d, M))
        b = np.log(prior / (1 - prior))  # constant attributes: sigmoid(b) = prior
        LOG.info("dap: %d attributes (%d constant over the seen classes) on %d images",
                 M, M - len(varying), len(Xn))
        if len(varying):
            mu, sd = Xn.mean(0), Xn.std(0) + 1e-6
            Z = torch.from_numpy(((Xn - mu) / sd).astype(np.float32))
            T = torch.from_numpy(A[np.asarray(y)][:, varying].astype(np.float32))
            g = torch.Generator().manual_seed(p["seed"])
            Wt = torch.nn.Parameter(0.01 * torch.randn(d, len(varying), generator=g))
            bt = torch.nn.Parameter(torch.from_numpy(b[varying].astype(np.float32)))
            opt = torch.optim.LBFGS([Wt, bt], lr=p["lr"], max_iter=p["epochs"], history_size=20,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)
            n = len(Z)
            bce = torch.nn.functional.binary_cross_entropy_with_logits

            def closure():
                opt.zero_grad()
                total = 0.5 * p["l2"] * (Wt * Wt).sum()
                total.backward()
                total = total.detach()
                for i in range(0, n, _CHUNK):  # chunked so the (n, M) logits never all live at once
                    part = bce(Z[i:i + _CHUNK] @ Wt + bt, T[i:i + _CHUNK], reduction="sum") / (n * T.shape[1])
                    part.backward()
                    total = total + part.detach()
                return total

            loss = opt.step(closure)
            LOG.debug("dap: final loss %.5f", float(loss))
            Wv = Wt.detach().numpy().astype(np.float64) / sd[:, None]  # fold standardisation back in
            W[:, varying] = Wv
            b[varying] = bt.detach().numpy() - mu @ Wv
        # float64: a prior near 1 rounded to float32 would shift log(1 - prior) by ~2e-4.
        self.W, self.b, self.threshold, self.prior = W, b, thr, prior
        return self

    def _need_fit(self) -> None:
        if self.W is None:
            raise ValueError("dap: model is not fitted; call fit() or load_state() first")

    def attribute_probabilities(self, X: np.ndarray) -> np.ndarray:
        """``(n, M)`` ``p(a_m = 1 | x)``, clipped to ``[1e-4, 1 - 1e-4]``."""
        self._need_fit()
        logits = l2n(X).astype(np.float64) @ self.W + self.b
        return np.clip(1.0 / (1.0 + np.exp(-logits)), EPS, 1 - EPS)

    def embed_images(self, X):
        """Images in the attribute space: their L2-normalised attribute probabilities."""
        return l2n(self.attribute_probabilities(X))

    def scores(self, X, S):
        self._need_fit()
        S = _check_attributes(S)
        if S.shape[1] != len(self.threshold):
            raise ValueError(f"dap: semantics must have {len(self.threshold)} attributes, got {S.shape[1]}")
        A = binarize_attributes(S, self.threshold)
        return dap_log_posterior(self.attribute_probabilities(X), A, self.prior).astype(np.float32)

    def state(self):
        self._need_fit()
        return {"W": self.W, "b": self.b, "threshold": self.threshold, "prior": self.prior}

    def load_state(self, state):
        self.W, self.b = np.asarray(state["W"], np.float64), np.asarray(state["b"], np.float64)
        self.threshold = np.asarray(state["threshold"], np.float64)
        self.prior = np.asarray(state["prior"], np.float64)
