"""Input shards: list them deterministically, and read the raw records of one shard.

Four input layouts are supported, local or on any fsspec filesystem, and ``auto`` tells them
apart from the file names (and says why it chose one, :func:`describe_input`):

* **folder** — image files; a first-level sub-folder names the label (as torchvision's
  ``ImageFolder``). Files are sorted and cut into shards of ``shard_size`` images.
* **files** — img2dataset's ``files`` output: ``00000/000000001.jpg`` + ``.txt`` (caption) +
  ``.json`` (url, key, status, ...) with a ``00000.parquet`` sidecar (every row, failed ones
  too) and ``00000_stats.json``; one ``NNNNN`` folder is one shard. Folder names are *not* labels:
  labels come only from ``label_field`` (a key of the json sidecars).
* **webdataset** — ``.tar`` files as img2dataset writes them (``key.jpg`` + ``key.json`` /
  ``key.txt`` / ``key.cls``), with its ``NNNNN.parquet`` sidecars; one tar is one shard.
* **parquet** — Parquet files with an image-bytes column (``jpg``/``png``/``webp`` as img2dataset
  writes them, ``image`` as Hugging Face does; detected); one row group is one shard.

img2dataset's rows keep ``url``, ``key`` and the rest of their metadata (``Record.meta``); rows it
marked failed (``status`` other than ``success``, in the sidecar or the Parquet) come back as
errors with its ``error_message``. Inputs may be brace patterns (``shards/{00000..00099}.tar``).

Shard ids follow the sorted listing, so the same input always gives the same shards and a rerun
maps each shard to the same output file.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
import zlib
from dataclasses import asdict, dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io as zio

LOG = logging.getLogger(__name__)

__all__ = ["Shard", "Record", "list_shards", "read_shard", "detect_format", "describe_input", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
_LABEL_KEYS = ("label", "class", "cls", "category")
_ID_COLUMNS = ("image_id", "key", "id")
_URI_COLUMNS = ("uri", "url", "path")
#: image-bytes columns looked for when ``image_column`` is "auto", in this order
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
#: img2dataset's per-row fields that have their own place in a record (the rest go to ``meta``)
_I2D_FIELDS = ("url", "key", "caption", "status", "error_message")
_SHARD_DIR = re.compile(r"^\d+$")  # img2dataset's shard names (5 digits by default, oom_shard_count sets it)


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
    #: where the error arose: "read" (the input), "download" (img2dataset marked the row failed)
    stage: str = "read"
    url: str | None = None
    key: str | None = None
    #: other source metadata (img2dataset json/columns), JSON-serialisable
    meta: dict = field(default_factory=dict)


def expand(uri: str) -> list[str]:
    """The files of a brace pattern (``a/{00000..00009}.tar``, webdataset style), else ``[uri]``."""
    if "{" not in uri:
        return [uri]
    from braceexpand import braceexpand

    return list(braceexpand(uri))


def _list(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Sorted files under ``uri`` or matching its brace pattern (each expanded file must exist)."""
    if "{" not in uri:
        return zio.list_files(uri, suffixes=suffixes)
    files = expand(uri)
    missing = [f for f in files if not zio.exists(f)]
    if missing:
        raise FileNotFoundError(f"{uri}: {len(missing)} of its {len(files)} files do not exist "
                                f"({', '.join(m.rsplit('/', 1)[-1] for m in missing[:5])}{', ...' if len(missing) > 5 else ''})")
    return sorted(p for f in files for p in zio.list_files(f, suffixes=suffixes))


def _image_column(schema: pa.Schema, image_column: str) -> str | None:
    if image_column != "auto":
        return image_column if image_column in schema.names else None
    present = [c for c in IMAGE_COLUMNS if c in schema.names]
    # a bytes column first; else the first named like one (its type is then reported, not ignored)
    return next((c for c in present if _is_bytes_type(schema.field(c).type)), present[0] if present else None)


def _parquet_schema(path: str) -> pa.Schema:
    fs, p = zio.filesystem(path)
    try:
        with fs.open(p, "rb") as fh:
            return pq.ParquetFile(fh).schema_arrow
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad input
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None


def _i2d_shard_dirs(files: list[str]) -> dict[str, list[str]]:
    """img2dataset ``files`` layout: ``NNNNN/`` folders of images -> their image files."""
    dirs: dict[str, list[str]] = {}
    for f in files:
        head, _, name = f.rpartition("/")
        if _SHARD_DIR.match(head.rsplit("/", 1)[-1]) and name.lower().endswith(IMAGE_SUFFIXES):
            dirs.setdefault(head, []).append(f)
    return dirs


