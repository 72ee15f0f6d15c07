"""Queries of the compound-similarity jobs: create them with their tiles, store and list
neighbours. The tiles are counted by the shared ledger (:mod:`db.tiles`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from db import tiles
from db.tables import CompoundJob, Neighbour

KIND = "chem"


@dataclass(frozen=True)
class NewNeighbour:
    """A (query, library) pair a tile found, as :func:`add_neighbours` stores it."""

    query_index: int
    library_index: int
    query_id: str
    library_id: str
    similarity: float
    #: 1 = most similar for its query.
    rank: int

    def columns(self) -> dict[str, Any]:
        return asdict(self)


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
    job = CompoundJob(
        tenant_id=tenant_id, spec=spec, n_query=n_query, n_library=n_library, output_dir=""
    )
    tiles.add_job(session, job, kind=KIND, tiles=tiles.row_tiles(n_query, tile_rows))
    job.output_dir = f"{artifact_root}/compounds/{job.id}"
    session.flush()
    return job


#: ``get_job(session, job_id=..., tenant_id=None)``: a job, or None (db.tiles.get_job).
get_job = partial(tiles.get_job, table=CompoundJob)


def add_neighbours(session: Session, *, job_id: int, rows: Sequence[NewNeighbour]) -> None:
    key = ("job_id", "query_index", "library_index")
    tiles.add_results(session, Neighbour, job_id=job_id, rows=rows, key=key)


def list_neighbours(
    session: Session, *, job_id: int, query_id: str | None = None, **page: int
) -> list[Neighbour]:
    """A page of a job's neighbours (``after_id``, ``limit``), or of one query's."""
    where = [] if query_id is None else [Neighbour.query_id == query_id]
    return tiles.result_page(session, Neighbour, job_id=job_id, where=where, **page)


def neighbours_in_order(
    session: Session, *, job_id: int, after: tuple[int, int] = (-1, 0), limit: int = 50_000
) -> list[Neighbour]:
    """A page of a job's neighbours by query row, then rank, after ``after`` (query row, rank):
    the CSV's order, whichever order the tiles were stored in."""
    q, rank = after
    later = or_(Neighbour.query_index > q, and_(Neighbour.query_index == q, Neighbour.rank > rank))
    stmt = (
        select(Neighbour)
        .where(Neighbour.job_id == job_id, later)
        .order_by(Neighbour.query_index, Neighbour.rank)
        .limit(limit)
    )
    return list(session.scalars(stmt))
