"""Search stage: free text -> the nearest images of a ``zsl index`` output (:class:`pipeline.index.searcher.Searcher`)."""

from __future__ import annotations

from pipeline.core.config import SearchConfig
from pipeline.index.searcher import Searcher

__all__ = ["Searcher", "run_search"]


def run_search(cfg: SearchConfig) -> dict:
    """``{"query": text, "k": k, "hits": [...]}`` for one query (what ``zsl search --json`` prints)."""
    s = Searcher(cfg.index)
    # --label: searched among the labels' images (pipeline.index.filters), so rare labels keep recall
    allowed = s.allowed(cfg.labels) if cfg.labels else None
    q_img, q_cap = s.text_query_pairs([cfg.text])[0]
    hits = s.search_pair(q_img, q_cap, cfg.k, mode=cfg.mode, caption_weight=cfg.caption_weight, allowed=allowed)
    out = {"query": cfg.text, "k": cfg.k, "hits": hits}
    return {**out, "labels": cfg.labels} if cfg.labels else out
