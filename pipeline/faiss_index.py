"""FAISS indexes of L2-normalised float32 embeddings, searched by inner product (cosine).

Choose an index under a memory budget (as criteo/autofaiss does), build it (on GPU when there
is one), save it atomically beside its id table and manifest, load it back with checks, search it.

An index directory holds ``index.faiss``, ``ids.parquet`` (``INDEX_IDS_SCHEMA``) and
``manifest.json``; the manifest is written last, so its presence means the index is complete.
faiss is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow as pa

from pipeline import io as zio
from pipeline.schema import INDEX_IDS_SCHEMA, IndexManifest, check_schema, read_manifest, write_manifest

if TYPE_CHECKING:  # pragma: no cover
    import faiss

LOG = logging.getLogger(__name__)

__all__ = ["choose_index", "estimate_memory", "build_index", "write_index_files", "save_index",
           "load_index", "search", "brute_force_search", "recall_at_k"]

_FLAT_MAX_N = 20_000
_HNSW_MAX_N = 1_000_000
_HNSW_M = 32
_ADD_BATCH = 65_536
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
    ``HNSW{M}[,Flat]``, ``IVF{nlist},`` + ``Flat``/``PQ{m}[x{bits}]``/``SQ8``/``SQfp16``,
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
    ivf = re.fullmatch(r"IVF(\d+)", parts[0]) if parts else None
    hnsw = re.fullmatch(r"HNSW(\d+)", parts[0]) if parts else None
    if ivf or hnsw:
        parts = parts[1:] or (["Flat"] if hnsw else [])
    if ivf:
        total += int(ivf.group(1)) * d * 4 + n * 8
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


def choose_index(n: int, dim: int, *, max_memory_bytes: int) -> str:
    """Pick a FAISS ``index_factory`` string for ``n`` vectors of ``dim`` within a memory budget.

    The first whose :func:`estimate_memory` fits wins: exact ``Flat`` (``n <= 20_000``),
    ``HNSW32,Flat`` (``n <= 1_000_000``), ``IVF{nlist},Flat``, then ``IVF{nlist},PQ{m}x8`` with
    ``m`` the largest divisor of ``dim`` that fits (needs ``n >= 256``). ``nlist`` is ~``4*sqrt(n)``
    as a power of two in [16, 65536], at most ``n // 39`` (>= 39 training points per centroid).
    Raises ``ValueError`` saying how much memory is needed when nothing fits.

    >>> from pipeline.config import parse_memory
    >>> choose_index(10_000, 512, max_memory_bytes=parse_memory("1G"))
    'Flat'
    >>> choose_index(500_000, 512, max_memory_bytes=parse_memory("4G"))
    'HNSW32,Flat'
    >>> choose_index(5_000_000, 512, max_memory_bytes=parse_memory("16G"))
    'IVF8192,Flat'
    >>> choose_index(100_000_000, 768, max_memory_bytes=parse_memory("16G"))
    'IVF32768,PQ128x8'
    >>> choose_index(1_000_000_000, 768, max_memory_bytes=parse_memory("4G"))
    Traceback (most recent call last):
    ...
    ValueError: no index of 1000000000 vectors of dim 768 fits in 4294967296 bytes: needs at least 9202113024 bytes (IVF65536,PQ1x8); raise max_memory_bytes
    """
    if n <= 0 or dim <= 0 or max_memory_bytes <= 0:
        raise ValueError(f"need n, dim, max_memory_bytes > 0, got n={n}, dim={dim}, "
                         f"max_memory_bytes={max_memory_bytes}")
    nlist = _nlist(n)
    candidates = (["Flat"] if n <= _FLAT_MAX_N else []) + (
        [f"HNSW{_HNSW_M},Flat"] if n <= _HNSW_MAX_N else []) + [f"IVF{nlist},Flat"]
    for c in candidates:
        if estimate_memory(c, n, dim) <= max_memory_bytes:
            return c
    if n < 256:  # too few points to train PQ: exact search is the smallest usable index
        smallest = "Flat"
    else:
        for m in sorted((m for m in range(1, dim + 1) if dim % m == 0), reverse=True):
            factory = f"IVF{nlist},PQ{m}x8"
            if estimate_memory(factory, n, dim) <= max_memory_bytes:
                return factory
        smallest = f"IVF{nlist},PQ1x8"
    need = estimate_memory(smallest, n, dim)
    raise ValueError(f"no index of {n} vectors of dim {dim} fits in {max_memory_bytes} bytes: "
                     f"needs at least {need} bytes ({smallest}); raise max_memory_bytes")


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


def _train_sample(source: Iterable, dim: int, n_total: int | None, size: int, seed: int):
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


def build_index(vectors: np.ndarray | Iterable[np.ndarray], *, dim: int, factory: str,
                n_total: int | None = None, train_sample: int = 100_000,
                use_gpu: bool | None = None, seed: int = 0,
                progress: bool = False) -> "faiss.Index":
    """Build an inner-product index from one array or an iterable of ``(rows, dim)`` batches.

    Parameters
    ----------
    vectors
        L2-normalised embeddings: one array, or batches so that millions need not be held twice.
        A re-iterable (list, object whose ``__iter__`` starts afresh) is read once more to draw a
        uniform training sample (twice more without ``n_total``), and trains exactly as the
        concatenated array would; a one-shot iterator trains on its first ``train_sample`` rows.
    dim, factory
        Vector dimension and FAISS ``index_factory`` string (see :func:`choose_index`).
    n_total
        Number of rows, if known (spares the counting pass; sizes the progress bar).
    train_sample
        Rows drawn (seeded, without replacement) to train indexes that need training.
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
    if train_sample <= 0:
        raise ValueError(f"train_sample must be positive, got {train_sample}")
    source = [vectors] if isinstance(vectors, np.ndarray) else vectors
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"bad index factory {factory!r} for dim {dim}: {exc}") from None
    _no_polysemous(faiss, index)
    gpus = faiss.get_num_gpus() if use_gpu is not False else 0
    if use_gpu and not gpus:
        LOG.warning("use_gpu=True but faiss sees no GPU; building %s on CPU", factory)
    if gpus:
        try:
            index = faiss.index_cpu_to_all_gpus(index)
        except (RuntimeError, AttributeError) as exc:
            LOG.warning("%s has no GPU version (%s); building on CPU", factory, exc)
            gpus = 0
    batches = iter(source)
    if not index.is_trained:
        sample, batches = _train_sample(source, dim, n_total, train_sample, seed)
        if sample is None:
            raise ValueError(f"cannot train {factory}: no vectors given")
        LOG.info("training %s on %d vectors of dim %d", factory, len(sample), dim)
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise ValueError(f"cannot train {factory} on {len(sample)} vectors: {exc}") from None
    from tqdm.auto import tqdm
    with tqdm(total=n_total, unit="vec", desc=f"index {factory}", disable=not progress) as bar:
        for b in batches:
            a = _as_matrix(b, dim, "vectors")
            for i in range(0, len(a), _ADD_BATCH):
                index.add(a[i : i + _ADD_BATCH])
            bar.update(len(a))
    if n_total is not None and index.ntotal != n_total:
        LOG.warning("n_total=%d but %d vectors were added", n_total, index.ntotal)
    return faiss.index_gpu_to_cpu(index) if gpus else index


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


