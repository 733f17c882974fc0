"""Bulk labeling: feature shards -> top-k classes per image, shard by shard, resumably.

Each feature shard ``features/shard-N.parquet`` gives ``OUT/labels/shard-N.parquet`` (atomic).
``OUT/run.json`` records the model, the class set and the features' identity; a rerun with the
same ones only labels the missing shards (including shards the feature directory gained since),
and a rerun with other ones is refused unless ``overwrite``. Everything that could stop the job
(feature dimension, model/class-set mismatch) is checked before anything is written, and
``OUT/manifest.json`` exists only while every feature shard has its label shard.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from pipeline import io as zio
from pipeline.config import LabelConfig
from pipeline.extract import check_feature_shards, features_identity, read_features_manifest, table_embeddings
from pipeline.models import load_model
from pipeline.schema import LABELS_SCHEMA
from pipeline.semantics import ClassSet, load_class_set
from pipeline.training import class_scores

LOG = logging.getLogger(__name__)

__all__ = ["run_label", "topk", "check_model_classes", "model_fingerprint"]

LABELS_FORMAT = "zsl-labels/1"


def _lists(flat: pa.Array, shape: tuple[int, int]) -> pa.ListArray:
    """(n*k,) values -> n lists of k, built in one go (no per-row Python objects)."""
    n, k = shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), flat)


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` best columns per row, best first (ties: lower index first)."""
    k = min(k, scores.shape[1])
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(scores, idx, axis=1)


def model_fingerprint(model_dir: str, manifest: dict) -> str:
    """What a model is: its manifest *and* its weights (two trainings may share a manifest)."""
    weights = zio.join(model_dir, "weights.safetensors")
    return zio.fingerprint({"manifest": manifest, "weights": zio.sha256_file(weights)})


def _identity(cfg: LabelConfig, model_manifest: dict, classes_manifest: dict, feats_manifest: dict) -> dict:
    return {
        "model": model_fingerprint(cfg.model, model_manifest),
        "classes": classes_manifest.get("fingerprint"),
        "features": features_identity(cfg.features, feats_manifest),
        "top_k": cfg.top_k,
        "calibrated": cfg.calibrated,
    }


def check_model_classes(model, mman: dict, classes: ClassSet, dim: int, where: str) -> None:
    """Score one blank image against ``classes`` so that any mismatch (dimensions, text model, missing
    semantics, attribute names) stops the job before it writes anything."""
    want, have = mman.get("attribute_names"), classes.manifest.get("attribute_names")
    if "attributes" in mman["semantics"].split("+") and want and have and list(want) != list(have):
        raise ValueError(f"{where}: the class set's attributes ({len(have)}: {', '.join(have[:3])}, ...) are not "
                         f"the {len(want)} the model was trained on ({', '.join(want[:3])}, ...)")
    try:
        s = class_scores(model, mman, np.zeros((1, dim), np.float32), classes, calibrated=False)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if s.shape != (1, len(classes.names)):
        raise ValueError(f"{where}: model gives scores of shape {s.shape} for 1 image and {len(classes.names)} classes")


