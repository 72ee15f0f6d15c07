"""The Redis transport and the worker process when the broker crashes (a Redis of our own)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Consumer, Exchange, Queue

from tests.faults.servers import PrivateRedis

pytestmark = pytest.mark.integration


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def _close_after_crash(url: str, transport: str | None, server: PrivateRedis) -> str:
    """docs/kombu-redis-restore-unacked.md, step by step: hold an unacknowledged message on the
    default channel, a broadcast consumer on another, BRPOP in flight; kill Redis; then what
    Celery's consumer does (collect, then close). Returns what close() did."""
    conn = Connection(url, transport=transport)
    conn.connect()
    work = Queue("work", routing_key="work")
    with conn.Producer() as producer:
        producer.publish({"n": 1}, routing_key="work", declare=[work])
    held: list = []
    broadcast = Queue("bcast", Exchange("bcast", type="fanout"), auto_delete=True)
    Consumer(conn.channel(), [broadcast], callbacks=[lambda body, message: None]).consume()
    Consumer(conn, [work], callbacks=[lambda body, message: held.append(message)]).consume()
    for _ in range(50):
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.1)
        if held:
            break
    assert len(held) == 1
    for _ in range(100):
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.05)
        if conn.default_channel._in_poll:
            break
    assert conn.default_channel._in_poll, "no BRPOP in flight: the reproducer's state not reached"
    server.kill()
    with contextlib.suppress(Exception):
        conn.collect(socket_timeout=0.1)
    try:
        conn.close()
    except conn.connection_errors:
        return "connection error"
    except AttributeError:
        return "AttributeError"
    return "closed"


def test_stock_kombu_raises_attribute_error_on_close_after_a_crash(
    private_redis: PrivateRedis,
) -> None:
    """The upstream failure (kombu's own transport), reproduced: the reason for our Channel."""
    assert _close_after_crash(private_redis.url, None, private_redis) == "AttributeError"


def test_our_transport_closes_cleanly_after_a_crash(private_redis: PrivateRedis) -> None:
    """worker.transport keeps the channel's connection parameters: close() raises nothing that
    Celery would not ignore."""
    outcome = _close_after_crash(private_redis.url, "worker.transport:Transport", private_redis)
    assert outcome in ("closed", "connection error")


def test_a_worker_that_stops_on_an_error_exits_non_zero(
    tmp_path: Path, private_redis: PrivateRedis
) -> None:
    """Celery's 'Unrecoverable error' ends `medbatch worker` with status 1, never 0."""
    script = (
        "import sys\n"
        "from celery.worker.consumer.consumer import Consumer\n"
        "def broken(self): raise RuntimeError('injected')\n"
        "Consumer.start = broken\n"
        "from medbatch.cli import main\n"
        "sys.exit(main(['worker', '--hostname', 'exit-test@%h']))\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "MEDBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "MEDBATCH_BROKER_URL": private_redis.url,
        "MEDBATCH_WORKER_METRICS_PORT": "0",
        "MEDBATCH_DEVICE": "cpu",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, timeout=300
    )
    assert b"Unrecoverable error" in done.stdout + done.stderr
    assert done.returncode == 1


def test_free_port_is_free() -> None:
    """The private servers' ports come from the OS (another engineer may run the same tests)."""
    from tests.e2e.support import free_port

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
