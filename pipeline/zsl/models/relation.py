"""Relation network for ZSL (Sung et al., "Learning to Compare: Relation Network for Few-Shot
Learning", CVPR 2018, section 3.4 "zero-shot learning").

The ZSL variant of the paper: the image embedding ``f`` is the identity on (pre-extracted,
L2-normalised) image features, a semantic embedding MLP ``g`` maps class semantics into the
*feature* space, and a relation module scores each (image, class) pair

    r_{i,c} = σ( h( [f(x_i), g(s_c)] ) ),    h = Linear(2d, hidden) -> ReLU -> Linear(hidden, 1),

trained with the paper's mean-squared error against the one-hot label over all seen classes

    L = Σ_i Σ_c (r_{i,c} - 1[y_i = c])².

The first layer of ``h`` on the concatenation is computed as ``W_a f(x) + W_b g(s) + b``, which is
the same function without materialising the ``(batch, C, 2d)`` pair tensor. Both image features
and class semantics are L2-normalised before use.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np

from pipeline.zsl.models.base import ZSLModel, check_fit_inputs, register
from pipeline.core.vectors import l2n

LOG = logging.getLogger(__name__)

__all__ = ["RelationNetwork"]

_PAIR_BUDGET = 1 << 24  # max (rows x classes x hidden) elements per scoring chunk


def _build(k: int, d: int, hidden: int):
    import torch
    from torch import nn

    class _Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # g: semantics -> feature space. The paper ends g with a ReLU because its ResNet
            # features are non-negative; features here may have any sign, so g ends linearly.
            self.g = nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, d))
            self.r1 = nn.Linear(2 * d, hidden)
            self.r2 = nn.Linear(hidden, 1)

        def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            e = self.g(s)  # (C, d)
            hx = x @ self.r1.weight[:, :d].T  # (b, hidden)
            he = e @ self.r1.weight[:, d:].T + self.r1.bias  # (C, hidden)
            h = torch.relu(hx[:, None, :] + he[None, :, :])  # (b, C, hidden)
            return torch.sigmoid(self.r2(h).squeeze(-1))  # (b, C)

    return _Net()


@register
class RelationNetwork(ZSLModel):
    """Relation network (ZSL variant), trained with Adam.

    Args:
        hidden: width of the hidden layer of both ``g`` and the relation module (the paper
            uses 1024 for ``g`` and 400 for the relation module; 256 default here).
        epochs: passes over the training images.
        lr: Adam learning rate.
        weight_decay: Adam L2 weight decay.
        batch_size: images per step (each is compared with every seen class, or with
            ``max_classes`` of them: the batch's own classes plus random negatives).
        min_steps: at least this many optimiser steps whatever ``epochs`` says: with few
            images (40 classes x 10 images is 13 batches an epoch) 30 epochs leave the relation
            module at its trivial all-zero optimum.
        max_classes: classes compared per step when there are more seen classes (SUN has 645):
            the MSE over a random subset of negatives keeps a step's cost independent of the
            number of classes.
        seed: seeds the initialisation (``torch.manual_seed`` inside a forked RNG, so the
            global torch RNG is untouched) and the shuffling (a ``torch.Generator``).
            Two fits with the same seed, data and thread count give identical weights.

    Scores are relation scores in ``(0, 1)``.
    """

    method = "relation"
    grid: ClassVar[dict[str, list]] = {"lr": [1e-3, 3e-4], "weight_decay": [1e-5, 1e-4]}

    def __init__(self, *, hidden: int = 256, epochs: int = 30, lr: float = 1e-3, weight_decay: float = 1e-5,
                 batch_size: int = 32, max_classes: int = 64, min_steps: int = 3000, seed: int = 0,
                 **params) -> None:
        for name, v in (("hidden", hidden), ("epochs", epochs), ("batch_size", batch_size)):
            if int(v) < 1:
                raise ValueError(f"relation: {name} must be >= 1, got {v!r}")
        if not (np.isfinite(lr) and lr > 0):
            raise ValueError(f"relation: lr must be > 0, got {lr!r}")
        if not (np.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"relation: weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(hidden=int(hidden), epochs=int(epochs), lr=float(lr), weight_decay=float(weight_decay),
                         batch_size=int(batch_size), max_classes=int(max_classes), min_steps=int(min_steps),
                         seed=int(seed), **params)
        self.net = None

    def fit(self, X, y, S):
        import torch

        X, y, S = np.asarray(X), np.asarray(y), np.asarray(S, np.float32)
        check_fit_inputs(X, y, S)
        S = l2n(S)  # like the features: the MLP then sees unit-scale input whatever the semantics' units
        p = self.params
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p["seed"])
            self.net = _build(S.shape[1], X.shape[1], p["hidden"])
        gen = torch.Generator().manual_seed(p["seed"])
        Xt, St = torch.from_numpy(l2n(X)), torch.from_numpy(S)
        yt = torch.from_numpy(y.astype(np.int64))
        onehot = torch.nn.functional.one_hot(yt, len(S)).float()
        opt = torch.optim.Adam(self.net.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
        n, bs = len(Xt), p["batch_size"]
        self.net.train()
        epochs = max(p["epochs"], -(-p["min_steps"] // max(1, -(-n // bs))))
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                if len(S) > p["max_classes"]:
                    own = torch.unique(yt[idx])
                    others = torch.ones(len(S), dtype=torch.bool)
                    others[own] = False
                    pool = torch.nonzero(others).squeeze(1)
                    extra = pool[torch.randperm(len(pool), generator=gen)[: max(0, p["max_classes"] - len(own))]]
                    cls = torch.cat([own, extra])
                    r = self.net(Xt[idx], St[cls])
                    loss = ((r - onehot[idx][:, cls]) ** 2).sum(1).mean()
                else:
                    r = self.net(Xt[idx], St)
                    loss = ((r - onehot[idx]) ** 2).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            LOG.debug("relation epoch %d: mse %.5f", epoch, total / n)
        self.net.eval()
        return self

    def scores(self, X, S):
        import torch

        if self.net is None:
            raise ValueError("relation: model is not fitted; call fit() or load_state() first")
        S = np.asarray(S, np.float32)
        k = self.net.g[0].in_features
        if S.ndim != 2 or S.shape[1] != k:
            raise ValueError(f"relation: semantics must be (C, {k}), got {S.shape}")
        S, Xn = l2n(S), l2n(X)
        rows = max(1, _PAIR_BUDGET // max(1, len(S) * self.params["hidden"]))
        out = np.empty((len(Xn), len(S)), np.float32)
        with torch.no_grad():
            St = torch.from_numpy(S)
            for i in range(0, len(Xn), rows):
                out[i:i + rows] = self.net(torch.from_numpy(Xn[i:i + rows]), St).numpy()
        return out

    def state(self):
        if self.net is None:
            raise ValueError("relation: model is not fitted; nothing to save")
        return {name: t.detach().cpu().numpy().astype(np.float32) for name, t in self.net.state_dict().items()}

    def load_state(self, state):
        import torch

        try:
            hidden, k = state["g.0.weight"].shape
            d = state["g.2.weight"].shape[0]
        except KeyError as exc:
            raise ValueError(f"relation: state lacks {exc.args[0]!r}; not a relation-network state") from None
        if hidden != self.params["hidden"]:
            raise ValueError(f"relation: state has hidden={hidden}, params say hidden={self.params['hidden']}")
        with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the global RNG
            self.net = _build(k, d, hidden)
        self.net.load_state_dict({name: torch.from_numpy(np.array(v, np.float32)) for name, v in state.items()})
        self.net.eval()
