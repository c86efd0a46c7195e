"""Prometheus metrics for one app (own registry, so several apps can live in one process).

Label values are bounded: a request's method is one of ``METHODS`` or ``other``, its endpoint the route
rule that matched or ``unmatched``, its status a 3-digit code, so clients cannot grow ``/metrics`` by
sending made-up methods or paths.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401 - re-exported
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: str | None) -> str:
    return method if method in METHODS else "other"


def status_label(status: int | str) -> str:
    text = str(status)
    return text if len(text) == 3 and text.isdigit() else "other"


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("loupe_http_requests_total", "HTTP requests", ["method", "endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("loupe_http_request_duration_seconds", "HTTP request latency",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.search_stage = Histogram("loupe_search_stage_seconds", "time per search stage (embed, search, rerank)",
                                      ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("loupe_http_requests_in_flight", "requests being served", registry=self.registry)
        self.index_images = Gauge("loupe_index_images", "images in the served index", registry=self.registry)
        self.index_shards = Gauge("loupe_index_shards", "shards in the served index", registry=self.registry)
        self.index_bytes = Gauge("loupe_index_bytes", "bytes on disk of vectors and metadata", registry=self.registry)
        self.thumb_cache = Gauge("loupe_thumbnail_cache_bytes", "bytes held by the thumbnail cache",
                                 registry=self.registry)
        self.uploads = Gauge("loupe_upload_cache_images", "query images kept for POST /api/uploads tokens",
                             registry=self.registry)
        self.upload_bytes = Gauge("loupe_upload_cache_bytes", "bytes of the query images kept for upload tokens",
                                  registry=self.registry)
        self.started = time.time()

    def count_request(self, method: str | None, endpoint: str, status: int | str) -> None:
        """Count one answered request (``endpoint``: the matched route rule, or ``unmatched``)."""
        self.requests.labels(method_label(method), endpoint, status_label(status)).inc()

    def set_index(self, engine) -> None:
        if engine is None:
            return
        self.index_images.set(engine.count)
        self.index_shards.set(len(engine.shard_names))
        try:
            self.index_bytes.set(engine.index_bytes())
        except OSError:
            pass

    def set_uploads(self, count: int, size: int) -> None:
        self.uploads.set(count)
        self.upload_bytes.set(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
