"""Extraction stage: input shards -> feature shards, resumably.

Output layout (every file written atomically, named by zero-padded shard id)::

    OUT/run.json                      what this output was made with, and the shard plan (checked on rerun)
    OUT/features/shard-000012.parquet image_id, uri, label, caption, width, height, embedding
    OUT/errors/shard-000012.parquet   image_id, uri, stage, reason (written before the features file)
    OUT/manifest.json                 model id, dim, counts, config; written when every shard is done

A shard is finished when its features file exists; a rerun processes only unfinished shards.
``run.json`` also records a fingerprint of every input shard's membership: a rerun whose input
listing changed under finished shards (files added in the middle, a tar removed) is refused rather
than silently mixing two listings. While a run has work to do there is no ``manifest.json``, so
an interrupted output never looks finished to ``load_features``. Temporary files a killed run left
(``._tmp-*``) are ignored by every reader and deleted by the next run, which holds an exclusive
lock on the output directory (:func:`pipeline.io.output_lock`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline import io as zio
from pipeline.config import ConfigError, ExtractConfig
from pipeline.encoders import image_encoder_info
from pipeline.schema import ERRORS_SCHEMA, FEATURES_FORMAT, features_schema
from pipeline.shards import Shard, list_shards

LOG = logging.getLogger(__name__)

__all__ = ["run_extract", "shard_name", "shard_plan", "check_checkpoint", "load_features", "read_features_manifest",
           "features_identity", "check_feature_shards", "Features"]

# Settings that change what is written; anything else (batch size, actors, address) may change on rerun.
_IDENTITY_KEYS = ("input", "input_format", "image_column", "label_column", "encoder", "pretrained",
                  "shard_size", "max_image_pixels")


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.parquet"


def _identity(cfg: ExtractConfig) -> dict:
    d = cfg.model_dump()
    return {k: d[k] for k in _IDENTITY_KEYS}


def shard_plan(shards: list[Shard]) -> dict[str, str]:
    """``{shard id: fingerprint of what the shard holds}`` (member files, tar, row group)."""
    return {str(s.shard_id): zio.fingerprint(s.to_json()) for s in shards}


def _check_run(cfg: ExtractConfig, out: str, model_id: str, plan: dict[str, str], done: set[int]) -> None:
    """Refuse a rerun with other identity settings or with an input that changed under finished shards."""
    run_uri = zio.join(out, "run.json")
    ident = {**_identity(cfg), "model_id": model_id}
    prev = zio.read_json(run_uri) if zio.exists(run_uri) else None
    if prev is not None:
        diff = {k: (prev.get(k), v) for k, v in ident.items() if prev.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"{out} holds features made with other settings ({what}); "
                              "use a new --output (nothing was changed)")
        old = prev.get("shards") or {}
        moved = sorted(i for i in done if str(i) in old and old[str(i)] != plan.get(str(i)))
        gone = sorted(i for i in done if str(i) not in plan)
        if moved or gone:
            what = (f"shard(s) {_ids(moved)} now hold other items" if moved else "") + \
                   ("; " if moved and gone else "") + (f"shard(s) {_ids(gone)} are gone" if gone else "")
            raise ConfigError(f"{cfg.input} changed since {out} was extracted ({what}: files were added, removed "
                              "or renamed); extract it into a new --output (nothing was changed)")
    if prev is None or prev.get("shards") != plan:
        zio.write_json_atomic(run_uri, {**ident, "shards": plan})


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
            self.expected[sid] = int(batch["shard_n"][i])
            self.rows[sid][row] = {k: batch[k][i] for k in keys}  # keyed by row: a repeat replaces itself
            touched.add(sid)
        for sid in sorted(touched):
            LOG.debug("shard %d: %d of %d rows received", sid, len(self.rows[sid]), self.expected[sid])
            if len(self.rows[sid]) == self.expected[sid]:
                self._write(sid, list(self.rows.pop(sid).values()))
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


def run_extract(cfg: ExtractConfig, *, progress: bool = True) -> dict:
    """Extract features for every unfinished shard of ``cfg.input``; return the manifest."""
    t0 = time.perf_counter()
    info = image_encoder_info(cfg.encoder, cfg.pretrained)
    check_checkpoint(cfg.pretrained)
    shards = list_shards(cfg.input, input_format=cfg.input_format, shard_size=cfg.shard_size,
                         image_column=cfg.image_column)
    listing = shard_plan(shards)
    if cfg.limit:
        shards = shards[: cfg.limit]
    with zio.output_lock(cfg.output):
        return _extract_locked(cfg, info, shards, listing, t0, progress)


def _done_shards(feat_dir: str) -> set[int]:
    if not zio.exists(feat_dir):
        return set()
    names = (f.rsplit("/", 1)[-1] for f in zio.iter_parquet_files(feat_dir))
    return {int(n[6:-8]) for n in names if n.startswith("shard-") and n[6:-8].isdigit()}


def _extract_locked(cfg: ExtractConfig, info, shards: list[Shard], listing: dict, t0: float, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from pipeline.ray_stages import init_ray, run_extraction

    feat_dir = zio.join(cfg.output, "features")
    done = _done_shards(feat_dir)
    _check_run(cfg, cfg.output, info.model_id, listing, done)
    zio.remove_temp_files(cfg.output)
    pending = [s for s in shards if s.shard_id not in done]
    LOG.info("%d shards in input, %d already done, %d to do", len(shards), len(shards) - len(pending), len(pending))
    plan = None
    if pending:
        zio.remove(zio.join(cfg.output, "manifest.json"))  # an unfinished output never looks finished
        init_ray(cfg.address)
        bar = tqdm(total=len(shards), initial=len(shards) - len(pending), unit="shard", desc="extract",
                   disable=not progress)
        writer = _ShardWriter(cfg.output, info.dim, bar)
        plan = run_extraction(pending, encoder=cfg.encoder, pretrained=cfg.pretrained, image_size=info.image_size,
                              batch_size=cfg.batch_size, num_actors=cfg.num_actors, device=cfg.device,
                              max_pixels=cfg.max_image_pixels, image_column=cfg.image_column,
                              label_column=cfg.label_column, on_rows=writer)
        bar.close()
        if writer.rows:
            raise RuntimeError(f"shards {sorted(writer.rows)} came back incomplete; rerun to retry them")
    manifest = {
        "format": FEATURES_FORMAT,
        "model_id": info.model_id,
        "dim": info.dim,
        "image_size": info.image_size,
        "n_shards": len(shards),
        "n_shards_in_input": len(listing),
        "n_images": _count_rows(feat_dir),
        "n_errors": _count_rows(zio.join(cfg.output, "errors")),
        "config": cfg.model_dump(),
        "resources": None if plan is None else plan.__dict__,
        "seconds_last_run": round(time.perf_counter() - t0, 2),
    }
    zio.write_json_atomic(zio.join(cfg.output, "manifest.json"), manifest)
    return manifest


def read_features_manifest(uri: str) -> dict:
    return zio.read_manifest(uri, expected_format=FEATURES_FORMAT, what="zsl extract")


def features_identity(uri: str, manifest: dict) -> str:
    """Fingerprint of what a feature directory holds, for outputs derived from it (labels, indexes).

    Made of the directory, the encoder and the settings that change the features (``run.json``'s
    keys), not batch size or actor count: a rerun of ``zsl extract`` that only adds shards keeps it.
    """
    cfg = manifest.get("config") or {}
    fs, path = zio.filesystem(uri)
    where = os.path.abspath(path) if isinstance(fs, LocalFileSystem) else str(uri).rstrip("/")
    return zio.fingerprint({"dir": where.rstrip("/"), "model_id": manifest.get("model_id"),
                            "dim": manifest.get("dim"), **{k: cfg.get(k) for k in _IDENTITY_KEYS if k in cfg}})


class Features:
    """Feature table in memory: ids, uris, labels and an ``(n, dim)`` float32 matrix."""

    def __init__(self, image_ids, uris, labels, X: np.ndarray, manifest: dict) -> None:
        self.image_ids, self.uris, self.labels, self.X, self.manifest = image_ids, uris, labels, X, manifest


def table_embeddings(table: pa.Table, dim: int, where: str) -> np.ndarray:
    col = table.column("embedding")
    if col.type != pa.list_(pa.float32(), dim):
        raise ValueError(f"{where}: embedding column is {col.type}, expected fixed_size_list<float>[{dim}]")
    # flatten() (not .values) honours slicing of the chunks
    flat = pa.concat_arrays([c.flatten() for c in col.chunks]) if col.num_chunks else pa.array([], pa.float32())
    return flat.to_numpy(zero_copy_only=False).reshape(-1, dim)


def check_feature_shards(files: list[str], dim: int) -> None:
    """Every shard holds ``dim``-d float32 embeddings (footers only); ValueError naming the first that does not."""
    want = pa.list_(pa.float32(), dim)
    for f in files:
        fs, path = zio.filesystem(f)
        try:
            with fs.open(path, "rb") as fh:
                schema = pq.ParquetFile(fh).schema_arrow
        except Exception as exc:  # noqa: BLE001 - a corrupted footer is bad input, named
            raise ValueError(f"{f}: not a readable feature shard ({type(exc).__name__}: {exc})") from None
        idx = schema.get_field_index("embedding")
        if idx < 0:
            raise ValueError(f"{f}: no 'embedding' column (columns: {', '.join(schema.names)})")
        if schema.field(idx).type != want:
            raise ValueError(f"{f}: embeddings are {schema.field(idx).type}, the manifest and model expect "
                             f"fixed_size_list<float>[{dim}]")


def load_features(uri: str) -> Features:
    """Load every feature shard of a ``zsl extract`` output (fits in memory: a few KB per image)."""
    manifest = read_features_manifest(uri)
    table = zio.read_parquet_dir(zio.join(uri, "features"))
    X = table_embeddings(table, int(manifest["dim"]), uri)
    return Features(table.column("image_id").to_pylist(), table.column("uri").to_pylist(),
                    table.column("label").to_pylist(), X, manifest)


def write_features(out: str, *, image_ids, uris, labels, X: np.ndarray, model_id: str,
                   shard_size: int = 50_000, extra_manifest: dict | None = None) -> dict:
    """Write an in-memory feature matrix as a feature directory (same layout as ``zsl extract``).

    For features computed elsewhere (another extractor, simulations, benchmarks).
    """
    X = np.asarray(X, np.float32)
    n, dim = X.shape
    if not (len(image_ids) == len(uris) == len(labels) == n):
        raise ValueError(f"{n} feature rows but {len(image_ids)} ids, {len(uris)} uris, {len(labels)} labels")
    for sid, s in enumerate(range(0, max(n, 1), shard_size)):
        e = min(n, s + shard_size)
        table = pa.table({
            "image_id": [str(v) for v in image_ids[s:e]], "uri": [str(v) for v in uris[s:e]],
            "label": [None if v is None else str(v) for v in labels[s:e]],
            "caption": pa.nulls(e - s, pa.string()), "width": pa.nulls(e - s, pa.int32()),
            "height": pa.nulls(e - s, pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X[s:e].reshape(-1), pa.float32()), dim),
        }, schema=features_schema(dim))
        zio.write_parquet_atomic(zio.join(out, "features", shard_name(sid)), table)
    manifest = {"format": FEATURES_FORMAT, "model_id": model_id, "dim": int(dim), "n_images": int(n),
                "n_errors": 0, "n_shards": max(1, -(-n // shard_size)), **(extra_manifest or {})}
    zio.write_json_atomic(zio.join(out, "manifest.json"), manifest)
    return manifest
