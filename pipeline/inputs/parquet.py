"""The ``parquet`` layout: Parquet files with an image-bytes column (``jpg``/``png``/``webp`` as
img2dataset writes them, ``image`` as Hugging Face does, a struct with a ``bytes`` field; found
when ``image_column`` is "auto"). One row group is one shard.

An image's id is the ``image_id``/``id`` column, ``<file stem>/<key>`` for img2dataset's ``key``,
else ``<file stem>/<row>``; small scalar columns travel as metadata. Rows img2dataset marked failed
(``status`` other than ``success``) come back as errors with its ``error_message``.
"""

from __future__ import annotations

import logging
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import fs as zio
from pipeline.inputs.base import (IMAGE_SUFFIXES, Record, Shard, check_unique_stems, i2d_fields, i2d_stats_note,
                                  list_input, stem)

LOG = logging.getLogger(__name__)

__all__ = ["name", "kind", "detect", "list_shards", "read", "IMAGE_COLUMNS"]

name = "parquet"
kind = "parquet"

#: image-bytes columns looked for when ``image_column`` is "auto", in this order
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
_ID_COLUMNS = ("image_id", "key", "id")
_URI_COLUMNS = ("uri", "url", "path")


def detect(files: list[str], *, image_column: str = "auto") -> str | None:
    """Parquet files whose first holds an image column. Without one, and with no image files
    either, the input cannot be used: ValueError naming the columns."""
    parquets = [f for f in files if f.lower().endswith(".parquet")]
    if not parquets:
        return None
    schema = _open(parquets[0]).schema_arrow
    col = _image_column(schema, image_column)
    if col is not None:
        return f"{len(parquets)} Parquet files with image bytes in '{col}'{i2d_stats_note(files)}"
    if not any(f.rsplit("/", 1)[-1].lower().endswith(IMAGE_SUFFIXES) for f in files):
        raise ValueError(f"{parquets[0]}: no image-bytes column ({', '.join(IMAGE_COLUMNS)}; columns: "
                         f"{', '.join(schema.names)}); set image_column to the column that holds the image bytes")
    return None


def list_shards(uri: str, *, shard_size: int = 256, image_column: str = "auto") -> list[Shard]:
    """One shard per row group of each Parquet file, files in name order; every file must hold
    image bytes in ``image_column`` (read from the footers, before any work starts)."""
    shards: list[Shard] = []
    files = list_input(uri, suffixes=(".parquet",))
    check_unique_stems(files)
    for path in files:
        meta = _open(path)  # schema + row-group count come from the footer, read here
        _check_image_column(path, meta.schema_arrow, image_column)
        for rg in range(meta.num_row_groups):
            shards.append(Shard(shard_id=len(shards), kind=kind, source=path, row_group=rg))
    if not shards:
        raise ValueError(f"{uri}: no .parquet files")
    return shards


def _open(path: str) -> pq.ParquetFile:
    """A Parquet file's footer (ValueError for a file that is not Parquet)."""
    fs, p = zio.filesystem(path)
    try:
        with fs.open(p, "rb") as fh:
            return pq.ParquetFile(fh)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad input
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None


def _check_image_column(path: str, schema: pa.Schema, image_column: str) -> None:
    col = _image_column(schema, image_column)
    if col is None:
        want = f"among {', '.join(IMAGE_COLUMNS)}" if image_column == "auto" else f"'{image_column}'"
        raise ValueError(
            f"{path}: no image column {want} (columns: {', '.join(schema.names)}); "
            "set image_column to the column that holds the image bytes"
        )
    col_type = schema.field(col).type
    if not _is_bytes_type(col_type):
        raise ValueError(
            f"{path}: column '{col}' is {col_type}, expected image bytes (binary, or a "
            "struct with a binary 'bytes' field as Hugging Face stores images)"
        )


def _image_column(schema: pa.Schema, image_column: str) -> str | None:
    if image_column != "auto":
        return image_column if image_column in schema.names else None
    present = [c for c in IMAGE_COLUMNS if c in schema.names]
    # a bytes column first; else the first named like one (its type is then reported, not ignored)
    return next((c for c in present if _is_bytes_type(schema.field(c).type)), present[0] if present else None)


def _is_bytes_type(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    if hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t):
        return True
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        return idx >= 0 and _is_bytes_type(t.field(idx).type)
    return False


def _is_scalar_type(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            or pa.types.is_floating(t) or pa.types.is_boolean(t))


def read(shard: Shard, *, image_column: str = "auto", label_column: str = "label",
         label_field: str | None = None) -> Iterator[Record]:
    """The rows of one row group (``label_field``, when set, names the label column instead of
    ``label_column``). A row without usable image bytes is an error record."""
    label_column = label_field or label_column
    table, offset = _row_group(shard)
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
    scalar = [c for c in names if c not in (col, label_column) and _is_scalar_type(table.schema.field(c).type)]
    rows = table.select(scalar).to_pylist()
    file_stem = stem(shard.source)
    for i, value in enumerate(images):
        row = offset + i
        if ids and ids[i] is not None:  # img2dataset's keys are ids within its output: prefixed like its tars'
            image_id = f"{file_stem}/{ids[i]}" if id_col == "key" else str(ids[i])
        else:
            image_id = f"{file_stem}/{row}"
        uri = str(uris[i]) if uris and uris[i] else f"{shard.source}::row={row}"
        m = i2d_fields(rows[i], None)
        label = None if labels[i] is None else str(labels[i])
        common = dict(image_id=image_id, uri=uri, label=label, caption=m["caption"], url=m["url"], key=m["key"],
                      meta=m["meta"])
        yield _row_record(common, value, rows[i], row, col)


def _row_group(shard: Shard) -> tuple[pa.Table, int]:
    """The shard's row group and the file row its first row is."""
    fs, path = zio.filesystem(shard.source)
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        offset = sum(pf.metadata.row_group(i).num_rows for i in range(shard.row_group))
        return pf.read_row_group(shard.row_group), offset


def _row_record(common: dict, value, fields: dict, row: int, col: str) -> Record:
    """One row's record: its image bytes, or the reason it has none."""
    status = fields.get("status")
    if isinstance(value, dict):  # {"bytes": ..., "path": ...} as Hugging Face datasets store images
        value = value.get("bytes")
    if status not in (None, "success"):  # img2dataset could not fetch or decode it
        return Record(**common, stage="download",
                      error=f"img2dataset {status}: {fields.get('error_message') or 'no message'}")
    if value is None:
        return Record(**common, error=f"row {row}: null image")
    if not isinstance(value, (bytes, bytearray)):
        return Record(**common, error=f"row {row}: column '{col}' holds {type(value).__name__}, not bytes")
    return Record(**common, data=bytes(value))
