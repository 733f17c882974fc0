"""Index stage: feature shards -> a FAISS index of the images in the model's text space, tuned.

A run reads as plan -> project -> build/add -> tune -> write. :func:`~pipeline.index.plan.plan_index`
decides, before any work, whether the finished index there is kept, re-tuned, added to or
(re)built, and which index type fits the memory budget. Every feature shard is then mapped through
the model's image projection (so any backbone is searchable by text) into a per-shard cache
``OUT/vectors/`` (:mod:`pipeline.index.projection`; a rerun after a kill projects only the shards
that are missing). The index is trained on a seeded uniform sample across all shards, filled shard
by shard (:mod:`pipeline.index.build`), and its search parameters are tuned to a recall target
against exact neighbours (:mod:`pipeline.index.tune`). ``ids.parquet`` is streamed shard by shard,
``index.faiss`` is written by faiss straight to disk, ``manifest.json`` last
(:mod:`pipeline.index.store`); the cache is then removed. The caption index beside it is brought
up to date too (:mod:`pipeline.index.captions`).

Runs under the resume protocol: the identity is the model (manifest and weights), the features
and the index settings; the tuning settings only re-tune a finished index.

One unreadable feature shard does not stop the run: a shard whose footer is bad is left out before
planning, one whose data fails while projecting (here or on a Ray worker) after it, and the plan is
made again without it. The index holds every other shard; the manifest names the ones left out and
why (``failed_shards``), and what the run did and why (``last_action``, ``last_reason``). A rerun
retries them: one readable again is added like a new shard. When no shard can be read the run
fails and nothing is changed.

With ``address`` (a Ray cluster) the projection runs on the cluster (workers read the feature
shards and write the cache files themselves); an IVF index is then built as partitions on the
workers, all from one quantiser trained here, and their inverted lists are merged on disk
(``index.ivfdata``; :mod:`pipeline.index.partitions`), so the lists need not fit in one process's memory.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

from pipeline.cluster.shard_jobs import map_shards
from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.core.config import IndexConfig
from pipeline.core.units import parse_memory
from pipeline.core.features import feature_shards, features_identity, open_features, split_feature_shards
from pipeline.core.resume import OutputDir, describe_diff
from pipeline.core.manifests import IndexManifest, IndexTuning
from pipeline.core.timing import timed
from pipeline.index.build import add_vectors, build_index, check_search_params, merge_ivf_parts
from pipeline.index.captions import update_caption_index
from pipeline.index.partitions import part_worker, partition_specs, train_quantiser
from pipeline.index.plan import IndexPlan, plan_index
from pipeline.index.projection import CachedVectors, Projector, cache_file, projector, unreadable_reason
from pipeline.index.store import CAPTIONS_INDEX, IDS_FILE, INDEX_FILE, IVFDATA_FILE, MODEL_COPY, copy_model, \
    load_index, write_ids, write_index_files
from pipeline.index.tune import tune_index
from pipeline.zsl.models import load_model
from pipeline.zsl.models.scoring import model_fingerprint

LOG = logging.getLogger(__name__)

__all__ = ["run_index"]

_OWNED = (INDEX_FILE, IVFDATA_FILE, IDS_FILE, "vectors", "parts", MODEL_COPY, CAPTIONS_INDEX)
_USE_GPU = {"auto": None, "yes": True, "no": False}


@dataclass(frozen=True)
class _Inputs:
    """What the index is made from: the features, the model, the search space, the run's identity."""

    fman: Any
    model: Any
    mman: Any
    files: dict[str, str]  # readable feature shard name -> file, in the feature directory's order
    rows: dict[str, int]
    #: feature shard name -> why it cannot be read (its footer): left out
    failed: dict[str, str]
    dim: int
    identity: dict


def _name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def _listing(failed: dict[str, str], limit: int = 3) -> str:
    """``shard-a (why); shard-b (why); and 2 more``."""
    items = [f"{n} ({why})" for n, why in list(failed.items())[:limit]]
    return "; ".join(items) + (f"; and {len(failed) - limit} more" if len(failed) > limit else "")


