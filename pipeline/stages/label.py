"""Label stage: feature shards -> top-k classes per image, shard by shard, resumably; and add-classes.

Each feature shard ``features/shard-N.parquet`` gives ``OUT/labels/shard-N.parquet`` (atomic).
Runs under the resume protocol: the identity is the model (manifest and weights), the class set,
the features and the settings; a rerun with the same ones labels only the missing shards
(including shards the feature directory gained since), one with others is refused unless
``overwrite``. Everything that could stop the job (feature dimension, model/class-set mismatch)
is checked before anything is written.

``run_add_classes`` extends a class set in place (embedded as the original classes were), after
checking that the model can score the enlarged set, and optionally relabels one labels directory.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from pipeline import io as zio
from pipeline.classset import ClassSet, add_classes, load_class_set
from pipeline.config import AddClassesConfig, LabelConfig
from pipeline.features import check_feature_shards, feature_shards, features_identity, open_features, \
    read_shard_embeddings
from pipeline.models import load_model
from pipeline.models.scoring import check_model_classes, class_scores, model_fingerprint, seen_mask, topk
from pipeline.resume import OutputDir
from pipeline.schema import LABELS_SCHEMA, ClassesManifest, LabelsManifest, read_manifest

LOG = logging.getLogger(__name__)

__all__ = ["run_label", "run_add_classes", "label_table"]


def _lists(flat: pa.Array, shape: tuple[int, int]) -> pa.ListArray:
    """(n*k,) values -> n lists of k, built in one go (no per-row Python objects)."""
    n, k = shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), flat)


def label_table(meta: pa.Table, idx: np.ndarray, vals: np.ndarray, names: np.ndarray,
                unseen: np.ndarray) -> pa.Table:
    """The labels table of one shard: ``meta`` (image_id, uri, label) + top-k class indices and scores."""
    has = len(idx) > 0
    return pa.table({
        "image_id": meta.column("image_id"),
        "uri": meta.column("uri"),
        "label": meta.column("label"),
        "top1": pa.array(names[idx[:, 0]].tolist() if has else [], pa.string()),
        "top1_score": pa.array(vals[:, 0] if has else [], pa.float32()),
        "top1_is_unseen": pa.array(unseen[idx[:, 0]] if has else [], pa.bool_()),
        "topk": _lists(pa.array(names[idx.reshape(-1)].tolist(), pa.string()), idx.shape),
        "topk_scores": _lists(pa.array(vals.reshape(-1).astype(np.float32), pa.float32()), idx.shape),
    }, schema=LABELS_SCHEMA)


def run_label(cfg: LabelConfig, *, progress: bool = True) -> LabelsManifest:
    """Label every feature shard of ``cfg.features`` that ``cfg.output`` lacks; return the manifest."""
    t0 = time.perf_counter()
    fman = open_features(cfg.features)
    model, mman = load_model(cfg.model, feature_dim=fman.dim, feature_model=fman.model_id)
    classes = load_class_set(cfg.classes)
    check_model_classes(model, mman, classes, f"{cfg.model} with {cfg.classes}")
    shards = feature_shards(cfg.features)
    check_feature_shards(shards, fman.dim)
    identity = {"model": model_fingerprint(cfg.model, mman), "classes": classes.manifest.fingerprint,
                "features": features_identity(cfg.features, fman), "top_k": cfg.top_k, "calibrated": cfg.calibrated}
    with OutputDir(cfg.output, job="label", identity=identity, overwrite=cfg.overwrite, owned=("labels",)) as out:
        labels_dir = out.join("labels")
        done = {f.rsplit("/", 1)[-1] for f in zio.iter_parquet_files(labels_dir)} if zio.exists(labels_dir) else set()
        todo = [s for s in shards if s.rsplit("/", 1)[-1] not in done]
        LOG.info("labeling %d feature shards (%d already done) against %d classes", len(todo),
                 len(shards) - len(todo), len(classes.names))
        if todo:
            out.begin()
        n_images = _label_shards(cfg, model, mman, classes, todo, fman.dim, labels_dir, progress)
        manifest = LabelsManifest(
            identity=identity, model_dir=cfg.model, features_dir=cfg.features, classes_dir=cfg.classes,
            classes=list(classes.names), gamma=mman.gamma if cfg.calibrated else 0.0, n_shards=len(shards),
            n_images=sum(zio.parquet_num_rows(f) for f in zio.iter_parquet_files(labels_dir)) if shards else 0,
            n_labeled_this_run=n_images, config=cfg.model_dump(mode="json"),
            seconds_last_run=round(time.perf_counter() - t0, 2))
        out.finish(manifest)
        return manifest


def _label_shards(cfg: LabelConfig, model, mman, classes: ClassSet, todo: list[str], dim: int, labels_dir: str,
                  progress: bool) -> int:
    from tqdm.auto import tqdm

    names = np.asarray(classes.names, dtype=object)
    unseen = ~seen_mask(mman, classes.names)
    n_images = 0
    for uri in tqdm(todo, desc="label", unit="shard", disable=not progress):
        meta, X = read_shard_embeddings(uri, dim, columns=("image_id", "uri", "label"))
        idx_parts, val_parts = [], []
        for i in range(0, len(X), cfg.batch_size):
            s = class_scores(model, mman, X[i : i + cfg.batch_size], classes, calibrated=cfg.calibrated)
            ii, vv = topk(s, cfg.top_k)
            idx_parts.append(ii)
            val_parts.append(vv)
        idx = np.concatenate(idx_parts) if idx_parts else np.zeros((0, min(cfg.top_k, len(names))), np.int64)
        vals = np.concatenate(val_parts) if val_parts else np.zeros(idx.shape, np.float32)
        zio.write_parquet_atomic(zio.join(labels_dir, uri.rsplit("/", 1)[-1]),
                                 label_table(meta, idx, vals, names, unseen))
        n_images += len(X)
    return n_images


def run_add_classes(cfg: AddClassesConfig, *, text_encoder=None,
                    progress: bool = True) -> tuple[ClassesManifest, list[str], LabelsManifest | None]:
    """Add the classes of ``cfg.input`` to the class set ``cfg.classes`` (in place) and, with
    ``cfg.relabel``, relabel that labels directory (and nothing else) against the enlarged set.

    The model must be able to score the enlarged set; that is checked before anything is written.
    Returns the class set's manifest, the added names and the relabelled directory's manifest.
    """
    model, mman = load_model(cfg.model)
    relabel_cfg = None
    if cfg.relabel:
        prev = read_manifest(cfg.relabel, LabelsManifest)
        settings = {k: v for k, v in prev.config.items() if k in LabelConfig.model_fields}
        # the labels are rewritten where the user says, from the features they were made from
        relabel_cfg = LabelConfig(**{**settings, "features": prev.features_dir, "model": cfg.model,
                                     "classes": cfg.classes, "output": cfg.relabel, "overwrite": True})
    def model_can_score(enlarged: ClassSet) -> None:  # before anything is written
        check_model_classes(model, mman, enlarged, f"{cfg.model} cannot score the enlarged class set")

    classes, added = add_classes(cfg.classes, cfg.input, text_encoder=text_encoder, check=model_can_score)
    labels = run_label(relabel_cfg, progress=progress) if relabel_cfg is not None else None
    return classes.manifest, added, labels
