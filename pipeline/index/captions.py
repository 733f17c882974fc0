"""The caption index of a ``zsl index`` output: ``OUT/captions/``, an index directory of its own
over the images' caption embeddings (``FEATURES/text``, made by ``zsl embed-text``), with the same
faiss ids as the image index. Rows without a caption hold zero vectors (score 0; caption-only
searches drop them). It is built only when the captions were embedded with the model's text model,
kept while its inputs are unchanged, and removed when the features have no (usable) captions.
"""

from __future__ import annotations

import logging

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.core.config import IndexConfig
from pipeline.core.units import parse_memory
from pipeline.core.features import caption_shards, open_captions, read_caption_shard
from pipeline.core.manifests import CaptionsManifest
from pipeline.index.build import build_index
from pipeline.index.choose import choose_index
from pipeline.index.store import CAPTIONS_INDEX, read_ids, save_index
from pipeline.index.tune import tune_index

LOG = logging.getLogger(__name__)

__all__ = ["CaptionBatches", "update_caption_index"]


class CaptionBatches:
    """Re-iterable caption embeddings in index order, one shard at a time (checked row by row)."""

    def __init__(self, features: str, files: list[str], caps: dict[str, str], dim: int) -> None:
        self.features, self.files, self.caps, self.dim = features, files, caps, dim

    def __iter__(self):
        for f in self.files:
            ids = zpq.read_parquet(f, columns=["image_id"]).column("image_id")
            yield read_caption_shard(self.features, self.caps, f, ids, self.dim)[1]


def _unusable(cman: CaptionsManifest | None, caps: dict[str, str], names: list[str], text_model: str) -> str | None:
    """Why the captions cannot make a caption index for the model's text space (None: they can)."""
    if cman is None:
        return "no caption embeddings (`zsl embed-text`)"
    if cman.text_model != text_model:
        return f"captions embedded with {cman.text_model}, the model's text space is {text_model}"
    if any(n not in caps for n in names):
        return f"no caption embeddings for {sum(n not in caps for n in names)} shard(s); run `zsl embed-text`"
    return None


def update_caption_index(cfg: IndexConfig, *, index_dir: str, text_model: str, shard_files: list[str],
                         n_total: int, progress: bool = False) -> bool:
    """Bring ``index_dir/captions`` up to date with the captions of ``shard_files`` (the image
    index's shards, in its id order): (re)build it when its inputs changed, keep it when not,
    remove it when there are no usable captions. Returns whether it was built now."""
    dest = zio.join(index_dir, CAPTIONS_INDEX)
    cman = open_captions(cfg.features)
    caps = caption_shards(cfg.features) if cman else {}
    names = [f.rsplit("/", 1)[-1] for f in shard_files]
    why = _unusable(cman, caps, names, text_model)
    if why:
        if cman is not None:
            LOG.warning("%s: no caption index: %s", cfg.output, why)
        zio.remove(dest)
        return False
    ident = {"text_model": cman.text_model, "captions": zio.fingerprint(cman.to_json()), "shards": names,
             "sizes": [zio.filesystem(caps[n])[0].size(zio.filesystem(caps[n])[1]) for n in names],
             "max_memory": cfg.max_memory, "target_recall": cfg.target_recall}
    if zio.exists(zio.join(dest, "manifest.json")) and zio.read_json(zio.join(dest, "manifest.json")).get(
            "identity") == ident:
        return False
    batches = CaptionBatches(cfg.features, shard_files, caps, cman.dim)
    factory = choose_index(n_total, cman.dim, max_memory_bytes=parse_memory(cfg.max_memory))
    LOG.info("caption index: %d captions (%d rows) in %s", cman.n_captions, n_total, factory)
    index = build_index(batches, dim=cman.dim, factory=factory, n_total=n_total, use_gpu=False, progress=progress)
    tuning = tune_index(index, batches, n_total=n_total, target_recall=cfg.target_recall, k=cfg.tune_k,
                        max_query_ms=cfg.max_query_ms, n_queries=min(cfg.tune_queries, n_total))
    save_index(index, dest, ids=read_ids(index_dir), manifest={
        "factory": factory, "search_params": tuning.params if tuning else None, "tuning": tuning,
        "build": "build", "identity": ident, "text_model": cman.text_model,
        "text_model_name": cman.text_model_name, "text_pretrained": cman.text_pretrained,
        "features_dir": cfg.features, "shards": names, "max_memory": cfg.max_memory})
    return True
