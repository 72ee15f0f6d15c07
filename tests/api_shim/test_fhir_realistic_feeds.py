"""The realistic-feed suite: all 500 WHAS500 patients as hospitals send them (tests/fhir_feeds.py),
through the mapping, a Bulk Data export, and ``POST /v1/fhir`` on the real PostgreSQL and Redis
with a worker's scoring. For every patient: refused exactly when a value it needs cannot be
read, with the reason; otherwise the RiskAssessment's probability equals the model run directly
on the features the hospital actually sent (to 1e-6), and every imputed, ignored and flagged
value is in both the RiskAssessment and the case record."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from models.cases.inference import LoadedModel
from models.cases.registry import Registry
from models.fhir.features import FeatureResult, features_of, iter_ndjson, parse_bundle
from models.reference import survival
from tests.fhir_feeds import AS_OF, DIMENSIONS, PatientFeed, feed
from worker.tasks.scoring import score_cases

SPEC = Registry.load().resolve("whas500-mortality")
LOOKBACK_DAYS = 730
CONTINUOUS = ("age", "heart_rate", "systolic_bp", "diastolic_bp", "bmi")


def _feeds(*, force_ids: bool = False) -> list[PatientFeed]:
    x, _, _ = survival.load()
    train = survival.split().x_train
    names = survival.FEATURE_NAMES
    bounds = {
        n: (float(train[:, names.index(n)].min()), float(train[:, names.index(n)].max()))
        for n in CONTINUOUS
    }
    return [
        feed(i, dict(zip(names, map(float, row), strict=True)), spec=SPEC, flag_bounds=bounds,
             force_ids=force_ids)
        for i, row in enumerate(x)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def feeds() -> list[PatientFeed]:
    return _feeds()


def _check_mapping(f: PatientFeed, result: FeatureResult) -> list[str]:
    """Every way ``result`` differs from what the feed must give; empty when it agrees."""
    wrong = []
    if {i["resource"] for i in result.ignored} != f.ignored:
        wrong.append(
            f"ignored {sorted(i['resource'] for i in result.ignored)} != {sorted(f.ignored)}"
        )
    if f.refusal is not None:
        name, fragment = f.refusal
        if set(result.problems) != {name} or fragment not in result.problems[name]:
            wrong.append(f"expected a refusal for {name} ({fragment}), got {result.problems}")
        return wrong
    assert f.expected is not None
    if result.problems:
        return [*wrong, f"unexpected refusal {result.problems}"]
    off = [k for k, v in f.expected.items() if abs(result.features[k] - v) > 1e-9]
    if off:
        wrong.append(f"features differ: {off}")
    if set(result.imputed) != f.imputed or {i["feature"] for i in result.imputations} != f.imputed:
        wrong.append(f"imputed {result.imputed} != {sorted(f.imputed)}")
    if {i["feature"] for i in result.flagged} != f.flagged:
        wrong.append(f"flagged {result.flagged} != {sorted(f.flagged)}")
    if not set(result.basis) <= f.citations or any("?" in b for b in result.basis):
        wrong.append(f"basis cites what was not sent: {result.basis}")
    if len(result.notes) != f.notes:
        wrong.append(f"notes {result.notes}")
    return wrong


def test_every_variation_is_exercised(feeds: list[PatientFeed]) -> None:
    """500 patients, and each choice of every dimension is taken by at least 5 of them."""
    assert len(feeds) == 500
    taken = Counter((dim, choice) for f in feeds for dim, choice in f.choices.items())
    for dim, options in DIMENSIONS.items():
        for choice, _ in options:
            assert taken[(dim, choice)] >= 5, (dim, choice)


def test_the_mapping_reads_every_patient_as_sent(feeds: list[PatientFeed]) -> None:
    """Each patient's Bundle, parsed and mapped: the features, refusals and reports expected."""
    wrong = {}
    for f in feeds:
        data = {"resourceType": "Bundle", "type": "collection", "entry": f.entries}
        (record,) = parse_bundle(data).patients.values()
        result = features_of(SPEC, record, as_of=AS_OF, lookback_days=LOOKBACK_DAYS)
        if problems := _check_mapping(f, result):
            wrong[f.index] = problems
    assert wrong == {}


