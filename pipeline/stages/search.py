"""Search stage: free text -> the nearest images of a ``zsl index`` output (:class:`pipeline.index.searcher.Searcher`)."""

from __future__ import annotations

from pipeline.core.config import SearchConfig
from pipeline.index.searcher import Searcher

__all__ = ["Searcher", "run_search"]


def run_search(cfg: SearchConfig) -> dict:
    """``{"query": text, "k": k, "hits": [...]}`` for one query (what ``zsl search --json`` prints)."""
    s = Searcher(cfg.index)
    if cfg.labels:  # searched among the labels' images (pipeline.index.filters): rare labels keep recall
        if cfg.mode != "image":
            raise ValueError(f"--label filters mode 'image' searches only, not {cfg.mode!r}")
        hits = s.search_filtered(s.text_queries([cfg.text]), cfg.k, s.allowed_ids(cfg.labels))[0]
    else:
        hits = s.search(cfg.text, cfg.k, mode=cfg.mode, caption_weight=cfg.caption_weight)
    out = {"query": cfg.text, "k": cfg.k, "hits": hits}
    return {**out, "labels": cfg.labels} if cfg.labels else out
