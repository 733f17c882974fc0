"""Feature directories: the artifact ``zsl extract`` writes and every later stage reads.

Layout (every file written atomically, named by zero-padded shard id)::

    DIR/features/shard-000012.parquet   image_id, uri, label, caption, width, height, embedding
    DIR/errors/shard-000012.parquet     image_id, uri, stage, reason
    DIR/run.json                        the resume record (pipeline.core.resume)
    DIR/manifest.json                   FeaturesManifest: model id, dim, counts, config (written last)

This module opens and checks such a directory (:func:`open_features`, :func:`check_feature_shards`),
reads it batch by batch or whole (:func:`iter_shard_batches`, :func:`load_features`), says what
it is (:func:`features_identity`) and writes it: one shard at a time, the one writer every producer
uses (:func:`write_feature_shard`, :func:`write_error_shard`, :func:`write_caption_shard`), or a whole
matrix computed elsewhere (:func:`write_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.core.schema import ERRORS_SCHEMA, captions_schema, features_schema
from pipeline.core.manifests import CaptionsManifest, FeaturesManifest, read_manifest, write_manifest

__all__ = ["shard_name", "shard_id_of", "open_features", "feature_shards", "features_identity", "check_feature_shards",
           "table_embeddings", "iter_shard_batches", "Features", "load_features", "write_features",
           "write_feature_shard", "write_error_shard", "write_caption_shard",
           "labelled_rows", "feature_shard_problem", "split_feature_shards", "IDENTITY_KEYS", "IDENTITY_FLAGS", "identity_settings", "CAPTIONS_DIR", "open_captions", "caption_shards",
           "read_caption_shard"]

#: Where a feature directory keeps its caption embeddings (``zsl embed-text``), one shard per feature shard.
CAPTIONS_DIR = "text"

#: Extract settings that change what is written; anything else (batch size, actors, address) may
#: change on rerun without changing the features.
IDENTITY_KEYS = ("input", "input_format", "image_column", "label_column", "label_field", "encoder", "pretrained",
                 "shard_size", "max_image_pixels")
#: Extract settings that change the features only when on: part of the identity then, absent when off,
#: so outputs extracted before they existed keep their identity.
IDENTITY_FLAGS = ("jpeg_draft", "jpeg_on_gpu")


def identity_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of an extract config (or a features manifest's ``config``) that define its features.

    >>> identity_settings({"encoder": "effnet-lite0", "batch_size": 64, "jpeg_draft": False})
    {'encoder': 'effnet-lite0'}
    >>> identity_settings({"encoder": "effnet-lite0", "jpeg_draft": True})
    {'encoder': 'effnet-lite0', 'jpeg_draft': True}
    >>> identity_settings({"input": ["/a", "/b"], "encoder": "effnet-lite0"})
    {'input': '/a', 'encoder': 'effnet-lite0'}
    """
    out = {k: cfg.get(k) for k in IDENTITY_KEYS if k in cfg}
    if isinstance(out.get("input"), (list, tuple)):  # several inputs: the first names the features; more is growth
        out["input"] = out["input"][0]
    out.update({k: True for k in IDENTITY_FLAGS if cfg.get(k)})
    return out


def shard_name(shard_id: int) -> str:
    """``shard-000012.parquet``: the deterministic name of shard 12 in every shard directory."""
    return f"shard-{shard_id:06d}.parquet"


def shard_id_of(name: str) -> int | None:
    """Inverse of :func:`shard_name` (None for other names).

    >>> shard_id_of("shard-000012.parquet"), shard_id_of("notes.parquet")
    (12, None)
    """
    name = name.rsplit("/", 1)[-1]
    core = name[6:-8] if name.startswith("shard-") and name.endswith(".parquet") else ""
    return int(core) if core.isdigit() else None


def open_features(uri: str) -> FeaturesManifest:
    """The manifest of a finished feature directory (``FileNotFoundError`` if unfinished)."""
    return read_manifest(uri, FeaturesManifest)


