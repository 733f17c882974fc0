"""An IVF index built as partitions: one quantiser trained once, each partition filled apart (on a
Ray worker, or here), their inverted lists merged on disk (:func:`~pipeline.index.build.merge_ivf_parts`)
so the lists need not fit in one process's memory.

:func:`train_quantiser` trains and writes ``parts/trained.faiss``; :func:`partition_specs` splits
the cached vector files into contiguous runs (faiss ids continuing across them); :func:`part_worker`
makes the worker that turns one spec into ``parts/part-NNNNN.faiss`` (atomic, named by its number,
so a retry overwrites).
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import numpy as np

from pipeline.core import fs as zio
from pipeline.index.build import add_vectors, train_index, training_sample
from pipeline.index.choose import training_rows
from pipeline.index.common import import_faiss
from pipeline.index.projection import CachedVectors

LOG = logging.getLogger(__name__)

__all__ = ["train_quantiser", "partition_specs", "build_part", "part_worker"]


def train_quantiser(vec_files: list[str], trained_file: str, *, dim: int, factory: str, n_total: int,
                    use_gpu: bool | None = None):
    """The empty index of ``factory`` trained on a seeded uniform sample of
    :func:`~pipeline.index.choose.training_rows` rows of the cached vectors, also written to
    ``trained_file`` (a local path) for the partition workers."""
    faiss = import_faiss()
    size = training_rows(factory, n_total)
    sample, _ = training_sample(CachedVectors(vec_files), dim=dim, n_total=n_total, size=size, seed=0)
    trained = train_index(sample, dim=dim, factory=factory, use_gpu=use_gpu)
    del sample
    with zio.atomic_local_file(trained_file) as tmp:
        faiss.write_index(trained, tmp)
    return trained


def partition_specs(vec_files: list[str], rows: list[int], *, n_parts: int, trained_file: str,
                    parts_dir: str) -> list[str]:
    """One JSON spec per partition (the work item of :func:`part_worker`): ``n_parts`` contiguous
    runs of the vector files (``rows[i]`` rows in ``vec_files[i]``), ids continuing across them."""
    bounds = np.linspace(0, len(vec_files), n_parts + 1).astype(int)
    specs, start = [], 0
    for p in range(n_parts):
        files = vec_files[bounds[p] : bounds[p + 1]]
        specs.append(json.dumps({"trained_file": trained_file, "part_file": zio.join(parts_dir, f"part-{p:05d}.faiss"),
                                 "vec_files": files, "start_id": start}))
        start += sum(rows[bounds[p] : bounds[p + 1]])
    return specs


def build_part(trained_file: str, part_file: str, vec_files: list[str], start_id: int) -> dict:
    """One IVF partition: the trained (empty) index + these vectors with ids from ``start_id``."""
    faiss = import_faiss()
    index = faiss.read_index(zio.local_path(trained_file))
    n = add_vectors(index, CachedVectors(vec_files), start_id=start_id)
    with zio.atomic_local_file(part_file) as tmp:
        faiss.write_index(index, tmp)
    return {"part": part_file, "rows": n}


def part_worker() -> Callable[[str], dict]:
    """Picklable factory of the partition worker: a JSON spec of :func:`partition_specs` -> its part."""
    return lambda spec: build_part(**json.loads(spec))
