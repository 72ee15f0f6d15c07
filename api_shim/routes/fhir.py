"""FHIR R4 in and out: ``POST /v1/fhir`` takes a Bundle and queues one case per Patient for a
model; ``GET /v1/fhir/RiskAssessment`` returns the scores as RiskAssessment resources.

Errors on these routes are OperationOutcomes: 400 for input that is not FHIR (not JSON, not a
Bundle, resources that fail validation), 422 for valid FHIR that breaks a rule (no Patient, a
patient whose record lacks what the model requires). A ``transaction`` Bundle is all or nothing;
a ``batch`` or ``collection`` queues the patients that can be scored and answers for each.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api_shim.audit import record_resource
from api_shim.deps import (
    MODEL_REF,
    CeleryDep,
    IdPath,
    Moment,
    ReaderDep,
    RegistryDep,
    SessionDep,
    SettingsDep,
    SubmitterDep,
)
from api_shim.errors import SafeJSONResponse, model_problem, outcome_body
from db import repo
from db.tables import Case, Priority, Score
from models.registry import ModelSpec, RegistryError
from worker.queues import enqueue_cases

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/fhir", tags=["fhir"])

FHIR_JSON = "application/fhir+json"
#: Issue types that mean "valid FHIR, but a rule is broken" (422); the rest mean "not FHIR" (400).
_RULE_CODES = frozenset({"business-rule", "required", "not-found", "not-supported", "incomplete"})


def outcome(
    status_code: int,
    issues: list[dict[str, Any]],
    headers: Mapping[str, str] | None = None,
    *,
    limit: int = 20,
) -> JSONResponse:
    """An OperationOutcome response (at most ``limit`` issues listed, with the count of all)."""
    return SafeJSONResponse(
        outcome_body(issues, limit), status_code, media_type=FHIR_JSON, headers=headers
    )


def issue(code: str, diagnostics: str, expression: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": diagnostics}
    if expression:
        out["expression"] = [expression]
    return out


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=None)
async def submit_bundle(
    request: Request,
    tenant: SubmitterDep,
    session: SessionDep,
    registry: RegistryDep,
    settings: SettingsDep,
    celery: CeleryDep,
    model: Annotated[str, Query(min_length=1, max_length=150, pattern=MODEL_REF)] = (
        "whas500-mortality"
    ),
    as_of: Annotated[
        Moment | None,
        Query(description="the moment to score at (RFC 3339, years 1900 to 2199; default now)"),
    ] = None,
    lookback_days: Annotated[int, Query(ge=1, le=36500)] = 730,
) -> JSONResponse:
    """Queue one case per Patient of a Bundle, its features taken from the Bundle's resources."""
    from models.fhir_features import FhirInputError, parse_bundle
    from worker.fhir_intake import case_from_record

    # Parsed (depth, numbers and strings checked) by api_shim/guard.py.
    data = getattr(request.state, "json_body", None)
    if data is None:
        return outcome(400, [issue("required", "send a FHIR Bundle as the body")])
    try:
        spec = registry.resolve(model)
    except RegistryError:
        return outcome(422, [issue("not-found", model_problem(registry, model), "model")])
    when = (as_of or datetime.now(UTC)).astimezone(UTC) if _in_range(as_of) else None
    if when is None:
        return outcome(400, [issue("value", "must lie in the years 1900 to 2199", "as_of")])

    def intake() -> Any:
        # Off the event loop: validating a large Bundle takes a while, /healthz must not wait.
        try:
            bundle = parse_bundle(data)
        except FhirInputError as exc:
            return exc
        found = [
            case_from_record(spec, record, as_of=when, lookback_days=lookback_days)
            for record in bundle.patients.values()
        ]
        return bundle, found

    parsed = await anyio.to_thread.run_sync(intake)
    if isinstance(parsed, FhirInputError):
        code = 422 if all(i.code in _RULE_CODES for i in parsed.issues) else 400
        return outcome(
            code, [i.to_fhir() for i in parsed.issues], limit=settings.max_reported_problems
        )
    bundle, found = parsed
    accepted: list[tuple[str, repo.NewCase]] = []
    rejected: dict[str, list[dict[str, Any]]] = {}
    for n, (subject, case, problems) in enumerate(found, start=1):
        if case is None:
            # Named by its place in the Bundle: the subject is the caller's identifier.
            rejected[subject] = [
                issue(
                    "business-rule",
                    f"patient {n} of the Bundle: {name}: {why}",
                    f"{spec.ref}.{name}",
                )
                for name, why in problems.items()
            ]
        else:
            accepted.append((subject, case))
    if rejected and (bundle.type == "transaction" or not accepted):
        return outcome(
            422,
            [i for issues in rejected.values() for i in issues],
            limit=settings.max_reported_problems,
        )
    results = repo.add_cases(session, tenant_id=tenant.id, cases=[c for _, c in accepted])
    session.commit()
    to_send = [(r.id, Priority.routine) for r in results if r.created]
    if to_send:
        try:
            enqueue_cases(celery, to_send, per_message=settings.cases_per_message)
        except Exception as exc:
            log.warning("broker unreachable, %d cases left for the sweeper: %s", len(to_send), exc)
    entries: list[dict[str, Any]] = [
        {
            "response": {
                "status": "202 Accepted" if r.created else "200 OK",
                "location": f"RiskAssessment?subject={subject}",
                "etag": f'W/"case-{r.id}"',
            }
        }
        for (subject, _), r in zip(accepted, results, strict=True)
    ]
    entries += [
        {
            "response": {
                "status": "422 Unprocessable Entity",
                "outcome": {"resourceType": "OperationOutcome", "issue": issues},
            }
        }
        for issues in rejected.values()
    ]
    kind = "transaction-response" if bundle.type == "transaction" else "batch-response"
    body = {"resourceType": "Bundle", "type": kind, "entry": entries}
    return JSONResponse(body, status.HTTP_202_ACCEPTED, media_type=FHIR_JSON)