def describe_input(uri: str, image_column: str = "auto") -> tuple[str, str]:
    """``(format, why)``: which layout ``uri`` holds, recognised from its file names (and, for
    Parquet, its schema): img2dataset's three outputs, Parquet with image bytes, or image folders."""
    files = _list(uri)
    if not files:
        raise ValueError(f"{uri}: no input files found")
    names = [f.rsplit("/", 1)[-1] for f in files]
    stats = sum(n.endswith("_stats.json") for n in names)
    i2d = f", img2dataset output ({stats} _stats.json)" if stats else ""
    tars = [f for f in files if f.lower().endswith(".tar")]
    if tars:
        return "webdataset", f"{len(tars)} .tar shards{i2d}"
    dirs = _i2d_shard_dirs(files)
    parquets = [f for f in files if f.lower().endswith(".parquet")]
    sidecars = [d for d in dirs if f"{d}.parquet" in parquets or f"{d}_stats.json" in files]
    if sidecars:
        return "files", (f"{len(dirs)} NNNNN folders of images with .parquet/_stats.json sidecars "
                         f"(img2dataset 'files' output{'' if not stats else f', {stats} _stats.json'})")
    if parquets:
        schema = _parquet_schema(parquets[0])
        col = _image_column(schema, image_column)
        if col is not None:
            return "parquet", f"{len(parquets)} Parquet files with image bytes in '{col}'{i2d}"
        if not any(n.lower().endswith(IMAGE_SUFFIXES) for n in names):
            raise ValueError(f"{parquets[0]}: no image-bytes column ({', '.join(IMAGE_COLUMNS)}; columns: "
                             f"{', '.join(schema.names)}); set image_column to the column that holds the image bytes")
    if any(n.lower().endswith(IMAGE_SUFFIXES) for n in names):
        return "folder", "image files (a first-level sub-folder names the label)"
    raise ValueError(f"{uri}: found no images, .tar shards or .parquet files")


def detect_format(uri: str) -> str:
    """The input layout of ``uri`` (see :func:`describe_input`)."""
    return describe_input(uri)[0]


def list_shards(
    uri: str, *, input_format: str = "auto", shard_size: int = 256, image_column: str = "auto"
) -> list[Shard]:
    """List the shards of an input, in a deterministic order.

    Raises ``FileNotFoundError`` for a missing input and ``ValueError`` for an input that cannot
    be used at all (no images, Parquet without the image column), before any work starts.
    """
    fmt = describe_input(uri, image_column)[0] if input_format == "auto" else input_format
    root = uri.rstrip("/")
    if fmt == "folder":
        files = _list(uri, suffixes=IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{uri}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        _, root_path = zio.filesystem(root)
        return [
            Shard(shard_id=i, kind="folder", source=uri, members=tuple(files[s : s + shard_size]), root=root_path)
            for i, s in enumerate(range(0, len(files), shard_size))
        ]
    if fmt == "files":
        files = _list(uri)
        dirs = _i2d_shard_dirs(files)
        # a shard whose every download failed has no folder, only its sidecar
        for f in files:
            if f.lower().endswith(".parquet") and _SHARD_DIR.match(f.rsplit("/", 1)[-1][: -len(".parquet")]):
                dirs.setdefault(f[: -len(".parquet")], [])
        if not dirs:
            raise ValueError(f"{uri}: no NNNNN/ folders of images (img2dataset 'files' output)")
        _check_unique_stems(sorted(dirs))  # two runs' 00000/ would give the same image ids
        return [Shard(shard_id=i, kind="files", source=d, members=tuple(sorted(dirs[d])), root=zio.filesystem(d)[1])
                for i, d in enumerate(sorted(dirs))]
    if fmt == "webdataset":
        tars = _list(uri, suffixes=(".tar",))
        if not tars:
            raise ValueError(f"{uri}: no .tar shards")
        _check_unique_stems(tars)
        return [Shard(shard_id=i, kind="tar", source=t) for i, t in enumerate(tars)]
    if fmt == "parquet":
        shards: list[Shard] = []
        files = _list(uri, suffixes=(".parquet",))
        _check_unique_stems(files)
        for path in files:
            fs, p = zio.filesystem(path)
            try:
                with fs.open(p, "rb") as fh:
                    meta = pq.ParquetFile(fh)  # schema + row-group count come from the footer, read here
            except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad input
                raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
            names = meta.schema_arrow.names
            col = _image_column(meta.schema_arrow, image_column)
            if col is None:
                want = f"among {', '.join(IMAGE_COLUMNS)}" if image_column == "auto" else f"'{image_column}'"
                raise ValueError(
                    f"{path}: no image column {want} (columns: {', '.join(names)}); "
                    "set image_column to the column that holds the image bytes"
                )
            col_type = meta.schema_arrow.field(col).type
            if not _is_bytes_type(col_type):
                raise ValueError(
                    f"{path}: column '{col}' is {col_type}, expected image bytes (binary, or a "
                    "struct with a binary 'bytes' field as Hugging Face stores images)"
                )
            for rg in range(meta.num_row_groups):
                shards.append(Shard(shard_id=len(shards), kind="parquet", source=path, row_group=rg))
        if not shards:
            raise ValueError(f"{uri}: no .parquet files")
        return shards
    raise ValueError(f"unknown input format {fmt!r}; use folder, files, webdataset or parquet")


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


def _read_tar(shard: Shard, label_field: str | None = None) -> Iterator[Record]:
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
        label, caption, m = _sidecar_label(parts, label_field)
        if key in bad:
            yield Record(image_id=image_id, uri=uri, label=label, caption=caption, error=bad[key], **m)
        elif image_ext is None:
            if any(e in parts for e in ("json", "txt", "cls")):
                yield Record(image_id=image_id, uri=uri, label=label, caption=caption, error="no image member for key",
                             **m)
        else:
            yield Record(image_id=image_id, uri=f"{shard.source}::{key}.{image_ext}", label=label,
                         caption=caption, data=parts[image_ext], **m)
    if shard.source.lower().endswith(".tar"):
        yield from _sidecar_failures(shard.source[: -len(".tar")] + ".parquet", tar_name, label_field)


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
