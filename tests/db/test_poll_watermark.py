"""repo.poll_watermark: the moment before which every change to a case is committed."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import make_engine, make_sessionmaker, session_scope
from db.tables import Case, Priority
from tests.conftest import PG_ADMIN_URL

pytestmark = pytest.mark.integration

NO_MARGIN = timedelta(0)


def _cases(sessions: sessionmaker[Session], n: int) -> list[int]:
    with session_scope(sessions) as s:
        tenant_id = repo.create_tenant(s, name="ehr")[0].id
        cases = [
            Case(
                tenant_id=tenant_id,
                external_id=f"c{i}",
                model_name="breast-cancer",
                model_version="1.0.0",
                priority=Priority.routine,
                features={},
            )
            for i in range(n)
        ]
        s.add_all(cases)
        s.flush()
        return [c.id for c in cases]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_on_sqlite_a_writer_that_waited_for_the_lock_is_not_skipped(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    """A worker stamps case A, then waits for SQLite's write lock; another writer commits case B
    (a later stamp) and a poll reads before A's writer gets the lock: the poll's watermark is
    still before A's stamp."""
    a, b = _cases(sessions, 2)
    with sessions() as s:
        tenant_id = s.scalar(select(Case.tenant_id).where(Case.id == a))
    assert tenant_id is not None
    path = make_url(str(engine.url)).database
    assert path
    holder = sqlite3.connect(path, isolation_level=None, timeout=30)
    holder.execute("BEGIN IMMEDIATE")

    def settle_a() -> None:
        with session_scope(sessions) as s:
            repo.mark_done(s, case_ids=[a])  # stamped now, written once the lock is free

    writer = threading.Thread(target=settle_a)
    writer.start()
    try:
        time.sleep(0.5)  # A's writer has stamped and waits on the lock
        holder.execute(
            "UPDATE cases SET status = 'done', updated_at = ? WHERE id = ?",
            (repo.utcnow().replace(tzinfo=None).isoformat(sep=" "), b),
        )
        holder.execute("COMMIT")
        holder.execute("BEGIN IMMEDIATE")  # before A's writer tries again
        with sessions() as s:
            watermark = repo.poll_watermark(s, margin=NO_MARGIN)
            seen = {c.id: c.status.value for c, _ in repo.list_results(s, tenant_id=tenant_id)}
        assert seen == {a: "queued", b: "done"}
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        writer.join()
    with sessions() as s:
        stamped_a, stamped_b = (
            s.scalar(select(Case.updated_at).where(Case.id == i)) for i in (a, b)
        )
        # B's stamp, the largest the poll saw, is after A's: a cursor kept there skips A.
        assert stamped_a is not None and stamped_b is not None and stamped_a < stamped_b
        assert watermark is not None and watermark <= stamped_a
        after = repo.list_results(s, tenant_id=tenant_id, since=watermark)
        assert (a, "done") in [(c.id, c.status.value) for c, _ in after]


def test_on_postgresql_an_open_transaction_that_has_not_written_holds_it_back(
    pg_sessions: sessionmaker[Session],
) -> None:
    """A transaction that has only read (no xid yet: its stamp may still be on its way) holds
    the watermark at its start; once it ends, the watermark is now again."""
    reader = pg_sessions()
    try:
        reader.execute(select(Case.id)).all()
        started = repo.utcnow()
        time.sleep(0.2)
        with pg_sessions() as s:
            held = repo.poll_watermark(s, margin=NO_MARGIN)
        assert held is not None and held <= started
    finally:
        reader.close()
    with pg_sessions() as s:
        free = repo.poll_watermark(s, margin=timedelta(seconds=1))
    assert free is not None and free > started - timedelta(seconds=1)


def test_on_postgresql_sessions_hidden_from_this_role_leave_it_unknown(
    pg_url: str, pg_engine: Engine
) -> None:
    """A role that may not see other roles' sessions cannot tell the oldest open transaction:
    no watermark (the API then keeps the client's `since`)."""
    role = f"medbatch_poll_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'poll'")
    url = make_url(pg_url).set(username=role, password="poll").render_as_string(False)
    limited = make_engine(url)
    try:
        with pg_engine.connect(), make_sessionmaker(limited)() as s:  # a session it cannot see
            assert repo.poll_watermark(s, margin=NO_MARGIN) is None
    finally:
        limited.dispose()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP ROLE {role}")
