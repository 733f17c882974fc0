"""Classes stage: a class table -> an embedded class set (:mod:`pipeline.semantics.classset`).

Runs under the resume protocol: the identity is the table's content (sha256) and every setting;
a rerun with both unchanged does nothing, one with others is refused unless ``overwrite``.
"""

from __future__ import annotations

import logging

from pipeline.core import fs as zio
from pipeline.semantics.classset import class_word_vectors_or_nan, normalised_attributes, write_class_set
from pipeline.core.config import ClassesConfig
from pipeline.core.resume import OutputDir
from pipeline.core.manifests import ClassesManifest
from pipeline.semantics.class_table import embed_class_texts, read_class_table

LOG = logging.getLogger(__name__)

__all__ = ["run_classes"]


def run_classes(cfg: ClassesConfig, *, text_encoder=None) -> ClassesManifest:
    """Embed the classes of ``cfg.input`` into ``cfg.output``; return the class set's manifest."""
    from pipeline.encoders.text import load_text_encoder

    if not zio.exists(cfg.input):
        raise FileNotFoundError(f"{cfg.input}: class table not found")
    settings = cfg.model_dump(exclude={"output", "overwrite"})
    identity = {**settings, "input_sha256": zio.sha256_file(cfg.input)}
    # a bad table stops the job before its output directory is touched
    table = read_class_table(cfg.input, name_column=cfg.name_column, description_column=cfg.description_column,
                             missing_value=cfg.missing_value)
    attrs, stats = normalised_attributes(table, method=cfg.attribute_normalization, missing=cfg.missing_attributes)
    with OutputDir(cfg.output, job="classes", identity=identity, overwrite=cfg.overwrite,
                   owned=("classes.parquet",)) as out:
        if (done := out.already_done(ClassesManifest, "class set of this table with these settings")) is not None:
            return done
        enc = text_encoder or load_text_encoder(cfg.text_model, cfg.pretrained)
        text = embed_class_texts(enc, table.names, table.descriptions, cfg.templates)
        wv, oov = class_word_vectors_or_nan(table.names) if cfg.word_vectors else (None, None)
        fields = {
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
        out.begin()
        manifest = write_class_set(cfg.output, table.names, table.descriptions, text, attrs, fields, wv)  # manifest last
    LOG.info("embedded %d classes (%d-d text%s) -> %s", len(table.names), text.shape[1],
             f", {attrs.shape[1]} attributes" if attrs is not None else "", cfg.output)
    return manifest
