"""Bilinear compatibility models: one model, three ranking losses.

``F(x, s) = cos(x W, s)`` with ``W`` (d, k) mapping L2-normalised image features into the class
semantic space. ``W`` starts from the ridge-regression closed form onto the true class's semantic
vector and is refined with one of three losses over the seen classes (margin Δ):

* ``devise`` — DeViSE (Frome et al., 2013): hinge rank loss ``Σ_{j≠y} [Δ + F_j − F_y]₊``.
* ``ale`` — ALE (Akata et al., 2013/2016): weighted approximate rank (WARP) loss,
  ``(β_r / r) Σ_{j≠y} [Δ + F_j − F_y]₊`` with ``r`` the number of margin violators and
  ``β_r = Σ_{i≤r} 1/i`` (top-heavy: a correct class ranked 2nd costs less than one ranked 20th).
* ``sje`` — SJE (Akata et al., 2015): structured max, ``max_j (Δ·[j≠y] + F_j) − F_y``.

Because images land in the semantic (e.g. text) space, free text can be searched with any image
backbone. The cosine makes the margin scale-free, so one default Δ serves all three losses.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.zsl.models.base import ZSLModel, check_fit_inputs, register
from pipeline.core.vectors import l2n

LOG = logging.getLogger(__name__)

__all__ = ["Bilinear", "DeViSE", "ALE", "SJE", "ridge_projection", "ranking_loss"]


def ridge_projection(X: np.ndarray, T: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W ||X W - T||² + ridge ||W||²  =  (XᵀX + ridge I)⁻¹ XᵀT."""
    X = np.asarray(X, np.float64)
    return np.linalg.solve(X.T @ X + ridge * np.eye(X.shape[1]), X.T @ np.asarray(T, np.float64))


def ranking_loss(F, y, *, loss: str, margin: float):
    """Mean ranking loss of compatibility scores ``F`` (b, C) (torch) for true classes ``y`` (b,)."""
    import torch

    pos = F.gather(1, y[:, None])
    not_y = torch.ones_like(F).scatter(1, y[:, None], 0.0)
    viol = (margin + F - pos).clamp_min(0) * not_y
    if loss == "devise":
        return viol.sum(1).mean()
    if loss == "ale":
        r = (viol > 0).sum(1)
        C = F.shape[1]
        beta = torch.cumsum(1.0 / torch.arange(1, C + 1, dtype=F.dtype, device=F.device), 0)
        w = torch.where(r > 0, beta[(r - 1).clamp_min(0)] / r.clamp_min(1), torch.zeros_like(pos[:, 0]))
        return (w * viol.sum(1)).mean()
    if loss == "sje":
        return ((F + margin * not_y).max(1).values - pos[:, 0]).mean()
    raise ValueError(f"unknown ranking loss {loss!r}; use devise, ale or sje")


class Bilinear(ZSLModel):
    """Cosine bilinear compatibility trained with a ranking loss (see module docstring)."""

    loss = "devise"
    grid = {"margin": [0.1, 0.2, 0.4], "ridge": [1.0, 10.0]}

    def __init__(self, *, epochs: int = 30, lr: float = 1e-3, margin: float = 0.2, ridge: float = 10.0,
                 weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0) -> None:
        super().__init__(epochs=epochs, lr=lr, margin=margin, ridge=ridge, weight_decay=weight_decay,
                         batch_size=batch_size, seed=seed)
        self.W: np.ndarray | None = None

    def fit(self, X, y, S):
        import torch

        check_fit_inputs(X, y, S)
        p = self.params
        Xn, Sn = l2n(X), l2n(S)
        W0 = ridge_projection(Xn, Sn[y], p["ridge"])
        g = torch.Generator().manual_seed(p["seed"])
        W = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float32))
        Xt, yt, St = torch.from_numpy(Xn), torch.from_numpy(np.asarray(y, np.int64)), torch.from_numpy(Sn)
        opt = torch.optim.Adam([W], lr=p["lr"], weight_decay=p["weight_decay"])
        n = len(Xt)
        for epoch in range(p["epochs"]):
            perm = torch.randperm(n, generator=g)
            total = 0.0
            for i in range(0, n, p["batch_size"]):
                idx = perm[i : i + p["batch_size"]]
                F = torch.nn.functional.normalize(Xt[idx] @ W, dim=1) @ St.T
                loss = ranking_loss(F, yt[idx], loss=self.loss, margin=p["margin"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            LOG.debug("%s epoch %d: loss %.4f", self.method, epoch, total / n)
        self.W = W.detach().numpy().astype(np.float32)
        return self

    def embed_images(self, X):
        return l2n(l2n(X) @ self.W)

    def scores(self, X, S):
        return self.embed_images(X) @ l2n(S).T

    def state(self):
        return {"W": self.W}

    def load_state(self, state):
        self.W = state["W"]


@register
class DeViSE(Bilinear):
    method = "devise"
    loss = "devise"


@register
class ALE(Bilinear):
    method = "ale"
    loss = "ale"


@register
class SJE(Bilinear):
    method = "sje"
    loss = "sje"
