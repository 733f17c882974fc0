"""Train stage: seen-class features + class semantics -> a model directory, under the protocol of Xian et al.

Training only ever sees seen-class features. Hyper-parameters (``tune``) and calibrated
stacking's γ are chosen on a class-wise split *of the seen classes* (some seen classes act as
pseudo-unseen); the model is then refit on all seen classes. Test-unseen labels are never read here.
Runs under the resume protocol: the identity is the features, the class set and every setting.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np

from pipeline.core import fs as zio
from pipeline.zsl.calibration import split_seen_classes, tune_gamma
from pipeline.semantics.classset import load_class_set
from pipeline.core.config import ConfigError, TrainConfig
from pipeline.core.features import features_identity, labelled_rows, load_features
from pipeline.zsl.metrics import mean_per_class_accuracy
from pipeline.zsl.models import METHODS, check_method, make_model, method_params, model_manifest, save_weights
from pipeline.core.resume import OutputDir
from pipeline.core.manifests import ModelManifest
from pipeline.core.timing import timed

LOG = logging.getLogger(__name__)

__all__ = ["run_train", "fit_model"]

MAX_GRID = 32


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


def _check_methods(cfg: TrainConfig) -> None:
    try:
        check_method(cfg.method)
        for m in cfg.members:
            check_method(m, "ensemble member")
            if m == "ensemble":
                raise ValueError("an ensemble cannot be a member of an ensemble")
    except ValueError as exc:
        raise ConfigError(f"train config: {exc}") from None


def run_train(cfg: TrainConfig) -> ModelManifest:
    """Fit ``cfg.method`` on the seen classes, tune γ (and hyper-parameters) on held-out seen classes."""
    with timed() as clock:
        _check_methods(cfg)
        feats = load_features(cfg.features)
        classes = load_class_set(cfg.classes)
        identity = {**cfg.model_dump(exclude={"output", "overwrite"}),
                    "features": features_identity(cfg.features, feats.manifest),
                    # a feature directory that gained images trains another model
                    "features_content": zio.fingerprint([feats.image_ids, feats.labels]),
                    "classes": classes.manifest.fingerprint}
        with OutputDir(cfg.output, job="train", identity=identity, overwrite=cfg.overwrite,
                       owned=("weights.safetensors",)) as out:
            if (done := out.already_done(ModelManifest, "model of these features, classes and settings")) is not None:
                return done
            model, fields = _fit(cfg, feats, classes)
            fields["seconds"] = round(clock.elapsed(), 2)
            manifest = model_manifest(model, fields)
            out.begin()
            save_weights(cfg.output, model)
            out.finish(manifest)
            return manifest


@dataclass
class _Seen:
    """The seen-class training rows: features ``X``, their classes ``cls`` (indices into ``S``), the
    semantics ``S`` of every class, and the seen classes' indices."""

    X: np.ndarray
    cls: np.ndarray
    S: np.ndarray
    seen_ids: list[int]


def _fit(cfg: TrainConfig, feats, classes) -> tuple:
    """The model fitted on all seen classes, and its manifest fields."""
    data = _seen_data(cfg, feats, classes)
    split = _seen_split(cfg, data) if cfg.calibration or cfg.tune else None
    chosen, tuning = _tune_params(cfg, data, split, feats, classes) if cfg.tune else ({}, None)
    kwargs = _method_kwargs(cfg, chosen)
    fitter, bridge_info, split = _fitter(cfg, kwargs, data, split, feats, classes)
    gamma, calib = 0.0, None
    if cfg.calibration:
        gamma, calib = _calibrate(cfg, kwargs, data.X, data.cls, split, data.S, classes.names, fitter)
    model = fitter(kwargs, data.X, data.cls, data.seen_ids)
    if "text" in cfg.semantics.split("+"):
        try:
            model.fit_search_centers(data.X, data.S[data.seen_ids])
        except NotImplementedError:
            LOG.info("%s does not map images into the text space; its models cannot back `zsl index`", cfg.method)
    tuning = tuning if bridge_info is None else {**(tuning or {}), "bridge": bridge_info}
    return model, _manifest_fields(cfg, feats, classes, data, gamma=gamma, calib=calib, tuning=tuning)


