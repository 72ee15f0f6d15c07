"""What the routes of every tiled job kind share: the submission's dependencies and its 202, the
tenant's job or a 404, a refused submission as a 422 that names its field, cursor pages of results
(worker/tiled.py holds the rest of the framework)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from celery import Celery
from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from api_shim.deps import (
    CeleryDep,
    IdPath,
    ReaderDep,
    SessionDep,
    SessionsDep,
    SettingsDep,
    require,
)
from api_shim.paths import Kind, confine, without_server_paths
from db import tiles
from db.tables import Tenant, TiledJob
from medbatch.settings import Settings

if TYPE_CHECKING:
    from worker.tiled import Submitter

J = TypeVar("J", bound=TiledJob)


@dataclass(frozen=True)
class Submission:
    """What a job submission needs besides its body: the settings, where to record it, where to
    send its tiles, and whose job it is."""

    settings: Settings
    #: The request's tenant, sessions, broker and artifact store.
    submitter: Submitter


def confine_inputs(
    root: Path, given: dict[str, str | None], *, kind: Kind
) -> dict[str, Path | None]:
    """The caller's input names as paths inside ``root`` (None stays None), or a 422 naming one."""
    return {
        name: None if v is None else confine(root, v, name, kind=kind) for name, v in given.items()
    }


def submission(scope: str) -> Callable[..., Submission]:
    """A dependency: a job submission by a caller that holds ``scope`` (else 403)."""

    def dependency(
        settings: SettingsDep,
        sessions: SessionsDep,
        celery: CeleryDep,
        tenant: Tenant = Depends(require(scope)),
    ) -> Submission:
        from worker.tiled import Submitter

        return Submission(settings, Submitter(tenant.id, sessions, celery, settings.artifact_dir))

    return dependency


def submit_route(router: APIRouter, path: str, model: type[BaseModel]) -> Callable[..., Any]:
    """The POST that records a job and queues its tiles: 202 with the job, as ``model``."""
    return router.post(path, response_model=model, status_code=status.HTTP_202_ACCEPTED)


def read_route(router: APIRouter, path: str, model: type[BaseModel]) -> Callable[..., Any]:
    """A GET of one of the tenant's jobs (or of its results), as ``model``; 404 if it has none."""
    return router.get(path, response_model=model, responses={404: {}})


class TiledJobPublic(BaseModel):
    """What every tiled job shows: its status and progress (tiles done of total)."""

    id: int
    status: str
    tiles_total: int
    tiles_done: int
    error: str | None
    plots: list[str] = Field(
        default_factory=list, description="links to pictures of the result, once it is done"
    )
    detail: str | None = Field(
        default=None,
        description="why a job still waits, e.g. that no live worker listens on its queue",
    )
    created_at: datetime
    finished_at: datetime | None


def owned_or_404(session: Session, table: type[J], *, job_id: int, tenant_id: int, what: str) -> J:
    """The tenant's job; another tenant's is as good as absent (404, never 403)."""
    job = tiles.get_job(session, table, job_id=job_id, tenant_id=tenant_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {what} with this id for this tenant")
    return job


def owned(table: type[J], what: str) -> Callable[..., J]:
    """A dependency: the ``{job_id}`` of the path, the reading tenant's job of ``table`` or 404."""

    def dependency(job_id: IdPath, tenant: ReaderDep, session: SessionDep) -> J:
        return owned_or_404(session, table, job_id=job_id, tenant_id=tenant.id, what=what)

    return dependency


@dataclass(frozen=True)
class Results:
    """A kind's result rows as the API pages them: its job table (``what`` it is called in a
    404), the kind's query of a page (db/), and the model of a row."""

    table: type[TiledJob]
    what: str
    query: Callable[..., Sequence[Any]]
    item: type[BaseModel]


@dataclass(frozen=True)
class JobReader:
    """A read of one job by a tenant, its lookup left to the route: it runs after the route's own
    query parameters are validated (a bad cursor is a 422 before an unknown job is a 404)."""

    job_id: int
    tenant_id: int
    session: Session

    def owned(self, table: type[J], what: str) -> J:
        return owned_or_404(
            self.session, table, job_id=self.job_id, tenant_id=self.tenant_id, what=what
        )

    def page(self, results: Results, cursor: int, limit: int, **filters: Any) -> dict[str, Any]:
        """A page of the job's ``results`` after ``cursor`` (``filters``: the kind's own), with
        the next cursor."""
        job = self.owned(results.table, results.what)
        rows = results.query(self.session, job_id=job.id, after_id=cursor, limit=limit, **filters)
        return page(results.item, rows, limit)


def _reader(job_id: IdPath, tenant: ReaderDep, session: SessionDep) -> JobReader:
    return JobReader(job_id, tenant.id, session)


JobReaderDep = Annotated[JobReader, Depends(_reader)]


def described(job: TiledJob, kind: Any, celery: Celery, settings: Settings) -> dict[str, Any]:
    """A job as ``kind`` (a :class:`worker.tiled.Kind`) describes it, its error naming no server
    path; while no tile is done yet, with why it waits (e.g. no live worker listens on its
    queue)."""
    found: dict[str, Any] = kind.describe(job)
    if found.get("error"):
        found["error"] = without_server_paths(found["error"], settings)
    if found["status"] not in ("done", "failed") and not found["tiles_done"]:
        from worker.heartbeat import waiting_detail

        found["detail"] = waiting_detail(celery, kind.queue)
    return found


def refused(loc: Sequence[str], message: str) -> RequestValidationError:
    """A submission that cannot start, as the API's 422 (raise it ``from None``)."""
    return RequestValidationError([{"type": "value_error", "loc": tuple(loc), "msg": message}])


def next_cursor(rows: Sequence[Any], limit: int) -> int | None:
    """The cursor of the page after ``rows`` (ordered by id), or None on the last page."""
    return rows[-1].id if len(rows) == limit else None


def page(item: type[BaseModel], rows: Sequence[Any], limit: int) -> dict[str, Any]:
    """A page of result rows as ``item`` models (read from the rows' attributes), with its cursor."""
    return {
        "items": [item.model_validate(r, from_attributes=True) for r in rows],
        "next_cursor": next_cursor(rows, limit),
    }
