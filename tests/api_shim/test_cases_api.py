"""POST /v1/cases and the result queries, against the real PostgreSQL and the real Redis."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api_shim.main import create_app
from db import repo
from db.engine import session_scope
from db.tables import Case, Score
from medbatch.settings import Settings
from tests.helpers import (
    api_client,
    queued_case_ids,
    register_breast_cancer,
    score_row,
    wdbc_cases,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def api_settings() -> dict[str, object]:
    return {"max_body_bytes": 256 * 1024}


@pytest.fixture
def key(pg_sessions: sessionmaker[Session]) -> str:
    with session_scope(pg_sessions) as s:
        return repo.create_tenant(s, name="hospital-a")[1]


@pytest.fixture
def other_key(pg_sessions: sessionmaker[Session]) -> str:
    with session_scope(pg_sessions) as s:
        return repo.create_tenant(s, name="hospital-b")[1]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


#: Called, says what is recorded now: (case rows, case ids waiting in the queues).
Counts = Callable[[], tuple[int, int]]


@pytest.fixture
def counts(pg_sessions: sessionmaker[Session], redis_client: redis.Redis) -> Counts:
    def now() -> tuple[int, int]:
        with pg_sessions() as s:
            rows = s.scalar(select(func.count()).select_from(Case)) or 0
        return rows, sum(len(v) for v in queued_case_ids(redis_client).values())

    return now


def test_accepted_cases_are_committed_then_enqueued_by_priority(
    api: TestClient, key: str, pg_sessions: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    """202 with the case ids; rows are queued in SQL and the ids sit in the queue of their priority."""
    cases = wdbc_cases(3)
    cases[0]["priority"] = "stat"
    response = api.post("/v1/cases", json=cases, headers=auth(key))
    assert response.status_code == 202, response.text
    body = response.json()
    ids = [c["id"] for c in body["cases"]]
    assert body["count"] == 3 and body["enqueued"] is True
    assert [c["model"] for c in body["cases"]] == ["breast-cancer@1.0.0"] * 3
    queued = queued_case_ids(redis_client)
    assert queued["score.stat"] == ids[:1]
    assert queued["score.routine"] == ids[1:]
    with pg_sessions() as s:
        rows = s.scalars(select(Case).order_by(Case.id)).all()
    assert [r.id for r in rows] == ids and {r.status for r in rows} == {"queued"}


def test_a_single_case_object_is_accepted(api: TestClient, key: str) -> None:
    """The body may be one case instead of a list."""
    response = api.post("/v1/cases", json=wdbc_cases(1)[0], headers=auth(key))
    assert response.status_code == 202
    assert response.json()["count"] == 1


def test_identical_resubmission_creates_and_enqueues_nothing(
    api: TestClient, key: str, redis_client: redis.Redis, counts: Counts
) -> None:
    """Posting the same cases again returns the same ids with created=false."""
    cases = wdbc_cases(2)
    first = api.post("/v1/cases", json=cases, headers=auth(key)).json()
    redis_client.flushdb()
    second = api.post("/v1/cases", json=cases, headers=auth(key)).json()
    assert [c["id"] for c in second["cases"]] == [c["id"] for c in first["cases"]]
    assert [c["created"] for c in second["cases"]] == [False, False]
    assert counts() == (2, 0)


def test_conflicting_resubmission_is_409_and_writes_nothing(
    api: TestClient, key: str, redis_client: redis.Redis, counts: Counts
) -> None:
    """An external id reused with other features is refused, with its position named (not the id)."""
    cases = wdbc_cases(1)
    api.post("/v1/cases", json=cases, headers=auth(key))
    redis_client.flushdb()
    changed = [*wdbc_cases(3, prefix="new"), {**cases[0], "features": wdbc_cases(2)[1]["features"]}]
    response = api.post("/v1/cases", json=changed, headers=auth(key))
    assert response.status_code == 409
    assert response.json()["detail"]["positions"] == [3]
    assert cases[0]["external_id"] not in response.text
    assert counts() == (1, 0)


def _with(case: dict, **features: object) -> dict:
    return {**case, "features": {**case["features"], **features}}


def _without(case: dict, name: str) -> dict:
    return {**case, "features": {k: v for k, v in case["features"].items() if k != name}}


BAD_BODIES = {
    "missing feature": (
        lambda c: [c[0], _without(c[1], "mean_radius")],
        ["body", 1, "features", "mean_radius"],
        "missing feature",
    ),
    "extra feature": (
        lambda c: [c[0], _with(c[1], shoe_size=42.0)],
        ["body", 1, "features"],
        "1 feature name(s) not in the input schema of breast-cancer",
    ),
    "wrong type": (
        lambda c: [_with(c[0], mean_area="large"), c[1]],
        ["body", 0, "features", "mean_area"],
        "expected a number",
    ),
    "number as string": (
        lambda c: [_with(c[0], mean_area="12.5"), c[1]],
        ["body", 0, "features", "mean_area"],
        "expected a number",
    ),
    "boolean": (
        lambda c: [_with(c[0], mean_area=True), c[1]],
        ["body", 0, "features", "mean_area"],
        "expected a number",
    ),
    "unknown model": (
        lambda c: [c[0], {**c[1], "model": "heart-failure"}],
        ["body", 1, "model"],
        "unknown model name (known models: breast-cancer",
    ),
    "unknown version": (
        lambda c: [{**c[0], "model": "breast-cancer@7.0.0"}, c[1]],
        ["body", 0, "model"],
        "unknown version of breast-cancer (versions: 1.0.0",
    ),
    "unknown priority": (
        lambda c: [{**c[0], "priority": "urgent"}, c[1]],
        ["body", 0, "priority"],
        "'stat', 'routine' or 'bulk'",
    ),
    "missing external id": (
        lambda c: [{k: v for k, v in c[0].items() if k != "external_id"}, c[1]],
        ["body", 0, "external_id"],
        "Field required",
    ),
    "unknown top-level field": (
        lambda c: [{**c[0], "mrn": "123"}, c[1]],
        ["body", 0, "mrn"],
        "Extra inputs are not permitted",
    ),
    "duplicate external id": (
        lambda c: [c[0], {**c[1], "external_id": c[0]["external_id"]}],
        ["body", 1, "external_id"],
        "duplicate external_id",
    ),
    "empty list": (lambda c: [], ["body"], "at least one case"),
    "not a case": (lambda c: 42, ["body"], "a case object or a list"),
}


@pytest.mark.parametrize("kind", BAD_BODIES)
def test_bad_input_is_422_naming_the_field_and_nothing_is_written_or_enqueued(
    kind: str, api: TestClient, key: str, counts: Counts
) -> None:
    """Each bad input: 422, the field's location and the problem, no row, no message."""
    make, loc, fragment = BAD_BODIES[kind]
    response = api.post("/v1/cases", json=make(wdbc_cases(2)), headers=auth(key))
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"] == loc and fragment in e["msg"] for e in errors), errors
    assert counts() == (0, 0)


