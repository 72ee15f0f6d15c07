"""FHIR R4 in and out: ``POST /v1/fhir`` takes a Bundle and queues one case per Patient for a
model; ``GET /v1/fhir/RiskAssessment`` returns the scores as RiskAssessment resources.

Errors on these routes are OperationOutcomes: 400 for input that is not FHIR (not JSON, not a
Bundle, resources that fail validation), 422 for valid FHIR that breaks a rule (no Patient, a
patient whose record lacks what the model requires). A ``transaction`` Bundle is all or nothing;
a ``batch`` or ``collection`` queues the patients that can be scored and answers for each
(a patient whose own entry fails validation is refused alone, 400 in its entry).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy import or_, select

from api_shim.audit import record_resource
from api_shim.deps import (
    MODEL_REF,
    CoalescerDep,
    IdPath,
    Moment,
    ReaderDep,
    RegistryDep,
    SessionDep,
    SettingsDep,
    SubmitterDep,
)
from api_shim.errors import SafeJSONResponse, model_problem, outcome_body
from db import explanations, repo
from db.tables import Case, Explanation, Priority, Score
from models.cases.registry import ModelSpec, RegistryError

if TYPE_CHECKING:
    from worker.fhir_intake import Intake

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
#: The media types (and ``_format`` names) of the only encoding written here, JSON: FHIR R4
#: http.html §3.1.0.1.10 "Content Types and encodings"; ``application/json+fhir`` is DSTU2's.
_JSON_MEDIA = frozenset(
    {"json", "application/json", FHIR_JSON, "application/json+fhir", "*/*", "application/*"}
)


class NotAcceptable(HTTPException):
    """A 406 naming the parameter or header that asked for a format not written here."""

    def __init__(self, diagnostics: str, expression: str) -> None:
        super().__init__(status.HTTP_406_NOT_ACCEPTABLE, diagnostics)
        self.expression = expression


def json_answer(
    request: Request,
    format_: Annotated[
        str | None,
        Query(
            alias="_format",
            description="json (the default), application/json or application/fhir+json",
            json_schema_extra={"enum": ["json", "application/json", FHIR_JSON]},
        ),
    ] = None,
) -> None:
    """Refuse a request for XML or Turtle (``_format``, else ``Accept``) rather than answer it
    in JSON: R4 §3.1.0.1.10, a server that cannot give the format asked for answers 406."""
    if format_ is not None:
        if _media(format_) not in _JSON_MEDIA:
            raise NotAcceptable("only JSON is written here: _format=json", "_format")
        return
    accept = request.headers.get("accept", "")
    ranges = [r for r in map(_media, accept.split(",")) if r]
    if ranges and not any(r in _JSON_MEDIA or r.endswith("+json") for r in ranges):
        raise NotAcceptable(
            "only JSON is written here: Accept: application/fhir+json", "header.accept"
        )


def _media(text: str) -> str:
    return text.partition(";")[0].strip().lower()


router = APIRouter(prefix="/v1/fhir", tags=["fhir"], dependencies=[Depends(json_answer)])
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
# The base with a trailing slash, as integration engines are often configured
# (https://host/v1/fhir/): the same interaction, not a redirect.
@router.post(
    "/", status_code=status.HTTP_202_ACCEPTED, response_model=None, include_in_schema=False
)
async def submit_bundle(
    request: Request,
    tenant: SubmitterDep,
    session: SessionDep,
    registry: RegistryDep,
    settings: SettingsDep,
    coalescer: CoalescerDep,
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
    from models.fhir.features import FhirInputError, parse_bundle
    from worker.fhir_intake import case_from_record

    # Parsed (depth, numbers and strings checked) by api_shim/guard.py.
    data = getattr(request.state, "json_body", None)
    if data is None:
        return outcome(400, [issue("required", "send a FHIR Bundle as the body")])
    try:
        spec = registry.resolve_scorable(model)
    except RegistryError:
        return outcome(422, [issue("not-found", model_problem(registry, model), "model")])
    # Kept in the offset it was sent with: an age counts birthdays in the sender's calendar
    # (23:00-05:00 on 1 July is 2 July in UTC, a birthday early).
    when = (as_of or datetime.now(UTC)) if _in_range(as_of) else None
    if when is None:
        return outcome(400, [issue("value", "must lie in the years 1900 to 2199", "as_of")])

    def read_bundle() -> Any:
        # Off the event loop: validating a large Bundle takes a while, /healthz must not wait.
        try:
            bundle = parse_bundle(data)
        except FhirInputError as exc:
            return exc
        place = {key: n for n, key in enumerate(bundle.order, start=1)}
        found = [
            (
                place[key],
                case_from_record(spec, record, as_of=when, lookback_days=lookback_days),
                record.identifiers,
            )
            for key, record in bundle.patients.items()
        ]
        return bundle, found

    parsed = await anyio.to_thread.run_sync(read_bundle)
    if isinstance(parsed, FhirInputError):
        code = 422 if all(i.code in _RULE_CODES for i in parsed.issues) else 400
        return outcome(
            code, [i.to_fhir() for i in parsed.issues], limit=settings.max_reported_problems
        )
    bundle, found = parsed
    # Entries the Bundle holds but no patient's record reads (a subject that is not a Patient,
    # ...): told with each patient's answer, so a value sent that way is not silently lost.
    unread = [i.to_fhir() for i in bundle.issues]
    # Each patient by its place in the Bundle (1-based): the answer lists them in that order,
    # and a refused one is named by it (its subject is the caller's value).
    accepted: list[tuple[int, Intake, list[tuple[str, str]]]] = []
    rejected: list[tuple[int, Intake]] = []
    for n, intake, identifiers in found:
        if intake.case is None:
            rejected.append((n, intake))
        else:
            accepted.append((n, intake, identifiers))
    refusals = {
        n: [
            issue(
                "business-rule",
                f"patient {n} of the Bundle: {name}: {why}",
                f"{spec.ref}.{name}",
            )
            for name, why in intake.problems.items()
        ]
        + [
            _note(
                "information",
                f"patient {n} of the Bundle: {i['feature']}: {i['resource']} not used: "
                f"{i['reason']}",
            )
            for i in (intake.found.ignored if intake.found is not None else [])
        ]
        for n, intake in rejected
    }
    # A patient of a batch whose own entries failed validation: refused alone (400).
    place = {key: n for n, key in enumerate(bundle.order, start=1)}
    invalid = {place[key]: [i.to_fhir() for i in issues] for key, issues in bundle.refused.items()}
    for n, issues in invalid.items():
        for i in issues:
            i["diagnostics"] = f"patient {n} of the Bundle: {i['diagnostics']}"
    if (rejected or invalid) and (bundle.type == "transaction" or not accepted):
        return outcome(
            400 if invalid else 422,
            [i for _, issues in sorted({**refusals, **invalid}.items()) for i in issues] + unread,
            limit=settings.max_reported_problems,
        )
    cases = [intake.case for _, intake, _ in accepted if intake.case is not None]
    results = repo.add_cases(session, tenant_id=tenant.id, cases=cases)
    for _, intake, identifiers in accepted:
        repo.add_patient_identifiers(
            session, tenant_id=tenant.id, subject=intake.subject, identifiers=identifiers
        )
    session.commit()
    to_send = [(r.id, Priority.routine) for r in results if r.created]
    if to_send:
        # Shared messages with concurrent requests; a broker outage leaves them for the sweeper.
        await coalescer.send_async(to_send)
    # R4 http.html, batch/transaction: Prefer return=OperationOutcome asks for an outcome in
    # every entry's response (there is no resource to return here in any case).
    outcomes = "return=operationoutcome" in request.headers.get("prefer", "").lower()
    answers: dict[int, dict[str, Any]] = {}
    for (n, intake, _), r in zip(accepted, results, strict=True):
        response: dict[str, Any] = {
            "status": "202 Accepted" if r.created else "200 OK",
            "location": f"RiskAssessment?subject={intake.subject}",
            "etag": f'W/"case-{r.id}"',
        }
        reported = _reported(intake) + unread
        if not reported and outcomes:
            said = "queued for scoring" if r.created else "already queued: nothing was added"
            reported = [_note("information", said)]
        if reported:
            response["outcome"] = {"resourceType": "OperationOutcome", "issue": reported}
        answers[n] = {"response": response}
    for n, issues in refusals.items():
        answers[n] = {
            "response": {
                "status": "422 Unprocessable Entity",
                "outcome": {"resourceType": "OperationOutcome", "issue": issues + unread},
            }
        }
    for n, issues in invalid.items():
        answers[n] = {
            "response": {
                "status": "400 Bad Request",
                "outcome": {"resourceType": "OperationOutcome", "issue": issues + unread},
            }
        }
    entries = [answers[n] for n in sorted(answers)]
    kind = "transaction-response" if bundle.type == "transaction" else "batch-response"
    body = {"resourceType": "Bundle", "type": kind, "entry": entries}
    return SafeJSONResponse(body, status.HTTP_202_ACCEPTED, media_type=FHIR_JSON)


def _note(severity: str, diagnostics: str, expression: str = "") -> dict[str, Any]:
    out = issue("informational", diagnostics, expression)
    out["severity"] = severity
    return out


def _reported(intake: Intake) -> list[dict[str, Any]]:
    """What the sender must be told about one patient, besides a refusal: the id the server
    gave it, each sent value that was ignored and why, each imputation, each flagged value."""
    out = []
    if intake.assigned:
        diag = f"the Patient had no id: the server assigned {intake.subject}"
        out.append(_note("information", diag, "Patient.id"))
    found = intake.found
    if found is None:
        return out
    for i in found.ignored:
        diag = f"{intake.subject}: {i['feature']}: {i['resource']} not used: {i['reason']}"
        out.append(_note("warning", diag))
    for i in found.imputations:
        diag = f"{intake.subject}: {i['feature']} imputed ({i['source']}): {i['why']}"
        out.append(_note("warning", diag))
    for f in found.flagged:
        out.append(_note("warning", f"{intake.subject}: {f['feature']} {f['reason']}"))
    for n in found.notes:
        out.append(_note("information", f"{intake.subject}: {n}"))
    return out


def _in_range(moment: datetime | None) -> bool:
    """None (now), or a moment from 1900 to 2199: lookback windows before it stay in the calendar."""
    return moment is None or 1900 <= moment.year <= 2199


def risk_assessment(
    case: Case,
    score: Score,
    spec: ModelSpec | None,
    explained: explanations.ExplanationState | None = None,
) -> dict[str, Any]:
    """A score as a FHIR R4 RiskAssessment (``explained``: its attributions' state, if asked for)."""
    ref = f"{score.model_name}@{score.model_version}"
    context = case.context or {}
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "id": str(score.id),
        "status": "final",
        "subject": _subject_of(case),
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
        resource["basis"] = [
            {"display": f"{r} (no id or fullUrl was sent)"}
            if r.startswith("Bundle.")
            else {"reference": r}
            for r in context["basis"]
        ]
    notes = []
    if context.get("as_of"):
        # occurrenceDateTime is when the score was computed; the record was read as it stood
        # at as_of (?as_of=, perhaps long before): without this, a backdated score reads as
        # today's.
        window = context.get("lookback_days")
        notes.append(
            f"features read from the record as it stood at {context['as_of']}"
            + (f" (look-back {window} days)" if window else "")
        )
    for i in context.get("imputations") or []:
        notes.append(
            f"imputed {i['feature']} = {i['value']:g} {i['unit']} ({i['source']}): {i['why']}"
        )
    if context.get("imputed") and not context.get("imputations"):  # cases from before 0012
        notes.append("imputed (missing from the record): " + ", ".join(context["imputed"]))
    for i in context.get("ignored") or []:
        notes.append(f"ignored for {i['feature']}: {i['resource']}: {i['reason']}")
    for f in context.get("flagged") or []:
        notes.append(f"flagged {f['feature']}: {f['reason']}")
    notes += list(context.get("notes") or [])
    explanation = score.explanation or {}
    if explanation.get("top"):
        top = ", ".join(f"{a['feature']} {a['attribution']:+.3f}" for a in explanation["top"])
        notes.append(f"largest contributions to the log-odds ({explanation['method']}): {top}")
    if explanation.get("top_steps"):
        # Sequence models: the steps (with their codes, for the event Transformer, whose
        # attributions are steps only) that weigh most, as GET /v1/cases/{id} shows them.
        steps = ", ".join(
            f"step {t['step']}"
            + (f" (code {t['code']})" if "code" in t else "")
            + f" {t['attribution']:+.3f}"
            for t in explanation["top_steps"]
        )
        notes.append(f"steps weighing most in the log-odds ({explanation['method']}): {steps}")
    if explained is not None and explained.status == "pending":
        notes.append("feature attributions pending: they follow the score")
    elif explained is not None and explained.status == "failed":
        notes.append(f"no feature attributions: {explained.error}")
    if notes:
        resource["note"] = [{"text": n} for n in notes]
    return resource


#: The identifier system of a case's external id, for a case that came without a FHIR Patient.
EXTERNAL_ID_SYSTEM = "urn:medbatch:external-id"


def _subject_of(case: Case) -> dict[str, Any]:
    """The RiskAssessment's subject: its Patient, or for a case posted to /v1/cases (no Patient)
    the case's external id as an identifier. It was sent as ``reference``, which a FHIR client
    resolves as a relative URL (``[base]/wdbc-0001``): a Patient that does not exist."""
    if case.subject:
        return {"reference": case.subject}
    return {
        "identifier": {"system": EXTERNAL_ID_SYSTEM, "value": case.external_id},
        "display": "a case submitted without a FHIR Patient",
    }


def _spec(registry: Any, score: Score) -> ModelSpec | None:
    try:
        return registry.resolve(f"{score.model_name}@{score.model_version}")
    except RegistryError:
        return None


#: When the CapabilityStatement's content last changed (R4 requires a date; it is not "now").
CAPABILITY_DATE = "2026-12-05"


def capability_statement() -> dict[str, Any]:
    """What this FHIR endpoint serves, as an R4 (4.0.1) CapabilityStatement."""
    # searchParam.name is a SearchParameter's code: the :identifier modifier and the
    # .identifier chain are told with the parameter they apply to, not as parameters.
    token = "system|value, |value or value"
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": CAPABILITY_DATE,
        "publisher": "medbatch",
        "kind": "instance",
        "software": {"name": "medbatch"},
        "implementation": {
            "description": "medbatch: case scoring. A batch or transaction Bundle posted to the "
            "base queues one case per Patient; each score is read back as a RiskAssessment."
        },
        "fhirVersion": "4.0.1",
        "format": ["json", FHIR_JSON],
        "rest": [
            {
                "mode": "server",
                "documentation": "Bundles of type batch, transaction, collection or searchset "
                "are taken (?model=, ?as_of=, ?lookback_days=); see docs/fhir.md.",
                "security": {
                    "cors": False,
                    "description": "Authorization: Bearer <API key>; scope cases:submit to "
                    "post a Bundle, results:read to read RiskAssessments.",
                },
                "resource": [
                    {
                        "type": "RiskAssessment",
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "searchParam": [
                            {
                                "name": "subject",
                                "type": "reference",
                                "documentation": "a Patient: Patient/<id> or the bare id; "
                                f"subject:identifier={token}: the subject by its identifier "
                                "(a Patient's, or a case's posted without one: system "
                                f"{EXTERNAL_ID_SYSTEM}, value its external id)",
                            },
                            {
                                "name": "patient",
                                "type": "reference",
                                "documentation": "a Patient: Patient/<id> or the bare id; "
                                f"patient.identifier={token}: the Patient by its identifier",
                            },
                        ],
                    }
                ],
                "interaction": [{"code": "batch"}, {"code": "transaction"}],
            }
        ],
    }


