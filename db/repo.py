"""Small query functions: every read and write the API and the worker make goes through here.

Writes are upserts keyed on the schema's unique constraints, so running one twice (a redelivered
message, a retried request) never adds a second row.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Integer,
    Select,
    String,
    and_,
    bindparam,
    case,
    cast,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session, aliased, selectinload

from db.engine import SQLITE_BUSY_TIMEOUT_S
from db.leases import (
    Lease,
    Stranded,
    claimable,
    claimed_values,
    renew_rows,
    send_stranded,
    stranded_clause,
    unfinished,
)
from db.sql import among, among_param, dialect_insert, status_among_ids
from db.tables import (
    SCOPES,
    ApiClient,
    ApiKey,
    AuditEvent,
    Batch,
    Case,
    CaseStatus,
    PatientIdentifier,
    Priority,
    Score,
    Tenant,
    utcnow,
)


def count_statuses(session: Session, *, case_ids: Sequence[int]) -> Counter[CaseStatus]:
    """How many of the given cases are in each status. In slices of 20,000 ids (each one array
    on PostgreSQL): a nightly run may name more cases than a statement may have parameters."""
    counts: Counter[CaseStatus] = Counter()
    for start in range(0, len(case_ids), 20_000):
        rows = session.execute(
            select(Case.status, func.count())
            .where(among(session, Case.id, case_ids[start : start + 20_000]))
            .group_by(Case.status)
        )
        counts.update({case_status: n for case_status, n in rows})
    return counts


def hash_api_key(api_key: str) -> str:
    # Keys are 256-bit random tokens, so a plain sha256 is enough to make a stolen table useless.
    return hashlib.sha256(api_key.encode()).hexdigest()


#: How long a new key works unless told otherwise (Settings.api_key_lifetime_days is the knob).
DEFAULT_KEY_LIFETIME = timedelta(days=365)
#: ``last_used_at`` is written at most this often per key (each write is a row lock).
LAST_USED_RESOLUTION = timedelta(minutes=1)


def _make_key() -> str:
    return "mbk_" + secrets.token_urlsafe(32)


def _new_key(
    session: Session,
    *,
    tenant_id: int,
    client_id: int | None,
    lifetime: timedelta | None,
    api_key: str | None = None,
) -> tuple[ApiKey, str]:
    key = api_key or _make_key()
    now = utcnow()
    row = ApiKey(
        tenant_id=tenant_id,
        client_id=client_id,
        sha256=hash_api_key(key),
        created_at=now,
        expires_at=None if lifetime is None else now + lifetime,
    )
    session.add(row)
    session.flush()
    return row, key


def create_tenant(
    session: Session,
    *,
    name: str,
    api_key: str | None = None,
    lifetime: timedelta | None = DEFAULT_KEY_LIFETIME,
) -> tuple[Tenant, str]:
    """Create a tenant with its own key (every scope); return both (the key is shown once: only
    its hash is stored). ``lifetime`` None: the key never expires."""
    api_key = api_key or _make_key()
    tenant = Tenant(name=name, api_key_sha256=hash_api_key(api_key))
    session.add(tenant)
    session.flush()
    _, key = _new_key(
        session, tenant_id=tenant.id, client_id=None, lifetime=lifetime, api_key=api_key
    )
    return tenant, key


def tenant_for_key(session: Session, *, api_key: str) -> Tenant | None:
    caller = caller_for_key(session, api_key=api_key)
    return None if caller is None else caller.tenant


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant, the API client (None for the tenant's own key), its scopes."""

    tenant: Tenant
    client_id: int | None
    scopes: frozenset[str]
    #: Plain ids, readable after the request's session is gone (the audit trail needs them).
    tenant_id: int = 0
    key_id: int | None = None


