"""The audit trail: every request under /v1, allowed or denied, becomes one ``audit_events`` row.

Who (tenant and API client, from the key the route checked), what (method and route template),
which record (path parameters: internal ids; for a FHIR search, its ``subject``), when,
and the outcome. Written after the response, in a thread; a failure to write is logged (without
the request's content) and does not turn an answered request into an error.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs

import anyio
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db import repo

log = logging.getLogger(__name__)


def outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "denied"
    if status == 404:
        return "not_found"
    return "invalid" if status < 500 else "error"


class AuditTrail:
    def __init__(self, app: ASGIApp, *, sessions: sessionmaker[Session]) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            await anyio.to_thread.run_sync(self._record, scope, status)

    def _record(self, scope: Scope, status: int) -> None:
        state = scope.get("state", {})
        caller = state.get("caller")
        tenant_id = caller.tenant_id if caller is not None else state.get("idempotency_tenant_id")
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        params = dict(scope.get("path_params", {}))
        # A FHIR search names its patient in the query: the audit trail (not the log) keeps it.
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "subject" in query:
            params["subject"] = query["subject"][0]
        action = f"{scope['method']} {template}"[:100]
        log.info("%s %d", action, status)
        try:
            with self.sessions() as session:
                repo.add_audit_event(
                    session,
                    tenant_id=tenant_id,
                    client_id=None if caller is None else caller.client_id,
                    action=action,
                    resource=",".join(f"{k}={v}" for k, v in sorted(params.items()))[:200],
                    status=status,
                    outcome=outcome(status),
                )
                session.commit()
        except Exception as exc:
            log.error("audit event not written: %s", type(exc).__name__)
