"""Train and evaluate ZSL models under the standard protocol (Xian et al.).

Training only ever sees seen-class features. Calibrated stacking's γ is tuned on a class-wise
split *of the seen classes* (some seen classes act as pseudo-unseen), then the model is refit on
all seen classes. Test-unseen labels are never read here.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from pipeline import io as zio
from pipeline.calibration import split_seen_classes, tune_gamma
from pipeline.config import EvaluateConfig, TrainConfig
from pipeline.evaluation import evaluate_scores
from pipeline.extract import Features, load_features
from pipeline.models import load_model, make_model, save_model
from pipeline.semantics import ClassSet, load_class_set

LOG = logging.getLogger(__name__)

__all__ = ["run_train", "run_evaluate", "model_params", "labelled_indices", "class_scores"]


def model_params(cfg: TrainConfig) -> dict:
    if cfg.method == "eszsl":
        return {"gamma": cfg.eszsl_gamma, "lam": cfg.eszsl_lambda}
    return {"epochs": cfg.epochs, "lr": cfg.lr, "margin": cfg.margin, "ridge": cfg.ridge,
            "weight_decay": cfg.weight_decay, "seed": cfg.seed}


def labelled_indices(feats: Features, classes: ClassSet, wanted: list[str], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose label is in ``wanted`` and their class index into ``classes`` (error if a class has none)."""
    pos = {n: i for i, n in enumerate(classes.names)}
    rows, cls = [], []
    for i, lab in enumerate(feats.labels):
        if lab in wanted:
            rows.append(i)
            cls.append(pos[lab])
    present = {classes.names[c] for c in cls}
    empty = [w for w in wanted if w not in present]
    if empty:
        raise ValueError(f"{where}: no images labelled {', '.join(empty)} "
                         f"(labels present: {', '.join(sorted({l for l in feats.labels if l}))})")
    return np.asarray(rows, np.int64), np.asarray(cls, np.int64)


def _fit(cfg: TrainConfig, X, cls_global, class_ids: list[int], S_all):
    local = {c: i for i, c in enumerate(class_ids)}
    y = np.asarray([local[c] for c in cls_global], np.int64)
    return make_model(cfg.method, **model_params(cfg)).fit(X, y, S_all[class_ids])


