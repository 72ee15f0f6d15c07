"""Result queries: one case with its scores, and a paginated list of results."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError

from api_shim.deps import ReaderDep, SessionDep, SettingsDep
from api_shim.schemas import CasePublic, ResultPublic, ResultsPublic, ScorePublic
from db import repo
from db.tables import CaseStatus

router = APIRouter(prefix="/v1", tags=["results"])


@router.get("/cases/{case_id}", response_model=CasePublic, responses={404: {}})
def read_case(case_id: int, tenant: ReaderDep, session: SessionDep) -> CasePublic:
    """One case: its status, delivery count, last error and scores."""
    case = repo.get_case(session, tenant_id=tenant.id, case_id=case_id)
    if case is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"case {case_id} not found")
    return CasePublic(
        id=case.id,
        external_id=case.external_id,
        model=case.model_name,
        model_version=case.model_version,
        priority=case.priority,
        status=case.status,
        delivery_count=case.delivery_count,
        last_error=case.last_error,
        created_at=case.created_at,
        updated_at=case.updated_at,
        scores=[
            ScorePublic(
                model=s.model_name,
                model_version=s.model_version,
                model_sha256=s.model_sha256,
                score=s.score,
                label=s.label,
                created_at=s.created_at,
                explanation=s.explanation,
            )
            for s in case.scores
            if not s.shadow
        ],
        fhir=case.context,
    )


def encode_cursor(after_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after_id}).encode()).decode()


def decode_cursor(cursor: str) -> int:
    try:
        after = json.loads(base64.urlsafe_b64decode(cursor.encode()))["after"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        after = None
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("query", "cursor"),
                    "msg": "not a cursor from next_cursor",
                }
            ]
        )
    return after


@router.get("/scores", response_model=ResultsPublic)
def list_scores(
    tenant: ReaderDep,
    session: SessionDep,
    settings: SettingsDep,
    model: Annotated[str | None, Query(description="`name` or `name@version`")] = None,
    status_: Annotated[CaseStatus | None, Query(alias="status")] = None,
    since: Annotated[
        datetime | None, Query(description="cases updated at or after (ISO 8601)")
    ] = None,
    limit: Annotated[int, Query(ge=1)] = 100,
    cursor: str | None = None,
) -> ResultsPublic:
    """Results of this tenant's cases in case id order; follow `next_cursor` for the next page."""
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
    if since is not None and since.tzinfo is None:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("query", "since"),
                    "msg": "give a timezone, e.g. 2026-11-23T00:00:00Z",
                }
            ]
        )
    after = decode_cursor(cursor) if cursor else 0
    rows = repo.list_results(
        session,
        tenant_id=tenant.id,
        model=model,
        status=status_,
        since=since,
        after_id=after,
        limit=limit,
    )
    items = [
        ResultPublic(
            case_id=case.id,
            external_id=case.external_id,
            model=case.model_name,
            model_version=case.model_version,
            status=case.status,
            score=score.score if score else None,
            label=score.label if score else None,
            model_sha256=score.model_sha256 if score else None,
            last_error=case.last_error,
            updated_at=case.updated_at,
        )
        for case, score in rows
    ]
    next_cursor = encode_cursor(rows[-1][0].id) if len(rows) == limit else None
    return ResultsPublic(items=items, next_cursor=next_cursor)
