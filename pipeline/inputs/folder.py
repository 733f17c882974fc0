"""The ``folder`` layout: image files, a first-level sub-folder naming the label (as torchvision's
``ImageFolder``). Files are sorted and cut into shards of ``shard_size`` images; an image's id is
its path under the input folder (``dog/001.jpg``).
"""

from __future__ import annotations

import logging
from typing import Iterator

from pipeline.core import fs as zio
from pipeline.inputs.base import IMAGE_SUFFIXES, Record, Shard, list_input

LOG = logging.getLogger(__name__)

__all__ = ["name", "kind", "detect", "list_shards", "read"]

name = "folder"
kind = "folder"


def detect(files: list[str], *, image_column: str = "auto") -> str | None:
    """Any image file makes an image folder (the last layout tried)."""
    if any(f.rsplit("/", 1)[-1].lower().endswith(IMAGE_SUFFIXES) for f in files):
        return "image files (a first-level sub-folder names the label)"
    return None


def list_shards(uri: str, *, shard_size: int = 256, image_column: str = "auto") -> list[Shard]:
    """The sorted image files under ``uri``, ``shard_size`` to a shard."""
    files = list_input(uri, suffixes=IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{uri}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    _, root = zio.filesystem(uri.rstrip("/"))
    return [
        Shard(shard_id=i, kind=kind, source=uri, members=tuple(files[s : s + shard_size]), root=root)
        for i, s in enumerate(range(0, len(files), shard_size))
    ]


def read(shard: Shard, *, image_column: str = "auto", label_column: str = "label",
         label_field: str | None = None) -> Iterator[Record]:
    """Each member file's bytes, labelled by its first-level folder (a file that cannot be read is an error)."""
    for uri in shard.members:
        _, path = zio.filesystem(uri)
        rel = path[len(shard.root) :].lstrip("/") if path.startswith(shard.root) else path
        parts = rel.split("/")
        label = parts[0] if len(parts) > 1 else None
        try:
            data = zio.read_bytes(uri)
        except OSError as exc:
            yield Record(image_id=rel, uri=uri, label=label, error=f"read failed: {exc}")
            continue
        yield Record(image_id=rel, uri=uri, label=label, data=data)