def test_a_retired_version_takes_no_new_case(
    pg_url: str, redis_url: str, tmp_path: Path, key: str, counts: Counts
) -> None:
    """A case pinned to a retired version is 422 saying so; the model's page still lists it."""
    register_breast_cancer(tmp_path / "store", "0.9.0", status="retired")
    with api_client(pg_url, redis_url, tmp_path) as api:
        case = {**wdbc_cases(1)[0], "model": "breast-cancer@0.9.0"}
        response = api.post("/v1/cases", json=case, headers=auth(key))
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "model"]
        assert error["msg"] == ("that version of breast-cancer is retired (versions in use: 1.0.0)")
        assert counts() == (0, 0)
        listed = api.get("/v1/models/breast-cancer", headers=auth(key)).json()
        assert [(v["version"], v["status"]) for v in listed["versions"]] == [
            ("0.9.0", "retired"),
            ("1.0.0", "released"),
        ]


def _with_mean_area(literal: str) -> str:
    """One case as JSON text, its mean_area written as the raw JSON number ``literal``."""
    case = wdbc_cases(1)[0]
    return json.dumps([case]).replace(json.dumps(case["features"]["mean_area"]), literal, 1)


def _post_text(api: TestClient, key: str, text: str | bytes | Iterator[bytes]) -> Response:
    """POST /v1/cases with a body as it is, not encoded by the client."""
    return api.post(
        "/v1/cases", content=text, headers={**auth(key), "Content-Type": "application/json"}
    )


def _refusal_of_mean_area(response: Response) -> str:
    """The message of a 422 whose one error is at the case's mean_area."""
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", 0, "features", "mean_area"]
    return str(error["msg"])


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_422(
    literal: str, api: TestClient, key: str, counts: Counts
) -> None:
    """NaN and ±Infinity (which Python's JSON parser lets through) are refused by name."""
    text = _with_mean_area(literal)
    assert math.isnan(json.loads(text)[0]["features"]["mean_area"]) or literal != "NaN"
    assert "finite" in _refusal_of_mean_area(_post_text(api, key, text))
    assert counts() == (0, 0)


