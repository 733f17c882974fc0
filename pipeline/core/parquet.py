"""Parquet helpers: tables written atomically (zstd, bounded row groups), read whole, by directory,
or lazily; every write goes through :mod:`pipeline.core.fs`'s atomic rename."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.fs import atomic_local_file, exists, filesystem, is_local, list_files, write_bytes_atomic

LOG = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_parquet_writer(uri: str, schema: pa.Schema):
    """Yield a ``pq.ParquetWriter`` (zstd) whose file appears at ``uri`` atomically on success.

    For tables written row group by row group, never held whole in memory.
    """
    with atomic_local_file(uri, suffix=".parquet") as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            yield writer


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


def parquet_num_rows(uri: str) -> int:
    """Row count from the Parquet footer (reads no data)."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def parquet_names(uri: str) -> set[str]:
    """File names of the Parquet files in the directory ``uri`` (the shards a job has finished there);
    empty when the directory does not exist."""
    return {f.rsplit("/", 1)[-1] for f in iter_parquet_files(uri)} if exists(uri) else set()


def dir_num_rows(uri: str) -> int:
    """Rows of every Parquet file in the directory ``uri`` (footers only); 0 when it does not exist."""
    return sum(parquet_num_rows(f) for f in iter_parquet_files(uri)) if exists(uri) else 0


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

    def read(self, columns: list[str]) -> pa.Table:
        """Whole ``columns`` of the file opened at construction (not whatever is at ``uri`` now)."""
        return self._file.read(columns=columns)

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