class KeyRejected(Exception):
    """A key that does not authenticate; ``reason`` says why in words fit for the caller.

    A known key (expired, revoked) names whose it is, ``tenant_id`` and ``client_id``, for the
    audit row of the refused request: a stolen key's use must be traceable to its holder."""

    def __init__(
        self, reason: str, *, tenant_id: int | None = None, client_id: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tenant_id = tenant_id
        self.client_id = client_id


def authenticate(session: Session, *, api_key: str, now: datetime | None = None) -> Caller:
    """The caller a key stands for; :class:`KeyRejected` if it is unknown, expired or revoked.

    The tenant's own key holds every scope; a client's key the scopes it was given."""
    now = now or utcnow()
    key = session.scalar(select(ApiKey).where(ApiKey.sha256 == hash_api_key(api_key)))
    if key is None:
        raise KeyRejected("unknown API key")
    client = None if key.client_id is None else session.get(ApiClient, key.client_id)
    revoked = key.revoked_at or (client.revoked_at if client is not None else None)
    if revoked is not None:
        raise KeyRejected(
            f"API key revoked at {revoked.isoformat(timespec='seconds')}; "
            "ask the tenant's administrator for a new one",
            tenant_id=key.tenant_id,
            client_id=key.client_id,
        )
    if key.expires_at is not None and key.expires_at <= now:
        raise KeyRejected(
            f"API key expired at {key.expires_at.isoformat(timespec='seconds')}; "
            "ask the tenant's administrator for a new one (medbatch db rotate-key)",
            tenant_id=key.tenant_id,
            client_id=key.client_id,
        )
    tenant = session.get(Tenant, key.tenant_id)
    assert tenant is not None
    scopes = frozenset(SCOPES) if client is None else frozenset(client.scopes)
    return Caller(tenant, key.client_id, scopes, tenant.id, key.id)


def caller_for_key(session: Session, *, api_key: str) -> Caller | None:
    """:func:`authenticate`, with None for a key that does not authenticate."""
    try:
        return authenticate(session, api_key=api_key)
    except KeyRejected:
        return None


@dataclass(frozen=True)
class KeyHolder:
    """Whose a key is: its tenant, and its API client (None for the tenant's own key)."""

    tenant_id: int
    client_id: int | None


def key_holder(session: Session, *, api_key: str) -> KeyHolder | None:
    """Whose a key is, whether or not it still works; None for a key never given. For the
    audit row of a request refused before any route checked the key."""
    row = session.execute(
        select(ApiKey.tenant_id, ApiKey.client_id).where(ApiKey.sha256 == hash_api_key(api_key))
    ).first()
    return None if row is None else KeyHolder(row.tenant_id, row.client_id)


def touch_api_key(session: Session, *, key_id: int) -> None:
    """Record a use of the key (to :data:`LAST_USED_RESOLUTION`)."""
    now = utcnow()
    session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == key_id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - LAST_USED_RESOLUTION),
        )
        .values(last_used_at=now),
        execution_options={"synchronize_session": False},
    )


