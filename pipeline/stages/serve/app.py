"""The app's wiring: load the indexes, build the state, add the limits middleware and the routers."""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware

from pipeline.core.config import ServeConfig
from pipeline.index.searcher import PredictedLabels, Searcher
from pipeline.stages.serve import clip_retrieval, routes, security
from pipeline.stages.serve.batching import TextBatcher
from pipeline.stages.serve.image_pool import ImagePool
from pipeline.stages.serve.middleware import Guard
from pipeline.stages.serve.prometheus import ServeMetrics
from pipeline.stages.serve.state import ServeState

LOG = logging.getLogger(__name__)


def text_workers(cfg: ServeConfig) -> int:
    """Threads encoding text queries: ``cfg.text_workers``, or one per core (at most 4)."""
    return cfg.text_workers or min(4, os.cpu_count() or 1)


def create_app(cfg: ServeConfig, *, searchers: dict[str, Searcher] | None = None) -> FastAPI:
    """The FastAPI app serving ``cfg.indexes`` (name -> index dir); ``searchers`` injects loaded ones."""
    loaded = load_searchers(cfg, searchers=searchers)
    batchers = {n: TextBatcher(s, cache_size=cfg.query_cache, workers=text_workers(cfg)) for n, s in loaded.items()}
    app = FastAPI(title="zsl-pipeline retrieval", version="1", docs_url=None, redoc_url=None,  # their pages load a CDN
                  description="Text-to-image retrieval over zsl indexes (clip-retrieval compatible endpoints).")
    app.state.serve = ServeState(config=cfg, searchers=loaded, batchers=batchers,
                                 metrics=ServeMetrics(batchers=batchers), api_key=security.api_key(cfg),
                                 private_paths=[] if cfg.debug_paths else security.private_paths(cfg, loaded),
                                 images=ImagePool.of(cfg))
    app.add_middleware(Guard)  # the API key, the limits, no paths in errors, metrics (middleware.py)
    app.add_exception_handler(RequestValidationError, routes.validation_failed)
    if cfg.cors_origins:  # outermost: preflights and error answers carry the headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.include_router(routes.router)
    app.include_router(clip_retrieval.router)
    security.check_hosts(app, cfg)  # outermost: uvicorn and Ray Serve replicas alike
    return app


def load_searchers(cfg: ServeConfig, *, searchers: dict[str, Searcher] | None = None) -> dict[str, Searcher]:
    """``searchers`` plus the indexes of ``cfg.indexes`` not among them, loaded, each with the
    image-pixel limit and the predicted labels ``cfg.labels`` gives it."""
    loaded = dict(searchers or {})
    for name, d in cfg.indexes.items():
        if name not in loaded:
            LOG.info("loading index %s from %s", name, d)
            loaded[name] = Searcher(d, load_text=cfg.preload_text, text_backend=cfg.text_backend,
                                    text_threads=1 if text_workers(cfg) > 1 else None)
    if not loaded:
        raise ValueError("zsl serve needs at least one --index")
    unknown = sorted(set(cfg.labels) - set(loaded))
    if unknown:
        raise ValueError(f"labels given for unserved index(es) {', '.join(unknown)} (served: {', '.join(loaded)})")
    for name, s in loaded.items():
        s.max_image_pixels = cfg.max_image_pixels
        if name in cfg.labels:
            LOG.info("predicted labels of index %s from %s", name, cfg.labels[name])
            s.labels = PredictedLabels(cfg.labels[name], s.manifest)
    return loaded
