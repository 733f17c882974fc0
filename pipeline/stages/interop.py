"""Interop stage: ``zsl export`` and ``zsl import`` in clip-retrieval's embedding layout.

clip-retrieval's inference writes, and autofaiss and clip-retrieval's index/back read::

    OUT/img_emb/img_emb_{N}.npy          (n, d) image embeddings (float16 by default)
    OUT/text_emb/text_emb_{N}.npy        (n, d) caption embeddings, when captions were embedded
    OUT/metadata/metadata_{N}.parquet    one row per embedding, same order (image_path, caption, url, ...)

``zsl export`` writes part ``N`` (zero-padded to 6 digits, so that readers that sort file names,
as autofaiss does, number the rows in shard order) from the ``N``-th feature shard (the raw features, L2-normalised by
default, or with ``--model`` the model's search vectors: the space ``zsl index`` holds, so an
autofaiss index of them answers text queries like ours). ``zsl import`` turns such a layout, made
anywhere, into a feature directory (and its caption embeddings) that ``zsl train/label/index``
use. Both run under the resume protocol, part by part.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.core.config import ExportConfig, ImportConfig
from pipeline.core.features import (CAPTIONS_DIR, caption_shards, feature_shards, features_identity, iter_shard_batches,
                                    open_captions, open_features, read_caption_shard, shard_name, write_caption_shard,
                                    write_feature_shard)
from pipeline.zsl.models import load_model
from pipeline.core.vectors import l2n
from pipeline.zsl.models.scoring import model_fingerprint
from pipeline.core.resume import OutputDir
from pipeline.core.manifests import CaptionsManifest, ExportManifest, FeaturesManifest, write_manifest

LOG = logging.getLogger(__name__)

__all__ = ["run_export", "run_import"]

_PART = re.compile(r"^img_emb_(\d+)\.npy$")


def run_export(cfg: ExportConfig, *, progress: bool = True) -> ExportManifest:
    """Write ``cfg.features`` in clip-retrieval's layout under ``cfg.output`` (missing parts only)."""
    from tqdm.auto import tqdm

    fman = open_features(cfg.features)
    files = feature_shards(cfg.features)
    model = mman = None
    if cfg.model:
        model, mman = load_model(cfg.model, feature_dim=fman.dim, feature_model=fman.model_id)
    cman = open_captions(cfg.features)
    caps = caption_shards(cfg.features) if cman else {}
    identity = {"features": features_identity(cfg.features, fman), "dtype": cfg.dtype, "normalize": cfg.normalize,
                "model": model_fingerprint(cfg.model, mman) if cfg.model else None,
                "captions": cman.text_model if cman else None}
    dtype = np.float16 if cfg.dtype == "float16" else np.float32
    with OutputDir(cfg.output, job="export", identity=identity, overwrite=cfg.overwrite,
                   owned=("img_emb", "text_emb", "metadata")) as out:
        done = {int(m.group(1)) for f in (zio.list_files(out.join("metadata")) if zio.exists(out.join("metadata")) else [])
                if (m := re.match(r"^metadata_(\d+)\.parquet$", f.rsplit("/", 1)[-1]))}
        todo = [i for i in range(len(files)) if i not in done]
        if todo:
            out.begin()
        dim = fman.dim
        for i in tqdm(todo, desc="export", unit="shard", disable=not progress):
            meta, X = _read_all(files[i], fman.dim)
            V = model.search_images(X) if model is not None else (l2n(X) if cfg.normalize else X)
            dim = V.shape[1]
            zio.write_npy_atomic(out.join("img_emb", f"img_emb_{i:06d}.npy"), V.astype(dtype))
            name = files[i].rsplit("/", 1)[-1]
            if cman:
                _, T = read_caption_shard(cfg.features, caps, files[i], meta.column("image_id"), cman.dim)
                zio.write_npy_atomic(out.join("text_emb", f"text_emb_{i:06d}.npy"), T.astype(dtype))
            # metadata last: it marks the part done
            zpq.write_parquet_atomic(out.join("metadata", f"metadata_{i:06d}.parquet"), pa.table({
                "image_path": meta.column("uri"), "caption": meta.column("caption"), "url": meta.column("url"),
                "key": meta.column("key"), "image_id": meta.column("image_id"), "label": meta.column("label"),
                "shard": pa.array([name] * len(X), pa.string()),
            }))
        if model is not None:
            dim = mman.search_dim or mman.semantic_dim
        manifest = ExportManifest(features_dir=cfg.features, space="model" if model is not None else "features",
                                  model_dir=cfg.model, dim=dim, dtype=cfg.dtype,
                                  normalized=model is not None or cfg.normalize,
                                  text_dim=cman.dim if cman else None,
                                  shards=[f.rsplit("/", 1)[-1] for f in files],
                                  n_rows=sum(zpq.parquet_num_rows(f) for f in files))
        out.finish(manifest)
        return manifest