def create_client(
    session: Session,
    *,
    tenant_id: int,
    name: str,
    scopes: Sequence[str],
    lifetime: timedelta | None = DEFAULT_KEY_LIFETIME,
) -> tuple[ApiClient, str]:
    """An API client of a tenant with ``scopes``; return it with its key (shown once)."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be among {', '.join(SCOPES)}; got {', '.join(scopes)}")
    key = _make_key()
    client = ApiClient(
        tenant_id=tenant_id, name=name, api_key_sha256=hash_api_key(key), scopes=sorted(scopes)
    )
    session.add(client)
    session.flush()
    _new_key(session, tenant_id=tenant_id, client_id=client.id, lifetime=lifetime, api_key=key)
    return client, key


@dataclass(frozen=True)
class Rotated:
    key: str
    key_id: int
    expires_at: datetime | None
    #: The holder's earlier keys that still work, and until when.
    overlapping: list[tuple[int, datetime | None]]


def rotate_key(
    session: Session,
    *,
    tenant_id: int,
    client_id: int | None,
    overlap: timedelta,
    lifetime: timedelta | None = DEFAULT_KEY_LIFETIME,
) -> Rotated:
    """A new key for the tenant (``client_id`` None) or one of its clients; the holder's other
    keys stop working ``overlap`` from now (or earlier, if they expire before)."""
    now = utcnow()
    cut = now + overlap
    holder = and_(
        ApiKey.tenant_id == tenant_id,
        ApiKey.client_id.is_(None) if client_id is None else ApiKey.client_id == client_id,
        ApiKey.revoked_at.is_(None),
    )
    session.execute(
        update(ApiKey)
        .where(holder, or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > cut))
        .values(expires_at=cut),
        execution_options={"synchronize_session": False},
    )
    overlapping = [
        (k.id, k.expires_at)
        for k in session.scalars(
            select(ApiKey).where(holder, ApiKey.expires_at > now).order_by(ApiKey.id)
        )
    ]
    row, key = _new_key(session, tenant_id=tenant_id, client_id=client_id, lifetime=lifetime)
    return Rotated(key, row.id, row.expires_at, overlapping)


def revoke_client(session: Session, *, client_id: int) -> int:
    """Stop every key of a client now; return how many keys were still unrevoked."""
    now = utcnow()
    session.execute(
        update(ApiClient)
        .where(ApiClient.id == client_id, ApiClient.revoked_at.is_(None))
        .values(revoked_at=now),
        execution_options={"synchronize_session": False},
    )
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.client_id == client_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now),
        execution_options={"synchronize_session": False},
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def list_keys(session: Session, *, tenant_id: int) -> list[dict[str, Any]]:
    """Every key of a tenant and its clients (never the key itself), oldest first."""
    rows = session.execute(
        select(ApiKey, ApiClient)
        .outerjoin(ApiClient, ApiClient.id == ApiKey.client_id)
        .where(ApiKey.tenant_id == tenant_id)
        .order_by(ApiKey.client_id.is_not(None), ApiClient.name, ApiKey.id)
    ).all()
    now = utcnow()
    out = []
    for key, client in rows:
        revoked = key.revoked_at or (client.revoked_at if client is not None else None)
        state = (
            "revoked"
            if revoked is not None
            else "expired"
            if key.expires_at is not None and key.expires_at <= now
            else "active"
        )
        out.append(
            {
                "client": None if client is None else client.name,
                "client_id": key.client_id,
                "scopes": sorted(SCOPES) if client is None else list(client.scopes),
                "key_id": key.id,
                "state": state,
                "created_at": key.created_at,
                "expires_at": key.expires_at,
                "revoked_at": revoked,
                "last_used_at": key.last_used_at,
            }
        )
    return out


def add_audit_event(session: Session, **fields: Any) -> None:
    session.add(AuditEvent(**fields))


@dataclass(frozen=True)
class NewCase:
    external_id: str
    model_name: str
    model_version: str
    priority: Priority
    features: dict[str, float]
    subject: str | None = None
    context: dict[str, Any] | None = None
    #: False when the sender named the model only (its default version): a case stored under
    #: another version of it is then the same case, not a conflict (a retry sent after a new
    #: default version was released is answered with the first case, not a 409).
    version_pinned: bool = True


class ExternalIdConflict(ValueError):
    """External ids already used by this tenant for a case with other content."""

    def __init__(self, external_ids: list[str]) -> None:
        super().__init__(", ".join(external_ids))
        self.external_ids = external_ids


@dataclass(frozen=True)
class AddedCase:
    id: int
    created: bool
    status: CaseStatus
    #: The version the case is scored by (the stored case's, when it was there already).
    model_version: str


def _cases_by_external_id(session: Session, tenant_id: int, ids: Sequence[str]) -> dict[str, Any]:
    """The model and features of this tenant's stored cases with these external ids."""
    rows = session.execute(
        select(Case.external_id, Case.model_name, Case.model_version, Case.features).where(
            Case.tenant_id == tenant_id, Case.external_id.in_(ids)
        )
    )
    return {r.external_id: r for r in rows}


def _content_conflicts(cases: Sequence[NewCase], stored: dict[str, Any]) -> list[str]:
    """The external ids of ``cases`` stored with another model or other features (another
    version of the model only when the case names its version)."""
    return [
        c.external_id
        for c in cases
        if (old := stored.get(c.external_id)) is not None
        and (
            old.model_name != c.model_name
            or (c.version_pinned and old.model_version != c.model_version)
            or old.features != c.features
        )
    ]


def add_cases(session: Session, *, tenant_id: int, cases: Sequence[NewCase]) -> list[AddedCase]:
    """Insert cases as ``queued``; return what became of each, in input order.

    Re-submitting an external id with the same model and features returns the existing case
    (``created=False``); with anything else, raises :class:`ExternalIdConflict` and writes nothing.
    """
    ids = [c.external_id for c in cases]
    existing = _cases_by_external_id(session, tenant_id, ids)
    conflicts = _content_conflicts(cases, existing)
    if conflicts:
        raise ExternalIdConflict(conflicts)
    now = utcnow()
    new_rows = [
        {
            "tenant_id": tenant_id,
            "external_id": c.external_id,
            "model_name": c.model_name,
            "model_version": c.model_version,
            "priority": c.priority,
            "features": c.features,
            "subject": c.subject,
            "context": c.context,
            "status": CaseStatus.queued,
            "delivery_count": 0,
            "created_at": now,
            "updated_at": now,
            "enqueued_at": now,
        }
        for c in cases
        if c.external_id not in existing
    ]
    created: set[str] = set()
    if new_rows:
        stmt = (
            dialect_insert(session, Case.__table__)  # type: ignore[arg-type]
            .on_conflict_do_nothing(index_elements=["tenant_id", "external_id"])
            .returning(Case.__table__.c.external_id)
        )
        created = set(session.scalars(stmt, new_rows))
    # Rows a concurrent request committed between the look-up above and this insert: theirs,
    # not ours, unless their content is the same (else the caller rolls back: nothing written).
    raced = [str(r["external_id"]) for r in new_rows if r["external_id"] not in created]
    if raced:
        conflicts = _content_conflicts(cases, _cases_by_external_id(session, tenant_id, raced))
        if conflicts:
            raise ExternalIdConflict(conflicts)
    stored = {
        row.external_id: row
        for row in session.execute(
            select(Case.external_id, Case.id, Case.status, Case.model_version).where(
                Case.tenant_id == tenant_id, Case.external_id.in_(ids)
            )
        )
    }
    return [
        AddedCase(stored[x].id, x in created, stored[x].status, stored[x].model_version)
        for x in ids
    ]


