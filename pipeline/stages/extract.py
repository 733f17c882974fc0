"""Extract stage: input shards -> a feature directory (:mod:`pipeline.core.features`), resumably.

Runs under the resume protocol (:class:`pipeline.core.resume.OutputDir`): the identity is the encoder,
its weights and the settings that change the features (:func:`pipeline.core.features.identity_settings`),
not how the encoder runs (``image_backend``: PyTorch and ONNX Runtime give the same features within the
check's bound, so an output may be resumed on the other). A shard is
finished when its features file exists (its errors file is written first); a rerun processes only
unfinished shards. ``run.json`` also records a fingerprint of every input shard's membership: a
rerun whose input listing changed under finished shards (files added in the middle, a tar removed)
is refused rather than silently mixing two listings (``overwrite`` starts afresh instead).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict

import numpy as np

from pipeline.cluster.extraction import TIMING_COLUMNS, from_ray_block
from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.core.config import ConfigError, ExtractConfig
from pipeline.core.features import identity_settings, shard_id_of, write_error_shard, write_feature_shard
from pipeline.core.resume import OutputDir
from pipeline.core.manifests import FeaturesManifest
from pipeline.core.timing import timed
from pipeline.encoders.image import image_encoder_info
from pipeline.inputs.base import Shard
from pipeline.inputs.plan import PLAN_FILE, PlanUpdate, grow_plan, read_plan, write_plan
from pipeline.inputs.registry import describe_input, list_shards

LOG = logging.getLogger(__name__)

__all__ = ["run_extract", "shard_plan", "check_checkpoint", "inputs_of", "CHANGES_FILE"]

#: vanished and changed input items (item, what), kept beside the features while there are any
CHANGES_FILE = "input_changes.parquet"


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
    """Collects rows by shard and writes each shard when complete, as one Arrow table.

    Batches may split or mix shards and arrive in any order; a retried task may deliver rows again
    (a repeat replaces itself; rows of a shard already written are dropped). A shard is complete
    when the block carrying its total (``shard_n`` >= 0) is in and so is every row up to it.
    """

    def __init__(self, out: str, dim: int, progress) -> None:
        self.out, self.dim, self.progress = out, dim, progress
        self.blocks: dict[int, list[dict]] = defaultdict(list)  # shard id -> its column blocks, as received
        self.rows: dict[int, dict[int, tuple[int, int]]] = defaultdict(dict)  # shard id -> row -> (block, position)
        self.expected: dict[int, int] = {}
        self.written: set[int] = set()
        self.n_ok = self.n_err = 0
        self.seconds = dict.fromkeys(("read", "decode", "encode", "write"), 0.0)
        self.by_backend = {"onnx": 0, "torch": 0}  # rows encoded on each

    def __call__(self, batch: dict) -> None:
        """Take one batch of the dataflow (any shards, any rows); write the shards it completes."""
        cols = from_ray_block(batch)
        cols.pop("pixels", None)
        for col in TIMING_COLUMNS:  # the workers' seconds, summed here; not written
            if col in cols:
                self.seconds[col[:-2]] += float(np.sum(cols.pop(col)))
        if "onnx" in cols:
            on_onnx = int(np.count_nonzero(cols.pop("onnx")))
            self.by_backend["onnx"] += on_onnx
            self.by_backend["torch"] += len(cols["shard_id"]) - on_onnx
        shard_ids = np.asarray(cols["shard_id"], np.int64)
        touched = [sid for sid in dict.fromkeys(shard_ids.tolist())
                   if self._add(sid, {k: v[shard_ids == sid] for k, v in cols.items()})]
        for sid in sorted(touched):
            n, got = self.expected.get(sid), self.rows[sid]
            LOG.debug("shard %d: %d of %s rows received", sid, len(got), "?" if n is None else n)
            if n is not None and len(got) >= n and all(r in got for r in range(n)):
                if len(got) > n:  # a retried task read less of a breaking shard than the first attempt
                    LOG.warning("shard %d: %d rows beyond its %d (from an earlier attempt) dropped", sid, len(got) - n, n)
                with timed() as took:
                    self._write(sid, self._take(sid, n))
                self.seconds["write"] += took.seconds

    def _add(self, sid: int, block: dict) -> bool:
        """Keep one shard's rows of a batch; False when the shard is written already."""
        if sid in self.written:  # a retried task delivered a shard twice: it is on disk already
            for row in block["shard_row"].tolist():
                LOG.warning("shard %d: row %d arrived again after the shard was written; ignored", sid, row)
            return False
        totals = block["shard_n"][block["shard_n"] >= 0]  # -1: a block before the shard's last (total not known yet)
        if len(totals):
            self.expected[sid] = int(totals[-1])
        b = len(self.blocks[sid])
        self.blocks[sid].append(block)
        for pos, row in enumerate(block["shard_row"].tolist()):
            self.rows[sid][row] = (b, pos)  # keyed by row: a repeat replaces itself
        return True

    def _take(self, sid: int, n: int) -> dict:
        """Rows ``0..n-1`` of a complete shard as one column block (and the shard forgotten)."""
        blocks, where = self.blocks.pop(sid), self.rows.pop(sid)
        start = np.cumsum([0] + [len(b["shard_row"]) for b in blocks])
        index = np.array([start[where[r][0]] + where[r][1] for r in range(n)], np.int64)
        return {k: np.concatenate([b[k] for b in blocks])[index] for k in blocks[0]}

    def finish(self, shard_ids: list[int]) -> None:
        """After the dataflow ended normally: shards that delivered no row at all hold no items (an
        empty tar or Parquet file); they are written empty, so they count as done."""
        for sid in shard_ids:
            if sid not in self.written and sid not in self.rows:
                LOG.warning("shard %d holds no items; written empty", sid)
                self._write(sid, None)

    def _write(self, sid: int, cols: dict | None) -> None:
        """A shard's errors, then its features (the "shard done" marker), rows in image-id order."""
        cols = _empty_block(self.dim) if cols is None else cols
        ids = cols["image_id"]
        failed = np.array([e is not None for e in cols["error"]], bool)
        order = np.array(sorted(range(len(ids)), key=ids.__getitem__), np.int64)
        bad, good = order[failed[order]], order[~failed[order]]
        write_error_shard(self.out, sid, image_ids=ids[bad], uris=cols["uri"][bad], stages=cols["stage"][bad],
                          reasons=cols["error"][bad])
        write_feature_shard(self.out, sid, image_ids=ids[good], uris=cols["uri"][good],
                            X=cols["embedding"][good].reshape(-1, self.dim), labels=cols["label"][good],
                            captions=cols["caption"][good], urls=cols["url"][good], keys=cols["key"][good],
                            metas=cols["meta"][good], widths=cols["width"][good], heights=cols["height"][good])
        self.written.add(sid)
        self.n_ok += len(good)
        self.n_err += len(bad)
        LOG.debug("shard %d written: %d images, %d errors", sid, len(good), len(bad))
        if len(bad):
            LOG.warning("shard %d: %d of %d items failed (first: %s: %s)", sid, len(bad), len(ids),
                        ids[bad[0]], cols["error"][bad[0]])
        self.progress.update(1)
        self.progress.set_postfix(images=self.n_ok, errors=self.n_err)


