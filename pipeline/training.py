"""Train and evaluate ZSL models under the standard protocol (Xian et al.).

Training only ever sees seen-class features. Hyper-parameters (``tune``) and calibrated
stacking's γ are chosen on a class-wise split *of the seen classes* (some seen classes act as
pseudo-unseen); the model is then refit on all seen classes. Test-unseen labels are never read here.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np

from pipeline import io as zio
from pipeline.calibration import split_seen_classes, tune_gamma
from pipeline.config import EvaluateConfig, TrainConfig
from pipeline.evaluation import confusion_matrix, evaluate_scores, mean_per_class_accuracy
from pipeline.extract import Features, load_features
from pipeline.models import load_model, make_model, method_params, save_model
from pipeline.semantics import ClassSet, load_class_set

LOG = logging.getLogger(__name__)

__all__ = ["run_train", "run_evaluate", "run_evaluate_all", "results_table", "labelled_indices", "class_scores", "fit_model"]

MAX_GRID = 32


def labelled_indices(feats: Features, classes: ClassSet, wanted: list[str], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose label is in ``wanted`` and their class index into ``classes`` (error if a class has none)."""
    pos = {n: i for i, n in enumerate(classes.names)}
    wanted_set = set(wanted)
    rows = [i for i, lab in enumerate(feats.labels) if lab in wanted_set]
    cls = [pos[feats.labels[i]] for i in rows]
    present = {classes.names[c] for c in cls}
    empty = [w for w in wanted if w not in present]
    if empty:
        raise ValueError(f"{where}: no images labelled {', '.join(empty)} "
                         f"(labels present: {', '.join(sorted({l for l in feats.labels if l}))})")
    return np.asarray(rows, np.int64), np.asarray(cls, np.int64)


def _method_kwargs(cfg: TrainConfig, overrides: dict | None = None) -> dict:
    if cfg.method == "ensemble":
        if len(cfg.members) < 2:
            raise ValueError("method 'ensemble' needs at least two --members (e.g. devise,eszsl)")
        weights = list(cfg.member_weights) or [1.0] * len(cfg.members)
        if len(weights) != len(cfg.members):
            raise ValueError(f"{len(cfg.members)} ensemble members but {len(weights)} weights")
        members = []
        for m in cfg.members:
            p = dict(cfg.params.get(m, {})) if isinstance(cfg.params.get(m), dict) else {}
            if "seed" in method_params(m):
                p.setdefault("seed", cfg.seed)
            members.append({"method": m, "params": p})
        return {"members": members, "weights": weights}
    params = {**cfg.params, **(overrides or {})}
    if "seed" in method_params(cfg.method):
        params.setdefault("seed", cfg.seed)
    return params


def fit_model(method: str, kwargs: dict, X, cls_global, class_ids: list[int], S_all):
    """Fit ``method`` on rows ``X`` whose classes (indices into ``S_all``) are ``cls_global``."""
    local = {c: i for i, c in enumerate(class_ids)}
    y = np.asarray([local[c] for c in cls_global], np.int64)
    return make_model(method, **kwargs).fit(X, y, S_all[class_ids])


def _tune(cfg: TrainConfig, X, cls, split, S) -> tuple[dict, dict]:
    """Pick hyper-parameters by ZSL accuracy on the pseudo-unseen classes (never test classes)."""
    from pipeline.models import METHODS

    train_m, val_m, p_seen, p_unseen = split
    # values the user fixed (--param) are not searched
    grid = {k: v for k, v in METHODS[cfg.method].grid.items() if k not in cfg.params}
    if not grid:
        return {}, {"grid": {}, "note": f"{cfg.method} has no hyper-parameters to tune"}
    keys = sorted(grid)
    combos = list(itertools.product(*(grid[k] for k in keys)))[:MAX_GRID]
    u_rows = val_m & np.isin(cls, p_unseen)
    pos = {c: i for i, c in enumerate(p_unseen)}
    y_u = np.asarray([pos[c] for c in cls[u_rows]])
    results = []
    for combo in combos:
        over = dict(zip(keys, combo))
        model = fit_model(cfg.method, _method_kwargs(cfg, over), X[train_m], cls[train_m], list(p_seen), S)
        acc = mean_per_class_accuracy(y_u, np.argmax(model.scores(X[u_rows], S[list(p_unseen)]), axis=1))
        results.append({"params": over, "val_zsl": float(acc)})
        LOG.info("tune %s %s: val ZSL %.3f", cfg.method, over, acc)
    best = max(results, key=lambda r: r["val_zsl"])
    return best["params"], {"grid": grid, "results": results, "chosen": best}