def run_train(cfg: TrainConfig) -> dict:
    t0 = time.perf_counter()
    feats = load_features(cfg.features)
    classes = load_class_set(cfg.classes)
    seen_ids = classes.index_of(list(cfg.seen), "seen class")
    S = classes.semantics(cfg.semantics)
    rows, cls = labelled_indices(feats, classes, list(cfg.seen), cfg.features)
    X = feats.X[rows]
    LOG.info("training %s on %d images of %d seen classes (%s semantics, %d-d)",
             cfg.method, len(rows), len(seen_ids), cfg.semantics, S.shape[1])
    gamma, calib = 0.0, None
    if cfg.calibration:
        train_m, val_m, p_seen, p_unseen = split_seen_classes(
            cls, seen_ids, val_class_fraction=cfg.val_class_fraction,
            val_sample_fraction=cfg.val_sample_fraction, seed=cfg.seed)
        sub = _fit(cfg, X[train_m], cls[train_m], list(p_seen), S)
        val_ids = list(p_seen) + list(p_unseen)
        pos = {c: i for i, c in enumerate(val_ids)}
        scores = sub.scores(X[val_m], S[val_ids])
        y_val = np.asarray([pos[c] for c in cls[val_m]])
        gamma, info = tune_gamma(scores, y_val, list(range(len(p_seen))),
                                 list(range(len(p_seen), len(val_ids))))
        calib = {"gamma": float(gamma), "pseudo_unseen": [classes.names[c] for c in p_unseen],
                 "n_val": int(val_m.sum()), **{k: v for k, v in info.items() if k != "gammas"}}
        LOG.info("calibrated stacking: gamma=%.4f (pseudo-unseen: %s)", gamma, ", ".join(calib["pseudo_unseen"]))
    model = _fit(cfg, X, cls, seen_ids, S)
    if cfg.semantics == "text":
        model.fit_search_centers(X, S[seen_ids])
    manifest = {
        "feature_model": feats.manifest["model_id"],
        "feature_dim": int(feats.manifest["dim"]),
        "semantics": cfg.semantics,
        "semantic_dim": int(S.shape[1]),
        "text_model": classes.manifest.get("text_model"),
        "text_model_name": classes.manifest.get("text_model_name"),
        "text_pretrained": classes.manifest.get("pretrained"),
        "templates": classes.manifest.get("templates"),
        "seen": list(cfg.seen),
        "gamma": float(gamma),
        "calibration": calib,
        "train_features": cfg.features,
        "train_features_fingerprint": zio.fingerprint(feats.manifest),
        "n_train": int(len(rows)),
        "config": cfg.model_dump(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    save_model(cfg.output, model, manifest)
    return manifest


def class_scores(model, manifest: dict, X: np.ndarray, classes: ClassSet, *, calibrated: bool) -> np.ndarray:
    """Scores of images against every class of ``classes``; γ subtracted from seen classes if calibrated."""
    S = classes.semantics(manifest["semantics"])
    if S.shape[1] != manifest["semantic_dim"]:
        raise ValueError(f"class semantics are {S.shape[1]}-d, the model expects {manifest['semantic_dim']}-d "
                         "(were the classes embedded with another text model or attribute table?)")
    if manifest.get("text_model") and classes.manifest.get("text_model") != manifest["text_model"]:
        raise ValueError(f"classes were embedded with '{classes.manifest.get('text_model')}', "
                         f"the model was trained with '{manifest['text_model']}'")
    scores = model.scores(X, S)
    if calibrated and manifest.get("gamma"):
        seen = set(manifest["seen"])
        scores = scores - manifest["gamma"] * np.array([n in seen for n in classes.names], np.float32)
    return scores


def run_evaluate(cfg: EvaluateConfig) -> dict:
    feats = load_features(cfg.features)
    model, manifest = load_model(cfg.model, feature_dim=int(feats.manifest["dim"]),
                                 feature_model=feats.manifest["model_id"])
    if (manifest.get("train_features_fingerprint") == zio.fingerprint(feats.manifest)
            and not cfg.allow_train_features):
        raise ValueError(f"{cfg.features} are the features the model was trained on; evaluate on held-out "
                         "features (or pass --allow-train-features to do it anyway)")
    classes = load_class_set(cfg.classes)
    seen, unseen = list(manifest["seen"]), list(cfg.unseen)
    overlap = set(seen) & set(unseen)
    if overlap:
        raise ValueError(f"classes both seen (trained on) and unseen: {', '.join(sorted(overlap))}")
    names = seen + unseen
    idx = classes.index_of(names)
    sub = ClassSet([classes.names[i] for i in idx], [classes.descriptions[i] for i in idx], classes.text[idx],
                   None if classes.attributes is None else classes.attributes[idx], classes.manifest)
    rows_u, y_u = labelled_indices(feats, sub, unseen, cfg.features)
    seen_present = [s for s in seen if s in set(feats.labels)]
    rows_s, y_s = (labelled_indices(feats, sub, seen_present, cfg.features) if seen_present
                   else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    rows = np.concatenate([rows_s, rows_u])
    y = np.concatenate([y_s, y_u])
    scores = class_scores(model, manifest, feats.X[rows], sub, calibrated=False)
    result = evaluate_scores(scores, y, class_names=names, seen_idx=list(range(len(seen))),
                             unseen_idx=list(range(len(seen), len(names))), gamma=float(manifest.get("gamma", 0.0)))
    result.update({"method": manifest["method"], "model": cfg.model, "features": cfg.features,
                   "seen": seen, "unseen": unseen, "semantics": manifest["semantics"]})
    return result
