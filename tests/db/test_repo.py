"""Schema and query functions on the real PostgreSQL and on SQLite."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db import explanations, repo
from db.engine import session_scope
from db.tables import Base, Case, CaseStatus, Priority, Score
from tests.helpers import score_row

pytestmark = pytest.mark.integration


def _case(external_id: str, **overrides: object) -> repo.NewCase:
    values: dict = {
        "external_id": external_id,
        "model_name": "breast-cancer",
        "model_version": "1.0.0",
        "priority": Priority.routine,
        "features": {"a": 1.0, "b": 2.5},
    }
    values.update(overrides)
    return repo.NewCase(**values)


def _tenant(sessions: sessionmaker[Session], name: str = "t1") -> int:
    with session_scope(sessions) as s:
        tenant, _ = repo.create_tenant(s, name=name)
        return tenant.id


def test_migrations_build_exactly_the_orm_schema(engine: Engine) -> None:
    """Alembic's head and db/tables.py agree: autogenerate finds nothing to change."""
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_api_keys_are_stored_hashed(sessions: sessionmaker[Session]) -> None:
    """Only the key's sha256 is stored; the key finds its tenant, a wrong key finds none."""
    with session_scope(sessions) as s:
        tenant, key = repo.create_tenant(s, name="hospital-a")
        assert key not in tenant.api_key_sha256
    with session_scope(sessions) as s:
        assert repo.tenant_for_key(s, api_key=key).name == "hospital-a"  # type: ignore[union-attr]
        assert repo.tenant_for_key(s, api_key=key + "x") is None


def test_add_cases_is_idempotent_for_identical_resubmissions(
    sessions: sessionmaker[Session],
) -> None:
    """The same external id with the same content returns the first case and adds no row."""
    tenant_id = _tenant(sessions)
    with session_scope(sessions) as s:
        first = repo.add_cases(s, tenant_id=tenant_id, cases=[_case("x1"), _case("x2")])
    assert [a.created for a in first] == [True, True]
    with session_scope(sessions) as s:
        again = repo.add_cases(s, tenant_id=tenant_id, cases=[_case("x2"), _case("x3")])
    assert [a.created for a in again] == [False, True]
    assert again[0].id == first[1].id
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Case)) == 3


def test_conflicting_resubmission_writes_nothing(sessions: sessionmaker[Session]) -> None:
    """An external id reused with other features raises, naming it, and the batch is not written."""
    tenant_id = _tenant(sessions)
    with session_scope(sessions) as s:
        repo.add_cases(s, tenant_id=tenant_id, cases=[_case("x1")])
    with pytest.raises(repo.ExternalIdConflict) as err, session_scope(sessions) as s:
        repo.add_cases(
            s, tenant_id=tenant_id, cases=[_case("new"), _case("x1", features={"a": 9.0})]
        )
    assert err.value.external_ids == ["x1"]
    with sessions() as s:
        assert s.scalars(select(Case.external_id)).all() == ["x1"]


def test_an_external_id_taken_by_a_concurrent_request_with_other_content_conflicts(
    sessions: sessionmaker[Session],
) -> None:
    """Another request commits the same external id with other features between this request's
    look-up and its insert: this request is a conflict (and writes nothing), never answered
    with the other request's case as if it were its own (``created=False``)."""
    tenant_id = _tenant(sessions)
    racer = [_case("x1", features={"a": 9.0})]

    with session_scope(sessions) as s:

        def commit_theirs_first(conn, cursor, statement, *args) -> None:
            if statement.lstrip().upper().startswith("INSERT INTO CASES") and racer:
                with session_scope(sessions) as other:
                    repo.add_cases(other, tenant_id=tenant_id, cases=[racer.pop()])

        engine = s.get_bind()
        event.listen(engine, "before_cursor_execute", commit_theirs_first)
        try:
            with pytest.raises(repo.ExternalIdConflict) as err:
                repo.add_cases(s, tenant_id=tenant_id, cases=[_case("new"), _case("x1")])
        finally:
            event.remove(engine, "before_cursor_execute", commit_theirs_first)
        s.rollback()
    assert not racer  # the other request did run in between
    assert err.value.external_ids == ["x1"]
    with sessions() as s:
        assert s.scalars(select(Case.external_id)).all() == ["x1"]
        assert s.scalar(select(Case.features)) == {"a": 9.0}


