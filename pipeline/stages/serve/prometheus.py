"""``GET /metrics``: request counts, errors, a latency histogram and the query caches' hits and
misses, in the Prometheus text format (``prometheus_client``, one registry per app)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pipeline.stages.serve.reload import IndexWatcher

LOG = logging.getLogger(__name__)

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: What :func:`prometheus_client.generate_latest` writes (the text format every Prometheus reads).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class ServeMetrics:
    """The app's metrics, in a registry of its own (so several apps in one process do not clash):
    ``zsl_requests_total`` and ``zsl_errors_total`` (status >= 400) by ``path`` (the route's
    template) and ``status``, ``zsl_request_seconds`` (histogram) by ``path``; by ``index`` (once
    :meth:`follow` names the watcher): ``zsl_query_cache_{hits,misses}_total``, ``zsl_index_info``
    (1, with the served ``version``), ``zsl_index_vectors``, ``zsl_index_loaded_timestamp_seconds``,
    ``zsl_index_reloads_total``, ``zsl_index_reload_failures_total`` and ``zsl_index_reload_ok``
    (0 while its newest version failed to load and an older one serves)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("zsl_requests", "HTTP requests by route and status.", ["path", "status"],
                                registry=self.registry)
        self.errors = Counter("zsl_errors", "HTTP requests answered with a status >= 400.", ["path", "status"],
                              registry=self.registry)
        self.seconds = Histogram("zsl_request_seconds", "Seconds to answer a request, by route.", ["path"],
                                 buckets=BUCKETS, registry=self.registry)
        self.failures = Counter("zsl_index_reload_failures", "New index versions that failed to load.", ["index"],
                                registry=self.registry)

    def follow(self, watcher: "IndexWatcher") -> None:
        """Report the served versions and query caches of ``watcher``'s indexes."""
        self.registry.register(_Indexes(watcher))

    def reload_failed(self, name: str) -> None:
        self.failures.labels(name).inc()

    def observe(self, *, path: str, status: int, seconds: float) -> None:
        """Count one answered request of route ``path`` that took ``seconds``."""
        self.requests.labels(path, status).inc()
        if status >= 400:
            self.errors.labels(path, status).inc()
        self.seconds.labels(path).observe(seconds)

    def latest(self) -> bytes:
        """Every metric, in the text format of :data:`CONTENT_TYPE`."""
        return generate_latest(self.registry)


class _Indexes(Collector):
    """The served versions and their text batchers' cache counts, read when scraped."""

    def __init__(self, watcher: "IndexWatcher") -> None:
        self.watcher = watcher

    def collect(self) -> Iterator[Metric]:
        w = self.watcher
        served = w.served
        fams = {
            "hits": CounterMetricFamily("zsl_query_cache_hits", "Text queries answered from the query cache.",
                                        labels=["index"]),
            "misses": CounterMetricFamily("zsl_query_cache_misses", "Text queries the query cache did not hold.",
                                          labels=["index"]),
            "info": GaugeMetricFamily("zsl_index_info", "The served version of each index.", labels=["index", "version"]),
            "n": GaugeMetricFamily("zsl_index_vectors", "Vectors in the served version.", labels=["index"]),
            "at": GaugeMetricFamily("zsl_index_loaded_timestamp_seconds", "When the served version was loaded.",
                                    labels=["index"]),
            "reloads": CounterMetricFamily("zsl_index_reloads", "New versions swapped in.", labels=["index"]),
            "ok": GaugeMetricFamily("zsl_index_reload_ok", "0 while the newest version failed to load.",
                                    labels=["index"]),
        }
        for name, v in served.items():
            fams["hits"].add_metric([name], v.batcher.hits)
            fams["misses"].add_metric([name], v.batcher.misses)
            fams["info"].add_metric([name, v.version], 1)
            fams["n"].add_metric([name], v.searcher.index.ntotal)
            fams["at"].add_metric([name], v.loaded_at)
            fams["reloads"].add_metric([name], w.reloads.get(name, 0))
            fams["ok"].add_metric([name], 0 if name in w.errors else 1)
        yield from fams.values()

