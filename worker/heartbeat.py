"""Which queues a live worker consumes: each worker keeps a short-lived key in the broker's Redis.

A job put on a queue that no worker reads would otherwise sit ``queued`` with no hint (a genome
job behind a worker started with ``--queues score.*``). Every worker writes
``medbatch:worker:<hostname>`` = its queues, with a TTL a few beats long, from a daemon thread; a
worker that dies (even by SIGKILL) drops out when its key expires. The API and the CLI read the
keys to say "no worker is listening on queue X". Redis keys rather than ``celery inspect``: that
is a broadcast with a timeout (about a second per question) and needs every worker's pidbox.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from celery import Celery

log = logging.getLogger(__name__)

KEY_PREFIX = "medbatch:worker:"
#: Seconds between beats, and how long a key outlives its last beat.
INTERVAL_S = 5.0
TTL_S = 20

#: The process's last answer, so that a burst of status reads asks the broker once.
_cache: dict[str, tuple[float, frozenset[str] | None]] = {}
_CACHE_S = 2.0


def _client(app: Celery) -> Any:
    conn = app.connection_for_write()
    conn.ensure_connection(max_retries=1, timeout=3)
    return conn, conn.default_channel.client


def beat(app: Celery, *, hostname: str, queues: list[str]) -> None:
    """Write this worker's key once (its queues and pid)."""
    conn, client = _client(app)
    try:
        value = json.dumps({"queues": sorted(queues), "pid": os.getpid()})
        client.set(KEY_PREFIX + hostname, value, ex=TTL_S)
    finally:
        conn.release()


def forget(app: Celery, *, hostname: str) -> None:
    """Drop this worker's key at a clean shutdown (a killed worker's key expires)."""
    try:
        conn, client = _client(app)
        try:
            client.delete(KEY_PREFIX + hostname)
        finally:
            conn.release()
    except Exception as exc:  # the broker may be gone already; the key expires anyway
        log.debug("heartbeat: could not drop the key: %s", type(exc).__name__)


def start(app: Celery, *, hostname: str, queues: list[str]) -> threading.Event:
    """Beat every :data:`INTERVAL_S` from a daemon thread; set the returned event to stop."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                beat(app, hostname=hostname, queues=queues)
            except Exception as exc:  # a broker outage: beat again when it is back
                log.debug("heartbeat failed: %s", type(exc).__name__)
            stop.wait(INTERVAL_S)

    threading.Thread(target=run, name="medbatch-heartbeat", daemon=True).start()
    return stop


def listening_queues(app: Celery) -> frozenset[str] | None:
    """The union of the queues live workers consume; None if the broker cannot be asked."""
    url = str(app.conf.broker_url)
    cached = _cache.get(url)
    if cached is not None and time.monotonic() - cached[0] < _CACHE_S:
        return cached[1]
    found: frozenset[str] | None
    try:
        conn, client = _client(app)
        try:
            queues: set[str] = set()
            for key in client.scan_iter(match=KEY_PREFIX + "*", count=100):
                raw = client.get(key)
                if raw:
                    queues.update(json.loads(raw).get("queues", []))
            found = frozenset(queues)
        finally:
            conn.release()
    except Exception as exc:
        log.debug("heartbeat: broker not readable: %s", type(exc).__name__)
        found = None
    _cache[url] = (time.monotonic(), found)
    return found


def waiting_detail(app: Celery | None, queue: str) -> str | None:
    """A sentence for a job waiting on ``queue`` when no live worker consumes it, else None."""
    if app is None:
        return None
    listening = listening_queues(app)
    if listening is None:
        return f"waiting on queue {queue}; the broker cannot be reached to see who listens"
    if queue in listening:
        return None
    return (
        f"no worker is listening on queue {queue}; start one: medbatch worker --queues {queue} "
        "(or medbatch worker, which listens to every queue)"
    )