def test_external_ids_are_per_tenant_and_cases_invisible_across_tenants(
    sessions: sessionmaker[Session],
) -> None:
    """Two tenants may use the same external id; neither can read the other's case."""
    a, b = _tenant(sessions, "a"), _tenant(sessions, "b")
    with session_scope(sessions) as s:
        (case_a,) = repo.add_cases(s, tenant_id=a, cases=[_case("mrn-1")])
        (case_b,) = repo.add_cases(s, tenant_id=b, cases=[_case("mrn-1", features={"z": 0.0})])
    assert case_a.id != case_b.id
    with sessions() as s:
        assert repo.get_case(s, tenant_id=a, case_id=case_a.id) is not None
        assert repo.get_case(s, tenant_id=a, case_id=case_b.id) is None
        assert [c.id for c, _ in repo.list_results(s, tenant_id=b)] == [case_b.id]


def test_save_scores_twice_keeps_one_row(sessions: sessionmaker[Session]) -> None:
    """The score upsert keeps the first row for (case, model, version); the second adds nothing."""
    tenant_id = _tenant(sessions)
    with session_scope(sessions) as s:
        (added,) = repo.add_cases(s, tenant_id=tenant_id, cases=[_case("x1")])
    row = score_row(added.id, score=0.25, label="benign")
    with session_scope(sessions) as s:
        assert repo.save_scores(s, rows=[row]) == 1
    with session_scope(sessions) as s:
        assert repo.save_scores(s, rows=[{**row, "score": 0.75}]) == 0
    with sessions() as s:
        assert s.scalars(select(Score.score)).all() == [0.25]


def test_the_unique_constraint_itself_refuses_a_second_score(
    sessions: sessionmaker[Session],
) -> None:
    """Even a plain INSERT cannot add a second score for one case and model version."""
    tenant_id = _tenant(sessions)
    with session_scope(sessions) as s:
        (added,) = repo.add_cases(s, tenant_id=tenant_id, cases=[_case("x1")])
    make = lambda: Score(  # noqa: E731
        case_id=added.id,
        model_name="m",
        model_version="1",
        model_sha256="0" * 64,
        score=0.1,
        label="n",
    )
    with session_scope(sessions) as s:
        s.add(make())
    with pytest.raises(IntegrityError), session_scope(sessions) as s:
        s.add(make())


def test_claim_counts_deliveries_and_skips_failed_cases(sessions: sessionmaker[Session]) -> None:
    """Each claim adds one delivery; failed cases are not handed out again."""
    tenant_id = _tenant(sessions)
    with session_scope(sessions) as s:
        ids = [a.id for a in repo.add_cases(s, tenant_id=tenant_id, cases=[_case("1"), _case("2")])]
        repo.mark_failed(s, errors={ids[1]: "bad"})
    for _ in range(2):
        with session_scope(sessions) as s:
            claimed, dead = repo.claim_cases(s, case_ids=ids, max_deliveries=5)
            assert [c.id for c in claimed] == [ids[0]] and dead == []
            assert claimed[0].features == {"a": 1.0, "b": 2.5}
            assert claimed[0].enqueued_at is not None and claimed[0].enqueued_at.tzinfo is not None
    with sessions() as s:
        rows = {c.id: c for c in s.scalars(select(Case))}
    assert rows[ids[0]].delivery_count == 2 and rows[ids[0]].status == CaseStatus.running
    assert rows[ids[1]].status == CaseStatus.failed and rows[ids[1]].last_error == "bad"
    assert rows[ids[1]].delivery_count == 0


def test_too_many_deliveries_make_a_dead_letter_and_replay_brings_it_back(
    sessions: sessionmaker[Session],
) -> None:
    """Past max_deliveries a case ends failed as a dead letter with its last error; replay
    re-queues it with a fresh count; done cases are never claimed nor dead-lettered."""
    tenant_id = _tenant(sessions)
    with session_scope(sessions) as s:
        ids = [a.id for a in repo.add_cases(s, tenant_id=tenant_id, cases=[_case("1"), _case("2")])]
        repo.mark_done(s, case_ids=[ids[1]])
    for delivery in range(1, 4):
        with session_scope(sessions) as s:
            claimed, dead = repo.claim_cases(s, case_ids=ids, max_deliveries=2)
            repo.record_error(s, case_ids=ids, error=f"OperationalError: try {delivery}")
        if delivery <= 2:
            assert [c.id for c in claimed] == [ids[0]] and dead == []
        else:
            assert claimed == [] and dead == [ids[0]]
    with sessions() as s:
        case = s.get(Case, ids[0])
        assert case is not None
        assert case.status == CaseStatus.failed and case.dead_letter
        assert case.last_error == (
            "dead letter: delivered 3 times without finishing; last error: OperationalError: try 2"
        )
        assert (case.lease_owner, case.lease_expires_at) == (None, None)
        done = s.get(Case, ids[1])
        assert done is not None and done.status == CaseStatus.done and done.delivery_count == 0
    with session_scope(sessions) as s:
        assert repo.replay_dead_letters(s, tenant_id=tenant_id + 1) == []
        assert repo.replay_dead_letters(s, tenant_id=tenant_id) == [(ids[0], Priority.routine)]
    with sessions() as s:
        case = s.get(Case, ids[0])
        assert case is not None
        assert (case.status, case.dead_letter, case.delivery_count) == (CaseStatus.queued, False, 0)


