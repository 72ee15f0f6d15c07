"""The sweeper: the safety net that makes a lost message or a dead worker cost a delay, not a case.

It runs apart from the scoring queues, so no backlog can delay it: as its own process
(``medbatch sweeper``, a compose service) or as a thread of a worker started with ``--sweeper``
(the demo's). Several may run at once: each sweep takes what it re-sends with row locks that skip
rows another sweeper holds (db/repo.py ``take_stranded_cases``), so every stranded case or tile is
sent again once per sweep, by one of them.

Each sweep sends again (rules in db/leases.py ``Stranded``):
- cases and tiles whose lease expired: the worker holding them died or stalled;
- cases never sent: accepted while the broker was down;
- queued cases and tiles sent before the broker last started (a restart may have emptied it);
- queued ones sent more than a lease ago on a queue the broker reports empty (their message
  sits with a dead worker, or was lost between the broker and a worker);
- queued ones older than ``requeue_after_s``, whatever the broker says;
- explanations (db/explanations.py) by the same rules, on the ``explain`` queue.
A message sent twice costs nothing but a settled message: a worker claims only what is not done
and not held by another live worker.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.exceptions import ChannelError
from sqlalchemy.orm import Session, sessionmaker

from db import explanations, idempotency, leases, repo
from db.engine import session_scope
from db.tables import Priority, utcnow
from medbatch.settings import Settings
from worker.queues import (
    CHEM_QUEUE,
    CHEM_TASK,
    EXPLAIN_QUEUE,
    GENOME_QUEUE,
    GENOME_TASK,
    SCORE_QUEUES,
    enqueue_cases,
    enqueue_explanations,
    queue_for,
)

log = logging.getLogger(__name__)

#: Tile ledgers: the queue and task of each kind.
TILE_ROUTES = {"genome": (GENOME_QUEUE, GENOME_TASK), "chem": (CHEM_QUEUE, CHEM_TASK)}
#: Stranded tiles taken and sent per transaction (a sweep takes as many slices as there are).
TILES_PER_SLICE = 1_000


@dataclass
class BrokerState:
    """What the broker says: when it started, and which queues hold no message."""

    started_at: datetime | None = None
    empty_queues: frozenset[str] = frozenset()


@dataclass
class SweepReport:
    cases: int = 0
    tiles: dict[str, int] = field(default_factory=dict)
    explanations: int = 0
    idempotency_keys: int = 0

    @property
    def sent(self) -> int:
        return self.cases + sum(self.tiles.values()) + self.explanations


def broker_state(app: Celery, *, now: datetime) -> BrokerState:
    """The broker's start time (Redis ``INFO``) and its empty queues; nothing if unreachable."""
    queues = (*SCORE_QUEUES, EXPLAIN_QUEUE, GENOME_QUEUE, CHEM_QUEUE)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
            channel = conn.default_channel
            uptime = int(channel.client.info("server")["uptime_in_seconds"])
            empty = set()
            for queue in queues:
                try:
                    size = channel.queue_declare(queue=queue, passive=True).message_count
                except ChannelError:  # kombu: a Redis queue with no message does not exist
                    size = 0
                if size == 0:
                    empty.add(queue)
    except Exception as exc:
        log.warning("sweeper: broker state unknown: %s", type(exc).__name__)
        return BrokerState()
    return BrokerState(now - timedelta(seconds=uptime + 1), frozenset(empty))


