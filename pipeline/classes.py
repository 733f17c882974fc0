"""Class stage: class table -> embedded class set (``classes.parquet`` + ``manifest.json``).

``add_classes`` appends classes to an existing class set, embedded exactly as the original ones
(same text model, templates and attribute normalisation), so existing features and models can
label them without re-extraction or retraining.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import numpy as np

from pipeline import io as zio
from pipeline.config import ClassesConfig
from pipeline.semantics import (
    ClassSet,
    ClassTable,
    class_set_table,
    embed_class_texts,
    load_class_set,
    normalize_attributes,
    read_class_table,
)

LOG = logging.getLogger(__name__)

__all__ = ["run_classes", "add_classes", "write_class_set"]

CLASSES_FORMAT = "zsl-classes/1"


def _attributes(table: ClassTable, *, method: str, missing: str, stats: dict | None = None):
    """Normalise attributes; z-score reuses ``stats`` (mean/std of the original set) when given."""
    if table.attributes is None:
        return None, None
    try:
        return _normalised(table, method=method, missing=missing, stats=stats)
    except ValueError as exc:
        raise ValueError(f"{table.source}: {exc}") from None


def _normalised(table: ClassTable, *, method: str, missing: str, stats: dict | None):
    if method == "zscore" and stats is not None:
        filled = normalize_attributes(table.attributes, method="none", missing=missing, names=table.names,
                                      attribute_names=table.attribute_names)
        return ((filled - np.asarray(stats["mean"])) / np.asarray(stats["std"])).astype(np.float32), stats
    raw = normalize_attributes(table.attributes, method="none", missing=missing, names=table.names,
                               attribute_names=table.attribute_names)
    out = normalize_attributes(raw, method=method, missing=missing)
    if method == "zscore":
        std = raw.std(0)
        stats = {"mean": raw.mean(0).tolist(), "std": np.where(std > 0, std, 1.0).tolist()}
    return out, stats


def write_class_set(out: str, names, descriptions, text, attributes, manifest: dict,
                    word_vectors: np.ndarray | None = None) -> dict:
    """Write ``classes.parquet`` then ``manifest.json`` (atomically); return the manifest.

    The manifest is also stored in ``classes.parquet`` itself, so the table and its manifest are
    replaced together by one rename: a kill between the two files cannot pair new classes with an
    old fingerprint (:func:`pipeline.semantics.load_class_set` prefers the embedded copy).
    """
    manifest = {**manifest, "format": CLASSES_FORMAT, "n_classes": len(names),
                "fingerprint": zio.fingerprint([names, text.round(5).tolist()])}
    manifest = json.loads(json.dumps(manifest, sort_keys=True, default=str))  # as manifest.json reads back
    zio.write_parquet_atomic(zio.join(out, "classes.parquet"),
                             class_set_table(names, descriptions, text, attributes, word_vectors, manifest))
    zio.write_json_atomic(zio.join(out, "manifest.json"), manifest)
    return manifest


def _word_vectors(names) -> tuple[np.ndarray, dict]:
    """GloVe vectors; classes with no known word are stored as NaN (missing) and reported."""
    from pipeline.wordvectors import class_word_vectors

    wv, report = class_word_vectors(names, missing="zero")
    for n in report.empty_classes:
        wv[names.index(n)] = np.nan
    return wv, {"oov_words": report.oov_words, "no_vector": report.empty_classes}


def run_classes(cfg: ClassesConfig, *, text_encoder=None) -> dict:
    from pipeline.encoders import load_text_encoder

    table = read_class_table(cfg.input, name_column=cfg.name_column, description_column=cfg.description_column,
                             missing_value=cfg.missing_value)
    attrs, stats = _attributes(table, method=cfg.attribute_normalization, missing=cfg.missing_attributes)
    enc = text_encoder or load_text_encoder(cfg.text_model, cfg.pretrained)
    text = embed_class_texts(enc, table.names, table.descriptions, cfg.templates)
    wv, oov = _word_vectors(table.names) if cfg.word_vectors else (None, None)
    manifest = {
        "source": cfg.input,
        "text_model": enc.model_id,
        "text_model_name": cfg.text_model,
        "pretrained": cfg.pretrained,
        "templates": list(cfg.templates),
        "text_dim": int(text.shape[1]),
        "attribute_names": table.attribute_names,
        "attribute_normalization": cfg.attribute_normalization,
        "attribute_stats": stats,
        "missing_attributes": cfg.missing_attributes,
        "missing_value": cfg.missing_value,
        "word_vectors": None if wv is None else "glove-6b-50d",
        "word_vectors_oov": oov,
    }
    manifest = write_class_set(cfg.output, table.names, table.descriptions, text, attrs, manifest, wv)
    LOG.info("embedded %d classes (%d-d text%s) -> %s", len(table.names), text.shape[1],
             f", {attrs.shape[1]} attributes" if attrs is not None else "", cfg.output)
    return manifest


def add_classes(classes_dir: str, input_uri: str, *, text_encoder=None,
                check: Callable[[ClassSet], None] | None = None) -> tuple[ClassSet, list[str]]:
    """Append the classes of ``input_uri`` to ``classes_dir``; return the new set and the added names.

    ``check`` is called with the enlarged set before anything is written (e.g. to verify that a model
    can score it); an exception from it leaves ``classes_dir`` untouched. A rerun with classes that
    are all in the set already, with the same descriptions (an earlier run finished), adds nothing.
    """
    from pipeline.encoders import load_text_encoder

    current = load_class_set(classes_dir)
    m = current.manifest
    table = read_class_table(input_uri, missing_value=m.get("missing_value"))
    have = dict(zip(current.names, current.descriptions))
    clash = [n for n in table.names if n in have]
    if clash and len(clash) == len(table.names) and all(
            have[n] == d for n, d in zip(table.names, table.descriptions)):
        LOG.info("%s: every class of %s is in the set already; nothing to add", classes_dir, input_uri)
        if check is not None:
            check(current)
        return current, []
    if clash:
        raise ValueError(f"{input_uri}: classes already in {classes_dir}: {', '.join(clash)}")
    if current.attributes is not None and table.attributes is not None:
        if table.attribute_names != m["attribute_names"]:
            missing = [a for a in m["attribute_names"] if a not in table.attribute_names]
            extra = [a for a in table.attribute_names if a not in m["attribute_names"]]
            raise ValueError(f"{input_uri}: attribute columns differ from {classes_dir} "
                             f"(missing: {missing[:5]}, unexpected: {extra[:5]})")
    attrs, _ = _attributes(table, method=m["attribute_normalization"], missing=m["missing_attributes"],
                           stats=m.get("attribute_stats"))
    if current.attributes is None:
        attrs = None
    elif attrs is None:  # text-only classes in a set with attributes: stored as missing (NaN)
        LOG.warning("new classes have no attributes; attribute-based models cannot score them")
        attrs = np.full((len(table.names), current.attributes.shape[1]), np.nan, np.float32)
    enc = text_encoder or load_text_encoder(m["text_model_name"], m.get("pretrained"))
    if enc.model_id != m["text_model"]:
        raise ValueError(f"text model {enc.model_id} differs from the class set's {m['text_model']}")
    text = embed_class_texts(enc, table.names, table.descriptions, m["templates"])
    names = current.names + table.names
    descriptions = current.descriptions + table.descriptions
    all_text = np.vstack([current.text, text])
    all_attrs = None if attrs is None else np.vstack([current.attributes, attrs])
    all_wv = None
    if current.word_vectors is not None:
        wv, oov = _word_vectors(table.names)
        all_wv = np.vstack([current.word_vectors, wv])
        prev = m.get("word_vectors_oov") or {"oov_words": {}, "no_vector": []}
        m = {**m, "word_vectors_oov": {"oov_words": {**prev["oov_words"], **oov["oov_words"]},
                                       "no_vector": prev["no_vector"] + oov["no_vector"]}}
    added = list(m.get("added", [])) + [{"source": input_uri, "names": table.names}]
    if check is not None:
        check(ClassSet(names, descriptions, all_text, all_attrs, m, all_wv))
    write_class_set(classes_dir, names, descriptions, all_text, all_attrs, {**m, "added": added}, all_wv)
    LOG.info("added %d classes to %s (%d in all)", len(table.names), classes_dir, len(names))
    return load_class_set(classes_dir), table.names
