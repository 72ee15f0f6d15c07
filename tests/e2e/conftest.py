"""Fixtures that start the API as its own process, on the real Redis and PostgreSQL."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from medbatch.settings import Settings
from tests.e2e.support import Processes, free_port
from worker.app import create_app


@pytest.fixture
def processes(pg_url: str, pg_engine, redis_url: str, tmp_path: Path) -> Iterator[Processes]:  # type: ignore[no-untyped-def]
    env = {
        **os.environ,
        "MEDBATCH_DATABASE_URL": pg_url,
        "MEDBATCH_BROKER_URL": redis_url,
        "MEDBATCH_DEVICE": "cpu",
        "MEDBATCH_LOG_LEVEL": "INFO",
        "MEDBATCH_WORKER_METRICS_PORT": "0",
        "MEDBATCH_EXPLAIN_TOP_K": "5",
    }
    procs = Processes(env, tmp_path)
    yield procs
    procs.stop_all()


@pytest.fixture
def api(processes: Processes, pg_sessions: sessionmaker[Session]) -> Iterator[httpx.Client]:
    """The API as its own process, with a tenant's key in the client's headers."""
    port = free_port()
    proc = processes.start("api", "api", "--port", str(port))
    with session_scope(pg_sessions) as s:
        key = repo.create_tenant(s, name="e2e")[1]
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, processes.log("api")
        try:
            if client.get("/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, processes.log("api")
        time.sleep(0.2)
    yield client
    client.close()


@pytest.fixture
def celery(pg_url: str, redis_url: str) -> Iterator[Celery]:
    """A Celery app on the test broker that only sends messages (it registers no tasks)."""
    app = create_app(Settings(database_url=pg_url), broker_url=redis_url, include_tasks=False)
    yield app
    app.close()
