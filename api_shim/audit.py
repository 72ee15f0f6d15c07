"""The audit trail: every request under /v1, allowed or denied, becomes one ``audit_events`` row.

Who (tenant, API client and key, from the key the route checked), what (method and route
template), which record (path parameters: internal ids; and what a route says it answered for,
such as a FHIR search's ``subject``), when, and the outcome.

It fails closed: the row is committed when the route has decided its answer and before the first
byte of it leaves (the ASGI ``http.response.start`` message is held back until then). If the row
cannot be written, the client gets 503 and none of the answer: no data is released unaudited.
The key's ``last_used_at`` is touched in the same transaction.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl

import anyio
from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_shim.deps import SUBJECT
from api_shim.errors import error_response, problem
from db import repo

log = logging.getLogger(__name__)

#: ``request.state`` key where a route names what it answered for (``{"subject": ...}``).
STATE_KEY = "audit_resource"


def outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "denied"
    if status == 404:
        return "not_found"
    return "invalid" if status < 500 else "error"


def record_resource(request_state: Any, **what: str) -> None:
    """Name, for the audit row, what this request answers for (call it from the route)."""
    found = getattr(request_state, STATE_KEY, None) or {}
    found.update(what)
    setattr(request_state, STATE_KEY, found)


class AuditTrail:
    def __init__(self, app: ASGIApp, *, sessions: sessionmaker[Session]) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        recorded = False
        withheld = False

        async def audited_send(message: Message) -> None:
            nonlocal recorded, withheld
            if message["type"] == "http.response.start":
                recorded = True
                written = await anyio.to_thread.run_sync(self._record, scope, message["status"])
                if not written:
                    withheld = True
                    await _unavailable(scope, send)
                    return
            if withheld:
                return
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except BaseException:
            if not recorded:
                await anyio.to_thread.run_sync(self._record, scope, 500)
            raise

    def _record(self, scope: Scope, status: int) -> bool:
        """Write the row; False if it could not be written."""
        state = scope.get("state", {})
        # The route's caller, or, for an answer the idempotency ledger gave without the route
        # (a replay, a mismatch), the caller it found for the same key.
        caller = state.get("caller") or state.get("idempotency_caller")
        # A refused key (expired, revoked) names its holder, but is not recorded as used.
        who = caller or state.get("refused_key")
        route, path_params = _routed(scope)
        template = getattr(route, "path", None) or "unmatched"
        # A path's text is the caller's: 200 characters of it are enough to name a record.
        params = {k: _as_id(k, str(v))[:200] for k, v in dict(path_params).items()}
        answered = state.get(STATE_KEY)
        if answered:
            params.update(answered)
        else:
            # Not answered (refused before the route ran): the patient asked for, if any. The
            # guard refuses repeated parameters, so there is one value to name. A value that is
            # no Patient reference is not named: it is the caller's text (an MRN sent as
            # subject=12345), which the audit trail never holds. ``patient`` is the same search
            # (R4 RiskAssessment), named as its answer would name it: ``subject=``.
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            named = [query[p] for p in _SUBJECTS if re.fullmatch(SUBJECT, query.get(p, ""))]
            if named:
                params["subject"] = ",".join(named)
        params = {k: _exact(v) for k, v in params.items()}
        action = f"{scope['method']} {template}"[:100]
        log.info("%s %d", action, status)
        try:
            with self.sessions() as session:
                if who is None and (key := _bearer_key(scope)) is not None:
                    # Refused before any route looked at the key (the input gate, an unknown
                    # route or method): still the key's holder's request.
                    who = repo.key_holder(session, api_key=key)
                repo.add_audit_event(
                    session,
                    tenant_id=getattr(who, "tenant_id", None),
                    client_id=getattr(who, "client_id", None),
                    action=action,
                    resource=",".join(f"{k}={v}" for k, v in sorted(params.items())),
                    status=status,
                    outcome=outcome(status),
                )
                if caller is not None and caller.key_id is not None:
                    repo.touch_api_key(session, key_id=caller.key_id)
                session.commit()
        except Exception as exc:
            log.error("audit event not written, answer withheld: %s", type(exc).__name__)
            return False
        return True


def template_of(scope: Scope) -> str:
    """The route template a request went to (``GET /v1/cases/{case_id}``), for logs: its path
    may hold whatever the caller put there."""
    route, _ = _routed(scope)
    return f"{scope['method']} {getattr(route, 'path', None) or 'unmatched'}"


def _routed(scope: Scope) -> tuple[Any, dict[str, Any]]:
    """The route that answered (or would have answered) a request, and its path parameters."""
    route, path_params = scope.get("route"), scope.get("path_params", {})
    if route is None:  # answered before routing (input gate, idempotency ledger)
        route, path_params = _route_of(scope)
    return route, path_params


def _route_of(scope: Scope) -> tuple[Any, dict[str, Any]]:
    """The route (and its path parameters) that would have answered a request that was
    answered before the router ran; (None, {}) if none matches fully."""
    router = getattr(scope.get("app"), "router", None)
    for route in _leaves(getattr(router, "routes", ())):
        match, child = route.matches(scope)
        if match is Match.FULL:
            return route, dict(child.get("path_params", {}))
    return None, {}


def _leaves(routes: Iterable[Any]) -> Iterator[Any]:
    """The routes of a router, those of routers included in it in their place (FastAPI keeps an
    included router whole, as ``original_router``)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaves(inner.routes)
        else:
            yield route


#: The query parameters that name the patient a FHIR search is for, in the order they are named.
_SUBJECTS = ("subject", "patient")

#: What an id in a path is when a route accepts it: a record's number, or an evaluation's hex.
_ID = re.compile(r"[0-9]{1,19}|[0-9a-f]{32}", re.ASCII)


def _as_id(name: str, value: str) -> str:
    """An ``*_id`` path parameter as it came if it is an id; ``*`` if the route refused it for
    not being one (it is the caller's text then: an external id or MRN sent in its place)."""
    return value if not name.endswith("_id") or _ID.fullmatch(value) else "*"


def _bearer_key(scope: Scope) -> str | None:
    """The key of the request's one ``Authorization: Bearer`` header, if it has one."""
    given = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
    if len(given) != 1:
        return None
    scheme, _, key = given[0].decode("latin-1").partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def _exact(value: str) -> str:
    """The value as it came, with unprintable characters (a NUL in a path) written as escapes."""
    return value if value.isprintable() else value.encode("unicode_escape").decode("ascii")


async def _unavailable(scope: Scope, send: Send) -> None:
    response = error_response(
        scope["path"],
        503,
        [
            problem(
                (), "the audit trail cannot be written; nothing was released, try again", "audit"
            )
        ],
        limit=1,
    )
    await response(scope, _disconnected, send)


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}
