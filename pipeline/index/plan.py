"""What ``zsl index`` does to an output directory, decided before any work: :func:`plan_index`.

Given the finished index there (its manifest, if any), the feature shards and their sizes, and the
settings, the plan says which of four things happens, and why:

* ``nothing``: the index holds these shards (in any order) and was tuned with these settings;
* ``retune``: the same shards, other tuning settings: the files stay, the search parameters are
  chosen again;
* ``add``: the features hold shards the index does not (new ones, or ones an earlier run left out
  as unreadable) and the index type still fits the budget: only their vectors are added, faiss ids
  continuing;
* ``build``: no finished index, or it cannot be kept (indexed shards gone, unreadable now or
  resized, an on-disk IVF, the budget exceeded, or an index of another model or settings replaced
  with ``--overwrite``): a new one of the chosen type, as IVF partitions merged on disk when asked.
  A rebuild's reason always says which.

Shards that cannot be read (``failed``) are not planned: the index is made of the others, and a
later run, finding them readable, adds them like new shards.

Pure: no faiss, no file access; the tests run it on hand-made manifests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from pipeline.core import fs as zio
from pipeline.core.config import IndexConfig
from pipeline.core.units import parse_memory
from pipeline.core.manifests import IndexManifest, IndexTuning
from pipeline.index.choose import choose_index, estimate_memory, is_ivf, training_rows

LOG = logging.getLogger(__name__)

__all__ = ["Action", "IndexPlan", "plan_index", "fixed_params"]

Action = Literal["build", "add", "retune", "nothing"]


@dataclass(frozen=True)
class IndexPlan:
    """What one ``zsl index`` run does, and why (see the module docstring)."""

    action: Action
    #: the ``index_factory`` string: chosen under the budget (build), else the finished index's
    factory: str
    #: every shard name in faiss-id order: the finished index's first, then the added ones
    shards: tuple[str, ...]
    #: the shards whose vectors go in this run: all (build), the new ones (add), none otherwise
    new_shards: tuple[str, ...]
    n_total: int
    #: one sentence for the log: what is done and why
    reason: str
    #: a finished index is replaced (its features changed): said as a warning
    rebuild: bool = False
    #: IVF partitions built apart and merged on disk (0: one index built here)
    partitions: int = 0
    #: rows the index was trained on (None: it needs no training)
    train_rows: int | None = None
    #: :func:`~pipeline.index.choose.estimate_memory` of the index (None when nothing is done)
    estimated_bytes: int | None = None
    #: fixed search parameters (``--search-params``/``--nprobe``): measured, not tuned
    search_params: str | None = None

    @property
    def build(self) -> str:
        """The manifest's ``build``: ``build``, ``partitions``, ``add`` or ``retune``."""
        return "partitions" if self.partitions else self.action

    @property
    def last_action(self) -> str:
        """The manifest's ``last_action``: the action, ``rebuild`` for a build replacing an index."""
        return "rebuild" if self.rebuild else self.action


def fixed_params(cfg: IndexConfig) -> str | None:
    """The search parameters the settings fix (``search_params``, else ``nprobe=N``), if any."""
    return cfg.search_params or (f"nprobe={cfg.nprobe}" if cfg.nprobe else None)


def _tuning_settings(cfg: IndexConfig, n_total: int) -> dict:
    """What the search parameters were chosen by: changing it re-tunes, never rebuilds."""
    return {"target_recall": cfg.target_recall, "k": min(cfg.tune_k, 100, n_total), "max_query_ms": cfg.max_query_ms,
            "fixed": fixed_params(cfg), "n_queries": min(cfg.tune_queries, n_total)}


def _tuned_by(t: IndexTuning | None) -> dict | None:
    if t is None:
        return None
    return {"target_recall": t.target_recall, "k": t.k, "max_query_ms": t.max_query_ms,
            "fixed": t.params if not t.tried else None, "n_queries": t.n_queries}


def _names(names, limit: int = 3) -> str:
    """``a, b, c and 2 more``."""
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _stale(done: IndexManifest, rows: dict[str, int], dim: int, budget: int, failed: dict[str, str]) -> str | None:
    """Why the finished index cannot be added to (None: it can)."""
    missing = [n for n in done.shards if n not in rows]
    if missing:
        bad = [n for n in missing if n in failed]
        gone = [n for n in missing if n not in failed]
        return "; ".join(
            ([f"{len(gone)} indexed shard(s) are gone from the features ({_names(gone)})"] if gone else []) +
            ([f"{len(bad)} indexed shard(s) cannot be read now ({_names(bad)})"] if bad else []))
    if sum(rows[n] for n in done.shards) != done.ntotal:
        return "indexed shards changed size"
    if done.data_files:
        return "the features gained shards, and an on-disk merged IVF index is rebuilt, not appended to"
    if estimate_memory(done.factory, sum(rows.values()), dim) > budget:
        return f"{done.factory} can no longer hold {sum(rows.values())} vectors within {budget} bytes"
    return None


