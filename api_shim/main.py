"""The FastAPI app: submission, result queries, health and metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from functools import partial

from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from api_shim.audit import AuditTrail
from api_shim.coalesce import Coalescer
from api_shim.errors import FHIR_JSON, SafeJSONResponse, error_response, fhir_issue, outcome_body
from api_shim.guard import InputGuard
from api_shim.idempotency import Idempotency
from api_shim.openapi import openapi_document
from api_shim.outage import OutageAs503
from api_shim.query import known_query_only
from api_shim.routes import cases, compounds, fhir, genome, health, models, plots, results
from db.engine import make_engine, make_sessionmaker
from medbatch.settings import Settings
from models.cases.registry import load_registry
from worker.app import create_app as create_celery

_FHIR_CODES = {
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
}


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FHIR routes answer errors with an OperationOutcome; the others as FastAPI does."""
    if not request.url.path.startswith("/v1/fhir"):
        if exc.status_code in (204, 304):
            return await http_exception_handler(request, exc)
        return SafeJSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    code = _FHIR_CODES.get(exc.status_code, "processing")
    body = outcome_body([fhir_issue(code, detail, getattr(exc, "expression", ""))], 1)
    return SafeJSONResponse(body, exc.status_code, media_type=FHIR_JSON, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    # Name the field and the rule; never echo the input back (it may be patient data, or NaN,
    # which JSON cannot carry); at most max_problems of them, with the count of all.
    settings: Settings = request.app.state.settings
    status = 400 if request.url.path.startswith("/v1/fhir") else 422
    return error_response(
        request.url.path, status, list(exc.errors()), limit=settings.max_reported_problems
    )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.coalescer.stop()
    app.state.celery.close()
    app.state.engine.dispose()


def create_app(settings: Settings, *, broker_url: str | None = None) -> FastAPI:
    app = FastAPI(
        # No 307 from /path/ to /path: its Location came from the Host header, with the scheme
        # the app sees (http behind a TLS proxy), and a client following it re-sent a POSTed
        # Bundle there. A path with a trailing slash is its own route or a 404.
        redirect_slashes=False,
        lifespan=_lifespan,
        default_response_class=SafeJSONResponse,
        title="medbatch",
        version="0.1.0",
        summary="Batch scoring of patient cases by PyTorch models, through Celery and SQL.",
        # A query parameter the route does not take is refused, not ignored (api_shim/query.py).
        dependencies=[Depends(known_query_only)],
    )
    engine = make_engine(settings.database_url)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.state.registry = load_registry(settings.artifact_dir)
    app.state.celery = create_celery(settings, broker_url=broker_url, include_tasks=False)
    app.state.coalescer = Coalescer(
        app.state.celery,
        app.state.sessions,
        per_message=settings.cases_per_message,
        window_ms=settings.coalesce_ms,
    )
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.include_router(cases.router)
    app.include_router(results.router)
    app.include_router(models.router)
    app.include_router(genome.router)
    app.include_router(compounds.router)
    app.include_router(fhir.router)
    app.include_router(health.router)
    app.include_router(plots.router)
    app.add_middleware(
        Idempotency,
        sessions=app.state.sessions,
        retention=timedelta(hours=settings.idempotency_retention_h),
    )
    # Around Idempotency: a body over the limit, too deep or unstorable is refused before
    # anything parses or stores it.
    app.add_middleware(
        InputGuard,
        max_bytes=settings.max_body_bytes,
        max_depth=settings.max_json_depth,
        max_problems=settings.max_reported_problems,
    )
    # Outermost but one: every answer, refusals included, is audited before it leaves.
    app.add_middleware(AuditTrail, sessions=app.state.sessions)
    app.openapi = partial(openapi_document, app, settings)  # type: ignore[method-assign]
    # Outermost: a database or broker outage met anywhere inside is a 503 (api_shim/outage.py).
    app.add_middleware(OutageAs503)
    return app
