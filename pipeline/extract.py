"""Extraction stage: input shards -> feature shards, resumably.

Output layout (every file written atomically, named by zero-padded shard id)::

    OUT/run.json                      what this output was made with (checked on every rerun)
    OUT/features/shard-000012.parquet image_id, uri, label, caption, width, height, embedding
    OUT/errors/shard-000012.parquet   image_id, uri, stage, reason (written before the features file)
    OUT/manifest.json                 model id, dim, counts, config; rewritten at the end of each run

A shard is finished when its features file exists; a rerun processes only unfinished shards.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io as zio
from pipeline.config import ConfigError, ExtractConfig
from pipeline.encoders import image_encoder_info
from pipeline.schema import ERRORS_SCHEMA, FEATURES_FORMAT, features_schema
from pipeline.shards import list_shards

LOG = logging.getLogger(__name__)

__all__ = ["run_extract", "shard_name", "load_features", "read_features_manifest", "Features"]

# Settings that change what is written; anything else (batch size, actors, address) may change on rerun.
_IDENTITY_KEYS = ("input", "input_format", "image_column", "label_column", "encoder", "pretrained",
                  "shard_size", "max_image_pixels")


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.parquet"


def _identity(cfg: ExtractConfig) -> dict:
    d = cfg.model_dump()
    return {k: d[k] for k in _IDENTITY_KEYS}


def _check_run(cfg: ExtractConfig, out: str, model_id: str) -> None:
    run_uri = zio.join(out, "run.json")
    ident = {**_identity(cfg), "model_id": model_id}
    if zio.exists(run_uri):
        prev = zio.read_json(run_uri)
        diff = {k: (prev.get(k), v) for k, v in ident.items() if prev.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"{out} holds features made with other settings ({what}); "
                              "use a new --output (nothing was changed)")
    else:
        zio.write_json_atomic(run_uri, ident)


class _ShardWriter:
    """Collects rows by shard (batches may split or mix shards) and writes each shard when complete."""

    def __init__(self, out: str, dim: int, progress) -> None:
        self.out, self.dim, self.progress = out, dim, progress
        self.rows: dict[int, list[dict]] = defaultdict(list)
        self.expected: dict[int, int] = {}
        self.n_ok = self.n_err = 0

    def __call__(self, batch: dict) -> None:
        keys = [k for k in batch if k != "pixels"]
        for i in range(len(batch["shard_id"])):
            sid = int(batch["shard_id"][i])
            self.expected[sid] = int(batch["shard_n"][i])
            self.rows[sid].append({k: batch[k][i] for k in keys})
            if len(self.rows[sid]) == self.expected[sid]:
                self._write(sid, self.rows.pop(sid))

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
        if bad:
            LOG.warning("shard %d: %d of %d items failed (first: %s: %s)", sid, len(bad), len(rows),
                        bad[0]["image_id"], bad[0]["error"])
        self.progress.update(1)
        self.progress.set_postfix(images=self.n_ok, errors=self.n_err)


def _count_rows(uri: str) -> int:
    if not zio.exists(uri):
        return 0
    fs, _ = zio.filesystem(uri)
    total = 0
    for f in zio.iter_parquet_files(uri):
        total += pq.ParquetFile(fs.open(zio.filesystem(f)[1], "rb")).metadata.num_rows
    return total


def run_extract(cfg: ExtractConfig, *, progress: bool = True) -> dict:
    """Extract features for every unfinished shard of ``cfg.input``; return the manifest."""
    from tqdm.auto import tqdm

    from pipeline.ray_stages import init_ray, run_extraction

    t0 = time.perf_counter()
    info = image_encoder_info(cfg.encoder, cfg.pretrained)
    shards = list_shards(cfg.input, input_format=cfg.input_format, shard_size=cfg.shard_size,
                         image_column=cfg.image_column)
    if cfg.limit:
        shards = shards[: cfg.limit]
    _check_run(cfg, cfg.output, info.model_id)
    feat_dir = zio.join(cfg.output, "features")
    done = {f.rsplit("/", 1)[-1] for f in zio.iter_parquet_files(feat_dir)} if zio.exists(feat_dir) else set()
    pending = [s for s in shards if shard_name(s.shard_id) not in done]
    LOG.info("%d shards in input, %d already done, %d to do", len(shards), len(shards) - len(pending), len(pending))
    plan = None
    if pending:
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
        "n_images": _count_rows(feat_dir),
        "n_errors": _count_rows(zio.join(cfg.output, "errors")),
        "config": cfg.model_dump(),
        "resources": None if plan is None else plan.__dict__,
        "seconds_last_run": round(time.perf_counter() - t0, 2),
    }
    zio.write_json_atomic(zio.join(cfg.output, "manifest.json"), manifest)
    return manifest


def read_features_manifest(uri: str) -> dict:
    m = zio.join(uri, "manifest.json")
    if not zio.exists(m):
        raise FileNotFoundError(f"{uri}: no manifest.json; is this a finished `zsl extract` output?")
    manifest = zio.read_json(m)
    if manifest.get("format") != FEATURES_FORMAT:
        raise ValueError(f"{uri}: manifest format {manifest.get('format')!r}, expected {FEATURES_FORMAT!r}")
    return manifest


class Features:
    """Feature table in memory: ids, uris, labels and an ``(n, dim)`` float32 matrix."""

    def __init__(self, image_ids, uris, labels, X: np.ndarray, manifest: dict) -> None:
        self.image_ids, self.uris, self.labels, self.X, self.manifest = image_ids, uris, labels, X, manifest


def table_embeddings(table: pa.Table, dim: int, where: str) -> np.ndarray:
    col = table.column("embedding")
    if col.type != pa.list_(pa.float32(), dim):
        raise ValueError(f"{where}: embedding column is {col.type}, expected fixed_size_list<float>[{dim}]")
    flat = pa.concat_arrays([c.values for c in col.chunks]) if col.num_chunks else pa.array([], pa.float32())
    return flat.to_numpy(zero_copy_only=False).reshape(-1, dim)


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
