"""pipeline.stages.classes and pipeline.semantics.classset: embed a class table into a class set, load it back, and append classes to it."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from pipeline.semantics.classset import add_classes
from pipeline.core.manifests import CLASSES_FORMAT
from pipeline.stages.classes import run_classes
from pipeline.core.config import build_config
from pipeline.semantics.classset import load_class_set
from pipeline.semantics.class_table import embed_class_texts

TEMPLATES = ["a photo of a {name}.", "a drawing of a {name}."]


class FakeTextEncoder:
    """A fixed unit vector per string (the TextEncoder contract), no model download."""

    def __init__(self, dim: int = 8, model_id: str = "fake-text") -> None:
        self.dim, self.model_id = dim, model_id

    def encode(self, texts) -> np.ndarray:
        out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.dim) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


RAW = np.array([[3.0, 4.0, 0.0], [1.0, -2.0, 2.0], [0.0, 0.0, 5.0]])  # no -1: that means "missing"


def _write_table(path, names, attrs=None, descriptions=None) -> str:
    cols = ["name", "description"] + ([] if attrs is None else ["stripes", "big", "furry"])
    lines = [",".join(cols)]
    for i, n in enumerate(names):
        row = [n, (descriptions or [""] * len(names))[i]]
        if attrs is not None:
            row += [repr(float(v)) for v in attrs[i]]
        lines.append(",".join(row))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def class_set(tmp_path):
    def make(normalization="l2"):
        src = _write_table(tmp_path / "classes.csv", ["zebra", "grizzly+bear", "okapi"], RAW,
                           ["striped horse", "", "forest giraffe"])
        out = str(tmp_path / f"set-{normalization}")
        cfg = build_config("classes", {"input": src, "output": out, "templates": TEMPLATES,
                                       "attribute_normalization": normalization})
        manifest = run_classes(cfg, text_encoder=FakeTextEncoder())
        return out, manifest
    return make


def test_run_classes_writes_set_and_manifest(class_set):
    out, manifest = class_set()
    assert sorted(os.listdir(out)) == [".zsl.lock", "classes.parquet", "manifest.json", "run.json"]
    assert manifest.format == CLASSES_FORMAT and manifest.n_classes == 3
    assert manifest.text_model == "fake-text" and manifest.text_dim == 8
    assert manifest.templates == TEMPLATES
    assert manifest.attribute_names == ["stripes", "big", "furry"]
    assert manifest.attribute_normalization == "l2" and manifest.attribute_stats is None
    assert len(manifest.fingerprint) == 16


def test_load_class_set_round_trip(class_set):
    out, manifest = class_set()
    cs = load_class_set(out)
    assert cs.names == ["zebra", "grizzly+bear", "okapi"]
    assert cs.descriptions == ["striped horse", None, "forest giraffe"]
    assert cs.manifest == manifest
    expected_text = embed_class_texts(FakeTextEncoder(), cs.names, cs.descriptions, TEMPLATES)
    np.testing.assert_array_equal(cs.text, expected_text)
    np.testing.assert_allclose(cs.attributes, RAW / np.linalg.norm(RAW, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(cs.semantics("attributes"), cs.attributes)


def test_load_class_set_without_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_class_set(str(tmp_path))


def test_zscore_stats_are_recorded(class_set):
    out, manifest = class_set("zscore")
    stats = manifest.attribute_stats
    np.testing.assert_allclose(stats["mean"], RAW.mean(0))
    np.testing.assert_allclose(stats["std"], RAW.std(0))
    np.testing.assert_allclose(load_class_set(out).attributes, (RAW - RAW.mean(0)) / RAW.std(0), rtol=1e-5)


def test_add_classes_appends_with_the_same_embedding(class_set, tmp_path):
    out, manifest = class_set()
    new_attrs = np.array([[6.0, 8.0, 0.0]])
    extra = _write_table(tmp_path / "extra.csv", ["polar+bear"], new_attrs, ["white bear"])
    cs, added = add_classes(out, extra, text_encoder=FakeTextEncoder())
    assert added == ["polar+bear"]
    assert cs.names == ["zebra", "grizzly+bear", "okapi", "polar+bear"]
    assert cs.descriptions[-1] == "white bear"
    np.testing.assert_allclose(cs.attributes[-1], [0.6, 0.8, 0.0], rtol=1e-6)  # l2, like the original rows
    expected = embed_class_texts(FakeTextEncoder(), ["polar+bear"], ["white bear"], TEMPLATES)
    np.testing.assert_array_equal(cs.text[-1:], expected)
    np.testing.assert_array_equal(cs.text[:3], load_class_set(out).text[:3])
    assert cs.manifest.added == [{"source": extra, "names": ["polar+bear"]}]
    assert cs.manifest.fingerprint != manifest.fingerprint
    assert cs.manifest.n_classes == 4


def test_add_classes_zscore_uses_the_original_statistics(class_set, tmp_path):
    out, _ = class_set("zscore")
    new = np.array([[2.0, 2.0, 2.0]])
    cs, _ = add_classes(out, _write_table(tmp_path / "extra.csv", ["cat"], new), text_encoder=FakeTextEncoder())
    np.testing.assert_allclose(cs.attributes[-1], (new[0] - RAW.mean(0)) / RAW.std(0), rtol=1e-5)


def test_add_classes_refuses_duplicates(class_set, tmp_path):
    out, _ = class_set()
    extra = _write_table(tmp_path / "extra.csv", ["cat", "okapi", "zebra"], np.ones((3, 3)))
    with pytest.raises(ValueError, match="classes already in .*: okapi, zebra"):
        add_classes(out, extra, text_encoder=FakeTextEncoder())
    assert load_class_set(out).names == ["zebra", "grizzly+bear", "okapi"]  # unchanged


def test_add_classes_refuses_another_text_model(class_set, tmp_path):
    out, _ = class_set()
    extra = _write_table(tmp_path / "extra.csv", ["cat"], np.ones((1, 3)))
    with pytest.raises(ValueError, match="text model other-text differs"):
        add_classes(out, extra, text_encoder=FakeTextEncoder(model_id="other-text"))


def test_add_classes_refuses_other_attribute_columns(class_set, tmp_path):
    out, _ = class_set()
    extra = tmp_path / "extra.csv"
    extra.write_text("name,stripes,wings,furry\ncat,1,0,1\n")
    with pytest.raises(ValueError, match=r"attribute columns differ.*missing: big; unexpected: wings"):
        add_classes(out, str(extra), text_encoder=FakeTextEncoder())


def test_text_only_classes_get_nan_attributes(class_set, tmp_path):
    out, _ = class_set()
    extra = _write_table(tmp_path / "extra.csv", ["cat", "dog"], None, ["small pet", ""])
    cs, added = add_classes(out, extra, text_encoder=FakeTextEncoder())
    assert added == ["cat", "dog"] and cs.names[-2:] == ["cat", "dog"]
    assert np.isnan(cs.attributes[-2:]).all() and not np.isnan(cs.attributes[:3]).any()
    assert cs.semantics("text").shape == (5, 8)
    with pytest.raises(ValueError, match="'attributes' missing for: cat, dog"):
        cs.semantics("attributes")
    with pytest.raises(ValueError, match="missing for: cat, dog"):
        cs.semantics("text+attributes")


def test_missing_attribute_value_fails_by_default_and_fills_on_request(tmp_path):
    src = _write_table(tmp_path / "c.csv", ["zebra", "okapi"], np.array([[3.0, -1.0, 4.0], [1.0, 2.0, 2.0]]))
    base = {"input": src, "templates": TEMPLATES}
    with pytest.raises(ValueError, match="class 'zebra', attribute 'big': missing value"):
        run_classes(build_config("classes", {**base, "output": str(tmp_path / "a")}), text_encoder=FakeTextEncoder())
    assert not os.path.exists(tmp_path / "a")  # nothing written
    cfg = build_config("classes", {**base, "output": str(tmp_path / "b"), "missing_attributes": "column_mean"})
    run_classes(cfg, text_encoder=FakeTextEncoder())
    np.testing.assert_allclose(load_class_set(str(tmp_path / "b")).attributes[0], np.array([3.0, 2.0, 4.0]) / np.sqrt(29),
                               rtol=1e-6)
