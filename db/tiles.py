"""The tile ledger of every tiled job kind (worker/tiled.py): a job's tiles written with it,
started, counted on the job once, and the job settled.

A kind's job table carries :class:`db.tables.TiledJob`'s columns; its tiles are rows of
:class:`db.tables.JobTile` under the kind's name. ``JOB_TABLES`` maps each kind to its table (the
sweeper and the leases look jobs up by kind); a new kind adds itself with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.tables import CompoundJob, GenomeJob, JobStatus, JobTile, TiledJob, utcnow

J = TypeVar("J", bound=TiledJob)

#: A tile's bounds: row start, row end, column start, column end (None, None: every column).
Bounds = tuple[int, int, int | None, int | None]

JOB_TABLES: dict[str, Any] = {"genome": GenomeJob, "chem": CompoundJob}


def register(kind: str, table: type[TiledJob]) -> None:
    """Name a new kind's job table (worker/tiled.py does it for each kind it is given)."""
    if JOB_TABLES.get(kind, table) is not table:
        raise ValueError(f"job kind {kind!r} is already the ledger of {JOB_TABLES[kind].__name__}")
    JOB_TABLES[kind] = table


def row_tiles(n_rows: int, tile_rows: int) -> list[Bounds]:
    """Tiles of ``tile_rows`` rows against every column (one empty tile for no rows)."""
    starts = list(range(0, n_rows, tile_rows)) or [0]
    return [(s, min(s + tile_rows, n_rows), None, None) for s in starts]


def add_job(session: Session, job: J, *, kind: str, tiles: Sequence[Bounds]) -> J:
    """A queued job and its tiles; flushed (the job has its id), not committed."""
    job.tiles_total = len(tiles)
    session.add(job)
    session.flush()
    # Thousands of tiles at biobank scale: one multi-row INSERT, not one ORM object each.
    now = utcnow()
    session.execute(
        insert(JobTile),
        [
            {"kind": kind, "job_id": job.id, "index": i, "row_start": r0, "row_end": r1,
             "col_start": c0, "col_end": c1, "status": JobStatus.queued, "attempts": 0,
             "updated_at": now}
            for i, (r0, r1, c0, c1) in enumerate(tiles)
        ],
    )  # fmt: skip
    return job


def get_job(
    session: Session, table: type[J], *, job_id: int, tenant_id: int | None = None
) -> J | None:
    """A job; with ``tenant_id``, only that tenant's (another tenant's is as good as absent)."""
    stmt = select(table).where(table.id == job_id)
    if tenant_id is not None:
        stmt = stmt.where(table.tenant_id == tenant_id)
    return session.scalar(stmt)


def get_tile(session: Session, *, kind: str, job_id: int, index: int) -> JobTile | None:
    return session.scalar(
        select(JobTile).where(
            JobTile.kind == kind, JobTile.job_id == job_id, JobTile.index == index
        )
    )


def tile_not_done(kind: str, job_id: int, index: int) -> tuple[Any, ...]:
    """The WHERE clause of a job's tile while it is not done."""
    return (
        JobTile.kind == kind,
        JobTile.job_id == job_id,
        JobTile.index == index,
        JobTile.status != JobStatus.done,
    )


def start_tile(session: Session, tile: JobTile) -> None:
    """Count an attempt at a tile, and mark its job running if it was queued."""
    job = JOB_TABLES[tile.kind]
    tile.attempts += 1
    tile.status = JobStatus.running
    session.execute(
        update(job)
        .where(job.id == tile.job_id, job.status == JobStatus.queued)
        .values(status=JobStatus.running, updated_at=utcnow())
    )


def uncount_attempt(session: Session, *, kind: str, job_id: int, index: int) -> None:
    """Take back the attempt :func:`start_tile` counted: the database, not the tile, stopped it."""
    session.execute(
        update(JobTile)
        .where(*tile_not_done(kind, job_id, index), JobTile.attempts > 0)
        .values(attempts=JobTile.attempts - 1)
    )


def finish_tile(session: Session, *, kind: str, job_id: int, index: int) -> tuple[int, int] | None:
    """Mark a tile done and count it on its job, once; return the job's (tiles done, tiles
    total), or None if this tile had been counted before (a redelivered message).

    The tile that completes the count stays ``running`` under its lease until the job is
    settled (:func:`settle_job`): if its worker dies, or the database goes away, while it
    finishes the job, the sweeper sends it again and the job is finished then."""
    changed = session.execute(
        update(JobTile)
        .where(*tile_not_done(kind, job_id, index))
        .values(status=JobStatus.done, updated_at=utcnow())
        .returning(JobTile.id)
    ).first()
    if changed is None:
        return None
    job = JOB_TABLES[kind]
    counted = session.execute(
        update(job)
        .where(job.id == job_id, job.tiles_done < job.tiles_total)
        .values(tiles_done=job.tiles_done + 1, updated_at=utcnow())
        .returning(job.tiles_done, job.tiles_total)
    ).first()
    if counted is None or counted[0] >= counted[1]:
        # Counted already (the tile that completed the count, computed again by a worker that
        # took it over while the first finished the job), or the count is complete now.
        session.execute(
            update(JobTile).where(JobTile.id == changed[0]).values(status=JobStatus.running)
        )
    if counted is None:
        return None
    return int(counted[0]), int(counted[1])


def settle_job(session: Session, *, kind: str, job_id: int, error: str | None = None) -> None:
    """Mark a job done (and its tiles), or failed with ``error``."""
    job = JOB_TABLES[kind]
    if error is None:
        session.execute(
            update(JobTile)
            .where(JobTile.kind == kind, JobTile.job_id == job_id, JobTile.status != JobStatus.done)
            .values(
                status=JobStatus.done, lease_owner=None, lease_expires_at=None, updated_at=utcnow()
            )
        )
    session.execute(
        update(job)
        .where(job.id == job_id)
        .values(
            status=JobStatus.failed if error else JobStatus.done,
            error=None if error is None else error[:2000],
            finished_at=utcnow(),
            updated_at=utcnow(),
        )
    )


def result_page(
    session: Session,
    table: Any,
    *,
    job_id: int,
    after_id: int = 0,
    limit: int = 100,
    where: Sequence[Any] = (),
) -> list[Any]:
    """A page of a job's result rows in id order, after the cursor ``after_id``."""
    stmt = (
        select(table)
        .where(table.job_id == job_id, table.id > after_id, *where)
        .order_by(table.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def add_results(
    session: Session, table: Any, *, job_id: int, rows: Sequence[Any], key: Sequence[str]
) -> None:
    """Insert a tile's result rows for ``job_id`` (each with a ``columns()`` dict); a row already
    there (unique on ``key``: a tile run twice) is kept as it was."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table.__table__).on_conflict_do_nothing(index_elements=list(key))
    for start in range(0, len(rows), 5000):
        batch = rows[start : start + 5000]
        session.execute(stmt, [{"job_id": job_id, **r.columns()} for r in batch])