@pytest.mark.parametrize("literal", ["1e39", "-3.5e38", "1" + "0" * 400])
def test_numbers_past_float32_are_422(
    literal: str, api: TestClient, key: str, counts: Counts
) -> None:
    """Values a model's float32 would turn into infinity are refused, without echoing them."""
    response = _post_text(api, key, _with_mean_area(literal))
    message = _refusal_of_mean_area(response)
    # An integer literal past 64 bits is refused by the input guard before the float32 rule.
    assert any(rule in message for rule in ("32-bit", "finite", "64 bits"))
    assert literal not in response.text
    assert literal[:4] not in response.text.replace("3.4e38", "")
    assert counts() == (0, 0)


def test_invalid_json_is_422(api: TestClient, key: str, counts: Counts) -> None:
    """A body that is not JSON is refused with a message that says so."""
    response = _post_text(api, key, b"{not json")
    assert response.status_code == 422
    assert "not valid JSON" in response.json()["detail"][0]["msg"]
    assert counts() == (0, 0)


def test_too_many_cases_is_422(pg_url: str, key: str, redis_url: str, counts: Counts) -> None:
    """More cases than max_cases_per_request: refused whole, with the limit named."""
    settings = Settings(database_url=pg_url, broker_url=redis_url, max_cases_per_request=5)
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/cases", json=wdbc_cases(6), headers=auth(key))
    assert response.status_code == 422
    assert "at most 5 cases per request, got 6" in response.json()["detail"][0]["msg"]
    assert counts() == (0, 0)


def test_oversized_body_is_413(api: TestClient, key: str, counts: Counts) -> None:
    """A body over max_body_bytes is refused before parsing, with a JSON message."""
    response = api.post("/v1/cases", json=wdbc_cases(569), headers=auth(key))
    assert response.status_code == 413
    assert "over 262144 bytes" in response.json()["detail"]
    assert counts() == (0, 0)


def test_oversized_chunked_body_is_413(api: TestClient, key: str, counts: Counts) -> None:
    """Without a Content-Length the limit still holds, counted as the body streams in."""
    payload = json.dumps(wdbc_cases(569)).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    response = _post_text(api, key, chunks())
    assert response.status_code == 413
    assert counts() == (0, 0)


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}]
)
def test_without_a_valid_key_is_401(api: TestClient, headers: dict, counts: Counts) -> None:
    """No key, a wrong key or another scheme: 401 with a JSON reason, nothing written."""
    response = api.post("/v1/cases", json=wdbc_cases(1), headers=headers)
    assert response.status_code == 401
    assert response.json()["detail"]
    assert counts() == (0, 0)


def test_tenants_never_see_each_others_cases(api: TestClient, key: str, other_key: str) -> None:
    """Another tenant's case id is a 404 and never appears in its listing."""
    case_id = api.post("/v1/cases", json=wdbc_cases(1), headers=auth(key)).json()["cases"][0]["id"]
    assert api.get(f"/v1/cases/{case_id}", headers=auth(key)).status_code == 200
    response = api.get(f"/v1/cases/{case_id}", headers=auth(other_key))
    assert response.status_code == 404
    assert response.json() == {"detail": "no case with this id for this tenant"}
    assert api.get("/v1/scores", headers=auth(other_key)).json()["items"] == []


def test_case_id_must_be_an_integer(api: TestClient, key: str) -> None:
    """GET /v1/cases/abc is a 422 naming the path parameter."""
    response = api.get("/v1/cases/abc", headers=auth(key))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "case_id"]


def test_case_shows_its_score_with_provenance(
    api: TestClient, key: str, pg_sessions: sessionmaker[Session]
) -> None:
    """GET /v1/cases/{id} returns status and scores with model version and sha256."""
    case_id = api.post("/v1/cases", json=wdbc_cases(1), headers=auth(key)).json()["cases"][0]["id"]
    with session_scope(pg_sessions) as s:
        repo.save_scores(
            s, rows=[score_row(case_id, score=0.9, label="malignant", sha256="a" * 64)]
        )
        repo.mark_done(s, case_ids=[case_id])
    body = api.get(f"/v1/cases/{case_id}", headers=auth(key)).json()
    assert body["status"] == "done"
    assert body["scores"] == [
        {
            "model": "breast-cancer",
            "model_version": "1.0.0",
            "model_sha256": "a" * 64,
            "score": 0.9,
            "label": "malignant",
            "created_at": body["scores"][0]["created_at"],
            "explanation": None,
        }
    ]
    assert "features" not in body


