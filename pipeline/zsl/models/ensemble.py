"""Score-level ensemble of ZSL models.

Member scores live on unrelated scales: cosines in [-1, 1] (SAE, DeViSE), unbounded bilinear
scores (ESZSL), log posteriors summed over dozens of attributes (DAP), sigmoids in (0, 1)
(relation network). Adding them raw would let the widest-ranging method dominate whatever the
weights say. Each member's scores are therefore standardised *per image across the classes*,

    z_i(x, c) = (s_i(x, c) - mean_c' s_i(x, c')) / std_c' s_i(x, c'),

which keeps every member's ranking of the classes for that image and gives every member unit
spread, and then combined as ``score(x, c) = Σ_i w_i z_i(x, c)`` (late fusion of normalised
scores). A row with zero spread (e.g. a single class) standardises to zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.zsl.models.base import METHODS, ZSLModel, register

LOG = logging.getLogger(__name__)

__all__ = ["Ensemble", "row_zscore", "zscore_mix"]


def row_zscore(s: np.ndarray) -> np.ndarray:
    """``(s - row mean) / row std`` (population std; rows with std 0 become 0), float64."""
    s = np.asarray(s, np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (n, C), got shape {s.shape}")
    mu = s.mean(1, keepdims=True)
    sd = s.std(1, keepdims=True)
    return np.divide(s - mu, sd, out=np.zeros_like(s), where=sd > 0)


def zscore_mix(weighted: Sequence[tuple[float, Any]]) -> np.ndarray:
    """``sum_i w_i * row_zscore(scores_i())`` over ``(w_i, scores_i)`` pairs, float32; a score
    function whose weight is 0 is not called (the one score mix of ensembles and bridged models)."""
    total = None
    for w, scores in weighted:
        if w:
            z = w * row_zscore(scores())
            total = z if total is None else total + z
    if total is None:
        raise ValueError("zscore_mix: every weight is 0")
    return total.astype(np.float32)


def _member(spec: Any, i: int) -> ZSLModel:
    if isinstance(spec, ZSLModel):
        return spec
    if not isinstance(spec, dict) or "method" not in spec:
        raise ValueError(f"ensemble: member {i} must be a ZSLModel or {{'method': ..., 'params': {{...}}}}, "
                         f"got {spec!r}")
    cls = METHODS.get(spec["method"])
    if cls is None:
        raise ValueError(f"ensemble: member {i} has unknown method {spec['method']!r} (known: {', '.join(METHODS)})")
    if cls is Ensemble:
        raise ValueError(f"ensemble: member {i} is itself an ensemble; nest the members instead")
    return cls(**spec.get("params", {}))


@register
class Ensemble(ZSLModel):
    """Weighted sum of per-image z-scored member scores.

    Args:
        members: member models, each an already-constructed :class:`ZSLModel` or a spec
            ``{"method": name, "params": {...}}`` built through the registry (the form saved
            in ``params``, so a saved ensemble rebuilds itself on load).
        weights: one finite weight per member, not all zero; default equal weights ``1/n``.

    ``params`` is ``{"members": [{"method", "params"}, ...], "weights": [...]}``; the state
    holds each member's tensors under the prefix ``m{i}.``.
    """

    method = "ensemble"

    def __init__(self, *, members: Sequence[Any] = (), weights: Sequence[float] | None = None, **params) -> None:
        self.members = [_member(m, i) for i, m in enumerate(members)]
        if not self.members:
            raise ValueError("ensemble: members is empty; give at least one member model")
        w = [1.0 / len(self.members)] * len(self.members) if weights is None else [float(v) for v in weights]
        if len(w) != len(self.members):
            raise ValueError(f"ensemble: {len(w)} weights for {len(self.members)} members")
        if not all(np.isfinite(w)) or not any(w):
            raise ValueError(f"ensemble: weights must be finite and not all zero, got {w}")
        self.weights = w
        super().__init__(**params)
        self._refresh_params()

    def _refresh_params(self) -> None:
        self.params.update(members=[{"method": m.method, "params": dict(m.params)} for m in self.members],
                           weights=list(self.weights))

    def fit(self, X, y, S):
        for i, m in enumerate(self.members):
            LOG.info("ensemble: fitting member %d (%s)", i, m.method)
            m.fit(X, y, S)
        self._refresh_params()  # a member may record fit-time values in its params
        return self

    def scores(self, X, S):
        return zscore_mix([(w, lambda m=m: m.scores(X, S)) for w, m in zip(self.weights, self.members)])

    def embed_images(self, X):
        """Delegates to the first member that can map images into the semantic space."""
        for m in self.members:
            if type(m).embed_images is not ZSLModel.embed_images:
                return m.embed_images(X)
        raise NotImplementedError("ensemble: no member can map images into the semantic space "
                                  f"(members: {', '.join(m.method for m in self.members)})")

    def state(self):
        return {f"m{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.state().items()}

    def load_state(self, state):
        parts: list[dict[str, np.ndarray]] = [{} for _ in self.members]
        for key, value in state.items():
            head, _, rest = key.partition(".")
            i = int(head[1:]) if head[:1] == "m" and head[1:].isdigit() else -1
            if not 0 <= i < len(self.members) or not rest:
                raise ValueError(f"ensemble: state key {key!r} names no member (have {len(self.members)})")
            parts[i][rest] = value
        for m, part in zip(self.members, parts):
            m.load_state(part)
