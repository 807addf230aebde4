"""The Prometheus series of ``API.md``, defined once per app on its own registry.

Labels are bounded sets only (route templates, status codes, defense and outcome names, model
name/version/provider). Never a request id, client id, input hash or a confidence value.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics

from gateway.auth import bearer_matches

#: 0.5 ms .. 5 s
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: L1 distance between two distributions is at most 2.
L1_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)


def _size_buckets(max_batch: int) -> tuple[float, ...]:
    out, b = [], 1
    while b < max_batch:
        out.append(float(b))
        b *= 2
    out.append(float(max_batch))
    return tuple(out)


class GatewayMetrics:
    #: ``out_of_range``: the model's output was not finite for a finite input (the request got 422).
    OUTCOMES = ("perturbed", "unchanged", "fallback", "out_of_range")

    def __init__(self, *, max_batch_size: int, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` twin series: they double the scrape for nothing
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_*: RSS, CPU seconds, open file descriptors (Linux)
        r = self.registry
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "End-to-end request latency.",
            ("route", "status"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "gateway_batch_size",
            "Rows per model+defense call.",
            buckets=_size_buckets(max_batch_size),
            registry=r,
        )
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time a request waited before its batch ran.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_inference = Histogram(
            "gateway_model_inference_seconds", "Model call per batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.defense_seconds = Histogram(
            "gateway_defense_seconds",
            "Defense call per batch.",
            ("defense",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.l1_distortion = Histogram(
            "gateway_defense_l1_distortion",
            "L1 distance between released and undefended vector, per row.",
            ("defense",),
            buckets=L1_BUCKETS,
            registry=r,
        )
        self.defended_rows = Counter(
            "gateway_defended_rows",
            "Rows through the defense by outcome.",
            ("defense", "outcome"),
            registry=r,
        )
        self.label_changes = Counter(
            "gateway_label_changes",
            "Rows whose defended argmax differed from the undefended one (must stay 0).",
            ("defense",),
            registry=r,
        )
        self.budget_backend_errors = Counter(
            "gateway_budget_backend_errors",
            "Query-budget calls to Redis that failed (that replica charged its own bucket instead).",
            registry=r,
        )
        self.queue_depth = Gauge("gateway_queue_depth", "Rows waiting in the batch queue.", registry=r)
        self.ready = Gauge("gateway_ready", "1 while /readyz would answer 200, else 0.", registry=r)
        self.model_info = Gauge(
            "gateway_model_info",
            "Served model; provider is the ONNX Runtime execution provider in use.",
            ("model", "version", "provider"),
            registry=r,
        )

    def init_defense(self, defense: str) -> None:
        """Create every labelled child so series exist (at 0) before the first request."""
        self.defense_seconds.labels(defense)
        self.l1_distortion.labels(defense)
        self.label_changes.labels(defense)
        for outcome in self.OUTCOMES:
            self.defended_rows.labels(defense, outcome)


# --- serving the registry ---------------------------------------------------------------------
def _wsgi_app(registry: CollectorRegistry, token: bytes | None) -> Any:
    from prometheus_client.exposition import make_wsgi_app

    inner = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if not bearer_matches(environ.get("HTTP_AUTHORIZATION", ""), token):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"/metrics needs Authorization: Bearer <GATEWAY_METRICS_TOKEN>\n"]
        return inner(environ, start_response)

    return app


def start_metrics_server(registry: CollectorRegistry, host: str, port: int, token: bytes | None) -> Any:
    """/metrics on its own port, in a daemon thread (``shutdown()`` stops it); the request log stays silent."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    class _Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = make_server(host, port, _wsgi_app(registry, token), ThreadingWSGIServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    return server
