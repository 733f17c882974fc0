"""Evaluate stage: the standard ZSL / GZSL protocol (Xian et al.) on held-out test features.

Per-class mean top-1 accuracy on unseen classes (ZSL), seen / unseen / H without and with the
calibrated-stacking γ the model was trained with (GZSL), AUSUC, the unseen confusion matrix and,
optionally, transductive results reported separately. Writes JSON and an HTML report if asked.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.core import fs as zio
from pipeline.semantics.classset import load_class_set
from pipeline.core.config import EvaluateConfig
from pipeline.core.features import labelled_rows, load_features
from pipeline.zsl.metrics import confusion_matrix, evaluate_scores, mean_per_class_accuracy
from pipeline.zsl.models import load_model
from pipeline.zsl.models.scoring import class_scores, class_semantics, seen_mask

LOG = logging.getLogger(__name__)

__all__ = ["run_evaluate", "run_evaluate_all", "results_table"]


def run_evaluate(cfg: EvaluateConfig, model_dir: str | None = None) -> dict:
    """Evaluate one model (``model_dir`` or ``cfg.model``) on held-out test features."""
    model_dir = model_dir or cfg.models[0]
    feats = load_features(cfg.features)
    model, manifest = load_model(model_dir, feature_dim=feats.manifest.dim, feature_model=feats.manifest.model_id)
    if (manifest.train_features_fingerprint == zio.fingerprint(feats.manifest.to_json())
            and not cfg.allow_train_features):
        raise ValueError(f"{cfg.features} are the features the model was trained on; evaluate on held-out "
                         "features (or pass --allow-train-features to do it anyway)")
    classes = load_class_set(cfg.classes)
    seen, unseen = list(manifest.seen), list(cfg.unseen)
    if not seen:  # a model fitted on no classes (a caption bridge): the split's other classes are "seen"
        present = set(feats.labels)
        seen = [n for n in classes.names if n not in set(unseen) and n in present]
    overlap = set(seen) & set(unseen)
    if overlap:
        raise ValueError(f"classes both seen (trained on) and unseen: {', '.join(sorted(overlap))}")
    names = seen + unseen
    sub = classes.subset(classes.index_of(names))
    rows_u, y_u = labelled_rows(feats.labels, sub.names, unseen, cfg.features)
    seen_present = [s for s in seen if s in set(feats.labels)]
    rows_s, y_s = (labelled_rows(feats.labels, sub.names, seen_present, cfg.features) if seen_present
                   else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    rows = np.concatenate([rows_s, rows_u])
    y = np.concatenate([y_s, y_u])
    seen_idx, unseen_idx = list(range(len(seen))), list(range(len(seen), len(names)))
    gamma = manifest.gamma
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
    result.update({"method": manifest.method, "model": model_dir, "features": cfg.features,
                   "seen": seen, "unseen": unseen, "semantics": manifest.semantics,
                   "params": manifest.params, "tuned": bool(manifest.tuning)})
    return result


def _transductive(cfg, model, manifest, sub, X, y, seen_idx, unseen_idx, gamma) -> dict:
    """ZSL (unseen test images, unseen prototypes) and GZSL results after prototype refinement."""
    from pipeline.zsl.transductive import column_standardized_scores, transductive_scores

    names = sub.names
    u = np.isin(y, unseen_idx)
    S = class_semantics(manifest, sub)
    mask = seen_mask(manifest, names).astype(np.float32)
    try:
        zsl_t = transductive_scores(model, S[unseen_idx], X[u], seen_mask=np.zeros(len(unseen_idx)),
                                    alpha=cfg.transductive_alpha)
        gz_t = transductive_scores(model, S, X, seen_mask=mask, gamma=gamma, alpha=cfg.transductive_alpha)
        how, g = "prototype refinement", gamma
    except ValueError:  # no image embedding: standardise each class's scores over the target images
        zsl_t = column_standardized_scores(model.scores(X[u], S[unseen_idx]))
        gz_t = column_standardized_scores(model.scores(X, S))
        how, g = "score standardisation per class", 0.0  # γ was tuned on raw scores
    y_u_local = np.asarray([unseen_idx.index(c) for c in y[u]])
    t_res = evaluate_scores(gz_t, y, class_names=names, seen_idx=seen_idx, unseen_idx=unseen_idx, gamma=g)
    return {
        "zsl_unseen_top1": float(mean_per_class_accuracy(y_u_local, np.argmax(zsl_t, axis=1))),
        "gzsl": t_res["gzsl"], "gzsl_calibrated": t_res["gzsl_calibrated"], "ausuc": t_res["ausuc"],
        "alpha": cfg.transductive_alpha, "method": how,
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
    """Evaluate every model of ``cfg.models`` on the same test features and class set.

    Writes ``cfg.json_path`` (the returned dict) and ``cfg.html`` (a report with plots) when set.
    """
    results = [run_evaluate(cfg, m) for m in cfg.models]
    out = {"results": results, "table": results_table(results), "features": cfg.features,
           "unseen": list(cfg.unseen)}
    if cfg.json_path:
        zio.write_json_atomic(cfg.json_path, out)
    if cfg.html:
        from pipeline.zsl.html_report import default_thumbnail, metrics_by_name, render_report, write_report

        write_report(cfg.html, render_report(title="ZSL evaluation", metrics=metrics_by_name(results),
                                             searches=[], thumbnail=default_thumbnail))
    return out
