"""The offline text model (all-MiniLM-L6-v2) on ONNX Runtime, for serving text queries on CPUs.

sentence-transformers runs the model as ``Transformer -> Pooling(mean) -> Normalize``. Here the
transformer is exported once with ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic
batch and sequence axes) into a cache directory and run by an ONNX Runtime session; tokenising
(sentence-transformers' own tokenizer and truncation) and mean pooling are unchanged. The export is
checked against the PyTorch model on other texts (other batch sizes and lengths) before use (max abs difference of the pooled
vectors ``<= TOLERANCE``); a mismatch or a broken cache file means a fresh export.

Why: on two shared cores, ``make bench-serve`` answers 1.4-1.65x more text queries per second with
the session than with PyTorch, at half the p99 latency (the session runs with the GIL released, so
request threads keep going); the vectors differ from PyTorch's by ~3e-7 (1e-4 is the check's bound).

Cache, lock and check: :mod:`pipeline.encoders.onnx_cache` (shared with the image encoders), one
file per model files, torch and onnxruntime version, so concurrent servers share one export.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.core.vectors import l2n
from pipeline.encoders import onnx_cache
from pipeline.encoders.onnx_cache import cache_dir, onnx_available

LOG = logging.getLogger(__name__)

__all__ = ["onnx_available", "minilm_onnx_encoder", "cache_dir", "TOLERANCE"]

#: largest allowed |onnx - torch| over the pooled vectors of the probe texts
TOLERANCE = 1e-4
_FORMAT = 1  # bump when the exported graph changes
#: texts the graph is traced with
PROBES = ("a photo of a zebra.", "zsl", "a striped horse-like animal standing in tall grass near a river, "
          "photographed at dusk with a long lens", "Ünïcödé テキスト 🦓")
#: texts the export is checked with: other batch sizes and lengths than the trace (one word alone,
#: a text cut at the model's 256 tokens), so shapes frozen into the graph would show
CHECKS = (("giraffe",), ("a photo of a red car.", "a drawing of a cat", "striped " * 300,
                         "the quick brown fox jumps over the lazy dog", "?"))


def _check_pipeline(model) -> None:
    """Only ``Transformer -> Pooling(mean) [-> Normalize]`` is reproduced here."""
    names = [type(m).__name__ for m in model]
    if names[:2] != ["Transformer", "Pooling"] or any(n != "Normalize" for n in names[2:]):
        raise ValueError(f"ONNX text path supports Transformer -> Pooling [-> Normalize], not {' -> '.join(names)}")
    pool = model[1]
    mode = getattr(pool, "pooling_mode", None) or (
        "mean" if getattr(pool, "pooling_mode_mean_tokens", False) else "other")
    if mode not in ("mean", "mean_tokens"):
        raise ValueError(f"ONNX text path supports mean pooling, not {mode!r}")


def _key(model, model_dir: str) -> str:
    import onnxruntime
    import torch

    h = hashlib.sha256()
    h.update(f"format={_FORMAT} torch={torch.__version__} ort={onnxruntime.__version__}".encode())
    for rel in sorted(os.listdir(model_dir)):
        p = os.path.join(model_dir, rel)
        if os.path.isfile(p):
            st = os.stat(p)
            h.update(f"{rel}:{st.st_size}".encode())
            if st.st_size < (1 << 20):  # configs and vocab by content, weights by size and a sample
                with open(p, "rb") as f:
                    h.update(f.read())
            else:
                with open(p, "rb") as f:
                    h.update(f.read(1 << 16))
                    f.seek(st.st_size // 2)
                    h.update(f.read(1 << 16))
    return h.hexdigest()[:20]


def _tokenize(model, texts: list[str]) -> dict:
    fn = getattr(model, "preprocess", None) or model.tokenize  # ``tokenize`` before sentence-transformers 6
    return fn(texts)


def _export(model, path: Path) -> None:
    """Export the transformer of ``model`` to ``path`` (atomically)."""
    import torch

    bert = model[0].auto_model.eval()

    class _Hidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    feats = _tokenize(model, list(PROBES))
    args = tuple(feats[k].cpu() for k in ("input_ids", "attention_mask", "token_type_ids"))
    axes = {k: {0: "batch", 1: "tokens"} for k in ("input_ids", "attention_mask", "token_type_ids", "hidden")}
    with onnx_cache.export_to(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on Python-level branches; the result is checked
        torch.onnx.export(_Hidden(bert), args, tmp, input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["hidden"], dynamic_axes=axes, opset_version=17, dynamo=False)


def _encode_fn(model, sess) -> Callable[[list[str]], np.ndarray]:
    wanted = [i.name for i in sess.get_inputs()]

    def encode(texts: list[str]) -> np.ndarray:
        feats = _tokenize(model, list(texts))  # sentence-transformers' tokenizer and max_seq_length
        inputs = {k: feats[k].cpu().numpy().astype(np.int64) for k in wanted}
        hidden = sess.run(None, inputs)[0]
        mask = inputs["attention_mask"][..., None].astype(np.float32)
        return (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)

    return encode


def _max_diff(model, fn) -> float:
    diff = 0.0
    for texts in CHECKS:
        want = model.encode(list(texts), convert_to_numpy=True, show_progress_bar=False, normalize_embeddings=True)
        got = fn(list(texts))
        got = l2n(got, dtype=None)
        diff = max(diff, float(np.abs(np.asarray(want, np.float32) - got).max()))
    return diff


def minilm_onnx_encoder(model, model_dir: str, *, threads: int | None = None) -> Callable[[list[str]], np.ndarray]:
    """The encode function (texts -> un-normalised pooled vectors) of the sentence-transformers
    ``model`` (loaded from ``model_dir``) on ONNX Runtime; exported and checked on first use, then
    cached (:func:`pipeline.encoders.onnx_cache.cached_export`)."""
    _check_pipeline(model)
    return onnx_cache.cached_export(
        f"minilm-{_key(model, model_dir)}.onnx", export=lambda path: _export(model, path),
        build=lambda path: _encode_fn(model, onnx_cache.session(path, threads)),
        check=lambda fn: _max_diff(model, fn), tolerance=TOLERANCE, what="text model", log=LOG)