def _seen_data(cfg: TrainConfig, feats, classes) -> _Seen:
    seen_ids = classes.index_of(list(cfg.seen), "seen class")
    S = classes.semantics(cfg.semantics, cfg.semantic_weights)
    rows, cls = labelled_rows(feats.labels, classes.names, list(cfg.seen), cfg.features)
    # in image-id order: the model does not depend on the order of the shards (a feature directory grown
    # shard by shard trains the same model as one extracted at once from the same images)
    order = np.argsort(np.asarray([feats.image_ids[i] for i in rows], dtype=object), kind="stable")
    rows, cls = rows[order], cls[order]
    LOG.info("training %s on %d images of %d seen classes (%s semantics, %d-d)",
             cfg.method, len(rows), len(seen_ids), cfg.semantics, S.shape[1])
    return _Seen(X=feats.X[rows], cls=cls, S=S, seen_ids=seen_ids)


def _seen_split(cfg: TrainConfig, data: _Seen):
    """The class-wise split of the seen classes into training and pseudo-unseen validation classes."""
    return split_seen_classes(data.cls, data.seen_ids, val_class_fraction=cfg.val_class_fraction,
                              val_sample_fraction=cfg.val_sample_fraction, seed=cfg.seed)


def _tune_params(cfg: TrainConfig, data: _Seen, split, feats, classes) -> tuple[dict, dict]:
    """``--tune``: hyper-parameters chosen on the input the method will learn from."""
    if cfg.method == "ensemble":
        raise ValueError("--tune is not supported for ensembles; tune each member and pass --set params=...")
    X_tune = data.X
    if cfg.bridge and cfg.bridge_mode == "features":
        from pipeline.zsl.models.bridge import BridgedFeatures

        X_tune = BridgedFeatures(base_model=make_model(cfg.method, **_method_kwargs(cfg)),
                                 bridge_model=_load_bridge(cfg, feats, classes)).lift(data.X)
    return _tune(cfg, X_tune, data.cls, split, data.S)


def _fitter(cfg: TrainConfig, kwargs: dict, data: _Seen, split, feats, classes) -> tuple:
    """``fitter(kwargs, X, cls, class_ids)``, which fits the method alone or combined with ``--bridge``;
    the bridge's tuning record (None without one); and the split (made here when the bridge weight needs it)."""
    S = data.S
    if not cfg.bridge:
        return (lambda kw, Xs, cs, ids: fit_model(cfg.method, kw, Xs, cs, ids, S)), None, split
    bridge = _load_bridge(cfg, feats, classes)
    if cfg.bridge_mode == "features":
        from pipeline.zsl.models.bridge import BridgedFeatures

        def fit_lifted(kw, Xs, cs, ids):  # the base learns from [features, bridged features]
            m = BridgedFeatures(base_model=make_model(cfg.method, **kw), bridge_model=bridge)
            local = {c: i for i, c in enumerate(ids)}
            return m.fit(Xs, np.asarray([local[c] for c in cs], np.int64), S[ids])
        return fit_lifted, {"bridge": cfg.bridge, "mode": "features"}, split
    from pipeline.zsl.models.bridge import Bridged

    split = _seen_split(cfg, data) if split is None else split
    w, bridge_info = _bridge_weight(cfg, kwargs, data.X, data.cls, split, S, bridge)

    def fit_mixed(kw, Xs, cs, ids):
        return Bridged(base_model=fit_model(cfg.method, kw, Xs, cs, ids, S), bridge_model=bridge, weight=w)
    return fit_mixed, bridge_info, split


def _manifest_fields(cfg: TrainConfig, feats, classes, data: _Seen, *, gamma: float, calib, tuning) -> dict:
    cm = classes.manifest
    return {
        "feature_model": feats.manifest.model_id,
        "feature_dim": feats.manifest.dim,
        "semantics": cfg.semantics,
        "semantic_weights": dict(cfg.semantic_weights),
        "semantic_dim": int(data.S.shape[1]),
        "text_model": cm.text_model,
        "text_model_name": cm.text_model_name,
        "text_pretrained": cm.pretrained,
        "templates": cm.templates,
        "attribute_names": cm.attribute_names,
        "seen": list(cfg.seen),
        "gamma": float(gamma),
        "calibration": calib,
        "tuning": tuning,
        "train_features": cfg.features,
        "train_features_fingerprint": zio.fingerprint(feats.manifest.to_json()),
        "n_train": int(len(data.cls)),
        "config": cfg.model_dump(mode="json"),
    }


