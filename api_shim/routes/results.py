"""Result queries: one case with its scores, and a paginated list of results."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError

from api_shim.deps import (
    MODEL_REF,
    CeleryDep,
    CursorQuery,
    IdPath,
    Moment,
    ReaderDep,
    SessionDep,
    SettingsDep,
    to_utc,
)
from api_shim.schemas import CasePublic, ResultPublic, ResultsPublic, ScorePublic
from db import explanations, repo
from db.tables import Case, CaseStatus

router = APIRouter(prefix="/v1", tags=["results"])
log = logging.getLogger(__name__)


#: The columns of a case that a case and a result both show as they are.
_SHOWN = ("external_id", "model_version", "status", "last_error", "updated_at")


def _shown(case: Case) -> dict[str, Any]:
    """What a case and a result both show of the case (and its model, by its API name)."""
    return {"model": case.model_name} | {name: getattr(case, name) for name in _SHOWN}


@router.get("/cases/{case_id}", response_model=CasePublic, responses={404: {}})
def read_case(
    case_id: IdPath, tenant: ReaderDep, session: SessionDep, celery: CeleryDep
) -> CasePublic:
    """One case: its status, delivery count, last error and scores."""
    found = explanations.case_with_state(session, tenant_id=tenant.id, case_id=case_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no case with this id for this tenant")
    case, explained = found
    from worker.heartbeat import waiting_detail
    from worker.queues import EXPLAIN_QUEUE, queue_for

    detail = None
    if case.status == CaseStatus.queued:
        detail = waiting_detail(celery, queue_for(case.priority))
    elif explained is not None and explained.status == "pending":
        # Workers started for the scoring queues only (--queues score.stat,...) leave every
        # explanation pending, with nothing else to say why.
        detail = waiting_detail(celery, EXPLAIN_QUEUE)
    return CasePublic(
        id=case.id,
        **_shown(case),
        priority=case.priority,
        delivery_count=case.delivery_count,
        created_at=case.created_at,
        scores=[
            ScorePublic.model_validate(s, from_attributes=True) for s in case.scores if not s.shadow
        ],
        detail=detail,
        explanation_status=explained.status if explained else None,
        explanation_error=explained.error if explained else None,
        fhir=case.context,
    )


@router.get("/scores", response_model=ResultsPublic)
def list_scores(
    tenant: ReaderDep,
    session: SessionDep,
    settings: SettingsDep,
    model: Annotated[
        str | None,
        Query(
            description="`name` or `name@version`", min_length=1, max_length=160, pattern=MODEL_REF
        ),
    ] = None,
    status_: Annotated[CaseStatus | None, Query(alias="status")] = None,
    since: Annotated[
        Moment | None,
        Query(
            description="cases updated at or after (RFC 3339, with offset): a poll's `next_since`"
        ),
    ] = None,
    until: Annotated[
        Moment | None,
        Query(
            description="cases updated before (RFC 3339, with offset): the last page's "
            "`next_since`, when following `next_cursor`"
        ),
    ] = None,
    limit: Annotated[
        int, Query(ge=1, description="page size, at most MEDBATCH_MAX_PAGE_SIZE (500)")
    ] = 100,
    # The last page's last case id (the cursor was base64 JSON before; any string of digits that
    # fits a 64-bit id is a valid cursor now, so the schema can say which cursors are accepted).
    cursor: CursorQuery = 0,
) -> ResultsPublic:
    """Results of this tenant's cases in case id order; follow `next_cursor` for the next page,
    then poll again with `since` set to the last page's `next_since`."""
    if limit > settings.max_page_size:
        raise RequestValidationError(
            [
                {
                    "type": "less_than_equal",
                    "loc": ("query", "limit"),
                    "msg": f"limit must be at most {settings.max_page_size}",
                }
            ]
        )
    since_utc = None if since is None else to_utc(since)
    until_utc = None if until is None else to_utc(until)
    # Taken before the rows are read (PostgreSQL's read committed: each statement sees every
    # commit made before it started), so every case stamped before it is among them.
    watermark = repo.poll_watermark(session, margin=timedelta(seconds=settings.poll_clock_margin_s))
    if watermark is None:
        log.warning(
            "GET /v1/scores: next_since does not advance: sessions of other database roles are "
            "hidden from this one in pg_stat_activity (grant it pg_read_all_stats)"
        )
    rows = explanations.results_with_states(
        session,
        tenant_id=tenant.id,
        model=model,
        status=status_,
        since=since_utc,
        until=until_utc,
        after_id=cursor,
        limit=limit,
    )
    items = [
        ResultPublic(
            case_id=case.id,
            **_shown(case),
            score=score.score if score else None,
            label=score.label if score else None,
            model_sha256=score.model_sha256 if score else None,
            explanation_status=e.status if e else None,
            explanation=score.explanation if score and e and e.status == "done" else None,
            explanation_error=e.error if e else None,
        )
        for case, score, e in rows
    ]
    next_cursor = str(rows[-1][0].id) if len(rows) == limit else None
    return ResultsPublic(
        items=items,
        next_cursor=next_cursor,
        next_since=_next_since(watermark, since=since_utc, until=until_utc),
    )


def _next_since(
    watermark: datetime | None, *, since: datetime | None, until: datetime | None
) -> datetime:
    """The watermark, no later than ``until`` (this poll's earlier pages were read before it) and
    no earlier than ``since`` (a client's cursor never moves back); the client's own ``since``
    (nothing read is given up) when the watermark is unknown."""
    floor = since or datetime.min.replace(tzinfo=UTC)
    if watermark is None:
        return floor
    return max(floor, watermark if until is None else min(watermark, until))
