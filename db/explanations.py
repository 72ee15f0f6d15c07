"""The explain stage's ledger: ask for a case's attributions, claim, settle, find the stranded.

A score commits first; :func:`request_explanations` adds, in the same transaction, one ledger row
per released score that wants attributions. The explain stage claims them in one statement,
computes them batched, and settles them in one statement per outcome. Every step is keyed on the
case id (a case has one released score), so a message delivered twice changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import String, and_, case, cast, literal, or_, select, text, update
from sqlalchemy.orm import Session, joinedload

from db import leases
from db.repo import (
    PG_INSERT_SCORES,
    mark_rows_unsent,
    results_statement,
    save_scores,
    score_arrays,
    settle_rows,
)
from db.sql import among, dialect_insert, status_among_ids
from db.tables import Case, CaseStatus, Explanation, JobStatus, Score, utcnow

PublicStatus = Literal["pending", "done", "failed"]
#: What the API shows for each ledger status (queued and running are both still to come).
PUBLIC_STATUS: dict[JobStatus, PublicStatus] = {
    JobStatus.queued: "pending",
    JobStatus.running: "pending",
    JobStatus.done: "done",
    JobStatus.failed: "failed",
}


def request_explanations(
    session: Session, *, case_ids: Sequence[int], now: datetime | None = None
) -> list[int]:
    """Add a ``queued`` ledger row for the released score of each case (one statement); return
    the cases that got one now (a case that has one already keeps it)."""
    if not case_ids:
        return []
    now = now or utcnow()
    at = Explanation.enqueued_at.type
    chosen = select(
        Score.case_id,
        Score.id,
        literal(JobStatus.queued.value, String),
        literal(0),
        literal(now, at),
        literal(now, at),
        literal(now, at),
    ).where(among(session, Score.case_id, case_ids), Score.shadow.is_(False))
    stmt = (
        dialect_insert(session, Explanation.__table__)  # type: ignore[arg-type]
        .from_select(
            [
                "case_id",
                "score_id",
                "status",
                "attempts",
                "enqueued_at",
                "created_at",
                "updated_at",
            ],
            chosen,
        )
        .on_conflict_do_nothing(index_elements=["case_id"])
        .returning(Explanation.__table__.c.case_id)
    )
    return sorted(int(i) for i in session.scalars(stmt))


# The score rows and their ledger rows in one statement: the ledger takes the new scores' ids
# as the insert returns them, with no lookup of ``scores`` (and no plan to go stale on it).
_PG_SAVE_ASKING = text(
    f"WITH s AS ({PG_INSERT_SCORES} RETURNING id, case_id, shadow), "
    "e AS (INSERT INTO explanations (case_id, score_id, status, attempts, enqueued_at, "
    "created_at, updated_at) "
    f"SELECT case_id, id, '{JobStatus.queued.value}', 0, :created_at, :created_at, :created_at "
    "FROM s WHERE NOT shadow AND case_id = ANY(CAST(:asked AS bigint[])) "
    "ON CONFLICT (case_id) DO NOTHING RETURNING case_id) "
    "SELECT (SELECT count(*) FROM s) AS new_rows, ARRAY(SELECT case_id FROM e) AS asked"
)


def save_scores_asking(
    session: Session, *, rows: Sequence[dict[str, Any]], case_ids: Sequence[int]
) -> tuple[int, list[int]]:
    """Insert score rows (as :func:`db.repo.save_scores`) and a ``queued`` ledger row for the
    released score of each of ``case_ids`` inserted now; one statement on PostgreSQL. Returns
    how many score rows were new and the cases that got a ledger row, in id order."""
    if session.get_bind().dialect.name != "postgresql" or not rows:
        new = save_scores(session, rows=rows)
        return new, request_explanations(session, case_ids=case_ids)
    params = {**score_arrays(rows), "created_at": utcnow(), "asked": list(case_ids)}
    new, asked = session.execute(_PG_SAVE_ASKING, params).one()
    return int(new), sorted(int(i) for i in asked)


def mark_unsent(session: Session, *, case_ids: Sequence[int]) -> None:
    """Ledger rows committed but not sent (the broker was away): the sweeper sends them."""
    mark_rows_unsent(session, Explanation, Explanation.case_id, case_ids)


@dataclass(frozen=True)
class ClaimedExplanation:
    case_id: int
    score_id: int
    model_name: str
    model_version: str
    features: dict[str, Any]
    #: The sha256 of the artifact that made the score: its attributions must come from the same.
    model_sha256: str
    #: Claims counted so far, this one included.
    attempts: int = 1


def attempted_unfinished(
    session: Session, *, case_ids: Sequence[int], owner: str | None = None
) -> list[int]:
    """Of ``case_ids``, those whose explanation a claim counted before and that never finished
    (their worker died explaining them): least attempted first, then in case id order. One
    ``running`` under a live lease of a worker other than ``owner`` is being explained there:
    no suspect (a claim of its own would only skip it); nor is one given back by
    :func:`defer_explanations` (its ``error`` says how its attempt ended)."""
    return leases.unfinished(
        session,
        Explanation,
        key=Explanation.case_id,
        count=Explanation.attempts,
        ids=case_ids,
        owner=owner,
        also=Explanation.error.is_(None),
    )


def claim_explanations(
    session: Session,
    *,
    case_ids: Sequence[int],
    lease: leases.Lease,
    max_deliveries: int,
    first_only: bool = False,
) -> tuple[list[ClaimedExplanation], list[int]]:
    """Claim in one statement the ledger rows of ``case_ids`` that are ``queued``, or ``running``
    under no live lease: count an attempt, take the lease. Returns what to explain, in case id
    order, and the cases now tried more than ``max_deliveries`` times: those end ``failed``.

    With ``first_only``, a row attempted before without finishing is left as it is (the
    caller explains it alone: :func:`attempted_unfinished` finds it). A row given back by
    :func:`defer_explanations` finished its attempt (its ``error`` says how): it is no suspect.
    A claim clears that ``error``, so a worker dying on the row makes it one."""
    now = utcnow()
    attempts = Explanation.attempts + 1
    dead = attempts > max_deliveries
    takes = leases.claimable(Explanation, now, lease.owner)
    if first_only:
        takes = and_(takes, or_(Explanation.attempts == 0, Explanation.error.is_not(None)))
    rows = session.execute(
        update(Explanation)
        .where(among(session, Explanation.case_id, case_ids), takes)
        .values(
            **leases.claimed_values(
                Explanation, dead=dead, owner=lease.owner, expires=lease.expiry(now), now=now
            ),
            attempts=attempts,
            error=case(
                (
                    dead,
                    "explanation attempted " + cast(attempts, String) + " times without finishing",
                ),
                else_=None,
            ),
        )
        .returning(
            Explanation.case_id, Explanation.score_id, Explanation.status, Explanation.attempts
        ),
        execution_options={"synchronize_session": False},
    ).all()
    dead_ids = sorted(r.case_id for r in rows if r.status == JobStatus.failed)
    touch_cases(session, case_ids=dead_ids)
    live = {r.case_id: r.score_id for r in rows if r.status != JobStatus.failed}
    tries = {r.case_id: r.attempts for r in rows}
    if not live:
        return [], dead_ids
    cases = session.execute(
        select(Case.id, Score.model_name, Score.model_version, Score.model_sha256, Case.features)
        .join(Score, Score.case_id == Case.id)
        .where(among(session, Score.id, list(live.values())))
    ).all()
    claimed = [
        ClaimedExplanation(
            c.id, live[c.id], c.model_name, c.model_version, c.features, c.model_sha256, tries[c.id]
        )
        for c in sorted(cases, key=lambda c: c.id)
    ]
    return claimed, dead_ids


def hold_explanations(
    session: Session, *, case_ids: Sequence[int], lease: leases.Lease
) -> list[int]:
    """Lease the rows of ``case_ids`` that wait, unclaimed, to be explained alone by this worker
    (attempted before without finishing: ``queued``, or ``running`` under a lease that ran out)
    and that no other live worker holds; return those, in the order given. Held, they are not
    stranded: the sweeper leaves them while they wait (as :func:`db.repo.hold_cases`)."""
    if not case_ids:
        return []
    now = utcnow()
    status = status_among_ids(Explanation)
    held = set(
        session.scalars(
            update(Explanation)
            .where(
                among(session, Explanation.case_id, case_ids),
                status.in_((JobStatus.queued.value, JobStatus.running.value)),
                leases.lease_free(Explanation, now, lease.owner),
            )
            .values(lease_owner=lease.owner, lease_expires_at=lease.expiry(now))
            .returning(Explanation.case_id),
            execution_options={"synchronize_session": False},
        )
    )
    return [i for i in case_ids if i in held]


def renew_explanation_leases(
    session: Session, *, case_ids: Sequence[int], lease: leases.Lease
) -> int:
    """Extend this worker's leases on the given cases' ledger rows; returns how many it held."""
    return leases.renew_rows(session, Explanation, Explanation.case_id, case_ids, lease)


def hand_back_held(session: Session, *, case_ids: Sequence[int], owner: str) -> None:
    """Give back rows this worker held unclaimed (:func:`hold_explanations`), their attempts as
    they were: ``queued``, no lease, marked sent now, for the caller to send after the commit."""
    _give_back(session, case_ids, owner, held=True, resend=True)


def settle_explanations(
    session: Session,
    *,
    done: dict[int, tuple[int, dict[str, Any]]] | None = None,
    failed: dict[int, str] | None = None,
) -> None:
    """Store attributions (``done``: case id -> (score id, attributions)) and settle the ledger:
    each case ``done``, or ``failed`` with its own reason. A row already ``done`` stays so."""
    done = done or {}
    failed = failed or {}
    if done:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(
                _PG_STORE,
                {
                    "ids": [score_id for score_id, _ in done.values()],
                    "explanations": [json.dumps(e, allow_nan=False) for _, e in done.values()],
                },
            )
        else:
            for score_id, explanation in done.values():
                session.execute(
                    update(Score)
                    .where(Score.id == score_id)
                    .values(explanation=explanation)
                    .execution_options(synchronize_session=False)
                )
    settle_rows(
        session, Explanation, Explanation.case_id, done=list(done), failed=failed, error="error"
    )
    touch_cases(session, case_ids=[*done, *failed])


def touch_cases(session: Session, *, case_ids: Sequence[int]) -> None:
    """Move the cases' ``updated_at`` to now: what the API shows of them changed (their
    explanation settled), so ``GET /v1/scores?since=`` finds them again."""
    if case_ids:
        session.execute(
            update(Case)
            .where(among(session, Case.id, list(case_ids)))
            .values(updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )


_PG_STORE = text(
    "UPDATE scores SET explanation = CAST(v.explanation AS json) "
    "FROM unnest(CAST(:ids AS bigint[]), CAST(:explanations AS text[])) AS v(id, explanation) "
    "WHERE scores.id = v.id"
)


def release_explanations(
    session: Session, *, case_ids: Sequence[int], owner: str, resend: bool = False
) -> None:
    """Give back rows this worker holds, the attempt uncounted: ``queued`` again, marked unsent
    for the sweeper, or (``resend``) marked sent now, for the caller to send after the commit."""
    _give_back(session, case_ids, owner, held=False, resend=resend)


def defer_explanations(session: Session, *, reasons: dict[int, str], owner: str) -> None:
    """Give back claimed rows whose model could not be loaded for a reason that may pass (an
    artifact unreadable while a deploy copies it): ``queued``, no lease, the attempt still
    counted (the tries end at ``max_deliveries``), and unsent, so that the sweeper sends them at
    its next sweep: a pause before the next try, not a loop. ``reasons`` (case id -> why) stay
    in ``error`` meanwhile (the API shows an error only once failed); the next claim takes them
    as first tries, not as suspects."""
    if reasons:
        _give_back(session, list(reasons), owner, held=False, resend=False, errors=reasons)


def _give_back(
    session: Session,
    case_ids: Sequence[int],
    owner: str,
    *,
    held: bool,
    resend: bool,
    errors: dict[int, str] | None = None,
) -> None:
    """``queued`` again and no lease: rows ``owner`` held unclaimed (``held``: their attempts as
    they were) or claimed (``running``: the claim's attempt taken back, unless ``errors`` says
    how it ended, which then goes into ``error``)."""
    now = utcnow()
    status = status_among_ids(Explanation)
    values: dict[str, Any] = {
        "status": JobStatus.queued,
        "lease_owner": None,
        "lease_expires_at": None,
        "enqueued_at": now if resend else None,
        "updated_at": now,
    }
    if errors is not None:
        values["error"] = case({i: r[:2000] for i, r in errors.items()}, value=Explanation.case_id)
    elif not held:
        values["attempts"] = Explanation.attempts - 1
    session.execute(
        update(Explanation)
        .where(
            among(session, Explanation.case_id, case_ids),
            Explanation.lease_owner == owner,
            status.in_((JobStatus.queued.value, JobStatus.running.value))
            if held
            else status == JobStatus.running.value,
        )
        .values(**values),
        execution_options={"synchronize_session": False},
    )


def retry_failed(
    session: Session, *, tenant_id: int | None = None, case_ids: Sequence[int] | None = None
) -> list[int]:
    """Put ``failed`` explanations (of one tenant's cases, or of ``case_ids``, or all) back to
    ``queued`` with a fresh count: no attempts, no error, no lease. Returns their case ids, in
    order, to send after the commit (unsent, the sweeper sends them)."""
    stmt = select(Explanation.case_id).where(
        status_among_ids(Explanation) == JobStatus.failed.value
    )
    if tenant_id is not None:
        stmt = stmt.join(Case, Case.id == Explanation.case_id).where(Case.tenant_id == tenant_id)
    if case_ids is not None:
        stmt = stmt.where(among(session, Explanation.case_id, case_ids))
    found = list(session.scalars(stmt.order_by(Explanation.case_id)))
    if found:
        now = utcnow()
        session.execute(
            update(Explanation)
            .where(
                among(session, Explanation.case_id, found),
                status_among_ids(Explanation) == JobStatus.failed.value,
            )
            .values(
                status=JobStatus.queued,
                attempts=0,
                error=None,
                lease_owner=None,
                lease_expires_at=None,
                enqueued_at=now,
                updated_at=now,
            ),
            execution_options={"synchronize_session": False},
        )
    return found


def take_stranded_explanations(
    session: Session, *, rules: leases.Stranded, quiet: bool = False, limit: int = 5_000
) -> list[int]:
    """Mark up to ``limit`` stranded ledger rows as sent now and return their case ids, for the
    caller to send before it commits (the rules and the locking of
    :func:`db.repo.take_stranded_cases`; ``quiet``: the broker reports the explain queue empty)."""
    chosen = (
        select(Explanation.id)
        .where(
            leases.stranded_clause(
                Explanation,
                rules,
                sent_at=Explanation.enqueued_at,
                quiet=Explanation.id.is_not(None) if quiet else None,
            )
        )
        .order_by(Explanation.id)
        .limit(limit)
    )
    rows = leases.send_stranded(
        session,
        Explanation,
        chosen,
        now=rules.now,
        sent_at="enqueued_at",
        returning=(Explanation.case_id,),
    )
    return sorted(r[0] for r in rows)


@dataclass(frozen=True)
class ExplanationState:
    status: PublicStatus
    error: str | None


def states(session: Session, *, case_ids: Sequence[int]) -> dict[int, ExplanationState]:
    """The public explanation status (pending, done, failed) of each case that has one."""
    if not case_ids:
        return {}
    rows = session.execute(
        select(Explanation.case_id, Explanation.status, Explanation.error).where(
            among(session, Explanation.case_id, case_ids)
        )
    ).all()
    return {r.case_id: state for r in rows if (state := state_of(r.status, r.error)) is not None}


def state_of(status: JobStatus | str | None, error: str | None) -> ExplanationState | None:
    """The public state of a ledger row's ``status`` and ``error`` (None: the case has no row),
    for a statement that reads them beside its case (an outer join) instead of :func:`states`."""
    if status is None:
        return None
    job = JobStatus(status)
    return ExplanationState(PUBLIC_STATUS[job], error if job == JobStatus.failed else None)


# A case and its explanation's state are read in one statement (one snapshot): read apart, an
# explanation settled between the two reads showed ``done`` beside the score read before it, with
# no attributions, and a client following ``GET /v1/scores?since=`` never saw them (the case
# does not change again).


def case_with_state(
    session: Session, *, tenant_id: int, case_id: int
) -> tuple[Case, ExplanationState | None] | None:
    """A tenant's case with its scores and its explanation's state (None: no such case)."""
    row = (
        session.execute(
            select(Case, Explanation.status, Explanation.error)
            .outerjoin(Explanation, Explanation.case_id == Case.id)
            .where(Case.id == case_id, Case.tenant_id == tenant_id)
            .options(joinedload(Case.scores))
        )
        .unique()
        .first()
    )
    if row is None:
        return None
    return row[0], state_of(row[1], row[2])


def results_with_states(
    session: Session,
    *,
    tenant_id: int,
    model: str | None = None,
    status: CaseStatus | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> list[tuple[Case, Score | None, ExplanationState | None]]:
    """:func:`db.repo.list_results`, each case with its explanation's state."""
    stmt = (
        results_statement(
            tenant_id=tenant_id,
            model=model,
            status=status,
            since=since,
            until=until,
            after_id=after_id,
            limit=limit,
        )
        .add_columns(Explanation.status, Explanation.error)
        .outerjoin(Explanation, Explanation.case_id == Case.id)
    )
    return [(r[0], r[1], state_of(r[2], r[3])) for r in session.execute(stmt)]
