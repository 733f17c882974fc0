"""The app's wiring: load the indexes, build the state, add the limits middleware and the routers."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware

from pipeline.core.config import ServeConfig
from pipeline.index.searcher import Searcher
from pipeline.stages.serve import clip_retrieval, routes, security
from pipeline.stages.serve.docs import mount_docs
from pipeline.stages.serve.image_pool import ImagePool
from pipeline.stages.serve.middleware import Guard
from pipeline.stages.serve.prometheus import ServeMetrics
from pipeline.stages.serve.reload import IndexWatcher, load_searcher, serve_searcher
from pipeline.stages.serve.state import ServeState

LOG = logging.getLogger(__name__)


def create_app(cfg: ServeConfig, *, searchers: dict[str, Searcher] | None = None) -> FastAPI:
    """The FastAPI app serving ``cfg.indexes`` (name -> index dir); ``searchers`` injects loaded
    ones. While it runs (its lifespan), an :class:`~.reload.IndexWatcher` follows the indexes'
    new versions (every ``cfg.reload_interval_s`` seconds; ``app.state.serve.watcher.wake()``: now)."""
    loaded = load_searchers(cfg, searchers=searchers)
    metrics = ServeMetrics()
    watcher = IndexWatcher(cfg, {n: serve_searcher(cfg, n, s) for n, s in loaded.items()},
                           on_failure=metrics.reload_failed)
    metrics.follow(watcher)
    app = FastAPI(title="zsl-pipeline retrieval", version="1", docs_url=None, redoc_url=None,  # FastAPI's load a CDN
                  description="Text-to-image retrieval over zsl indexes (clip-retrieval compatible endpoints).",
                  lifespan=_watching)
    app.state.serve = ServeState(config=cfg, watcher=watcher, metrics=metrics, api_key=security.api_key(cfg),
                                 private_paths=[] if cfg.debug_paths else security.private_paths(cfg, loaded),
                                 images=ImagePool.of(cfg))
    app.add_middleware(Guard)  # the API key, the limits, no paths in errors, metrics (middleware.py)
    app.add_exception_handler(RequestValidationError, routes.validation_failed)
    if cfg.cors_origins:  # outermost: preflights and error answers carry the headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.include_router(routes.router)
    app.include_router(clip_retrieval.router)
    mount_docs(app)  # Swagger UI from a local package (FastAPI's own /docs loads a CDN)
    security.check_hosts(app, cfg)  # outermost: uvicorn and Ray Serve replicas alike
    return app


@asynccontextmanager
async def _watching(app: FastAPI):
    """The app's lifespan: the index watcher runs while the app serves."""
    watcher = app.state.serve.watcher
    watcher.start()
    try:
        yield
    finally:
        watcher.stop()


def load_searchers(cfg: ServeConfig, *, searchers: dict[str, Searcher] | None = None) -> dict[str, Searcher]:
    """``searchers`` plus the indexes of ``cfg.indexes`` not among them, loaded."""
    loaded = dict(searchers or {})
    for name, d in cfg.indexes.items():
        if name not in loaded:
            LOG.info("loading index %s from %s", name, d)
            loaded[name] = load_searcher(cfg, d)
    if not loaded:
        raise ValueError("zsl serve needs at least one --index")
    unknown = sorted(set(cfg.labels) - set(loaded))
    if unknown:
        raise ValueError(f"labels given for unserved index(es) {', '.join(unknown)} (served: {', '.join(loaded)})")
    return loaded
