"""The ``files`` layout: img2dataset's ``files`` output.

``00000/000000001.jpg`` + ``.txt`` (caption) + ``.json`` (url, key, status, ...) with a
``00000.parquet`` sidecar (every row, failed ones too) and ``00000_stats.json``; one ``NNNNN``
folder is one shard. Folder names are *not* labels: labels come only from ``label_field`` (a key
of the json sidecars). Rows img2dataset marked failed in the sidecar come back as errors with its
``error_message``; a shard whose every download failed has no folder, only its sidecar.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Iterator

from pipeline.core import fs as zio
from pipeline.inputs.base import (IMAGE_SUFFIXES, Record, Shard, check_unique_stems, i2d_fields, list_input,
                                  sidecar_failures)

LOG = logging.getLogger(__name__)

__all__ = ["name", "kind", "detect", "list_shards", "read"]

name = "files"
kind = "files"

_SHARD_DIR = re.compile(r"^\d+$")  # img2dataset's shard names (5 digits by default, oom_shard_count sets it)


def _shard_dirs(files: list[str]) -> dict[str, list[str]]:
    """``NNNNN/`` folders of images -> their image files."""
    dirs: dict[str, list[str]] = {}
    for f in files:
        head, _, base = f.rpartition("/")
        if _SHARD_DIR.match(head.rsplit("/", 1)[-1]) and base.lower().endswith(IMAGE_SUFFIXES):
            dirs.setdefault(head, []).append(f)
    return dirs


def detect(files: list[str], *, image_column: str = "auto") -> str | None:
    """``NNNNN/`` folders of images with a ``NNNNN.parquet`` or ``NNNNN_stats.json`` sidecar."""
    dirs = _shard_dirs(files)
    listed = set(files)
    if not any(f"{d}.parquet" in listed or f"{d}_stats.json" in listed for d in dirs):
        return None
    stats = sum(f.rsplit("/", 1)[-1].endswith("_stats.json") for f in files)
    return (f"{len(dirs)} NNNNN folders of images with .parquet/_stats.json sidecars "
            f"(img2dataset 'files' output{'' if not stats else f', {stats} _stats.json'})")


def list_shards(uri: str, *, shard_size: int = 256, image_column: str = "auto") -> list[Shard]:
    """One shard per ``NNNNN`` folder (or sidecar without a folder), in name order."""
    files = list_input(uri)
    dirs = _shard_dirs(files)
    for f in files:  # a shard whose every download failed has no folder, only its sidecar
        if f.lower().endswith(".parquet") and _SHARD_DIR.match(f.rsplit("/", 1)[-1][: -len(".parquet")]):
            dirs.setdefault(f[: -len(".parquet")], [])
    if not dirs:
        raise ValueError(f"{uri}: no NNNNN/ folders of images (img2dataset 'files' output)")
    check_unique_stems(sorted(dirs))  # two runs' 00000/ would give the same image ids
    return [Shard(shard_id=i, kind=kind, source=d, members=tuple(sorted(dirs[d])), root=zio.filesystem(d)[1])
            for i, d in enumerate(sorted(dirs))]


def read(shard: Shard, *, image_column: str = "auto", label_column: str = "label",
         label_field: str | None = None) -> Iterator[Record]:
    """Each image with its ``.json``/``.txt`` sidecars, then the rows the shard's sidecar marks failed."""
    fs, base = zio.filesystem(shard.source)
    shard_stem = base.rstrip("/").rsplit("/", 1)[-1]
    for uri in shard.members:
        _, path = zio.filesystem(uri)
        key = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        image_id = f"{shard_stem}/{key}"
        try:
            meta = _sidecars(fs, path.rsplit(".", 1)[0])
            data = zio.read_bytes(uri)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            yield Record(image_id=image_id, uri=uri, error=f"read failed: {exc}")
            continue
        yield Record(image_id=image_id, uri=uri, data=data, **i2d_fields({"key": key, **meta}, label_field))
    yield from sidecar_failures(shard.source.rstrip("/") + ".parquet", shard_stem, label_field)


def _sidecars(fs, side: str) -> dict:
    """An image's ``.json`` metadata (a dict, else ``{}``), its caption from ``.txt`` when the json has none."""
    meta: dict = {}
    if fs.exists(side + ".json"):
        with fs.open(side + ".json", "rb") as f:
            meta = json.loads(f.read())
    if not isinstance(meta, dict):
        meta = {}
    if not meta.get("caption") and fs.exists(side + ".txt"):
        with fs.open(side + ".txt", "rb") as f:
            meta["caption"] = f.read().decode("utf-8", "replace").strip()
    return meta
