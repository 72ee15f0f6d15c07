"""The sweeper on the real PostgreSQL and the real Redis: what it sends again, and to where."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import GenomeJob, JobTile, Priority
from medbatch.settings import Settings
from tests.helpers import queued_case_ids, queued_messages, wdbc_cases
from worker.app import create_app
from worker.sweeper import BrokerState, Sweeper, broker_state, sweep

pytestmark = pytest.mark.integration


def _add(sessions: sessionmaker[Session], n: int) -> list[int]:
    cases = wdbc_cases(n)
    cases[0]["priority"] = "stat"
    with session_scope(sessions) as s:
        tenant, _ = repo.create_tenant(s, name="sweep")
        new = [
            repo.NewCase(
                c["external_id"], "breast-cancer", "1.0.0", Priority(c["priority"]), c["features"]
            )
            for c in cases
        ]
        return [a.id for a in repo.add_cases(s, tenant_id=tenant.id, cases=new)]


@pytest.fixture
def app(pg_url: str, redis_url: str):  # type: ignore[no-untyped-def]
    app = create_app(Settings(database_url=pg_url), broker_url=redis_url, include_tasks=False)
    yield app
    app.close()


def test_broker_state_reads_the_start_and_the_empty_queues(
    app,
    redis_client: redis.Redis,  # type: ignore[no-untyped-def]
) -> None:
    """Redis's uptime gives its start; queues without messages are the empty ones."""
    app.send_task("medbatch.score_cases", args=[[1]], queue="score.bulk", routing_key="score.bulk")
    now = datetime.now(UTC)
    state = broker_state(app, now=now)
    uptime = int(redis_client.info("server")["uptime_in_seconds"])
    assert state.started_at is not None
    assert abs((now - state.started_at) - timedelta(seconds=uptime)) <= timedelta(seconds=2)
    assert "score.bulk" not in state.empty_queues
    assert {"score.stat", "score.routine", "genome", "chem"} <= state.empty_queues


def test_a_sweep_sends_stranded_cases_and_tiles_once(
    app,
    pg_url: str,
    pg_sessions: sessionmaker[Session],
    redis_client: redis.Redis,  # type: ignore[no-untyped-def]
) -> None:
    """Unsent cases go to their priority's queue, an expired tile lease to the genome queue;
    live and fresh ones stay; the next sweep sends nothing again."""
    ids = _add(pg_sessions, 4)
    with session_scope(pg_sessions) as s:
        repo.mark_unsent(s, case_ids=ids[:2])
        repo.claim_cases(
            s, case_ids=[ids[2]], max_deliveries=5, lease=repo.Lease("dead", timedelta(seconds=-1))
        )
        repo.claim_cases(
            s, case_ids=[ids[3]], max_deliveries=5, lease=repo.Lease("alive", timedelta(minutes=5))
        )
        tenant, _ = repo.create_tenant(s, name="g")
        job = GenomeJob(
            tenant_id=tenant.id,
            metric="king",
            spec={},
            n_samples=2,
            n_rows=2,
            n_variants=1,
            tiles_total=2,
            output_prefix="x",
        )
        s.add(job)
        s.flush()
        s.add_all(
            JobTile(
                kind="genome",
                job_id=job.id,
                index=i,
                row_start=i,
                row_end=i + 1,
                lease_owner="dead" if i else None,
                lease_expires_at=datetime.now(UTC) - timedelta(seconds=1) if i else None,
            )
            for i in range(2)
        )
        job_id = job.id
    settings = Settings(database_url=pg_url)
    quiet = BrokerState()  # broker facts unknown: only the unconditional rules
    report = sweep(app, sessions=pg_sessions, settings=settings, broker=quiet)
    assert (report.cases, report.tiles) == (3, {"genome": 1, "chem": 0})
    (tile_message,) = queued_messages(redis_client)["genome"]
    assert tile_message["headers"]["task"] == "medbatch.genome_tile"
    assert tile_message["headers"]["argsrepr"] == f"[{job_id}, 1]"
    redis_client.delete("genome")
    queued = queued_case_ids(redis_client)
    assert queued["score.stat"] == [ids[0]] and sorted(queued["score.routine"]) == ids[1:3]
    again = sweep(app, sessions=pg_sessions, settings=settings, broker=quiet)
    assert (again.cases, again.tiles) == (0, {"genome": 0, "chem": 0})


def test_the_sweeper_loop_runs_until_stopped(app, pg_url: str, pg_sessions, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The loop sweeps, touches its alive file, and stops when asked."""
    ids = _add(pg_sessions, 1)
    with session_scope(pg_sessions) as s:
        repo.mark_unsent(s, case_ids=ids)
    sweeper = Sweeper(
        Settings(database_url=pg_url, sweep_interval_s=0.05), app=app, sessions=pg_sessions
    )
    alive = tmp_path / "alive"
    thread = threading.Thread(target=sweeper.run, kwargs={"alive_file": alive})
    thread.start()
    try:
        deadline = datetime.now(UTC) + timedelta(seconds=30)
        while sweeper.sweeps < 2 and datetime.now(UTC) < deadline:
            thread.join(0.05)
    finally:
        sweeper.stop()
        thread.join(10)
    assert not thread.is_alive() and sweeper.sweeps >= 2 and alive.exists()


def test_one_sweep_sends_every_tile_a_broker_restart_lost(
    app,
    pg_url: str,
    pg_sessions: sessionmaker[Session],
    redis_client: redis.Redis,  # type: ignore[no-untyped-def]
) -> None:
    """A large job's queued tiles, sent before the broker restarted empty, all go again at the
    first sweep after the restart (they went a thousand a sweep: one sweep interval each)."""
    n = 2_500
    sent_at = datetime.now(UTC) - timedelta(seconds=5)
    with session_scope(pg_sessions) as s:
        tenant, _ = repo.create_tenant(s, name="biobank")
        job = GenomeJob(
            tenant_id=tenant.id,
            metric="king",
            spec={},
            n_samples=n,
            n_rows=n,
            n_variants=1,
            tiles_total=n,
            output_prefix="x",
        )
        s.add(job)
        s.flush()
        s.execute(
            JobTile.__table__.insert(),
            [
                {"kind": "genome", "job_id": job.id, "index": i, "row_start": i,
                 "row_end": i + 1, "status": "queued", "attempts": 0, "updated_at": sent_at}
                for i in range(n)
            ],
        )  # fmt: skip
    restarted = BrokerState(started_at=datetime.now(UTC) - timedelta(seconds=1))
    report = sweep(
        app, sessions=pg_sessions, settings=Settings(database_url=pg_url), broker=restarted
    )
    assert report.tiles == {"genome": n, "chem": 0}
    assert redis_client.llen("genome") == n
