"""Per-item jobs, here or on a Ray cluster: :func:`map_shards` runs a per-item worker (label a feature
shard, project one, build an IVF partition) over every item, in this process with a progress bar,
or, given a cluster address, as a Ray Data job on an actor pool (:func:`run_shard_jobs`). Each
worker reads its input straight from storage and writes its output atomically under its
deterministic name, so the guarantees of the local path hold on a cluster (the output must be on
storage every node sees).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np

from pipeline.cluster.session import init_ray

LOG = logging.getLogger(__name__)

__all__ = ["map_shards", "run_shard_jobs"]

Worker = Callable[[str], dict]


class _ShardWorker:
    """Ray actor: builds its worker once (model loads etc.), then runs it on one item per call."""

    def __init__(self, factory: Callable[[], Worker], threads: int) -> None:
        try:
            import torch

            torch.set_num_threads(max(1, threads))
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        try:
            import faiss

            faiss.omp_set_num_threads(max(1, threads))
        except ImportError:
            pass
        self.fn = factory()

    def __call__(self, batch: dict) -> dict:
        import json

        return {"result": np.array([json.dumps(self.fn(str(item))) for item in batch["item"]], dtype=object)}


def map_shards(items: list[str], factory: Callable[[], Worker], *, address: str | None, what: str,
               num_workers: int | None = None, local: Callable[[], Worker] | None = None,
               progress: bool = False, on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """``factory()(item)`` for every item: the results (JSON-able dicts), in item order here, in no
    order on a cluster.

    Without ``address``, in this process: one worker made by ``local`` (default ``factory``; e.g.
    one that reuses a model already loaded here) runs the items one by one behind a tqdm bar
    (``progress``) named ``what``. With ``address``, on that Ray cluster: :func:`run_shard_jobs`
    (``factory`` must then be picklable; ``num_workers`` sizes the actor pool). No items: no worker.
    ``on_result(result)``: called for each result as its item is done here, after the job on a cluster
    (e.g. to record progress a rerun resumes from).
    """
    if not items:
        return []
    if address:
        results = run_shard_jobs(items, factory, address=address, num_workers=num_workers, what=what)
        for r in results if on_result is not None else ():
            on_result(r)
        return results
    from tqdm.auto import tqdm

    worker = (local or factory)()
    results = []
    for item in tqdm(items, desc=what, unit="shard", disable=not progress):
        results.append(worker(item))
        if on_result is not None:
            on_result(results[-1])
    return results


def run_shard_jobs(items: list[str], factory: Callable[[], Worker], *, address: str | None,
                   num_workers: int | None = None, what: str = "shards") -> list[dict]:
    """Run ``factory()(item)`` for every item on a Ray cluster (an actor pool, one item per call).

    ``factory`` must be picklable (a module-level function or ``functools.partial`` of one) and
    return a function of one item giving a JSON-able dict; those dicts are returned (in no order).
    The pool keeps a CPU free for Ray Data's own tasks: ``num_workers`` defaults to the cluster's
    CPUs minus one (at least one), each holding a fraction of a CPU.
    """
    import json

    import ray
    from ray.data import ActorPoolStrategy, DataContext

    if not items:
        return []
    init_ray(address)
    cpus = ray.cluster_resources().get("CPU", 1)
    n = max(1, min(len(items), num_workers or int(max(1, cpus - 1))))
    per = max(0.1, math.floor(max(0.5, cpus - 1) / n * 1000) / 1000)
    LOG.info("running %d %s on Ray: %d workers x %.3g CPU", len(items), what, n, per)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = ray.data.from_items([{"item": i} for i in items], override_num_blocks=len(items))
    ds = ds.map_batches(_ShardWorker, batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=n),
                        num_cpus=per, fn_constructor_kwargs=dict(factory=factory, threads=max(1, int(cpus) // n)))
    return [json.loads(str(r)) for b in ds.iter_batches(batch_size=None, batch_format="numpy")
            for r in b["result"]]
