"""Input shards: list them deterministically, and read the raw records of one shard.

Three input layouts are supported, local or on any fsspec filesystem:

* **folder** — image files; a first-level sub-folder names the label (as torchvision's
  ``ImageFolder``). Files are sorted and cut into shards of ``shard_size`` images.
* **webdataset** — ``.tar`` files as img2dataset writes them (``key.jpg`` + ``key.json`` /
  ``key.txt`` / ``key.cls``); one tar is one shard.
* **parquet** — Parquet files with an image-bytes column; one row group is one shard.

Shard ids follow the sorted listing, so the same input always gives the same shards and a rerun
maps each shard to the same output file.
"""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from dataclasses import asdict, dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io as zio

LOG = logging.getLogger(__name__)

__all__ = ["Shard", "Record", "list_shards", "read_shard", "detect_format", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
_LABEL_KEYS = ("label", "class", "cls", "category")
_ID_COLUMNS = ("image_id", "key", "id")
_URI_COLUMNS = ("uri", "url", "path")


@dataclass(frozen=True)
class Shard:
    """One unit of work. ``members`` lists files for folder shards."""

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
    extra: dict = field(default_factory=dict)


def detect_format(uri: str) -> str:
    """Guess the input layout from the file names under ``uri``."""
    files = zio.list_files(uri)
    if not files:
        raise ValueError(f"{uri}: no input files found")
    if any(f.lower().endswith(".tar") for f in files):
        return "webdataset"
    if any(f.lower().endswith(".parquet") for f in files):
        return "parquet"
    if any(f.lower().endswith(IMAGE_SUFFIXES) for f in files):
        return "folder"
    raise ValueError(f"{uri}: found no images, .tar shards or .parquet files")


def list_shards(
    uri: str, *, input_format: str = "auto", shard_size: int = 256, image_column: str = "image"
) -> list[Shard]:
    """List the shards of an input, in a deterministic order.

    Raises ``FileNotFoundError`` for a missing input and ``ValueError`` for an input that cannot
    be used at all (no images, Parquet without the image column), before any work starts.
    """
    fmt = detect_format(uri) if input_format == "auto" else input_format
    root = uri.rstrip("/")
    if fmt == "folder":
        files = zio.list_files(uri, suffixes=IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{uri}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        _, root_path = zio.filesystem(root)
        return [
            Shard(shard_id=i, kind="folder", source=uri, members=tuple(files[s : s + shard_size]), root=root_path)
            for i, s in enumerate(range(0, len(files), shard_size))
        ]
    if fmt == "webdataset":
        tars = zio.list_files(uri, suffixes=(".tar",))
        if not tars:
            raise ValueError(f"{uri}: no .tar shards")
        _check_unique_stems(tars)
        return [Shard(shard_id=i, kind="tar", source=t) for i, t in enumerate(tars)]
    if fmt == "parquet":
        shards: list[Shard] = []
        files = zio.list_files(uri, suffixes=(".parquet",))
        _check_unique_stems(files)
        for path in files:
            fs, p = zio.filesystem(path)
            try:
                with fs.open(p, "rb") as fh:
                    meta = pq.ParquetFile(fh)  # schema + row-group count come from the footer, read here
            except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad input
                raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
            names = meta.schema_arrow.names
            if image_column not in names:
                raise ValueError(
                    f"{path}: no image column '{image_column}' (columns: {', '.join(names)}); "
                    "set image_column to the column that holds the image bytes"
                )
            col_type = meta.schema_arrow.field(image_column).type
            if not _is_bytes_type(col_type):
                raise ValueError(
                    f"{path}: column '{image_column}' is {col_type}, expected image bytes (binary, or a "
                    "struct with a binary 'bytes' field as Hugging Face stores images)"
                )
            for rg in range(meta.num_row_groups):
                shards.append(Shard(shard_id=len(shards), kind="parquet", source=path, row_group=rg))
        if not shards:
            raise ValueError(f"{uri}: no .parquet files")
        return shards
    raise ValueError(f"unknown input format {fmt!r}; use folder, webdataset or parquet")


def _stem(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _check_unique_stems(files: list[str]) -> None:
    """Image ids of tar and Parquet inputs start with the file's stem: two files with one stem
    (``a/part-0.tar``, ``b/part-0.tar``) would give the same ids to different images."""
    first: dict[str, str] = {}
    for f in files:
        other = first.setdefault(_stem(f), f)
        if other != f:
            raise ValueError(f"{other} and {f} have the same name '{_stem(f)}', so their image ids would "
                             "collide; rename one or extract the folders separately")


def _is_bytes_type(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    if hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t):
        return True
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        return idx >= 0 and _is_bytes_type(t.field(idx).type)
    return False


def read_shard(
    shard: Shard, *, image_column: str = "image", label_column: str = "label"
) -> Iterator[Record]:
    """Yield the raw records of one shard. Unreadable items come back with ``error`` set."""
    if shard.kind == "folder":
        yield from _read_folder(shard)
    elif shard.kind == "tar":
        yield from _read_tar(shard)
    elif shard.kind == "parquet":
        yield from _read_parquet(shard, image_column, label_column)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")


def _read_folder(shard: Shard) -> Iterator[Record]:
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


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _read_tar(shard: Shard) -> Iterator[Record]:
    tar_name = shard.source.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    bad: dict[str, str] = {}
    try:
        fs, path = zio.filesystem(shard.source)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                try:
                    fh = tf.extractfile(member)
                    data = fh.read() if fh is not None else b""
                    if len(data) != member.size:
                        raise EOFError(f"{len(data)} of {member.size} bytes")
                    groups[key][ext] = data
                except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                    bad[key] = f"corrupted tar member {member.name}: {exc}"
            # tarfile stops silently at a header cut short; a complete archive ends with a zero block.
            tf.fileobj.seek(tf.offset)
            end = tf.fileobj.read(tarfile.BLOCKSIZE)
            if len(end) < tarfile.BLOCKSIZE or end.strip(b"\0"):
                raise tarfile.ReadError(f"truncated at byte {tf.offset} (no end-of-archive block)")
    except Exception as exc:  # noqa: BLE001 - tarfile/gzip/zlib/fsspec raise many types on broken input
        # A tar that breaks part-way still yields the members read before the break.
        msg = f"unreadable tar after {len(order)} keys: {exc}"
        LOG.warning("%s: %s", shard.source, msg)
        yield Record(image_id=f"{tar_name}/<tar>", uri=shard.source, error=msg)
    for key in order:
        parts = groups[key]
        uri = f"{shard.source}::{key}"
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff") if e in parts), None)
        image_id = f"{tar_name}/{key}"
        label, caption = _sidecar_label(parts)
        if key in bad:
            yield Record(image_id=image_id, uri=uri, label=label, caption=caption, error=bad[key])
        elif image_ext is None:
            if any(e in parts for e in ("json", "txt", "cls")):
                yield Record(image_id=image_id, uri=uri, label=label, caption=caption, error="no image member for key")
        else:
            yield Record(image_id=image_id, uri=f"{shard.source}::{key}.{image_ext}", label=label,
                         caption=caption, data=parts[image_ext])


def _sidecar_label(parts: dict[str, bytes]) -> tuple[str | None, str | None]:
    label = caption = None
    if "cls" in parts:
        label = parts["cls"].decode("utf-8", "replace").strip() or None
    if "txt" in parts:
        caption = parts["txt"].decode("utf-8", "replace").strip() or None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        if isinstance(meta, dict):
            for k in _LABEL_KEYS:
                if meta.get(k) is not None:
                    label = str(meta[k])
                    break
            if caption is None and isinstance(meta.get("caption"), str):
                caption = meta["caption"]
    return label, caption


def _read_parquet(shard: Shard, image_column: str, label_column: str) -> Iterator[Record]:
    fs, path = zio.filesystem(shard.source)
    stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        offset = sum(pf.metadata.row_group(i).num_rows for i in range(shard.row_group))
        table = pf.read_row_group(shard.row_group)
    names = table.column_names
    images = table.column(image_column).to_pylist()
    labels = table.column(label_column).to_pylist() if label_column in names else [None] * len(images)
    id_col = next((c for c in _ID_COLUMNS if c in names), None)
    uri_col = next((c for c in _URI_COLUMNS if c in names), None)
    ids = table.column(id_col).to_pylist() if id_col else None
    uris = table.column(uri_col).to_pylist() if uri_col else None
    caps = table.column("caption").to_pylist() if "caption" in names else None
    for i, value in enumerate(images):
        row = offset + i
        image_id = str(ids[i]) if ids and ids[i] is not None else f"{stem}/{row}"
        uri = str(uris[i]) if uris and uris[i] else f"{shard.source}::row={row}"
        label = None if labels[i] is None else str(labels[i])
        caption = caps[i] if caps else None
        if isinstance(value, dict):  # {"bytes": ..., "path": ...} as Hugging Face datasets store images
            value = value.get("bytes")
        if value is None:
            yield Record(image_id=image_id, uri=uri, label=label, caption=caption, error=f"row {row}: null image")
        elif not isinstance(value, (bytes, bytearray)):
            yield Record(image_id=image_id, uri=uri, label=label, caption=caption,
                         error=f"row {row}: column '{image_column}' holds {type(value).__name__}, not bytes")
        else:
            yield Record(image_id=image_id, uri=uri, label=label, caption=caption, data=bytes(value))
