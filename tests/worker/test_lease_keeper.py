"""The lease keeper: a worker's leases stay alive while it works and lapse once it stops."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import leases, repo
from db.engine import session_scope
from db.tables import Case, CompoundJob, JobStatus, JobTile, Priority
from worker.leases import LeaseKeeper, worker_identity

pytestmark = pytest.mark.integration


def _cases(sessions: sessionmaker[Session], n: int) -> list[int]:
    with session_scope(sessions) as s:
        tenant, _ = repo.create_tenant(s, name="keeper")
        new = [
            repo.NewCase(f"k{i}", "breast-cancer", "1.0.0", Priority.routine, {"a": 1.0})
            for i in range(n)
        ]
        return [a.id for a in repo.add_cases(s, tenant_id=tenant.id, cases=new)]


def _expiries(sessions: sessionmaker[Session], ids: list[int]) -> list[datetime | None]:
    with sessions() as s:
        found = dict(
            s.execute(select(Case.id, Case.lease_expires_at).where(Case.id.in_(ids))).tuples().all()
        )
    return [found[i] for i in ids]


def test_identities_differ_per_process_start() -> None:
    """host:pid:token, and a new token each time (a restarted worker renews nothing old)."""
    first, second = worker_identity(), worker_identity()
    assert first.split(":")[:2] == second.split(":")[:2] and first != second


def test_held_cases_are_renewed_until_dropped(sessions: sessionmaker[Session]) -> None:
    """With a 3 s lease renewed every second, held cases stay leased past 5 s; dropped ones
    lapse; the keeper's waiting cases (a batcher's buffers) are renewed too."""
    ids = _cases(sessions, 3)
    keeper = LeaseKeeper(sessions, ttl_s=3)
    with session_scope(sessions) as s:
        repo.claim_cases(s, case_ids=ids[:2], max_deliveries=5, lease=keeper.lease)
        repo.hold_cases(s, case_ids=ids[2:], lease=keeper.lease)
    keeper.waiting = lambda: ids[2:]
    keeper.hold(ids[:2])
    try:
        time.sleep(1.5)
        keeper.drop(ids[1:2])
        time.sleep(4.0)
        now = datetime.now(UTC)
        kept, dropped, waiting = _expiries(sessions, ids)
        assert kept is not None and kept > now
        assert waiting is not None and waiting > now
        assert dropped is not None and dropped < now
    finally:
        keeper.stop()


def test_a_tile_lease_is_claimed_once_and_given_back_when_its_work_raises(
    sessions: sessionmaker[Session],
) -> None:
    """Compound tiles: a second keeper cannot claim a held tile; a raising block ends the lease
    at once, so the sweeper's next sweep takes the tile."""
    with session_scope(sessions) as s:
        tenant, _ = repo.create_tenant(s, name="chem")
        job = CompoundJob(
            tenant_id=tenant.id, spec={}, n_query=1, n_library=1, tiles_total=1, output_dir="x"
        )
        s.add(job)
        s.flush()
        s.add(JobTile(kind="chem", job_id=job.id, index=0, row_start=0, row_end=1))
        key = leases.TileKey("chem", job.id, 0)
    first, second = LeaseKeeper(sessions, ttl_s=60), LeaseKeeper(sessions, ttl_s=60)
    with pytest.raises(RuntimeError), first.tile(key) as held:
        assert held
        with second.tile(key) as other:
            assert not other
        raise RuntimeError("tile failed")
    rules = repo.Stranded(now=datetime.now(UTC), lost_before=datetime.now(UTC) - timedelta(hours=1))
    with session_scope(sessions) as s:
        assert leases.take_stranded_tiles(s, kind="chem", rules=rules) == [(key.job_id, 0)]
        tile = s.scalar(select(JobTile))
        assert tile is not None and tile.status == JobStatus.queued and tile.lease_owner is None
    first.stop()
    second.stop()
