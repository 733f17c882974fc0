"""pipeline.semantics.class_table: class tables, attribute normalisation, prompt-ensemble text embeddings."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pandas as pd
import pytest

from pipeline.semantics.classset import ClassSet
from pipeline.semantics.class_table import (
    class_prompts,
    display_name,
    embed_class_texts,
    normalize_attributes,
    read_class_table,
)



class FakeTextEncoder:
    """Deterministic stand-in for a text model: a fixed random vector per string.

    ``normalize=True`` honours :class:`pipeline.encoders.text.TextEncoder`'s contract (unit rows).
    """

    def __init__(self, dim: int = 6, model_id: str = "fake-text", normalize: bool = True) -> None:
        self.dim, self.model_id, self.normalize = dim, model_id, normalize
        self.calls: list[list[str]] = []

    def vector(self, text: str) -> np.ndarray:
        v = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(self.dim)
        return v / np.linalg.norm(v) if self.normalize else v * (1 + len(text))

    def encode(self, texts) -> np.ndarray:
        texts = list(texts)
        self.calls.append(texts)
        return np.stack([self.vector(t) for t in texts]).astype(np.float32)


# ---------------------------------------------------------------- reading class tables


def test_csv_awa_style_class_column_and_missing_values(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("class,black,furry,big\nantelope,-1,38.09,38.75\ngrizzly+bear,39.25,63.0,0\n")
    t = read_class_table(str(p))
    assert t.names == ["antelope", "grizzly+bear"]
    assert t.descriptions == [None, None]
    assert t.attribute_names == ["black", "furry", "big"]
    expected = np.array([[np.nan, 38.09, 38.75], [39.25, 63.0, 0.0]])
    np.testing.assert_array_equal(t.attributes, expected)  # NaN == NaN in assert_array_equal


def test_csv_missing_value_none_keeps_minus_one(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("name,a\nx,-1\n")
    assert read_class_table(str(p), missing_value=None).attributes.tolist() == [[-1.0]]


def test_csv_with_descriptions_only(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text('name,description\n  zebra ,"striped horse"\nokapi,\n')
    t = read_class_table(str(p))
    assert t.names == ["zebra", "okapi"] and t.descriptions == ["striped horse", None]
    assert t.attributes is None and t.attribute_names == []


def test_yaml_list_with_attributes(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "- name: zebra\n  description: a striped horse\n  attributes: {stripes: 1.0, big: 0.5}\n"
        "- name: okapi\n  attributes: {stripes: 0.25, big: 0.75}\n"
    )
    t = read_class_table(str(p))
    assert t.names == ["zebra", "okapi"]
    assert t.descriptions == ["a striped horse", None]
    assert t.attribute_names == ["stripes", "big"]
    assert t.attributes.tolist() == [[1.0, 0.5], [0.25, 0.75]]


def test_yaml_classes_mapping_and_bare_names(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("classes:\n  - zebra\n  - name: okapi\n    description: forest giraffe\n")
    t = read_class_table(str(p))
    assert t.names == ["zebra", "okapi"] and t.descriptions == [None, "forest giraffe"] and t.attributes is None


def test_yaml_that_is_not_a_list(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("zebra: 1\n")
    with pytest.raises(ValueError, match="expected a list of classes"):
        read_class_table(str(p))


def test_parquet_class_table(tmp_path):
    p = tmp_path / "c.parquet"
    pd.DataFrame({"name": ["a", "b"], "x": [1.0, 2.0]}).to_parquet(p)
    t = read_class_table(str(p))
    assert t.names == ["a", "b"] and t.attributes.tolist() == [[1.0], [2.0]]


def test_duplicate_names_are_named(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("name\nzebra\nokapi\nzebra\ncat\nokapi\n")
    with pytest.raises(ValueError, match=r"duplicate class names: okapi, zebra$"):
        read_class_table(str(p))


def test_non_numeric_attribute_names_row_and_attribute(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("name,big,furry\nzebra,1,0.5\nokapi,0.3,lots\n")
    with pytest.raises(ValueError, match=r"row 2 \('okapi'\), attribute 'furry': not a number \('lots'\)"):
        read_class_table(str(p))


def test_empty_name_and_missing_name_column(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("name,a\nzebra,1\n,2\n")
    with pytest.raises(ValueError, match="row 2: empty or non-text class name"):
        read_class_table(str(p))
    q = tmp_path / "d.csv"
    q.write_text("label,a\nzebra,1\n")
    with pytest.raises(ValueError, match="no class-name column"):
        read_class_table(str(q))


def test_missing_table_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="class table not found"):
        read_class_table(str(tmp_path / "nope.csv"))


# ---------------------------------------------------------------- attribute normalisation


def test_l2_rows_have_unit_norm(rng):
    a = rng.uniform(0, 100, (7, 5))
    out = normalize_attributes(a, method="l2")
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out, a / np.linalg.norm(a, axis=1, keepdims=True), rtol=1e-6)


def test_l2_zero_row_stays_zero():
    out = normalize_attributes(np.array([[0.0, 0.0], [3.0, 4.0]]), method="l2")
    np.testing.assert_allclose(out, [[0, 0], [0.6, 0.8]], rtol=1e-7)


def test_zscore_columns_have_mean_0_std_1(rng):
    a = rng.normal(5, 3, (20, 4))
    out = normalize_attributes(a, method="zscore").astype(np.float64)
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(out.std(0), 1.0, rtol=1e-6)


def test_zscore_constant_column_becomes_zero():
    out = normalize_attributes(np.array([[1.0, 2.0], [1.0, 4.0]]), method="zscore")
    np.testing.assert_allclose(out, [[0, -1], [0, 1]])


def test_none_keeps_values_and_unknown_method_fails():
    a = np.array([[1.5, -2.0]])
    assert normalize_attributes(a, method="none").tolist() == [[1.5, -2.0]]
    with pytest.raises(ValueError, match="unknown attribute normalisation 'l1'"):
        normalize_attributes(a, method="l1")


def test_missing_error_names_class_and_attribute():
    a = np.array([[1.0, 2.0], [3.0, np.nan], [np.nan, 1.0]])
    with pytest.raises(ValueError, match=r"class 'okapi', attribute 'big': missing value \(2 missing in all\)"):
        normalize_attributes(a, names=["zebra", "okapi", "cat"], attribute_names=["small", "big"])
    with pytest.raises(ValueError, match=r"class 'row 2', attribute 'column 1'"):
        normalize_attributes(a)


def test_column_mean_fill_is_exact():
    a = np.array([[1.0, 10.0, np.nan], [3.0, np.nan, np.nan], [np.nan, 40.0, np.nan]])
    out = normalize_attributes(a, method="none", missing="column_mean")
    # column means over the present values; an all-missing column becomes 0
    np.testing.assert_array_equal(out, [[1.0, 10.0, 0.0], [3.0, 25.0, 0.0], [2.0, 40.0, 0.0]])


def test_zero_fill_then_l2():
    out = normalize_attributes(np.array([[3.0, np.nan, 4.0]]), method="l2", missing="zero")
    np.testing.assert_allclose(out, [[0.6, 0.0, 0.8]], rtol=1e-7)


# ---------------------------------------------------------------- names, prompts, text embeddings


@pytest.mark.parametrize("raw, shown", [("grizzly+bear", "grizzly bear"), ("002.Laysan_Albatross", "Laysan Albatross"),
                                         ("killer+whale", "killer whale"), ("zebra", "zebra"),
                                         ("a__b++c", "a b c")])
def test_display_name(raw, shown):
    assert display_name(raw) == shown


def test_class_prompts_with_and_without_description():
    t = ("a photo of a {name}.", "a drawing of a {name}.")
    assert class_prompts("grizzly+bear", None, t) == ["a photo of a grizzly bear.", "a drawing of a grizzly bear."]
    assert class_prompts("grizzly+bear", "a big brown bear", t) == [
        "a photo of a grizzly bear.", "a drawing of a grizzly bear.", "grizzly bear: a big brown bear"]


def _reference(enc: FakeTextEncoder, names, descriptions, templates) -> np.ndarray:
    """Hand-computed: normalised mean of the *normalised* prompt embeddings."""
    rows = []
    for n, d in zip(names, descriptions, strict=True):
        prompts = [t.replace("{name}", display_name(n)) for t in templates]
        if d:
            prompts.append(f"{display_name(n)}: {d}")
        vs = [enc.vector(p) / np.linalg.norm(enc.vector(p)) for p in prompts]
        m = np.mean(vs, axis=0)
        rows.append(m / np.linalg.norm(m))
    return np.array(rows)


TEMPLATES = ("a photo of a {name}.", "a sketch of a {name}.")


def test_embed_class_texts_equals_hand_computed_mean():
    enc = FakeTextEncoder(dim=6)
    names, descs = ["zebra", "grizzly+bear", "okapi"], [None, "a big bear", "forest giraffe"]
    out = embed_class_texts(enc, names, descs, TEMPLATES)
    assert out.shape == (3, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out, _reference(enc, names, descs, TEMPLATES), atol=1e-6)
    assert len(enc.calls) == 1 and len(enc.calls[0]) == 2 + 3 + 3  # one batched call, every prompt once


def test_embed_class_texts_normalises_prompts_itself():
    enc = FakeTextEncoder(dim=6, normalize=False)
    names, descs = ["zebra", "grizzly+bear"], [None, "a big bear"]
    out = embed_class_texts(enc, names, descs, TEMPLATES)
    np.testing.assert_allclose(out, _reference(enc, names, descs, TEMPLATES), atol=1e-6)


# ---------------------------------------------------------------- ClassSet.semantics


def test_class_set_semantics():
    text = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], np.float32)
    attrs = np.array([[1.0, 0.0], [np.nan, 1.0]], np.float32)
    cs = ClassSet(["a", "b"], [None, None], text, attrs, {})
    assert cs.semantics("text") is text
    with pytest.raises(ValueError, match="missing for: b$"):
        cs.semantics("attributes")
    cs.attributes = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    np.testing.assert_array_equal(cs.semantics("attributes"), cs.attributes)
    # a combination: L2-normalised blocks side by side, each scaled so that a dot product is the mean cosine
    both = cs.semantics("text+attributes")
    expected = np.hstack([[[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]) / np.sqrt(2)
    np.testing.assert_allclose(both, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown semantic source 'pixels'"):
        cs.semantics("pixels")
    assert cs.index_of(["b", "a"]) == [1, 0]
    with pytest.raises(ValueError, match="unknown class\\(es\\): c"):
        cs.index_of(["c"])


# ---------------------------------------------------------------- the real AwA2 table


@pytest.fixture(scope="module")
def awa2_dir(class_semantics_dir):
    return class_semantics_dir / "awa2"


@pytest.fixture(scope="module")
def awa2(awa2_dir):
    return read_class_table(str(awa2_dir / "class_attributes.csv")), pd.read_csv(
        awa2_dir / "class_attributes_l2.csv", index_col="class")


def test_awa2_table_shape_and_missing(awa2):
    t, _ = awa2
    assert len(t.names) == 50 and len(t.attribute_names) == 85 and t.attributes.shape == (50, 85)
    assert t.names[:2] == ["antelope", "grizzly+bear"]
    missing = np.argwhere(np.isnan(t.attributes))
    assert missing.tolist() == [[0, 0], [0, 1], [0, 2], [0, 3]]  # antelope a0-a3 (README)
    assert t.attribute_names[:4] == ["black", "white", "blue", "brown"]


def test_awa2_l2_reproduces_published_rows_without_missing_values(awa2, awa2_dir):
    t, l2 = awa2
    assert list(l2.index) == t.names and list(l2.columns) == t.attribute_names
    out = normalize_attributes(t.attributes, method="l2", missing="column_mean")
    complete = ~np.isnan(t.attributes).any(axis=1)
    assert complete.sum() == 49
    np.testing.assert_allclose(out[complete], l2.to_numpy()[complete], atol=1e-6)
    # The published antelope row is *not* a column-mean fill: it was normalised with the -1
    # placeholders kept as values (hence the README's negative minimum -0.0038).
    assert np.abs(out[0] - l2.to_numpy()[0]).max() > 1e-2
    raw = read_class_table(str(awa2_dir / "class_attributes.csv"), missing_value=None)
    kept = normalize_attributes(raw.attributes, method="l2")
    np.testing.assert_allclose(kept, l2.to_numpy(), atol=1e-6)
