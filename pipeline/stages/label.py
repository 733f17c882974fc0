"""Label stage: feature shards -> top-k classes per image, shard by shard, resumably; and add-classes.

Each feature shard ``features/shard-N.parquet`` gives ``OUT/labels/shard-N.parquet`` (atomic), read
and written row group by row group, so memory does not grow with the shard or the dataset. With
``address`` (a Ray cluster) the shards are labelled by a Ray Data actor pool whose workers read
the feature shards and write the labels shards themselves, under the same names and guarantees.
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
from functools import partial

import numpy as np
import pyarrow as pa

from pipeline.cluster.shard_jobs import map_shards
from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.semantics.classset import ClassSet, add_classes, load_class_set
from pipeline.core.config import AddClassesConfig, LabelConfig
from pipeline.core.features import check_feature_shards, feature_shards, features_identity, iter_shard_batches, \
    open_features
from pipeline.zsl.models import load_model
from pipeline.zsl.models.scoring import check_model_classes, class_scores, model_fingerprint, seen_mask
from pipeline.core.vectors import topk
from pipeline.core.resume import OutputDir
from pipeline.core.schema import LABELS_SCHEMA
from pipeline.core.manifests import ClassesManifest, LabelsManifest, read_manifest
from pipeline.core.timing import timed

LOG = logging.getLogger(__name__)

__all__ = ["run_label", "run_add_classes", "label_table"]


def _lists(flat: pa.Array, shape: tuple[int, int]) -> pa.ListArray:
    """(n*k,) values -> n lists of k, built in one go (no per-row Python objects)."""
    n, k = shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), flat)


def label_table(meta: pa.Table, idx: np.ndarray, vals: np.ndarray, names: np.ndarray | pa.Array,
                unseen: np.ndarray) -> pa.Table:
    """The labels table of one shard: ``meta`` (image_id, uri, label) + top-k class indices and scores.

    Class names are taken from ``names`` by index in Arrow (no Python string per row).
    """
    import pyarrow.compute as pc

    names = names if isinstance(names, pa.Array) else pa.array(list(names), pa.string())
    k = idx.shape[1] if idx.ndim == 2 else 0
    flat = pa.array(idx.reshape(-1), pa.int32())
    has = len(idx) > 0 and k > 0
    return pa.table({
        "image_id": meta.column("image_id"),
        "uri": meta.column("uri"),
        "label": meta.column("label"),
        "top1": pc.take(names, pa.array(idx[:, 0], pa.int32())) if has else pa.array([], pa.string()),
        "top1_score": pa.array(vals[:, 0] if has else [], pa.float32()),
        "top1_is_unseen": pa.array(unseen[idx[:, 0]] if has else [], pa.bool_()),
        "topk": _lists(pc.take(names, flat), idx.shape),
        "topk_scores": _lists(pa.array(vals.reshape(-1).astype(np.float32), pa.float32()), idx.shape),
    }, schema=LABELS_SCHEMA)


def run_label(cfg: LabelConfig, *, progress: bool = True) -> LabelsManifest:
    """Label every feature shard of ``cfg.features`` that ``cfg.output`` lacks; return the manifest."""
    with timed() as took:
        fman = open_features(cfg.features)
        model, mman = load_model(cfg.model, feature_dim=fman.dim, feature_model=fman.model_id)
        classes = load_class_set(cfg.classes)
        check_model_classes(model, mman, classes, f"{cfg.model} with {cfg.classes}")
        shards = feature_shards(cfg.features)
        check_feature_shards(shards, fman.dim)
        identity = {"model": model_fingerprint(cfg.model, mman), "classes": classes.manifest.fingerprint,
                    "features": features_identity(cfg.features, fman), "top_k": cfg.top_k,
                    "calibrated": cfg.calibrated}
        with OutputDir(cfg.output, job="label", identity=identity, overwrite=cfg.overwrite, owned=("labels",)) as out:
            labels_dir = out.join("labels")
            done = zpq.parquet_names(labels_dir)
            todo = [s for s in shards if s.rsplit("/", 1)[-1] not in done]
            LOG.info("labeling %d feature shards (%d already done) against %d classes", len(todo),
                     len(shards) - len(todo), len(classes.names))
            if todo:
                out.begin()
            n_images = _label_shards(cfg, model, mman, classes, todo, fman.dim, labels_dir, progress)
            manifest = LabelsManifest(
                identity=identity, model_dir=cfg.model, features_dir=cfg.features, classes_dir=cfg.classes,
                classes=list(classes.names), gamma=mman.gamma if cfg.calibrated else 0.0, n_shards=len(shards),
                n_images=zpq.dir_num_rows(labels_dir) if shards else 0,
                n_labeled_this_run=n_images, config=cfg.model_dump(mode="json"),
                seconds_last_run=round(took.elapsed(), 2))
            out.finish(manifest)
            return manifest


class _ShardLabeler:
    """Labels one feature shard into ``labels_dir`` (same name), streaming row group by row group."""

    def __init__(self, cfg: LabelConfig, dim: int, labels_dir: str, loaded=None) -> None:
        if loaded is None:
            model, mman = load_model(cfg.model, feature_dim=dim)
            loaded = (model, mman, load_class_set(cfg.classes))
        self.model, self.mman, self.classes = loaded
        self.cfg, self.dim, self.labels_dir = cfg, dim, labels_dir
        self.names = pa.array(list(self.classes.names), pa.string())
        self.unseen = ~seen_mask(self.mman, self.classes.names)

    def __call__(self, uri: str) -> dict:
        n = 0
        with zpq.atomic_parquet_writer(zio.join(self.labels_dir, uri.rsplit("/", 1)[-1]), LABELS_SCHEMA) as w:
            for meta, X in iter_shard_batches(uri, self.dim, ("image_id", "uri", "label"), self.cfg.batch_size):
                s = class_scores(self.model, self.mman, X, self.classes, calibrated=self.cfg.calibrated)
                idx, vals = topk(s, self.cfg.top_k)
                w.write_table(label_table(meta, idx, vals, self.names, self.unseen))
                n += len(X)
        return {"shard": uri, "rows": n}


def _labeler(cfg_json: dict, dim: int, labels_dir: str) -> _ShardLabeler:
    """Picklable factory of a labeler (a Ray worker loads model and classes itself)."""
    return _ShardLabeler(LabelConfig(**cfg_json), dim, labels_dir)


def _label_shards(cfg: LabelConfig, model, mman, classes: ClassSet, todo: list[str], dim: int, labels_dir: str,
                  progress: bool) -> int:
    """Label the ``todo`` shards (here with the model already loaded, or on the Ray cluster at
    ``cfg.address``); return how many images were labelled."""
    done = map_shards(todo, partial(_labeler, cfg.model_dump(mode="json"), dim, labels_dir), address=cfg.address,
                      what="label shards", num_workers=cfg.num_workers, progress=progress,
                      local=partial(_ShardLabeler, cfg, dim, labels_dir, loaded=(model, mman, classes)))
    return sum(r["rows"] for r in done)


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
