"""Request dependencies: a database session per request, the calling tenant, the broker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.tables import Tenant
from medbatch.settings import Settings
from models.registry import Registry


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


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
CeleryDep = Annotated[Celery, Depends(get_celery)]

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
    caller = repo.caller_for_key(session, api_key=credentials.credentials)
    if caller is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "unknown API key", headers={"WWW-Authenticate": "Bearer"}
        )
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
GenomeSubmitterDep = Annotated[Tenant, Depends(require("genome:submit"))]
CompoundSubmitterDep = Annotated[Tenant, Depends(require("compounds:submit"))]


def path_inside(root: Path, name: str, field: str) -> Path:
    """``root/name``, refused unless it stays inside ``root`` (no absolute paths, no ``..``)."""
    base = root.resolve()
    path = (base / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(base):
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("body", field),
                    "msg": "must be a fileset prefix inside the server's genotype folder",
                }
            ]
        )
    return path