def _load_bridge(cfg: TrainConfig, feats, classes):
    from pipeline.zsl.models import load_model

    bridge, bman = load_model(cfg.bridge, feature_dim=feats.manifest.dim, feature_model=feats.manifest.model_id)
    if cfg.semantics != "text":
        raise ValueError(f"--bridge needs --semantics text (the bridge maps into the text space), got {cfg.semantics}")
    if bman.text_model != classes.manifest.text_model:
        raise ValueError(f"{cfg.bridge}: bridge into {bman.text_model}'s space, classes embedded with "
                         f"{classes.manifest.text_model}")
    return bridge


def _bridge_weight(cfg: TrainConfig, kwargs: dict, X, cls, split, S, bridge) -> tuple[float, dict]:
    """The bridge weight w with the best ZSL accuracy on pseudo-unseen seen classes (never test classes),
    averaged over ``cfg.bridge_splits`` class splits: with few seen classes one split holds out two or
    three classes, where accuracy is too coarse to choose by."""
    from pipeline.zsl.models.bridge import Bridged

    seen_ids = sorted(set(cls.tolist()))
    per_split = []
    for i in range(cfg.bridge_splits):
        train_m, val_m, p_seen, p_unseen = split if i == 0 else split_seen_classes(
            cls, seen_ids, val_class_fraction=cfg.val_class_fraction, val_sample_fraction=cfg.val_sample_fraction,
            seed=cfg.seed + 1000 + i)
        sub = fit_model(cfg.method, kwargs, X[train_m], cls[train_m], list(p_seen), S)
        u_rows = val_m & np.isin(cls, p_unseen)
        pos = {c: j for j, c in enumerate(p_unseen)}
        y_u = np.asarray([pos[c] for c in cls[u_rows]])
        accs = {}
        for w in cfg.bridge_weights:
            m = Bridged(base_model=sub, bridge_model=bridge, weight=w)
            accs[float(w)] = float(mean_per_class_accuracy(y_u, np.argmax(m.scores(X[u_rows], S[list(p_unseen)]), 1)))
        per_split.append(accs)
    results = {w: float(np.mean([a[w] for a in per_split])) for w in per_split[0]}
    best = max(results, key=lambda w: (results[w], -w))  # ties: less bridge
    LOG.info("bridge weight w=%.2f (pseudo-unseen ZSL accuracy %.3f; w=0: %.3f, w=1: %.3f)", best, results[best],
             results.get(0.0, float("nan")), results.get(1.0, float("nan")))
    return best, {"weight": best, "bridge": cfg.bridge, "splits": cfg.bridge_splits,
                  "val_zsl": {str(k): round(v, 4) for k, v in results.items()}}


def _calibrate(cfg: TrainConfig, kwargs: dict, X, cls, split, S, names, fitter=None) -> tuple[float, dict]:
    """γ of calibrated stacking, tuned on the pseudo-unseen split of the seen classes (never test classes).
    ``fitter(kwargs, X, cls, class_ids)`` fits the model (default: the method on ``X``)."""
    train_m, val_m, p_seen, p_unseen = split
    fitter = fitter or (lambda kw, Xs, cs, ids: fit_model(cfg.method, kw, Xs, cs, ids, S))
    sub = fitter(kwargs, X[train_m], cls[train_m], list(p_seen))
    val_ids = list(p_seen) + list(p_unseen)
    pos = {c: i for i, c in enumerate(val_ids)}
    scores = sub.scores(X[val_m], S[val_ids])
    y_val = np.asarray([pos[c] for c in cls[val_m]])
    gamma, info = tune_gamma(scores, y_val, list(range(len(p_seen))), list(range(len(p_seen), len(val_ids))))
    calib = {"gamma": float(gamma), "pseudo_unseen": [names[c] for c in p_unseen],
             "n_val": int(val_m.sum()), **{k: v for k, v in info.items() if k in ("seen", "unseen", "H")}}
    shown = calib["pseudo_unseen"][:8] + (["..."] if len(calib["pseudo_unseen"]) > 8 else [])
    LOG.info("calibrated stacking: gamma=%.4f (%d pseudo-unseen classes: %s)", gamma,
             len(calib["pseudo_unseen"]), ", ".join(shown))
    return float(gamma), calib