@router.get("/metadata", response_model=None)
def read_capabilities() -> JSONResponse:
    """The capabilities interaction (R4 http.html §3.1.0.9, ``GET [base]/metadata``). FHIR
    clients read it before their first call (HAPI FHIR's generic client does by default, and
    stops when it is missing); it holds nothing of any tenant, so it needs no key."""
    return SafeJSONResponse(capability_statement(), media_type=FHIR_JSON)


#: A search's reference to a Patient: ``Patient/<id>`` or the id alone.
_PATIENT = r"^(Patient/)?[A-Za-z0-9\-.]{1,64}$"


@router.get("/RiskAssessment", response_model=None)
def search_risk_assessments(
    request: Request,
    tenant: ReaderDep,
    session: SessionDep,
    registry: RegistryDep,
    subject: Annotated[str | None, Query(pattern=_PATIENT)] = None,
    patient: Annotated[str | None, Query(pattern=_PATIENT)] = None,
    subject_identifier: Annotated[
        str | None, Query(alias="subject:identifier", min_length=1, max_length=500)
    ] = None,
    patient_identifier: Annotated[
        str | None, Query(alias="patient.identifier", min_length=1, max_length=500)
    ] = None,
) -> JSONResponse:
    """A searchset Bundle of the patient's scores (this tenant's only), by ``subject`` or
    ``patient`` (``Patient/<id>`` or ``<id>``) or by the patient's identifier
    (``subject:identifier`` / ``patient.identifier``, ``system|value``, ``|value`` or ``value``);
    ``subject:identifier`` also finds a case posted without a Patient by the identifier its
    RiskAssessment's subject names (``urn:medbatch:external-id|<external id>``)."""
    criteria = (subject, patient, subject_identifier, patient_identifier)
    case_ids: list[int] = []
    given = [p for p in criteria if p is not None]
    if len(given) != 1:
        diag = "give exactly one of subject, patient, subject:identifier, patient.identifier"
        return outcome(400, [issue("required" if not given else "invalid", diag)])
    if (reference := subject or patient) is not None:
        # R4 search, reference parameters: "Patient/23" or the bare id "23" (the RiskAssessment
        # search parameter ``patient`` is its subject when that is a Patient).
        subjects = [reference if reference.startswith("Patient/") else f"Patient/{reference}"]
    else:
        token = str(subject_identifier or patient_identifier)
        system, bar, value = token.rpartition("|") if "|" in token else (None, "", token)
        if not value:
            diag = "an identifier search needs a value: system|value, |value or value"
            return outcome(400, [issue("invalid", diag)])
        subjects = repo.subjects_with_identifier(
            session, tenant_id=tenant.id, system=system if bar else None, value=value
        )
        if subject_identifier is not None and (not bar or system == EXTERNAL_ID_SYSTEM):
            # R4's :identifier tests the Reference's own identifier: a case posted without a
            # Patient names its external id there (_subject_of), and is found by it.
            unattached = select(Case.id).where(
                Case.tenant_id == tenant.id, Case.subject.is_(None), Case.external_id == value
            )
            case_ids = list(session.scalars(unattached))
    # The audit row names the patients (and the cases, by id) this answer is about
    # (api_shim/audit.py); never the identifier sent, the caller's text.
    record_resource(request.state, subject=",".join(subjects))
    if case_ids:
        record_resource(request.state, case=",".join(map(str, case_ids)))
    # The attributions' state in the same statement (an outer join): no extra one a search.
    rows = session.execute(
        select(Case, Score, Explanation.status, Explanation.error)
        .join(Score, Score.case_id == Case.id)
        .outerjoin(Explanation, Explanation.case_id == Case.id)
        .where(
            Case.tenant_id == tenant.id,
            or_(Case.subject.in_(subjects), Case.id.in_(case_ids)),
            Score.shadow.is_(False),
            Score.model_version == Case.model_version,
        )
        .order_by(Score.id)
    ).all()
    entries = [
        {
            "fullUrl": f"RiskAssessment/{score.id}",
            "resource": risk_assessment(
                case, score, _spec(registry, score), explanations.state_of(state, error)
            ),
            "search": {"mode": "match"},
        }
        for case, score, state, error in rows
    ]
    body = {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
    # ASCII-escaped: a string stored before the gate refused it (a lone surrogate) cannot make
    # every later search of the patient a 500.
    return SafeJSONResponse(body, media_type=FHIR_JSON)


@router.get("/RiskAssessment/{score_id}", response_model=None)
def read_risk_assessment(
    score_id: IdPath, tenant: ReaderDep, session: SessionDep, registry: RegistryDep
) -> JSONResponse:
    row = session.execute(
        select(Case, Score, Explanation.status, Explanation.error)
        .join(Score, Score.case_id == Case.id)
        .outerjoin(Explanation, Explanation.case_id == Case.id)
        .where(Score.id == score_id, Case.tenant_id == tenant.id, Score.shadow.is_(False))
    ).first()
    if row is None:
        return outcome(404, [issue("not-found", "no RiskAssessment with this id for this tenant")])
    case, score, state, error = row
    explained = explanations.state_of(state, error)
    return SafeJSONResponse(
        risk_assessment(case, score, _spec(registry, score), explained), media_type=FHIR_JSON
    )
