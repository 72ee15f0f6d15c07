"""The leases a worker process holds, and the thread that renews them while its work runs.

A worker process has one identity (``host:pid:token``: a restarted process is another worker,
so it never renews what its predecessor held). It leases the cases it claims (and those it holds
unclaimed in its buffers), the explanations it computes (and those waiting to be explained
alone) and the tile it computes; a thread renews those leases every third of
their time to live, so a batch may run as long as it needs while a dead worker's leases run out
within ``lease_ttl_s``. Renewal runs beside the forward pass: torch and the database driver
release the GIL while they work.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from db import explanations as ledger
from db import leases as db_leases
from db import repo
from db.engine import session_scope

log = logging.getLogger(__name__)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LeaseKeeper:
    """Renews this process's leases in the background until :meth:`stop`."""

    def __init__(self, sessions: sessionmaker[Session], *, ttl_s: float) -> None:
        self.sessions = sessions
        self.lease = db_leases.Lease(worker_identity(), timedelta(seconds=ttl_s))
        self.renew_every_s = ttl_s / 3
        self._cases: set[int] = set()
        #: Cases whose explanation (their ledger row, db/explanations.py) this process holds.
        self._explanations: set[int] = set()
        self._tiles: set[db_leases.TileKey] = set()
        #: The cases waiting unclaimed in the buffers of this process's current batcher (a
        #: batcher replaced after a broker reconnect holds nothing: its leases run out).
        self.waiting: Callable[[], Iterable[int]] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def owner(self) -> str:
        return self.lease.owner

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="medbatch-lease-keeper", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def hold(self, case_ids: Iterable[int]) -> None:
        """Renew these cases' leases from now on (call after the lease was taken)."""
        self.start()
        with self._lock:
            self._cases.update(case_ids)

    def drop(self, case_ids: Iterable[int]) -> None:
        with self._lock:
            self._cases.difference_update(case_ids)

    def hold_explanations(self, case_ids: Iterable[int]) -> None:
        """Renew the leases of these cases' explanations from now on (once taken)."""
        self.start()
        with self._lock:
            self._explanations.update(case_ids)

    def drop_explanations(self, case_ids: Iterable[int]) -> None:
        with self._lock:
            self._explanations.difference_update(case_ids)

    @contextmanager
    def tile(self, key: db_leases.TileKey) -> Iterator[bool]:
        """Claim a tile's lease, renew it while the block runs; yield False (and hold nothing)
        when the tile is done or another live worker holds it. If the block raises, the lease
        ends at once, so the sweeper sends the tile again at its next sweep."""
        with session_scope(self.sessions) as session:
            claimed = db_leases.claim_tile(session, key=key, lease=self.lease)
        if not claimed:
            yield False
            return
        self.start()
        with self._lock:
            self._tiles.add(key)
        try:
            yield True
        except BaseException:
            try:
                with session_scope(self.sessions) as session:
                    db_leases.release_tile(session, key=key, owner=self.owner)
            except Exception:
                log.warning("could not release the lease of a %s tile; it expires", key.kind)
            raise
        finally:
            with self._lock:
                self._tiles.discard(key)

    def renew(self) -> None:
        waiting = set(self.waiting()) if self.waiting is not None else set()
        with self._lock:
            cases = sorted(self._cases | waiting)
            explained = sorted(self._explanations)
            tiles = sorted(self._tiles, key=lambda k: (k.kind, k.job_id, k.index))
        if not cases and not explained and not tiles:
            return
        with session_scope(self.sessions) as session:
            if cases:
                repo.renew_leases(session, case_ids=cases, lease=self.lease)
            if explained:
                ledger.renew_explanation_leases(session, case_ids=explained, lease=self.lease)
            if tiles:
                db_leases.renew_tile_leases(session, keys=tiles, lease=self.lease)

    def _run(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self.renew()
            except Exception as exc:
                # The database is away: the leases may lapse and the sweeper hand the work to
                # another worker; scoring twice never writes two rows (unique keys + upsert).
                log.warning("lease renewal failed: %s", type(exc).__name__)