def _empty_block(dim: int) -> dict:
    """The columns of a shard without items."""
    text = ("image_id", "uri", "label", "caption", "url", "key", "meta", "error", "stage")
    return {**{k: np.array([], object) for k in text}, "width": np.zeros(0, np.int32),
            "height": np.zeros(0, np.int32), "embedding": np.zeros((0, dim), np.float32)}


def _done_shards(feat_dir: str) -> set[int]:
    ids = (shard_id_of(f) for f in zpq.parquet_names(feat_dir))
    return {i for i in ids if i is not None}


def run_extract(cfg: ExtractConfig, *, progress: bool = True) -> FeaturesManifest:
    """Extract features for every unfinished shard of ``cfg.input``; return the manifest.

    Shard ids come from the output's recorded plan (:mod:`pipeline.inputs.plan`): new input becomes new
    shards after the recorded ones, whatever it sorts as; vanished and changed items are reported. A run
    with nothing to do changes no file."""
    with timed() as took:
        info = image_encoder_info(cfg.encoder, cfg.pretrained)
        check_checkpoint(cfg.pretrained)
        listed = _list_input(cfg)
        settings = {**cfg.model_dump(), "jpeg_draft": _jpeg_draft(cfg)}
        identity = {**identity_settings(settings), "model_id": info.model_id}
        with OutputDir(cfg.output, job="extract", identity=identity, overwrite=cfg.overwrite,
                       owned=("features", "errors", "text", PLAN_FILE, CHANGES_FILE)) as out:
            update = _resume(cfg, out, listed)
            shards = update.shards[: cfg.limit] if cfg.limit else update.shards
            feat_dir = out.join("features")
            done = _done_shards(feat_dir)
            pending = [s for s in shards if s.shard_id not in done]
            LOG.info("%d shards in the plan (%d new), %d already done, %d to do", len(update.shards), len(update.new),
                     len(shards) - len(pending), len(pending))
            _report_changes(cfg, out, update)
            finished = out.finished(FeaturesManifest)
            if not pending and finished is not None and finished.n_shards == len(shards) and \
                    (finished.n_vanished, finished.n_changed) == (len(update.vanished), len(update.changed)):
                LOG.info("%s: nothing new to extract", cfg.output)
                return finished  # nothing changed: no file is rewritten
            resources = seconds = None
            if pending:
                out.begin()
                resources, seconds = _encode(cfg, info, shards, pending, progress, draft=settings["jpeg_draft"])
            manifest = FeaturesManifest(
                model_id=info.model_id, dim=info.dim, image_size=info.image_size, n_shards=len(shards),
                n_shards_in_input=len(update.shards), n_images=zpq.dir_num_rows(feat_dir),
                n_errors=zpq.dir_num_rows(out.join("errors")), n_vanished=len(update.vanished),
                n_changed=len(update.changed), config=settings,
                resources=resources if pending else (finished.resources if finished else None),
                seconds_last_run=round(took.elapsed(), 2), stage_seconds=seconds)
            out.finish(manifest)
            return manifest