def sweep(
    app: Celery,
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    now: datetime | None = None,
    broker: BrokerState | None = None,
) -> SweepReport:
    """One sweep: send again every stranded case and tile; forget expired Idempotency-Keys."""
    now = now or utcnow()
    broker = broker if broker is not None else broker_state(app, now=now)
    quiet_before = now - timedelta(seconds=settings.lease_ttl_s)
    rules = leases.Stranded(
        now=now,
        lost_before=now - timedelta(seconds=settings.requeue_after_s),
        broker_started_at=broker.started_at,
        quiet_before=quiet_before,
        quiet_priorities=tuple(p for p in Priority if queue_for(p) in broker.empty_queues),
    )
    report = SweepReport()
    while True:
        # Mark first, send second, then commit: if sending fails the transaction rolls back
        # and the next sweep finds the same cases; a message sent twice is harmless.
        with session_scope(sessions) as session:
            taken = repo.take_stranded_cases(session, rules=rules)
            if taken:
                enqueue_cases(app, taken, per_message=settings.cases_per_message)
        report.cases += len(taken)
        if len(taken) < 5_000:
            break
    while True:
        # The explain stage's ledger, by the same rules (its queue is read last, so a backlog
        # there is normal: only the broker's word or lost_before sends a queued one again).
        with session_scope(sessions) as session:
            pending = explanations.take_stranded_explanations(
                session, rules=rules, quiet=EXPLAIN_QUEUE in broker.empty_queues
            )
            if pending:
                enqueue_explanations(app, pending, per_message=settings.explain_max_batch_size)
        report.explanations += len(pending)
        if len(pending) < 5_000:
            break
    for kind, (queue, task) in TILE_ROUTES.items():
        report.tiles[kind] = 0
        while True:
            # In slices, every one this sweep: a broker restart empties a biobank job's queue
            # of thousands of tiles at once.
            with session_scope(sessions) as session:
                tiles = leases.take_stranded_tiles(
                    session,
                    kind=kind,
                    rules=rules,
                    quiet=queue in broker.empty_queues,
                    limit=TILES_PER_SLICE,
                )
                for job_id, index in tiles:
                    app.send_task(task, args=[job_id, index], queue=queue, routing_key=queue)
            report.tiles[kind] += len(tiles)
            if len(tiles) < TILES_PER_SLICE:
                break
    with sessions() as session:
        report.idempotency_keys = idempotency.forget_older_than(
            session, before=now - timedelta(hours=settings.idempotency_retention_h)
        )
    if report.sent:
        log.warning(
            "sweeper: sent again %d cases, %s tiles, %d explanations",
            report.cases,
            ", ".join(f"{n} {k}" for k, n in report.tiles.items()),
            report.explanations,
        )
    return report


class Sweeper:
    """Sweeps every ``sweep_interval_s`` until stopped; a failed sweep (database or broker
    away) is logged and tried again at the next interval."""

    def __init__(self, settings: Settings, *, app: Celery, sessions: sessionmaker[Session]):
        self.settings = settings
        self.app = app
        self.sessions = sessions
        self.stopping = threading.Event()
        self.sweeps = 0

    def run(self, *, alive_file: Path | None = None) -> None:
        """Sweep until stopped; touch ``alive_file`` after each sweep (the healthcheck's)."""
        log.info("sweeper: every %.1f s", self.settings.sweep_interval_s)
        while not self.stopping.is_set():
            self.sweep_once()
            if alive_file is not None:
                alive_file.touch()
            self.stopping.wait(self.settings.sweep_interval_s)

    def sweep_once(self) -> SweepReport | None:
        try:
            report = sweep(self.app, sessions=self.sessions, settings=self.settings)
        except Exception as exc:
            log.warning("sweeper: sweep failed, trying again later: %s", type(exc).__name__)
            return None
        self.sweeps += 1
        return report

    def start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="medbatch-sweeper", daemon=True)
        thread.start()
        return thread

    def stop(self, *_: Any) -> None:
        self.stopping.set()


def run_sweeper(settings: Settings) -> int:
    """``medbatch sweeper``: sweep until SIGTERM or SIGINT."""
    import signal

    from db.engine import make_engine, make_sessionmaker
    from worker.app import create_app

    engine = make_engine(settings.database_url)
    app = create_app(settings, include_tasks=False)
    sweeper = Sweeper(settings, app=app, sessions=make_sessionmaker(engine))
    signal.signal(signal.SIGTERM, sweeper.stop)
    signal.signal(signal.SIGINT, sweeper.stop)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    try:
        sweeper.run(alive_file=settings.var_dir / "sweeper.alive")
    finally:
        app.close()
        engine.dispose()
    return 0
