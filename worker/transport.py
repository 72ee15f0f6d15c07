"""kombu's Redis transport, with one change: a channel reuses one Redis client object.

kombu's ``Channel.conn_or_acquire`` builds a new ``redis.Redis`` for every operation that is not
handed a client, and with redis-py 6+ each construction copies ~170 response callbacks into a
fresh case-insensitive dict. An acks-late consumer does two such operations per message (record
the delivery as unacknowledged, then acknowledge it), so on this 2-core machine about a quarter of
a message's cost was building clients (measured with cProfile; see bench/scoring.py). The client
shares the channel's connection pool either way, and redis-py clients are safe to share, so
reusing one changes nothing else. Selected by ``broker_transport`` in worker/app.py for
``redis://`` and ``rediss://`` URLs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        shared = self._shared_client
        if shared is None or shared.connection_pool is not pool:
            # A new pool (after a reconnect) gets a new client.
            shared = self._shared_client = self._create_client()
        yield shared


class Transport(kombu_redis.Transport):
    Channel = Channel
