"""What an input is: its unit of work (:class:`Shard`), the raw item a reader yields
(:class:`Record`), the interface every input layout implements (:class:`Layout`) and what the
layouts share: listing files (brace patterns too), file stems, and img2dataset's row metadata
(three of the four layouts are img2dataset outputs).

The layouts themselves live one per module (:mod:`~pipeline.inputs.folder`,
:mod:`~pipeline.inputs.img2dataset`, :mod:`~pipeline.inputs.webdataset`,
:mod:`~pipeline.inputs.parquet`); :mod:`pipeline.inputs.registry` tells them apart and dispatches.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Iterator, Protocol

import pyarrow.parquet as pq

from pipeline.core import fs as zio

LOG = logging.getLogger(__name__)

__all__ = ["Shard", "Record", "Layout", "IMAGE_SUFFIXES", "expand", "list_input", "stem", "check_unique_stems",
           "i2d_fields", "i2d_stats_note", "sidecar_failures"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
#: img2dataset's per-row fields that have their own place in a record (the rest go to ``meta``)
_I2D_FIELDS = ("url", "key", "caption", "status", "error_message")


@dataclass(frozen=True)
class Shard:
    """One unit of work. ``kind`` is the :attr:`Layout.kind` that reads it; ``members`` lists
    files for folder-like shards, ``row_group`` the row group of a Parquet shard."""

    shard_id: int
    kind: str
    source: str
    members: tuple[str, ...] = ()
    row_group: int = 0
    root: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Shard":
        d = json.loads(text)
        d["members"] = tuple(d["members"])
        return cls(**d)


@dataclass
class Record:
    """A raw input item. ``error`` is set (and ``data`` None) when it could not be read."""

    image_id: str
    uri: str
    label: str | None = None
    caption: str | None = None
    data: bytes | None = None
    error: str | None = None
    #: where the error arose: "read" (the input), "download" (img2dataset marked the row failed)
    stage: str = "read"
    url: str | None = None
    key: str | None = None
    #: other source metadata (img2dataset json/columns), JSON-serialisable
    meta: dict = field(default_factory=dict)


class Layout(Protocol):
    """One input layout: a module of :mod:`pipeline.inputs` with these names.

    ``name`` is the ``input_format`` that selects it, ``kind`` the :attr:`Shard.kind` of its shards
    (kept apart: shard specs are fingerprinted by the resume record, so a kind never changes).
    """

    name: str
    kind: str

    def detect(self, files: list[str], *, image_column: str) -> str | None:
        """Why ``files`` (an input's sorted listing) hold this layout, or None when they do not."""

    def list_shards(self, uri: str, *, shard_size: int, image_column: str) -> list[Shard]:
        """The input's shards in a deterministic order (ids ``0..n-1``); ValueError if unusable."""

    def read(self, shard: Shard, *, image_column: str, label_column: str,
             label_field: str | None) -> Iterator[Record]:
        """The records of one shard; a broken item is a record with ``error`` set."""


def expand(uri: str) -> list[str]:
    """The files of a brace pattern (``a/{00000..00009}.tar``, webdataset style), else ``[uri]``."""
    if "{" not in uri:
        return [uri]
    from braceexpand import braceexpand

    return list(braceexpand(uri))


def list_input(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Sorted files under ``uri`` or matching its brace pattern (each expanded file must exist)."""
    if "{" not in uri:
        return zio.list_files(uri, suffixes=suffixes)
    files = expand(uri)
    missing = [f for f in files if not zio.exists(f)]
    if missing:
        raise FileNotFoundError(f"{uri}: {len(missing)} of its {len(files)} files do not exist "
                                f"({', '.join(m.rsplit('/', 1)[-1] for m in missing[:5])}{', ...' if len(missing) > 5 else ''})")
    return sorted(p for f in files for p in zio.list_files(f, suffixes=suffixes))


def stem(path: str) -> str:
    """A file's (or folder's) name without its extension.

    >>> stem("s3://b/shards/00012.tar"), stem("/data/00003/")
    ('00012', '00003')
    """
    return path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]


def check_unique_stems(files: list[str]) -> None:
    """Image ids of tar and Parquet inputs start with the file's stem: two files with one stem
    (``a/part-0.tar``, ``b/part-0.tar``) would give the same ids to different images."""
    first: dict[str, str] = {}
    for f in files:
        other = first.setdefault(stem(f), f)
        if other != f:
            raise ValueError(f"{other} and {f} have the same name '{stem(f)}', so their image ids would "
                             "collide; rename one or extract the folders separately")


def i2d_stats_note(files: list[str]) -> str:
    """``", img2dataset output (N _stats.json)"`` when img2dataset's stats files are among ``files``."""
    stats = sum(f.rsplit("/", 1)[-1].endswith("_stats.json") for f in files)
    return f", img2dataset output ({stats} _stats.json)" if stats else ""


def i2d_fields(meta: dict, label_field: str | None) -> dict:
    """Record fields from an img2dataset json / row: url, key, caption, label, meta (the rest)."""
    rest = {k: v for k, v in meta.items() if k not in _I2D_FIELDS and v is not None}
    label = meta.get(label_field) if label_field else None
    cap = meta.get("caption")
    return {"url": None if meta.get("url") is None else str(meta["url"]),
            "key": None if meta.get("key") is None else str(meta["key"]),
            "caption": cap if isinstance(cap, str) and cap.strip() else None,
            "label": None if label is None else str(label), "meta": rest}


def sidecar_failures(sidecar: str, shard_stem: str, label_field: str | None) -> Iterator[Record]:
    """The rows img2dataset marked failed in a shard's ``NNNNN.parquet`` sidecar, as errors."""
    fs, path = zio.filesystem(sidecar)
    if not fs.exists(path):
        return
    try:
        with fs.open(path, "rb") as fh:
            t = pq.read_table(fh)
    except Exception as exc:  # noqa: BLE001 - a sidecar cut short (img2dataset killed or still writing)
        yield Record(image_id=f"{shard_stem}/<sidecar>", uri=sidecar, stage="read",
                     error=f"unreadable img2dataset sidecar {sidecar} ({type(exc).__name__}: {exc}); "
                           "the rows it marked failed are unknown")
        return
    if "status" not in t.column_names:
        return
    for row in t.to_pylist():
        if row.get("status") in (None, "success"):
            continue
        m = i2d_fields(row, label_field)
        key = m["key"] or "?"
        yield Record(image_id=f"{shard_stem}/{key}", uri=m["url"] or f"{sidecar}::key={key}", label=m["label"],
                     caption=m["caption"], url=m["url"], key=m["key"], meta=m["meta"], stage="download",
                     error=f"img2dataset {row['status']}: {row.get('error_message') or 'no message'}")