@dataclass(frozen=True)
class ClaimedCase:
    id: int
    model_name: str
    model_version: str
    features: dict[str, Any]
    enqueued_at: datetime | None


_UNRECORDED = "none recorded (the worker stopped mid-batch)"


@functools.cache
def _claim_statement(dialect: str, *, first_only: bool, owned: bool) -> Any:
    """The claim's statement, built once per shape (a worker claims a batch every few ms; building
    it anew cost as much Python as the rest of the claim). Parameters: ``ids``, ``now``,
    ``expires``, ``max_deliveries`` and, where ``owned``, ``owner``."""
    at = Case.lease_expires_at.type
    now = bindparam("now", type_=at)
    owner = bindparam("owner", type_=String) if owned else None
    deliveries = Case.delivery_count + 1
    dead = deliveries > bindparam("max_deliveries", type_=Integer)
    takes = claimable(Case, now, owner)
    if first_only:
        takes = and_(takes, Case.delivery_count == 0)
    expires = bindparam("expires", type_=at)
    return (
        update(Case.__table__)  # type: ignore[arg-type]
        .where(among_param(dialect, Case.id), takes)
        .values(
            **claimed_values(Case, dead=dead, owner=owner, expires=expires, now=now),
            delivery_count=deliveries,
            dead_letter=dead,
            last_error=case(
                (
                    dead,
                    func.substr(
                        "dead letter: delivered "
                        + cast(deliveries, String)
                        + " times without finishing; last error: "
                        + func.coalesce(Case.last_error, _UNRECORDED),
                        1,
                        2000,
                    ),
                ),
                else_=Case.last_error,
            ),
        )
        .returning(
            Case.id,
            Case.model_name,
            Case.model_version,
            Case.features,
            Case.enqueued_at,
            Case.status,
        )
    )


def claim_cases(
    session: Session,
    *,
    case_ids: Sequence[int],
    max_deliveries: int,
    lease: Lease | None = None,
    first_only: bool = False,
) -> tuple[list[ClaimedCase], list[int]]:
    """Claim a batch in one statement: count a delivery, mark ``running``, take the lease.

    With ``first_only``, a case delivered before without finishing is left as it is
    (the caller scores it alone: :func:`delivered_unfinished` finds it).

    A case is claimable when it is ``queued``, or ``running`` with no live lease of another
    worker. Cases ``done`` or ``failed``, and cases another worker holds, are left as they are: a
    redelivered message for them is settled without a forward pass. Returns the cases to score,
    in id order, and the ids of cases now delivered more than ``max_deliveries`` times without
    finishing: those end ``failed`` as dead letters, with their last error, instead of looping.
    """
    now = utcnow()
    owner = lease.owner if lease is not None else None
    dialect = session.get_bind().dialect.name
    stmt = _claim_statement(dialect, first_only=first_only, owned=owner is not None)
    params = {
        "ids": list(case_ids),
        "now": now,
        "expires": lease.expiry(now) if lease is not None else None,
        "max_deliveries": max_deliveries,
    }
    if owner is not None:
        params["owner"] = owner
    rows = session.execute(stmt, params, execution_options={"synchronize_session": False}).all()
    claimed, dead_ids = [], []
    for row in sorted(rows, key=lambda r: r.id):
        if row.status == CaseStatus.failed:
            dead_ids.append(row.id)
        else:
            claimed.append(
                ClaimedCase(
                    row.id, row.model_name, row.model_version, row.features, row.enqueued_at
                )
            )
    return claimed, dead_ids


