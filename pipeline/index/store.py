"""An index directory on disk: its layout, writing it atomically, loading it back with checks.

A directory holds ``index.faiss`` (plus ``index.ivfdata`` for an on-disk merged IVF),
``ids.parquet`` (:data:`~pipeline.core.schema.INDEX_IDS_SCHEMA`: row ``i`` is faiss id ``i``) and
``manifest.json``, written last, so its presence means the index is complete. A ``zsl index``
output also carries the model it was built with (``model/``) and, when the features' captions
were embedded, a caption index of its own (``captions/``, the same faiss ids). faiss streams the
index to disk (no in-memory copy) and reads it back memory-mapped where the index type allows.
faiss is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow as pa

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.core.schema import INDEX_IDS_SCHEMA, check_schema
from pipeline.core.manifests import IndexManifest, read_manifest, write_manifest
from pipeline.index.common import factory_of, import_faiss
from pipeline.index.knn import set_nprobe, set_search_params

if TYPE_CHECKING:  # pragma: no cover
    import faiss

LOG = logging.getLogger(__name__)

__all__ = ["INDEX_FILE", "IVFDATA_FILE", "IDS_FILE", "MODEL_COPY", "CAPTIONS_INDEX", "IdTable", "read_ids",
           "write_ids", "write_index_files", "save_index", "load_index", "copy_model", "index_version",
           "version_on_disk"]

#: The faiss index file (its inverted lists inside, or in :data:`IVFDATA_FILE` beside it).
INDEX_FILE = "index.faiss"
#: The inverted lists of an IVF index merged from partitions on disk.
IVFDATA_FILE = "index.ivfdata"
#: faiss id -> image_id, uri, label (:data:`~pipeline.core.schema.INDEX_IDS_SCHEMA`).
IDS_FILE = "ids.parquet"
#: Where an index directory keeps a copy of the model it was built with.
MODEL_COPY = "model"
#: Where an index directory keeps the index of its images' caption embeddings (same faiss ids).
CAPTIONS_INDEX = "captions"
_MANIFEST = "manifest.json"
_VERIFY_MAX_BYTES = 256 << 20  # larger index files: size checked on load, sha256 only with verify=True


# ------------------------------------------------------------------------------------------ ids

def _check_ids(ids_uri_or_table, ntotal: int, where: str) -> None:
    """``ids`` maps faiss ids ``0..ntotal-1`` once each (a table may be in any order; a written
    ``ids.parquet`` must be in id order, and is checked batch by batch, never read whole)."""
    bad = f"{where}: ids must hold faiss_id 0..{ntotal - 1} once each (index has {ntotal} vectors"
    if isinstance(ids_uri_or_table, pa.Table):
        check_schema(ids_uri_or_table.schema, INDEX_IDS_SCHEMA, f"{where}: ids")
        fids = ids_uri_or_table.column("faiss_id").to_numpy()
        if len(fids) != ntotal or not np.array_equal(np.sort(fids), np.arange(ntotal)):
            raise ValueError(f"{bad}, ids has {len(fids)} rows)")
        return
    import pyarrow.parquet as pq

    fs, path = zio.filesystem(ids_uri_or_table)
    seen = 0
    with fs.open(path, "rb") as fh:
        for rb in pq.ParquetFile(fh).iter_batches(batch_size=1 << 20, columns=["faiss_id"]):
            got = rb.column(0).to_numpy()
            if not np.array_equal(got, np.arange(seen, seen + len(got))):
                raise ValueError(f"{bad}, in order; row {seen} on is not)")
            seen += len(got)
    if seen != ntotal:
        raise ValueError(f"{bad}, ids has {seen} rows)")


class IdTable(zpq.LazyParquet):
    """``ids.parquet`` read lazily: only the row groups holding the requested faiss ids are decoded
    (a few kept in an LRU cache), so a search process does not hold every uri of a large index.
    Row ``i`` is faiss id ``i`` (as :func:`write_index_files` checks)."""

    def __init__(self, out_dir: str, cache_groups: int = 64) -> None:
        uri = zio.join(out_dir, IDS_FILE)
        super().__init__(uri, cache_groups)
        check_schema(self.schema, INDEX_IDS_SCHEMA, uri)

    def take(self, faiss_ids) -> pa.Table:
        """The rows of ``faiss_ids`` (in that order) as a table of :data:`INDEX_IDS_SCHEMA`."""
        ids = np.asarray(faiss_ids, np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_rows):
            raise IndexError(f"faiss ids must be in 0..{self.num_rows - 1}")
        return super().take(ids) if len(ids) else INDEX_IDS_SCHEMA.empty_table()


def read_ids(out_dir: str) -> pa.Table:
    """``ids.parquet`` of an index directory, memory-mapped where local (no Python objects per row)."""
    uri = zio.join(out_dir, IDS_FILE)
    if zio.is_local(uri):
        import pyarrow.parquet as pq

        table = pq.read_table(zio.filesystem(uri)[1], memory_map=True)
    else:
        table = zpq.read_parquet(uri)
    check_schema(table.schema, INDEX_IDS_SCHEMA, uri)
    return table


def write_ids(out_dir: str, shard_files: Iterable[str], *, keep_existing: bool = False) -> None:
    """Stream ``ids.parquet`` from feature shards (their ``image_id``, ``uri``, ``label``), faiss ids
    continuing shard by shard; ``keep_existing``: the rows already there first (an index grown in
    place), copied row group by row group (the old file stays until the atomic rename)."""
    uri = zio.join(out_dir, IDS_FILE)
    offset = 0
    with zpq.atomic_parquet_writer(uri, INDEX_IDS_SCHEMA) as w:
        if keep_existing:
            import pyarrow.parquet as pq

            fs, path = zio.filesystem(uri)
            with fs.open(path, "rb") as fh:
                for rb in pq.ParquetFile(fh).iter_batches(batch_size=65_536):
                    w.write_batch(rb)
                    offset += rb.num_rows
        for f in shard_files:
            t = zpq.read_parquet(f, columns=["image_id", "uri", "label"])
            w.write_table(pa.table({
                "faiss_id": pa.array(np.arange(offset, offset + t.num_rows), pa.int64()),
                "image_id": t.column("image_id"), "uri": t.column("uri"), "label": t.column("label"),
            }, schema=INDEX_IDS_SCHEMA))
            offset += t.num_rows


# ------------------------------------------------------------------------------------ write

def _on_disk_lists(index) -> bool:
    faiss = import_faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def write_index_files(index: "faiss.Index", out_dir: str, *, ids: pa.Table | None = None) -> dict[str, Any]:
    """Write ``index.faiss`` (streamed to disk by faiss) and ``ids.parquet`` atomically; return the
    manifest fields they determine: ``ntotal``, ``dim``, ``factory`` (read back from the index),
    ``index_bytes``, ``sha256`` and ``data_files`` (``index.ivfdata``'s size for an on-disk IVF).

    ``ids`` (:data:`INDEX_IDS_SCHEMA`) must map each faiss id ``0..ntotal-1`` once; with
    ``ids=None``, ``out_dir/ids.parquet`` must already be written (:func:`write_ids`) and is checked.
    """
    faiss = import_faiss()
    ids_uri = zio.join(out_dir, IDS_FILE)
    _check_ids(ids if ids is not None else ids_uri, int(index.ntotal), out_dir)
    with zio.atomic_local_file(zio.join(out_dir, INDEX_FILE)) as tmp:
        faiss.write_index(index, tmp)
        size, sha = os.path.getsize(tmp), zio.sha256_file(tmp)
    if ids is not None:
        zpq.write_parquet_atomic(ids_uri, ids.select(INDEX_IDS_SCHEMA.names).cast(INDEX_IDS_SCHEMA))
    data_files = {}
    if _on_disk_lists(index):
        fs, path = zio.filesystem(zio.join(out_dir, IVFDATA_FILE))
        data_files[IVFDATA_FILE] = int(fs.size(path))
    else:  # lists of an earlier on-disk build that this index does not use
        zio.remove(zio.join(out_dir, IVFDATA_FILE))
    return {"ntotal": int(index.ntotal), "dim": int(index.d), "factory": factory_of(index),
            "index_bytes": int(size), "sha256": sha, "data_files": data_files}


def save_index(index: "faiss.Index", out_dir: str, *, ids: pa.Table, manifest: dict[str, Any]) -> IndexManifest:
    """Write ``index.faiss``, ``ids.parquet`` and, last, ``manifest.json`` under ``out_dir``.

    The manifest is ``manifest`` (keys of :class:`~pipeline.core.manifests.IndexManifest`) plus the fields
    :func:`write_index_files` computes, which override given ones except a given ``factory``.
    An old ``manifest.json`` is removed first, so a half-rewritten index never looks complete.
    """
    zio.remove(zio.join(out_dir, _MANIFEST))
    fields = write_index_files(index, out_dir, ids=ids)
    if manifest.get("factory"):
        fields["factory"] = manifest["factory"]
    try:
        out = IndexManifest(**{**manifest, **fields})
    except Exception as exc:  # pydantic's ValidationError: an unknown or mistyped key, named
        raise ValueError(f"{out_dir}: index manifest: {exc}") from None
    write_manifest(out_dir, out)
    LOG.info("saved %s index of %d vectors to %s", out.factory, index.ntotal, out_dir)
    return out


def copy_model(model_dir: str, index_dir: str) -> None:
    """Put a copy of the model (weights + manifest, a few MB) in ``index_dir/model``, so the
    directory can be moved or copied to another machine and still answer text queries."""
    for name in ("weights.safetensors", "manifest.json"):
        zio.write_bytes_atomic(zio.join(index_dir, MODEL_COPY, name), zio.read_bytes(zio.join(model_dir, name)))


# ------------------------------------------------------------------------------------- load

def _local_index_file(out_dir: str, manifest: IndexManifest) -> str:
    """The local path of ``index.faiss`` (with its data files beside it): a remote directory is
    first copied to a local cache named by the file's sha256, never confused with an older copy."""
    cache = None
    if not zio.is_local(out_dir):
        import tempfile

        cache = os.path.join(tempfile.gettempdir(), "zsl-cache", manifest.sha256[:32])
        for name in manifest.data_files:
            zio.local_path(zio.join(out_dir, name), cache)
    return zio.local_path(zio.join(out_dir, INDEX_FILE), cache)


def _check_files(out_dir: str, path: str, manifest: IndexManifest, verify: bool | None) -> None:
    """The files' sizes are the manifest's; so is the index's sha256 when ``verify`` (None: small files)."""
    for name, want in manifest.data_files.items():
        got = os.path.getsize(os.path.join(os.path.dirname(path), name))
        if got != want:
            raise ValueError(f"{out_dir}/{name}: {got} bytes, the manifest says {want}; the file is truncated "
                             "or was replaced")
    size = os.path.getsize(path)
    if size != manifest.index_bytes:
        raise ValueError(f"{out_dir}/{INDEX_FILE}: {size} bytes, the manifest says {manifest.index_bytes}; "
                         "the file is truncated or was replaced")
    if verify or (verify is None and size <= _VERIFY_MAX_BYTES):
        sha = zio.sha256_file(path)
        if sha != manifest.sha256:
            raise ValueError(f"{out_dir}/{INDEX_FILE}: sha256 {sha} does not match the manifest's "
                             f"{manifest.sha256}; the file is corrupted or was replaced")


def _read_flags(faiss, manifest: IndexManifest, mmap: bool) -> int:
    if manifest.data_files.get(IVFDATA_FILE) is not None:
        return faiss.IO_FLAG_ONDISK_SAME_DIR  # inverted lists already mmapped from index.ivfdata
    if not mmap:
        return 0
    # IVF: the inverted lists are mapped; flat codes (Flat, HNSW storage): mapped in place
    is_ivf = "IVF" in manifest.factory
    return (faiss.IO_FLAG_MMAP if is_ivf else faiss.IO_FLAG_MMAP_IFC) | faiss.IO_FLAG_READ_ONLY


def _read_index(out_dir: str, path: str, manifest: IndexManifest, mmap: bool) -> "faiss.Index":
    """``faiss.read_index`` memory-mapped where it can be (else read whole); ValueError if unreadable."""
    faiss = import_faiss()
    try:
        return faiss.read_index(path, _read_flags(faiss, manifest, mmap))
    except RuntimeError as exc:
        if not mmap:
            raise ValueError(f"{out_dir}/{INDEX_FILE}: cannot read ({exc})") from None
        LOG.debug("%s: cannot be memory-mapped (%s); reading it", path, exc)
    try:
        return faiss.read_index(path)
    except RuntimeError as exc:
        raise ValueError(f"{out_dir}/{INDEX_FILE}: cannot read ({exc})") from None


def _check_loaded(out_dir: str, index, ids, manifest: IndexManifest, expected_dim: int | None,
                  expected: dict | None) -> None:
    """Index, ids and manifest agree on the count; the dimension and ``expected`` fields are as asked."""
    if not index.ntotal == ids.num_rows == manifest.ntotal:
        raise ValueError(f"{out_dir}: index has {index.ntotal} vectors, ids.parquet "
                         f"{ids.num_rows} rows, manifest ntotal {manifest.ntotal}")
    if expected_dim is not None and expected_dim != index.d:
        raise ValueError(f"{out_dir}: index dim is {index.d}, expected {expected_dim}")
    for key, want in (expected or {}).items():
        found = getattr(manifest, key, "<missing>")
        if found != want:
            raise ValueError(f"{out_dir}: manifest {key!r} is {found!r}, expected {want!r}")


def load_index(out_dir: str, *, expected_dim: int | None = None, expected: dict | None = None,
               mmap: bool = True, verify: bool | None = None,
               lazy_ids: bool = False) -> tuple["faiss.Index", "pa.Table | IdTable", IndexManifest]:
    """Load and check an index written by :func:`save_index`: ``(index, ids, manifest)``.

    ``mmap`` (default): the file is memory-mapped where the index type allows (``IO_FLAG_MMAP``
    for IVF lists, ``IO_FLAG_MMAP_IFC`` for flat codes and HNSW storage), so a process starts in
    milliseconds and processes share the pages; such an index is read-only (load with
    ``mmap=False`` to add to it). Remote indexes are first copied to a local cache named by the
    file's sha256, so a rebuilt index is never confused with an older copy. ``lazy_ids``: the ids
    come as an :class:`IdTable` that reads only the row groups a search needs.
    ``verify``: check the sha256 of ``index.faiss`` against the manifest (default: when the
    file is at most 256 MiB; its size is always checked).

    Raises ``FileNotFoundError`` without ``manifest.json``; ``ValueError`` when the file's size or
    sha256 differs from the manifest's, when ntotal, ids and manifest disagree, when the
    dimension is not ``expected_dim``, or when a field of ``expected`` (e.g. ``feature_model``)
    differs from the manifest's. Applies the manifest's ``search_params`` (else its ``nprobe``).
    """
    import_faiss()
    manifest = read_manifest(out_dir, IndexManifest)
    path = _local_index_file(out_dir, manifest)
    _check_files(out_dir, path, manifest, verify)
    index = _read_index(out_dir, path, manifest, mmap)
    ids = IdTable(out_dir) if lazy_ids else read_ids(out_dir)
    _check_loaded(out_dir, index, ids, manifest, expected_dim, expected)
    if manifest.search_params:
        set_search_params(index, manifest.search_params)
    elif manifest.nprobe is not None:
        set_nprobe(index, manifest.nprobe)
    return index, ids, manifest


# ---------------------------------------------------------------------------------- version

def index_version(manifest: IndexManifest, captions: IndexManifest | None = None) -> str:
    """The version of a loaded index directory: its manifest's (and its caption index's) content,
    12 hex digits; every finished ``zsl index`` run that changed anything gives a new one."""
    if captions is None:
        return manifest.version()
    import hashlib

    return hashlib.sha256(f"{manifest.version()}+{captions.version()}".encode()).hexdigest()[:12]


def version_on_disk(out_dir: str) -> str:
    """:func:`index_version` of the finished index now at ``out_dir`` (its manifests only, no
    index file is read); ``FileNotFoundError`` while it is being written (no manifest yet)."""
    manifest = read_manifest(out_dir, IndexManifest)
    cap = zio.join(out_dir, CAPTIONS_INDEX)
    captions = read_manifest(cap, IndexManifest) if zio.exists(zio.join(cap, _MANIFEST)) else None
    return index_version(manifest, captions)
