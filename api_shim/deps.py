"""Request dependencies: a database session per request, the calling tenant, the broker."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BeforeValidator, WithJsonSchema
from sqlalchemy.orm import Session, sessionmaker

from api_shim.coalesce import Coalescer
from db import repo
from db.tables import Tenant
from medbatch.settings import Settings
from models.cases.registry import MODEL_NAME, MODEL_VERSION, Registry


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_sessions(request: Request) -> sessionmaker[Session]:
    """The app's sessionmaker, for work that commits in steps of its own."""
    return request.app.state.sessions


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def get_coalescer(request: Request) -> Coalescer:
    return request.app.state.coalescer


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
CoalescerDep = Annotated[Coalescer, Depends(get_coalescer)]

_bearer = HTTPBearer(auto_error=False, description="the tenant's API key")


def get_caller(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> repo.Caller:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        caller = repo.authenticate(session, api_key=credentials.credentials)
    except repo.KeyRejected as exc:
        # For the audit trail: an expired or revoked key is still its tenant's and client's.
        request.state.refused_key = exc
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            exc.reason,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        ) from None
    # For the audit trail (api_shim/audit.py), which runs around the route.
    request.state.caller = caller
    return caller


CallerDep = Annotated[repo.Caller, Depends(get_caller)]


def get_tenant(caller: CallerDep) -> Tenant:
    """Any authenticated caller's tenant (routes that need no particular scope)."""
    return caller.tenant


def require(scope: str) -> Callable[[repo.Caller], Tenant]:
    """A dependency: the caller's tenant, if the caller holds ``scope`` (else 403)."""

    def check(caller: CallerDep) -> Tenant:
        if scope not in caller.scopes:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"this API client lacks the scope {scope!r}"
            )
        return caller.tenant

    return check


TenantDep = Annotated[Tenant, Depends(get_tenant)]
SubmitterDep = Annotated[Tenant, Depends(require("cases:submit"))]
ReaderDep = Annotated[Tenant, Depends(require("results:read"))]


#: A model reference: ``name`` or ``name@version`` (the registry's names are of this shape).
MODEL_REF = rf"^{MODEL_NAME}(@{MODEL_VERSION})?$"
#: A FHIR search's ``subject``: a reference to a Patient by its id.
SUBJECT = r"^Patient/[A-Za-z0-9\-.]{1,64}$"
#: Free text that a database column stores: no control characters (PostgreSQL refuses NUL).
TEXT = r"^[^\x00-\x1f\x7f]*$"
#: The same, without whitespace at either end (identifiers).
TRIMMED_TEXT = r"^[^\s\x00-\x1f\x7f]([^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?$"

#: Ids are 64-bit columns: a larger one is refused (422) instead of reaching the database.
MAX_ID = 2**63 - 1
#: A record's id in a path.
IdPath = Annotated[int, PathParam(ge=1, le=MAX_ID, description="an id this API gave out")]
#: A page's cursor (0: the first page).
CursorQuery = Annotated[int, Query(ge=0, le=MAX_ID, description="`next_cursor` of the last page")]

_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


def _rfc3339(value: object) -> object:
    """Only RFC 3339 date-times with an offset (no bare dates, no Unix seconds, no naive times)."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("expected an RFC 3339 date-time with an offset, e.g. 2026-11-23T00:00:00Z")
    # RFC 3339 lets "T" and "Z" be lower case (section 5.6); Python's parser takes upper only.
    value = value.upper()
    try:
        # Python keeps microseconds: a longer fraction is cut to six digits.
        head, dot, tail = value.partition(".")
        if dot:
            digits = len(tail) - len(tail.lstrip("0123456789"))
            value = f"{head}.{tail[: min(digits, 6)].ljust(6, '0')}{tail[digits:]}"
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            "not a calendar date-time (month 1-12, day of that month, hour 0-23)"
        ) from None


#: A moment with its offset, as RFC 3339 writes it.
Moment = Annotated[
    datetime,
    BeforeValidator(_rfc3339),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


def to_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; one whose UTC time falls outside years 1..9999 (``0001-01-01T00:00+01:00``)
    is clamped to the first or last representable moment, which every comparison treats alike."""
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        edge = datetime.min if moment.year == 1 else datetime.max
        return edge.replace(tzinfo=UTC)


def exactly_one(a: str, b: str) -> dict[str, Any]:
    """JSON Schema for "give exactly one of the properties ``a`` and ``b``"."""
    return {
        "oneOf": [
            {"required": [a], "not": {"required": [b]}},
            {"required": [b], "not": {"required": [a]}},
        ]
    }
