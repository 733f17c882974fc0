"""Serving an ASGI app with Ray Serve: :func:`deployment` (the one deployment, also what a
RayService's ``import_path`` builds) and :func:`serve_asgi` (``zsl serve --ray``, one replica per node)."""

from __future__ import annotations

import logging
from typing import Any, Callable

from pipeline.cluster.session import init_ray

LOG = logging.getLogger(__name__)


def deployment(builder: Callable[[], object], **options: Any):
    """The Ray Serve application of the ASGI app ``builder()`` makes, bound (for ``serve.run`` or a
    serve config's ``import_path``): a deployment named ``ZslService`` whose replicas each build
    (load) the app themselves.

    ``builder`` is a module-level function of no arguments (Ray Serve calls it on each replica);
    ``options`` are ``serve.deployment`` options (``num_replicas``, ``ray_actor_options``, ...);
    those left out come from Ray Serve's defaults or the serve config file.
    """
    from ray import serve

    @serve.deployment(**options)
    @serve.ingress(builder)
    class ZslService:
        """One replica of the app."""

    return ZslService.bind()


def serve_asgi(builder: Callable[[], object], *, address: str | None, host: str, port: int,
               replicas: int | None = None, blocking: bool = True, name: str = "zsl",
               env: dict[str, str] | None = None) -> None:
    """Serve the ASGI app ``builder()`` makes with Ray Serve: one replica per node by default,
    each building (loading) the app itself; HTTP on ``host:port`` of the head node.

    ``builder`` is as in :func:`deployment`; ``env`` are environment variables of the replicas
    (how the builder gets its settings).
    """
    import ray
    from ray import serve

    init_ray(address)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    n = replicas or max(1, len(nodes))
    cpus = ray.cluster_resources().get("CPU", 1)
    serve.start(http_options={"host": host, "port": port})
    app = deployment(builder, num_replicas=n, max_replicas_per_node=None if replicas else 1,
                     ray_actor_options={"num_cpus": min(1.0, max(0.1, (cpus - 0.5) / n)),
                                        "runtime_env": {"env_vars": dict(env or {})}})
    LOG.info("Ray Serve: %d replica(s) of %s on http://%s:%d/", n, name, host, port)
    serve.run(app, name=name, route_prefix="/", blocking=blocking)
