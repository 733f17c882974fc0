"""``GET /images/{faiss_id}``: JPEG thumbnails of the images an index holds, made on first request
and cached on disk (written atomically). Ids are integers, so no client path reaches the disk."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from fastapi import HTTPException

from pipeline.core import fs as zio
from pipeline.index.searcher import Searcher
from pipeline.inputs.images import FORMATS

LOG = logging.getLogger(__name__)


def cached_thumbnail(s: Searcher, name: str, faiss_id: int, *, size: int, cache_dir: str, max_pixels: int) -> bytes:
    """The JPEG thumbnail (at most ``size`` pixels a side) of image ``faiss_id`` of index ``name``;
    a 404 for an id the index does not hold or an image that cannot be read."""
    if not 0 <= faiss_id < s.manifest.ntotal:
        raise HTTPException(404, f"no image {faiss_id} in index {name!r} ({s.manifest.ntotal} images)")
    uri = s.ids.take([faiss_id]).column("uri")[0].as_py()
    target = Path(cache_dir) / s.manifest.sha256[:16] / f"{faiss_id}-{size}.jpg"
    if not target.exists():
        try:
            data = make_thumbnail(uri, size=size, max_pixels=max_pixels)
        except Exception as exc:  # noqa: BLE001 - a gone or broken image is the client's 404, named
            raise HTTPException(404, f"image {faiss_id} ({uri}) cannot be read: {type(exc).__name__}: {exc}")
        zio.write_bytes_atomic(str(target), data)
    return target.read_bytes()


def make_thumbnail(uri: str, *, size: int, max_pixels: int) -> bytes:
    """The image at ``uri`` as a JPEG of at most ``size`` pixels a side; refuses more than ``max_pixels``."""
    from PIL import Image

    fs, path = zio.filesystem(uri)
    with fs.open(path, "rb") as f:
        raw = f.read()
    Image.MAX_IMAGE_PIXELS = max_pixels
    with Image.open(io.BytesIO(raw), formats=FORMATS) as im:
        im.draft("RGB", (size, size))
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
