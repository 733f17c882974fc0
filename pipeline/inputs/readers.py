"""Reading one input shard: its raw records (image bytes, or an error, plus label, caption and
img2dataset metadata), for each layout :mod:`pipeline.inputs.shards` lists.

Readers never raise for a broken item: it comes back as a :class:`~pipeline.inputs.shards.Record` with
``error`` set (a whole shard that cannot be opened raises, and the decode task turns that into one
error row). img2dataset's failed rows come back as errors with its ``error_message``
(``stage="download"``).
"""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import fs as zio
from pipeline.inputs.shards import _I2D_FIELDS, _ID_COLUMNS, _LABEL_KEYS, _URI_COLUMNS, Record, Shard, _image_column, _stem

LOG = logging.getLogger(__name__)

__all__ = ["read_shard"]


def read_shard(
    shard: Shard, *, image_column: str = "auto", label_column: str = "label", label_field: str | None = None
) -> Iterator[Record]:
    """Yield the raw records of one shard. Unreadable items come back with ``error`` set.

    ``label_field``: the json key (files, webdataset) or column (parquet) holding the label; the
    ``files`` layout has labels only from it."""
    if shard.kind == "folder":
        yield from _read_folder(shard)
    elif shard.kind == "files":
        yield from _read_i2d_files(shard, label_field)
    elif shard.kind == "tar":
        yield from _read_tar(shard, label_field)
    elif shard.kind == "parquet":
        yield from _read_parquet(shard, image_column, label_field or label_column)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")


def _i2d_meta(meta: dict, label_field: str | None) -> dict:
    """Record fields from an img2dataset json / row: url, key, caption, label, meta (the rest)."""
    rest = {k: v for k, v in meta.items() if k not in _I2D_FIELDS and v is not None}
    label = meta.get(label_field) if label_field else None
    cap = meta.get("caption")
    return {"url": None if meta.get("url") is None else str(meta["url"]),
            "key": None if meta.get("key") is None else str(meta["key"]),
            "caption": cap if isinstance(cap, str) and cap.strip() else None,
            "label": None if label is None else str(label), "meta": rest}


def _sidecar_failures(sidecar: str, shard_stem: str, label_field: str | None) -> Iterator[Record]:
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
        m = _i2d_meta(row, label_field)
        key = m["key"] or "?"
        yield Record(image_id=f"{shard_stem}/{key}", uri=m["url"] or f"{sidecar}::key={key}", label=m["label"],
                     caption=m["caption"], url=m["url"], key=m["key"], meta=m["meta"], stage="download",
                     error=f"img2dataset {row['status']}: {row.get('error_message') or 'no message'}")


def _read_i2d_files(shard: Shard, label_field: str | None) -> Iterator[Record]:
    fs, base = zio.filesystem(shard.source)
    stem = base.rstrip("/").rsplit("/", 1)[-1]
    for uri in shard.members:
        _, path = zio.filesystem(uri)
        key = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        image_id = f"{stem}/{key}"
        side = path.rsplit(".", 1)[0]
        meta: dict = {}
        try:
            if fs.exists(side + ".json"):
                with fs.open(side + ".json", "rb") as f:
                    meta = json.loads(f.read())
            if not isinstance(meta, dict):
                meta = {}
            if not meta.get("caption") and fs.exists(side + ".txt"):
                with fs.open(side + ".txt", "rb") as f:
                    meta["caption"] = f.read().decode("utf-8", "replace").strip()
            data = zio.read_bytes(uri)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            yield Record(image_id=image_id, uri=uri, error=f"read failed: {exc}")
            continue
        m = _i2d_meta({"key": key, **meta}, label_field)
        yield Record(image_id=image_id, uri=uri, data=data, **m)
    yield from _sidecar_failures(shard.source.rstrip("/") + ".parquet", stem, label_field)


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


_TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def _read_tar(shard: Shard, label_field: str | None = None) -> Iterator[Record]:
    """Samples of a webdataset tar, each yielded as soon as its members are read (a sample's
    members are consecutive, as webdataset writes them), so memory holds one sample, not the tar.
    A key that appears again after other keys is an error row (``key#2``), not merged."""
    tar_name = _stem(shard.source)
    current: str | None = None  # the sample being read
    parts: dict[str, bytes] = {}
    bad: str | None = None
    seen: dict[str, int] = {}  # key -> times it started a run of members
    n_keys = 0

    def finish() -> Iterator[Record]:
        if current is None:
            return
        n = seen[current]
        if n > 1:
            yield Record(image_id=f"{tar_name}/{current}#{n}", uri=f"{shard.source}::{current}",
                         error=f"key {current} appears again after other keys (webdataset samples are "
                               "consecutive members); skipped")
        else:
            rec = _tar_sample(shard.source, tar_name, current, parts, bad, label_field)
            if rec is not None:
                yield rec

    try:
        fs, path = zio.filesystem(shard.source)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if key != current:
                    yield from finish()
                    current, parts, bad = key, {}, None
                    seen[key] = seen.get(key, 0) + 1
                    n_keys += 1
                try:
                    fh = tf.extractfile(member)
                    data = fh.read() if fh is not None else b""
                    if len(data) != member.size:
                        raise EOFError(f"{len(data)} of {member.size} bytes")
                    parts[ext] = data
                except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                    bad = f"corrupted tar member {member.name}: {exc}"
            # tarfile stops silently at a header cut short; a complete archive ends with a zero block.
            tf.fileobj.seek(tf.offset)
            end = tf.fileobj.read(tarfile.BLOCKSIZE)
            if len(end) < tarfile.BLOCKSIZE or end.strip(b"\0"):
                raise tarfile.ReadError(f"truncated at byte {tf.offset} (no end-of-archive block)")
    except Exception as exc:  # noqa: BLE001 - tarfile/gzip/zlib/fsspec raise many types on broken input
        # A tar that breaks part-way keeps the samples read before the break.
        msg = f"unreadable tar after {n_keys} keys: {exc}"
        LOG.warning("%s: %s", shard.source, msg)
        yield Record(image_id=f"{tar_name}/<tar>", uri=shard.source, error=msg)
    yield from finish()
    if shard.source.lower().endswith(".tar"):
        yield from _sidecar_failures(shard.source[: -len(".tar")] + ".parquet", tar_name, label_field)


