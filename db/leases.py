"""Leases on the tiles of tiled jobs (genome comparisons, compound searches).

A worker claims a tile before it computes it: the tile's row names the worker process and an
expiry that the worker renews while it runs. A message for a tile that is done, or that another
live worker holds, is settled without computing anything. An expired lease (the worker died) is
handed back by the sweeper. Cases have the same on ``cases`` (db/repo.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, true, update
from sqlalchemy.orm import Session

from db.repo import Lease, Stranded, lease_free, send_stranded, stranded_clause
from db.tables import JobStatus, JobTile, utcnow
from db.tiles import JOB_TABLES


@dataclass(frozen=True)
class TileKey:
    kind: str  # a key of db.tiles.JOB_TABLES
    job_id: int
    index: int


def claim_tile(session: Session, *, key: TileKey, lease: Lease) -> bool:
    """Take the lease on a tile that is not done and that no other live worker holds (and mark
    it ``running``); False if there is none to take."""
    tile = JobTile
    now = utcnow()
    row = session.execute(
        update(tile)
        .where(
            tile.kind == key.kind,
            tile.job_id == key.job_id,
            tile.index == key.index,
            tile.status != JobStatus.done,
            lease_free(tile, now, lease.owner),
        )
        .values(
            status=JobStatus.running, lease_owner=lease.owner, lease_expires_at=lease.expiry(now)
        )
        .returning(tile.id),
        execution_options={"synchronize_session": False},
    ).first()
    return row is not None


def _held(key: TileKey, owner: str) -> tuple[Any, ...]:
    """The tile ``key`` while ``owner`` holds it and it is not done."""
    return (
        JobTile.kind == key.kind,
        JobTile.job_id == key.job_id,
        JobTile.index == key.index,
        JobTile.lease_owner == owner,
        JobTile.status != JobStatus.done,
    )


def _expire(session: Session, key: TileKey, owner: str, at: datetime) -> None:
    session.execute(
        update(JobTile).where(*_held(key, owner)).values(lease_expires_at=at),
        execution_options={"synchronize_session": False},
    )


def renew_tile_leases(session: Session, *, keys: Sequence[TileKey], lease: Lease) -> None:
    now = utcnow()
    for key in keys:
        _expire(session, key, lease.owner, lease.expiry(now))


def release_tile(session: Session, *, key: TileKey, owner: str) -> None:
    """Give a tile back (its computation raised): the sweeper sends it again at its next sweep."""
    _expire(session, key, owner, utcnow())


def take_stranded_tiles(
    session: Session, *, kind: str, rules: Stranded, quiet: bool = False, limit: int = 1_000
) -> list[tuple[int, int]]:
    """Mark up to ``limit`` stranded tiles of unfinished jobs as sent now (``queued``, lease
    cleared) and return ``(job id, tile index)`` of each, to send before the caller commits.
    ``quiet``: the broker reports this kind's queue empty. Locking as in
    :func:`db.repo.take_stranded_cases`."""
    job, tile = JOB_TABLES[kind], JobTile
    chosen = (
        select(tile.id)
        .join(job, job.id == tile.job_id)
        .where(
            tile.kind == kind,
            job.status.in_((JobStatus.queued, JobStatus.running)),
            stranded_clause(tile, rules, sent_at=tile.updated_at, quiet=true() if quiet else None),
        )
        .order_by(tile.id)
        .limit(limit)
    )
    rows = send_stranded(session, tile, chosen, now=rules.now, returning=(tile.job_id, tile.index))
    return sorted((r[0], r[1]) for r in rows)
