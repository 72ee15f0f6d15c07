"""Prometheus metrics of a worker process (served on MEDBATCH_WORKER_METRICS_PORT)."""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

BATCH_SIZE = Histogram(
    "medbatch_batch_size",
    "Cases in one forward pass",
    ["queue", "model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)
QUEUE_WAIT = Histogram(
    "medbatch_queue_wait_seconds",
    "From a case's enqueue to the start of its forward pass",
    ["queue"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
INFERENCE = Histogram(
    "medbatch_inference_seconds",
    "Duration of one forward pass (including poison isolation retries)",
    ["queue", "model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
CASES_SCORED = Counter("medbatch_cases_scored_total", "Cases scored", ["queue", "model"])
SHADOW_SCORED = Counter(
    "medbatch_shadow_scores_total", "Cases also scored by a shadowing candidate", ["model"]
)
CASES_FAILED = Counter("medbatch_cases_failed_total", "Cases that ended failed", ["queue", "model"])
EXPLANATIONS = Counter(
    "medbatch_explanations_total", "Explanations settled by the explain stage", ["outcome"]
)
MESSAGES_REJECTED = Counter(
    "medbatch_messages_rejected_total", "Malformed scoring messages dropped", ["queue"]
)


def serve(port: int, host: str = "127.0.0.1") -> WSGIServer | None:
    """Expose the metrics on ``host:port`` (loopback unless told otherwise: they name models and
    queues, and nothing outside the machine needs them unless a scraper is set up for it).
    A taken port costs the metrics, never the worker. Returns the server (None if not serving)."""
    if not port:
        return None
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("worker metrics not served: %s:%d: %s", host, port, exc)
        return None
    log.info("worker metrics on %s:%d/metrics", host, port)
    return server
