"""Text / CLIP-style zero-shot: cosine between (projected) image features and class text embeddings.

With an open_clip backbone whose text tower embedded the classes, images and class prompts already
share one space: nothing is trained (``projection="auto"`` sees equal dimensions and keeps the
identity), and class embeddings are prompt-template ensembles (see ``zsl classes``). With any other
backbone, a ridge-regression projection (closed form) maps image features into the text space
first — the simplest "projected" variant; ``devise``/``ale``/``sje`` learn it with ranking losses.
"""

from __future__ import annotations

import numpy as np

from pipeline.zsl.models.base import ZSLModel, check_fit_inputs, register
from pipeline.core.vectors import l2n
from pipeline.zsl.models.bilinear import ridge_projection


@register
class TextZeroShot(ZSLModel):
    method = "clip"
    grid = {"ridge": [1.0, 10.0, 100.0]}

    def __init__(self, *, projection: str = "auto", ridge: float = 10.0) -> None:
        if projection not in ("auto", "none", "ridge"):
            raise ValueError(f"projection must be auto, none or ridge, got {projection!r}")
        super().__init__(projection=projection, ridge=ridge)
        self.W: np.ndarray | None = None

    def fit(self, X, y, S):
        check_fit_inputs(X, y, S)
        same_space = X.shape[1] == S.shape[1]
        mode = self.params["projection"]
        if mode == "none" and not same_space:
            raise ValueError(f"projection='none' needs image features in the text space, but they are "
                             f"{X.shape[1]}-d and the class embeddings {S.shape[1]}-d; use an open_clip backbone "
                             "with its text tower, or projection='ridge'")
        if mode == "ridge" or (mode == "auto" and not same_space):
            self.W = ridge_projection(l2n(X), l2n(S)[y], self.params["ridge"]).astype(np.float32)
        else:
            self.W = None
        return self

    def embed_images(self, X):
        X = l2n(X)
        return l2n(X @ self.W) if self.W is not None else X

    def scores(self, X, S):
        return self.embed_images(X) @ l2n(S).T

    def state(self):
        return {"W": self.W} if self.W is not None else {}

    def load_state(self, state):
        self.W = state.get("W")
