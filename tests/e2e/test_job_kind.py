"""A third tiled job kind, declared in one module (tests/worker/tiny_kind.py), runs end to end on
a real worker process, the real Redis and PostgreSQL: the shared ledger, tile task and follower."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import JobTile
from medbatch.settings import Settings
from tests.e2e.support import Processes
from tests.worker import tiny_kind as tiny
from worker import tiled
from worker.app import create_app

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture
def tiny_tables(pg_engine: Engine) -> Iterator[None]:
    tiny.TinyBase.metadata.reflect(pg_engine, only=["tenants"])
    tables = [tiny.TinyJob.__table__, tiny.Square.__table__]
    tiny.TinyBase.metadata.create_all(pg_engine, tables=tables)
    yield
    tiny.TinyBase.metadata.drop_all(pg_engine, tables=tables)


@pytest.fixture
def worker(processes: Processes) -> subprocess.Popen[bytes]:
    """A worker process for the tiny kind's queue (its module run as a program)."""
    root = str(Path(__file__).resolve().parents[2])
    return processes.start("tiny", module="tests.worker.tiny_kind", PYTHONPATH=root)


def _follow(
    sessions: sessionmaker[Session], job_id: int, proc: subprocess.Popen[bytes], log: Path
) -> dict:
    def describe() -> dict:
        assert proc.poll() is None, log.read_text()[-3000:]
        return tiny.describe_id(sessions, job_id)

    return tiled.follow(describe, poll_s=0.2)


def test_a_kind_in_one_module_runs_on_a_real_worker(
    tiny_tables: None,
    worker: subprocess.Popen[bytes],
    pg_url: str,
    pg_sessions: sessionmaker[Session],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Every tile counted once, the results stored, the job finished by its own step; a failing
    tile fails its job with the tile named; bad input is refused before anything is recorded."""
    app = create_app(Settings(database_url=pg_url, broker_url=redis_url), include_tasks=False)
    with session_scope(pg_sessions) as s:
        tenant_id = repo.create_tenant(s, name="tiny")[0].id
    n = 1000
    job = tiny.submit(pg_sessions, app, tenant_id=tenant_id, n=n, tile_rows=64, out=tmp_path / "o")
    assert job["tiles_total"] == 16
    done = _follow(pg_sessions, job["id"], worker, tmp_path / "tiny.log")
    assert (done["status"], done["tiles_done"], done["error"]) == ("done", 16, None)
    # The sum of squares 0..n-1, by its closed form.
    assert (tmp_path / "o" / "sum.txt").read_text() == f"{(n - 1) * n * (2 * n - 1) // 6}\n"
    with session_scope(pg_sessions) as s:
        assert s.scalar(select(func.count()).select_from(tiny.Square)) == n
        statuses = s.execute(
            select(JobTile.status, func.count())
            .where(JobTile.kind == "tiny", JobTile.job_id == job["id"])
            .group_by(JobTile.status)
        ).all()
    assert [(str(st), c) for st, c in statuses] == [("done", 16)]

    failing = tiny.submit(
        pg_sessions, app, tenant_id=tenant_id, n=100, tile_rows=10, out=tmp_path / "f", fail_at=42
    )
    failed = _follow(pg_sessions, failing["id"], worker, tmp_path / "tiny.log")
    assert failed["status"] == "failed"
    assert failed["error"].startswith("tile 4 (rows 40:50): ValueError: asked to fail at 42")
    assert not (tmp_path / "f" / "sum.txt").exists()

    with pytest.raises(tiled.SubmissionError, match="must be at least 1"):
        tiny.submit(pg_sessions, app, tenant_id=tenant_id, n=0, tile_rows=1, out=tmp_path / "z")
    app.close()