def test_a_bulk_export_of_the_feeds_gives_the_same(tmp_path: Path) -> None:
    """The same patients as a Bulk Data export (ids and relative references, as $export
    writes): streamed, each record gives what the Bundle gives."""
    feeds = _feeds(force_ids=True)
    files: dict[str, list[str]] = {}
    for f in feeds:
        for entry in f.entries:
            resource = entry["resource"]
            files.setdefault(resource["resourceType"], []).append(json.dumps(resource))
    for rtype, lines in files.items():
        (tmp_path / f"{rtype}.ndjson").write_text("\n".join(lines) + "\n")
    export = iter_ndjson(tmp_path, SPEC, as_of=AS_OF, lookback_days=LOOKBACK_DAYS)
    by_ref = {r.reference: r for r in export}
    assert export.issues == [] and len(by_ref) == 500
    wrong = {}
    for f in feeds:
        result = features_of(
            SPEC, by_ref[f"Patient/p{f.index}"], as_of=AS_OF, lookback_days=LOOKBACK_DAYS
        )
        if problems := _check_mapping(f, result):
            wrong[f.index] = problems
    assert wrong == {}


# --- over HTTP --------------------------------------------------------------------------------


def _groups(feeds: list[PatientFeed]) -> list[tuple[str, list[PatientFeed]]]:
    """How the engine sends them: a third one transaction per patient, the rest in batch and
    collection Bundles of 25 (a transaction is all or nothing, so it holds one patient)."""
    groups: list[tuple[str, list[PatientFeed]]] = [("transaction", [f]) for f in feeds[:170]]
    rest = feeds[170:]
    for n, start in enumerate(range(0, len(rest), 25)):
        groups.append(("batch" if n % 2 == 0 else "collection", rest[start : start + 25]))
    return groups


@pytest.mark.integration
def test_every_patient_over_http_is_scored_exactly_or_refused_with_its_reason(
    api: TestClient, pg_sessions: sessionmaker[Session], feeds: list[PatientFeed]
) -> None:
    with session_scope(pg_sessions) as s:
        _, key = repo.create_tenant(s, name="hospital-feeds")
    headers = {"Authorization": f"Bearer {key}"}
    posted: dict[int, dict[str, Any]] = {}  # patient index -> its response entry
    for kind, group in _groups(feeds):
        body = {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [e for f in group for e in f.entries],
        }
        response = api.post(
            "/v1/fhir",
            headers={**headers, "Content-Type": "application/fhir+json"},
            content=json.dumps(body).encode(),
            params={"as_of": AS_OF.isoformat(), "lookback_days": str(LOOKBACK_DAYS)},
        )
        refused = [f for f in group if f.refusal is not None]
        if kind == "transaction" and refused:
            assert response.status_code == 422, response.text
            (f,) = group
            text = json.dumps(response.json())
            assert f"{f.refusal[0]}: " in text and f.refusal[1] in text  # type: ignore[index]
            posted[f.index] = {"refused": response.json()["issue"]}
            continue
        assert response.status_code == 202, response.text
        entries = response.json()["entry"]
        # One entry per patient, in the Bundle's order.
        for f, entry in zip(group, entries, strict=True):
            if f.refusal is None:
                assert entry["response"]["status"] == "202 Accepted"
                posted[f.index] = entry["response"]
                continue
            assert entry["response"]["status"] == "422 Unprocessable Entity"
            text = json.dumps(entry["response"]["outcome"])
            assert f"{f.refusal[0]}: " in text and f.refusal[1] in text  # type: ignore[index]
            posted[f.index] = {"refused": entry["response"]["outcome"]["issue"]}

    # Score every case as a worker does, then read each back as a RiskAssessment.
    case_ids = {
        f.index: int(re.fullmatch(r'W/"case-(\d+)"', posted[f.index]["etag"])[1])  # type: ignore[index]
        for f in feeds
        if f.refusal is None
    }
    model = LoadedModel(SPEC, device="cpu")
    score_cases(
        sorted(case_ids.values()), sessions=pg_sessions, load_model=lambda n, v: model,
        explain_top_k=0,
    )  # fmt: skip
    accepted = [f for f in feeds if f.refusal is None]
    direct = model.score([f.expected for f in accepted])  # type: ignore[misc]

    wrong: dict[int, list[str]] = {}
    for f, row in zip(accepted, direct, strict=True):
        problems = _check_over_http(api, headers, f, posted[f.index], case_ids[f.index], row.score)
        if problems:
            wrong[f.index] = problems
    assert wrong == {}

    refusals = Counter(f.refusal[0] for f in feeds if f.refusal is not None)
    summary = {
        "patients": len(feeds),
        "variations": sum(len(o) for o in DIMENSIONS.values()),
        "scored": len(accepted),
        "refused": dict(refusals),
        "imputations_reported": sum(len(f.imputed) for f in accepted),
        "ignored_reported": sum(len(f.ignored) for f in feeds),
        "flags_reported": sum(len(f.flagged) for f in accepted),
        "server_assigned_ids": sum(f.subject is None for f in accepted),
    }
    print("realistic feeds:", json.dumps(summary))
    assert summary["refused"] and summary["imputations_reported"] and summary["ignored_reported"]


