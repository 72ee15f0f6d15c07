"""A dependency that is down is a 503, not a 500: ``Retry-After`` and a JSON body that names it.

Wrapped around the whole app (middleware included: the API-key lookup, the audit trail and the
Idempotency-Key store all read the database), so whichever layer meets the outage first, the
client gets an answer it can act on: try again after ``Retry-After`` seconds. FHIR routes answer
with an OperationOutcome (issue code ``transient``). Data errors are not outages and are not
turned into 503s (db/engine.py ``is_outage``).
"""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_shim.audit import template_of
from api_shim.errors import FHIR_JSON, SafeJSONResponse, fhir_issue, outcome_body
from db.engine import is_outage

log = logging.getLogger(__name__)

#: Seconds a client should wait before trying again.
RETRY_AFTER_S = 5


def unavailable_dependency(exc: BaseException) -> str | None:
    """``"database"`` or ``"broker"`` if ``exc`` means that dependency is unreachable."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, KombuOperationalError | RedisConnectionError | RedisTimeoutError):
            return "broker"
        if is_outage(current):
            return "database"
        current = current.__cause__ or current.__context__
    return None


def unavailable(path: str, dependency: str) -> JSONResponse:
    """The 503 answer for a request to ``path`` while ``dependency`` is down."""
    detail = f"the {dependency} is unreachable; nothing was lost, try again later"
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    if path.startswith("/v1/fhir"):
        body = outcome_body([fhir_issue("transient", detail)], 1)
        return SafeJSONResponse(body, 503, media_type=FHIR_JSON, headers=headers)
    return JSONResponse(
        {"detail": detail, "unavailable": dependency}, status_code=503, headers=headers
    )


class OutageAs503:
    """Answer 503 for any request that failed because the database or the broker is down."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            dependency = unavailable_dependency(exc)
            if dependency is None or started:
                raise
            # By route template: the path holds what the caller put there (an MRN in place of
            # an id), the query string may name a patient.
            log.warning(
                "%s: 503, %s unreachable (%s)",
                template_of(scope),
                dependency,
                type(exc).__name__,
            )
            await unavailable(scope["path"], dependency)(scope, receive, send)
