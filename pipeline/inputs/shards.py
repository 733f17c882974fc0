"""Input shards: what an input is and its deterministic list of shards (their records are read
by :mod:`pipeline.inputs.readers`).

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
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import fs as zio

LOG = logging.getLogger(__name__)

__all__ = ["Shard", "Record", "list_shards", "detect_format", "describe_input", "IMAGE_SUFFIXES"]

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