def _jpeg_draft(cfg: ExtractConfig) -> bool:
    """``jpeg_draft`` as set, else as the output was extracted (off before the setting existed), else on."""
    if cfg.jpeg_draft is not None:
        return cfg.jpeg_draft
    recorded = OutputDir.recorded_identity(cfg.output, job="extract")
    if recorded is None:
        return True
    if not recorded.get("jpeg_draft"):
        LOG.info("%s was extracted with full JPEG decoding; it keeps it (jpeg_draft)", cfg.output)
    return bool(recorded.get("jpeg_draft"))


def inputs_of(cfg: ExtractConfig) -> list[str]:
    """The config's input URIs (one, or several)."""
    return [cfg.input] if isinstance(cfg.input, str) else list(cfg.input)


def _list_input(cfg: ExtractConfig) -> list[Shard]:
    """The shards of every input as listed now, ids in order across the inputs (with ``auto``, the layout
    chosen for each input is logged with its reason)."""
    out: list[Shard] = []
    for uri in inputs_of(cfg):
        if cfg.input_format == "auto":
            fmt, why = describe_input(uri, cfg.image_column)
            LOG.info("%s: input format %s (%s)", uri, fmt, why)
        else:
            fmt = cfg.input_format
        for s in list_shards(uri, input_format=fmt, shard_size=cfg.shard_size, image_column=cfg.image_column):
            out.append(dataclasses.replace(s, shard_id=len(out)))
    return out


def _resume(cfg: ExtractConfig, out: OutputDir, listed: list[Shard]) -> PlanUpdate:
    """The plan brought up to date with the input as listed now (written when it grew).

    An output extracted before plans were recorded (its run.json has only the shards' fingerprints)
    adopts today's listing when every finished shard still holds what it held; otherwise the input changed
    under it in a way that cannot be told apart from renaming, and the run is refused (``--overwrite``
    starts afresh)."""
    recorded = read_plan(out.uri)
    if recorded is None:
        done = _done_shards(out.join("features"))
        try:
            if done:
                _check_plan(cfg, out, shard_plan(listed), done)  # an output of an earlier version: same listing?
        except ConfigError:
            if not cfg.overwrite:
                raise
            LOG.warning("%s: input changed under finished shards; extracting every shard afresh", cfg.output)
            out.begin()
            for part in ("features", "errors", "text"):  # the text: caption embeddings of the old features
                zio.remove(out.join(part))
        update = grow_plan(None, listed, shard_size=cfg.shard_size)
    else:
        update = grow_plan(recorded, listed, shard_size=cfg.shard_size)
    if recorded is None or update.new:
        write_plan(out.uri, update.plan)  # before any new shard is written: the ids are fixed from here on
    return update


def _report_changes(cfg: ExtractConfig, out: OutputDir, update: PlanUpdate) -> None:
    """Log vanished and changed items and keep their list in ``input_changes.parquet`` (rewritten only when
    it differs)."""
    import pyarrow as pa

    rows = [(it, "vanished") for it in update.vanished] + [(it, "changed") for it in update.changed]
    path = out.join(CHANGES_FILE)
    old = zpq.read_parquet(path) if zio.exists(path) else None
    old_rows = list(zip(old.column("item").to_pylist(), old.column("what").to_pylist())) if old is not None else []
    if rows == old_rows:
        return
    if rows:
        LOG.warning("%s: %d item(s) of extracted shards vanished and %d changed since (first: %s); they are kept "
                    "as extracted, not re-read: a changed file needs a new name, or --overwrite to start afresh",
                    cfg.output, len(update.vanished), len(update.changed), rows[0][0])
        zpq.write_parquet_atomic(path, pa.table({"item": [r[0] for r in rows], "what": [r[1] for r in rows]}))
    else:
        zio.remove(path)


def _encode(cfg: ExtractConfig, info, shards: list[Shard], pending: list[Shard], progress: bool, *, draft: bool):
    """Decode and encode the pending shards on Ray, writing each shard as it completes; the resources
    (the plan, and the rows each backend encoded) and the seconds of each stage."""
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
                          backend=cfg.image_backend, draft=draft, jpeg_on_gpu=cfg.jpeg_on_gpu,
                          read=dict(image_column=cfg.image_column, label_column=cfg.label_column,
                                    label_field=cfg.label_field))
    writer.finish([s.shard_id for s in pending])
    bar.close()
    if writer.rows:
        raise RuntimeError(f"shards {sorted(writer.rows)} came back incomplete; rerun to retry them")
    seconds = {k: round(v, 3) for k, v in writer.seconds.items()}
    LOG.info("stage seconds (summed over workers): %s; rows encoded on ONNX Runtime %d, on PyTorch %d",
             ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), writer.by_backend["onnx"],
             writer.by_backend["torch"])
    return {**plan.__dict__, "rows_by_backend": dict(writer.by_backend)}, seconds