def _in_range(moment: datetime | None) -> bool:
    """None (now), or a moment from 1900 to 2199: lookback windows before it stay in the calendar."""
    return moment is None or 1900 <= moment.year <= 2199


def risk_assessment(case: Case, score: Score, spec: ModelSpec | None) -> dict[str, Any]:
    """A score as a FHIR R4 RiskAssessment."""
    ref = f"{score.model_name}@{score.model_version}"
    context = case.context or {}
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "id": str(score.id),
        "status": "final",
        "subject": {"reference": case.subject or case.external_id},
        "occurrenceDateTime": score.created_at.isoformat(),
        "method": {
            "coding": [{"system": "urn:medbatch:model", "code": ref}],
            "text": f"{ref} (artifact sha256 {score.model_sha256})",
        },
        "prediction": [
            {
                "outcome": {"text": spec.output if spec else ref},
                "probabilityDecimal": score.score,
                "qualitativeRisk": {"text": score.label},
            }
        ],
    }
    if context.get("basis"):
        resource["basis"] = [{"reference": r} for r in context["basis"]]
    notes = []
    if context.get("imputed"):
        notes.append("imputed (missing from the record): " + ", ".join(context["imputed"]))
    explanation = score.explanation or {}
    if explanation.get("top"):
        top = ", ".join(f"{a['feature']} {a['attribution']:+.3f}" for a in explanation["top"])
        notes.append(f"largest contributions to the log-odds ({explanation['method']}): {top}")
    if notes:
        resource["note"] = [{"text": n} for n in notes]
    return resource


def _spec(registry: Any, score: Score) -> ModelSpec | None:
    try:
        return registry.resolve(f"{score.model_name}@{score.model_version}")
    except RegistryError:
        return None


@router.get("/RiskAssessment", response_model=None)
def search_risk_assessments(
    request: Request,
    tenant: ReaderDep,
    session: SessionDep,
    registry: RegistryDep,
    subject: Annotated[str, Query(pattern=r"^Patient/[A-Za-z0-9\-.]{1,64}$")],
) -> JSONResponse:
    """A searchset Bundle of the patient's scores (this tenant's only)."""
    # The audit row names the patient this answer is about (api_shim/audit.py).
    record_resource(request.state, subject=subject)
    rows = session.execute(
        select(Case, Score)
        .join(Score, Score.case_id == Case.id)
        .where(
            Case.tenant_id == tenant.id,
            Case.subject == subject,
            Score.shadow.is_(False),
            Score.model_version == Case.model_version,
        )
        .order_by(Score.id)
    ).all()
    entries = [
        {
            "fullUrl": f"RiskAssessment/{score.id}",
            "resource": risk_assessment(case, score, _spec(registry, score)),
            "search": {"mode": "match"},
        }
        for case, score in rows
    ]
    body = {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
    return JSONResponse(body, media_type=FHIR_JSON)


@router.get("/RiskAssessment/{score_id}", response_model=None)
def read_risk_assessment(
    score_id: IdPath, tenant: ReaderDep, session: SessionDep, registry: RegistryDep
) -> JSONResponse:
    row = session.execute(
        select(Case, Score)
        .join(Score, Score.case_id == Case.id)
        .where(Score.id == score_id, Case.tenant_id == tenant.id, Score.shadow.is_(False))
    ).first()
    if row is None:
        return outcome(404, [issue("not-found", "no RiskAssessment with this id for this tenant")])
    case, score = row
    return JSONResponse(risk_assessment(case, score, _spec(registry, score)), media_type=FHIR_JSON)
