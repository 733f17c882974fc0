"""``zsl add-classes --relabel DIR`` writes DIR and nothing else (a data-safety bug once relabelled
the directory recorded in DIR's manifest instead)."""

from __future__ import annotations

import os
import shutil

import numpy as np

from pipeline.semantics.classset import load_class_set
from pipeline.core.config import AddClassesConfig, LabelConfig
from pipeline.core.manifests import LabelsManifest, read_manifest
from pipeline.stages.label import run_add_classes, run_label


class _Text4:
    dim, model_id = 4, "fake-text"

    def encode(self, texts):
        rng = np.random.default_rng(len(texts))
        v = rng.standard_normal((len(texts), 4)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def _tree(root) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


def test_relabel_writes_the_given_copy_and_leaves_the_original_untouched(small_world, tmp_path, monkeypatch):
    w = small_world()
    original = tmp_path / "labels"
    run_label(LabelConfig(model=w["model"], features=w["features"], classes=w["classes"], output=str(original)),
              progress=False)
    copy = tmp_path / "elsewhere" / "labels-copy"
    shutil.copytree(original, copy)
    before = _tree(original)
    (tmp_path / "new.csv").write_text("name,description\ntapir,a pig-like animal with a short trunk\n")
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths resolve from another directory
    cm, added, lm = run_add_classes(AddClassesConfig(model=w["model"], classes=w["classes"],
                                                     input=str(tmp_path / "new.csv"), relabel="labels-copy"),
                                    text_encoder=_Text4(), progress=False)
    assert added == ["tapir"] and cm.n_classes == 5 and load_class_set(w["classes"]).names[-1] == "tapir"
    assert _tree(original) == before, "the original labels directory was modified"
    assert read_manifest(str(original), LabelsManifest).classes == ["cat", "dog", "okapi", "zebra"]
    relabelled = read_manifest(str(copy), LabelsManifest)
    assert relabelled.classes[-1] == "tapir" and lm.n_labeled_this_run == 40
    assert os.path.isabs(relabelled.model_dir) and os.path.isabs(relabelled.features_dir)
    assert os.path.isabs(relabelled.config["output"]) and relabelled.config["output"] == str(copy)
