"""Filesystem helpers over fsspec: URIs, atomic writes, manifests.

Every output file is written to a temporary name beside its final name and renamed into place,
so a reader never sees a partial file and a killed job leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import logging
import os
import uuid
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa
import numpy as np
import pyarrow.parquet as pq

LOG = logging.getLogger(__name__)

__all__ = [
    "filesystem",
    "join",
    "exists",
    "makedirs",
    "list_files",
    "read_bytes",
    "write_bytes_atomic",
    "write_json_atomic",
    "read_json",
    "to_jsonable",
    "absolute_uri",
    "write_parquet_atomic",
    "read_parquet",
    "read_parquet_dir",
    "iter_parquet_files",
    "fingerprint",
    "TMP_PREFIX",
    "remove",
    "remove_temp_files",
    "output_lock",
    "OutputLocked",
    "write_npy_atomic",
    "read_npy",
    "parquet_num_rows",
    "sha256_file",
    "atomic_local_file",
    "atomic_parquet_writer",
    "local_path",
    "is_local",
]

TMP_PREFIX = "._tmp-"


def is_local(uri: str) -> bool:
    """True when ``uri`` is on the local filesystem (a path or ``file://``), not an object store."""
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a local path or any fsspec URI."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def join(base: str, *parts: str) -> str:
    base = str(base)
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def _protocol_prefix(uri: str) -> str:
    return "" if "://" not in str(uri) else str(uri).split("://", 1)[0] + "://"


def list_files(uri: str, suffixes: tuple[str, ...] | None = None, recursive: bool = True) -> list[str]:
    """Sorted file URIs under ``uri`` (skipping temporary and hidden files)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no such file or directory")
    if fs.isfile(path):
        found = [path]
    elif recursive:
        found = fs.find(path)
    else:
        found = [p for p in fs.ls(path, detail=False) if fs.isfile(p)]
    prefix = _protocol_prefix(uri)
    out = []
    base = path.rstrip("/")
    for p in sorted(found):
        rel = p[len(base):] if p.startswith(base) else p.rsplit("/", 1)[-1]
        if any(part.startswith(".") for part in rel.split("/") if part):
            continue  # hidden files and folders (.ipynb_checkpoints, temp files of atomic writes)
        name = p.rsplit("/", 1)[-1]
        if suffixes and not name.lower().endswith(suffixes):
            continue
        out.append(prefix + p if prefix and not p.startswith(prefix) else p)
    return out


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def _tmp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{tail}" if head else f"{TMP_PREFIX}{tail}"


def _commit(fs: fsspec.AbstractFileSystem, tmp: str, path: str) -> None:
    if isinstance(fs, LocalFileSystem):
        os.replace(tmp, path)  # atomic on POSIX
    else:
        fs.mv(tmp, path)  # object stores: the final key appears in one PUT/copy


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = path.rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
            if hasattr(f, "flush"):
                f.flush()
            if hasattr(f, "fileno"):
                try:
                    os.fsync(f.fileno())
                except (OSError, ValueError, AttributeError, NotImplementedError):
                    pass
        _commit(fs, tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


@contextlib.contextmanager
def atomic_local_file(uri: str, suffix: str = ""):
    """Yield a local path to write ``uri``'s content to (by any library); commit it atomically on exit.

    Local outputs: a temp file beside the final name, fsynced and renamed into place. Other
    filesystems: a local temp file uploaded to a temp key, then moved. On error nothing is committed.
    Lets libraries that write files themselves (faiss) stream to disk without an in-memory copy.
    """
    import tempfile

    fs, path = filesystem(uri)
    local = isinstance(fs, LocalFileSystem)
    parent = path.rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if local:
        tmp = _tmp_name(path)
    else:
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix=TMP_PREFIX)
        os.close(fd)
    try:
        yield tmp
        if local:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _commit(fs, tmp, path)
        else:
            remote_tmp = _tmp_name(path)
            fs.put_file(tmp, remote_tmp)
            _commit(fs, remote_tmp, path)
    finally:
        if os.path.exists(tmp) and (not local or tmp != path):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_parquet_writer(uri: str, schema: pa.Schema):
    """Yield a ``pq.ParquetWriter`` (zstd) whose file appears at ``uri`` atomically on success.

    For tables written row group by row group, never held whole in memory.
    """
    with atomic_local_file(uri, suffix=".parquet") as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            yield writer


def local_path(uri: str, cache_dir: str | None = None) -> str:
    """A local filesystem path holding ``uri``'s bytes: the path itself when local, else a copy
    downloaded (atomically) as ``cache_dir/<name>`` (default: a temp dir per URI), reused while its size matches."""
    import tempfile

    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return path
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "zsl-cache", hashlib.sha256(uri.encode()).hexdigest()[:16])
    target = os.path.join(cache_dir, path.rsplit("/", 1)[-1])
    if os.path.exists(target) and os.path.getsize(target) == fs.size(path):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    tmp = _tmp_name(target)
    fs.get_file(path, tmp)
    os.replace(tmp, target)
    return target


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: not valid JSON ({exc})") from None


def to_jsonable(obj: Any) -> Any:
    """``obj`` as ``json.loads`` of its JSON (tuples become lists, keys strings): how it reads back."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def absolute_uri(uri: str) -> str:
    """A local path made absolute (so a manifest means the same from any working directory);
    URIs with a scheme (``s3://``, ``file://``, ``memory://``) are returned unchanged.

    >>> absolute_uri("s3://bucket/x")
    's3://bucket/x'
    >>> absolute_uri("/data/x/")
    '/data/x'
    """
    text = str(uri)
    if "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


#: Rows per Parquet row group: readers stream a file group by group, so this bounds their memory.
ROW_GROUP_ROWS = 32_768


def write_parquet_atomic(uri: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    write_bytes_atomic(uri, sink.getvalue().to_pybytes())


def iter_parquet_files(uri: str) -> Iterator[str]:
    yield from list_files(uri, suffixes=(".parquet",), recursive=False)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file through a single open handle.

    Opening the file once pins one version of it: a path-based read may open it twice (footer,
    then pages) and, if an atomic rewrite lands in between, mix two versions.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        with pa.OSFile(path, "rb") as f:
            return pq.read_table(f, columns=columns)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_parquet_dir(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read every finished ``*.parquet`` file directly under ``uri`` in name order."""
    files = list(iter_parquet_files(uri))
    if not files:
        raise FileNotFoundError(f"{uri}: no .parquet files")
    tables = [read_parquet(f, columns) for f in files]
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object (configs, class sets)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def remove(uri: str) -> None:
    """Remove a file or a directory tree; nothing if it does not exist."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_temp_files(uri: str) -> int:
    """Delete the temporary files (``._tmp-*``) a killed writer left under ``uri``; return how many.

    Only call this while holding :func:`output_lock` on the output: a live writer's temp file
    would be removed under it.
    """
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return 0
    stale = [p for p in fs.find(path) if p.rsplit("/", 1)[-1].startswith(TMP_PREFIX)]
    for p in stale:
        fs.rm(p)
    if stale:
        LOG.info("%s: removed %d temporary file(s) left by an interrupted run", uri, len(stale))
    return len(stale)


class OutputLocked(ValueError):
    """Another job is writing to the same output directory."""


@contextlib.contextmanager
def output_lock(uri: str):
    """Hold an exclusive lock on an output directory for the duration of a job (local paths).

    The lock is an ``flock`` on ``<uri>/.zsl.lock``: the kernel drops it when the process dies,
    SIGKILL included, so a killed job never leaves a stale lock. Other filesystems (object
    stores) have no such lock; there, one job per output directory is the caller's rule.
    """
    fs, path = filesystem(uri)
    if not isinstance(fs, LocalFileSystem):
        yield
        return
    import fcntl

    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, ".zsl.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise OutputLocked(f"{uri}: another zsl job (pid {holder}) is writing to this output; "
                               "wait for it or use another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_npy_atomic(uri: str, array: np.ndarray) -> None:
    """Write a numeric array as ``.npy`` (never with pickled objects), atomically."""
    a = np.asarray(array)
    if a.dtype.hasobject:
        raise TypeError(f"{uri}: refusing to write an object array")
    buf = _io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    write_bytes_atomic(uri, buf.getvalue())


def read_npy(uri: str) -> np.ndarray:
    """Read a ``.npy`` file without ever unpickling (``allow_pickle=False``); ValueError if broken."""
    data = read_bytes(uri)
    try:
        return np.load(_io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise ValueError(f"{uri}: not a readable .npy array ({exc})") from None


def sha256_file(uri: str, chunk: int = 1 << 20) -> str:
    fs, path = filesystem(uri)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def parquet_num_rows(uri: str) -> int:
    """Row count from the Parquet footer (reads no data)."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


class LazyParquet:
    """One Parquet file read by row number: only the row groups holding the requested rows are
    decoded (the last ``cache_groups`` kept in an LRU cache), only ``columns`` if given; local
    files are memory-mapped."""

    def __init__(self, uri: str, cache_groups: int = 64, columns: list[str] | None = None) -> None:
        import functools

        import pyarrow.parquet as pq

        fs, path = filesystem(uri)
        self.uri = uri
        self._file = pq.ParquetFile(path, memory_map=True) if is_local(uri) else pq.ParquetFile(fs.open(path, "rb"))
        self.schema = self._file.schema_arrow
        if columns is not None:
            missing = [c for c in columns if c not in self.schema.names]
            if missing:
                raise ValueError(f"{uri}: no column(s) {', '.join(missing)}")
            self.schema = pa.schema([self.schema.field(c) for c in columns])
        meta = self._file.metadata
        self.num_rows = meta.num_rows
        self._starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._group = functools.lru_cache(maxsize=cache_groups)(
            lambda g: self._file.read_row_group(g, columns=columns))

    def take(self, rows) -> pa.Table:
        """Rows ``rows`` (in that order); IndexError outside ``0..num_rows-1``."""
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"{self.uri}: rows must be in 0..{self.num_rows - 1}")
        if not len(rows):
            return self.schema.empty_table()
        groups = np.searchsorted(self._starts, rows, side="right") - 1
        uniq = np.unique(groups)
        table = pa.concat_tables([self._group(int(g)).take(pa.array(rows[groups == g] - self._starts[g]))
                                  for g in uniq])
        order = np.argsort(np.concatenate([np.flatnonzero(groups == g) for g in uniq]), kind="stable")
        return table.take(pa.array(order))