def feature_shards(uri: str) -> list[str]:
    """Finished feature shard files of a feature directory, in shard order."""
    return list(zpq.iter_parquet_files(zio.join(uri, "features")))


def open_captions(features: str) -> CaptionsManifest | None:
    """The caption embeddings' manifest of a feature directory, or None when it has none (finished)."""
    d = zio.join(features, CAPTIONS_DIR)
    return read_manifest(d, CaptionsManifest) if zio.exists(zio.join(d, "manifest.json")) else None


def caption_shards(features: str) -> dict[str, str]:
    """Feature-shard name -> its caption-embeddings file."""
    d = zio.join(features, CAPTIONS_DIR, "shards")
    return {f.rsplit("/", 1)[-1]: f for f in zpq.iter_parquet_files(d)} if zio.exists(d) else {}


def read_caption_shard(features: str, caps: dict[str, str], feature_file: str, image_ids, dim: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``(has_caption (n,), embeddings (n, dim))`` of one feature shard's caption embeddings
    (``caps`` from :func:`caption_shards`), checked to hold the shard's ``image_ids`` row by row."""
    name = feature_file.rsplit("/", 1)[-1]
    if name not in caps:
        raise ValueError(f"{features}: shard {name} has no caption embeddings; run `zsl embed-text`")
    t = zpq.read_parquet(caps[name])
    ids = image_ids if isinstance(image_ids, pa.ChunkedArray) else pa.chunked_array(
        [pa.array(list(image_ids), pa.string())], pa.string())
    if t.num_rows != len(ids) or not t.column("image_id").equals(ids):
        raise ValueError(f"{caps[name]}: caption embeddings do not match {feature_file} row by row; "
                         "run `zsl embed-text --overwrite`")
    has = np.asarray(t.column("has_caption").to_numpy(zero_copy_only=False), bool)
    return has, table_embeddings(t, dim, caps[name])


def features_identity(uri: str, manifest: FeaturesManifest) -> str:
    """Fingerprint of what a feature directory holds, for outputs derived from it (labels, indexes).

    Made of the directory, the encoder and the settings that change the features, not batch size
    or actor count: a rerun of ``zsl extract`` that only adds shards keeps it.
    """
    cfg = manifest.config
    return zio.fingerprint({"dir": zio.absolute_uri(uri).rstrip("/"), "model_id": manifest.model_id,
                            "dim": manifest.dim, **identity_settings(cfg)})


def feature_shard_problem(uri: str, dim: int) -> str | None:
    """Why ``uri`` is not a shard of ``dim``-d float32 embeddings (its footer only), or None when it is."""
    want = pa.list_(pa.float32(), dim)
    fs, path = zio.filesystem(uri)
    try:
        with fs.open(path, "rb") as fh:
            schema = pq.ParquetFile(fh).schema_arrow
    except Exception as exc:  # noqa: BLE001 - a corrupted footer is bad input, named
        return f"not a readable feature shard ({type(exc).__name__}: {exc})"
    idx = schema.get_field_index("embedding")
    if idx < 0:
        return f"no 'embedding' column (columns: {', '.join(schema.names)})"
    if schema.field(idx).type != want:
        return (f"embeddings are {schema.field(idx).type}, the manifest and model expect "
                f"fixed_size_list<float>[{dim}]")
    return None


def split_feature_shards(files: Sequence[str], dim: int) -> tuple[list[str], dict[str, str]]:
    """``(usable shards, {unusable shard: reason})``, in the order given: a job that can go on without
    a broken shard (label, index) does the others and reports these (footers only are read)."""
    ok, bad = [], {}
    for f in files:
        why = feature_shard_problem(f, dim)
        if why is None:
            ok.append(f)
        else:
            bad[f] = why
    return ok, bad


def check_feature_shards(files: Sequence[str], dim: int) -> None:
    """Every shard holds ``dim``-d float32 embeddings (footers only); ValueError naming the first that does not."""
    for f in files:
        why = feature_shard_problem(f, dim)
        if why is not None:
            raise ValueError(f"{f}: {why}")


def table_embeddings(table: pa.Table, dim: int, where: str) -> np.ndarray:
    """The ``embedding`` column of a feature table as an ``(n, dim)`` float32 array."""
    col = table.column("embedding")
    if col.type != pa.list_(pa.float32(), dim):
        raise ValueError(f"{where}: embedding column is {col.type}, expected fixed_size_list<float>[{dim}]")
    # flatten() (not .values) honours slicing of the chunks
    flat = pa.concat_arrays([c.flatten() for c in col.chunks]) if col.num_chunks else pa.array([], pa.float32())
    return flat.to_numpy(zero_copy_only=False).reshape(-1, dim)


def iter_shard_batches(uri: str, dim: int, columns: Sequence[str] = (), batch_rows: int = 65_536):
    """One feature shard in batches of at most ``batch_rows`` rows: ``(columns table, (n, dim) embeddings)``.

    Reads row group by row group through one open handle, so memory holds a batch, not the shard.
    """
    import pyarrow.parquet as pq

    fs, path = zio.filesystem(uri)
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        if pf.metadata.num_rows == 0:
            return
        for rb in pf.iter_batches(batch_size=batch_rows, columns=[*columns, "embedding"], use_threads=True):
            table = pa.Table.from_batches([rb])
            yield table.select(list(columns)), table_embeddings(table, dim, uri)


@dataclass
class Features:
    """Feature table in memory: ids, uris, labels and an ``(n, dim)`` float32 matrix."""

    image_ids: list[str]
    uris: list[str]
    labels: list[str | None]
    X: np.ndarray
    manifest: FeaturesManifest


def load_features(uri: str) -> Features:
    """Load every feature shard of a finished feature directory (fits in memory: a few KB per image)."""
    manifest = open_features(uri)
    table = zpq.read_parquet_dir(zio.join(uri, "features"))
    X = table_embeddings(table, manifest.dim, uri)
    return Features(table.column("image_id").to_pylist(), table.column("uri").to_pylist(),
                    table.column("label").to_pylist(), X, manifest)


def labelled_rows(labels: Sequence[str | None], class_names: Sequence[str], wanted: Sequence[str],
                  where: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose label is in ``wanted`` and their index into ``class_names`` (error if a class has none)."""
    pos = {n: i for i, n in enumerate(class_names)}
    wanted_set = set(wanted)
    rows = [i for i, lab in enumerate(labels) if lab in wanted_set]
    cls = [pos[labels[i]] for i in rows]
    present = {class_names[c] for c in cls}
    empty = [w for w in wanted if w not in present]
    if empty:
        raise ValueError(f"{where}: no images labelled {', '.join(empty)} "
                         f"(labels present: {', '.join(sorted({l for l in labels if l}))})")
    return np.asarray(rows, np.int64), np.asarray(cls, np.int64)


def _text(values, n: int, *, optional: bool = True) -> pa.Array:
    """A string column: ``str`` of each value (None stays None where ``optional``), or nulls for ``values=None``."""
    if values is None:
        return pa.nulls(n, pa.string())
    if optional:
        return pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.array([str(v) for v in values], pa.string())


def _embeddings(X: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), pa.float32()), X.shape[1])


def write_feature_shard(out: str, shard_id: int, *, image_ids, uris, X: np.ndarray, labels=None, captions=None,
                        urls=None, keys=None, metas=None, widths=None, heights=None) -> int:
    """Write ``out/features/shard-<id>.parquet`` atomically (:func:`features_schema`); return its rows.

    The one writer of a feature shard (``zsl extract``, ``zsl import``, :func:`write_features`).
    ``X`` is the ``(n, dim)`` embedding matrix; a column given as None is all nulls. Ids and uris
    are written as ``str``; labels, urls, keys and metas as ``str`` or null; captions as given.
    In a feature directory the features file is the "shard done" marker: write anything else the
    shard has (its errors, its caption embeddings) first.
    """
    X = np.asarray(X, np.float32)
    if X.ndim != 2:
        raise ValueError(f"shard {shard_id}: embeddings of shape {X.shape}, expected (n, dim)")
    n, dim = X.shape
    table = pa.table({
        "image_id": _text(image_ids, n, optional=False), "uri": _text(uris, n, optional=False),
        "label": _text(labels, n),
        "caption": pa.nulls(n, pa.string()) if captions is None else pa.array(list(captions), pa.string()),
        "width": pa.nulls(n, pa.int32()) if widths is None else pa.array(widths, pa.int32()),
        "height": pa.nulls(n, pa.int32()) if heights is None else pa.array(heights, pa.int32()),
        "url": _text(urls, n), "key": _text(keys, n), "meta": _text(metas, n),
        "embedding": _embeddings(X),
    }, schema=features_schema(dim))
    zpq.write_parquet_atomic(zio.join(out, "features", shard_name(shard_id)), table)
    return n


def write_error_shard(out: str, shard_id: int, *, image_ids, uris, stages, reasons) -> int:
    """Write ``out/errors/shard-<id>.parquet`` atomically (:data:`ERRORS_SCHEMA`): the items of a
    shard that have no features, and why; return its rows."""
    n = len(image_ids)
    table = pa.table({"image_id": _text(image_ids, n, optional=False), "uri": _text(uris, n, optional=False),
                      "stage": _text(stages, n, optional=False), "reason": _text(reasons, n, optional=False)},
                     schema=ERRORS_SCHEMA)
    zpq.write_parquet_atomic(zio.join(out, "errors", shard_name(shard_id)), table)
    return n


def write_caption_shard(uri: str, *, image_ids, has_caption, X: np.ndarray) -> int:
    """Write one shard of caption embeddings (:func:`captions_schema`) to ``uri`` atomically; return its rows.

    Row ``i`` belongs to row ``i`` of the feature shard of the same name; rows without a caption
    hold zeros and ``has_caption`` false."""
    X = np.asarray(X, np.float32)
    table = pa.table({"image_id": image_ids, "has_caption": pa.array(has_caption), "embedding": _embeddings(X)},
                     schema=captions_schema(X.shape[1]))
    zpq.write_parquet_atomic(uri, table)
    return len(X)


def write_features(out: str, *, image_ids, uris, labels, X: np.ndarray, model_id: str,
                   shard_size: int = 50_000, notes: dict | None = None, config: dict | None = None,
                   image_size: int | None = None, captions=None) -> FeaturesManifest:
    """Write an in-memory feature matrix as a feature directory (same layout as ``zsl extract``).

    For features computed elsewhere (another extractor, simulations, benchmarks); ``config``
    (``encoder``, ``pretrained``) and ``image_size`` say how, when a known encoder made them.
    """
    X = np.asarray(X, np.float32)
    n, dim = X.shape
    if not (len(image_ids) == len(uris) == len(labels) == n):
        raise ValueError(f"{n} feature rows but {len(image_ids)} ids, {len(uris)} uris, {len(labels)} labels")
    for sid, s in enumerate(range(0, max(n, 1), shard_size)):
        e = min(n, s + shard_size)
        write_feature_shard(out, sid, image_ids=image_ids[s:e], uris=uris[s:e], labels=labels[s:e], X=X[s:e],
                            captions=None if captions is None else captions[s:e])
    manifest = FeaturesManifest(model_id=model_id, dim=int(dim), n_images=int(n), n_errors=0,
                                n_shards=max(1, -(-n // shard_size)), notes=dict(notes or {}),
                                config=dict(config or {}), image_size=image_size)
    write_manifest(out, manifest)
    return manifest