def test_scores_paginate_with_a_cursor_and_filter(api: TestClient, key: str) -> None:
    """Pages of `limit` follow next_cursor to the end; filters narrow the list."""
    ids = [
        c["id"]
        for c in api.post("/v1/cases", json=wdbc_cases(7), headers=auth(key)).json()["cases"]
    ]
    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/scores", params=params, headers=auth(key)).json()
        seen += [item["case_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    assert api.get("/v1/scores", params={"status": "done"}, headers=auth(key)).json()["items"] == []
    queued = api.get(
        "/v1/scores", params={"status": "queued", "model": "breast-cancer"}, headers=auth(key)
    )
    assert len(queued.json()["items"]) == 7
    since = api.get("/v1/scores", params={"since": "2999-01-01T00:00:00Z"}, headers=auth(key))
    assert since.json()["items"] == []


def test_since_takes_rfc3339_lower_case_t_and_z(api: TestClient, key: str) -> None:
    """RFC 3339 (5.6) lets "T" and "Z" be lower case: such a `since` filters like its upper-case
    spelling (it was 422 "not a calendar date-time")."""
    ids = [
        c["id"]
        for c in api.post("/v1/cases", json=wdbc_cases(2), headers=auth(key)).json()["cases"]
    ]
    for since in ("2000-01-01T00:00:00Z", "2000-01-01t00:00:00z", "2000-01-01t00:00:00.5+01:00"):
        page = api.get("/v1/scores", params={"since": since}, headers=auth(key))
        assert page.status_code == 200, page.json()
        assert [item["case_id"] for item in page.json()["items"]] == ids
    late = api.get("/v1/scores", params={"since": "2999-01-01t00:00:00z"}, headers=auth(key))
    assert late.status_code == 200 and late.json()["items"] == []


@pytest.mark.parametrize(
    ("params", "loc", "fragment"),
    [
        ({"cursor": "garbage"}, ["query", "cursor"], "valid integer"),
        ({"cursor": str(2**64)}, ["query", "cursor"], "less than or equal to 9223372036854775807"),
        ({"limit": 100000}, ["query", "limit"], "at most 500"),
        ({"limit": 0}, ["query", "limit"], "greater than or equal to 1"),
        ({"status": "lost"}, ["query", "status"], "'queued', 'running', 'done' or 'failed'"),
        ({"since": "yesterday"}, ["query", "since"], "RFC 3339 date-time"),
        ({"since": "2026-01-01T00:00:00"}, ["query", "since"], "with an offset"),
        ({"since": "1700000000"}, ["query", "since"], "with an offset"),
        ({"since": "2026-02-30T00:00:00Z"}, ["query", "since"], "not a calendar date-time"),
    ],
)
def test_bad_query_parameters_are_422(api: TestClient, key: str, params, loc, fragment) -> None:  # type: ignore[no-untyped-def]
    """Each bad query parameter is named with its problem."""
    response = api.get("/v1/scores", params=params, headers=auth(key))
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == loc and fragment in error["msg"], error


def test_broker_down_keeps_the_cases_for_the_sweeper(
    pg_url: str, key: str, pg_sessions: sessionmaker[Session]
) -> None:
    """With the broker unreachable, cases are still committed (enqueued=false), queued and
    marked unsent (the sweeper sends them at its first sweep once the broker is back)."""
    settings = Settings(database_url=pg_url, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/cases", json=wdbc_cases(2), headers=auth(key))
        ready = client.get("/readyz")
    assert response.status_code == 202
    assert response.json()["enqueued"] is False
    with pg_sessions() as s:
        assert s.scalars(select(Case.status)).all() == ["queued", "queued"]
        assert s.scalars(select(Case.enqueued_at)).all() == [None, None]
        assert s.scalar(select(func.count()).select_from(Score)) == 0
    assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
    assert ready.json()["database"] == "ok" and ready.json()["broker"].startswith("unreachable")


def test_health_ready_metrics_and_openapi(api: TestClient) -> None:
    """healthz, readyz (both services up), /metrics and /openapi.json answer."""
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready", "database": "ok", "broker": "ok"}
    assert "medbatch_cases_submitted_total" in api.get("/metrics/").text
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/v1/cases", "/v1/cases/{case_id}", "/v1/scores", "/healthz", "/readyz"} <= set(paths)


def test_metrics_answer_at_the_documented_path(api: TestClient) -> None:
    """GET /metrics (what docs/api.md and a scrape config name) serves the metrics itself, not a
    307 to /metrics/ built from the Host header (http:// behind a TLS-terminating proxy)."""
    response = api.get("/metrics", follow_redirects=False)
    assert response.status_code == 200, response.headers.get("location")
    assert response.headers["content-type"].startswith("text/plain")
    assert "medbatch_cases_submitted_total" in response.text


def test_series_cases_are_accepted_and_ragged_ones_named(
    api: TestClient, key: str, counts: Counts
) -> None:
    """A vital-sign series goes in as channels of equal length; a ragged one is a 422 naming it."""
    from bench.workloads import vitals_series

    good, bad = vitals_series(2, seed=1)
    bad["spo2"] = bad["spo2"][:-1]
    ok = api.post(
        "/v1/cases",
        json={"external_id": "icu-1", "model": "vitals-gru", "features": good},
        headers=auth(key),
    )
    assert ok.status_code == 202 and ok.json()["cases"][0]["model"] == "vitals-gru@0.1.0"
    refused = api.post(
        "/v1/cases",
        json={"external_id": "icu-2", "model": "vitals-gru", "features": bad},
        headers=auth(key),
    )
    assert refused.status_code == 422
    (error,) = refused.json()["detail"]
    assert error["loc"] == ["body", "features", "spo2"] and "channels must align" in error["msg"]
    assert counts() == (1, 1)


def test_models_are_listed_with_schema_threshold_status_and_sha256(
    api: TestClient, key: str
) -> None:
    """GET /v1/models shows every registered version; GET /v1/models/{name} one model."""
    body = api.get("/v1/models", headers=auth(key)).json()
    names = [m["name"] for m in body["models"]]
    assert names == [
        "breast-cancer",
        "ecg-cnn",
        "events-transformer",
        "vitals-gru",
        "whas500-mortality",
    ]
    bc = api.get("/v1/models/breast-cancer", headers=auth(key)).json()
    assert bc["default_version"] == "1.0.0"
    (version,) = bc["versions"]
    assert version["status"] == "released" and version["threshold"] == 0.5
    assert [i["name"] for i in version["inputs"]][:2] == ["mean_radius", "mean_texture"]
    assert version["inputs"][0]["unit"] == "px" and len(version["sha256"]) == 64
    gru = api.get("/v1/models/vitals-gru", headers=auth(key)).json()["versions"][0]
    assert (gru["input_kind"], gru["max_length"], gru["status"]) == ("series", 48, "candidate")
    assert "NOT FOR CLINICAL USE" in gru["clinical_use"]
    whas = api.get("/v1/models/whas500-mortality", headers=auth(key)).json()["versions"][0]
    hr = next(i for i in whas["inputs"] if i["name"] == "heart_rate")
    assert hr["source"]["codes"][0]["code"] == "8867-4" and hr["source"]["time"] == "first"
    assert [(r["low"], r["high"], r["policy"]) for r in hr["ranges"]] == [
        (20.0, 300.0, "reject"),
        (35.0, 186.0, "flag"),
    ]
    female = next(i for i in whas["inputs"] if i["name"] == "female")
    assert (female["missing"], female["allowed"]) == ("reject", [0.0, 1.0])


def test_implausible_survival_inputs_are_422_naming_the_rule(
    api: TestClient, key: str, counts: Counts
) -> None:
    """Schema rules (allowed values, plausible ranges) are enforced at the door."""
    from models.reference import survival

    x, _, _ = survival.load()
    features = dict(zip(survival.FEATURE_NAMES, map(float, x[0]), strict=True))
    before = counts()
    response = api.post(
        "/v1/cases",
        headers=auth(key),
        json={
            "model": "whas500-mortality",
            "external_id": "whas-0",
            "features": {**features, "systolic_bp": 3000.0},
        },
    )
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "features", "systolic_bp"]
    assert error["msg"] == "outside the plausible range 40..300 mm[Hg]"
    assert "3000" not in response.text  # values are never echoed back
    assert counts() == before


def test_unknown_model_is_404_and_models_need_a_key(api: TestClient, key: str) -> None:
    """An unknown name is a 404 naming the known ones; without a key, 401."""
    response = api.get("/v1/models/heart-failure", headers=auth(key))
    assert response.status_code == 404
    assert "known models: breast-cancer" in response.json()["detail"]
    assert api.get("/v1/models").status_code == 401


def test_model_report_is_served_once_evaluated(
    pg_url: str, redis_url: str, key: str, tmp_path: Path
) -> None:
    """GET /v1/models/{name}/{version}/report: 404 saying how to make it, then the metrics."""
    from models.cases.registry import Registry, report_dir
    from models.reference.evaluation import evaluate

    settings = Settings(database_url=pg_url, broker_url=redis_url, artifact_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        missing = client.get("/v1/models/breast-cancer/1.0.0/report", headers=auth(key))
        assert missing.status_code == 404
        assert "medbatch models evaluate breast-cancer@1.0.0" in missing.json()["detail"]
        spec = Registry.load().resolve("breast-cancer")
        evaluate(spec, report_dir(tmp_path, spec))
        report = client.get("/v1/models/breast-cancer/1.0.0/report", headers=auth(key)).json()
        assert report["metrics"]["n"] == 114 and report["sha256"] == spec.sha256
        assert (
            client.get("/v1/models/breast-cancer/7.0.0/report", headers=auth(key)).status_code
            == 404
        )


def test_a_listed_result_says_why_its_explanation_failed(
    api: TestClient, key: str, pg_sessions: sessionmaker[Session]
) -> None:
    """GET /v1/scores, as GET /v1/cases/{id}: a failed explanation's reason, none for a done one."""
    from datetime import timedelta

    from models.cases.inference import LoadedModel
    from models.cases.registry import Registry
    from tests.helpers import score_collecting_explanations
    from worker.tasks.explain import explain_cases

    posted = api.post("/v1/cases", headers=auth(key), json=wdbc_cases(2, prefix="why"))
    ids = [c["id"] for c in posted.json()["cases"]]
    model = LoadedModel(Registry.load().resolve("breast-cancer"), device="cpu")
    _, sent = score_collecting_explanations(pg_sessions, ids, lambda n, v: model, explain_top_k=2)
    with session_scope(pg_sessions) as s:
        s.get(Case, ids[1]).features = {"mean_radius": "x"}  # type: ignore[union-attr]
    lease = repo.Lease("test:1:explain", timedelta(seconds=30))
    explain_cases(sent[0], sessions=pg_sessions, load_model=lambda n, v: model, lease=lease)
    items = api.get("/v1/scores", headers=auth(key)).json()["items"]
    reason = "features could not be prepared for the model (featurize raised)"
    assert [(i["explanation_status"], i["explanation_error"]) for i in items] == [
        ("done", None),
        ("failed", reason),
    ]
    assert api.get(f"/v1/cases/{ids[1]}", headers=auth(key)).json()["explanation_error"] == reason


def _scored_awaiting_explanations(
    api: TestClient, key: str, sessions: sessionmaker[Session], n: int, prefix: str
) -> tuple[list[int], Callable[[list[int]], object]]:
    """``n`` cases posted and scored (their explanations pending); and a function that explains
    some of them (committing on its own connection, as the explain stage does)."""
    from datetime import timedelta

    from models.cases.inference import LoadedModel
    from models.cases.registry import Registry
    from tests.helpers import score_collecting_explanations
    from worker.tasks.explain import explain_cases

    posted = api.post("/v1/cases", headers=auth(key), json=wdbc_cases(n, prefix=prefix))
    ids = [c["id"] for c in posted.json()["cases"]]
    model = LoadedModel(Registry.load().resolve("breast-cancer"), device="cpu")
    score_collecting_explanations(sessions, ids, lambda n, v: model, explain_top_k=2)
    lease = repo.Lease("test:1:explain", timedelta(seconds=30))

    def explain(case_ids: list[int]) -> object:
        return explain_cases(
            case_ids, sessions=sessions, load_model=lambda n, v: model, lease=lease, top_k=2
        )

    return ids, explain


def test_an_explanation_settled_during_a_read_is_never_done_without_its_attributions(
    api: TestClient, key: str, pg_sessions: sessionmaker[Session]
) -> None:
    """GET /v1/cases/{id} and GET /v1/scores read the score and the explanation's state in one
    snapshot. Read apart, an explanation settled between the two reads showed ``done`` with no
    attributions, and a client following ``since=`` never saw them (the case changes no more)."""
    from sqlalchemy import event

    ids, explain = _scored_awaiting_explanations(api, key, pg_sessions, 2, "mid-read")
    engine = api.app.state.engine  # type: ignore[attr-defined]
    settle_next: list[int] = []

    def settle_once_scores_are_read(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        # A real commit of the explain stage, on its own connection, at the worst moment.
        if (
            settle_next
            and statement.lstrip().upper().startswith("SELECT")
            and "scores" in statement
        ):
            explain([settle_next.pop()])

    event.listen(engine, "after_cursor_execute", settle_once_scores_are_read)
    try:
        settle_next.append(ids[0])
        case = api.get(f"/v1/cases/{ids[0]}", headers=auth(key)).json()
        settle_next.append(ids[1])
        (_, listed) = api.get("/v1/scores", headers=auth(key)).json()["items"]
    finally:
        event.remove(engine, "after_cursor_execute", settle_once_scores_are_read)
    assert settle_next == []  # both settled in the middle of a read
    assert (case["explanation_status"] == "done") == (case["scores"][0]["explanation"] is not None)
    assert (listed["explanation_status"] == "done") == (listed["explanation"] is not None)
    # Read again, both are done, with their attributions.
    again = api.get("/v1/scores", headers=auth(key)).json()["items"]
    assert [(i["explanation_status"], len(i["explanation"]["top"])) for i in again] == [
        ("done", 2),
        ("done", 2),
    ]


def test_a_pending_explanation_that_no_worker_listens_for_says_so(
    api: TestClient, key: str, pg_sessions: sessionmaker[Session]
) -> None:
    """Workers started for the scoring queues only leave every explanation pending: the case's
    detail names the explain queue, as it names a scoring queue no worker reads; a worker on the
    explain queue (or the explanation settled) leaves it empty."""
    from worker import heartbeat

    ids, explain = _scored_awaiting_explanations(api, key, pg_sessions, 2, "unheard")
    celery = api.app.state.celery  # type: ignore[attr-defined]

    def detail(case_id: int) -> str | None:
        heartbeat._cache.clear()  # the API asks the broker at most every 2 s
        body = api.get(f"/v1/cases/{case_id}", headers=auth(key)).json()
        return body["detail"]

    scoring = ["score.stat", "score.routine", "score.bulk"]
    heartbeat.beat(celery, hostname="scorer@h", queues=scoring)
    said = detail(ids[0])
    assert said is not None and "no worker is listening on queue explain" in said
    assert "medbatch worker --queues explain" in said
    heartbeat.beat(celery, hostname="explainer@h", queues=["explain"])
    assert detail(ids[0]) is None
    heartbeat.forget(celery, hostname="explainer@h")
    explain([ids[1]])
    assert detail(ids[1]) is None and detail(ids[0]) is not None


def test_a_retry_after_a_new_default_version_returns_the_first_case(
    pg_url: str, redis_url: str, tmp_path: Path, key: str, counts: Counts
) -> None:
    """An EHR feed re-sends a case naming the model only, after a new default version was
    released: the same content, so the first case (scored by the version it was sent to) with
    created false, where it was a 409. One that pins the other version is still a conflict."""
    case = wdbc_cases(1)[0]
    with api_client(pg_url, redis_url, tmp_path) as api:
        first = api.post("/v1/cases", json=case, headers=auth(key)).json()["cases"][0]
    assert first["model"] == "breast-cancer@1.0.0"
    register_breast_cancer(tmp_path / "store", "1.1.0", status="released", default=True)
    with api_client(pg_url, redis_url, tmp_path) as api:
        again = api.post("/v1/cases", json=case, headers=auth(key))
        assert again.status_code == 202, again.text
        (answer,) = again.json()["cases"]
        assert (answer["id"], answer["created"]) == (first["id"], False)
        assert answer["model"] == "breast-cancer@1.0.0"
        pinned = {**case, "model": "breast-cancer@1.1.0"}
        assert api.post("/v1/cases", json=pinned, headers=auth(key)).status_code == 409
        other = {**case, "external_id": "new-one"}
        fresh = api.post("/v1/cases", json=other, headers=auth(key)).json()["cases"][0]
        assert fresh["model"] == "breast-cancer@1.1.0" and fresh["created"] is True
    assert counts() == (2, 2)