def _open_inputs(cfg: IndexConfig) -> _Inputs:
    fman = open_features(cfg.features)
    model, mman = load_model(cfg.model, feature_dim=fman.dim, feature_model=fman.model_id)
    if mman.semantics != "text":
        raise ValueError(f"{cfg.model}: model scores against '{mman.semantics}' semantics; text search needs "
                         "a model trained with --semantics text")
    shards = feature_shards(cfg.features)
    usable, bad = split_feature_shards(shards, fman.dim)
    failed = {_name(f): unreadable_reason(why) for f, why in bad.items()}
    if shards and not usable:
        raise ValueError(f"{cfg.features}: none of its {len(shards)} feature shard(s) can be read "
                         f"({_listing(failed)}); nothing was indexed or changed")
    for n, why in failed.items():
        LOG.warning("%s: feature shard %s cannot be read (%s); left out of the index, a later run retries it",
                    cfg.features, n, why)
    files = {_name(f): f for f in usable}
    rows = {n: zpq.parquet_num_rows(f) for n, f in files.items()}
    if sum(rows.values()) == 0:
        raise ValueError(f"{cfg.features}: no features to index" + (f" ({len(failed)} unreadable shard(s): "
                                                                      f"{_listing(failed)})" if failed else ""))
    dim = mman.search_dim or mman.semantic_dim
    # what the vectors and the index type are; the tuning settings only re-tune a finished index
    identity = {"model": model_fingerprint(cfg.model, mman), "features": features_identity(cfg.features, fman),
                "dim": dim, "index_factory": cfg.index_factory, "max_memory": cfg.max_memory, "nprobe": cfg.nprobe}
    return _Inputs(fman, model, mman, files, rows, failed, dim, identity)


#: what the identity's keys say when an index of other ones is replaced (``--overwrite``)
_IDENTITY_WORDS = {"model": "another model", "features": "other features", "dim": "another search space"}


def _replaced(cfg: IndexConfig, identity: dict) -> str | None:
    """What an index at ``cfg.output`` that ``--overwrite`` replaces was made from (None: none is
    replaced), e.g. ``another model``, ``other settings (max_memory: was '4G', now '1G')``."""
    if not cfg.overwrite:
        return None
    before = OutputDir.recorded_identity(cfg.output, job="index")
    now = zio.to_jsonable(identity)
    if before is None or before == now:
        return None
    keys = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    words = [_IDENTITY_WORDS[k] for k in keys if k in _IDENTITY_WORDS]
    rest = [k for k in keys if k not in _IDENTITY_WORDS]
    if rest:
        diff = describe_diff({k: before.get(k) for k in rest}, {k: now.get(k) for k in rest})
        words.append(f"other settings ({diff})")
    return " and ".join(words)


@contextmanager
def _step(timings: dict[str, float], key: str) -> Iterator[None]:
    """Time a step into ``timings[key]`` (seconds)."""
    with timed() as t:
        yield
    timings[key] = round(t.seconds, 2)


def run_index(cfg: IndexConfig, *, progress: bool = True) -> IndexManifest:
    """Build (or resume, or bring up to date) the text-searchable index of a feature directory.

    Unreadable feature shards are left out and named in the returned manifest's ``failed_shards``
    (see the module docstring); ``ValueError`` when none can be read (the finished index there
    stays as it was).
    """
    with timed() as took:
        src = _open_inputs(cfg)
        replaced = _replaced(cfg, src.identity)
        with OutputDir(cfg.output, job="index", identity=src.identity, overwrite=cfg.overwrite, owned=_OWNED) as out:
            done = out.finished(IndexManifest)
            failed = dict(src.failed)
            plan = _plan(cfg, done, src.rows, src.dim, failed, replaced)
            timings: dict[str, float] = {}
            vec_files, n_new = [], 0
            if plan.action != "nothing":
                plan, n_new = _project_all(cfg, src, out, done, plan, failed, replaced, timings, progress)
                vec_files = [cache_file(out.join("vectors"), src.files[n]) for n in plan.shards]
            files = [src.files[n] for n in plan.shards]
            if plan.action == "nothing":
                _drop_cache(out)  # a kill after the manifest, before the cache was removed
                # captions embedded since (or gone): the caption index is a directory of its own,
                # written manifest last, so the image index's manifest stays as it is
                _captions(cfg, out, src, files, plan, progress)
                return _still(out, done, plan, failed)
            # writable to add to, before the manifest goes; mapped when only re-tuning
            index = load_index(cfg.output, mmap=plan.action == "retune")[0] if plan.action != "build" else None
            out.begin()
            LOG.info("indexing %d images (%d-d) with %s", plan.n_total, src.dim, plan.factory)
            index, added = _fill(cfg, plan, src, out, index, vec_files, timings, progress)
            if index.ntotal != plan.n_total:  # the ids below are written for exactly these rows
                raise RuntimeError(f"{cfg.output}: the index holds {index.ntotal} vectors, the plan {plan.n_total}")
            with _step(timings, "tune_s"):
                tuning = _tune(cfg, plan, index, CachedVectors(vec_files))
            with _step(timings, "write_s"):
                fields = _write(cfg, plan, done, index, files)
            manifest = _manifest(cfg, plan, src, fields, tuning, added=added, timings=timings, n_new=n_new,
                                 failed=failed, seconds=took.elapsed())
            copy_model(cfg.model, out.uri)
            _captions(cfg, out, src, files, plan, progress)
            out.finish(manifest)
            _drop_cache(out)
            return manifest


