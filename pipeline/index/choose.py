"""Which FAISS index fits a memory budget, how much memory an index takes, how many rows train it.

As criteo/autofaiss does: exact ``Flat`` for small collections, an HNSW graph up to a million
vectors, IVF lists (with an HNSW coarse quantiser from 4096 lists on) beyond, and OPQ + PQ codes
when the vectors themselves no longer fit. Everything here is arithmetic on factory strings: this
module never imports faiss (nor numpy), so a plan can be made where faiss is not installed.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Iterable

LOG = logging.getLogger(__name__)

__all__ = ["choose_index", "estimate_memory", "training_rows", "is_ivf"]

_FLAT_MAX_N = 20_000
_HNSW_MAX_N = 1_000_000
_HNSW_M = 32
_IVF_HNSW_MIN_NLIST = 4096  # from here on an HNSW coarse quantiser (autofaiss's choice) beats a flat scan
_PQ_M = (512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
_OPQ_MIN_N = 100_000  # below this, OPQ's rotation costs more training time than it gains


def default_nlist(n: int) -> int:
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

    >>> from pipeline.core.units import parse_memory
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
    nlist = default_nlist(n)
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


def is_ivf(factory: str) -> bool:
    """True when ``factory`` makes an IVF index (also behind an ``OPQ`` rotation): one whose
    inverted lists can be built as partitions and merged.

    >>> is_ivf("IVF64,Flat"), is_ivf("OPQ16_64,IVF256,PQ16x8"), is_ivf("HNSW32,Flat")
    (True, True, False)
    """
    parts = factory.split(",")
    return parts[0].startswith("IVF") or (parts[0].startswith("OPQ") and len(parts) > 1 and parts[1].startswith("IVF"))
