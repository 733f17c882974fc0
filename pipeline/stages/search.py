"""Search stage: free text -> the nearest images of a ``zsl index`` output (:class:`pipeline.index.searcher.Searcher`)."""

from __future__ import annotations

from pipeline.core.config import SearchConfig
from pipeline.index.searcher import Searcher

__all__ = ["Searcher", "run_search"]


def run_search(cfg: SearchConfig) -> dict:
    """``{"query": text, "k": k, "hits": [...]}`` for one query (what ``zsl search --json`` prints)."""
    hits = Searcher(cfg.index).search(cfg.text, cfg.k, mode=cfg.mode, caption_weight=cfg.caption_weight)
    return {"query": cfg.text, "k": cfg.k, "hits": hits}
