"""The FastAPI app: submission, result queries, health and metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import make_asgi_app
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_shim.audit import AuditTrail
from api_shim.idempotency import Idempotency
from api_shim.outage import OutageAs503
from api_shim.routes import cases, compounds, fhir, genome, health, models, results
from db.engine import make_engine, make_sessionmaker
from medbatch.settings import Settings
from models.registry import load_registry
from worker.app import create_app as create_celery


class BodySizeLimit:
    """Refuse bodies over ``max_bytes`` with 413 before anything parses them."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._too_large(send)

    async def _too_large(self, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body over {self.max_bytes} bytes; split the submission"}, 413
        )
        await response({"type": "http"}, _empty_receive, send)


class _TooLarge(Exception):
    pass


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}


_FHIR_CODES = {401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported"}


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FHIR routes answer errors with an OperationOutcome; the others as FastAPI does."""
    if not request.url.path.startswith("/v1/fhir"):
        return await http_exception_handler(request, exc)
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    code = _FHIR_CODES.get(exc.status_code, "processing")
    return fhir.outcome(exc.status_code, [fhir.issue(code, detail)], headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    if request.url.path.startswith("/v1/fhir"):
        return fhir.outcome(
            400,
            [
                fhir.issue("invalid", str(e.get("msg")), ".".join(map(str, e.get("loc", ()))))
                for e in exc.errors()
            ],
        )
    # Name the field and the problem; never echo the input back (it may be patient data, or NaN,
    # which JSON cannot carry).
    detail: list[dict[str, Any]] = [
        {"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")}
        for e in exc.errors()
    ]
    return JSONResponse({"detail": jsonable_encoder(detail)}, status_code=422)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.celery.close()
    app.state.engine.dispose()


def create_app(settings: Settings, *, broker_url: str | None = None) -> FastAPI:
    app = FastAPI(
        lifespan=_lifespan,
        title="medbatch",
        version="0.1.0",
        summary="Batch scoring of patient cases by PyTorch models, through Celery and SQL.",
    )
    engine = make_engine(settings.database_url)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.state.registry = load_registry(settings.artifact_dir)
    app.state.celery = create_celery(settings, broker_url=broker_url, include_tasks=False)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.include_router(cases.router)
    app.include_router(results.router)
    app.include_router(models.router)
    app.include_router(genome.router)
    app.include_router(compounds.router)
    app.include_router(fhir.router)
    app.include_router(health.router)
    app.mount("/metrics", make_asgi_app())
    app.add_middleware(
        Idempotency,
        sessions=app.state.sessions,
        retention=timedelta(hours=settings.idempotency_retention_h),
    )
    # Around Idempotency, so replayed and refused retries are audited too.
    app.add_middleware(AuditTrail, sessions=app.state.sessions)
    # Outermost but one: a body over the limit is refused before anything reads it.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Outermost: a database or broker outage met anywhere inside is a 503 (api_shim/outage.py).
    app.add_middleware(OutageAs503)
    return app
