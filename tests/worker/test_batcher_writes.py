"""The batcher writes one batch while it claims and scores the next, and acknowledges a batch's
messages only once its write committed (real PostgreSQL; the write held back by a table lock
another connection takes)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import psycopg
import pytest
from kombu.asynchronous.timer import Timer
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import Case, CaseStatus, Priority, Score
from medbatch.settings import Settings
from tests.helpers import wdbc_cases
from worker.app import create_app
from worker.batching import Batcher, _Buffer, _Message
from worker.context import WorkerContext, context
from worker.tasks.scoring import Scored, start_cases

pytestmark = pytest.mark.integration


def _add(sessions: sessionmaker[Session], prefix: str) -> list[int]:
    with session_scope(sessions) as s:
        tenant, _ = repo.create_tenant(s, name=prefix)
        new = [
            repo.NewCase(c["external_id"], "breast-cancer", "1.0.0", Priority.bulk, c["features"])
            for c in wdbc_cases(4, prefix=prefix)
        ]
        return [a.id for a in repo.add_cases(s, tenant_id=tenant.id, cases=new)]


def _statuses(sessions: sessionmaker[Session], ids: list[int]) -> set[CaseStatus]:
    with sessions() as s:
        return set(s.scalars(select(Case.status).where(Case.id.in_(ids))))


class _Task:
    """The scoring task's two halves as the batcher calls them; ``after_start`` runs once a
    batch is claimed and scored (before the batcher waits for the batch being written)."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.after_start: Callable[[], None] | None = None

    def start_batch(self, case_ids: list[int], *, queue: str, max_batch_size: int) -> Scored:
        scored = start_cases(
            case_ids,
            sessions=self.ctx.sessions,
            load_model=self.ctx.model,
            queue=queue,
            max_batch_size=max_batch_size,
            keeper=self.ctx.leases,
        )
        if self.after_start is not None:
            self.after_start()
        return scored


@pytest.fixture
def batcher(pg_url: str, redis_url: str) -> Iterator[Batcher]:
    app = create_app(Settings(database_url=pg_url), broker_url=redis_url, include_tasks=False)
    ctx = context(app)
    consumer = SimpleNamespace(timer=Timer(), connection_errors=())
    batcher = Batcher(_Task(ctx), app, consumer)
    yield batcher
    if batcher.writer is not None:
        batcher.writer.shutdown(wait=True)
    ctx.leases.stop()
    ctx.engine.dispose()
    app.close()


def _buffer(
    name: str, ids: list[int], acked: list[str], rejected: list[str], queue: str = "score.bulk"
) -> _Buffer:
    buffer = _Buffer(queue, 128, 0.1)
    buffer.messages.append(
        _Message(
            name, ids, ack=lambda: acked.append(name), reject=lambda _requeue: rejected.append(name)
        )
    )
    buffer.n_cases = len(ids)
    return buffer


def test_the_next_batch_is_scored_while_one_is_written_and_acks_wait_for_the_commit(
    batcher: Batcher, pg_url: str, pg_sessions: sessionmaker[Session]
) -> None:
    first, second = _add(pg_sessions, "first"), _add(pg_sessions, "second")
    acked: list[str] = []
    rejected: list[str] = []
    task: _Task = batcher.task
    with psycopg.connect(pg_url) as blocker:
        # Every write begins with its batch row: it waits for this lock.
        blocker.execute("LOCK TABLE batches IN EXCLUSIVE MODE")
        batcher._score(_buffer("m1", first, acked, rejected))
        # Scored and being written: the commit has not come, so no acknowledgement.
        assert batcher.writing is not None and batcher.writing.future is not None
        assert acked == [] and _statuses(pg_sessions, first) == {CaseStatus.running}

        first_write_pending: list[bool] = []

        def release() -> None:
            # The second batch was claimed and scored while the first's write still waited.
            assert batcher.writing is not None and batcher.writing.future is not None
            first_write_pending.append(not batcher.writing.future.done())
            assert _statuses(pg_sessions, second) == {CaseStatus.running}
            blocker.rollback()

        task.after_start = release
        batcher._score(_buffer("m2", second, acked, rejected))
    assert first_write_pending == [True]
    # The batcher waited for the first write before handing the second to the writer.
    assert acked == ["m1"] and _statuses(pg_sessions, first) == {CaseStatus.done}
    writing = batcher.writing
    assert writing is not None and writing.future is not None
    writing.future.result(timeout=60)
    assert acked == ["m1"]  # committed, but acknowledged by the event loop's next look
    batcher._check_write(writing)
    assert acked == ["m1", "m2"] and rejected == []
    assert batcher.writing is None
    assert _statuses(pg_sessions, second) == {CaseStatus.done}
    with pg_sessions() as s:
        scored = set(s.scalars(select(Score.case_id).where(Score.case_id.in_(first + second))))
    assert scored == set(first + second)


