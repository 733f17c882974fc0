"""The projection cache of ``zsl index``: every feature shard mapped into the search space once.

A feature shard ``.../shard-N.parquet`` is projected by the model's image projection (so any
backbone is searchable by text), row group by row group, into ``cache/shard-N.npy`` (atomic). A
rerun after a kill projects only the shards whose cached file is missing or invalid, and
:class:`CachedVectors` reads the cache back, shard by shard, as the batches an index is built,
grown and tuned from.
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

__all__ = ["CachedVectors", "cache_file", "Projector", "projector"]


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
        """``{"shard": shard_uri, "projected": bool}`` (False: the cached file was valid)."""
        n = zpq.parquet_num_rows(shard_uri)
        target = cache_file(self.cache, shard_uri)
        if self._cached(target, n):
            return {"shard": shard_uri, "projected": False}
        Z = np.empty((n, self.dim), np.float32)
        at = 0
        for _, X in iter_shard_batches(shard_uri, self.dim_in, batch_rows=16_384):
            z = np.asarray(self.model.search_images(X), dtype=np.float32)
            if z.shape != (len(X), self.dim):
                raise ValueError(f"{shard_uri}: the model projects {len(X)} images to shape {z.shape}, "
                                 f"expected ({len(X)}, {self.dim})")
            Z[at : at + len(X)] = z
            at += len(X)
        zio.write_npy_atomic(target, Z)
        del Z
        _release_memory()
        return {"shard": shard_uri, "projected": True}


def projector(model_dir: str, dim_in: int, dim: int, cache: str) -> Projector:
    """Picklable factory (a Ray worker loads the model itself)."""
    return Projector(model_dir, dim_in, dim, cache)
