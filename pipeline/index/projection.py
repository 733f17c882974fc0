"""The projection cache of ``zsl index``: every feature shard mapped into the search space once.

A feature shard ``.../shard-N.parquet`` is projected by the model's image projection (so any
backbone is searchable by text), row group by row group, into ``cache/shard-N.npy`` (atomic). A
rerun after a kill projects only the shards whose cached file is missing or invalid, and
:class:`CachedVectors` reads the cache back, shard by shard, as the batches an index is built,
grown and tuned from.

A shard whose data cannot be read (its footer is fine, a page is not; non-finite embeddings; fewer
or more rows than its footer says) fails only itself: the projector returns why instead of raising
(here and on a Ray worker alike, where an exception would fail every shard's job), and the index
stage leaves it out. Reading a shard to project it reads the columns ``ids.parquet`` is made of
too, so a shard that projects is one whose ids can be written.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.core.features import iter_shard_batches
from pipeline.zsl.models import load_model

LOG = logging.getLogger(__name__)

__all__ = ["CachedVectors", "cache_file", "Projector", "projector", "unreadable_reason"]

#: what reading a shard's data raises when its bytes are bad (pyarrow: OSError, ArrowInvalid)
_UNREADABLE = (OSError, ValueError, pa.ArrowException)
#: the columns ``ids.parquet`` is made of (:func:`~pipeline.index.store.write_ids`), read with the embeddings
_ID_COLUMNS = ("image_id", "uri", "label")


def unreadable_reason(what: BaseException | str, limit: int = 200) -> str:
    """Why a shard cannot be read, in one short line: an exception's type and first line, or a
    message's first line, at most ``limit`` characters (no file contents beyond what the reader said).

    >>> unreadable_reason(OSError("Couldn't deserialize thrift: bad\\nDeserializing page header failed."))
    "OSError: Couldn't deserialize thrift: bad"
    >>> unreadable_reason("x" * 300, limit=10)
    'xxxxxxx...'
    """
    first = (str(what).strip().splitlines() or [""])[0].strip()
    if isinstance(what, BaseException):
        first = f"{type(what).__name__}: {first}" if first else type(what).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


class CachedVectors:
    """Re-iterable over cached per-shard vectors, in id order (lets FAISS draw a uniform sample)."""

    def __init__(self, files: list[str]) -> None:
        self.files = files

    def __iter__(self):
        for f in self.files:
            yield zio.read_npy(f)


def cache_file(cache: str, shard_uri: str) -> str:
    """The cached vectors of a feature shard: ``cache/<shard stem>.npy``."""
    return zio.join(cache, shard_uri.rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".npy")


def _release_memory() -> None:
    """Hand freed buffers back to the OS (Arrow's pool, glibc's heap), so that memory used to read
    and project a shard does not stay resident under the index built next."""
    pa.default_memory_pool().release_unused()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Projector:
    """Projects one feature shard into the search space: ``cache/shard-N.npy`` (atomic), unless a
    valid cached file is there (right rows, columns, float32, finite; anything else is recomputed)."""

    def __init__(self, model_dir: str, dim_in: int, dim: int, cache: str, model=None) -> None:
        self.model = model if model is not None else load_model(model_dir, feature_dim=dim_in)[0]
        self.dim_in, self.dim, self.cache = dim_in, dim, cache

    def _cached(self, target: str, n: int) -> bool:
        if not zio.exists(target):
            return False
        try:
            Z = zio.read_npy(target)
        except ValueError as exc:
            LOG.warning("%s; recomputing", exc)
            return False
        if Z.shape == (n, self.dim) and Z.dtype == np.float32 and np.isfinite(Z).all():
            return True
        LOG.warning("%s: cached vectors have shape %s %s, expected (%d, %d) float32; recomputing",
                    target, Z.shape, Z.dtype, n, self.dim)
        return False

    def __call__(self, shard_uri: str) -> dict:
        """``{"shard": shard_uri, "projected": bool}`` (False: the cached file was valid), or
        ``{"shard": shard_uri, "projected": False, "failed": why}`` when the shard's data cannot be
        read (see the module docstring); nothing is cached then. A model that projects to the wrong
        shape is not the shard's fault: ``ValueError``."""
        try:
            n = zpq.parquet_num_rows(shard_uri)
        except _UNREADABLE as exc:
            return self._failed(shard_uri, unreadable_reason(exc))
        target = cache_file(self.cache, shard_uri)
        if self._cached(target, n):
            return {"shard": shard_uri, "projected": False}
        Z = np.empty((n, self.dim), np.float32)
        at = 0
        batches = iter_shard_batches(shard_uri, self.dim_in, columns=_ID_COLUMNS, batch_rows=16_384)
        while True:
            try:
                got = next(batches, None)
            except _UNREADABLE as exc:
                return self._failed(shard_uri, unreadable_reason(exc))
            if got is None:
                break
            X = got[1]
            if at + len(X) > n:
                return self._failed(shard_uri, f"holds more rows than its footer says ({n})")
            if not np.isfinite(X).all():
                row = at + int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
                return self._failed(shard_uri, f"non-finite embedding in row {row}")
            z = np.asarray(self.model.search_images(X), dtype=np.float32)
            if z.shape != (len(X), self.dim):
                raise ValueError(f"{shard_uri}: the model projects {len(X)} images to shape {z.shape}, "
                                 f"expected ({len(X)}, {self.dim})")
            Z[at : at + len(X)] = z
            at += len(X)
        if at != n:
            return self._failed(shard_uri, f"holds {at} rows, its footer says {n}")
        zio.write_npy_atomic(target, Z)
        del Z
        _release_memory()
        return {"shard": shard_uri, "projected": True}

    @staticmethod
    def _failed(shard_uri: str, why: str) -> dict:
        LOG.warning("%s: cannot be read (%s); left out", shard_uri, why)
        _release_memory()
        return {"shard": shard_uri, "projected": False, "failed": why}


def projector(model_dir: str, dim_in: int, dim: int, cache: str) -> Projector:
    """Picklable factory (a Ray worker loads the model itself)."""
    return Projector(model_dir, dim_in, dim, cache)