def _project_all(cfg: IndexConfig, src: _Inputs, out: OutputDir, done: IndexManifest | None, plan: IndexPlan,
                 failed: dict[str, str], replaced: str | None, timings: dict[str, float],
                 progress: bool) -> tuple[IndexPlan, int]:
    """Project the plan's shards into the cache, before the manifest goes: ``(plan, shards projected
    now)``. Shards that fail are added to ``failed`` and the plan is made again without them (it
    may then be ``nothing``); when every one fails, ``ValueError`` and the finished index stays."""
    check_search_params(src.dim, plan.factory, plan.search_params)  # before any work
    with _step(timings, "project_s"):
        n_new, bad = _project(cfg, src, [src.files[n] for n in plan.shards], out.join("vectors"), progress)
    if not bad:
        return plan, n_new
    failed.update(bad)
    rows = {n: r for n, r in src.rows.items() if n not in bad}
    if not sum(rows.values()):
        _drop_cache(out)
        kept = (f"the index there was already removed (--overwrite of one made from {replaced})" if replaced
                else f"nothing was indexed or changed in {cfg.output}")
        raise ValueError(f"{cfg.features}: no feature shard can be read ({_listing(failed)}); {kept}")
    plan = _plan(cfg, done, rows, src.dim, failed, replaced)
    check_search_params(src.dim, plan.factory, plan.search_params)
    return plan, n_new


def _plan(cfg: IndexConfig, done: IndexManifest | None, rows: dict[str, int], dim: int, failed: dict[str, str],
          replaced: str | None) -> IndexPlan:
    """:func:`plan_index`, logged (a rebuild as a warning)."""
    plan = plan_index(cfg, done=done, rows=rows, dim=dim, failed=failed, replaced=replaced)
    (LOG.warning if plan.rebuild else LOG.info)("%s: %s", cfg.output, plan.reason)
    return plan


def _still(out: OutputDir, done: IndexManifest, plan: IndexPlan, failed: dict[str, str]) -> IndexManifest:
    """The finished index, unchanged; its manifest is written again only when the shards left out
    changed (one more is unreadable, or one left out is gone from the features)."""
    if done.failed_shards == failed:
        return done
    manifest = IndexManifest.model_validate({
        **done.to_json(), "failed_shards": failed, "last_action": plan.last_action, "last_reason": plan.reason,
        "added_last_run": 0, "shards_added_last_run": 0, "shards_projected_last_run": 0})
    out.finish(manifest)
    return manifest


def _project(cfg: IndexConfig, src: _Inputs, files: list[str], cache: str,
             progress: bool) -> tuple[int, dict[str, str]]:
    """Project every shard into the cache (here, or on the Ray cluster at ``cfg.address``):
    ``(how many were computed now (not found cached), {shard name: why} of those that cannot be read)``."""
    done = map_shards(files, partial(projector, cfg.model, src.fman.dim, src.dim, cache), address=cfg.address,
                      what="projections", num_workers=cfg.num_workers, progress=progress,
                      local=partial(Projector, cfg.model, src.fman.dim, src.dim, cache, model=src.model))
    bad = {_name(r["shard"]): r["failed"] for r in done if r.get("failed")}
    n_new = sum(r["projected"] for r in done)
    LOG.info("projected %d of %d shards (%d cached by an earlier run%s)", n_new, len(files),
             len(files) - n_new - len(bad), f", {len(bad)} unreadable" if bad else "")
    return n_new, bad


def _fill(cfg: IndexConfig, plan: IndexPlan, src: _Inputs, out: OutputDir, index, vec_files: list[str],
          timings: dict[str, float], progress: bool) -> tuple[Any, int]:
    """``(index, added)``: the finished index with the new shards' vectors added (re-tuning: none),
    or a new one built here, or built as IVF partitions and merged on disk."""
    if plan.action in ("add", "retune"):
        with _step(timings, "add_s"):
            new = CachedVectors(vec_files[len(vec_files) - len(plan.new_shards):])
            added = add_vectors(index, new, progress=progress, desc=f"add to {plan.factory}")
        return index, added
    if plan.partitions:
        return _build_partitions(cfg, plan, src, out, vec_files, timings, progress), plan.n_total
    with _step(timings, "build_s"):
        index = build_index(CachedVectors(vec_files), dim=src.dim, factory=plan.factory, n_total=plan.n_total,
                            use_gpu=_USE_GPU[cfg.use_gpu], progress=progress)
    return index, plan.n_total