def _factory_of(index: "faiss.Index") -> str:
    try:
        from faiss.contrib.factory_tools import reverse_index_factory
        return reverse_index_factory(index)
    except Exception:  # noqa: BLE001 - best effort: an unknown wrapper is not an error
        return "unknown"


def write_index_files(index: "faiss.Index", out_dir: str, *, ids: pa.Table) -> dict[str, Any]:
    """Write ``index.faiss`` and ``ids.parquet`` atomically; return the manifest fields they determine.

    ``ids`` (:data:`INDEX_IDS_SCHEMA`) must map each faiss id ``0..ntotal-1`` once. The fields are
    ``ntotal``, ``dim``, ``factory`` (read back from the index), ``index_bytes`` and ``sha256``.
    """
    faiss = _faiss()
    check_schema(ids.schema, INDEX_IDS_SCHEMA, f"{out_dir}: ids")
    fids = np.sort(ids.column("faiss_id").to_numpy())
    if len(fids) != index.ntotal or not np.array_equal(fids, np.arange(index.ntotal)):
        raise ValueError(f"{out_dir}: ids must hold faiss_id 0..{index.ntotal - 1} once each "
                         f"(index has {index.ntotal} vectors, ids has {ids.num_rows} rows)")
    data = faiss.serialize_index(index).tobytes()
    zio.write_bytes_atomic(zio.join(out_dir, "index.faiss"), data)
    zio.write_parquet_atomic(zio.join(out_dir, "ids.parquet"), ids.select(INDEX_IDS_SCHEMA.names).cast(INDEX_IDS_SCHEMA))
    return {"ntotal": int(index.ntotal), "dim": int(index.d), "factory": _factory_of(index),
            "index_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_index(index: "faiss.Index", out_dir: str, *, ids: pa.Table, manifest: dict[str, Any]) -> IndexManifest:
    """Write ``index.faiss``, ``ids.parquet`` and, last, ``manifest.json`` under ``out_dir``.

    The manifest is ``manifest`` (keys of :class:`~pipeline.schema.IndexManifest`) plus the fields
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


def load_index(out_dir: str, *, expected_dim: int | None = None,
               expected: dict | None = None) -> tuple["faiss.Index", pa.Table, IndexManifest]:
    """Load and check an index written by :func:`save_index`: ``(index, ids, manifest)``.

    Raises ``FileNotFoundError`` without ``manifest.json``; ``ValueError`` when the sha256 of
    ``index.faiss`` differs from the manifest's, when ntotal, ids and manifest disagree, when the
    dimension is not ``expected_dim``, or when a field of ``expected`` (e.g. ``feature_model``)
    differs from the manifest's. Sets the IVF ``nprobe`` from the manifest's ``nprobe``, if any.
    """
    faiss = _faiss()
    manifest = read_manifest(out_dir, IndexManifest)
    data = zio.read_bytes(zio.join(out_dir, "index.faiss"))
    sha = hashlib.sha256(data).hexdigest()
    if sha != manifest.sha256:
        raise ValueError(f"{out_dir}/index.faiss: sha256 {sha} does not match the manifest's "
                         f"{manifest.sha256}; the file is corrupted or was replaced")
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise ValueError(f"{out_dir}/index.faiss: cannot deserialize ({exc})") from None
    ids = zio.read_parquet(zio.join(out_dir, "ids.parquet"))
    check_schema(ids.schema, INDEX_IDS_SCHEMA, f"{out_dir}/ids.parquet")
    if not index.ntotal == ids.num_rows == manifest.ntotal:
        raise ValueError(f"{out_dir}: index has {index.ntotal} vectors, ids.parquet "
                         f"{ids.num_rows} rows, manifest ntotal {manifest.ntotal}")
    if expected_dim is not None and expected_dim != index.d:
        raise ValueError(f"{out_dir}: index dim is {index.d}, expected {expected_dim}")
    for key, want in (expected or {}).items():
        found = getattr(manifest, key, "<missing>")
        if found != want:
            raise ValueError(f"{out_dir}: manifest {key!r} is {found!r}, expected {want!r}")
    if manifest.nprobe is not None:
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