def _tar_sample(source: str, tar_name: str, key: str, parts: dict[str, bytes], bad: str | None,
                label_field: str | None) -> Record | None:
    """The record of one webdataset sample (None for a key with neither image nor sidecar)."""
    uri = f"{source}::{key}"
    image_ext = next((e for e in _TAR_IMAGE_EXTS if e in parts), None)
    image_id = f"{tar_name}/{key}"
    label, caption, m = _sidecar_label(parts, label_field)
    if bad is not None:
        return Record(image_id=image_id, uri=uri, label=label, caption=caption, error=bad, **m)
    if image_ext is None:
        if any(e in parts for e in ("json", "txt", "cls")):
            return Record(image_id=image_id, uri=uri, label=label, caption=caption, error="no image member for key", **m)
        return None
    return Record(image_id=image_id, uri=f"{source}::{key}.{image_ext}", label=label, caption=caption,
                  data=parts[image_ext], **m)


def _sidecar_label(parts: dict[str, bytes], label_field: str | None = None) -> tuple[str | None, str | None, dict]:
    """``(label, caption, {url, key, meta})`` of a webdataset sample from its .cls/.txt/.json members."""
    label = caption = None
    extra: dict = {"url": None, "key": None, "meta": {}}
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
            m = _i2d_meta(meta, label_field)
            extra = {"url": m["url"], "key": m["key"], "meta": m["meta"]}
            keys = (label_field,) if label_field else _LABEL_KEYS
            for k in keys:
                if meta.get(k) is not None:
                    label = str(meta[k])
                    break
            if caption is None and m["caption"]:
                caption = m["caption"]
    return label, caption, extra


def _read_parquet(shard: Shard, image_column: str, label_column: str) -> Iterator[Record]:
    fs, path = zio.filesystem(shard.source)
    stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        offset = sum(pf.metadata.row_group(i).num_rows for i in range(shard.row_group))
        table = pf.read_row_group(shard.row_group)
    names = table.column_names
    col = _image_column(table.schema, image_column)
    if col is None:
        raise ValueError(f"{shard.source}: no image column '{image_column}' (columns: {', '.join(names)})")
    images = table.column(col).to_pylist()
    labels = table.column(label_column).to_pylist() if label_column in names else [None] * len(images)
    id_col = next((c for c in _ID_COLUMNS if c in names), None)
    uri_col = next((c for c in _URI_COLUMNS if c in names), None)
    ids = table.column(id_col).to_pylist() if id_col else None
    uris = table.column(uri_col).to_pylist() if uri_col else None
    # small scalar columns travel as metadata (img2dataset's url, key, status, sha256, ...)
    scalar = [c for c in names if c not in (col, label_column) and
              (pa.types.is_string(table.schema.field(c).type) or pa.types.is_large_string(table.schema.field(c).type)
               or pa.types.is_integer(table.schema.field(c).type) or pa.types.is_floating(table.schema.field(c).type)
               or pa.types.is_boolean(table.schema.field(c).type))]
    rows = table.select(scalar).to_pylist()
    for i, value in enumerate(images):
        row = offset + i
        if ids and ids[i] is not None:  # img2dataset's keys are ids within its output: prefixed like its tars'
            image_id = f"{stem}/{ids[i]}" if id_col == "key" else str(ids[i])
        else:
            image_id = f"{stem}/{row}"
        uri = str(uris[i]) if uris and uris[i] else f"{shard.source}::row={row}"
        m = _i2d_meta(rows[i], None)
        label = None if labels[i] is None else str(labels[i])
        common = dict(image_id=image_id, uri=uri, label=label, caption=m["caption"], url=m["url"], key=m["key"],
                      meta=m["meta"])
        status = rows[i].get("status")
        if isinstance(value, dict):  # {"bytes": ..., "path": ...} as Hugging Face datasets store images
            value = value.get("bytes")
        if status not in (None, "success"):  # img2dataset could not fetch or decode it
            yield Record(**common, stage="download",
                         error=f"img2dataset {status}: {rows[i].get('error_message') or 'no message'}")
        elif value is None:
            yield Record(**common, error=f"row {row}: null image")
        elif not isinstance(value, (bytes, bytearray)):
            yield Record(**common, error=f"row {row}: column '{col}' holds {type(value).__name__}, not bytes")
        else:
            yield Record(**common, data=bytes(value))
