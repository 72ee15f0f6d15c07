"""Liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api_shim.outage import RETRY_AFTER_S

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """The database and the broker are reachable (503 naming what is not)."""
    checks: dict[str, str] = {}
    try:
        with request.app.state.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        with request.app.state.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", **checks},
        200 if ready else 503,
        headers=None if ready else {"Retry-After": str(RETRY_AFTER_S)},
    )


@router.get("/metrics", include_in_schema=False)
@router.get("/metrics/", include_in_schema=False)  # scrape configs written for the old mount
def metrics() -> Response:
    """The process's Prometheus metrics, at /metrics itself (a mounted app answered it with a 307
    to /metrics/, whose Location came from the Host header)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
