"""Class sets: the artifact ``zsl classes`` writes (``classes.parquet`` + ``manifest.json``).

A class set holds, per class, its name, description, text embedding (prompt-template ensemble),
normalised attributes and word vectors, and a :class:`~pipeline.core.manifests.ClassesManifest` saying how
they were made. :func:`extend_class_set` appends classes embedded exactly as the original ones
(same text model, templates and attribute normalisation), so existing features and models can
label them without re-extraction or retraining.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from pipeline.core.vectors import l2n
from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.core.schema import classes_schema
from pipeline.core.manifests import ClassesManifest, parse_manifest, read_manifest, write_manifest
from pipeline.semantics.class_table import ClassTable, embed_class_texts, normalize_attributes, read_class_table

LOG = logging.getLogger(__name__)

__all__ = ["ClassSet", "load_class_set", "class_set_table", "write_class_set", "normalised_attributes",
           "class_word_vectors_or_nan", "extend_class_set", "add_classes", "MANIFEST_KEY"]

MANIFEST_KEY = b"zsl.manifest"  # classes.parquet schema metadata: the class set's manifest (JSON)


@dataclass
class ClassSet:
    """Embedded classes as written by ``zsl classes``."""

    names: list[str]
    descriptions: list[str | None]
    text: np.ndarray
    attributes: np.ndarray | None
    manifest: ClassesManifest
    word_vectors: np.ndarray | None = None

    def index_of(self, names: Sequence[str], what: str = "class") -> list[int]:
        pos = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in pos]
        if missing:
            raise ValueError(f"unknown {what}(es): {', '.join(missing)} (known: {', '.join(self.names)})")
        return [pos[n] for n in names]

    def subset(self, idx: Sequence[int]) -> "ClassSet":
        idx = list(idx)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return ClassSet([self.names[i] for i in idx], [self.descriptions[i] for i in idx], self.text[idx],
                        pick(self.attributes), self.manifest, pick(self.word_vectors))

    def _source(self, kind: str) -> np.ndarray:
        if kind == "text":
            return self.text
        block = {"attributes": self.attributes, "glove": self.word_vectors}.get(kind, ...)
        if block is ...:
            raise ValueError(f"unknown semantic source {kind!r}; use text, attributes or glove")
        if block is None:
            raise ValueError(f"semantics '{kind}' requested, but the class set has none "
                             f"({'no attribute columns in the class table' if kind == 'attributes' else 'rebuild it with word_vectors: true'})")
        lacking = [n for n, row in zip(self.names, block) if np.isnan(row).any()]
        if lacking:
            raise ValueError(f"semantics '{kind}' missing for: {', '.join(lacking[:10])}"
                             + (" (out-of-vocabulary names)" if kind == "glove" else ""))
        return block

    def semantics(self, kind: str, weights: dict[str, float] | None = None) -> np.ndarray:
        """Class semantic matrix for ``kind``: one source, or a '+' combination of sources.

        A combination concatenates the L2-normalised blocks, each scaled by ``sqrt(weight)`` (default
        weight 1), so a dot product of two combined vectors is the weighted sum of per-source cosines.
        """
        parts = kind.split("+")
        if len(parts) == 1:
            return self._source(kind)
        weights = weights or {}
        total = sum(weights.get(p, 1.0) for p in parts)
        blocks = []
        for p in parts:
            b = l2n(self._source(p), dtype=np.float64)
            blocks.append(b * np.sqrt(weights.get(p, 1.0) / total))
        return np.hstack(blocks).astype(np.float32)


def _fixed(a: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(a, np.float32).reshape(-1), pa.float32()), a.shape[1])


def class_set_table(names, descriptions, text: np.ndarray, attributes: np.ndarray | None,
                    word_vectors: np.ndarray | None = None, manifest: ClassesManifest | None = None) -> pa.Table:
    n_attr = 0 if attributes is None else attributes.shape[1]
    n_wv = 0 if word_vectors is None else word_vectors.shape[1]
    schema = classes_schema(text.shape[1], n_attr, n_wv)
    cols = {
        "name": pa.array(names, pa.string()),
        "description": pa.array(descriptions, pa.string()),
        "text_embedding": _fixed(text),
    }
    if n_attr:
        cols["attributes"] = _fixed(attributes)
    if n_wv:
        cols["word_vectors"] = _fixed(word_vectors)
    if manifest is not None:
        schema = schema.with_metadata({MANIFEST_KEY: json.dumps(manifest.to_json(), sort_keys=True).encode()})
    return pa.table(cols, schema=schema)


def load_class_set(uri: str) -> ClassSet:
    """Load a ``zsl classes`` output directory (``classes.parquet`` + ``manifest.json``)."""
    manifest = read_manifest(uri, ClassesManifest)
    t = zpq.read_parquet(zio.join(uri, "classes.parquet"))
    embedded = (t.schema.metadata or {}).get(MANIFEST_KEY)
    if embedded is not None:
        # classes.parquet carries its own manifest, replaced with it in one rename; manifest.json is
        # a copy written after it, so the two differ only if a writer was killed in between.
        inner = parse_manifest(json.loads(embedded), ClassesManifest, f"{uri}/classes.parquet")
        if inner != manifest:
            LOG.warning("%s: manifest.json is older than classes.parquet (an interrupted update); "
                        "using the manifest stored in classes.parquet", uri)
            manifest = inner
    if manifest.n_classes != t.num_rows:
        raise ValueError(f"{uri}: classes.parquet has {t.num_rows} classes, manifest.json {manifest.n_classes}; "
                         "the class set is inconsistent, rebuild it with `zsl classes`")
    text = np.stack(t.column("text_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)

    def block(col: str) -> np.ndarray | None:
        if col not in t.column_names:
            return None
        return np.stack(t.column(col).to_numpy(zero_copy_only=False)).astype(np.float32)

    return ClassSet(t.column("name").to_pylist(), t.column("description").to_pylist(), text, block("attributes"),
                    manifest, block("word_vectors"))


def normalised_attributes(table: ClassTable, *, method: str, missing: str, stats: dict | None = None):
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


def _rounded(a: np.ndarray | None) -> list | None:
    return None if a is None else np.where(np.isnan(a), None, np.round(a.astype(np.float64), 5)).tolist()


def write_class_set(out: str, names, descriptions, text, attributes, fields: dict[str, Any] | ClassesManifest,
                    word_vectors: np.ndarray | None = None) -> ClassesManifest:
    """Write ``classes.parquet`` (carrying its manifest), then ``manifest.json``; return the manifest.

    The manifest is also stored in ``classes.parquet`` itself, so the table and its manifest are
    replaced together by one rename: a kill between the two files cannot pair new classes with an
    old fingerprint (:func:`load_class_set` prefers the embedded copy).
    """
    data = fields.model_dump() if isinstance(fields, ClassesManifest) else dict(fields)
    data.update(n_classes=len(names), fingerprint=zio.fingerprint(
        [list(names), np.round(text.astype(np.float64), 5).tolist(), _rounded(attributes), _rounded(word_vectors)]))
    manifest = ClassesManifest(**zio.to_jsonable(data))
    zpq.write_parquet_atomic(zio.join(out, "classes.parquet"),
                             class_set_table(names, descriptions, text, attributes, word_vectors, manifest))
    write_manifest(out, manifest)
    return manifest


def class_word_vectors_or_nan(names) -> tuple[np.ndarray, dict]:
    """GloVe vectors; classes with no known word are stored as NaN (missing) and reported."""
    from pipeline.semantics.wordvectors import class_word_vectors

    wv, report = class_word_vectors(names, missing="zero")
    for n in report.empty_classes:
        wv[names.index(n)] = np.nan
    return wv, {"oov_words": report.oov_words, "no_vector": report.empty_classes}


def extend_class_set(current: ClassSet, input_uri: str, *, where: str,
                     text_encoder=None) -> tuple[ClassSet, list[str]]:
    """``current`` plus the classes of the table at ``input_uri``, embedded as ``current`` was.

    Returns the enlarged set (in memory; nothing is written) and the added names. A table whose
    classes are all in the set already, with the same descriptions (an earlier run finished), adds
    nothing and returns ``current``. Attribute columns are matched by name, in any order; a table
    with other attribute columns is refused, naming them.
    """
    from pipeline.encoders.text import load_text_encoder

    m = current.manifest
    table = read_class_table(input_uri, missing_value=m.missing_value)
    have = dict(zip(current.names, current.descriptions))
    clash = [n for n in table.names if n in have]
    if clash and len(clash) == len(table.names) and all(
            have[n] == d for n, d in zip(table.names, table.descriptions)):
        LOG.info("%s: every class of %s is in the set already; nothing to add", where, input_uri)
        return current, []
    if clash:
        raise ValueError(f"{input_uri}: classes already in {where}: {', '.join(clash)}")
    if current.attributes is not None and table.attributes is not None:
        table = _attributes_in_order(table, m.attribute_names, where)
    attrs, _ = normalised_attributes(table, method=m.attribute_normalization, missing=m.missing_attributes,
                                     stats=m.attribute_stats)
    if current.attributes is None:
        attrs = None
    elif attrs is None:  # text-only classes in a set with attributes: stored as missing (NaN)
        LOG.warning("new classes have no attributes; attribute-based models cannot score them")
        attrs = np.full((len(table.names), current.attributes.shape[1]), np.nan, np.float32)
    enc = text_encoder or load_text_encoder(m.text_model_name or m.text_model, m.pretrained)
    if enc.model_id != m.text_model:
        raise ValueError(f"text model {enc.model_id} differs from the class set's {m.text_model}")
    text = embed_class_texts(enc, table.names, table.descriptions, m.templates)
    fields = m.model_dump()
    all_wv = None
    if current.word_vectors is not None:
        wv, oov = class_word_vectors_or_nan(table.names)
        all_wv = np.vstack([current.word_vectors, wv])
        prev = m.word_vectors_oov or {"oov_words": {}, "no_vector": []}
        fields["word_vectors_oov"] = {"oov_words": {**prev["oov_words"], **oov["oov_words"]},
                                      "no_vector": prev["no_vector"] + oov["no_vector"]}
    fields["added"] = list(m.added) + [{"source": input_uri, "names": table.names}]
    names = current.names + table.names
    all_text = np.vstack([current.text, text])
    all_attrs = None if attrs is None else np.vstack([current.attributes, attrs])
    manifest = ClassesManifest(**{**fields, "n_classes": len(names), "fingerprint": "pending"})
    return ClassSet(names, current.descriptions + table.descriptions, all_text, all_attrs, manifest,
                    all_wv), table.names


def _attributes_in_order(table: ClassTable, want: Sequence[str], where: str) -> ClassTable:
    """``table`` with its attribute columns in the order ``want`` (matched by name)."""
    have = list(table.attribute_names)
    if have == list(want):
        return table
    missing = [a for a in want if a not in have]
    extra = [a for a in have if a not in want]
    if missing or extra:
        raise ValueError(f"{table.source}: attribute columns differ from {where} "
                         f"(missing: {', '.join(missing[:5]) or '-'}; unexpected: {', '.join(extra[:5]) or '-'})")
    order = [have.index(a) for a in want]
    return ClassTable(table.names, table.descriptions, list(want), table.attributes[:, order], table.source)


def add_classes(classes_dir: str, input_uri: str, *, text_encoder=None,
                check: Callable[[ClassSet], None] | None = None) -> tuple[ClassSet, list[str]]:
    """Append the classes of ``input_uri`` to the class set ``classes_dir``, in place, under the
    resume protocol's lock (:meth:`pipeline.core.resume.OutputDir.update`).

    ``check`` is called with the enlarged set before anything is written (e.g. to verify that a
    model can score it); an exception from it leaves ``classes_dir`` untouched. Returns the set as
    written and the added names (none when an earlier run added them already).
    """
    from pipeline.core.resume import OutputDir

    with OutputDir.update(classes_dir, job="classes"):
        current = load_class_set(classes_dir)
        enlarged, added = extend_class_set(current, input_uri, where=classes_dir, text_encoder=text_encoder)
        if check is not None:
            check(enlarged)
        if not added:
            return current, []
        write_class_set(classes_dir, enlarged.names, enlarged.descriptions, enlarged.text, enlarged.attributes,
                        enlarged.manifest, enlarged.word_vectors)
        LOG.info("added %d classes to %s (%d in all)", len(added), classes_dir, len(enlarged.names))
    return load_class_set(classes_dir), added