def test_a_case_in_the_batch_being_written_waits_for_that_write(
    batcher: Batcher, pg_url: str, pg_sessions: sessionmaker[Session]
) -> None:
    """A message redelivered while its case is being written (a duplicate send): the next batch
    waits for that write first, so the case is settled as it is, not scored again alone."""
    ids = _add(pg_sessions, "dup")
    acked: list[str] = []
    rejected: list[str] = []
    batcher._score(_buffer("m1", ids, acked, rejected))
    batcher._score(_buffer("m2", ids[:2], acked, rejected))
    assert acked == ["m1", "m2"] and rejected == []
    with pg_sessions() as s:
        counts = set(s.scalars(select(Case.delivery_count).where(Case.id.in_(ids))))
        rows = s.scalars(select(Score.case_id).where(Score.case_id.in_(ids))).all()
    assert counts == {1} and sorted(rows) == sorted(ids)


def test_a_write_the_database_refuses_hands_its_messages_back(
    batcher: Batcher, pg_url: str, pg_sessions: sessionmaker[Session]
) -> None:
    """The write fails (here: the database ends the writer's statement) after the messages'
    batch was scored: the messages go back to their queue, none is acknowledged."""
    ids = _add(pg_sessions, "refused")
    acked: list[str] = []
    rejected: list[str] = []
    with psycopg.connect(pg_url) as blocker:
        blocker.execute("LOCK TABLE batches IN EXCLUSIVE MODE")
        batcher._score(_buffer("m1", ids, acked, rejected))
        writing = batcher.writing
        assert writing is not None and writing.future is not None
        # End the waiting write the way a database restart or an operator does.
        deadline = time.monotonic() + 60
        while True:  # until the writer thread waits for the lock
            waiting = blocker.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            ).fetchone()
            if waiting is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert waiting is not None, "the write never reached the lock"
        blocker.execute("SELECT pg_terminate_backend(%s)", waiting)
        with pytest.raises(OperationalError):
            writing.future.result(timeout=60)
        blocker.rollback()
    batcher._check_write(writing)
    assert acked == [] and rejected == ["m1"]
    assert _statuses(pg_sessions, ids) == {CaseStatus.queued}


def test_a_stat_batch_is_written_at_once_beside_a_bulk_write_in_progress(
    batcher: Batcher, pg_url: str, pg_sessions: sessionmaker[Session]
) -> None:
    """A STAT batch does not wait for the commit of the bulk batch being written: it is written
    by the worker's thread beside it, and its messages acknowledged, while that write waits."""
    bulk, stat = _add(pg_sessions, "bulk"), _add(pg_sessions, "stat")
    acked: list[str] = []
    rejected: list[str] = []
    task: _Task = batcher.task
    with psycopg.connect(pg_url) as blocker:

        def hold_the_bulk_cases() -> None:
            # After the claim, before the write: the write's settle (and its score rows'
            # foreign-key checks) wait for these row locks.
            blocker.execute("SELECT id FROM cases WHERE id = ANY(%s) FOR UPDATE", (bulk,))
            task.after_start = None

        task.after_start = hold_the_bulk_cases
        batcher._score(_buffer("bulk", bulk, acked, rejected))
        writing = batcher.writing
        assert writing is not None and writing.future is not None
        batcher._score(_buffer("stat", stat, acked, rejected, queue="score.stat"))
        assert acked == ["stat"] and _statuses(pg_sessions, stat) == {CaseStatus.done}
        assert not writing.future.done() and batcher.writing is writing
        assert _statuses(pg_sessions, bulk) == {CaseStatus.running}
        blocker.rollback()
    writing.future.result(timeout=60)
    batcher._check_write(writing)
    assert acked == ["stat", "bulk"] and rejected == []
    assert _statuses(pg_sessions, bulk) == {CaseStatus.done}
