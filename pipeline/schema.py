"""Parquet schemas: the one place every table layout of the pipeline is defined."""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "FEATURES_FORMAT",
    "features_schema",
    "ERRORS_SCHEMA",
    "classes_schema",
    "LABELS_SCHEMA",
    "INDEX_IDS_SCHEMA",
    "embedding_type",
    "check_schema",
]

FEATURES_FORMAT = "zsl-features/1"


def embedding_type(dim: int) -> pa.DataType:
    """Fixed-size list of float32: one embedding."""
    return pa.list_(pa.float32(), dim)


def features_schema(dim: int) -> pa.Schema:
    """Feature shards written by ``zsl extract``."""
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("uri", pa.string(), nullable=False),
            pa.field("label", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("embedding", embedding_type(dim), nullable=False),
        ]
    )


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


def classes_schema(text_dim: int, n_attributes: int, word_dim: int = 0) -> pa.Schema:
    """Class table written by ``zsl classes`` / ``zsl add-classes`` (NaN rows = missing source)."""
    fields = [
        pa.field("name", pa.string(), nullable=False),
        pa.field("description", pa.string()),
        pa.field("text_embedding", embedding_type(text_dim), nullable=False),
    ]
    if n_attributes:
        fields.append(pa.field("attributes", embedding_type(n_attributes)))
    if word_dim:
        fields.append(pa.field("word_vectors", embedding_type(word_dim)))
    return pa.schema(fields)


LABELS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("top1", pa.string(), nullable=False),
        pa.field("top1_score", pa.float32(), nullable=False),
        pa.field("top1_is_unseen", pa.bool_(), nullable=False),
        pa.field("topk", pa.list_(pa.string()), nullable=False),
        pa.field("topk_scores", pa.list_(pa.float32()), nullable=False),
    ]
)

INDEX_IDS_SCHEMA = pa.schema(
    [
        pa.field("faiss_id", pa.int64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()),
    ]
)


def check_schema(actual: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the first missing or mistyped field."""
    for field in expected:
        idx = actual.get_field_index(field.name)
        if idx < 0:
            raise ValueError(f"{where}: missing column '{field.name}' (expected {field.type})")
        got = actual.field(idx).type
        if got != field.type:
            raise ValueError(f"{where}: column '{field.name}' has type {got}, expected {field.type}")