def _skipping(failed: dict[str, str]) -> str:
    """The end of a reason when shards are left out."""
    return f"; leaving out {len(failed)} unreadable shard(s) ({_names(failed)})" if failed else ""


def _keep(cfg: IndexConfig, done: IndexManifest, rows: dict[str, int], dim: int, failed: dict[str, str]) -> IndexPlan:
    """The plan for a finished index that stays: nothing, retune or add. Its shards keep their faiss-id
    order whatever order the features list them in (an add puts the new ones after them)."""
    n_total, names = sum(rows.values()), tuple(rows)
    common = dict(factory=done.factory, n_total=n_total, search_params=fixed_params(cfg))
    new = tuple(n for n in names if n not in set(done.shards))
    if not new and (_tuned_by(done.tuning) == _tuning_settings(cfg, n_total) or n_total < 2):
        return IndexPlan("nothing", shards=tuple(done.shards), new_shards=(), **common,
                         reason="index of these features with this model is complete; nothing to do" +
                         _skipping(failed))
    est = estimate_memory(done.factory, n_total, dim)
    if new:
        retried = [n for n in new if n in done.failed_shards]
        why = (f"the features gained {len(new)} shard(s) since the index was built" if not retried else
               f"the features hold {len(new)} shard(s) not in the index yet ({len(retried)} left out as unreadable "
               "by an earlier run)")
        return IndexPlan("add", shards=(*done.shards, *new), new_shards=new, **common, train_rows=done.train_rows,
                         estimated_bytes=est, reason=f"{why}; adding their vectors" + _skipping(failed))
    return IndexPlan("retune", shards=tuple(done.shards), new_shards=(), **common, train_rows=done.train_rows,
                     estimated_bytes=est, reason="the tuning settings changed; re-tuning the search parameters "
                                                 "(the index is kept)" + _skipping(failed))


def _partitions(cfg: IndexConfig, factory: str, n_files: int) -> int:
    """How many IVF partitions to build apart (0: build one index here)."""
    if not (is_ivf(factory) and (cfg.address or cfg.partitions) and n_files > 1):
        return 0
    if not zio.is_local(cfg.output):
        raise ValueError(f"{cfg.output}: IVF partitions are merged into index.ivfdata on a local (or mounted) "
                         "disk; give a local --output or drop --address/--partitions")
    return min(n_files, cfg.partitions or cfg.num_workers or max(1, n_files // 2))


def plan_index(cfg: IndexConfig, *, done: IndexManifest | None, rows: dict[str, int], dim: int,
               failed: dict[str, str] | None = None, replaced: str | None = None) -> IndexPlan:
    """Decide what to do with ``cfg.output`` (see the module docstring).

    ``done``: the finished index's manifest there (None: none); ``rows``: readable feature shard
    name -> rows, in the feature directory's order; ``dim``: the search space's dimension;
    ``failed``: the shards left out as unreadable (name -> why), named in the reason;
    ``replaced``: why an index there was replaced before planning (``--overwrite`` of an index of
    another model or settings; ``done`` is then None). Raises ``ValueError`` when nothing fits the
    budget, or partitions would be merged on a remote output.
    """
    n_total, names, failed = sum(rows.values()), tuple(rows), dict(failed or {})
    budget = parse_memory(cfg.max_memory)
    why = _stale(done, rows, dim, budget, failed) if done is not None and set(done.shards) != set(names) else None
    if done is not None and why is None:
        return _keep(cfg, done, rows, dim, failed)
    factory = cfg.index_factory or choose_index(n_total, dim, max_memory_bytes=budget)
    if why:
        reason = f"the index there cannot be kept ({why}); rebuilding it"
    elif replaced:
        reason = f"the index there was made from {replaced} and is replaced (--overwrite); rebuilding it"
    else:
        reason = "no finished index here; building one"
    return IndexPlan("build", factory=factory, shards=names, new_shards=names, n_total=n_total,
                     reason=reason + _skipping(failed), rebuild=bool(why or replaced),
                     partitions=_partitions(cfg, factory, len(names)),
                     train_rows=training_rows(factory, n_total) or None,
                     estimated_bytes=estimate_memory(factory, n_total, dim), search_params=fixed_params(cfg))
