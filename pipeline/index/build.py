"""Building FAISS indexes of L2-normalised float32 embeddings, searched by inner product (cosine).

:func:`build_index` makes, trains (on a seeded uniform sample across all batches) and fills an
index in one call, on GPU when there is one; :func:`new_index`, :func:`train_index` and
:func:`add_vectors` are its steps, used apart to build IVF partitions from one trained quantiser,
which :func:`merge_ivf_parts` merges into inverted lists on disk. faiss is imported lazily.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Iterable

import numpy as np

from pipeline.core import fs as zio
from pipeline.index.choose import training_rows
from pipeline.index.common import as_matrix, factory_of, import_faiss
from pipeline.index.knn import set_search_params
from pipeline.index.store import IVFDATA_FILE

if TYPE_CHECKING:  # pragma: no cover
    import faiss

LOG = logging.getLogger(__name__)

__all__ = ["sample_rows", "training_sample", "new_index", "train_index", "add_vectors", "build_index",
           "merge_ivf_parts", "check_search_params"]

_ADD_BATCH = 65_536


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


def sample_rows(batches: Iterable, n_total: int, size: int, *, seed: int,
                dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, vectors)``: ``size`` row ids drawn uniformly without replacement (seeded; all rows
    when ``size >= n_total``) and their vectors, in row order, from one pass over the batches.

    Each batch holding a drawn row is checked (``dim``: its width, else the first batch's; finite
    float32). ``ValueError`` when the batches hold other than ``n_total`` rows.

    >>> v = np.arange(12, dtype=np.float32).reshape(6, 2)
    >>> sample_rows([v[:4], v[4:]], 6, 6, seed=0)[0]
    array([0, 1, 2, 3, 4, 5])
    """
    rng = np.random.default_rng(seed)
    rows = np.arange(n_total) if size >= n_total else np.sort(rng.choice(n_total, size, replace=False))
    parts, start = [], 0
    for b in batches:
        lo, hi = np.searchsorted(rows, [start, start + len(b)])
        if hi > lo:
            dim = dim if dim is not None else np.shape(b)[1]
            parts.append(as_matrix(b, dim, "vectors")[rows[lo:hi] - start])
        start += len(b)
    if start != n_total:
        raise ValueError(f"expected {n_total} vectors, the batches hold {start}")
    return rows, (np.concatenate(parts) if parts else np.zeros((0, dim or 0), np.float32))


def training_sample(source: Iterable, *, dim: int, n_total: int | None, size: int,
                    seed: int = 0) -> tuple[np.ndarray | None, Iterable]:
    """``(sample, batches)``: the training sample of ``size`` rows and the batches still to add (all).

    A re-iterable ``source`` gives a seeded uniform sample (:func:`sample_rows`; one more pass to
    count without ``n_total``), a one-shot iterator its head; ``sample`` is None without rows.
    """
    batches = iter(source)
    if batches is not source:
        n = n_total if n_total is not None else sum(len(b) for b in source)
        sample = sample_rows(source, n, size, seed=seed, dim=dim)[1]
        return (sample if len(sample) else None), iter(source)
    head, parts, got = [], [], 0
    for b in batches:
        head.append(b)
        parts.append(as_matrix(b, dim, "vectors")[: size - got])
        got += len(parts[-1])
        if got >= size:
            break
    return (np.concatenate(parts) if parts else None), itertools.chain(head, batches)


def new_index(dim: int, factory: str) -> "faiss.Index":
    """An empty inner-product index made by ``index_factory`` (ValueError naming a bad factory)."""
    faiss = import_faiss()
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"bad index factory {factory!r} for dim {dim}: {exc}") from None
    _no_polysemous(faiss, index)
    return index


def _to_gpu(index, use_gpu: bool | None, what: str):
    """``(index, on_gpu)``: the index on every GPU faiss sees when asked (None: if any)."""
    faiss = import_faiss()
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
    faiss = import_faiss()
    index = new_index(dim, factory)
    if index.is_trained:
        return index
    sample = as_matrix(sample, dim, "vectors")
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
            a = as_matrix(b, index.d, "vectors")
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
        Vector dimension and FAISS ``index_factory`` string (see
        :func:`~pipeline.index.choose.choose_index`).
    n_total
        Number of rows, if known (spares the counting pass; sizes the progress bar and the sample).
    train_sample
        Rows drawn (seeded, without replacement) to train indexes that need training; default
        :func:`~pipeline.index.choose.training_rows` (needs ``n_total``; else 100,000).
    use_gpu
        None/True: all GPUs faiss sees, if any (else, or for index types without GPU support, CPU
        with a warning when True was asked). False: CPU.
    seed, progress
        Seed of the training sample; show a tqdm bar while adding.

    Returns
    -------
    faiss.Index
        A CPU index (ready for :func:`~pipeline.index.store.save_index`) with ids ``0..ntotal-1``
        in input order.
    """
    faiss = import_faiss()
    if train_sample is not None and train_sample <= 0:
        raise ValueError(f"train_sample must be positive, got {train_sample}")
    source = [vectors] if isinstance(vectors, np.ndarray) else vectors
    if n_total is None and isinstance(vectors, np.ndarray):
        n_total = len(vectors)
    index = new_index(dim, factory)
    batches = iter(source)
    if not index.is_trained:
        size = train_sample or (training_rows(factory, n_total) if n_total else 100_000)
        sample, batches = training_sample(source, dim=dim, n_total=n_total, size=size, seed=seed)
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
    exceed this machine's RAM. Returns the merged index (write it with
    :func:`~pipeline.index.store.write_index_files`). ``out_dir`` must be a local directory.
    """
    faiss = import_faiss()
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.clone_index(trained)
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        raise ValueError(f"only IVF indexes can be merged from partitions, not {factory_of(trained)}") from None
    target = zio.join(out_dir, IVFDATA_FILE)
    if not zio.is_local(target):
        raise ValueError(f"{out_dir}: partitions are merged on a local disk only")
    path = zio.filesystem(target)[1]
    zio.remove(target)
    merge_ondisk(index, [zio.local_path(f) for f in part_files], path)
    return index


def check_search_params(dim: int, factory: str, params: str | None) -> None:
    """``ValueError`` (from :func:`~pipeline.index.knn.set_search_params`) when ``params`` do not
    apply to an index of ``factory`` (``nprobe`` on HNSW): checked on an empty index, before any work."""
    if params:
        set_search_params(new_index(dim, factory), params)