def _check_over_http(
    api: TestClient,
    headers: dict[str, str],
    f: PatientFeed,
    response: dict[str, Any],
    case_id: int,
    direct: float,
) -> list[str]:
    wrong = []
    subject = response["location"].split("=", 1)[1]
    issues = (response.get("outcome") or {}).get("issue", [])
    text = json.dumps(issues)
    if f.subject is None:
        # The server gave the id-less Patient one, said so, and its identifier finds it.
        if not any("the server assigned " + subject in i["diagnostics"] for i in issues):
            wrong.append("no assigned id in the response")
        system, value = f.identifier
        search = {
            "subject:identifier" if f.index % 2 else "patient.identifier": f"{system}|{value}"
        }
    else:
        if subject != f.subject:
            wrong.append(f"subject {subject} != {f.subject}")
        search = {"subject": subject}
    found = api.get("/v1/fhir/RiskAssessment", headers=headers, params=search).json()
    if found.get("total") != 1:
        return [*wrong, f"search {search} found {found.get('total')}"]
    risk = found["entry"][0]["resource"]
    if abs(risk["prediction"][0]["probabilityDecimal"] - direct) > 1e-6:
        wrong.append(f"probability {risk['prediction'][0]['probabilityDecimal']} != {direct}")
    notes = " | ".join(n["text"] for n in risk.get("note", []))
    basis = [b.get("reference") for b in risk.get("basis", [])]
    if not set(basis) <= f.citations or None in basis:
        wrong.append(f"basis does not resolve in what was sent: {basis}")
    record = api.get(f"/v1/cases/{case_id}", headers=headers).json()["fhir"]
    reported = {
        "imputed": {i["feature"] for i in record["imputations"]},
        "ignored": {i["resource"] for i in record["ignored"]},
        "flagged": {i["feature"] for i in record["flagged"]},
    }
    if reported != {"imputed": f.imputed, "ignored": f.ignored, "flagged": f.flagged}:
        wrong.append(f"case record reports {reported}")
    for name in f.imputed:
        if f"imputed {name} = " not in notes or f"{name} imputed" not in text:
            wrong.append(f"imputation of {name} not in the RiskAssessment and the response")
    for cite in f.ignored:
        if f": {cite}: " not in notes or cite not in text:
            wrong.append(f"ignored {cite} not in the RiskAssessment and the response")
    for name in f.flagged:
        if f"flagged {name}: " not in notes:
            wrong.append(f"flag on {name} not in the RiskAssessment")
    return wrong
