"""Running the app: uvicorn in this process, or Ray Serve replicas (:mod:`pipeline.cluster.ray_serve`)
that each build it from the config in ``ZSL_SERVE_CONFIG``."""

from __future__ import annotations

import json
import logging
import os

from pipeline.core.config import ServeConfig
from pipeline.stages.serve.app import create_app
from pipeline.stages.serve.batching import text_workers
from pipeline.stages.serve.security import KEY_ENV

LOG = logging.getLogger(__name__)

CONFIG_ENV = "ZSL_SERVE_CONFIG"


def run_serve(cfg: ServeConfig, *, blocking: bool = True) -> None:
    """Load the indexes and serve them with uvicorn (or Ray Serve with ``cfg.ray``) until interrupted."""
    if cfg.ray:
        from pipeline.cluster.ray_serve import serve_asgi

        env = {CONFIG_ENV: json.dumps(cfg.model_dump(mode="json")),  # and the API key, if one is set
               **{k: os.environ[k] for k in [KEY_ENV] if k in os.environ}}
        serve_asgi(build_app_from_env, address=cfg.address, host=cfg.host, port=cfg.port, replicas=cfg.replicas,
                   blocking=blocking, env=env)
        return
    import uvicorn

    serving_process(cfg)
    app = frozen(create_app(cfg))  # with the Host check (security.check_hosts)
    follow_sighup(app)
    LOG.info("serving %s on http://%s:%d/", ", ".join(cfg.indexes), cfg.host, cfg.port)
    uvicorn.run(app, **uvicorn_options(cfg))


def follow_sighup(app) -> None:
    """``kill -HUP`` the server: ``app``'s index watcher checks for new versions now (uvicorn
    leaves SIGHUP free)."""
    import signal

    watcher = app.state.serve.watcher
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: watcher.wake())


def uvicorn_options(cfg: ServeConfig) -> dict:
    """uvicorn's settings: the address and the limits of ``cfg``; HTTP/1.1 by h11, whose
    ``h11_max_incomplete_event_size`` caps a request's head (httptools has no such cap)."""
    return dict(host=cfg.host, port=cfg.port, log_level="warning", http="h11",
                h11_max_incomplete_event_size=cfg.max_header_bytes, limit_concurrency=cfg.limit_concurrency,
                timeout_keep_alive=cfg.timeout_keep_alive, timeout_graceful_shutdown=cfg.timeout_graceful_shutdown,
                backlog=cfg.backlog)


def ray_app(args: dict | None = None):
    """Ray Serve application builder for ``serve run`` / a KubeRay RayService
    (``import_path: pipeline.stages.serve:ray_app``; config in ``ZSL_SERVE_CONFIG``); replicas and
    their resources come from the serve config (``infra/rayservice-serve.yaml``)."""
    from pipeline.cluster.ray_serve import deployment

    return deployment(build_app_from_env, max_replicas_per_node=1)


def build_app_from_env():
    """App builder for Ray Serve replicas: the config comes as JSON in ``ZSL_SERVE_CONFIG``; each
    replica loads the indexes itself."""
    cfg = ServeConfig(**json.loads(os.environ[CONFIG_ENV]))
    serving_process(cfg)
    return frozen(create_app(cfg))


def serving_process(cfg: ServeConfig) -> None:
    """Process-wide settings of a server process (not of :func:`create_app`, which tests mount):
    with several text-encoding threads, torch gets one thread each; a torch op split over every
    core stalls whenever one core is busy answering another request (``make bench-serve``, 2 cores,
    repeated queries: p99 144 -> 124 ms; within run-to-run noise for new queries)."""
    if text_workers(cfg) > 1:
        import torch

        torch.set_num_threads(1)


def frozen(app):
    """``app``, with every object made so far (the loaded indexes, models and libraries: ~600k)
    kept out of the garbage collector's full collections (``gc.freeze``). Each full collection walked
    them all, 0.5-0.7 s during which no thread of the server ran (2 busy cores): the latency tail of
    every request under ``make bench-serve``'s mixed load."""
    import gc

    gc.collect()
    gc.freeze()
    return app
