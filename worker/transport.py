"""kombu's Redis transport, with two changes. Selected by ``broker_transport`` in worker/app.py for
``redis://`` and ``rediss://`` URLs.

1. A channel reuses one Redis client object. kombu's ``Channel.conn_or_acquire`` builds a new
   ``redis.Redis`` for every operation that is not handed a client, and with redis-py 6+ each
   construction copies ~170 response callbacks into a fresh case-insensitive dict. An acks-late
   consumer does two such operations per message (record the delivery as unacknowledged, then
   acknowledge it), so on this 2-core machine about a quarter of a message's cost was building
   clients (measured with cProfile; see bench/scoring.py). The client shares the channel's
   connection pool either way, and redis-py clients are safe to share, so reusing one changes
   nothing else.

2. A broker crash no longer ends the worker. When Redis goes away, Celery's consumer calls
   ``Connection.collect()`` and then ``Connection.close()``. ``collect()`` may leave open the
   channel that holds unacknowledged messages while it sets ``transport.client = None``;
   ``close()`` then closes that channel, and its ``QoS.restore_unacked()`` rebuilds a connection
   pool from ``transport.client``: ``AttributeError: 'NoneType' object has no attribute
   'hostname'``, which Celery's ``ignore_errors`` does not ignore, so the worker stopped
   ("Unrecoverable error"). kombu 5.7.0's stock transport does the same: see
   docs/kombu-redis-restore-unacked.md for a reproducer without Celery. Here a channel keeps the
   connection parameters it was made with, so the restore runs (a Redis that is back gets the
   messages again; one still down raises a connection error, which Celery ignores and reconnects).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None
    #: The kombu ``Connection`` this channel was opened for (its URL, credentials, options).
    _conninfo: Any = None

    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        self._conninfo = connection.client
        super().__init__(connection, *args, **kwargs)

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

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport.client is not None or self._conninfo is None:
            return super()._connparams(asynchronous=asynchronous)
        # The connection was collected while this channel still holds unacknowledged messages:
        # build the pool from the parameters the channel was opened with (see the module doc).
        transport.client = self._conninfo
        try:
            return super()._connparams(asynchronous=asynchronous)
        finally:
            transport.client = None


class Transport(kombu_redis.Transport):
    Channel = Channel
