"""DeViSE-style projection (Frome et al., 2013): image features -> the class-semantic space.

``W`` maps L2-normalised image features into the semantic space (e.g. sentence embeddings of
class names and descriptions); score = cosine(x W, s). ``W`` starts from the ridge-regression
closed form onto the true class's embedding and is refined with DeViSE's hinge ranking loss,
``sum_j max(0, margin - cos(xW, s_y) + cos(xW, s_j))``. Because images land in the *text* space,
free text can be searched with any image backbone.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.models.base import ZSLModel, _check_fit_inputs, l2n, register

LOG = logging.getLogger(__name__)


def ridge_projection(X: np.ndarray, T: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W ||X W - T||² + ridge ||W||²  =  (XᵀX + ridge I)⁻¹ XᵀT."""
    X = np.asarray(X, np.float64)
    return np.linalg.solve(X.T @ X + ridge * np.eye(X.shape[1]), X.T @ np.asarray(T, np.float64))


@register
class DeViSE(ZSLModel):
    method = "devise"

    def __init__(self, *, epochs: int = 30, lr: float = 1e-3, margin: float = 0.2, ridge: float = 10.0,
                 weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0, **params) -> None:
        super().__init__(epochs=epochs, lr=lr, margin=margin, ridge=ridge, weight_decay=weight_decay,
                         batch_size=batch_size, seed=seed, **params)
        self.W: np.ndarray | None = None

    def fit(self, X, y, S):
        import torch

        _check_fit_inputs(X, y, S)
        p = self.params
        Xn = l2n(X)
        Sn = l2n(S)
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
                z = torch.nn.functional.normalize(Xt[idx] @ W, dim=1)
                cos = z @ St.T  # (b, C)
                pos = cos.gather(1, yt[idx, None])
                hinge = (p["margin"] - pos + cos).clamp_min(0)
                hinge = hinge.scatter(1, yt[idx, None], 0.0)
                loss = hinge.sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            LOG.debug("devise epoch %d: hinge %.4f", epoch, total / n)
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