def run_train(cfg: TrainConfig) -> dict:
    t0 = time.perf_counter()
    feats = load_features(cfg.features)
    classes = load_class_set(cfg.classes)
    seen_ids = classes.index_of(list(cfg.seen), "seen class")
    S = classes.semantics(cfg.semantics, cfg.semantic_weights)
    rows, cls = labelled_indices(feats, classes, list(cfg.seen), cfg.features)
    X = feats.X[rows]
    LOG.info("training %s on %d images of %d seen classes (%s semantics, %d-d)",
             cfg.method, len(rows), len(seen_ids), cfg.semantics, S.shape[1])
    needs_split = cfg.calibration or cfg.tune
    split = (split_seen_classes(cls, seen_ids, val_class_fraction=cfg.val_class_fraction,
                                val_sample_fraction=cfg.val_sample_fraction, seed=cfg.seed)
             if needs_split else None)
    chosen, tuning = {}, None
    if cfg.tune:
        if cfg.method == "ensemble":
            raise ValueError("--tune is not supported for ensembles; tune each member and pass --set params=...")
        chosen, tuning = _tune(cfg, X, cls, split, S)
    kwargs = _method_kwargs(cfg, chosen)
    gamma, calib = 0.0, None
    if cfg.calibration:
        train_m, val_m, p_seen, p_unseen = split
        sub = fit_model(cfg.method, kwargs, X[train_m], cls[train_m], list(p_seen), S)
        val_ids = list(p_seen) + list(p_unseen)
        pos = {c: i for i, c in enumerate(val_ids)}
        scores = sub.scores(X[val_m], S[val_ids])
        y_val = np.asarray([pos[c] for c in cls[val_m]])
        gamma, info = tune_gamma(scores, y_val, list(range(len(p_seen))), list(range(len(p_seen), len(val_ids))))
        calib = {"gamma": float(gamma), "pseudo_unseen": [classes.names[c] for c in p_unseen],
                 "n_val": int(val_m.sum()), **{k: v for k, v in info.items() if k in ("seen", "unseen", "H")}}
        shown = calib["pseudo_unseen"][:8] + (["..."] if len(calib["pseudo_unseen"]) > 8 else [])
        LOG.info("calibrated stacking: gamma=%.4f (%d pseudo-unseen classes: %s)", gamma,
                 len(calib["pseudo_unseen"]), ", ".join(shown))
    model = fit_model(cfg.method, kwargs, X, cls, seen_ids, S)
    if "text" in cfg.semantics.split("+"):
        try:
            model.fit_search_centers(X, S[seen_ids])
        except NotImplementedError:
            LOG.info("%s does not map images into the text space; its models cannot back `zsl index`", cfg.method)
    manifest = {
        "feature_model": feats.manifest["model_id"],
        "feature_dim": int(feats.manifest["dim"]),
        "semantics": cfg.semantics,
        "semantic_weights": dict(cfg.semantic_weights),
        "semantic_dim": int(S.shape[1]),
        "text_model": classes.manifest.get("text_model"),
        "text_model_name": classes.manifest.get("text_model_name"),
        "text_pretrained": classes.manifest.get("pretrained"),
        "templates": classes.manifest.get("templates"),
        "attribute_names": classes.manifest.get("attribute_names"),
        "seen": list(cfg.seen),
        "gamma": float(gamma),
        "calibration": calib,
        "tuning": tuning,
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
    S = _semantics_for(manifest, classes)
    scores = model.scores(X, S)
    if calibrated and manifest.get("gamma"):
        scores = scores - manifest["gamma"] * _seen_mask(manifest, classes)
    return scores


def _seen_mask(manifest: dict, classes: ClassSet) -> np.ndarray:
    seen = set(manifest["seen"])
    return np.array([n in seen for n in classes.names], np.float32)


def _semantics_for(manifest: dict, classes: ClassSet) -> np.ndarray:
    S = classes.semantics(manifest["semantics"], manifest.get("semantic_weights"))
    if S.shape[1] != manifest["semantic_dim"]:
        raise ValueError(f"class semantics are {S.shape[1]}-d, the model expects {manifest['semantic_dim']}-d "
                         "(were the classes embedded with another text model or attribute table?)")
    if ("text" in manifest["semantics"].split("+") and manifest.get("text_model")
            and classes.manifest.get("text_model") != manifest["text_model"]):
        raise ValueError(f"classes were embedded with '{classes.manifest.get('text_model')}', "
                         f"the model was trained with '{manifest['text_model']}'")
    return S


def run_evaluate(cfg: EvaluateConfig, model_dir: str | None = None) -> dict:
    """Evaluate one model (``model_dir`` or ``cfg.model``) on held-out test features."""
    model_dir = model_dir or cfg.models[0]
    feats = load_features(cfg.features)
    model, manifest = load_model(model_dir, feature_dim=int(feats.manifest["dim"]),
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
    sub = classes.subset(classes.index_of(names))
    rows_u, y_u = labelled_indices(feats, sub, unseen, cfg.features)
    seen_present = [s for s in seen if s in set(feats.labels)]
    rows_s, y_s = (labelled_indices(feats, sub, seen_present, cfg.features) if seen_present
                   else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    rows = np.concatenate([rows_s, rows_u])
    y = np.concatenate([y_s, y_u])
    seen_idx, unseen_idx = list(range(len(seen))), list(range(len(seen), len(names)))
    gamma = float(manifest.get("gamma", 0.0))
    X = feats.X[rows]
    scores = class_scores(model, manifest, X, sub, calibrated=False)
    result = evaluate_scores(scores, y, class_names=names, seen_idx=seen_idx, unseen_idx=unseen_idx, gamma=gamma)
    # confusion between unseen classes (ZSL setting: prediction restricted to unseen classes)
    u = np.isin(y, unseen_idx)
    pred_u = np.asarray(unseen_idx)[np.argmax(scores[u][:, unseen_idx], axis=1)]
    result["confusion"] = {"labels": unseen, "matrix": confusion_matrix(y[u], pred_u, unseen_idx).tolist()}
    if cfg.transductive:
        try:
            result["transductive"] = _transductive(cfg, model, manifest, sub, X, y, seen_idx, unseen_idx, gamma)
        except ValueError as exc:
            LOG.warning("%s: transductive results skipped: %s", model_dir, exc)
            result["transductive_skipped"] = str(exc)
    result.update({"method": manifest["method"], "model": model_dir, "features": cfg.features,
                   "seen": seen, "unseen": unseen, "semantics": manifest["semantics"],
                   "params": manifest.get("params"), "tuned": bool(manifest.get("tuning"))})
    return result


def _transductive(cfg, model, manifest, sub, X, y, seen_idx, unseen_idx, gamma) -> dict:
    """ZSL (unseen test images, unseen prototypes) and GZSL results after prototype refinement."""
    from pipeline.transductive import transductive_scores

    names = sub.names
    u = np.isin(y, unseen_idx)
    S = _semantics_for(manifest, sub)
    seen_mask = np.array([i in set(seen_idx) for i in range(len(names))], np.float32)
    zsl_t = transductive_scores(model, S[unseen_idx], X[u], seen_mask=np.zeros(len(unseen_idx)),
                                alpha=cfg.transductive_alpha)
    gz_t = transductive_scores(model, S, X, seen_mask=seen_mask, gamma=gamma, alpha=cfg.transductive_alpha)
    y_u_local = np.asarray([unseen_idx.index(c) for c in y[u]])
    t_res = evaluate_scores(gz_t, y, class_names=names, seen_idx=seen_idx, unseen_idx=unseen_idx, gamma=gamma)
    return {
        "zsl_unseen_top1": float(mean_per_class_accuracy(y_u_local, np.argmax(zsl_t, axis=1))),
        "gzsl": t_res["gzsl"], "gzsl_calibrated": t_res["gzsl_calibrated"], "ausuc": t_res["ausuc"],
        "alpha": cfg.transductive_alpha,
    }


def results_table(results: list[dict]) -> list[dict]:
    """One flat row per evaluated model (what `zsl evaluate` prints and `make eval` commits)."""
    rows = []
    for r in results:
        g, c = r["gzsl"], r["gzsl_calibrated"]
        row = {"method": r["method"], "semantics": r["semantics"], "zsl": r["zsl_unseen_top1"],
               "S": g["seen"], "U": g["unseen"], "H": g["H"],
               "S_cal": c["seen"], "U_cal": c["unseen"], "H_cal": c["H"], "gamma": c["gamma"], "ausuc": r["ausuc"]}
        if "transductive" in r:
            t = r["transductive"]
            row.update({"zsl_trans": t["zsl_unseen_top1"], "H_cal_trans": t["gzsl_calibrated"]["H"]})
        rows.append(row)
    return rows


def run_evaluate_all(cfg: EvaluateConfig) -> dict:
    """Evaluate every model of ``cfg.models`` on the same test features and class set."""
    results = [run_evaluate(cfg, m) for m in cfg.models]
    return {"results": results, "table": results_table(results), "features": cfg.features,
            "unseen": list(cfg.unseen)}
