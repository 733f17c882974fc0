"""The ``webdataset`` layout: ``.tar`` files as img2dataset writes them (``key.jpg`` + ``key.json``
/ ``key.txt`` / ``key.cls``), with its ``NNNNN.parquet`` sidecars; one tar is one shard, read as a
stream (memory holds one sample, not the tar). An image's id is ``<tar stem>/<key>``.
"""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from typing import Iterator

from pipeline.core import fs as zio
from pipeline.inputs.base import (Record, Shard, check_unique_stems, i2d_fields, i2d_stats_note, list_input,
                                  sidecar_failures, stem)

LOG = logging.getLogger(__name__)

__all__ = ["name", "kind", "detect", "list_shards", "read"]

name = "webdataset"
kind = "tar"

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_LABEL_KEYS = ("label", "class", "cls", "category")


def detect(files: list[str], *, image_column: str = "auto") -> str | None:
    """Any ``.tar`` file makes a webdataset (the first layout tried)."""
    tars = [f for f in files if f.lower().endswith(".tar")]
    return f"{len(tars)} .tar shards{i2d_stats_note(files)}" if tars else None


def list_shards(uri: str, *, shard_size: int = 256, image_column: str = "auto") -> list[Shard]:
    """One shard per ``.tar`` file, in name order."""
    tars = list_input(uri, suffixes=(".tar",))
    if not tars:
        raise ValueError(f"{uri}: no .tar shards")
    check_unique_stems(tars)
    return [Shard(shard_id=i, kind=kind, source=t) for i, t in enumerate(tars)]


def read(shard: Shard, *, image_column: str = "auto", label_column: str = "label",
         label_field: str | None = None) -> Iterator[Record]:
    """Samples of a webdataset tar, each yielded as soon as its members are read (a sample's
    members are consecutive, as webdataset writes them), so memory holds one sample, not the tar.
    A key that appears again after other keys is an error row (``key#2``), not merged. A tar that
    breaks part-way keeps the samples read before the break, with one ``<tar>`` error row; the
    rows the tar's img2dataset sidecar marks failed come last."""
    tar_name = stem(shard.source)
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
            rec = _sample(shard.source, tar_name, current, parts, bad, label_field)
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
                    parts[ext] = _member_bytes(tf, member)
                except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                    bad = f"corrupted tar member {member.name}: {exc}"
            _check_end(tf)
    except Exception as exc:  # noqa: BLE001 - tarfile/gzip/zlib/fsspec raise many types on broken input
        # A tar that breaks part-way keeps the samples read before the break.
        msg = f"unreadable tar after {n_keys} keys: {exc}"
        LOG.warning("%s: %s", shard.source, msg)
        yield Record(image_id=f"{tar_name}/<tar>", uri=shard.source, error=msg)
    yield from finish()
    if shard.source.lower().endswith(".tar"):
        yield from sidecar_failures(shard.source[: -len(".tar")] + ".parquet", tar_name, label_field)


def _split_key(member: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    head, _, base = member.rpartition("/")
    key, _dot, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext.lower()


def _member_bytes(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A member's bytes, all of them (EOFError for a member cut short)."""
    fh = tf.extractfile(member)
    data = fh.read() if fh is not None else b""
    if len(data) != member.size:
        raise EOFError(f"{len(data)} of {member.size} bytes")
    return data


def _check_end(tf: tarfile.TarFile) -> None:
    """tarfile stops silently at a header cut short; a complete archive ends with a zero block."""
    tf.fileobj.seek(tf.offset)
    end = tf.fileobj.read(tarfile.BLOCKSIZE)
    if len(end) < tarfile.BLOCKSIZE or end.strip(b"\0"):
        raise tarfile.ReadError(f"truncated at byte {tf.offset} (no end-of-archive block)")


def _sample(source: str, tar_name: str, key: str, parts: dict[str, bytes], bad: str | None,
            label_field: str | None) -> Record | None:
    """The record of one webdataset sample (None for a key with neither image nor sidecar)."""
    uri = f"{source}::{key}"
    image_ext = next((e for e in _IMAGE_EXTS if e in parts), None)
    image_id = f"{tar_name}/{key}"
    label, caption, m = _sidecar_fields(parts, label_field)
    if bad is not None:
        return Record(image_id=image_id, uri=uri, label=label, caption=caption, error=bad, **m)
    if image_ext is None:
        if any(e in parts for e in ("json", "txt", "cls")):
            return Record(image_id=image_id, uri=uri, label=label, caption=caption, error="no image member for key", **m)
        return None
    return Record(image_id=image_id, uri=f"{source}::{key}.{image_ext}", label=label, caption=caption,
                  data=parts[image_ext], **m)


def _sidecar_fields(parts: dict[str, bytes], label_field: str | None = None) -> tuple[str | None, str | None, dict]:
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
            m = i2d_fields(meta, label_field)
            extra = {"url": m["url"], "key": m["key"], "meta": m["meta"]}
            keys = (label_field,) if label_field else _LABEL_KEYS
            for k in keys:
                if meta.get(k) is not None:
                    label = str(meta[k])
                    break
            if caption is None and m["caption"]:
                caption = m["caption"]
    return label, caption, extra
