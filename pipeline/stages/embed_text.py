"""Caption stage (``zsl embed-text``): the captions a feature directory carries -> text embeddings.

Each feature shard ``features/shard-N.parquet`` gives ``FEATURES/text/shards/shard-N.parquet``
(:func:`pipeline.core.schema.captions_schema`): row ``i`` is the embedding of row ``i``'s caption with the
text model (zeros, ``has_caption`` false, where there is none), so captions share the image ids and
order. ``FEATURES/text`` is an output directory under the resume protocol: a rerun embeds only the
shards the features gained; another text model or column is refused unless ``overwrite``.
``zsl index`` then adds a caption index beside the image index, and ``zsl search``/``serve`` can
search captions, images, or both.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.core.config import EmbedTextConfig
from pipeline.encoders.text import load_text_encoder
from pipeline.encoders.common import encoder_id
from pipeline.core.features import CAPTIONS_DIR, feature_shards, features_identity, open_features
from pipeline.core.resume import OutputDir
from pipeline.core.schema import captions_schema
from pipeline.core.manifests import CaptionsManifest
from pipeline.core.timing import timed

LOG = logging.getLogger(__name__)

__all__ = ["run_embed_text"]


def run_embed_text(cfg: EmbedTextConfig, *, progress: bool = True) -> CaptionsManifest:
    """Embed the captions of every feature shard that has no caption shard yet; return the manifest."""
    from tqdm.auto import tqdm

    with timed() as clock:
        fman = open_features(cfg.features)
        files = feature_shards(cfg.features)
        for f in files[:1]:
            names = pq.read_schema(zio.filesystem(f)[1] if zio.is_local(f) else f).names
            if cfg.column not in names:
                raise ValueError(f"{f}: no column '{cfg.column}' (columns: {', '.join(names)})")
        out_dir = zio.join(cfg.features, CAPTIONS_DIR)
        model_id = encoder_id(cfg.text_model, cfg.pretrained)
        identity = {"features": features_identity(cfg.features, fman), "text_model": model_id, "column": cfg.column}
        with OutputDir(out_dir, job="embed-text", identity=identity, overwrite=cfg.overwrite,
                       owned=("shards",)) as out:
            shard_dir = out.join("shards")
            done = zpq.parquet_names(shard_dir)
            todo = [f for f in files if f.rsplit("/", 1)[-1] not in done]
            LOG.info("embedding the '%s' texts of %d feature shards (%d already done) with %s", cfg.column,
                     len(todo), len(files) - len(todo), model_id)
            encoder = None
            if todo:
                out.begin()
                encoder = load_text_encoder(cfg.text_model, cfg.pretrained)
            for f in tqdm(todo, desc="embed-text", unit="shard", disable=not progress):
                _embed_shard(cfg, encoder, f, shard_dir)
            if encoder is None:
                prev = out.finished(CaptionsManifest)
                dim = prev.dim if prev else load_text_encoder(cfg.text_model, cfg.pretrained).dim
            else:
                dim = encoder.dim
            n_rows, n_caps = _count_captions(shard_dir) if files else (0, 0)
            manifest = CaptionsManifest(
                text_model=model_id, text_model_name=cfg.text_model, text_pretrained=cfg.pretrained, dim=dim,
                column=cfg.column, n_shards=len(files), n_rows=n_rows, n_captions=n_caps,
                seconds_last_run=round(clock.elapsed(), 2))
            out.finish(manifest)
            return manifest


def _embed_shard(cfg: EmbedTextConfig, encoder, feature_shard: str, shard_dir: str) -> None:
    """Write the caption shard of one feature shard (zero vectors where a row has no text)."""
    table = zpq.read_parquet(feature_shard, columns=["image_id", cfg.column])
    texts = table.column(cfg.column).to_pylist()
    has = np.array([isinstance(t, str) and bool(t.strip()) for t in texts], bool)
    emb = np.zeros((len(texts), encoder.dim), np.float32)
    if has.any():
        emb[has] = encoder.encode([t for t, h in zip(texts, has) if h], batch_size=cfg.batch_size)
    zpq.write_parquet_atomic(zio.join(shard_dir, feature_shard.rsplit("/", 1)[-1]), pa.table({
        "image_id": table.column("image_id"), "has_caption": pa.array(has),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), encoder.dim),
    }, schema=captions_schema(encoder.dim)))


def _count_captions(shard_dir: str) -> tuple[int, int]:
    """Rows and rows with a caption over every caption shard."""
    n_rows = n_caps = 0
    for f in zpq.iter_parquet_files(shard_dir):
        has = zpq.read_parquet(f, columns=["has_caption"]).column("has_caption")
        n_rows += len(has)
        n_caps += int(pc.sum(has).as_py() or 0)
    return n_rows, n_caps
