"""Bridges from image features into a text model's space, learned from captioned images.

Every class-trained method learns its image -> semantics map from the seen classes alone, so it
cannot reach directions only unseen classes use. A bridge learns the map from (image, caption)
pairs instead (Open Clip Art drawings with their titles and keywords, img2dataset downloads with
their alt texts), then scores images against *any* class prompt. Three bridges:

- ``bridge`` — closed-form ridge regression of caption embeddings on centred, L2-normalised image
  features: ``W = (XcᵀXc + λ' I)⁻¹ Xcᵀ T`` with ``λ' = λ · tr(XcᵀXc) / d`` (λ is scale-free),
  ``embed(x) = l2n((l2n(x) - μ) W)``. :func:`fit_ridge_bridge` chooses λ on held-out pairs.
- ``bridge-contrastive`` — a linear projection trained with the symmetric InfoNCE loss (CLIP/LiT
  style: images against the captions of the same batch), torch, seeded.
- ``asif`` — ASIF-style relative representations (Norelli et al., 2023), no training: an image is
  represented by its cosine similarities to the anchor images, a text by its similarities to the
  anchor captions, each sparsified to the top ``k`` anchors, raised to the power ``p`` and
  L2-normalised; two such vectors are compared by their dot product.

Each also fits from class labels (``fit(X, y, S)`` uses the pairs ``(x_i, S[y_i])``), so
``zsl train --method bridge`` is a class-trained ridge map.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.zsl.models.base import ZSLModel, check_fit_inputs, register
from pipeline.core.vectors import l2n

LOG = logging.getLogger(__name__)

__all__ = ["RidgeBridge", "ContrastiveBridge", "ASIF", "ridge_closed_form", "relative_representation",
           "fit_ridge_bridge", "pair_recall"]


def ridge_closed_form(Xc: np.ndarray, T: np.ndarray, lam: float) -> np.ndarray:
    """``(XcᵀXc + λ' I)⁻¹ Xcᵀ T`` with ``λ' = lam · tr(XcᵀXc) / d``; float64 throughout."""
    Xc, T = np.asarray(Xc, np.float64), np.asarray(T, np.float64)
    G = Xc.T @ Xc
    d = G.shape[0]
    return np.linalg.solve(G + lam * np.trace(G) / d * np.eye(d), Xc.T @ T)


def pair_recall(img: np.ndarray, txt: np.ndarray, k: int = 10) -> float:
    """Text -> image recall@k over matched pairs (row i of ``img`` is the image of caption i)."""
    sims = l2n(txt) @ l2n(img).T
    k = min(k, len(img))
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return float(np.mean([i in row for i, row in enumerate(top)]))


class _LinearBridge(ZSLModel):
    """Shared by the ridge and contrastive bridges: ``embed(x) = l2n((l2n(x) - μ) W)``."""

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.W: np.ndarray | None = None
        self.mu: np.ndarray | None = None

    def fit(self, X, y, S):
        check_fit_inputs(X, y, S)
        return self.fit_pairs(X, np.asarray(S, np.float32)[y])

    def fit_pairs(self, X: np.ndarray, T: np.ndarray) -> "_LinearBridge":
        raise NotImplementedError

    def embed_images(self, X):
        return l2n((l2n(X) - self.mu) @ self.W)

    def scores(self, X, S):
        return self.embed_images(X) @ l2n(S).T

    def state(self):
        return {"W": self.W.astype(np.float32), "mu": self.mu.astype(np.float32)}

    def load_state(self, state):
        self.W, self.mu = state["W"], state["mu"]


@register
class RidgeBridge(_LinearBridge):
    method = "bridge"
    grid = {"lam": [0.001, 0.01, 0.1, 1.0]}

    def __init__(self, *, lam: float = 0.01) -> None:
        super().__init__(lam=lam)

    def fit_pairs(self, X, T):
        _check_pairs(X, T)
        Xn = l2n(X).astype(np.float64)
        self.mu = Xn.mean(0).astype(np.float32)
        self.W = ridge_closed_form(Xn - self.mu, l2n(T), self.params["lam"]).astype(np.float32)
        return self


@register
class ContrastiveBridge(_LinearBridge):
    method = "bridge-contrastive"
    grid = {"lr": [1e-3, 3e-3], "epochs": [20, 40]}

    def __init__(self, *, lr: float = 3e-3, epochs: int = 30, batch_size: int = 512, temperature: float = 0.05,
                 weight_decay: float = 1e-4, seed: int = 0) -> None:
        super().__init__(lr=lr, epochs=epochs, batch_size=batch_size, temperature=temperature,
                         weight_decay=weight_decay, seed=seed)

    def fit_pairs(self, X, T):
        import torch

        _check_pairs(X, T)
        p = self.params
        Xn = l2n(X)
        self.mu = Xn.mean(0).astype(np.float32)
        gen = torch.Generator().manual_seed(int(p["seed"]))
        torch.manual_seed(int(p["seed"]))
        x = torch.from_numpy(Xn - self.mu)
        t = torch.from_numpy(l2n(T))
        # start from the ridge solution: the contrastive loss then only has to sharpen it
        W = torch.nn.Parameter(torch.from_numpy(ridge_closed_form(Xn - self.mu, l2n(T), 0.01).astype(np.float32)))
        opt = torch.optim.AdamW([W], lr=float(p["lr"]), weight_decay=float(p["weight_decay"]))
        labels = torch.arange(min(int(p["batch_size"]), len(x)))
        for _ in range(int(p["epochs"])):
            order = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x) - 1, int(p["batch_size"])):
                idx = order[s:s + int(p["batch_size"])]
                if len(idx) < 2:
                    continue
                zi = torch.nn.functional.normalize(x[idx] @ W, dim=-1)
                logits = zi @ t[idx].T / float(p["temperature"])
                lab = labels[:len(idx)]
                loss = (torch.nn.functional.cross_entropy(logits, lab)
                        + torch.nn.functional.cross_entropy(logits.T, lab)) / 2
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.W = W.detach().numpy().astype(np.float32)
        return self


def relative_representation(Z: np.ndarray, anchors: np.ndarray, k: int, p: float) -> np.ndarray:
    """ASIF's representation of the rows of ``Z``: cosine similarities to the (L2-normalised)
    ``anchors``, all but the top ``k`` set to zero, negatives clipped, raised to ``p``, L2-normalised."""
    sims = l2n(Z) @ anchors.T
    k = min(int(k), sims.shape[1])
    out = np.zeros_like(sims)
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    rows = np.arange(len(sims))[:, None]
    out[rows, top] = np.maximum(sims[rows, top], 0.0) ** p
    return l2n(out)


@register
class ASIF(ZSLModel):
    method = "asif"
    grid = {"k": [16, 50, 128], "p": [4.0, 8.0]}

    def __init__(self, *, k: int = 50, p: float = 8.0, batch_rows: int = 4096) -> None:
        super().__init__(k=k, p=p, batch_rows=batch_rows)
        self.anchors_img: np.ndarray | None = None
        self.anchors_txt: np.ndarray | None = None

    def fit(self, X, y, S):
        check_fit_inputs(X, y, S)
        return self.fit_pairs(X, np.asarray(S, np.float32)[y])

    def fit_pairs(self, X, T):
        """No training: the pairs become the anchors."""
        _check_pairs(X, T)
        self.anchors_img, self.anchors_txt = l2n(X), l2n(T)
        return self

    def _rel(self, Z: np.ndarray, anchors: np.ndarray) -> np.ndarray:
        b = int(self.params["batch_rows"])
        return np.concatenate([relative_representation(Z[s:s + b], anchors, self.params["k"], self.params["p"])
                               for s in range(0, max(len(Z), 1), b)]) if len(Z) else np.zeros((0, len(anchors)),
                                                                                               np.float32)

    def embed_images(self, X):
        return self._rel(X, self.anchors_img)

    def embed_texts(self, T: np.ndarray) -> np.ndarray:
        return self._rel(T, self.anchors_txt)

    def scores(self, X, S):
        return self.embed_images(X) @ self.embed_texts(np.asarray(S, np.float32)).T

    # relative representations are already comparable: no centring for search
    def fit_search_centers(self, X, S):
        self.image_center = self.text_center = None

    def search_images(self, X):
        return self.embed_images(X)

    def search_queries(self, T):
        return self.embed_texts(np.asarray(T, np.float32))

    @property
    def search_dim(self) -> int:
        return int(len(self.anchors_img))

    def state(self):
        return {"anchors_img": self.anchors_img.astype(np.float32), "anchors_txt": self.anchors_txt.astype(np.float32)}

    def load_state(self, state):
        self.anchors_img, self.anchors_txt = state["anchors_img"], state["anchors_txt"]


def _check_pairs(X: np.ndarray, T: np.ndarray) -> None:
    if X.ndim != 2 or T.ndim != 2 or len(X) != len(T):
        raise ValueError(f"image features {X.shape} and caption embeddings {T.shape} do not pair up")
    if len(X) < 2:
        raise ValueError("a bridge needs at least 2 (image, caption) pairs")
    if not (np.isfinite(X).all() and np.isfinite(T).all()):
        raise ValueError("image features or caption embeddings contain NaN or inf")


def fit_ridge_bridge(X: np.ndarray, T: np.ndarray, *, lams=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
                     holdout: float = 0.1, seed: int = 0) -> tuple[RidgeBridge, dict]:
    """The ridge bridge with λ chosen by text -> image recall@10 on a held-out split of the pairs
    (refit on all pairs); returns the model and ``{"lam", "recall_at_10" per λ, "n_pairs", ...}``."""
    _check_pairs(X, T)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    n_hold = max(2, int(round(holdout * len(X))))
    hold, train = order[:n_hold], order[n_hold:]
    if len(train) < 2:
        raise ValueError(f"{len(X)} pairs are too few to hold {n_hold} out for choosing λ")
    scores = {}
    for lam in lams:
        m = RidgeBridge(lam=lam).fit_pairs(X[train], T[train])
        scores[lam] = pair_recall(m.embed_images(X[hold]), T[hold])
    best = max(lams, key=lambda v: (scores[v], v))  # ties: the stronger regularisation
    LOG.info("ridge bridge: λ=%g (held-out text->image recall@10 %.3f over %d pairs)", best, scores[best], n_hold)
    return RidgeBridge(lam=best).fit_pairs(X, T), {
        "lam": best, "recall_at_10": {str(k): round(v, 4) for k, v in scores.items()},
        "n_pairs": int(len(X)), "n_holdout": int(n_hold), "seed": seed}


class _WithBridge(ZSLModel):
    """A base model with a bridge fitted beforehand on its corpus: both rebuild themselves from
    ``params`` (``{"method", "params"}`` specs), keep their tensors under ``base.`` / ``bridge.``,
    and only the base is fitted."""

    def __init__(self, *, base: dict | None, bridge: dict | None, base_model: ZSLModel | None,
                 bridge_model: ZSLModel | None, **params) -> None:
        self.base = base_model if base_model is not None else _from_spec(self.method, "base", base)
        self.bridge = bridge_model if bridge_model is not None else _from_spec(self.method, "bridge", bridge)
        super().__init__(base={"method": self.base.method, "params": dict(self.base.params)},
                         bridge={"method": self.bridge.method, "params": dict(self.bridge.params)}, **params)

    def _fit_base(self, X, y, S):
        self.base.fit(X, y, S)
        self.params["base"]["params"] = dict(self.base.params)
        return self

    def state(self):
        return {**{f"base.{k}": v for k, v in self.base.state().items()},
                **{f"bridge.{k}": v for k, v in self.bridge.state().items()}}

    def load_state(self, state):
        self.base.load_state({k[5:]: v for k, v in state.items() if k.startswith("base.")})
        self.bridge.load_state({k[7:]: v for k, v in state.items() if k.startswith("bridge.")})


def _from_spec(method: str, role: str, spec: dict | None) -> ZSLModel:
    from pipeline.zsl.models.base import METHODS

    if not spec or spec.get("method") not in METHODS:
        raise ValueError(f"{method}: {role} must name a method, got {spec!r}")
    return METHODS[spec["method"]](**spec.get("params", {}))


@register
class Bridged(_WithBridge):
    """A class-trained model combined with a caption bridge fitted beforehand (``zsl train --bridge``):
    ``score = (1 - w) z(base) + w z(bridge)``, each z-scored per image across the classes (as in
    :class:`pipeline.zsl.models.ensemble.Ensemble`); ``fit`` fits the base only, the bridge stays as it
    was fitted on its corpus. ``w`` is chosen on held-out seen classes by ``zsl train``."""

    method = "bridged"

    def __init__(self, *, base: dict | None = None, bridge: dict | None = None, weight: float = 0.5,
                 base_model: ZSLModel | None = None, bridge_model: ZSLModel | None = None) -> None:
        if not 0.0 <= float(weight) <= 1.0:
            raise ValueError(f"bridged: weight must be in [0, 1], got {weight}")
        super().__init__(base=base, bridge=bridge, base_model=base_model, bridge_model=bridge_model,
                         weight=float(weight))

    def fit(self, X, y, S):
        return self._fit_base(X, y, S)

    def scores(self, X, S):
        from pipeline.zsl.models.ensemble import zscore_mix

        w = self.params["weight"]
        return zscore_mix([(1 - w, lambda: self.base.scores(X, S)), (w, lambda: self.bridge.scores(X, S))])

    def embed_images(self, X):
        return self.base.embed_images(X)


@register
class BridgedFeatures(_WithBridge):
    """A class-trained model that starts from bridged features (``zsl train --bridge --bridge-mode
    features``): its input is ``[l2n(x), bridge(x)]``, the image features next to their bridged text
    embedding, so the class-trained map can use directions the caption corpus taught the bridge.
    The bridge stays as fitted on its corpus; only the base is fitted."""

    method = "bridged-features"

    def __init__(self, *, base: dict | None = None, bridge: dict | None = None,
                 base_model: ZSLModel | None = None, bridge_model: ZSLModel | None = None) -> None:
        super().__init__(base=base, bridge=bridge, base_model=base_model, bridge_model=bridge_model)

    def lift(self, X: np.ndarray) -> np.ndarray:
        """``[l2n(x), bridge(x)]``: the base model's input."""
        return np.concatenate([l2n(X), self.bridge.embed_images(X)], axis=1).astype(np.float32)

    def fit(self, X, y, S):
        return self._fit_base(self.lift(X), y, S)

    def scores(self, X, S):
        return self.base.scores(self.lift(X), S)

    def embed_images(self, X):
        return self.base.embed_images(self.lift(X))