def run_label(cfg: LabelConfig, *, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    fman = read_features_manifest(cfg.features)
    dim = int(fman["dim"])
    model, mman = load_model(cfg.model, feature_dim=dim, feature_model=fman["model_id"])
    classes = load_class_set(cfg.classes)
    check_model_classes(model, mman, classes, dim, f"{cfg.model} with {cfg.classes}")
    shards = list(zio.iter_parquet_files(zio.join(cfg.features, "features")))
    check_feature_shards(shards, dim)
    with zio.output_lock(cfg.output):
        return _label_locked(cfg, fman, dim, model, mman, classes, shards, t0, progress)


def _label_locked(cfg: LabelConfig, fman: dict, dim: int, model, mman: dict, classes: ClassSet,
                  shards: list[str], t0: float, progress: bool) -> dict:
    from tqdm.auto import tqdm

    seen = set(mman["seen"])
    unseen_mask = np.array([n not in seen for n in classes.names])
    names = np.asarray(classes.names, dtype=object)
    ident = _identity(cfg, mman, classes.manifest, fman)
    labels_dir = zio.join(cfg.output, "labels")
    run_uri = zio.join(cfg.output, "run.json")
    if zio.exists(run_uri) and zio.read_json(run_uri) != ident:
        if not cfg.overwrite:
            raise ValueError(f"{cfg.output} holds labels from another model, class set or setting "
                             "(or other features); use a new --output or --overwrite")
        LOG.warning("%s: model/classes changed; relabeling every shard", cfg.output)
        zio.remove(zio.join(cfg.output, "manifest.json"))
        zio.remove(labels_dir)  # before run.json: a kill in between leaves the old identity, nothing to mix
    zio.remove_temp_files(cfg.output)
    zio.write_json_atomic(run_uri, ident)
    done = ({f.rsplit("/", 1)[-1] for f in zio.iter_parquet_files(labels_dir)} if zio.exists(labels_dir) else set())
    todo = [s for s in shards if s.rsplit("/", 1)[-1] not in done]
    LOG.info("labeling %d feature shards (%d already done) against %d classes", len(todo), len(shards) - len(todo),
             len(names))
    if todo:
        zio.remove(zio.join(cfg.output, "manifest.json"))  # an unfinished output never looks finished
    n_images = 0
    for uri in tqdm(todo, desc="label", unit="shard", disable=not progress):
        table = zio.read_parquet(uri, columns=["image_id", "uri", "label", "embedding"])
        X = table_embeddings(table, dim, uri)
        idx_parts, val_parts = [], []
        for i in range(0, len(X), cfg.batch_size):
            s = class_scores(model, mman, X[i : i + cfg.batch_size], classes, calibrated=cfg.calibrated)
            ii, vv = topk(s, cfg.top_k)
            idx_parts.append(ii)
            val_parts.append(vv)
        idx = np.concatenate(idx_parts) if idx_parts else np.zeros((0, min(cfg.top_k, len(names))), np.int64)
        vals = np.concatenate(val_parts) if val_parts else np.zeros(idx.shape, np.float32)
        out = pa.table({
            "image_id": table.column("image_id"),
            "uri": table.column("uri"),
            "label": table.column("label"),
            "top1": pa.array(names[idx[:, 0]].tolist() if len(idx) else [], pa.string()),
            "top1_score": pa.array(vals[:, 0] if len(idx) else [], pa.float32()),
            "top1_is_unseen": pa.array(unseen_mask[idx[:, 0]] if len(idx) else [], pa.bool_()),
            "topk": _lists(pa.array(names[idx.reshape(-1)].tolist(), pa.string()), idx.shape),
            "topk_scores": _lists(pa.array(vals.reshape(-1).astype(np.float32), pa.float32()), idx.shape),
        }, schema=LABELS_SCHEMA)
        zio.write_parquet_atomic(zio.join(labels_dir, uri.rsplit("/", 1)[-1]), out)
        n_images += len(X)
    manifest = {
        "format": LABELS_FORMAT,
        **ident,
        "model_dir": cfg.model,
        "features_dir": cfg.features,
        "classes_dir": cfg.classes,
        "classes": list(classes.names),
        "gamma": mman.get("gamma") if cfg.calibrated else 0.0,
        "n_shards": len(shards),
        "n_images": sum(zio.parquet_num_rows(f) for f in zio.iter_parquet_files(labels_dir)) if shards else 0,
        "n_labeled_this_run": n_images,
        "config": cfg.model_dump(),
        "seconds_last_run": round(time.perf_counter() - t0, 2),
    }
    zio.write_json_atomic(zio.join(cfg.output, "manifest.json"), manifest)
    return manifest
