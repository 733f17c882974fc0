"""Report stage: evaluation and search JSON files -> one self-contained HTML page (:mod:`pipeline.zsl.html_report`)."""

from __future__ import annotations

import logging

from pipeline.core import fs as zio
from pipeline.core.config import ReportConfig
from pipeline.zsl.html_report import default_thumbnail, metrics_by_name, render_report, write_report

LOG = logging.getLogger(__name__)

__all__ = ["run_report"]


def run_report(cfg: ReportConfig) -> str:
    """Render ``cfg.evaluation`` (``zsl evaluate --json`` files) and ``cfg.search`` (``zsl search --json``)
    into ``cfg.output``; return its URI."""
    results = []
    for f in cfg.evaluation:
        data = zio.read_json(f)
        if not isinstance(data, dict) or not ("results" in data or "gzsl" in data):
            raise ValueError(f"{f}: not a `zsl evaluate --json` file (no 'results')")
        results += data["results"] if "results" in data else [data]
    searches = []
    for f in cfg.search:
        data = zio.read_json(f)
        if not isinstance(data, dict) or "hits" not in data:
            raise ValueError(f"{f}: not a `zsl search --json` file (no 'hits')")
        searches.append(data)
    write_report(cfg.output, render_report(title=cfg.title, metrics=metrics_by_name(results), searches=searches,
                                           thumbnail=default_thumbnail))
    LOG.info("report with %d evaluations and %d searches -> %s", len(results), len(searches), cfg.output)
    return cfg.output