def delivered_unfinished(
    session: Session, *, case_ids: Sequence[int], owner: str | None = None
) -> list[int]:
    """Of ``case_ids``, those a claim counted before that never finished (their worker died
    holding them, or their batch failed for a reason not the database's): least delivered
    first, then in id order. A case ``running`` under a live lease of a worker other than
    ``owner`` is being scored there: no suspect (a claim of its own would only skip it)."""
    return unfinished(
        session, Case, key=Case.id, count=Case.delivery_count, ids=case_ids, owner=owner
    )


def hold_cases(
    session: Session, *, case_ids: Sequence[int], lease: Lease, stranded: bool = False
) -> None:
    """Lease ``queued`` cases a worker holds unclaimed (their messages wait in its buffers).

    ``stranded``: also those left ``running`` under no live lease of another worker (a case
    whose worker died holding it, which waits to be scored alone: :func:`claim_cases`)."""
    now = utcnow()
    holdable = (
        claimable(Case, now, lease.owner)
        if stranded
        else status_among_ids(Case) == CaseStatus.queued.value
    )
    session.execute(
        update(Case)
        .where(among(session, Case.id, case_ids), holdable)
        .values(lease_owner=lease.owner, lease_expires_at=lease.expiry(now)),
        execution_options={"synchronize_session": False},
    )


def renew_leases(session: Session, *, case_ids: Sequence[int], lease: Lease) -> int:
    """Extend this worker's leases on the given cases; returns how many it still held."""
    return renew_rows(session, Case, Case.id, case_ids, lease)


def release_cases(
    session: Session, *, case_ids: Sequence[int], owner: str, uncount: bool = False
) -> None:
    """Give back cases this worker holds: ``queued`` again, the lease expired at once, so the
    sweeper sends them at its next sweep (and any worker may claim them before that).
    ``uncount`` takes back the delivery a claim counted (an outage, not the case, stopped the
    batch)."""
    now = utcnow()
    values: dict[str, Any] = {
        "status": CaseStatus.queued,
        "lease_expires_at": now,
        "updated_at": now,
    }
    if uncount:
        values["delivery_count"] = case(
            (Case.status == CaseStatus.running, Case.delivery_count - 1),
            else_=Case.delivery_count,
        )
    session.execute(
        update(Case)
        .where(
            among(session, Case.id, case_ids),
            Case.lease_owner == owner,
            status_among_ids(Case).in_((CaseStatus.queued.value, CaseStatus.running.value)),
        )
        .values(**values),
        execution_options={"synchronize_session": False},
    )


def add_batch(session: Session, batch: Batch) -> int:
    """Record one forward pass; return its id for the scores it produced."""
    session.add(batch)
    session.flush()
    return batch.id


def record_error(session: Session, *, case_ids: Sequence[int], error: str) -> None:
    """Note why a delivery did not finish, for the dead letter that may follow."""
    session.execute(
        update(Case)
        .where(
            among(session, Case.id, case_ids),
            status_among_ids(Case) == CaseStatus.running.value,
        )
        .values(last_error=error[:2000]),
        execution_options={"synchronize_session": False},
    )


def replay_dead_letters(
    session: Session,
    *,
    tenant_id: int | None = None,
    case_ids: Sequence[int] | None = None,
    retired: Sequence[tuple[str, str]] = (),
) -> list[tuple[int, Priority]]:
    """Put dead-lettered cases back to ``queued`` with a fresh delivery count; those of a
    ``retired`` (name, version) stay dead letters: no worker scores them any more.

    Returns ``(case id, priority)`` of each, to enqueue after the commit.
    """
    stmt = select(Case.id, Case.priority).where(Case.dead_letter.is_(True))
    for name, version in retired:
        stmt = stmt.where(or_(Case.model_name != name, Case.model_version != version))
    if tenant_id is not None:
        stmt = stmt.where(Case.tenant_id == tenant_id)
    if case_ids is not None:
        stmt = stmt.where(among(session, Case.id, case_ids))
    found = [(r[0], r[1]) for r in session.execute(stmt.order_by(Case.id))]
    if found:
        now = utcnow()
        session.execute(
            update(Case)
            .where(among(session, Case.id, [i for i, _ in found]))
            .values(
                status=CaseStatus.queued,
                dead_letter=False,
                delivery_count=0,
                updated_at=now,
                enqueued_at=now,
            ),
            execution_options={"synchronize_session": False},
        )
    return found


