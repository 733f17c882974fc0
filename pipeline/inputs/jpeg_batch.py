"""JPEG batches decoded by torchvision's ``decode_jpeg`` (nvJPEG on a CUDA device, libjpeg-turbo on
the CPU) into the same ``(size, size, 3)`` geometry as :func:`~pipeline.inputs.images.decode_image`:
EXIF orientation applied, shorter side resized to ``size`` (bicubic, antialiased), centre square
cropped. What is not a plain JPEG (PNG, CMYK, progressive files nvJPEG refuses, broken bytes) is
decoded by :func:`~pipeline.inputs.images.decode_image` on the CPU instead, so one odd file changes
only how it is decoded, never the batch. The pixel limit is checked from the header first.

Pixels differ from Pillow's by the resize kernels' rounding (a few levels of 255); embeddings agree
to cosine ~0.999 (``tests/unit/test_jpeg_batch.py``).
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

from pipeline.inputs.images import DecodeError, decode_image

if TYPE_CHECKING:  # pragma: no cover
    import torch

LOG = logging.getLogger(__name__)

__all__ = ["is_jpeg", "jpeg_size", "decode_jpegs"]

_SOI = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    """The bytes start like a JPEG file."""
    return data[:3] == _SOI


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG as shown (EXIF orientation applied), from its header alone;
    None when the header cannot be read."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data), formats=("JPEG",))
        w, h = im.size
        turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - the CPU path names what is wrong with it
        return None
    return (h, w) if turned else (w, h)


def _header_ok(data: bytes, max_pixels: int) -> bool:
    """The header's size is within ``max_pixels`` (else the CPU path refuses it with its reason)."""
    from PIL import Image

    try:
        w, h = Image.open(io.BytesIO(data), formats=("JPEG",)).size
    except Exception:  # noqa: BLE001 - the CPU path names what is wrong with it
        return False
    return w * h <= max_pixels


def _fit(img, size: int):
    """``(3, H, W)`` uint8 -> ``(size, size, 3)`` uint8: shorter side to ``size``, centre crop."""
    import torch
    from torchvision.transforms.v2 import functional as F

    h, w = img.shape[-2:]
    scale = size / min(w, h)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = F.resize(img, [nh, nw], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top:top + size, left:left + size].permute(1, 2, 0).to(torch.uint8)


def decode_jpegs(datas: list[bytes], *, size: int, device: str = "cpu",
                 max_pixels: int = 89_478_485) -> tuple["torch.Tensor", list[str | None], int]:
    """``(pixels, errors, n_torchvision)``: ``pixels`` a ``(n, size, size, 3)`` uint8 tensor on
    ``device`` (ready for :meth:`~pipeline.encoders.image.ImageEncoder.encode`), each row decoded by
    torchvision where it is a JPEG it can take, else by :func:`decode_image`; ``errors[i]`` is the
    reason row ``i`` could not be decoded (its pixels are zeros), or None."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    out = torch.zeros((len(datas), size, size, 3), dtype=torch.uint8, device=device)
    errors: list[str | None] = [None] * len(datas)
    fast = [i for i, d in enumerate(datas) if is_jpeg(d) and _header_ok(d, max_pixels)]
    done = set()
    if fast:
        tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in fast]
        try:
            imgs = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        except RuntimeError as exc:  # one file the decoder refuses fails the call: decode them one by one
            LOG.debug("batched decode_jpeg failed (%s); decoding one at a time", exc)
            imgs = []
            for t in tensors:
                try:
                    imgs.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
                except RuntimeError:
                    imgs.append(None)
        for i, img in zip(fast, imgs):
            if img is not None:
                out[i] = _fit(img, size)
                done.add(i)
    for i, d in enumerate(datas):
        if i not in done:
            try:
                out[i] = torch.tensor(decode_image(d, size=size, max_pixels=max_pixels)[0], device=device)
            except DecodeError as exc:
                errors[i] = str(exc)
    return out, errors, len(done)
