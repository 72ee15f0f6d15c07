"""POST /v1/fhir and GET /v1/fhir/RiskAssessment on the real PostgreSQL and Redis, with the real
Synthea Bundles: cases queued per patient, RiskAssessments that validate as FHIR R4, and every
error an OperationOutcome with nothing written."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import Case, PatientIdentifier, Score
from models.cases.inference import LoadedModel
from models.cases.registry import Registry
from tests.helpers import SHARED_DIR, require_shared
from worker.tasks.scoring import score_cases

pytestmark = pytest.mark.integration

BUNDLES = SHARED_DIR / "data" / "fhir" / "bundles"
AS_OF = "2020-01-01T00:00:00Z"


def _key(sessions: sessionmaker[Session], name: str = "hospital-a", *scopes: str) -> dict:
    with session_scope(sessions) as s:
        tenant, key = repo.create_tenant(s, name=name)
        if scopes:
            key = repo.create_client(s, tenant_id=tenant.id, name="engine", scopes=scopes)[1]
    return {"Authorization": f"Bearer {key}"}


def _bundles() -> list[Path]:
    require_shared(BUNDLES / "x")
    return sorted(BUNDLES.glob("*.json"))


def _first_bundle() -> dict:
    return json.loads(_bundles()[0].read_text())


def _patient(body: dict) -> dict:
    return next(e for e in body["entry"] if e["resource"]["resourceType"] == "Patient")


def _bmi(body: dict, full_url: str, *, system: str, status: str, when: str, value: dict) -> dict:
    """An Observation entry of a BMI (LOINC 39156-5, coded in ``system``) of the bundle's patient."""
    return {
        "fullUrl": full_url,
        "resource": {
            "resourceType": "Observation",
            "status": status,
            "code": {"coding": [{"system": system, "code": "39156-5"}]},
            "subject": {"reference": _patient(body)["fullUrl"]},
            "effectiveDateTime": when,
            "valueQuantity": value,
        },
    }


def _cases(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Case)) or 0


def _post(api: TestClient, headers: dict, body: object, **params: str) -> object:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return api.post(
        "/v1/fhir",
        headers={**headers, "Content-Type": "application/fhir+json"},
        content=raw,
        params={"as_of": AS_OF, **params},
    )


