"""What every faiss-touching module of :mod:`pipeline.index` shares: the lazy faiss import (with the
install hint), the check that turns an input into a ``(rows, dim)`` float32 matrix, and the
factory string of a built index. Importing this module never imports faiss.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

LOG = logging.getLogger(__name__)

__all__ = ["import_faiss", "as_matrix", "factory_of"]

_NO_FAISS = "faiss is not installed: pip install 'zsl-pipeline[cpu]' (or [gpu] on CUDA machines)"


def import_faiss():
    """The ``faiss`` module; ``ImportError`` saying how to install it when it is missing."""
    try:
        import faiss
    except ImportError:
        raise ImportError(_NO_FAISS) from None
    return faiss


def as_matrix(x: Any, dim: int, what: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``(rows, dim)`` array (a 1-D ``queries`` is one row);
    ``ValueError`` naming ``what`` when it cannot be, or when a row holds NaN or infinity."""
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


def factory_of(index) -> str:
    """The ``index_factory`` string of a built index, read back from it (``"unknown"`` if faiss cannot)."""
    try:
        from faiss.contrib.factory_tools import reverse_index_factory
        return reverse_index_factory(index)
    except Exception:  # noqa: BLE001 - best effort: an unknown wrapper is not an error
        return "unknown"