def _build_partitions(cfg: IndexConfig, plan: IndexPlan, src: _Inputs, out: OutputDir, vec_files: list[str],
                      timings: dict[str, float], progress: bool):
    """Train one quantiser here, build the IVF partitions (on Ray workers with ``address``), merge on disk."""
    trained_file = out.join("parts", "trained.faiss")
    with _step(timings, "train_s"):
        trained = train_quantiser(vec_files, trained_file, dim=src.dim, factory=plan.factory, n_total=plan.n_total,
                                  use_gpu=_USE_GPU[cfg.use_gpu])
    with _step(timings, "add_s"):
        specs = partition_specs(vec_files, [src.rows[n] for n in plan.shards], n_parts=plan.partitions,
                                trained_file=trained_file, parts_dir=out.join("parts"))
        parts = sorted(r["part"] for r in map_shards(specs, part_worker, address=cfg.address, what="IVF partitions",
                                                      num_workers=cfg.num_workers, progress=progress))
    with _step(timings, "merge_s"):
        index = merge_ivf_parts(trained, parts, cfg.output)
    LOG.info("merged %d IVF partitions (%d vectors) on disk", len(parts), index.ntotal)
    return index


def _tune(cfg: IndexConfig, plan: IndexPlan, index, vectors: CachedVectors) -> IndexTuning | None:
    tuning = tune_index(index, vectors, n_total=plan.n_total, target_recall=cfg.target_recall, k=cfg.tune_k,
                        max_query_ms=cfg.max_query_ms, n_queries=cfg.tune_queries, params=plan.search_params)
    if tuning is not None:
        LOG.info("search parameters %s: recall@1 %.3f, @10 %.3f, single query %.2f ms mean / %.2f ms p99",
                 tuning.params or "(none)", tuning.recall_at_1, tuning.recall_at_10, tuning.latency_ms_mean,
                 tuning.latency_ms_p99)
    return tuning


def _write(cfg: IndexConfig, plan: IndexPlan, done: IndexManifest | None, index, files: list[str]) -> dict:
    """Stream ``ids.parquet`` (adding: the new rows after the old) and write ``index.faiss``; return
    the manifest fields they determine (re-tuning: the files stay, the finished index's fields)."""
    if plan.action == "retune":
        return {k: getattr(done, k) for k in ("ntotal", "dim", "index_bytes", "sha256", "data_files")}
    write_ids(cfg.output, files[len(files) - len(plan.new_shards):], keep_existing=plan.action == "add")
    return write_index_files(index, cfg.output)


def _image_encoder(fman) -> dict:
    """How the features were made (for image queries); a checkpoint path is stored absolute."""
    enc, pre = fman.config.get("encoder"), fman.config.get("pretrained")
    if pre and pre != "random" and zio.is_local(pre) and zio.exists(pre):
        pre = zio.absolute_uri(pre)
    return {"image_encoder": enc, "image_pretrained": pre, "image_size": fman.image_size}


def _manifest(cfg: IndexConfig, plan: IndexPlan, src: _Inputs, fields: dict, tuning: IndexTuning | None, *,
              added: int, timings: dict[str, float], n_new: int, failed: dict[str, str],
              seconds: float) -> IndexManifest:
    if fields["index_bytes"] + sum(fields["data_files"].values()) > parse_memory(cfg.max_memory):
        LOG.warning("%s: the index takes %d bytes, above the %s budget (estimated %d)", cfg.output,
                    fields["index_bytes"], cfg.max_memory, plan.estimated_bytes)
    mman = src.mman
    return IndexManifest(
        **{**fields, "factory": plan.factory}, nprobe=cfg.nprobe, search_params=tuning.params if tuning else None,
        tuning=tuning, build=plan.build, added_last_run=added, train_rows=plan.train_rows, timings=timings,
        identity=src.identity, model_dir=cfg.model, model_fingerprint=src.identity["model"],
        feature_model=src.fman.model_id, **_image_encoder(src.fman), text_model=mman.text_model,
        text_model_name=mman.text_model_name, text_pretrained=mman.text_pretrained, templates=mman.templates,
        features_dir=cfg.features, shards=list(plan.shards), max_memory=cfg.max_memory,
        estimated_bytes=plan.estimated_bytes, shards_projected_last_run=n_new, seconds=round(seconds, 2),
        last_action=plan.last_action, last_reason=plan.reason, shards_added_last_run=len(plan.new_shards),
        failed_shards=failed)


def _captions(cfg: IndexConfig, out: OutputDir, src: _Inputs, files: list[str], plan: IndexPlan,
              progress: bool) -> None:
    update_caption_index(cfg, index_dir=out.uri, text_model=src.mman.text_model, shard_files=files,
                         n_total=plan.n_total, progress=progress)


def _drop_cache(out: OutputDir) -> None:
    zio.remove(out.join("vectors"))
    zio.remove(out.join("parts"))
