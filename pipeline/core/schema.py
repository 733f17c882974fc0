"""The one place every on-disk table is defined: the Parquet schemas of feature, caption, error, class,
label and id tables (their directories' typed manifests are :mod:`pipeline.core.manifests`)."""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "captions_schema",
    "features_schema",
    "ERRORS_SCHEMA",
    "classes_schema",
    "LABELS_SCHEMA",
    "INDEX_IDS_SCHEMA",
    "embedding_type",
    "check_schema",
]

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
            # where the image came from, as the input said (img2dataset's url and key), and the
            # rest of its metadata as a JSON object (null for plain folders)
            pa.field("url", pa.string()),
            pa.field("key", pa.string()),
            pa.field("meta", pa.string()),
            pa.field("embedding", embedding_type(dim), nullable=False),
        ]
    )


def captions_schema(dim: int) -> pa.Schema:
    """Caption embeddings of a feature directory (``FEATURES/text/shards/shard-N.parquet``, written by
    ``zsl embed-text`` or ``zsl import``): row ``i`` is row ``i`` of the feature shard of that name;
    rows without a caption hold zeros and ``has_caption`` false."""
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("has_caption", pa.bool_(), nullable=False),
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
