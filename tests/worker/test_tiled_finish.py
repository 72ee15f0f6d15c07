"""A tiled job whose finishing step is cut short (its worker killed, the database away) is
finished later from its last tile, never left running for ever nor failed by an outage."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from db import leases, repo, tiles
from db.engine import session_scope
from db.tables import JobTile
from tests.worker import tiny_kind as tiny
from worker import tiled

pytestmark = pytest.mark.integration

N, TILE_ROWS = 10, 4  # three tiles
SUM = sum(i * i for i in range(N))


@pytest.fixture
def tiny_tables(pg_engine: Engine) -> Iterator[None]:
    tiny.TinyBase.metadata.reflect(pg_engine, only=["tenants"])
    tables = [tiny.TinyJob.__table__, tiny.Square.__table__]
    tiny.TinyBase.metadata.create_all(pg_engine, tables=tables)
    yield
    tiny.TinyBase.metadata.drop_all(pg_engine, tables=tables)


def _job(sessions: sessionmaker[Session], out: Path) -> int:
    with session_scope(sessions) as s:
        tenant_id = repo.create_tenant(s, name="tiny-finish")[0].id
    return int(
        tiny.submit(sessions, None, tenant_id=tenant_id, n=N, tile_rows=TILE_ROWS, out=out)["id"]
    )


def _kind(finish: object) -> tiled.JobKind:
    return tiled.JobKind(tiny.TINY, tiny.compute, tiny.store, finish)  # type: ignore[arg-type]


def _stranded(sessions: sessionmaker[Session]) -> list[tuple[int, int]]:
    """What the sweeper sends again, once every lease has run out."""
    later = datetime.now(UTC) + timedelta(hours=1)
    with session_scope(sessions) as s:
        rules = repo.Stranded(now=later, lost_before=later)
        return leases.take_stranded_tiles(s, kind=tiny.KIND, rules=rules)


@pytest.mark.parametrize(
    "cut",
    [SystemExit("the worker is killed"), ConnectionError("the database went away")],
    ids=["worker-killed", "database-away"],
)
def test_a_job_cut_short_while_finishing_is_finished_from_its_last_tile(
    tiny_tables: None, pg_sessions: sessionmaker[Session], tmp_path: Path, cut: BaseException
) -> None:
    """The last tile's worker dies, or loses the database, in the finishing step: the job stays
    running (not failed), the sweeper sends that tile again, and the job is finished, each tile
    counted once."""
    job_id = _job(pg_sessions, tmp_path / "o")

    def cut_short(sessions: sessionmaker[Session], job_id: int) -> None:
        raise cut

    dying = _kind(cut_short)
    assert dying.run_tile(pg_sessions, job_id=job_id, index=0) == "tile done"
    assert dying.run_tile(pg_sessions, job_id=job_id, index=1) == "tile done"
    with pytest.raises(type(cut)):
        dying.run_tile(pg_sessions, job_id=job_id, index=2)
    summary = tiny.describe_id(pg_sessions, job_id)
    assert (summary["status"], summary["tiles_done"], summary["error"]) == ("running", 3, None)

    assert _stranded(pg_sessions) == [(job_id, 2)]
    healthy = _kind(tiny.finish)
    assert healthy.run_tile(pg_sessions, job_id=job_id, index=2) == "finished job"
    summary = tiny.describe_id(pg_sessions, job_id)
    assert (summary["status"], summary["tiles_done"], summary["error"]) == ("done", 3, None)
    assert (tmp_path / "o" / "sum.txt").read_text() == f"{SUM}\n"
    with pg_sessions() as s:
        statuses = set(s.scalars(select(JobTile.status).where(JobTile.job_id == job_id)))
    assert statuses == {"done"}
    assert _stranded(pg_sessions) == []


def test_the_last_tile_computed_again_by_a_second_worker_is_counted_once(
    tiny_tables: None, pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A tile whose lease lapsed under a live worker is computed by two: whichever stores it
    second counts nothing, and the job is finished once, with every tile counted once."""
    job_id = _job(pg_sessions, tmp_path / "o")
    kind = _kind(tiny.finish)
    for index in (0, 1):
        kind.run_tile(pg_sessions, job_id=job_id, index=index)
    with session_scope(pg_sessions) as s:
        first = tiles.finish_tile(s, kind=tiny.KIND, job_id=job_id, index=2)
        again = tiles.finish_tile(s, kind=tiny.KIND, job_id=job_id, index=2)
    assert (first, again) == ((3, 3), None)
    assert kind.run_tile(pg_sessions, job_id=job_id, index=2) == "finished job"
    summary = tiny.describe_id(pg_sessions, job_id)
    assert (summary["status"], summary["tiles_done"]) == ("done", 3)


def test_a_tile_that_kills_its_worker_every_time_fails_its_job(
    tiny_tables: None, pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A tile whose compute kills the worker (an OOM kill: nothing raised) is not sent for ever:
    after max_attempts such deaths its job fails, naming the tile."""
    job_id = _job(pg_sessions, tmp_path / "o")

    def killed(tile: tiled.Tile, options: object) -> list:
        if tile.index == 1:
            raise SystemExit("killed for memory")
        return tiny.compute(tile, {})

    kind = dataclasses.replace(_kind(tiny.finish), compute=killed)
    assert kind.run_tile(pg_sessions, job_id=job_id, index=0) == "tile done"
    for _ in range(kind.max_attempts):
        with pytest.raises(SystemExit):
            kind.run_tile(pg_sessions, job_id=job_id, index=1)
    assert kind.run_tile(pg_sessions, job_id=job_id, index=1) == "failed"
    summary = tiny.describe_id(pg_sessions, job_id)
    assert summary["status"] == "failed"
    assert summary["error"] == "tile 1 (rows 4:8): its worker died on each of 3 attempts"
    assert _stranded(pg_sessions) == []
