"""``Idempotency-Key`` on every POST (IETF httpapi draft "The Idempotency-Key HTTP Header Field").

A client that retries a POST with the same key gets the first response again and creates nothing
new; the same key with a different request is 422; a retry while the first is still running is
409. Keys are scoped per API client (the key it authenticates with) and kept ``retention`` (at least 24 hours). A first request that
fails on our side (5xx) releases its key, so the retry runs.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

import anyio
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_shim.errors import FHIR_JSON, SafeJSONResponse, fhir_issue, outcome_body
from db import idempotency, repo

HEADER = b"idempotency-key"


class Idempotency:
    def __init__(
        self, app: ASGIApp, *, sessions: sessionmaker[Session], retention: timedelta
    ) -> None:
        self.app = app
        self.sessions = sessions
        self.retention = retention

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", ())) if scope["type"] == "http" else {}
        raw_key = headers.get(HEADER)
        if scope["type"] != "http" or scope["method"] != "POST" or raw_key is None:
            await self.app(scope, receive, send)
            return
        if sum(1 for name, _ in scope.get("headers", ()) if name == HEADER) > 1:
            # Which of two keys a retry would match is anyone's guess: refuse, as a repeated
            # query parameter is.
            await _json(scope, send, 400, "Idempotency-Key given more than once")
            return
        key = raw_key.decode("latin-1")
        if not 1 <= len(key) <= 255 or not all(33 <= ord(c) <= 126 for c in key):
            await _json(
                scope, send, 400, "Idempotency-Key must be 1 to 255 visible ASCII characters"
            )
            return
        caller = await anyio.to_thread.run_sync(self._caller, headers.get(b"authorization"))
        if caller is None:  # the route answers 401
            await self.app(scope, receive, send)
            return
        found_caller, client = caller
        tenant_id = found_caller.tenant_id
        # For the audit row of an answer given here, without the route (api_shim/audit.py).
        scope.setdefault("state", {})["idempotency_caller"] = found_caller
        body = await _read_body(receive)
        digest = hashlib.sha256()
        for part in (scope["method"], scope["path"], scope.get("query_string", b"").decode()):
            digest.update(part.encode() + b"\0")
        digest.update(body)
        found = await anyio.to_thread.run_sync(
            self._claim, tenant_id, client, key, digest.hexdigest()
        )
        if found.state == "mismatch":
            await _json(scope, send, 422, "this Idempotency-Key was used with a different request")
            return
        if found.state == "processing":
            await _json(
                scope, send, 409, "a request with this Idempotency-Key is still being processed"
            )
            return
        if found.state == "done":
            await _replay(send, found)
            return
        await self._run(scope, body, send, client, key)

    async def _run(self, scope: Scope, body: bytes, send: Send, client: str, key: str) -> None:
        sent = False
        status, content_type, chunks = 500, "application/json", []

        async def replay_receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def capture(message: Message) -> None:
            nonlocal status, content_type
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type":
                        content_type = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay_receive, capture)
        except BaseException:
            await anyio.to_thread.run_sync(self._release, client, key)
            raise
        if status >= 500:
            await anyio.to_thread.run_sync(self._release, client, key)
        else:
            await anyio.to_thread.run_sync(
                self._record, client, key, status, b"".join(chunks), content_type
            )

    def _caller(self, authorization: bytes | None) -> tuple[repo.Caller, str] | None:
        """(the caller, the API key's sha256): keys are scoped per API client."""
        if authorization is None:
            return None
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        with self.sessions() as session:
            caller = repo.caller_for_key(session, api_key=token.strip())
            if caller is None:
                return None
            return caller, repo.hash_api_key(token.strip())

    def _claim(self, tenant_id: int, client: str, key: str, fingerprint: str) -> idempotency.Claim:
        with self.sessions() as session:
            return idempotency.claim(
                session,
                tenant_id=tenant_id,
                client=client,
                key=key,
                fingerprint=fingerprint,
                retention=self.retention,
            )

    def _record(self, client: str, key: str, status: int, body: bytes, ctype: str) -> None:
        with self.sessions() as session:
            idempotency.record(
                session, client=client, key=key, status=status, body=body, content_type=ctype
            )

    def _release(self, client: str, key: str) -> None:
        with self.sessions() as session:
            idempotency.release(session, client=client, key=key)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _json(scope: Scope, send: Send, status: int, detail: str) -> None:
    """``{"detail": ...}``, or an OperationOutcome on a FHIR route."""
    if scope["path"].startswith("/v1/fhir"):
        code = {409: "conflict", 422: "business-rule"}.get(status, "invalid")
        response: JSONResponse = SafeJSONResponse(
            outcome_body([fhir_issue(code, detail, "Idempotency-Key")], 1),
            status,
            media_type=FHIR_JSON,
        )
    else:
        response = SafeJSONResponse({"detail": detail}, status)
    await response({"type": "http"}, _disconnected, send)


async def _replay(send: Send, found: idempotency.Claim) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": found.status,
            "headers": [
                (b"content-type", (found.content_type or "application/json").encode("latin-1")),
                (b"content-length", str(len(found.body or b"")).encode()),
                (b"idempotent-replayed", b"true"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": found.body or b""})


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}
