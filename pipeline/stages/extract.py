"""Extract stage: input shards -> a feature directory (:mod:`pipeline.core.features`), resumably.

Runs under the resume protocol (:class:`pipeline.core.resume.OutputDir`): the identity is the encoder,
its weights and the settings that change the features (``features.IDENTITY_KEYS``). A shard is
finished when its features file exists (its errors file is written first); a rerun processes only
unfinished shards. ``run.json`` also records a fingerprint of every input shard's membership: a
rerun whose input listing changed under finished shards (files added in the middle, a tar removed)
is refused rather than silently mixing two listings (``overwrite`` starts afresh instead).
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa

from pipeline.core import fs as zio
from pipeline.core.config import ConfigError, ExtractConfig
from pipeline.encoders.models import image_encoder_info
from pipeline.core.features import IDENTITY_KEYS, shard_id_of, shard_name
from pipeline.core.resume import OutputDir
from pipeline.core.schema import ERRORS_SCHEMA, FeaturesManifest, features_schema
from pipeline.inputs.shards import Shard, describe_input, list_shards

LOG = logging.getLogger(__name__)

__all__ = ["run_extract", "shard_plan", "check_checkpoint"]


def shard_plan(shards: list[Shard]) -> dict[str, str]:
    """``{shard id: fingerprint of what the shard holds}`` (member files, tar, row group)."""
    return {str(s.shard_id): zio.fingerprint(s.to_json()) for s in shards}


def _check_plan(cfg: ExtractConfig, out: OutputDir, plan: dict[str, str], done: set[int]) -> None:
    """Refuse a rerun whose input changed under finished shards."""
    old = out.previous_state.get("shards") or {}
    moved = sorted(i for i in done if str(i) in old and old[str(i)] != plan.get(str(i)))
    gone = sorted(i for i in done if str(i) not in plan)
    if moved or gone:
        what = (f"shard(s) {_ids(moved)} now hold other items" if moved else "") + \
               ("; " if moved and gone else "") + (f"shard(s) {_ids(gone)} are gone" if gone else "")
        raise ConfigError(f"{cfg.input} changed since {cfg.output} was extracted ({what}: files were added, removed "
                          "or renamed); extract it into a new --output, or --overwrite to start afresh "
                          "(nothing was changed)")


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:5])) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def check_checkpoint(pretrained: str | None) -> None:
    """Refuse, before any work, a local checkpoint that cannot be loaded without unpickling code.

    ``.safetensors`` holds tensors only; anything else must load with ``torch.load(weights_only=True)``
    (the loader the encoders use), which refuses pickled objects other than tensors and containers.
    """
    if not pretrained or pretrained == "random" or not os.path.isfile(pretrained):
        return  # a pretrained tag, or a remote/missing path that the encoder reports itself
    try:
        if pretrained.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(pretrained, framework="pt") as f:
                f.keys()
        else:
            import torch

            try:
                torch.load(pretrained, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                torch.load(pretrained, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - any failure means: not a safe, loadable checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"pretrained checkpoint {pretrained} cannot be loaded as plain weights "
                         f"({type(exc).__name__}: {first}); pickled objects are never unpickled") from None


class _ShardWriter:
    """Collects rows by shard (batches may split or mix shards) and writes each shard when complete."""

    def __init__(self, out: str, dim: int, progress) -> None:
        self.out, self.dim, self.progress = out, dim, progress
        self.rows: dict[int, dict[int, dict]] = defaultdict(dict)  # shard id -> row in shard -> row
        self.expected: dict[int, int] = {}
        self.written: set[int] = set()
        self.n_ok = self.n_err = 0

    def __call__(self, batch: dict) -> None:
        keys = [k for k in batch if k not in ("pixels", "shard_row")]
        touched: set[int] = set()
        for i in range(len(batch["shard_id"])):
            sid, row = int(batch["shard_id"][i]), int(batch["shard_row"][i])
            if sid in self.written:  # a retried task delivered a shard twice: it is on disk already
                LOG.warning("shard %d: row %d arrived again after the shard was written; ignored", sid, row)
                continue
            if int(batch["shard_n"][i]) >= 0:  # -1: a block before the shard's last (total not known yet)
                self.expected[sid] = int(batch["shard_n"][i])
            self.rows[sid][row] = {k: batch[k][i] for k in keys}  # keyed by row: a repeat replaces itself
            touched.add(sid)
        for sid in sorted(touched):
            n, got = self.expected.get(sid), self.rows[sid]
            LOG.debug("shard %d: %d of %s rows received", sid, len(got), "?" if n is None else n)
            if n is not None and len(got) >= n and all(r in got for r in range(n)):
                if len(got) > n:  # a retried task read less of a breaking shard than the first attempt
                    LOG.warning("shard %d: %d rows beyond its %d (from an earlier attempt) dropped", sid, len(got) - n, n)
                self.rows.pop(sid)
                self._write(sid, [got[r] for r in range(n)])
                self.written.add(sid)

    def finish(self, shard_ids: list[int]) -> None:
        """After the dataflow ended normally: shards that delivered no row at all hold no items (an
        empty tar or Parquet file); they are written empty, so they count as done."""
        for sid in shard_ids:
            if sid not in self.written and sid not in self.rows:
                LOG.warning("shard %d holds no items; written empty", sid)
                self._write(sid, [])
                self.written.add(sid)

    def _write(self, sid: int, rows: list[dict]) -> None:
        rows.sort(key=lambda r: r["image_id"])
        good = [r for r in rows if not r["error"]]
        bad = [r for r in rows if r["error"]]
        errors = pa.table({
            "image_id": [str(r["image_id"]) for r in bad],
            "uri": [str(r["uri"]) for r in bad],
            "stage": [str(r["stage"]) for r in bad],
            "reason": [str(r["error"]) for r in bad],
        }, schema=ERRORS_SCHEMA)
        emb = np.stack([r["embedding"] for r in good]).astype(np.float32) if good else np.zeros((0, self.dim), np.float32)
        feats = pa.table({
            "image_id": [str(r["image_id"]) for r in good],
            "uri": [str(r["uri"]) for r in good],
            "label": [str(r["label"]) or None for r in good],
            "caption": [str(r["caption"]) or None for r in good],
            "url": [str(r["url"]) or None for r in good],
            "key": [str(r["key"]) or None for r in good],
            "meta": [str(r["meta"]) or None for r in good],
            "width": [int(r["width"]) for r in good],
            "height": [int(r["height"]) for r in good],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), self.dim),
        }, schema=features_schema(self.dim))
        # errors first: the features file is the "shard done" marker
        zio.write_parquet_atomic(zio.join(self.out, "errors", shard_name(sid)), errors)
        zio.write_parquet_atomic(zio.join(self.out, "features", shard_name(sid)), feats)
        self.n_ok += len(good)
        self.n_err += len(bad)
        LOG.debug("shard %d written: %d images, %d errors", sid, len(good), len(bad))
        if bad:
            LOG.warning("shard %d: %d of %d items failed (first: %s: %s)", sid, len(bad), len(rows),
                        bad[0]["image_id"], bad[0]["error"])
        self.progress.update(1)
        self.progress.set_postfix(images=self.n_ok, errors=self.n_err)


def _count_rows(uri: str) -> int:
    if not zio.exists(uri):
        return 0
    return sum(zio.parquet_num_rows(f) for f in zio.iter_parquet_files(uri))


def _done_shards(feat_dir: str) -> set[int]:
    if not zio.exists(feat_dir):
        return set()
    ids = (shard_id_of(f) for f in zio.iter_parquet_files(feat_dir))
    return {i for i in ids if i is not None}


def run_extract(cfg: ExtractConfig, *, progress: bool = True) -> FeaturesManifest:
    """Extract features for every unfinished shard of ``cfg.input``; return the manifest."""
    t0 = time.perf_counter()
    info = image_encoder_info(cfg.encoder, cfg.pretrained)
    check_checkpoint(cfg.pretrained)
    if cfg.input_format == "auto":
        fmt, why = describe_input(cfg.input, cfg.image_column)
        LOG.info("%s: input format %s (%s)", cfg.input, fmt, why)
    else:
        fmt = cfg.input_format
    shards = list_shards(cfg.input, input_format=fmt, shard_size=cfg.shard_size, image_column=cfg.image_column)
    listing = shard_plan(shards)
    if cfg.limit:
        shards = shards[: cfg.limit]
    settings = cfg.model_dump()
    identity = {**{k: settings[k] for k in IDENTITY_KEYS}, "model_id": info.model_id}
    with OutputDir(cfg.output, job="extract", identity=identity, overwrite=cfg.overwrite,
                   owned=("features", "errors", "text")) as out:
        feat_dir = out.join("features")
        done = _done_shards(feat_dir)
        try:
            _check_plan(cfg, out, listing, done)
        except ConfigError:
            if not cfg.overwrite:
                raise
            LOG.warning("%s: input changed under finished shards; extracting every shard afresh", cfg.output)
            out.begin()
            zio.remove(feat_dir)
            zio.remove(out.join("errors"))
            zio.remove(out.join("text"))  # caption embeddings of the old features
            done = set()
        out.set_state({"shards": listing})
        pending = [s for s in shards if s.shard_id not in done]
        LOG.info("%d shards in input, %d already done, %d to do", len(shards), len(shards) - len(pending),
                 len(pending))
        plan = None
        if pending:
            out.begin()
            plan = _encode(cfg, info, shards, pending, progress)
        manifest = FeaturesManifest(
            model_id=info.model_id, dim=info.dim, image_size=info.image_size, n_shards=len(shards),
            n_shards_in_input=len(listing), n_images=_count_rows(feat_dir), n_errors=_count_rows(out.join("errors")),
            config=settings, resources=None if plan is None else plan.__dict__,
            seconds_last_run=round(time.perf_counter() - t0, 2))
        out.finish(manifest)
        return manifest


def _encode(cfg: ExtractConfig, info, shards: list[Shard], pending: list[Shard], progress: bool):
    """Decode and encode the pending shards on Ray, writing each shard as it completes."""
    from tqdm.auto import tqdm

    from pipeline.cluster.session import init_ray
    from pipeline.cluster.extraction import run_extraction

    init_ray(cfg.address)
    bar = tqdm(total=len(shards), initial=len(shards) - len(pending), unit="shard", desc="extract",
               disable=not progress)
    writer = _ShardWriter(cfg.output, info.dim, bar)
    plan = run_extraction(pending, encoder=cfg.encoder, pretrained=cfg.pretrained, image_size=info.image_size,
                          batch_size=cfg.batch_size, num_actors=cfg.num_actors, device=cfg.device,
                          max_pixels=cfg.max_image_pixels, on_rows=writer, decode_rows=cfg.decode_block_rows,
                          read=dict(image_column=cfg.image_column, label_column=cfg.label_column,
                                    label_field=cfg.label_field))
    writer.finish([s.shard_id for s in pending])
    bar.close()
    if writer.rows:
        raise RuntimeError(f"shards {sorted(writer.rows)} came back incomplete; rerun to retry them")
    return plan
