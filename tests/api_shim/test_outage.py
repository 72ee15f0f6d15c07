"""A database or broker outage is a 503 with Retry-After and a JSON body (an OperationOutcome on
FHIR routes), never a 500 or a dropped connection; /readyz names what is down."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api_shim.main import create_app
from api_shim.outage import unavailable_dependency
from medbatch.settings import Settings
from tests.helpers import wdbc_cases

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def no_database(redis_url: str) -> Iterator[TestClient]:
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/medbatch"
    with TestClient(create_app(Settings(database_url=url, broker_url=redis_url))) as client:
        yield client


AUTH = {"Authorization": "Bearer mbk_whatever"}


@pytest.mark.parametrize(
    ("method", "path", "body", "headers"),
    [
        ("POST", "/v1/cases", wdbc_cases(1), AUTH),
        ("POST", "/v1/cases", wdbc_cases(1), {**AUTH, "Idempotency-Key": "k-1"}),
        ("GET", "/v1/cases/1", None, AUTH),
        ("GET", "/v1/scores", None, AUTH),
        ("GET", "/v1/models", None, AUTH),
    ],
)
def test_every_route_answers_503_when_the_database_is_down(
    no_database: TestClient, method: str, path: str, body: object, headers: dict
) -> None:
    """The API-key lookup, the Idempotency-Key store and the routes all meet the outage: 503."""
    response = no_database.request(method, path, json=body, headers=headers)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "5"
    assert response.json()["unavailable"] == "database"
    assert "nothing was lost" in response.json()["detail"]


def test_the_outage_log_names_the_route_not_the_path(
    no_database: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The 503's log line carried the path as it came: an MRN sent in place of a case id."""
    for path in ("/v1/cases/MRN-CANARY-4471", "/v1/fhir/RiskAssessment/MRN-CANARY-4471"):
        assert no_database.get(path, headers=AUTH).status_code == 503
    assert "MRN-CANARY" not in caplog.text
    assert "GET /v1/cases/{case_id}: 503, database unreachable" in caplog.text
    assert "GET /v1/fhir/RiskAssessment/{score_id}: 503" in caplog.text


def test_fhir_routes_answer_an_operation_outcome(no_database: TestClient) -> None:
    """On /v1/fhir the 503 is a FHIR OperationOutcome with issue code 'transient'."""
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": []}
    response = no_database.post("/v1/fhir", json=bundle, headers=AUTH)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert [i["code"] for i in outcome["issue"]] == ["transient"]


def test_readyz_names_the_database_and_healthz_still_answers(no_database: TestClient) -> None:
    """/readyz: 503 naming the database (the broker is up); /healthz: the process lives."""
    ready = no_database.get("/readyz")
    assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
    assert ready.json()["database"].startswith("unreachable") and ready.json()["broker"] == "ok"
    assert no_database.get("/healthz").status_code == 200


def test_only_outages_are_outages() -> None:
    """Broker connection errors and database outages are named; data errors are not."""
    import kombu.exceptions
    import redis
    from sqlalchemy.exc import DataError, IntegrityError, OperationalError

    assert unavailable_dependency(redis.ConnectionError("down")) == "broker"
    assert unavailable_dependency(kombu.exceptions.OperationalError("down")) == "broker"
    assert unavailable_dependency(OperationalError("SELECT 1", {}, Exception("x"))) == "database"
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = OperationalError("SELECT 1", {}, Exception("x"))
    assert unavailable_dependency(wrapped) == "database"
    assert unavailable_dependency(DataError("x", {}, Exception("x"))) is None
    assert unavailable_dependency(IntegrityError("x", {}, Exception("x"))) is None
    assert unavailable_dependency(ValueError("x")) is None
