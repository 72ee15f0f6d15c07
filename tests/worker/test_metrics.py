"""The worker's Prometheus endpoint listens on loopback unless told otherwise."""

from __future__ import annotations

import httpx

from medbatch.settings import Settings
from tests.e2e.support import free_port
from worker import metrics


def test_metrics_bind_to_loopback_by_default() -> None:
    assert Settings().worker_metrics_host == "127.0.0.1"
    server = metrics.serve(free_port())
    assert server is not None
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert answer.status_code == 200 and "medbatch_cases_scored_total" in answer.text
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_bind_where_configured_and_a_taken_port_is_no_error() -> None:
    server = metrics.serve(free_port(), "0.0.0.0")
    assert server is not None
    try:
        assert server.server_address[0] == "0.0.0.0"
        assert metrics.serve(server.server_address[1], "0.0.0.0") is None  # taken: logged only
    finally:
        server.shutdown()
        server.server_close()
    assert metrics.serve(0) is None  # port 0: off