def _read_all(uri: str, dim: int) -> tuple[pa.Table, np.ndarray]:
    cols = ("image_id", "uri", "label", "caption", "url", "key")
    parts = list(iter_shard_batches(uri, dim, cols))
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in cols}), np.zeros((0, dim), np.float32)
    return pa.concat_tables([t for t, _ in parts]), np.concatenate([x for _, x in parts])


def _parts(root: str, sub: str, prefix: str, suffix: str) -> dict[int, str]:
    d = zio.join(root, sub)
    if not zio.exists(d):
        return {}
    pat = re.compile(rf"^{prefix}_(\d+){re.escape(suffix)}$")
    return {int(m.group(1)): f for f in zio.list_files(d, recursive=False)
            if (m := pat.match(f.rsplit("/", 1)[-1]))}


def _col(meta: pa.Table, names: tuple[str, ...], n: int) -> list:
    name = next((c for c in names if c in meta.column_names), None)
    return meta.column(name).to_pylist() if name else [None] * n


@dataclass(frozen=True)
class _Parts:
    """clip-retrieval's files by part number, ``order`` as its readers number the rows, ``dim`` of img_emb."""

    emb: dict[int, str]
    metas: dict[int, str]
    texts: dict[int, str]
    order: list[int]
    dim: int


def _find_parts(cfg: ImportConfig) -> _Parts:
    """The parts of ``cfg.input``, checked to pair up (each img_emb with its metadata) before any work."""
    emb = _parts(cfg.input, "img_emb", "img_emb", ".npy")
    metas = _parts(cfg.input, "metadata", "metadata", ".parquet")
    texts = _parts(cfg.input, "text_emb", "text_emb", ".npy")
    if not emb:
        raise FileNotFoundError(f"{cfg.input}: no img_emb/img_emb_N.npy files (clip-retrieval's layout)")
    missing = sorted(set(emb) - set(metas))
    if missing:
        raise ValueError(f"{cfg.input}: img_emb_{missing[0]}.npy has no metadata/metadata_{missing[0]}.parquet")
    if texts and not cfg.text_model:
        raise ValueError(f"{cfg.input}: has text_emb/; say which text model made it with text_model")
    # in the order readers (autofaiss's embedding_reader, clip-retrieval) number the rows: by file name
    order = sorted(emb, key=lambda i: emb[i].rsplit("/", 1)[-1])
    first = zio.read_npy(emb[order[0]])
    if first.ndim != 2:
        raise ValueError(f"{emb[order[0]]}: expected a 2-d array, got shape {first.shape}")
    return _Parts(emb, metas, texts, order, int(first.shape[1]))


