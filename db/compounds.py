"""Queries of the compound-similarity jobs; their tiles use the ledger in :mod:`db.genome`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.tables import CompoundJob, CompoundTile, Neighbour


def create_job(
    session: Session,
    *,
    tenant_id: int,
    spec: dict[str, Any],
    n_query: int,
    n_library: int,
    tile_rows: int,
    artifact_root: str,
) -> CompoundJob:
    """A queued job with one tile per ``tile_rows`` query rows; flushed, not committed."""
    starts = list(range(0, n_query, tile_rows)) or [0]
    job = CompoundJob(
        tenant_id=tenant_id,
        spec=spec,
        n_query=n_query,
        n_library=n_library,
        tiles_total=len(starts),
        output_dir="",
    )
    session.add(job)
    session.flush()
    job.output_dir = f"{artifact_root}/compounds/{job.id}"
    session.add_all(
        CompoundTile(job_id=job.id, index=i, row_start=s, row_end=min(s + tile_rows, n_query))
        for i, s in enumerate(starts)
    )
    session.flush()
    return job


def get_job(session: Session, *, job_id: int, tenant_id: int | None = None) -> CompoundJob | None:
    stmt = select(CompoundJob).where(CompoundJob.id == job_id)
    if tenant_id is not None:
        stmt = stmt.where(CompoundJob.tenant_id == tenant_id)
    return session.scalar(stmt)


def add_neighbours(session: Session, *, job_id: int, rows: Sequence[dict[str, Any]]) -> None:
    """Insert found pairs; a pair already there (a tile run twice) is kept as it was."""
    if not rows:
        return
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(Neighbour.__table__).on_conflict_do_nothing(
        index_elements=["job_id", "query_index", "library_index"]
    )
    for start in range(0, len(rows), 5000):
        session.execute(stmt, [{"job_id": job_id, **r} for r in rows[start : start + 5000]])


def list_neighbours(
    session: Session,
    *,
    job_id: int,
    query_id: str | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> list[Neighbour]:
    stmt = (
        select(Neighbour)
        .where(Neighbour.job_id == job_id, Neighbour.id > after_id)
        .order_by(Neighbour.id)
        .limit(limit)
    )
    if query_id is not None:
        stmt = stmt.where(Neighbour.query_id == query_id)
    return list(session.scalars(stmt))
