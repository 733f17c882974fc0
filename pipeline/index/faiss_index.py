"""FAISS indexes of L2-normalised float32 embeddings, searched by inner product (cosine).

Choose an index under a memory budget (as criteo/autofaiss does: flat, HNSW, IVF with a flat or
HNSW coarse quantiser, OPQ+PQ codes), build it (on GPU when there is one), or build IVF partitions
separately with one trained quantiser and merge their inverted lists on disk; save it atomically
beside its id table and manifest (faiss streams it to disk: no in-memory copy), load it back
memory-mapped with checks, set its search parameters (``nprobe``, ``efSearch``) and search it.

An index directory holds ``index.faiss`` (plus ``index.ivfdata`` for an on-disk merged IVF),
``ids.parquet`` (``INDEX_IDS_SCHEMA``) and ``manifest.json``; the manifest is written last, so its
presence means the index is complete. faiss is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import itertools
import os
import logging
import math
import re
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow as pa

from pipeline.core import fs as zio
from pipeline.core.schema import INDEX_IDS_SCHEMA, IndexManifest, check_schema, read_manifest, write_manifest

if TYPE_CHECKING:  # pragma: no cover
    import faiss

LOG = logging.getLogger(__name__)

__all__ = ["IdTable", "choose_index", "estimate_memory", "training_rows", "training_sample", "new_index",
           "train_index", "add_vectors", "build_index", "merge_ivf_parts", "write_index_files", "save_index", "load_index",
           "set_search_params", "search", "brute_force_search", "recall_at_k", "INDEX_FILE", "IVFDATA_FILE"]

_FLAT_MAX_N = 20_000
_HNSW_MAX_N = 1_000_000
_HNSW_M = 32
_IVF_HNSW_MIN_NLIST = 4096  # from here on an HNSW coarse quantiser (autofaiss's choice) beats a flat scan
_PQ_M = (512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
_ADD_BATCH = 65_536
_VERIFY_MAX_BYTES = 256 << 20  # larger index files: size checked on load, sha256 only with verify=True
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
_NO_FAISS = "faiss is not installed: pip install 'zsl-pipeline[cpu]' (or [gpu] on CUDA machines)"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(_NO_FAISS) from None
    return faiss


def _nlist(n: int) -> int:
    """About 4*sqrt(n) as a power of two, in [16, 65536], and at most n // 39 (at least 1)."""
    p = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    return max(1, min(max(16, min(p, 65_536)), n // 39))


def estimate_memory(factory: str, n: int, dim: int) -> int:
    """Rough size in bytes of an index of ``n`` vectors of ``dim`` made by ``factory``.

    Counts the stored payload: vectors or codes, 8-byte ids of inverted lists, IVF centroids, PQ
    codebooks, OPQ matrices, HNSW links (``2*M`` level-0 neighbours of 4 bytes + ~16 bytes per
    vector); not the training sample or add batches held while building. Understands ``Flat``,
    ``HNSW{M}[,Flat]``, ``IVF{nlist}[_HNSW{M}],`` + ``Flat``/``PQ{m}[x{bits}]``/``SQ8``/``SQfp16``,
    ``PQ{m}[x{bits}]``, with an optional ``OPQ{m}[_{d}],`` prefix; else ``ValueError``.

    >>> estimate_memory("Flat", 1000, 512)
    2048000
    >>> estimate_memory("HNSW32,Flat", 1000, 512)
    2320000
    >>> estimate_memory("IVF1024,PQ64x8", 1_000_000, 512)
    74621440
    """
    if n < 0 or dim <= 0:
        raise ValueError(f"need n >= 0 and dim > 0, got n={n}, dim={dim}")
    parts = [p.strip() for p in factory.split(",")]
    total, d = 0, dim
    m = re.fullmatch(r"OPQ(\d+)(?:_(\d+))?", parts[0])
    if m:
        d = int(m.group(2) or dim)
        total += dim * d * 4
        parts = parts[1:]
    ivf = re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?", parts[0]) if parts else None
    hnsw = re.fullmatch(r"HNSW(\d+)", parts[0]) if parts else None
    if ivf or hnsw:
        parts = parts[1:] or (["Flat"] if hnsw else [])
    if ivf:
        total += int(ivf.group(1)) * d * 4 + n * 8
        if ivf.group(2):  # HNSW graph over the centroids
            total += int(ivf.group(1)) * (int(ivf.group(2)) * 2 * 4 + 16)
    if hnsw:
        total += n * (int(hnsw.group(1)) * 2 * 4 + 16)
    pq_ = re.fullmatch(r"PQ(\d+)(?:x(\d+))?", parts[0]) if len(parts) == 1 else None
    if len(parts) == 1 and parts[0] == "Flat":
        return total + n * d * 4
    if len(parts) == 1 and parts[0] in ("SQ8", "SQfp16"):
        return total + n * d * (1 if parts[0] == "SQ8" else 2) + 2 * d * 4
    if pq_:
        pm, bits = int(pq_.group(1)), int(pq_.group(2) or 8)
        return total + n * math.ceil(pm * bits / 8) + (2**bits) * d * 4
    raise ValueError(f"estimate_memory: unsupported index factory {factory!r}")


def _ivf(nlist: int) -> str:
    return f"IVF{nlist}_HNSW{_HNSW_M}" if nlist >= _IVF_HNSW_MIN_NLIST else f"IVF{nlist}"


_OPQ_MIN_N = 100_000  # below this, OPQ's rotation costs more training time than it gains


def _pq_factories(n: int, nlist: int, dim: int) -> Iterable[str]:
    """PQ candidates, largest codes first: ``OPQ{m}_{d},IVF..,PQ{m}x8`` (OPQ rotates and reduces to
    ``d`` = 4 dims per sub-quantiser where ``dim`` allows, as autofaiss does); for small ``n``,
    ``IVF..,PQ{m}x8`` with ``m`` dividing ``dim``."""
    for m in _PQ_M:
        if m <= dim and n >= _OPQ_MIN_N:
            yield f"OPQ{m}_{min(4 * m, dim - dim % m)},{_ivf(nlist)},PQ{m}x8"
        elif m <= dim and dim % m == 0:
            yield f"{_ivf(nlist)},PQ{m}x8"


def choose_index(n: int, dim: int, *, max_memory_bytes: int) -> str:
    """Pick a FAISS ``index_factory`` string for ``n`` vectors of ``dim`` within a memory budget.

    The first whose :func:`estimate_memory` fits wins: exact ``Flat`` (``n <= 20_000``),
    ``HNSW32,Flat`` (``n <= 1_000_000``), ``IVF{nlist},Flat``, then OPQ + IVF + PQ codes
    ``OPQ{m}_{d},IVF{nlist},PQ{m}x8`` with the largest ``m`` that fits (``IVF{nlist},PQ{m}x8``
    below 100,000 vectors; PQ needs ``n >= 256``).
    ``nlist`` is ~``4*sqrt(n)`` as a power of two in [16, 65536], at most ``n // 39`` (>= 39
    training points per centroid); from 4096 lists on the coarse quantiser is an HNSW graph
    (``IVF{nlist}_HNSW32``), as in autofaiss. Raises ``ValueError`` saying how much memory is
    needed when nothing fits. Search parameters are not guessed here: see
    :func:`pipeline.index.tune.tune_index`.

    >>> from pipeline.core.config import parse_memory
    >>> choose_index(10_000, 512, max_memory_bytes=parse_memory("1G"))
    'Flat'
    >>> choose_index(500_000, 512, max_memory_bytes=parse_memory("4G"))
    'HNSW32,Flat'
    >>> choose_index(5_000_000, 512, max_memory_bytes=parse_memory("16G"))
    'IVF8192_HNSW32,Flat'
    >>> choose_index(100_000_000, 768, max_memory_bytes=parse_memory("16G"))
    'OPQ128_512,IVF32768_HNSW32,PQ128x8'
    >>> choose_index(1_000_000_000, 768, max_memory_bytes=parse_memory("4G"))
    Traceback (most recent call last):
    ...
    ValueError: no index of 1000000000 vectors of dim 768 fits in 4294967296 bytes: needs at least 9018890752 bytes (OPQ1_4,IVF65536_HNSW32,PQ1x8); raise max_memory_bytes
    """
    if n <= 0 or dim <= 0 or max_memory_bytes <= 0:
        raise ValueError(f"need n, dim, max_memory_bytes > 0, got n={n}, dim={dim}, "
                         f"max_memory_bytes={max_memory_bytes}")
    nlist = _nlist(n)
    candidates = (["Flat"] if n <= _FLAT_MAX_N else []) + (
        [f"HNSW{_HNSW_M},Flat"] if n <= _HNSW_MAX_N else []) + [f"{_ivf(nlist)},Flat"]
    for c in candidates:
        if estimate_memory(c, n, dim) <= max_memory_bytes:
            return c
    smallest = "Flat"  # too few points to train PQ: exact search is the smallest usable index
    if n >= 256:
        for factory in _pq_factories(n, nlist, dim):
            if estimate_memory(factory, n, dim) <= max_memory_bytes:
                return factory
            smallest = factory
    need = estimate_memory(smallest, n, dim)
    raise ValueError(f"no index of {n} vectors of dim {dim} fits in {max_memory_bytes} bytes: "
                     f"needs at least {need} bytes ({smallest}); raise max_memory_bytes")


def training_rows(factory: str, n: int) -> int:
    """Rows to train ``factory`` on, sized from the index: 0 when it needs no training; for IVF at
    least 39 per list and up to 64 per list (>= 50,000, enough for PQ/OPQ codebooks); never above n.

    >>> training_rows("HNSW32,Flat", 10**6), training_rows("IVF4096,Flat", 10**7), training_rows("IVF1024,PQ16x8", 30_000)
    (0, 262144, 30000)
    """
    m = re.search(r"IVF(\d+)", factory)
    if m:
        nlist = int(m.group(1))
        return min(n, max(50_000, 39 * nlist, min(64 * nlist, 1_000_000)))
    if "PQ" in factory or "SQ" in factory:
        return min(n, 50_000)
    return 0


def _as_matrix(x: Any, dim: int, what: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 (rows, dim) array; ValueError when it cannot be."""
    try:
        a = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: not convertible to float32 ({exc})") from None
    if a.ndim == 1 and what == "queries":
        a = a.reshape(1, -1)
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"{what}: expected shape (n, {dim}), got {a.shape}")
    if not np.isfinite(a).all():
        bad = int(np.argwhere(~np.isfinite(a))[0, 0])
        raise ValueError(f"{what}: row {bad} has NaN or infinite values")
    return np.ascontiguousarray(a)


def _no_polysemous(faiss, index) -> None:
    """Skip polysemous training of PQ codes (slow annealing; only helps Hamming pre-filtering)."""
    try:
        inner = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        inner = faiss.downcast_index(index)
        if isinstance(inner, faiss.IndexPreTransform):
            inner = faiss.downcast_index(inner.index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


def training_sample(source: Iterable, dim: int, n_total: int | None, size: int, seed: int):
    """``(sample, batches)``: a seeded uniform sample (two passes over a re-iterable ``source``,
    three without ``n_total``) or the head of a one-shot iterator, and the batches to add."""
    batches, parts = iter(source), []
    if batches is not source:
        n = n_total if n_total is not None else sum(len(b) for b in source)
        rng = np.random.default_rng(seed)
        rows = np.arange(n) if size >= n else np.sort(rng.choice(n, size, replace=False))
        start = 0
        for b in source:
            lo, hi = np.searchsorted(rows, [start, start + len(b)])
            if hi > lo:
                parts.append(_as_matrix(b, dim, "vectors")[rows[lo:hi] - start])
            start += len(b)
        batches = iter(source)
    else:
        head, got = [], 0
        for b in batches:
            head.append(b)
            parts.append(_as_matrix(b, dim, "vectors")[: size - got])
            got += len(parts[-1])
            if got >= size:
                break
        batches = itertools.chain(head, batches)
    return (np.concatenate(parts) if parts else None), batches


def new_index(dim: int, factory: str) -> "faiss.Index":
    """An empty inner-product index made by ``index_factory`` (ValueError naming a bad factory)."""
    faiss = _faiss()
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"bad index factory {factory!r} for dim {dim}: {exc}") from None
    _no_polysemous(faiss, index)
    return index


def _to_gpu(index, use_gpu: bool | None, what: str):
    """``(index, on_gpu)``: the index on every GPU faiss sees when asked (None: if any)."""
    faiss = _faiss()
    gpus = faiss.get_num_gpus() if use_gpu is not False and hasattr(faiss, "get_num_gpus") else 0
    if use_gpu and not gpus:
        LOG.warning("use_gpu=True but faiss sees no GPU; building %s on CPU", what)
    if gpus:
        try:
            return faiss.index_cpu_to_all_gpus(index), True
        except (RuntimeError, AttributeError) as exc:
            LOG.warning("%s has no GPU version (%s); building on CPU", what, exc)
    return index, False


def train_index(sample: np.ndarray, *, dim: int, factory: str, use_gpu: bool | None = None) -> "faiss.Index":
    """An empty index of ``factory`` trained on ``sample`` (on GPU when there is one); a CPU index."""
    faiss = _faiss()
    index = new_index(dim, factory)
    if index.is_trained:
        return index
    sample = _as_matrix(sample, dim, "vectors")
    index, on_gpu = _to_gpu(index, use_gpu, factory)
    LOG.info("training %s on %d vectors of dim %d", factory, len(sample), dim)
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise ValueError(f"cannot train {factory} on {len(sample)} vectors: {exc}") from None
    return faiss.index_gpu_to_cpu(index) if on_gpu else index


def add_vectors(index: "faiss.Index", batches: Iterable[np.ndarray], *, start_id: int | None = None,
                n_total: int | None = None, progress: bool = False, desc: str = "index") -> int:
    """Add batches of vectors to a trained index; return how many were added.

    ``start_id`` (IVF indexes only) gives the vectors the explicit ids ``start_id, start_id+1, ...``
    (a partition of a larger index); otherwise they follow the index's ``ntotal``.
    """
    from tqdm.auto import tqdm

    added = 0
    with tqdm(total=n_total, unit="vec", desc=desc, disable=not progress) as bar:
        for b in batches:
            a = _as_matrix(b, index.d, "vectors")
            for i in range(0, len(a), _ADD_BATCH):
                part = a[i : i + _ADD_BATCH]
                if start_id is None:
                    index.add(part)
                else:
                    first = start_id + added + i
                    index.add_with_ids(part, np.arange(first, first + len(part), dtype=np.int64))
            added += len(a)
            bar.update(len(a))
    return added


def build_index(vectors: np.ndarray | Iterable[np.ndarray], *, dim: int, factory: str,
                n_total: int | None = None, train_sample: int | None = None,
                use_gpu: bool | None = None, seed: int = 0,
                progress: bool = False) -> "faiss.Index":
    """Build an inner-product index from one array or an iterable of ``(rows, dim)`` batches.

    Parameters
    ----------
    vectors
        L2-normalised embeddings: one array, or batches so that millions need not be held twice.
        A re-iterable (list, object whose ``__iter__`` starts afresh) is read once more to draw a
        uniform training sample across all batches (twice more without ``n_total``), and trains
        exactly as the concatenated array would; a one-shot iterator trains on its first rows.
    dim, factory
        Vector dimension and FAISS ``index_factory`` string (see :func:`choose_index`).
    n_total
        Number of rows, if known (spares the counting pass; sizes the progress bar and the sample).
    train_sample
        Rows drawn (seeded, without replacement) to train indexes that need training; default
        :func:`training_rows` (needs ``n_total``; else 100,000).
    use_gpu
        None/True: all GPUs faiss sees, if any (else, or for index types without GPU support, CPU
        with a warning when True was asked). False: CPU.
    seed, progress
        Seed of the training sample; show a tqdm bar while adding.

    Returns
    -------
    faiss.Index
        A CPU index (ready for :func:`save_index`) with ids ``0..ntotal-1`` in input order.
    """
    faiss = _faiss()
    if train_sample is not None and train_sample <= 0:
        raise ValueError(f"train_sample must be positive, got {train_sample}")
    source = [vectors] if isinstance(vectors, np.ndarray) else vectors
    if n_total is None and isinstance(vectors, np.ndarray):
        n_total = len(vectors)
    index = new_index(dim, factory)
    batches = iter(source)
    if not index.is_trained:
        size = train_sample or (training_rows(factory, n_total) if n_total else 100_000)
        sample, batches = training_sample(source, dim, n_total, size, seed)
        if sample is None:
            raise ValueError(f"cannot train {factory}: no vectors given")
        index = train_index(sample, dim=dim, factory=factory, use_gpu=use_gpu)
        del sample
    index, on_gpu = _to_gpu(index, use_gpu, factory)
    add_vectors(index, batches, n_total=n_total, progress=progress, desc=f"index {factory}")
    if n_total is not None and index.ntotal != n_total:
        LOG.warning("n_total=%d but %d vectors were added", n_total, index.ntotal)
    return faiss.index_gpu_to_cpu(index) if on_gpu else index


def merge_ivf_parts(trained: "faiss.Index", part_files: list[str], out_dir: str) -> "faiss.Index":
    """Merge IVF partition indexes (each built from ``trained`` with :func:`add_vectors` and explicit
    ids) into one index whose inverted lists live on disk in ``out_dir/index.ivfdata``.

    faiss's ``merge_ondisk``: memory holds the quantiser, not the lists, so the merged index may
    exceed this machine's RAM. Returns the merged index (write it with :func:`write_index_files`).
    ``out_dir`` must be a local directory.
    """
    faiss = _faiss()
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.clone_index(trained)
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        raise ValueError(f"only IVF indexes can be merged from partitions, not {_factory_of(trained)}") from None
    target = zio.join(out_dir, IVFDATA_FILE)
    if not zio.is_local(target):
        raise ValueError(f"{out_dir}: partitions are merged on a local disk only")
    path = zio.filesystem(target)[1]
    zio.remove(target)
    merge_ondisk(index, [zio.local_path(f) for f in part_files], path)
    return index


def _set_nprobe(index: "faiss.Index", nprobe: int) -> int | None:
    """Set an IVF index's nprobe (also under OPQ); return the old one, or None if not IVF."""
    faiss = _faiss()
    if int(nprobe) < 1:
        raise ValueError(f"nprobe must be >= 1, got {nprobe}")
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        LOG.debug("nprobe=%s ignored: not an IVF index", nprobe)
        return None
    old, ivf.nprobe = ivf.nprobe, int(nprobe)
    return old


def set_search_params(index: "faiss.Index", params: str) -> None:
    """Apply a faiss ``ParameterSpace`` string (``"nprobe=32"``, ``"efSearch=64"``,
    ``"nprobe=64,quantizer_efSearch=128"``; ``""`` sets nothing); ValueError naming a bad one."""
    if not params:
        return
    faiss = _faiss()
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as exc:
        raise ValueError(f"cannot set search parameters {params!r} on a {_factory_of(index)} index: "
                         f"{str(exc).strip().splitlines()[-1]}") from None


def _factory_of(index: "faiss.Index") -> str:
    try:
        from faiss.contrib.factory_tools import reverse_index_factory
        return reverse_index_factory(index)
    except Exception:  # noqa: BLE001 - best effort: an unknown wrapper is not an error
        return "unknown"


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


def _on_disk_lists(index) -> bool:
    faiss = _faiss()
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
    ``ids=None``, ``out_dir/ids.parquet`` must already be written (streamed by the caller) and is checked.
    """
    faiss = _faiss()
    ids_uri = zio.join(out_dir, "ids.parquet")
    _check_ids(ids if ids is not None else ids_uri, int(index.ntotal), out_dir)
    with zio.atomic_local_file(zio.join(out_dir, INDEX_FILE)) as tmp:
        faiss.write_index(index, tmp)
        size, sha = os.path.getsize(tmp), zio.sha256_file(tmp)
    if ids is not None:
        zio.write_parquet_atomic(ids_uri, ids.select(INDEX_IDS_SCHEMA.names).cast(INDEX_IDS_SCHEMA))
    data_files = {}
    if _on_disk_lists(index):
        fs, path = zio.filesystem(zio.join(out_dir, IVFDATA_FILE))
        data_files[IVFDATA_FILE] = int(fs.size(path))
    else:  # lists of an earlier on-disk build that this index does not use
        zio.remove(zio.join(out_dir, IVFDATA_FILE))
    return {"ntotal": int(index.ntotal), "dim": int(index.d), "factory": _factory_of(index),
            "index_bytes": int(size), "sha256": sha, "data_files": data_files}


def save_index(index: "faiss.Index", out_dir: str, *, ids: pa.Table, manifest: dict[str, Any]) -> IndexManifest:
    """Write ``index.faiss``, ``ids.parquet`` and, last, ``manifest.json`` under ``out_dir``.

    The manifest is ``manifest`` (keys of :class:`~pipeline.core.schema.IndexManifest`) plus the fields
    :func:`write_index_files` computes, which override given ones except a given ``factory``.
    An old ``manifest.json`` is removed first, so a half-rewritten index never looks complete.
    """
    zio.remove(zio.join(out_dir, "manifest.json"))
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


def _read_flags(faiss, manifest: IndexManifest, mmap: bool) -> int:
    if manifest.data_files.get(IVFDATA_FILE) is not None:
        return faiss.IO_FLAG_ONDISK_SAME_DIR  # inverted lists already mmapped from index.ivfdata
    if not mmap:
        return 0
    # IVF: the inverted lists are mapped; flat codes (Flat, HNSW storage): mapped in place
    is_ivf = "IVF" in manifest.factory
    return (faiss.IO_FLAG_MMAP if is_ivf else faiss.IO_FLAG_MMAP_IFC) | faiss.IO_FLAG_READ_ONLY


class IdTable(zio.LazyParquet):
    """``ids.parquet`` read lazily: only the row groups holding the requested faiss ids are decoded
    (a few kept in an LRU cache), so a search process does not hold every uri of a large index.
    Row ``i`` is faiss id ``i`` (as :func:`write_index_files` checks)."""

    def __init__(self, out_dir: str, cache_groups: int = 64) -> None:
        uri = zio.join(out_dir, "ids.parquet")
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
    uri = zio.join(out_dir, "ids.parquet")
    if zio.is_local(uri):
        import pyarrow.parquet as pq

        table = pq.read_table(zio.filesystem(uri)[1], memory_map=True)
    else:
        table = zio.read_parquet(uri)
    check_schema(table.schema, INDEX_IDS_SCHEMA, uri)
    return table


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
    faiss = _faiss()
    manifest = read_manifest(out_dir, IndexManifest)
    cache = None
    if not zio.is_local(out_dir):
        import tempfile

        cache = os.path.join(tempfile.gettempdir(), "zsl-cache", manifest.sha256[:32])
        for name in manifest.data_files:
            zio.local_path(zio.join(out_dir, name), cache)
    path = zio.local_path(zio.join(out_dir, INDEX_FILE), cache)
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
    try:
        index = faiss.read_index(path, _read_flags(faiss, manifest, mmap))
    except RuntimeError as exc:
        if not mmap:
            raise ValueError(f"{out_dir}/{INDEX_FILE}: cannot read ({exc})") from None
        LOG.debug("%s: cannot be memory-mapped (%s); reading it", path, exc)
        try:
            index = faiss.read_index(path)
        except RuntimeError as exc2:
            raise ValueError(f"{out_dir}/{INDEX_FILE}: cannot read ({exc2})") from None
    ids = IdTable(out_dir) if lazy_ids else read_ids(out_dir)
    if not index.ntotal == ids.num_rows == manifest.ntotal:
        raise ValueError(f"{out_dir}: index has {index.ntotal} vectors, ids.parquet "
                         f"{ids.num_rows} rows, manifest ntotal {manifest.ntotal}")
    if expected_dim is not None and expected_dim != index.d:
        raise ValueError(f"{out_dir}: index dim is {index.d}, expected {expected_dim}")
    for key, want in (expected or {}).items():
        found = getattr(manifest, key, "<missing>")
        if found != want:
            raise ValueError(f"{out_dir}: manifest {key!r} is {found!r}, expected {want!r}")
    if manifest.search_params:
        set_search_params(index, manifest.search_params)
    elif manifest.nprobe is not None:
        _set_nprobe(index, manifest.nprobe)
    return index, ids, manifest


def search(index: "faiss.Index", queries: np.ndarray, k: int, *,
           nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product: FAISS's raw ``(scores float32, ids int64)``, shape (nq, k).

    ``k`` is clamped to ``index.ntotal``. Where fewer than ``k`` hits are found (IVF with a small
    nprobe) FAISS pads ids with -1 and scores with -inf; trimming them is the caller's choice.
    ``nprobe`` (IVF only; ignored otherwise) applies to this call and is then restored, so do
    not share one index between threads that pass different nprobe. A 1-D query is one row.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = _as_matrix(queries, index.d, "queries")
    k = min(int(k), int(index.ntotal))
    if k == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    old = _set_nprobe(index, nprobe) if nprobe is not None else None
    try:
        scores, ids = index.search(q, k)
    finally:
        if old is not None:
            _set_nprobe(index, old)
    return scores, ids


def brute_force_search(vectors: np.ndarray, queries: np.ndarray, k: int, *,
                       block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product with numpy: ``(scores float32, ids int64)``, best first.

    Ties go to the smaller id. Holds ``block * len(vectors)`` scores at a time; sorts them fully.

    >>> v = np.eye(3, dtype=np.float32)
    >>> brute_force_search(v, np.array([[0.0, 0.6, 0.8]]), 2)[1]
    array([[2, 1]])
    """
    v = np.asarray(vectors, dtype=np.float32)
    q = _as_matrix(queries, v.shape[1], "queries")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), len(v))
    out_s = np.empty((len(q), k), np.float32)
    out_i = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), block):
        sim = q[s : s + block] @ v.T
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        out_i[s : s + block] = order
        out_s[s : s + block] = np.take_along_axis(sim, order, axis=1)
    return out_s, out_i


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of the exact ids (ignoring -1), over all rows, found in the same approximate row.

    >>> recall_at_k(np.array([[1, 2, -1]]), np.array([[1, 3, 2]]))
    0.6666666666666666
    """
    a, e = np.asarray(approx_ids), np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or len(a) != len(e):
        raise ValueError(f"need two 2-D id arrays with the same rows, got {a.shape} and {e.shape}")
    hits = total = 0
    for ra, re_ in zip(a, e):
        want = set(re_[re_ >= 0].tolist())
        hits += len(want & set(ra[ra >= 0].tolist()))
        total += len(want)
    if total == 0:
        raise ValueError("exact_ids holds no valid ids (all -1 or empty)")
    return hits / total
