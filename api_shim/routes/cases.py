"""Submission: POST /v1/cases validates every case, commits them, then enqueues them."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from api_shim.deps import CoalescerDep, RegistryDep, SessionDep, SettingsDep, SubmitterDep
from api_shim.errors import model_problem
from api_shim.metrics import CASES_SUBMITTED
from api_shim.schemas import CaseAccepted, CaseCreate, CasesAccepted
from db import repo
from models.cases.featurize import check_features
from models.cases.registry import Registry, RegistryError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["cases"])

_cases_adapter = TypeAdapter(list[CaseCreate])
_case_adapter = TypeAdapter(CaseCreate)

_BODY_SCHEMA = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {"$ref": "#/components/schemas/CaseCreate"},
                    {"type": "array", "items": {"$ref": "#/components/schemas/CaseCreate"}},
                ]
            }
        }
    },
}


def _error(loc: tuple[Any, ...], msg: str, kind: str) -> dict[str, Any]:
    return {"type": kind, "loc": loc, "msg": msg}


def parse_cases(raw: Any, *, max_cases: int) -> list[CaseCreate]:
    """Validate the body's shape and types: one case object, or a non-empty list of them."""
    if isinstance(raw, list):
        if not raw:
            raise RequestValidationError(
                [_error(("body",), "expected at least one case", "too_short")]
            )
        if len(raw) > max_cases:
            raise RequestValidationError(
                [
                    _error(
                        ("body",),
                        f"at most {max_cases} cases per request, got {len(raw)}",
                        "too_long",
                    )
                ]
            )
        adapter: TypeAdapter = _cases_adapter
    elif isinstance(raw, dict):
        adapter = _case_adapter
    else:
        raise RequestValidationError(
            [_error(("body",), "expected a case object or a list of case objects", "model_type")]
        )
    try:
        parsed = adapter.validate_python(raw)
    except ValidationError as exc:
        raise RequestValidationError(
            [_error(("body", *e["loc"]), e["msg"], e["type"]) for e in exc.errors()]
        ) from None
    return parsed if isinstance(parsed, list) else [parsed]


def check_against_registry(
    cases: list[CaseCreate], registry: Registry, *, indexed: bool
) -> list[repo.NewCase]:
    """Resolve each case's model and check its features against the model's input schema."""
    errors: list[dict[str, Any]] = []
    new: list[repo.NewCase] = []
    seen: set[str] = set()
    for i, case in enumerate(cases):
        loc: tuple[Any, ...] = ("body", i) if indexed else ("body",)
        if case.external_id in seen:
            errors.append(
                _error(
                    (*loc, "external_id"), "duplicate external_id in this request", "value_error"
                )
            )
        seen.add(case.external_id)
        try:
            spec = registry.resolve_scorable(case.model)
        except RegistryError:
            errors.append(
                _error((*loc, "model"), model_problem(registry, case.model), "value_error")
            )
            continue
        unexpected = 0
        for name, problem in check_features(spec, case.features).items():
            if name in spec.feature_set:
                errors.append(_error((*loc, "features", name), problem, "value_error"))
            else:
                unexpected += 1
        if unexpected:
            # Counted, not listed: the names are the caller's, and there may be very many.
            errors.append(
                _error(
                    (*loc, "features"),
                    f"{unexpected} feature name(s) not in the input schema of {spec.ref} "
                    f"(GET /v1/models/{spec.name} lists them)",
                    "extra_forbidden",
                )
            )
        new.append(
            repo.NewCase(
                external_id=case.external_id,
                model_name=spec.name,
                model_version=spec.version,
                priority=case.priority,
                features=dict(case.features),
                version_pinned="@" in case.model,
            )
        )
    if errors:
        raise RequestValidationError(errors)
    return new


def _json_body(request: Request) -> Any:
    """The body, parsed and checked by api_shim/guard.py (depth, numbers, storable strings)."""
    if "json_body" not in request.scope.get("state", {}):
        raise RequestValidationError([_error(("body",), "a body is required", "missing")])
    return request.state.json_body


def _positions(raw: Any, external_ids: list[str]) -> list[int]:
    taken = set(external_ids)
    cases = raw if isinstance(raw, list) else [raw]
    return [i for i, c in enumerate(cases) if c.get("external_id") in taken]


@router.post(
    "/cases",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=CasesAccepted,
    openapi_extra={"requestBody": _BODY_SCHEMA},
    responses={409: {"description": "an external_id is taken by a case with other content"}},
)
def submit_cases(
    raw: Annotated[Any, Depends(_json_body)],
    tenant: SubmitterDep,
    session: SessionDep,
    registry: RegistryDep,
    settings: SettingsDep,
    coalescer: CoalescerDep,
) -> CasesAccepted:
    """Accept one case or a list; all are validated before any is stored, and none is enqueued before its commit."""
    cases = parse_cases(raw, max_cases=settings.max_cases_per_request)
    new = check_against_registry(cases, registry, indexed=isinstance(raw, list))
    try:
        results = repo.add_cases(session, tenant_id=tenant.id, cases=new)
        session.commit()
    except repo.ExternalIdConflict as exc:
        session.rollback()
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            {
                "msg": "external_id already used for a case with another model or other features",
                # Positions in the request, not the ids themselves (they may identify patients).
                "positions": _positions(raw, exc.external_ids),
            },
        ) from None
    to_send = [(r.id, c.priority) for r, c in zip(results, new, strict=True) if r.created]
    # Concurrent requests' cases share messages (api_shim/coalesce.py); a broker outage leaves
    # them marked unsent, for the sweeper.
    enqueued = coalescer.send(to_send) if to_send else True
    for c in new:
        CASES_SUBMITTED.labels(model=c.model_name, priority=c.priority.value).inc()
    accepted = [
        CaseAccepted(
            id=r.id,
            external_id=c.external_id,
            model=f"{c.model_name}@{r.model_version}",
            status=r.status,
            created=r.created,
        )
        for r, c in zip(results, new, strict=True)
    ]
    return CasesAccepted(count=len(accepted), enqueued=enqueued, cases=accepted)