def _import_part(out: OutputDir, sid: int, i: int, parts: _Parts) -> tuple[int, int | None]:
    """Part ``i`` as feature shard ``sid`` (its caption embeddings first: the features file marks
    the shard done); ``(rows, caption dim or None)``."""
    emb, meta_file = parts.emb[i], parts.metas[i]
    X = zio.read_npy(emb).astype(np.float32)
    meta = zpq.read_parquet(meta_file)
    n = meta.num_rows
    if X.ndim != 2 or X.shape != (n, parts.dim):
        raise ValueError(f"{emb}: shape {X.shape}, expected ({n}, {parts.dim}) to match {meta_file}")
    if not np.isfinite(X).all():
        raise ValueError(f"{emb}: row {int(np.flatnonzero(~np.isfinite(X).all(1))[0])} is not finite")
    ids = [str(v) if v is not None else f"{i}/{r}" for r, v in enumerate(_col(meta, ("image_id", "key"), n))]
    paths = _col(meta, ("image_path", "url", "uri"), n)
    uris = [str(p) if p is not None else f"{emb}::row={r}" for r, p in enumerate(paths)]
    text_dim = None
    if i in parts.texts:
        T = zio.read_npy(parts.texts[i]).astype(np.float32)
        if T.ndim != 2 or len(T) != n:
            raise ValueError(f"{parts.texts[i]}: shape {T.shape}, expected {n} rows like {meta_file}")
        text_dim = T.shape[1]
        write_caption_shard(out.join(CAPTIONS_DIR, "shards", shard_name(sid)), image_ids=ids,
                            has_caption=np.abs(T).sum(1) > 0, X=T)
    write_feature_shard(out.uri, sid, image_ids=ids, uris=uris, X=X, labels=_col(meta, ("label",), n),
                        captions=_col(meta, ("caption",), n), urls=_col(meta, ("url",), n),
                        keys=_col(meta, ("key",), n))
    return n, text_dim


def _write_captions_manifest(out: OutputDir, cfg: ImportConfig, parts: _Parts, text_dim: int | None,
                             n_rows: int) -> None:
    """The manifest of the imported caption embeddings (every shard's, this run's or an earlier one's)."""
    cap_files = list(zpq.iter_parquet_files(out.join(CAPTIONS_DIR, "shards")))
    if text_dim is None:
        text_dim = int(zio.read_npy(parts.texts[parts.order[0]]).shape[1])
    n_caps = sum(int(np.asarray(zpq.read_parquet(f, columns=["has_caption"]).column("has_caption")).sum())
                 for f in cap_files)
    write_manifest(out.join(CAPTIONS_DIR), CaptionsManifest(
        text_model=cfg.text_model, text_model_name=cfg.text_model, dim=text_dim, column="caption",
        n_shards=len(cap_files), n_rows=n_rows, n_captions=n_caps))


def run_import(cfg: ImportConfig, *, progress: bool = True) -> FeaturesManifest:
    """Make a feature directory from clip-retrieval's layout (missing shards only)."""
    from tqdm.auto import tqdm

    parts = _find_parts(cfg)
    rows = {str(i): zpq.parquet_num_rows(parts.metas[i]) for i in parts.order}
    identity = {"input": zio.absolute_uri(cfg.input).rstrip("/"), "model_id": cfg.model_id,
                "text_model": cfg.text_model, "parts": rows}
    with OutputDir(cfg.output, job="import", identity=identity, overwrite=cfg.overwrite,
                   owned=("features", CAPTIONS_DIR)) as out:
        feat_dir = out.join("features")
        done = zpq.parquet_names(feat_dir)
        todo = [(sid, i) for sid, i in enumerate(parts.order) if shard_name(sid) not in done]
        if todo:
            out.begin()
        text_dim = None
        n_images = 0
        for sid, i in tqdm(todo, desc="import", unit="part", disable=not progress):
            n, dim = _import_part(out, sid, i, parts)
            n_images += n
            text_dim = dim if dim is not None else text_dim
        shards = list(zpq.iter_parquet_files(feat_dir))
        total = sum(zpq.parquet_num_rows(f) for f in shards)
        if parts.texts:
            _write_captions_manifest(out, cfg, parts, text_dim, total)
        manifest = FeaturesManifest(model_id=cfg.model_id, dim=parts.dim, n_shards=len(shards), n_images=total,
                                    config={"input": cfg.input, "parts": identity["parts"]},
                                    notes={"imported_from": cfg.input, "layout": "clip-retrieval"})
        out.finish(manifest)
        LOG.info("imported %d embeddings (%d this run) from %s", total, n_images, cfg.input)
        return manifest
