"""``GET /metrics``: request counts, errors, a latency histogram and the query caches' hits and
misses, in the Prometheus text format (``prometheus_client``, one registry per app)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pipeline.stages.serve.batching import TextBatcher

LOG = logging.getLogger(__name__)

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: What :func:`prometheus_client.generate_latest` writes (the text format every Prometheus reads).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class ServeMetrics:
    """The app's metrics, in a registry of its own (so several apps in one process do not clash):
    ``zsl_requests_total`` and ``zsl_errors_total`` (status >= 400) by ``path`` (the route's
    template) and ``status``, ``zsl_request_seconds`` (histogram) by ``path``, and
    ``zsl_query_cache_{hits,misses}_total`` by ``index``."""

    def __init__(self, *, batchers: Mapping[str, "TextBatcher"]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("zsl_requests", "HTTP requests by route and status.", ["path", "status"],
                                registry=self.registry)
        self.errors = Counter("zsl_errors", "HTTP requests answered with a status >= 400.", ["path", "status"],
                              registry=self.registry)
        self.seconds = Histogram("zsl_request_seconds", "Seconds to answer a request, by route.", ["path"],
                                 buckets=BUCKETS, registry=self.registry)
        self.registry.register(_QueryCaches(batchers))

    def observe(self, *, path: str, status: int, seconds: float) -> None:
        """Count one answered request of route ``path`` that took ``seconds``."""
        self.requests.labels(path, status).inc()
        if status >= 400:
            self.errors.labels(path, status).inc()
        self.seconds.labels(path).observe(seconds)

    def latest(self) -> bytes:
        """Every metric, in the text format of :data:`CONTENT_TYPE`."""
        return generate_latest(self.registry)


class _QueryCaches(Collector):
    """The text batchers' cache counts, read when scraped (the batchers keep the counts)."""

    def __init__(self, batchers: Mapping[str, "TextBatcher"]) -> None:
        self.batchers = batchers

    def collect(self) -> Iterator[Metric]:
        hits = CounterMetricFamily("zsl_query_cache_hits", "Text queries answered from the query cache.",
                                   labels=["index"])
        misses = CounterMetricFamily("zsl_query_cache_misses", "Text queries the query cache did not hold.",
                                     labels=["index"])
        for name, b in self.batchers.items():
            hits.add_metric([name], b.hits)
            misses.add_metric([name], b.misses)
        yield hits
        yield misses
