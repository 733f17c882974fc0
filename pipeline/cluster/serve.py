"""Serving an ASGI app with Ray Serve, one replica per node (``zsl serve --address``)."""

from __future__ import annotations

import logging
from typing import Callable

from pipeline.cluster.session import init_ray

LOG = logging.getLogger(__name__)


def serve_asgi(builder: Callable[[], object], *, address: str | None, host: str, port: int,
               replicas: int | None = None, blocking: bool = True, name: str = "zsl",
               env: dict[str, str] | None = None) -> None:
    """Serve the ASGI app ``builder()`` makes with Ray Serve: one replica per node by default,
    each building (loading) the app itself; HTTP on ``host:port`` of the head node.

    ``builder`` is a module-level function of no arguments (Ray Serve calls it on each replica);
    ``env`` are environment variables of the replicas (how the builder gets its settings).
    """
    import ray
    from ray import serve

    init_ray(address)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    n = replicas or max(1, len(nodes))
    cpus = ray.cluster_resources().get("CPU", 1)
    serve.start(http_options={"host": host, "port": port})

    @serve.deployment(num_replicas=n, max_replicas_per_node=None if replicas else 1,
                      ray_actor_options={"num_cpus": min(1.0, max(0.1, (cpus - 0.5) / n)),
                                         "runtime_env": {"env_vars": dict(env or {})}})
    @serve.ingress(builder)
    class ZslService:
        pass

    LOG.info("Ray Serve: %d replica(s) of %s on http://%s:%d/", n, name, host, port)
    serve.run(ZslService.bind(), name=name, route_prefix="/", blocking=blocking)
