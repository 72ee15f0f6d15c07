"""Leases, the one-statement claim and settle, and the sweeper's choice of stranded work, on the
real PostgreSQL and on SQLite."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from db import leases, repo
from db.engine import session_scope
from db.tables import Case, CaseStatus, GenomeJob, JobStatus, JobTile, Priority

pytestmark = pytest.mark.integration

LIVE = timedelta(minutes=5)
EXPIRED = timedelta(seconds=-1)


def _add(sessions: sessionmaker[Session], n: int, **overrides: object) -> list[int]:
    with session_scope(sessions) as s:
        tenant, _ = repo.create_tenant(s, name=f"t{datetime.now(UTC).timestamp()}")
        cases = [
            repo.NewCase(
                external_id=f"c{i}",
                model_name="breast-cancer",
                model_version="1.0.0",
                priority=overrides.get("priority", Priority.routine),  # type: ignore[arg-type]
                features={"a": 1.0},
            )
            for i in range(n)
        ]
        return [a.id for a in repo.add_cases(s, tenant_id=tenant.id, cases=cases)]


def _cases(sessions: sessionmaker[Session], ids: list[int]) -> list[Case]:
    with sessions() as s:
        found = {c.id: c for c in s.scalars(select(Case).where(Case.id.in_(ids)))}
    return [found[i] for i in ids]


def _claim(
    sessions: sessionmaker[Session], ids: list[int], owner: str, ttl: timedelta = LIVE
) -> tuple[list[int], list[int]]:
    with session_scope(sessions) as s:
        claimed, dead = repo.claim_cases(
            s, case_ids=ids, max_deliveries=5, lease=repo.Lease(owner, ttl)
        )
    return [c.id for c in claimed], dead


def test_a_claim_takes_the_lease_and_another_worker_leaves_a_live_one_alone(
    sessions: sessionmaker[Session],
) -> None:
    """Worker B's claim skips what A holds; after A's lease expires, B gets it; A may renew."""
    ids = _add(sessions, 3)
    assert _claim(sessions, ids[:2], "A") == (ids[:2], [])
    a0 = _cases(sessions, ids[:1])[0]
    assert (a0.status, a0.lease_owner, a0.delivery_count) == (CaseStatus.running, "A", 1)
    assert a0.lease_expires_at is not None and a0.lease_expires_at > datetime.now(UTC)
    # B gets only the case A does not hold.
    assert _claim(sessions, ids, "B") == ([ids[2]], [])
    # A may claim its own again (a message handed back after an outage).
    assert _claim(sessions, ids[:1], "A", ttl=EXPIRED) == (ids[:1], [])
    # Now A's lease on ids[0] has run out: B takes it over.
    assert _claim(sessions, ids[:1], "B") == (ids[:1], [])
    assert [c.lease_owner for c in _cases(sessions, ids)] == ["B", "A", "B"]


def test_a_message_for_done_or_failed_cases_claims_nothing(sessions: sessionmaker[Session]) -> None:
    """Done and failed cases are not claimed again: no delivery counted, no forward pass."""
    ids = _add(sessions, 2)
    with session_scope(sessions) as s:
        repo.settle_cases(s, done=[ids[0]], failed={ids[1]: "bad"})
    assert _claim(sessions, ids, "A") == ([], [])
    assert [(c.status, c.delivery_count) for c in _cases(sessions, ids)] == [
        (CaseStatus.done, 0),
        (CaseStatus.failed, 0),
    ]


def test_a_case_that_keeps_killing_its_worker_ends_a_dead_letter(
    sessions: sessionmaker[Session],
) -> None:
    """Claimed max_deliveries times and never settled: the next claim makes it a dead letter."""
    (case_id,) = _add(sessions, 1)
    for _ in range(5):
        assert _claim(sessions, [case_id], "A", ttl=EXPIRED) == ([case_id], [])
    assert _claim(sessions, [case_id], "B") == ([], [case_id])
    case = _cases(sessions, [case_id])[0]
    assert (case.status, case.dead_letter, case.lease_owner) == (CaseStatus.failed, True, None)
    assert case.last_error == (
        "dead letter: delivered 6 times without finishing; "
        "last error: none recorded (the worker stopped mid-batch)"
    )


def test_settle_marks_each_case_and_ends_its_lease_and_never_undoes_done(
    sessions: sessionmaker[Session],
) -> None:
    """One settle: done ones done, failed ones failed with their own reasons, leases cleared;
    a case another delivery finished stays done."""
    ids = _add(sessions, 4)
    _claim(sessions, ids, "A")
    with session_scope(sessions) as s:
        repo.settle_cases(s, done=[ids[3]])
        repo.settle_cases(s, done=ids[:2], failed={ids[2]: "x" * 3000, ids[3]: "late failure"})
    cases = _cases(sessions, ids)
    assert [c.status for c in cases] == [CaseStatus.done] * 2 + [CaseStatus.failed, CaseStatus.done]
    assert cases[2].last_error == "x" * 2000 and cases[3].last_error is None
    assert {(c.lease_owner, c.lease_expires_at) for c in cases} == {(None, None)}


def test_hold_renew_and_release(sessions: sessionmaker[Session]) -> None:
    """Held queued cases carry the lease; renewal extends only the owner's; release after an
    outage gives them back queued with the lease run out (the sweeper's to send at once) and
    the claim's delivery taken back."""
    ids = _add(sessions, 3)
    a = repo.Lease("A", timedelta(seconds=5))
    with session_scope(sessions) as s:
        repo.hold_cases(s, case_ids=ids[:2], lease=a)
    held = _cases(sessions, ids)
    assert [(c.status, c.lease_owner) for c in held] == [
        (CaseStatus.queued, "A"),
        (CaseStatus.queued, "A"),
        (CaseStatus.queued, None),
    ]
    _claim(sessions, ids[:1], "A")
    with session_scope(sessions) as s:
        assert repo.renew_leases(s, case_ids=ids, lease=repo.Lease("A", LIVE)) == 2
        assert repo.renew_leases(s, case_ids=ids, lease=repo.Lease("B", LIVE)) == 0
    renewed = _cases(sessions, ids[:2])
    assert all(c.lease_expires_at > datetime.now(UTC) + timedelta(minutes=4) for c in renewed)  # type: ignore[operator]
    with session_scope(sessions) as s:
        repo.release_cases(s, case_ids=ids, owner="A", uncount=True)
    released = _cases(sessions, ids)
    assert [(c.status, c.lease_owner, c.delivery_count) for c in released] == [
        (CaseStatus.queued, "A", 0),
        (CaseStatus.queued, "A", 0),
        (CaseStatus.queued, None, 0),
    ]
    assert _take(sessions, _rules(datetime.now(UTC))) == ids[:2]


def _rules(now: datetime, **overrides: object) -> repo.Stranded:
    values: dict = {"now": now, "lost_before": now - timedelta(hours=1)}
    values.update(overrides)
    return repo.Stranded(**values)


def _take(sessions: sessionmaker[Session], rules: repo.Stranded) -> list[int]:
    with session_scope(sessions) as s:
        return [i for i, _ in repo.take_stranded_cases(s, rules=rules)]


def test_the_sweeper_takes_expired_leases_and_unsent_cases_and_nothing_else(
    sessions: sessionmaker[Session],
) -> None:
    """Expired leases (held or claimed) and never-sent cases come back at once; fresh, live,
    done and failed ones do not; once taken, a case is not taken again by the next sweep."""
    ids = _add(sessions, 7)
    _claim(sessions, [ids[0]], "dead", ttl=EXPIRED)
    with session_scope(sessions) as s:
        repo.hold_cases(s, case_ids=[ids[1]], lease=repo.Lease("dead", EXPIRED))
        repo.mark_unsent(s, case_ids=[ids[2]])
        repo.settle_cases(s, done=[ids[4]], failed={ids[5]: "bad"})
    _claim(sessions, [ids[6]], "alive")
    now = datetime.now(UTC)
    assert _take(sessions, _rules(now)) == ids[:3]
    taken = _cases(sessions, ids[:3])
    assert {(c.status, c.lease_owner) for c in taken} == {(CaseStatus.queued, None)}
    assert all(c.enqueued_at is not None and c.enqueued_at >= now for c in taken)
    assert _take(sessions, _rules(now)) == []
    # The fallback: anything queued and unleased past lost_before.
    later = now + timedelta(seconds=1)
    assert _take(sessions, _rules(later, lost_before=later)) == [*ids[:4]]


def test_the_sweeper_reads_the_broker_restart_and_empty_queues(
    sessions: sessionmaker[Session],
) -> None:
    """Queued cases sent before the broker started, or sent over a lease ago to a queue the
    broker says is empty, come back; on a queue still holding messages they wait."""
    routine = _add(sessions, 2)
    stat = _add(sessions, 1, priority=Priority.stat)
    now = datetime.now(UTC) + timedelta(seconds=1)
    recent = now - timedelta(minutes=1)
    assert _take(sessions, _rules(now, broker_started_at=recent - timedelta(minutes=1))) == []
    assert _take(sessions, _rules(now, broker_started_at=now)) == routine + stat
    later = now + timedelta(seconds=1)
    quiet = {"quiet_before": later}
    assert _take(sessions, _rules(later, **quiet, quiet_priorities=())) == []
    assert _take(sessions, _rules(later, **quiet, quiet_priorities=(Priority.stat,))) == stat


def test_two_sweepers_never_take_the_same_cases(pg_sessions: sessionmaker[Session]) -> None:
    """PostgreSQL: while one sweeper holds its rows (not yet committed), another takes the
    rest without waiting, and after the commit nobody takes them again."""
    ids = _add(pg_sessions, 6)
    with session_scope(pg_sessions) as s:
        repo.mark_unsent(s, case_ids=ids)
    now = datetime.now(UTC)
    with pg_sessions() as first, first.begin():
        got_first = [i for i, _ in repo.take_stranded_cases(first, rules=_rules(now), limit=4)]
        result: list[int] = []

        def second() -> None:
            with pg_sessions() as s, s.begin():
                s.execute(text("SET LOCAL lock_timeout = '5s'"))
                result.extend(i for i, _ in repo.take_stranded_cases(s, rules=_rules(now)))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(30)
        assert not thread.is_alive()
    assert got_first == ids[:4] and result == ids[4:]
    assert _take(pg_sessions, _rules(now)) == []


def _genome_job(sessions: sessionmaker[Session], tiles: int) -> int:
    with session_scope(sessions) as s:
        tenant, _ = repo.create_tenant(s, name=f"g{datetime.now(UTC).timestamp()}")
        job = GenomeJob(
            tenant_id=tenant.id,
            metric="king",
            spec={},
            n_samples=tiles,
            n_rows=tiles,
            n_variants=1,
            tiles_total=tiles,
            output_prefix="x",
        )
        s.add(job)
        s.flush()
        s.add_all(
            JobTile(kind="genome", job_id=job.id, index=i, row_start=i, row_end=i + 1)
            for i in range(tiles)
        )
        return job.id


def test_tile_leases_and_stranded_tiles(sessions: sessionmaker[Session]) -> None:
    """A tile is claimed by one live worker at a time; a done tile by nobody; an expired lease
    and a stale queued tile come back to the sweeper, tiles of finished jobs never do."""
    job_id = _genome_job(sessions, 3)
    key = [leases.TileKey("genome", job_id, i) for i in range(3)]
    with session_scope(sessions) as s:
        assert leases.claim_tile(s, key=key[0], lease=repo.Lease("A", LIVE))
        assert not leases.claim_tile(s, key=key[0], lease=repo.Lease("B", LIVE))
        assert leases.claim_tile(s, key=key[1], lease=repo.Lease("dead", EXPIRED))
        s.execute(
            JobTile.__table__.update()
            .where(JobTile.job_id == job_id, JobTile.index == 2)
            .values(status=JobStatus.done)
        )
        assert not leases.claim_tile(s, key=key[2], lease=repo.Lease("A", LIVE))
    now = datetime.now(UTC)
    with session_scope(sessions) as s:
        assert leases.take_stranded_tiles(s, kind="genome", rules=_rules(now)) == [(job_id, 1)]
        later = now + timedelta(seconds=1)
        quiet = _rules(later, quiet_before=later)
        assert leases.take_stranded_tiles(s, kind="genome", rules=quiet, quiet=False) == []
        assert leases.take_stranded_tiles(s, kind="genome", rules=quiet, quiet=True) == [
            (job_id, 1)
        ]
        s.execute(GenomeJob.__table__.update().values(status=JobStatus.failed))
        assert leases.take_stranded_tiles(s, kind="genome", rules=quiet, quiet=True) == []
