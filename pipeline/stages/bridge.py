"""Bridge stage (``zsl bridge``): captioned images -> a bridge model into the text model's space.

The pairs are the feature rows that have a caption embedding (``zsl embed-text``). Rows whose
image is also in an ``exclude`` feature directory (an evaluation set: same features, cosine >=
0.999) are dropped first, and counted in the manifest. The output is a model directory like any
``zsl train`` output (``weights.safetensors`` + ``manifest.json``, text semantics, no seen
classes), so ``zsl label``, ``zsl index``/``search``/``serve`` and ``zsl evaluate`` use it as they
use a class-trained model: images of any backbone become searchable by text, and classable by name.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.core import fs as zio
from pipeline.core.config import BridgeConfig
from pipeline.core.features import CAPTIONS_DIR, caption_shards, feature_shards, features_identity, iter_shard_batches, \
    open_captions, open_features, read_caption_shard
from pipeline.zsl.models import make_model, save_model
from pipeline.core.vectors import l2n
from pipeline.zsl.models.bridge import fit_ridge_bridge
from pipeline.core.resume import OutputDir
from pipeline.core.manifests import ModelManifest
from pipeline.core.timing import timed

LOG = logging.getLogger(__name__)

__all__ = ["run_bridge", "load_pairs", "drop_overlap"]

_METHOD = {"ridge": "bridge", "contrastive": "bridge-contrastive", "asif": "asif"}


def load_pairs(features: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(X, T, image_ids)`` of the rows with a caption embedding, in shard order."""
    fman = open_features(features)
    cman = open_captions(features)
    if cman is None:
        raise ValueError(f"{features}: no caption embeddings; run `zsl embed-text --features {features}` first")
    caps = caption_shards(features)
    xs, ts, ids = [], [], []
    for f in feature_shards(features):
        parts = list(iter_shard_batches(f, fman.dim, ("image_id",)))
        X = np.concatenate([x for _, x in parts]) if parts else np.zeros((0, fman.dim), np.float32)
        sid = sum((t.column("image_id").to_pylist() for t, _ in parts), [])
        has, T = read_caption_shard(features, caps, f, sid, cman.dim)
        xs.append(X[has])
        ts.append(T[has])
        ids += [i for i, h in zip(sid, has) if h]
    if not ids:
        raise ValueError(f"{features}: no row has a caption")
    return np.concatenate(xs), np.concatenate(ts).astype(np.float32), ids


def drop_overlap(X: np.ndarray, exclude: list[np.ndarray], *, threshold: float = 0.999,
                 block: int = 4096) -> np.ndarray:
    """Boolean mask of the rows of ``X`` to keep: those with no near-duplicate (cosine >= threshold)
    among the rows of any ``exclude`` matrix."""
    keep = np.ones(len(X), bool)
    Xn = l2n(X)
    for E in exclude:
        En = l2n(E)
        for s in range(0, len(Xn), block):
            sims = Xn[s:s + block] @ En.T
            keep[s:s + block] &= ~(sims >= threshold).any(axis=1) if sims.size else True
    return keep


def run_bridge(cfg: BridgeConfig) -> ModelManifest:
    """Fit the bridge; write the model directory (refitted only when its inputs or settings change)."""
    with timed() as clock:
        fman = open_features(cfg.features)
        cman = open_captions(cfg.features)
        identity = {"features": features_identity(cfg.features, fman),
                    "captions": zio.fingerprint(cman.to_json()) if cman else None,
                    "method": cfg.method, "params": cfg.params, "exclude": list(cfg.exclude),
                    "max_pairs": cfg.max_pairs, "seed": cfg.seed, "templates": list(cfg.templates)}
        with OutputDir(cfg.output, job="bridge", identity=identity, overwrite=cfg.overwrite,
                       owned=("weights.safetensors",)) as out:
            if (done := out.already_done(ModelManifest, "bridge of these pairs with these settings")) is not None:
                return done
            X, T, _ = load_pairs(cfg.features)
            n_all = len(X)
            X, T, overlap = _drop_excluded(cfg, fman, X, T)
            if cfg.max_pairs and len(X) > cfg.max_pairs:
                pick = np.sort(np.random.default_rng(cfg.seed).choice(len(X), cfg.max_pairs, replace=False))
                X, T = X[pick], T[pick]
            out.begin()
            model, tuning = _fit_bridge(cfg, X, T)
            return save_model(cfg.output, model, {
                "feature_model": fman.model_id, "feature_dim": fman.dim, "semantics": "text",
                "semantic_dim": int(T.shape[1]), "search_dim": getattr(model, "search_dim", None),
                "text_model": cman.text_model, "text_model_name": cman.text_model_name,
                "text_pretrained": cman.text_pretrained, "templates": list(cfg.templates), "seen": [],
                "tuning": tuning, "train_features": cfg.features,
                "train_features_fingerprint": identity["features"], "n_train": int(len(X)),
                "config": {**cfg.model_dump(mode="json"), "pairs_with_captions": n_all, "overlap_dropped": overlap,
                           "corpus": f"{cfg.features}/{CAPTIONS_DIR}"},
                "seconds": round(clock.elapsed(), 2)})


def _drop_excluded(cfg: BridgeConfig, fman, X: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The pairs whose image is in none of ``cfg.exclude``'s feature directories, and how many were dropped."""
    if not cfg.exclude:
        return X, T, 0
    other = []
    for d in cfg.exclude:
        om = open_features(d)
        if om.dim != fman.dim or om.model_id != fman.model_id:
            raise ValueError(f"{d}: {om.model_id} {om.dim}-d features; the corpus has {fman.model_id} "
                             f"{fman.dim}-d, so its images cannot be compared")
        other.append(np.concatenate([x for f in feature_shards(d) for _, x in iter_shard_batches(f, om.dim)]))
    keep = drop_overlap(X, other)
    overlap = int((~keep).sum())
    LOG.info("dropped %d corpus images also in %s", overlap, ", ".join(cfg.exclude))
    return X[keep], T[keep], overlap


def _fit_bridge(cfg: BridgeConfig, X: np.ndarray, T: np.ndarray) -> tuple:
    """The bridge fitted on the pairs (ridge's λ tuned on held-out pairs unless given), and its tuning record."""
    tuning = None
    if cfg.method == "ridge" and "lam" not in cfg.params:
        model, tuning = fit_ridge_bridge(X, T, seed=cfg.seed)
    else:
        model = make_model(_METHOD[cfg.method], **cfg.params).fit_pairs(X, T)
    model.fit_search_centers(X, T)
    LOG.info("%s bridge fitted on %d (image, caption) pairs (%d-d -> %d-d)", cfg.method, len(X), X.shape[1],
             T.shape[1])
    return model, tuning