def test_every_shared_bundle_becomes_one_case_per_patient_and_is_read_back_as_risk(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.riskassessment import RiskAssessment

    headers = _key(pg_sessions)
    subjects = []
    for path in _bundles():
        response = _post(api, headers, json.loads(path.read_text()))
        assert response.status_code == 202, response.text
        assert response.headers["content-type"].startswith("application/fhir+json")
        reply = Bundle.model_validate(response.json())
        assert reply.type == "transaction-response"
        (entry,) = reply.entry
        assert entry.response.status == "202 Accepted"
        subjects.append(entry.response.location.split("=", 1)[1])
    assert _cases(pg_sessions) == len(subjects) == 4
    # Score them as a worker would.
    with pg_sessions() as s:
        ids = list(s.scalars(select(Case.id)))
    spec = Registry.load().resolve("whas500-mortality")
    model = LoadedModel(spec, device="cpu")
    score_cases(ids, sessions=pg_sessions, load_model=lambda n, v: model, explain_top_k=3)
    for subject in subjects:
        found = api.get("/v1/fhir/RiskAssessment", headers=headers, params={"subject": subject})
        assert found.status_code == 200
        bundle = Bundle.model_validate(found.json())
        assert bundle.type == "searchset" and bundle.total == 1
        risk = RiskAssessment.model_validate(found.json()["entry"][0]["resource"])
        assert risk.subject.reference == subject and risk.status == "final"
        assert 0 < risk.prediction[0].probabilityDecimal < 1
        assert risk.method.coding[0].code == "whas500-mortality@1.0.0"
        assert spec.sha256 in risk.method.text
        assert any(b.reference == subject for b in risk.basis)  # age and sex come from it
        # A backdated score says so: occurrenceDateTime is when it was computed.
        as_of = "features read from the record as it stood at 2020-01-01T00:00:00+00:00"
        assert risk.note[0].text == f"{as_of} (look-back 730 days)"
        assert "imputed" in risk.note[1].text  # Synthea's bundles have no LOINC vitals
        one = api.get(f"/v1/fhir/RiskAssessment/{risk.id}", headers=headers)
        assert RiskAssessment.model_validate(one.json()).id == risk.id


def test_an_age_counts_birthdays_at_as_of_in_its_own_offset(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """as_of=2024-07-01T23:00:00-05:00 is 1 July where it was sent and 2 July in UTC. The route
    converted it to UTC first, so a patient born on 2 July 1941 was 83 on the eve of their
    83rd birthday."""
    headers = _key(pg_sessions)
    patient = {
        "resourceType": "Patient",
        "id": "bday",
        "gender": "female",
        "birthDate": "1941-07-02",
    }
    body = {"resourceType": "Bundle", "type": "batch", "entry": [{"resource": patient}]}
    response = _post(api, headers, body, as_of="2024-07-01T23:00:00-05:00")
    assert response.status_code == 202, response.text
    with pg_sessions() as s:
        (case,) = s.scalars(select(Case))
    assert case.features["age"] == 82
    assert case.context["as_of"] == "2024-07-01T23:00:00-05:00"


def test_resubmitting_the_same_patient_data_creates_nothing(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    headers = _key(pg_sessions)
    body = _first_bundle()
    assert _post(api, headers, body).status_code == 202
    again = _post(api, headers, body)
    assert again.json()["entry"][0]["response"]["status"] == "200 OK"
    assert _cases(pg_sessions) == 1


def _without_birth_date(body: dict) -> dict:
    body = copy.deepcopy(body)
    for entry in body["entry"]:
        if entry["resource"]["resourceType"] == "Patient":
            entry["resource"].pop("birthDate", None)
    return body


@pytest.mark.parametrize(
    ("make", "status", "code", "fragment"),
    [
        (lambda b: b"{not json", 400, "structure", "not valid JSON"),
        (lambda b: {"hello": "world"}, 400, None, ""),
        (lambda b: {"resourceType": "Patient", "id": "p1"}, 400, None, "Bundle"),
        (
            lambda b: {
                **b,
                "entry": [e for e in b["entry"] if e["resource"]["resourceType"] != "Patient"],
            },
            422,
            None,
            "no Patient",
        ),
        (_without_birth_date, 422, "business-rule", "age"),
    ],
)
def test_bad_input_is_an_operation_outcome_and_writes_nothing(
    api: TestClient, pg_sessions: sessionmaker[Session], make, status: int, code, fragment: str
) -> None:  # type: ignore[no-untyped-def]
    from fhir.resources.R4B.operationoutcome import OperationOutcome

    headers = _key(pg_sessions)
    response = _post(api, headers, make(_first_bundle()))
    assert response.status_code == status, response.text
    result = OperationOutcome.model_validate(response.json())
    assert any(i.severity in ("error", "fatal") for i in result.issue)
    # Beside the errors, a refusal only informs (which sent values were not used).
    assert all(i.severity in ("error", "fatal", "information") for i in result.issue)
    if code:
        assert any(i.code == code for i in result.issue)
    assert fragment in json.dumps(response.json())
    assert _cases(pg_sessions) == 0


def test_unknown_model_and_missing_scope_and_other_tenants(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    body = _first_bundle()
    headers = _key(pg_sessions)
    unknown = _post(api, headers, body, model="heart-failure")
    assert unknown.status_code == 422 and unknown.json()["issue"][0]["code"] == "not-found"
    reader = _key(pg_sessions, "hospital-b", "results:read")
    denied = _post(api, reader, body)
    assert denied.status_code == 403 and denied.json()["resourceType"] == "OperationOutcome"
    assert denied.json()["issue"][0]["code"] == "forbidden"
    anonymous = api.get("/v1/fhir/RiskAssessment", params={"subject": "Patient/x"})
    assert anonymous.status_code == 401 and anonymous.json()["issue"][0]["code"] == "login"
    # hospital-a's patient is invisible to hospital-b.
    subject = _post(api, headers, body).json()["entry"][0]["response"]["location"].split("=")[1]
    with pg_sessions() as s:
        ids = list(s.scalars(select(Case.id)))
    model = LoadedModel(Registry.load().resolve("whas500-mortality"), device="cpu")
    score_cases(ids, sessions=pg_sessions, load_model=lambda n, v: model)
    theirs = api.get("/v1/fhir/RiskAssessment", headers=reader, params={"subject": subject})
    assert theirs.json()["total"] == 0
    mine = api.get("/v1/fhir/RiskAssessment", headers=headers, params={"subject": subject})
    score_id = mine.json()["entry"][0]["resource"]["id"]
    missing = api.get(f"/v1/fhir/RiskAssessment/{score_id}", headers=reader)
    assert missing.status_code == 404 and missing.json()["issue"][0]["code"] == "not-found"
    bad_subject = api.get(
        "/v1/fhir/RiskAssessment", headers=headers, params={"subject": "Location/x"}
    )
    assert (
        bad_subject.status_code == 400 and bad_subject.json()["resourceType"] == "OperationOutcome"
    )


def _two_patient_bundle(kind: str) -> dict:
    """The first two shared bundles' entries in one Bundle of ``kind``; the second patient has no
    birthDate, so it cannot be scored (age is required)."""
    first, second = (json.loads(p.read_text()) for p in _bundles()[:2])
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": first["entry"] + _without_birth_date(second)["entry"],
    }


def test_a_transaction_is_all_or_nothing_a_batch_answers_per_patient(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    headers = _key(pg_sessions)
    refused = _post(api, headers, _two_patient_bundle("transaction"))
    assert refused.status_code == 422
    assert any("age" in i["diagnostics"] for i in refused.json()["issue"])
    assert _cases(pg_sessions) == 0
    batch = _post(api, headers, _two_patient_bundle("batch"))
    assert batch.status_code == 202
    statuses = [e["response"]["status"] for e in batch.json()["entry"]]
    assert statuses == ["202 Accepted", "422 Unprocessable Entity"]
    assert _cases(pg_sessions) == 1


def test_a_value_in_a_unit_the_schema_cannot_convert_is_refused_by_name(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """A BMI in kg (not kg/m2): 422 naming the feature and the unit, nothing written."""
    body = _first_bundle()
    in_kg = {"value": 81.0, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}
    bmi = _bmi(
        body, "urn:uuid:0b6f2a50-0000-4000-8000-00000000b0e1", system="http://loinc.org",
        status="final", when="2019-06-01T10:00:00Z", value=in_kg,
    )  # fmt: skip
    body["entry"].append({**bmi, "request": {"method": "POST", "url": "Observation"}})
    response = _post(api, _key(pg_sessions), body)
    assert response.status_code == 422, response.text
    text = json.dumps(response.json())
    assert "bmi" in text and "kg" in text and "81" not in text  # the value is not echoed
    assert _cases(pg_sessions) == 0


def test_entries_the_bundle_does_not_read_are_named_in_the_response(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """A heart rate whose subject is a Group is not read: the sender is told, with the entry's
    place, in the accepted patient's outcome and in a refusal, not left to guess why a value it
    sent was imputed."""
    body = _first_bundle()
    entry = _bmi(
        body, "urn:uuid:0b6f2a50-0000-4000-8000-00000000b0e2", system="http://loinc.org",
        status="final", when="2019-06-01T10:00:00Z",
        value={"value": 31.0, "system": "http://unitsofmeasure.org", "code": "kg/m2"},
    )  # fmt: skip
    entry["resource"]["subject"] = {"reference": "Group/ward-7"}
    body["entry"].append(entry)
    where = f"Bundle.entry[{len(body['entry']) - 1}].resource.subject"
    headers = _key(pg_sessions)

    accepted = _post(api, headers, body)
    assert accepted.status_code == 202, accepted.text
    (issues,) = [e["response"]["outcome"]["issue"] for e in accepted.json()["entry"]]
    (note,) = [i for i in issues if i.get("expression") == [where]]
    assert note["severity"] == "warning" and "Group" in note["diagnostics"]

    refused = _post(api, headers, _without_birth_date(body))
    assert refused.status_code == 422
    assert [where] in [i.get("expression") for i in refused.json()["issue"]]


def test_the_audit_trail_names_the_patient_a_search_was_for(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    from db.tables import AuditEvent

    headers = _key(pg_sessions)
    api.get("/v1/fhir/RiskAssessment", headers=headers, params={"subject": "Patient/abc-1"})
    with pg_sessions() as s:
        (event,) = s.scalars(select(AuditEvent)).all()
    assert event.action == "GET /v1/fhir/RiskAssessment"
    assert event.resource == "subject=Patient/abc-1" and event.outcome == "ok"


def test_a_refused_search_audits_only_a_patient_reference(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """subject=<an MRN> was refused (400) and the MRN written into the audit trail as it came
    (an MRN with a ':' is no Patient id); a Patient reference refused for want of a key is still
    named."""
    from db.tables import AuditEvent

    headers = _key(pg_sessions)
    refused = api.get(
        "/v1/fhir/RiskAssessment", headers=headers, params={"subject": "MRN:CANARY-4471"}
    )
    assert refused.status_code == 400
    denied = api.get("/v1/fhir/RiskAssessment", params={"subject": "Patient/abc-1"})
    assert denied.status_code == 401
    with pg_sessions() as s:
        rows = [
            (e.status, e.resource) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))
        ]
    assert rows == [(400, ""), (401, "subject=Patient/abc-1")]


def test_a_refused_search_by_patient_audits_the_patient_like_one_by_subject(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """patient= is the same search as subject= (86157ae): a request by patient=Patient/<id>
    refused before its route ran (no key, a client without the scope, XML asked for) must name
    that patient in its audit row as subject= does; it named none, so a denied look-up of a
    patient's risk could not be traced to the patient."""
    from db.tables import AuditEvent

    no_scope = _key(pg_sessions, "hospital-b", "cases:submit")
    asked = [
        ({}, {"patient": "Patient/abc-1"}),
        (no_scope, {"patient": "Patient/abc-2"}),
        (_key(pg_sessions), {"patient": "Patient/abc-3", "_format": "xml"}),
        ({}, {"patient": "MRN:CANARY-4471"}),
    ]
    statuses = [
        api.get("/v1/fhir/RiskAssessment", headers=h, params=p).status_code for h, p in asked
    ]
    assert statuses == [401, 403, 406, 401]
    with pg_sessions() as s:
        rows = [e.resource for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert rows == ["subject=Patient/abc-1", "subject=Patient/abc-2", "subject=Patient/abc-3", ""]


def test_an_identifier_search_audits_every_patient_it_answered_for(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """The audit row's resource was cut at 200 characters: a search whose identifier five
    patients carry (one MRN value in five hospitals' systems) named four and a half of them."""
    from db.tables import AuditEvent

    headers = _key(pg_sessions)
    example = json.loads((Path(__file__).parents[2] / "examples/patient-bundle.json").read_text())
    subjects = []
    for n in range(5):
        body = copy.deepcopy(example)
        patient = body["entry"][0]["resource"]
        patient["id"] = f"a-patient-id-as-long-as-a-uuid-0000000{n}"
        patient["identifier"] = [{"system": f"urn:hospital-{n}:mrn", "value": "SHARED-77"}]
        assert _post(api, headers, body).status_code == 202
        subjects.append(f"Patient/{patient['id']}")
    search = api.get(
        "/v1/fhir/RiskAssessment", headers=headers, params={"patient.identifier": "SHARED-77"}
    )
    assert search.status_code == 200
    with pg_sessions() as s:
        (event,) = s.scalars(select(AuditEvent).where(AuditEvent.action.like("GET %"))).all()
    assert event.resource == "subject=" + ",".join(subjects)


def test_a_patient_who_died_before_as_of_is_not_scored(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    body = _first_bundle()
    for entry in body["entry"]:
        if entry["resource"]["resourceType"] == "Patient":
            entry["resource"]["deceasedDateTime"] = "2015-03-01T00:00:00+00:00"
    response = _post(api, _key(pg_sessions), body)
    assert response.status_code == 422
    assert "deceased before as_of" in response.json()["issue"][0]["diagnostics"]
    assert _cases(pg_sessions) == 0


def test_a_patient_without_an_id_gets_one_and_is_found_by_its_identifier(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """An id-less Patient (urn:uuid only) gets a server-assigned id in the response; its
    RiskAssessment is found by subject, subject:identifier and patient.identifier, by this
    tenant only; the same patient sent again gets the same id (and no second case)."""
    body = _first_bundle()
    for entry in body["entry"]:
        if entry["resource"]["resourceType"] == "Patient":
            entry["resource"].pop("id")
            entry["resource"]["identifier"] = [{"system": "urn:mrn:a", "value": "MRN-77"}]
    headers = _key(pg_sessions)
    first = _post(api, headers, body).json()["entry"][0]["response"]
    subject = first["location"].split("=", 1)[1]
    assert re.fullmatch(r"Patient/mb-[0-9a-f]{32}", subject)
    assert any(subject in i["diagnostics"] for i in first["outcome"]["issue"])
    again = _post(api, headers, body).json()["entry"][0]["response"]
    assert again["location"] == first["location"] and again["status"] == "200 OK"
    with pg_sessions() as s:
        ids = list(s.scalars(select(Case.id)))
    model = LoadedModel(Registry.load().resolve("whas500-mortality"), device="cpu")
    score_cases(ids, sessions=pg_sessions, load_model=lambda n, v: model)
    for params in (
        {"subject": subject},
        # R4's search parameter for a RiskAssessment's Patient is ``patient``; a reference
        # parameter takes the bare id too. Both were a 400.
        {"patient": subject},
        {"patient": subject.removeprefix("Patient/")},
        {"subject": subject.removeprefix("Patient/")},
        {"subject:identifier": "urn:mrn:a|MRN-77"},
        {"patient.identifier": "MRN-77"},
    ):
        found = api.get("/v1/fhir/RiskAssessment", headers=headers, params=params).json()
        assert found["total"] == 1, params
        assert found["entry"][0]["resource"]["subject"]["reference"] == subject
    for params in ({"subject:identifier": "urn:mrn:b|MRN-77"}, {"patient.identifier": "|MRN-77"}):
        assert (
            api.get("/v1/fhir/RiskAssessment", headers=headers, params=params).json()["total"] == 0
        )
    other = _key(pg_sessions, "hospital-b")
    theirs = api.get(
        "/v1/fhir/RiskAssessment", headers=other, params={"patient.identifier": "MRN-77"}
    )
    assert theirs.json()["total"] == 0
    with pg_sessions() as s:
        stored = s.scalars(select(PatientIdentifier.value_sha256)).all()
    assert stored and all("MRN-77" not in v for v in stored)  # kept as a digest only


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"subject": "Patient/a", "subject:identifier": "urn:mrn:a|1"},
        {"subject": "Patient/a", "patient": "Patient/a"},
        {"patient": "Location/ward-1"},
        {"subject:identifier": "urn:mrn:a|"},
        {"patient.identifier": "x" * 501},
    ],
)
def test_a_search_needs_exactly_one_patient_criterion(
    api: TestClient, pg_sessions: sessionmaker[Session], params: dict[str, str]
) -> None:
    response = api.get("/v1/fhir/RiskAssessment", headers=_key(pg_sessions), params=params)
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"
    assert "MRN" not in response.text


def test_the_risk_assessment_and_the_case_record_list_what_was_imputed_and_ignored(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """Synthea's bundle has no LOINC vitals; add an entered-in-error BMI: both the
    RiskAssessment and GET /v1/cases/{id} say which values were imputed and which was ignored."""
    body = _first_bundle()
    body["entry"].append(
        _bmi(
            body, "urn:uuid:0b6f2a50-0000-4000-8000-00000000e1e1",
            system="urn:oid:2.16.840.1.113883.6.1", status="entered-in-error",
            when="2019-12-31T10:00:00Z", value={"value": 250, "unit": "kg/m^2"},
        )
    )  # fmt: skip
    headers = _key(pg_sessions)
    response = _post(api, headers, body)
    assert response.status_code == 202, response.text
    case_id = int(response.json()["entry"][0]["response"]["etag"].split("-")[1].rstrip('"'))
    model = LoadedModel(Registry.load().resolve("whas500-mortality"), device="cpu")
    score_cases([case_id], sessions=pg_sessions, load_model=lambda n, v: model)
    record = api.get(f"/v1/cases/{case_id}", headers=headers).json()["fhir"]
    assert [i["feature"] for i in record["imputations"]] == [
        "heart_rate",
        "systolic_bp",
        "diastolic_bp",
        "bmi",
    ]
    assert record["ignored"] == [
        {
            "feature": "bmi",
            "resource": "urn:uuid:0b6f2a50-0000-4000-8000-00000000e1e1",
            "reason": "status entered-in-error: not a result",
        }
    ]
    subject = response.json()["entry"][0]["response"]["location"].split("=", 1)[1]
    risk = api.get("/v1/fhir/RiskAssessment", headers=headers, params={"subject": subject}).json()
    notes = [n["text"] for n in risk["entry"][0]["resource"]["note"]]
    assert sum(n.startswith("imputed ") for n in notes) == 4
    assert any("urn:uuid:0b6f2a50-0000-4000-8000-00000000e1e1" in n for n in notes)
    assert "250" not in json.dumps(notes)


def test_a_risk_assessment_tells_its_attributions_for_each_model_kind(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """The RiskAssessment says the attributions are pending, then carries them: the event
    Transformer's steps with their codes (it has no per-feature ones), or says why they failed."""
    from datetime import timedelta

    from tests.helpers import score_collecting_explanations
    from worker.tasks.explain import explain_cases

    headers = _key(pg_sessions)
    events = [{"events": [5, 17, 900, 17]}, {"events": [3, 3, 1000]}]
    cases = [
        {"external_id": f"ev-{i}", "model": "events-transformer@0.1.0", "features": f}
        for i, f in enumerate(events)
    ]
    ids = [c["id"] for c in api.post("/v1/cases", headers=headers, json=cases).json()["cases"]]
    model = LoadedModel(Registry.load().resolve("events-transformer@0.1.0"), device="cpu")
    _, sent = score_collecting_explanations(pg_sessions, ids, lambda n, v: model, explain_top_k=3)
    with pg_sessions() as s:
        rows = s.execute(select(Score.case_id, Score.id).where(Score.case_id.in_(ids)))
        scores = {r.case_id: r.id for r in rows}

    def notes(case_id: int) -> list[str]:
        found = api.get(f"/v1/fhir/RiskAssessment/{scores[case_id]}", headers=headers)
        return [n["text"] for n in found.json().get("note", [])]

    assert notes(ids[0]) == ["feature attributions pending: they follow the score"]
    with session_scope(pg_sessions) as s:
        s.execute(update(Case).where(Case.id == ids[1]).values(features={"events": ["x"]}))
    explain_cases(
        sent[0],
        sessions=pg_sessions,
        load_model=lambda n, v: model,
        lease=repo.Lease("test:1:explain", timedelta(seconds=30)),
        top_k=3,
    )
    (steps,) = notes(ids[0])
    assert steps.startswith("steps weighing most in the log-odds (layer_integrated_gradients): ")
    shown = {(int(t), int(c)) for t, c in re.findall(r"step (\d) \(code (\d+)\) [+-]", steps)}
    assert len(shown) == 3 and shown <= {(0, 5), (1, 17), (2, 900), (3, 17)}
    assert notes(ids[1]) == [
        "no feature attributions: features could not be prepared for the model (featurize raised)"
    ]


@pytest.mark.parametrize(
    ("params", "accept", "expression"),
    [
        ({"_format": "xml"}, None, "_format"),
        ({"_format": "application/fhir+xml"}, "application/fhir+json", "_format"),
        ({}, "application/fhir+xml", "header.accept"),
        ({}, "application/xml, text/turtle;q=0.5", "header.accept"),
    ],
)
def test_a_request_for_xml_is_406_not_answered_in_json(
    api: TestClient, pg_sessions: sessionmaker[Session], params, accept, expression
) -> None:  # type: ignore[no-untyped-def]
    """An engine that asks for XML (``_format`` or ``Accept``) got JSON it could not parse, with
    the patients queued; R4 §3.1.0.1.10: 406, an OperationOutcome naming where it asked."""
    headers = _key(pg_sessions) | ({"Accept": accept} if accept else {})
    posted = _post(api, headers, _first_bundle(), **params)
    search = {"subject": "Patient/x", **params}
    searched = api.get("/v1/fhir/RiskAssessment", headers=headers, params=search)
    for response in (posted, searched):
        assert response.status_code == 406, response.text
        [issue] = response.json()["issue"]
        assert issue["code"] == "not-supported" and issue["expression"] == [expression]
    assert _cases(pg_sessions) == 0


@pytest.mark.parametrize(
    ("params", "accept"),
    [
        ({"_format": "json"}, None),
        ({"_format": "application/fhir+json"}, "application/fhir+xml"),
        ({}, "application/fhir+json;fhirVersion=4.0"),
        ({}, "application/json+fhir"),
        ({}, "text/html,application/xhtml+xml,*/*;q=0.8"),
    ],
)
def test_a_request_for_json_in_any_spelling_is_answered(
    api: TestClient, pg_sessions: sessionmaker[Session], params, accept
) -> None:  # type: ignore[no-untyped-def]
    headers = _key(pg_sessions) | ({"Accept": accept} if accept else {})
    assert _post(api, headers, _first_bundle(), **params).status_code == 202
    search = {"subject": "Patient/x", **params}
    assert api.get("/v1/fhir/RiskAssessment", headers=headers, params=search).status_code == 200


def test_a_bundle_sent_as_the_dstu2_media_type_is_read(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """Engines configured for DSTU2 still label JSON ``application/json+fhir``: it was a 415."""
    raw = json.dumps(_first_bundle()).encode()
    headers = _key(pg_sessions) | {"Content-Type": "application/json+fhir; charset=utf-8"}
    response = api.post("/v1/fhir", headers=headers, content=raw, params={"as_of": AS_OF})
    assert response.status_code == 202, response.text
    assert _cases(pg_sessions) == 1


def test_a_batch_answers_each_patient_in_its_place_in_the_bundle(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """Refusals came after every acceptance, out of the Bundle's order; and two refused id-less
    Patients given one server id (the same identifier) got one answer between them."""
    first, second = (json.loads(p.read_text()) for p in _bundles()[:2])
    twins = []
    for n in range(2):
        twin = copy.deepcopy(_patient(_without_birth_date(first)))
        twin["fullUrl"] = f"urn:uuid:00000000-0000-4000-8000-00000000000{n}"
        twin["resource"].pop("id")
        twin["resource"]["identifier"] = [{"system": "urn:mrn:a", "value": "MRN-TWIN"}]
        twins.append(twin)
    body = {"resourceType": "Bundle", "type": "batch", "entry": [*twins, *second["entry"]]}
    headers = _key(pg_sessions)
    response = _post(api, headers, body)
    assert response.status_code == 202, response.text
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert statuses == ["422 Unprocessable Entity", "422 Unprocessable Entity", "202 Accepted"]
    told = [json.dumps(e["response"]["outcome"]) for e in response.json()["entry"][:2]]
    assert "patient 1 of the Bundle" in told[0] and "patient 2 of the Bundle" in told[1]
    assert _cases(pg_sessions) == 1
    refused = _post(api, headers, {**body, "entry": twins})
    assert refused.status_code == 422
    said = " ".join(i["diagnostics"] for i in refused.json()["issue"])
    assert "patient 1 of the Bundle" in said and "patient 2 of the Bundle" in said
    assert "MRN-TWIN" not in refused.text


def test_an_invalid_entry_refuses_its_patient_not_the_batch(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """A BMI sent with a time without its zone refused every patient of the batch (400);
    now its patient is answered 400 in its place, naming the element, and the others queued."""
    first, second = (json.loads(p.read_text()) for p in _bundles()[:2])
    bmi = _bmi(
        first,
        "urn:uuid:00000000-0000-4000-8000-0000000000b1",
        system="http://loinc.org",
        status="final",
        when="2019-12-01T08:00:00",
        value={"value": 27.0, "unit": "kg/m2"},
    )
    body = {"resourceType": "Bundle", "type": "batch", "entry": first["entry"] + [bmi]}
    body["entry"] += second["entry"]
    headers = _key(pg_sessions)
    response = _post(api, headers, body)
    assert response.status_code == 202, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["400 Bad Request", "202 Accepted"]
    [problem] = entries[0]["response"]["outcome"]["issue"]
    place = len(first["entry"])
    assert problem["expression"] == [f"Bundle.entry[{place}].resource.effectiveDateTime"]
    assert problem["diagnostics"].startswith("patient 1 of the Bundle: ")
    assert "2019-12-01" not in response.text
    assert _cases(pg_sessions) == 1
    refused = _post(api, headers, {**body, "type": "transaction"})
    assert refused.status_code == 400 and _cases(pg_sessions) == 1


@pytest.mark.parametrize(("died", "status"), [("2015", 422), ("2019-12", 422), ("2020-06", 202)])
def test_a_partial_date_of_death_is_read_not_a_server_error(
    api: TestClient, pg_sessions: sessionmaker[Session], died: str, status: int
) -> None:
    """``deceasedDateTime: "2015"`` (valid R4) was a 500: datetime.fromisoformat refused it.
    A partial date counts from the start of its period, as a partial birthDate does."""
    body = _first_bundle()
    _patient(body)["resource"]["deceasedDateTime"] = died
    response = _post(api, _key(pg_sessions), body)
    assert response.status_code == status, response.text
    if status == 422:
        assert "deceased before as_of" in response.json()["issue"][0]["diagnostics"]
    assert _cases(pg_sessions) == (status == 202)


def test_the_openapi_document_states_the_406_and_the_json_formats(api: TestClient) -> None:
    """A schema-driven client (and the fuzzing run) learns the 406 and which _format is JSON."""
    paths = api.get("/openapi.json").json()["paths"]
    for path, method in [
        ("/v1/fhir", "post"),
        ("/v1/fhir/RiskAssessment", "get"),
        ("/v1/fhir/RiskAssessment/{score_id}", "get"),
    ]:
        operation = paths[path][method]
        assert "406" in operation["responses"]
        [fmt] = [p for p in operation["parameters"] if p["name"] == "_format"]
        assert "application/fhir+json" in fmt["schema"]["enum"]


def test_a_trailing_slash_is_never_a_redirect_built_from_the_host_header(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """An engine configured with the base https://host/v1/fhir/ got a 307 to
    http://<Host header>/v1/fhir (the scheme the app sees behind a TLS proxy), and re-sent the
    patients' Bundle there. The base with a slash takes the Bundle itself; any other path with
    a trailing slash is a 404 (an OperationOutcome under /v1/fhir), never a redirect."""
    headers = _key(pg_sessions)
    response = api.post(
        "/v1/fhir/",
        headers={**headers, "Content-Type": "application/fhir+json", "Host": "evil.example"},
        content=json.dumps(_first_bundle()).encode(),
        params={"as_of": AS_OF},
        follow_redirects=False,
    )
    assert response.status_code == 202, response.text
    assert response.json()["entry"][0]["response"]["status"] == "202 Accepted"
    assert _cases(pg_sessions) == 1
    for method, path in [
        ("GET", "/v1/fhir/RiskAssessment/"),
        ("GET", "/v1/fhir/metadata/"),
        ("GET", "/v1/cases/"),
    ]:
        answer = api.request(method, path, headers=headers, follow_redirects=False)
        assert answer.status_code == 404, (path, answer.status_code)
        assert "location" not in answer.headers
        if path.startswith("/v1/fhir"):
            assert answer.json()["resourceType"] == "OperationOutcome"


def test_the_base_answers_the_capabilities_interaction(api: TestClient) -> None:
    """GET [base]/metadata (R4 http.html, capabilities) is what FHIR clients read first: HAPI
    FHIR's generic client does by default and stops when it is missing. It was a 404. It is a
    valid R4 CapabilityStatement, readable without a key (it holds nothing of a tenant), that
    names the batch/transaction post and the RiskAssessment read and searches."""
    from fhir.resources.R4B.capabilitystatement import CapabilityStatement

    response = api.get(
        "/v1/fhir/metadata",
        headers={"Accept": "application/fhir+json;q=1.0, application/json+fhir;q=0.9"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    statement = CapabilityStatement.model_validate(response.json())
    assert statement.fhirVersion == "4.0.1" and statement.kind == "instance"
    (rest,) = statement.rest
    assert rest.mode == "server"
    assert {i.code for i in rest.interaction} == {"batch", "transaction"}
    (risk,) = rest.resource
    assert risk.type == "RiskAssessment"
    assert {i.code for i in risk.interaction} == {"read", "search-type"}
    assert {p.name for p in risk.searchParam} >= {"subject", "patient"}
    refused = api.get("/v1/fhir/metadata", params={"_format": "xml"})
    assert refused.status_code == 406
    assert refused.json()["resourceType"] == "OperationOutcome"
    operation = api.get("/openapi.json").json()["paths"]["/v1/fhir/metadata"]["get"]
    schema = operation["responses"]["200"]["content"]["application/fhir+json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/CapabilityStatement"}


def test_a_score_of_a_case_posted_without_a_patient_reads_as_a_valid_risk_assessment(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """A case from POST /v1/cases has no Patient: its RiskAssessment named the external id as
    subject.reference, which FHIR clients resolve as [base]/wdbc-0000, a Patient that does not
    exist. It is now an identifier of the case, in a Reference that still validates."""
    from fhir.resources.R4B.riskassessment import RiskAssessment

    from tests.helpers import wdbc_cases

    headers = _key(pg_sessions)
    assert api.post("/v1/cases", json=wdbc_cases(1), headers=headers).status_code == 202
    with pg_sessions() as s:
        ids = list(s.scalars(select(Case.id)))
    model = LoadedModel(Registry.load().resolve("breast-cancer"), device="cpu")
    score_cases(ids, sessions=pg_sessions, load_model=lambda n, v: model, explain_top_k=0)
    with pg_sessions() as s:
        (score_id,) = s.scalars(select(Score.id))
    response = api.get(f"/v1/fhir/RiskAssessment/{score_id}", headers=headers)
    assert response.status_code == 200, response.text
    risk = RiskAssessment.model_validate(response.json())
    assert risk.subject.reference is None
    assert risk.subject.identifier.system == "urn:medbatch:external-id"
    assert risk.subject.identifier.value == "wdbc-0000"


def _complete_record() -> dict:
    """A patient with every whas500 input sent and read: nothing to report."""
    loinc = "http://loinc.org"
    subject = {"reference": "Patient/full-1"}

    def quantity(value: float, unit: str) -> dict:
        return {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}

    def vital(oid: str, code: str, **value: object) -> dict:
        return {
            "resourceType": "Observation",
            "id": oid,
            "status": "final",
            "code": {"coding": [{"system": loinc, "code": code}]},
            "subject": subject,
            "effectiveDateTime": "2019-12-31T10:00:00Z",
            **value,
        }

    bp = [
        {"code": {"coding": [{"system": loinc, "code": c}]}, "valueQuantity": quantity(v, "mm[Hg]")}
        for c, v in (("8480-6", 130), ("8462-4", 80))
    ]
    resources = [
        {"resourceType": "Patient", "id": "full-1", "gender": "male", "birthDate": "1950-01-01"},
        {
            "resourceType": "Encounter",
            "id": "adm-1",
            "status": "in-progress",
            "class": {"code": "EMER"},
            "subject": subject,
            "period": {"start": "2019-12-31T08:00:00Z"},
        },
        vital("hr-1", "8867-4", valueQuantity=quantity(80, "/min")),
        vital("bp-1", "85354-9", component=bp),
        vital("bmi-1", "39156-5", valueQuantity=quantity(26, "kg/m2")),
    ]
    return {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"resource": r} for r in resources],
    }


def test_prefer_return_operation_outcome_gives_every_entry_an_outcome(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """An accepted patient with nothing to report had no outcome, whatever the Prefer header."""
    body = _complete_record()
    headers = _key(pg_sessions)
    plain = _post(api, headers, body)
    assert plain.status_code == 202 and "outcome" not in plain.json()["entry"][0]["response"]
    asked = _post(api, headers | {"Prefer": "return=OperationOutcome"}, body)
    [entry] = asked.json()["entry"]
    outcome = entry["response"]["outcome"]
    assert outcome["resourceType"] == "OperationOutcome"
    assert [i["diagnostics"] for i in outcome["issue"]] == ["already queued: nothing was added"]


def test_a_patient_named_by_an_absolute_full_url_keeps_that_id(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """``fullUrl: https://ehr.example/fhir/Patient/abc-123`` with no ``id``: the sender's
    readings cite Patient/abc-123 (and reach it), but the server gave it Patient/mb-…, so a
    search by the id the sender knows found nothing."""
    body = _first_bundle()
    patient = _patient(body)
    old_url, old_ref = patient["fullUrl"], f"Patient/{patient['resource'].pop('id')}"
    patient["fullUrl"] = "https://ehr.example/fhir/Patient/abc-123"
    text = json.dumps(body).replace(old_url, patient["fullUrl"]).replace(old_ref, "Patient/abc-123")
    response = _post(api, _key(pg_sessions), json.loads(text))
    assert response.status_code == 202, response.text
    answer = response.json()["entry"][0]["response"]
    assert answer["location"] == "RiskAssessment?subject=Patient/abc-123"
    assert "assigned" not in json.dumps(answer.get("outcome", {}))


def test_a_risk_assessment_reads_its_attributions_state_in_its_own_statement(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """The search and the read of a RiskAssessment say its attributions are pending without a
    statement of their own on the explanation ledger: the API's per-request statement count
    stays what it was before the notes told the attributions' state."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    headers = _key(pg_sessions)
    response = _post(api, headers, _first_bundle())
    subject = response.json()["entry"][0]["response"]["location"].split("=", 1)[1]
    with pg_sessions() as s:
        ids = list(s.scalars(select(Case.id)))
    model = LoadedModel(Registry.load().resolve("whas500-mortality"), device="cpu")
    score_cases(ids, sessions=pg_sessions, load_model=lambda n, v: model, explain_top_k=3)
    statements: list[str] = []

    def seen(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        statements.append(" ".join(statement.split()))

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        found = api.get("/v1/fhir/RiskAssessment", headers=headers, params={"patient": subject})
        (entry,) = found.json()["entry"]
        one = api.get(f"/v1/fhir/{entry['fullUrl']}", headers=headers)
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    pending = "feature attributions pending: they follow the score"
    assert pending in [n["text"] for n in entry["resource"]["note"]]
    assert pending in [n["text"] for n in one.json()["note"]]
    on_the_ledger = [s for s in statements if "explanations" in s]
    assert len(on_the_ledger) == 2, on_the_ledger
    assert all("JOIN explanations" in s for s in on_the_ledger), on_the_ledger


def test_a_case_sent_as_json_is_a_risk_assessment_whose_subject_is_no_false_reference(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """A case posted to /v1/cases names no Patient: its RiskAssessment's subject was
    {"reference": "<external id>"}, which is no FHIR reference (R4 references.html: a literal
    reference is Type/id, a URL or #id) and which validators refuse. Its subject is now the
    external id as an identifier, with a display; a Bundle's cases keep their Patient reference."""
    from tests.helpers import wdbc_cases

    headers = _key(pg_sessions)
    posted = api.post("/v1/cases", headers=headers, json=wdbc_cases(1, prefix="json-sent"))
    (case_id,) = [c["id"] for c in posted.json()["cases"]]
    model = LoadedModel(Registry.load().resolve("breast-cancer"), device="cpu")
    score_cases([case_id], sessions=pg_sessions, load_model=lambda n, v: model)
    with pg_sessions() as s:
        score_id = s.scalar(select(Score.id).where(Score.case_id == case_id))
    found = api.get(f"/v1/fhir/RiskAssessment/{score_id}", headers=headers)
    assert found.status_code == 200, found.text
    subject = found.json()["subject"]
    assert "reference" not in subject
    assert subject["identifier"] == {
        "system": "urn:medbatch:external-id",
        "value": "json-sent-0000",
    }


def test_a_case_posted_without_a_patient_is_found_by_the_identifier_its_subject_names(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """A case from POST /v1/cases reads back with subject.identifier = its external id (system
    urn:medbatch:external-id). R4's :identifier modifier searches that Reference.identifier,
    and the CapabilityStatement offers subject:identifier, but the search looked at Patient
    identifiers only: a client searching by the identifier it was given found nothing. It now
    finds the case (system|value or the value alone; |value means no system, which it has
    not); patient.identifier, a Patient's, still does not; another tenant does not; the audit
    row names the case by its id, not by the caller's text."""
    from db.tables import AuditEvent
    from tests.helpers import wdbc_cases

    headers = _key(pg_sessions)
    item = {**wdbc_cases(1)[0], "external_id": "MRN-CANARY-5512"}
    assert api.post("/v1/cases", json=[item], headers=headers).status_code == 202
    with pg_sessions() as s:
        (case_id,) = s.scalars(select(Case.id))
    model = LoadedModel(Registry.load().resolve("breast-cancer"), device="cpu")
    score_cases([case_id], sessions=pg_sessions, load_model=lambda n, v: model, explain_top_k=0)
    with pg_sessions() as s:
        (score_id,) = s.scalars(select(Score.id))
    read = api.get(f"/v1/fhir/RiskAssessment/{score_id}", headers=headers).json()
    named = read["subject"]["identifier"]
    token = f"{named['system']}|{named['value']}"

    def found(headers: dict, **params: str) -> list[str]:
        response = api.get("/v1/fhir/RiskAssessment", headers=headers, params=params)
        assert response.status_code == 200, response.text
        return [e["resource"]["id"] for e in response.json().get("entry", [])]

    assert found(headers, **{"subject:identifier": token}) == [str(score_id)]
    assert found(headers, **{"subject:identifier": named["value"]}) == [str(score_id)]
    assert found(headers, **{"subject:identifier": f"|{named['value']}"}) == []
    assert found(headers, **{"subject:identifier": f"urn:other|{named['value']}"}) == []
    assert found(headers, **{"patient.identifier": token}) == []
    other = _key(pg_sessions, "hospital-b")
    assert found(other, **{"subject:identifier": token}) == []
    with pg_sessions() as s:
        rows = [
            e.resource
            for e in s.scalars(
                select(AuditEvent)
                .where(AuditEvent.action == "GET /v1/fhir/RiskAssessment")
                .order_by(AuditEvent.id)
            )
        ]
    assert rows[0] == f"case={case_id},subject=" and rows[1] == rows[0]
    assert not any("CANARY" in r for r in rows)


def test_the_capability_statement_names_search_parameters_by_their_codes(api: TestClient) -> None:
    """R4 CapabilityStatement.rest.resource.searchParam.name is a SearchParameter's code
    (subject, patient): "subject:identifier" (a modifier) and "patient.identifier" (a chain)
    were listed as parameters of their own, which a validator or a client building its search
    form from the statement reads as unknown parameters. They are told in the documentation of
    the parameter they modify."""
    statement = api.get("/v1/fhir/metadata").json()
    (risk,) = statement["rest"][0]["resource"]
    params = {p["name"]: p for p in risk["searchParam"]}
    assert set(params) == {"subject", "patient"}
    assert all(p["type"] == "reference" for p in params.values())
    assert "subject:identifier" in params["subject"]["documentation"]
    assert "urn:medbatch:external-id" in params["subject"]["documentation"]
    assert "patient.identifier" in params["patient"]["documentation"]
