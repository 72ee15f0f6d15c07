"""Leases: a worker claims a row before it works on it, and the sweeper sends again what no live
worker holds. The rows are cases (db/repo.py), the explain stage's ledger (db/explanations.py)
and the tiles of tiled jobs (genome comparisons, compound searches; here).

A claimed row names the worker process and an expiry that the worker renews while it runs. A
message for a row that is done, or that another live worker holds, is settled without computing
anything. An expired lease (the worker died) is handed back by the sweeper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, Select, and_, bindparam, case, or_, select, true, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter

from db.sql import among, status_among_ids
from db.tables import JobStatus, JobTile, Priority, utcnow
from db.tiles import JOB_TABLES, tile_not_done


@dataclass(frozen=True)
class Lease:
    """Who holds a row (a case, an explanation, a tile): a worker process (``host:pid:token``),
    and for how long."""

    owner: str
    ttl: timedelta

    def expiry(self, now: datetime) -> datetime:
        return now + self.ttl


def lease_free(table: Any, now: Any, owner: Any) -> Any:
    """No live lease of another worker on a row of ``table`` (cases, a ledger): none taken, or
    expired, or ``owner``'s own."""
    return or_(
        table.lease_owner.is_(None),
        table.lease_expires_at.is_(None),
        table.lease_expires_at < now,
        *([table.lease_owner == owner] if owner is not None else []),
    )


def claimed_values(table: Any, *, dead: Any, owner: Any, expires: Any, now: Any) -> dict[str, Any]:
    """The columns a claim sets on a row of ``table``: ``running`` under the lease, or (``dead``:
    tried too often) ``failed`` with no lease. ``owner``, ``expires`` and ``now`` are values, or
    bound parameters of a statement built once."""
    if not isinstance(expires, BindParameter):
        expires = bindparam(None, expires, type_=table.lease_expires_at.type)
    return {
        "status": case((dead, "failed"), else_="running"),
        "lease_owner": case((dead, None), else_=owner),
        "lease_expires_at": case((dead, None), else_=expires),
        "updated_at": now,
    }


def claimable(table: Any, now: Any, owner: Any) -> Any:
    """A row of ``table`` (cases, a ledger) that a claim may take: ``queued``, or ``running``
    under no live lease of a worker other than ``owner`` (its worker died holding it). For a
    statement that names its rows by id: the status is :func:`db.sql.status_among_ids`."""
    status = status_among_ids(table)
    return or_(status == "queued", and_(status == "running", lease_free(table, now, owner)))


def unfinished(
    session: Session,
    table: Any,
    *,
    key: Any,
    count: Any,
    ids: Sequence[int],
    owner: str | None,
    also: Any = None,
) -> list[int]:
    """Of ``ids`` (values of ``key``), the rows of ``table`` a claim counted before (``count``
    above 0) that never finished and are :func:`claimable` still (and meet ``also``, if given):
    least counted first, then in ``key`` order."""
    where = [among(session, key, ids), count > 0, claimable(table, utcnow(), owner)]
    if also is not None:
        where.append(also)
    return list(session.scalars(select(key).where(*where).order_by(count, key)))


@dataclass(frozen=True)
class Stranded:
    """When a case (or tile) waiting for a worker is stranded and must be sent again.

    Always: its lease expired (the worker holding it died or stalled), or it was never sent.
    And while ``queued`` without a lease: it was sent before ``broker_started_at`` (the broker
    restarted since, and may have lost it); or before ``quiet_before`` on a queue the broker
    reports empty (``quiet_priorities``: no message of its is waiting, so it sits with a dead
    worker or was lost); or, whatever the broker says, before ``lost_before``.
    """

    now: datetime
    lost_before: datetime
    broker_started_at: datetime | None = None
    quiet_before: datetime | None = None
    quiet_priorities: tuple[Priority, ...] = ()


def renew_rows(session: Session, table: Any, key: Any, ids: Sequence[int], lease: Lease) -> int:
    """Extend ``lease``'s hold on the open (``queued`` or ``running``) rows of ``table`` (cases, a
    ledger) whose ``key`` is among ``ids``; returns how many it still held."""
    if not ids:
        return 0
    result = session.execute(
        update(table)
        .where(
            among(session, key, ids),
            table.lease_owner == lease.owner,
            status_among_ids(table).in_(("queued", "running")),
        )
        .values(lease_expires_at=lease.expiry(utcnow())),
        execution_options={"synchronize_session": False},
    )
    return int(getattr(result, "rowcount", 0) or 0)


def stranded_clause(table: Any, rules: Stranded, *, sent_at: Any, quiet: Any = None) -> Any:
    """The WHERE clause of :class:`Stranded` on ``table`` (cases or a tile ledger)."""
    unleased_queued = and_(table.status == "queued", table.lease_owner.is_(None))
    conditions = [
        and_(table.lease_owner.is_not(None), table.lease_expires_at < rules.now),
        and_(table.status == "queued", sent_at.is_(None)),
        and_(unleased_queued, sent_at < rules.lost_before),
        # A row left running without a lease (written before leases existed).
        and_(
            table.status == "running",
            table.lease_owner.is_(None),
            table.updated_at < rules.lost_before,
        ),
    ]
    if rules.broker_started_at is not None:
        conditions.append(and_(unleased_queued, sent_at < rules.broker_started_at))
    if rules.quiet_before is not None and quiet is not None:
        conditions.append(and_(unleased_queued, sent_at < rules.quiet_before, quiet))
    return and_(table.status.in_(("queued", "running")), or_(*conditions))


def send_stranded(
    session: Session,
    table: Any,
    chosen: Select[Any],
    *,
    now: datetime,
    returning: Sequence[Any],
    sent_at: str | None = None,
) -> Sequence[Row[Any]]:
    """Mark the stranded rows of ``table`` that ``chosen`` selects (by id) as sent ``now``:
    ``queued``, lease cleared, and ``now`` in the ``sent_at`` column if it has one (else its
    ``updated_at`` says when). Returns the ``returning`` columns of each, for the caller to send
    before it commits. On PostgreSQL the rows are locked ``FOR UPDATE SKIP LOCKED``: another
    sweeper takes others."""
    if session.get_bind().dialect.name == "postgresql":
        chosen = chosen.with_for_update(of=table, skip_locked=True)
    values: dict[str, Any] = {
        "status": "queued",
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": now,
    }
    if sent_at is not None:
        values[sent_at] = now
    return session.execute(
        update(table)
        .where(table.id.in_(chosen.scalar_subquery()))
        .values(**values)
        .returning(*returning),
        execution_options={"synchronize_session": False},
    ).all()


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
            *tile_not_done(key.kind, key.job_id, key.index),
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
