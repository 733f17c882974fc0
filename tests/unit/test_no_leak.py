"""`zsl train` never reads test-unseen labels: the end-to-end no-leak test, and its control.

The model directory is a function of the seen-class images only. The training feature directory
deliberately also holds the images of the unseen (test) classes, labelled, so a leaky train stage
(one that tuned gamma or hyper-parameters on, or fitted to, anything but the seen rows) *could*
read them. Rewriting those labels (permuted among the unseen classes, renamed to names no class
has, or removed) must then leave the trained model unchanged, byte for byte. The control shows the
comparison is sensitive: relabelling a few *seen* images does change what is learned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.semantics.classset import write_class_set
from pipeline.core.config import build_config
from pipeline.core.features import write_features
from pipeline.stages.train import run_train

SEEN = ["ant", "bee", "cow", "doe", "eel", "fox", "gnu", "hen"]
UNSEEN = ["ibis", "jay", "kiwi"]
NAMES = SEEN + UNSEEN
DIM, SEM_DIM = 32, 12
N_SEEN_IMG, N_UNSEEN_IMG = 24, 20
#: Fields of the model manifest that may differ between two runs on the same seen-class data.
INCIDENTAL = {"seconds", "config"}  # run time; config only differs by `output` (checked separately)


@pytest.fixture(scope="module")
def world():
    """Seeded features with class structure, and a class set whose text semantics follow the class means."""
    rng = np.random.default_rng(2024)
    means = rng.standard_normal((len(NAMES), DIM)).astype(np.float32)
    proj = rng.standard_normal((DIM, SEM_DIM)).astype(np.float32) / np.sqrt(DIM)
    text = means @ proj + 0.05 * rng.standard_normal((len(NAMES), SEM_DIM)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    labels = [n for n in SEEN for _ in range(N_SEEN_IMG)] + [n for n in UNSEEN for _ in range(N_UNSEEN_IMG)]
    X = np.stack([means[NAMES.index(n)] for n in labels]) + 0.9 * rng.standard_normal((len(labels), DIM))
    # unseen images are interleaved with the seen ones (and over several shards), not appended
    order = rng.permutation(len(labels))
    labels = [labels[i] for i in order]
    X = X[order].astype(np.float32)
    return {"text": text, "labels": labels, "X": X, "rng": rng}


def _write_classes(out: Path, text: np.ndarray) -> str:
    write_class_set(str(out), NAMES, [None] * len(NAMES), text, None, {
        "text_model": "fake-text", "text_model_name": "fake", "pretrained": None, "templates": ["{name}"],
        "attribute_names": [], "attribute_normalization": "l2", "missing_attributes": "error",
        "missing_value": -1.0})
    return str(out)


def _write_features(out: Path, labels: list, X: np.ndarray) -> str:
    n = len(labels)
    write_features(str(out), image_ids=[f"img{i:05d}" for i in range(n)],
                   uris=[f"file:///data/img{i:05d}.png" for i in range(n)], labels=labels, X=X,
                   model_id="fake-feat", shard_size=64)
    return str(out)


def _train(features: str, classes: str, output: Path, method: str = "eszsl"):
    cfg = build_config("train", {
        "features": features, "classes": classes, "seen": SEEN, "method": method, "semantics": "text",
        "output": str(output), "tune": method == "eszsl", "calibration": True, "seed": 3,
        "params": {"epochs": 10} if method == "devise" else {},
        "val_class_fraction": 0.3, "val_sample_fraction": 0.25})
    return run_train(cfg)


def _learned(manifest) -> dict:
    """What a training run decided: everything in the manifest but run time and the output path."""
    data = manifest.to_json()
    config = {k: v for k, v in data["config"].items() if k != "output"}
    return {**{k: v for k, v in data.items() if k not in INCIDENTAL}, "config": config}


def _weights(output: Path) -> bytes:
    return (output / "weights.safetensors").read_bytes()


def _unseen_relabelled(labels: list, rng: np.random.Generator, how: str) -> list:
    rows = [i for i, lab in enumerate(labels) if lab in UNSEEN]
    new = list(labels)
    if how == "permuted":  # the test-unseen labels shuffled among the unseen classes
        cycle = dict(zip(UNSEEN, UNSEEN[1:] + UNSEEN[:1]))  # every label really changes...
        for i in rows:
            new[i] = cycle[labels[i]]
        picked = rng.permutation(rows)[: len(rows) // 2]  # ...and the class sizes change too
        for i in picked:
            new[i] = UNSEEN[0]
    elif how == "renamed":  # other names (not in the class set), and some unlabelled
        for j, i in enumerate(rows):
            new[i] = None if j % 5 == 0 else f"zzz{j % 3}"
    else:
        raise AssertionError(how)
    assert [new[i] for i in rows] != [labels[i] for i in rows]
    assert all(new[i] == labels[i] for i in range(len(labels)) if i not in set(rows))
    return new


@pytest.mark.parametrize("method", ["eszsl", "devise"])
def test_train_result_does_not_depend_on_test_unseen_labels(tmp_path, world, method):
    classes = _write_classes(tmp_path / "classes", world["text"])
    feats = tmp_path / "features"
    _write_features(feats, world["labels"], world["X"])
    base = _train(str(feats), classes, tmp_path / "model-0", method)
    # sanity: calibration and tuning really ran, on seen classes only, and the model learned something
    assert base.calibration is not None and base.calibration["n_val"] > 0
    assert set(base.calibration["pseudo_unseen"]) < set(SEEN)
    assert base.n_train == len(SEEN) * N_SEEN_IMG
    assert base.calibration["unseen"] > 0.5  # pseudo-unseen accuracy among all 8 seen classes: chance is 1/8
    if method == "eszsl":
        assert base.tuning is not None and len(base.tuning["results"]) > 1

    for k, how in enumerate(["permuted", "renamed"], start=1):
        # the same feature directory, rewritten in place: only the unseen rows' labels differ
        _write_features(feats, _unseen_relabelled(world["labels"], np.random.default_rng(k), how), world["X"])
        out = tmp_path / f"model-{k}"
        again = _train(str(feats), classes, out, method)
        assert again.config["output"] == str(out)
        assert _learned(again) == _learned(base), f"test-unseen labels ({how}) changed the trained model"
        assert (again.gamma, again.calibration, again.tuning, again.n_train, again.params) == \
            (base.gamma, base.calibration, base.tuning, base.n_train, base.params)
        assert _weights(out) == _weights(tmp_path / "model-0"), f"test-unseen labels ({how}) changed the weights"


def test_control_seen_label_changes_are_detected(tmp_path, world):
    """The comparison above is sensitive: moving some seen images to another seen class changes gamma or
    the calibration, and the weights."""
    classes = _write_classes(tmp_path / "classes", world["text"])
    feats = _write_features(tmp_path / "features", world["labels"], world["X"])
    base = _train(feats, classes, tmp_path / "m0")
    labels = list(world["labels"])
    moved = [i for i, lab in enumerate(labels) if lab in ("ant", "bee")][::3]
    for i in moved:
        labels[i] = "cow" if labels[i] == "ant" else "doe"
    _write_features(tmp_path / "features", labels, world["X"])  # same directory, as in the test above
    changed = _train(feats, classes, tmp_path / "m1")
    assert changed.n_train == base.n_train  # same rows, only seen labels moved
    assert (changed.gamma, changed.calibration) != (base.gamma, base.calibration)
    assert _learned(changed) != _learned(base)
    assert _weights(tmp_path / "m1") != _weights(tmp_path / "m0")