_SCORE_ARRAYS = {
    "case_id": "bigint[]",
    "model_name": "text[]",
    "model_version": "text[]",
    "model_sha256": "text[]",
    "score": "float8[]",
    "label": "text[]",
    "batch_id": "bigint[]",
    "position": "int[]",
    "queue_wait_ms": "float8[]",
    "shadow": "boolean[]",
}
# One INSERT over arrays, one parameter per column: a thousand-row batch is one short statement
# instead of one with ten thousand placeholders (which psycopg spends longer parsing than
# PostgreSQL spends inserting). Explanations travel as JSON text.
PG_INSERT_SCORES = (
    f"INSERT INTO scores ({', '.join(_SCORE_ARRAYS)}, explanation, created_at) "
    f"SELECT {', '.join(_SCORE_ARRAYS)}, CAST(explanation AS json), :created_at FROM unnest("
    + ", ".join(f"CAST(:{c} AS {t})" for c, t in _SCORE_ARRAYS.items())
    + f", CAST(:explanation AS text[])) AS u({', '.join(_SCORE_ARRAYS)}, explanation) "
    "ON CONFLICT (case_id, model_name, model_version) DO NOTHING"
)
_PG_SAVE_SCORES = text(PG_INSERT_SCORES + " RETURNING id")


def score_arrays(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The parameters of :data:`PG_INSERT_SCORES` but ``created_at``: one array a column."""
    params: dict[str, Any] = {c: [r.get(c) for r in rows] for c in _SCORE_ARRAYS}
    params["shadow"] = [bool(r.get("shadow", False)) for r in rows]
    params["explanation"] = [
        None if r.get("explanation") is None else json.dumps(r["explanation"]) for r in rows
    ]
    return params


def save_scores(session: Session, *, rows: Sequence[dict[str, Any]]) -> int:
    """Upsert score rows; return how many were new. An existing (case, model, version) row wins."""
    if not rows:
        return 0
    now = utcnow()
    if session.get_bind().dialect.name == "postgresql":
        params = {**score_arrays(rows), "created_at": now}
        return len(session.execute(_PG_SAVE_SCORES, params).all())
    stmt = (
        dialect_insert(session, Score.__table__)  # type: ignore[arg-type]
        .on_conflict_do_nothing(index_elements=["case_id", "model_name", "model_version"])
        .returning(Score.__table__.c.id)
    )
    return len(list(session.scalars(stmt, [{"created_at": now, **r} for r in rows])))


def settle_cases(
    session: Session, *, done: Iterable[int] = (), failed: dict[int, str] | None = None
) -> None:
    """Settle a batch in one statement: each case ``done``, or ``failed`` with its own reason;
    its lease ends. A case already ``done`` stays ``done`` (another delivery finished it)."""
    done_ids = list(done)
    failures = failed or {}
    if session.get_bind().dialect.name != "postgresql":
        settle_rows(session, Case, Case.id, done=done_ids, failed=failures, error="last_error")
        return
    ids = done_ids + list(failures)
    if not ids:
        return
    statuses = [CaseStatus.done.value] * len(done_ids) + [CaseStatus.failed.value] * len(failures)
    reasons: list[str | None] = [None] * len(done_ids) + [r[:2000] for r in failures.values()]
    session.execute(
        _PG_SETTLE,
        {"ids": ids, "statuses": statuses, "reasons": reasons, "now": utcnow()},
    )


def settle_rows(
    session: Session,
    table: Any,
    key: Any,
    *,
    done: Sequence[int],
    failed: dict[int, str],
    error: str,
) -> None:
    """Settle rows of ``table`` (cases, a ledger) by ``key`` in one statement: each ``done``, or
    ``failed`` with its own reason in column ``error``; its lease ends. A row already ``done``
    stays ``done`` (another delivery finished it)."""
    ids = [*done, *failed]
    if not ids:
        return
    status_of = {i: "done" for i in done} | {i: "failed" for i in failed}
    error_of: dict[int, str | None] = {i: None for i in done} | {
        i: r[:2000] for i, r in failed.items()
    }
    session.execute(
        update(table)
        .where(among(session, key, ids), status_among_ids(table) != "done")
        .values(
            **{error: case(error_of, value=key)},
            status=case(status_of, value=key),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=utcnow(),
        ),
        execution_options={"synchronize_session": False},
    )


_PG_SETTLE = text(
    "UPDATE cases SET status = v.status, last_error = v.reason, lease_owner = NULL, "
    "lease_expires_at = NULL, updated_at = :now "
    "FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS text[]), CAST(:reasons AS text[])) "
    "AS v(id, status, reason) WHERE cases.id = v.id AND coalesce(cases.status, '') <> 'done'"
)


def mark_done(session: Session, *, case_ids: Iterable[int]) -> None:
    settle_cases(session, done=case_ids)


def mark_failed(session: Session, *, errors: dict[int, str]) -> None:
    """Mark each case ``failed`` with its own reason."""
    settle_cases(session, failed=errors)


def mark_rows_unsent(session: Session, table: Any, key: Any, ids: Sequence[int]) -> None:
    """Rows of ``table`` (cases, a ledger) committed ``queued`` but not sent (the broker was
    unreachable): the sweeper sends them as soon as the broker is back."""
    session.execute(
        update(table)
        .where(among(session, key, ids), status_among_ids(table) == "queued")
        .values(enqueued_at=None),
        execution_options={"synchronize_session": False},
    )


def mark_unsent(session: Session, *, case_ids: Sequence[int]) -> None:
    """Cases committed but not sent: see :func:`mark_rows_unsent`."""
    mark_rows_unsent(session, Case, Case.id, case_ids)


def get_case(session: Session, *, tenant_id: int, case_id: int) -> Case | None:
    """A tenant's case with its scores; another tenant's case is as good as absent."""
    return session.scalar(
        select(Case)
        .where(Case.id == case_id, Case.tenant_id == tenant_id)
        .options(selectinload(Case.scores))
    )


def list_results(
    session: Session,
    *,
    tenant_id: int,
    model: str | None = None,
    status: CaseStatus | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> list[tuple[Case, Score | None]]:
    """One row per case (with its score, if any), in case id order after ``after_id``.

    The score is the one of the version the case was submitted to; shadow scores are not results.
    """
    stmt = results_statement(
        tenant_id=tenant_id,
        model=model,
        status=status,
        since=since,
        until=until,
        after_id=after_id,
        limit=limit,
    )
    return [(row[0], row[1]) for row in session.execute(stmt)]


def results_statement(
    *,
    tenant_id: int,
    model: str | None = None,
    status: CaseStatus | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> Select[Any]:
    """The statement of :func:`list_results` (a caller may add columns to read in the same one)."""
    stmt = (
        select(Case, Score)
        .outerjoin(
            Score,
            and_(
                Score.case_id == Case.id,
                Score.model_name == Case.model_name,
                Score.model_version == Case.model_version,
            ),
        )
        .where(Case.tenant_id == tenant_id, Case.id > after_id)
        .order_by(Case.id)
        .limit(limit)
    )
    if model is not None:
        name, _, version = model.partition("@")
        stmt = stmt.where(Case.model_name == name)
        if version:
            stmt = stmt.where(Case.model_version == version)
    if status is not None:
        stmt = stmt.where(Case.status == status)
    if since is not None:
        stmt = stmt.where(Case.updated_at >= since)
    if until is not None:
        stmt = stmt.where(Case.updated_at < until)
    return stmt


# Every other transaction open on this database, whatever it has done so far: an xid is given
# only at a transaction's first write, and a case's stamp is taken (on the app server's clock)
# before the statement that writes it, so one that has stamped a case but not yet written, or
# waits on a row lock to write it, has no backend_xid yet. Sessions of other roles that this one
# may not see (pg_stat_activity shows them with no backend_type) are counted apart.
_PG_OLDEST_OPEN = text(
    "SELECT now(), "
    "min(xact_start) FILTER (WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()), "
    "count(*) FILTER (WHERE backend_type IS NULL) "
    "FROM pg_stat_activity WHERE datname = current_database()"
)


def poll_watermark(session: Session, *, margin: timedelta) -> datetime | None:
    """A moment before which every change to a case is committed: a statement run after this one
    sees every case whose ``updated_at`` is before it (in its latest version, or a later one).

    On PostgreSQL: the earlier of the database's now and the start of the oldest other
    transaction still open on this database, less ``margin`` (the most an app server's clock,
    which stamps ``updated_at``, may be behind the database's, plus the time between a stamp and
    its transaction's first statement). On SQLite writes take turns, but a writer may stamp a
    case and then wait for the write lock: now, less the lock timeout and ``margin``.

    None when some session on this database is hidden from this role (so the oldest open
    transaction is unknown): run the API as the role that writes, or grant it
    ``pg_read_all_stats``.
    """
    if session.get_bind().dialect.name != "postgresql":
        return utcnow() - timedelta(seconds=SQLITE_BUSY_TIMEOUT_S) - margin
    now, oldest, hidden = session.execute(_PG_OLDEST_OPEN).one()
    if hidden:
        return None
    return (now if oldest is None else min(now, oldest)) - margin


def shadow_pairs(
    session: Session, *, name: str, released: str, candidate: str
) -> list[tuple[float, float]]:
    """(released score, candidate score) of every case the candidate shadowed, in case order."""
    shadow = aliased(Score)
    rows = session.execute(
        select(Score.score, shadow.score)
        .join(
            shadow,
            and_(
                shadow.case_id == Score.case_id,
                shadow.model_name == name,
                shadow.model_version == candidate,
                shadow.shadow.is_(True),
            ),
        )
        .where(Score.model_name == name, Score.model_version == released, Score.shadow.is_(False))
        .order_by(Score.case_id)
    )
    return [(r[0], r[1]) for r in rows]


def take_stranded_cases(
    session: Session, *, rules: Stranded, limit: int = 5_000
) -> list[tuple[int, Priority]]:
    """Mark up to ``limit`` stranded cases as sent now (``queued``, lease cleared) and return
    ``(case id, priority)`` of each, for the caller to send before it commits.

    Safe with several sweepers at once: on PostgreSQL the rows are locked ``FOR UPDATE SKIP
    LOCKED``, so two sweepers take disjoint cases and, once one commits, the cases no longer
    match; SQLite runs one writer at a time.
    """
    quiet = (
        Case.priority.in_([p.value for p in rules.quiet_priorities])
        if rules.quiet_priorities
        else None
    )
    chosen = (
        select(Case.id)
        .where(stranded_clause(Case, rules, sent_at=Case.enqueued_at, quiet=quiet))
        .order_by(Case.id)
        .limit(limit)
    )
    rows = send_stranded(
        session,
        Case,
        chosen,
        now=rules.now,
        sent_at="enqueued_at",
        returning=(Case.id, Case.priority),
    )
    return sorted((r[0], r[1]) for r in rows)


def identifier_digest(value: str) -> str:
    """How an identifier value is kept: its sha256, hex."""
    return hashlib.sha256(value.encode()).hexdigest()


def add_patient_identifiers(
    session: Session, *, tenant_id: int, subject: str, identifiers: Sequence[tuple[str, str]]
) -> None:
    """Remember ``(system, value)`` identifiers of ``subject`` (each once)."""
    rows = [
        {
            "tenant_id": tenant_id,
            "subject": subject,
            "system": system[:300],
            "value_sha256": identifier_digest(value),
        }
        for system, value in dict.fromkeys(identifiers)
    ]
    if rows:
        stmt = dialect_insert(session, PatientIdentifier.__table__).on_conflict_do_nothing(  # type: ignore[arg-type]
            index_elements=["tenant_id", "subject", "system", "value_sha256"]
        )
        session.execute(stmt, rows)


def subjects_with_identifier(
    session: Session, *, tenant_id: int, system: str | None, value: str
) -> list[str]:
    """The subjects (``Patient/<id>``) of this tenant that carry an identifier; ``system`` None
    matches any system, "" only identifiers sent without one (FHIR token search)."""
    query = select(PatientIdentifier.subject).where(
        PatientIdentifier.tenant_id == tenant_id,
        PatientIdentifier.value_sha256 == identifier_digest(value),
    )
    if system is not None:
        query = query.where(PatientIdentifier.system == system)
    return sorted(set(session.scalars(query)))


def scores_for_external_ids(
    session: Session, *, tenant_id: int, model: str, external_ids: Sequence[str]
) -> dict[str, float]:
    """A tenant's released scores of ``model`` (any version) by external id, for evaluation;
    the newest score when a case was scored by several versions."""
    found: dict[str, float] = {}
    for start in range(0, len(external_ids), 1000):
        chunk = list(external_ids[start : start + 1000])
        rows = session.execute(
            select(Case.external_id, Score.score)
            .join(Score, Score.case_id == Case.id)
            .where(
                Case.tenant_id == tenant_id,
                Case.external_id.in_(chunk),
                Score.model_name == model,
                Score.shadow.is_(False),
            )
            .order_by(Score.created_at)
        )
        found.update({external_id: float(score) for external_id, score in rows})
    return found
