"""The ledger of ``Idempotency-Key`` requests: claim a key, record its response, forget old ones."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.tables import IdempotencyKey, utcnow


@dataclass(frozen=True)
class Claim:
    """What a key's row says about a new request with it.

    ``state``: ``new`` (this request runs), ``mismatch`` (another request used the key),
    ``processing`` (the first request has not finished), ``done`` (replay the stored response).
    """

    state: str
    status: int | None = None
    body: bytes | None = None
    content_type: str | None = None


def claim(
    session: Session,
    *,
    tenant_id: int,
    client: str,
    key: str,
    fingerprint: str,
    retention: timedelta,
) -> Claim:
    """Claim ``key`` for this request, or say why not; commits."""
    now = utcnow()
    for _ in range(2):
        try:
            with session.begin_nested():
                session.add(
                    IdempotencyKey(
                        tenant_id=tenant_id,
                        client_sha256=client,
                        key=key,
                        fingerprint=fingerprint,
                        created_at=now,
                    )
                )
            session.commit()
            return Claim("new")
        except IntegrityError:
            pass
        row = session.scalar(
            select(IdempotencyKey).where(
                IdempotencyKey.client_sha256 == client, IdempotencyKey.key == key
            )
        )
        if row is None:  # released between our insert and our read: try again
            continue
        if row.created_at < now - retention:  # expired: the key is free again
            session.delete(row)
            session.commit()
            continue
        if row.fingerprint != fingerprint:
            return Claim("mismatch")
        if row.response_status is None:
            return Claim("processing")
        return Claim("done", row.response_status, row.response_body, row.response_content_type)
    return Claim("processing")


def record(
    session: Session, *, client: str, key: str, status: int, body: bytes, content_type: str
) -> None:
    row = session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.client_sha256 == client, IdempotencyKey.key == key
        )
    )
    if row is not None:
        row.response_status, row.response_body = status, body
        row.response_content_type = content_type
    session.commit()


def release(session: Session, *, client: str, key: str) -> None:
    """Forget a key whose request failed on our side, so a retry can run."""
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.client_sha256 == client, IdempotencyKey.key == key
        )
    )
    session.commit()


def forget_older_than(session: Session, *, before: datetime) -> int:
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < before))
    session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]
