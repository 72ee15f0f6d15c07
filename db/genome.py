"""Queries of the genome-comparison jobs: create with their tiles, settle tiles, list pairs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.tables import (
    CompoundJob,
    CompoundTile,
    GenomeJob,
    GenomeTile,
    JobStatus,
    RelatedPair,
    utcnow,
)


def create_job(
    session: Session,
    *,
    tenant_id: int,
    metric: str,
    spec: dict[str, Any],
    n_samples: int,
    n_rows: int,
    n_variants: int,
    tile_rows: int,
    artifact_root: str,
    tiles: Sequence[tuple[int, int, int, int]] | None = None,
) -> GenomeJob:
    """A queued job with one tile per ``tile_rows`` rows of its result, or the 2-D ``tiles``
    (row start, row end, column start, column end) of a pairs-only job; flushed, not committed."""
    starts = list(range(0, n_rows, tile_rows)) or [0]
    job = GenomeJob(
        tenant_id=tenant_id,
        metric=metric,
        spec=spec,
        n_samples=n_samples,
        n_rows=n_rows,
        n_variants=n_variants,
        tiles_total=len(starts) if tiles is None else len(tiles),
        output_prefix="",
    )
    session.add(job)
    session.flush()
    job.output_prefix = f"{artifact_root}/genome/{job.id}/{metric}"
    if tiles is None:
        session.add_all(
            GenomeTile(job_id=job.id, index=i, row_start=s, row_end=min(s + tile_rows, n_rows))
            for i, s in enumerate(starts)
        )
    else:
        # Thousands of tiles at biobank scale: one multi-row INSERT, not one ORM object each.
        session.execute(
            insert(GenomeTile),
            [
                {"job_id": job.id, "index": i, "row_start": r0, "row_end": r1,
                 "col_start": c0, "col_end": c1, "status": JobStatus.queued, "attempts": 0,
                 "updated_at": utcnow()}
                for i, (r0, r1, c0, c1) in enumerate(tiles)
            ],
        )  # fmt: skip
    session.flush()
    return job


def get_job(session: Session, *, job_id: int, tenant_id: int | None = None) -> GenomeJob | None:
    """A job; with ``tenant_id``, only that tenant's (another tenant's is as good as absent)."""
    stmt = select(GenomeJob).where(GenomeJob.id == job_id)
    if tenant_id is not None:
        stmt = stmt.where(GenomeJob.tenant_id == tenant_id)
    return session.scalar(stmt)


# The tile ledger below serves every tiled job kind (genome comparisons, compound searches):
# ``job``/``tile`` name the ORM classes, which share the columns used here.
Job = type[GenomeJob] | type[CompoundJob]
Tile = type[GenomeTile] | type[CompoundTile]


def get_tile(
    session: Session, *, job_id: int, index: int, tile: Tile = GenomeTile
) -> GenomeTile | CompoundTile | None:
    found = session.scalar(select(tile).where(tile.job_id == job_id, tile.index == index))
    return cast(GenomeTile | CompoundTile | None, found)


def start_tile(session: Session, row: GenomeTile | CompoundTile, *, job: Job = GenomeJob) -> None:
    row.attempts += 1
    row.status = JobStatus.running
    session.execute(
        update(job)
        .where(job.id == row.job_id, job.status == JobStatus.queued)
        .values(status=JobStatus.running, updated_at=utcnow())
    )


def finish_tile(
    session: Session, *, job_id: int, index: int, job: Job = GenomeJob, tile: Tile = GenomeTile
) -> int | None:
    """Mark a tile done and count it on its job, once; return the job's tiles done, or None if
    this tile had been counted before (a redelivered message)."""
    changed = session.execute(
        update(tile)
        .where(tile.job_id == job_id, tile.index == index, tile.status != JobStatus.done)
        .values(status=JobStatus.done, updated_at=utcnow())
        .returning(tile.id)
    ).first()
    if changed is None:
        return None
    return session.execute(
        update(job)
        .where(job.id == job_id)
        .values(tiles_done=job.tiles_done + 1, updated_at=utcnow())
        .returning(job.tiles_done)
    ).scalar_one()


def settle_job(
    session: Session, *, job_id: int, error: str | None = None, job: Job = GenomeJob
) -> None:
    """Mark a job done, or failed with ``error``."""
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


def add_pairs(session: Session, *, job_id: int, pairs: Sequence[dict[str, Any]]) -> None:
    """Insert related pairs; a pair already there (a tile run twice) is kept as it was."""
    if not pairs:
        return
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    table = RelatedPair.__table__
    session.execute(
        dialect.insert(table).on_conflict_do_nothing(index_elements=["job_id", "row", "col"]),
        [{"job_id": job_id, **p} for p in pairs],
    )


def list_pairs(
    session: Session,
    *,
    job_id: int,
    min_kinship: float | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> list[RelatedPair]:
    stmt = (
        select(RelatedPair)
        .where(RelatedPair.job_id == job_id, RelatedPair.id > after_id)
        .order_by(RelatedPair.id)
        .limit(limit)
    )
    if min_kinship is not None:
        stmt = stmt.where(RelatedPair.kinship >= min_kinship)
    return list(session.scalars(stmt))


def degree_counts(session: Session, *, job_id: int) -> dict[str, int]:
    """How many of a job's pairs fall in each degree (``duplicate/MZ twin``, ``1st``, ...)."""
    rows = session.execute(
        select(RelatedPair.degree, func.count())
        .where(RelatedPair.job_id == job_id)
        .group_by(RelatedPair.degree)
    )
    return {str(degree): int(count) for degree, count in rows}


def iter_pairs(
    session: Session, *, job_id: int, later_first: bool, batch: int = 10_000
) -> Iterator[list[RelatedPair]]:
    """A job's pairs in batches, in plink2's ``.kin0`` order: by column then row
    (``later_first``: all pairs, row < column), or by row then column (query mode). One sorted
    query, read ``batch`` rows at a time (a server-side cursor on PostgreSQL)."""
    order = (
        (RelatedPair.col, RelatedPair.row) if later_first else (RelatedPair.row, RelatedPair.col)
    )
    stmt = select(RelatedPair).where(RelatedPair.job_id == job_id).order_by(*order)
    result = session.execute(stmt.execution_options(yield_per=batch))
    for part in result.scalars().partitions(batch):
        yield list(part)