def test_datetimes_come_back_aware_in_utc(sessions: sessionmaker[Session]) -> None:
    """Timestamps are timezone-aware UTC on PostgreSQL and SQLite alike."""
    tenant_id = _tenant(sessions)
    with session_scope(sessions) as s:
        repo.add_cases(s, tenant_id=tenant_id, cases=[_case("x")])
    with sessions() as s:
        case = s.scalars(select(Case)).one()
    assert case.created_at.tzinfo is not None
    assert case.created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - case.created_at) < timedelta(minutes=5)


def test_results_page_by_cursor_and_filter_by_status_and_model(
    sessions: sessionmaker[Session],
) -> None:
    """list_results walks case ids in order and filters by status and model version."""
    tenant_id = _tenant(sessions)
    with session_scope(sessions) as s:
        ids = [
            a.id
            for a in repo.add_cases(s, tenant_id=tenant_id, cases=[_case(str(i)) for i in range(5)])
        ]
        repo.mark_done(s, case_ids=ids[:3])
    with sessions() as s:
        page1 = repo.list_results(s, tenant_id=tenant_id, limit=2)
        page2 = repo.list_results(s, tenant_id=tenant_id, after_id=page1[-1][0].id, limit=2)
        assert [c.id for c, _ in page1 + page2] == ids[:4]
        done = repo.list_results(s, tenant_id=tenant_id, status=CaseStatus.done)
        assert [c.id for c, _ in done] == ids[:3]
        assert repo.list_results(s, tenant_id=tenant_id, model="breast-cancer@2.0") == []
        assert len(repo.list_results(s, tenant_id=tenant_id, model="breast-cancer@1.0.0")) == 5


def test_statements_naming_cases_follow_their_ids_whatever_the_statistics(
    pg_engine: Engine, pg_sessions: sessionmaker[Session]
) -> None:
    """Statistics from before a bulk load (20 cases, all done) must not steer a statement that
    names its cases by id onto a status index (a claim read every queued case's index entry and
    heap page) or the score insert's ledger rows onto a scan of ``scores``."""
    tenant = _tenant(pg_sessions)
    plans: list[str] = []

    def explain(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().startswith(("UPDATE cases", "WITH s AS")):
            cursor.execute("EXPLAIN " + statement, parameters)
            plans.append("\n".join(row[0] for row in cursor.fetchall()))

    with pg_engine.begin() as conn:
        conn.execute(text("ALTER TABLE cases SET (autovacuum_enabled = false)"))
    try:
        with session_scope(pg_sessions) as s:
            repo.add_cases(s, tenant_id=tenant, cases=[_case(f"old-{i}") for i in range(20)])
        with pg_engine.begin() as conn:
            conn.execute(text("UPDATE cases SET status = 'done'"))
            conn.execute(text("ANALYZE cases"))
            conn.execute(text("ANALYZE scores"))
        with session_scope(pg_sessions) as s:
            added = repo.add_cases(
                s, tenant_id=tenant, cases=[_case(f"new-{i}") for i in range(3000)]
            )
        ids = [a.id for a in added[:64]]
        lease = repo.Lease("test:1:x", timedelta(minutes=1))
        event.listen(pg_engine, "before_cursor_execute", explain)
        with session_scope(pg_sessions) as s:
            repo.hold_cases(s, case_ids=ids, lease=lease)
            claimed, _ = repo.claim_cases(s, case_ids=ids, max_deliveries=5, lease=lease)
            rows = [score_row(c.id, score=0.5, label="benign") for c in claimed]
            new, asked = explanations.save_scores_asking(s, rows=rows, case_ids=ids)
            repo.settle_cases(s, done=ids)
        event.remove(pg_engine, "before_cursor_execute", explain)
    finally:
        with pg_engine.begin() as conn:
            conn.execute(text("ALTER TABLE cases RESET (autovacuum_enabled)"))
    assert (len(claimed), new, asked) == (64, 64, ids)
    assert len(plans) == 4
    for plan in plans:
        assert "ix_cases_status" not in plan, plan
        assert "Seq Scan on scores" not in plan, plan
