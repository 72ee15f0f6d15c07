"""A query parameter a route does not take: refused by name on the /v1 routes (a typo there
answered as if no filter was asked); ignored by FHIR search unless the client asks for strict
handling (real PostgreSQL)."""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api_shim.routes import cases, compounds, genome, models, plots, results
from tests.helpers import tenant_headers, wdbc_cases

pytestmark = pytest.mark.integration


@pytest.fixture
def auth(pg_sessions: sessionmaker[Session]) -> dict[str, str]:
    return tenant_headers(pg_sessions, "query-params")


def _names(response_json: dict) -> list[str]:
    return [p["loc"][-1] for p in response_json["detail"]]


def test_a_misspelt_filter_is_refused_by_name_not_ignored(
    api: TestClient, auth: dict[str, str]
) -> None:
    case = wdbc_cases(1)[0]
    assert api.post("/v1/cases", json=case, headers=auth).status_code == 202
    # The filter as spelt is taken...
    assert api.get("/v1/scores", params={"status": "done"}, headers=auth).status_code == 200
    assert api.get("/v1/scores", params={"status": "done"}, headers=auth).json()["items"] == []
    # ...a misspelt one was ignored: the queued case came back on a page asked for "done".
    response = api.get("/v1/scores", params={"statu": "done", "lmit": "5"}, headers=auth)
    assert response.status_code == 422, response.text
    body = response.json()
    assert sorted(_names(body)) == ["lmit", "statu"]
    assert all(p["type"] == "extra_forbidden" for p in body["detail"])
    assert "status" in body["detail"][0]["msg"] and "since" in body["detail"][0]["msg"]
    assert "done" not in response.text  # the value is not repeated


def test_unknown_query_parameters_are_refused_on_every_v1_route(
    api: TestClient, auth: dict[str, str]
) -> None:
    """Every /v1 route outside FHIR, with its path parameters filled: 422 naming the parameter,
    before the route does anything (a POST stores nothing)."""
    routes = [
        r
        for router in (cases, results, models, genome, compounds, plots)
        for r in router.router.routes
        if isinstance(r, APIRoute) and r.path.startswith("/v1/")
        if not r.path.startswith("/v1/fhir")
    ]
    assert len(routes) > 10
    for route in routes:
        path = route.path
        for name in route.param_convertors:
            path = path.replace("{" + name + "}", "1")
        for method in sorted(route.methods - {"HEAD"}):
            response = api.request(method, path, params={"no_such_param": "x"}, headers=auth)
            assert response.status_code == 422, (method, route.path, response.text)
            assert _names(response.json()) == ["no_such_param"], (method, route.path)


def test_a_long_unknown_name_is_cut_in_the_answer(api: TestClient, auth: dict[str, str]) -> None:
    name = "x" * 500
    response = api.get("/v1/scores", params={name: "1"}, headers=auth)
    assert response.status_code == 422
    assert _names(response.json()) == ["x" * 64]


def test_health_routes_take_a_probers_cache_buster(api: TestClient) -> None:
    assert api.get("/healthz", params={"_": "1733400000"}).status_code == 200


def test_fhir_search_ignores_unknown_parameters_unless_strict_handling_is_asked(
    api: TestClient, auth: dict[str, str]
) -> None:
    params = {"subject": "Patient/p1", "_format": "json", "no-such": "1"}
    lenient = api.get("/v1/fhir/RiskAssessment", params=params, headers=auth)
    assert lenient.status_code == 200, lenient.text
    assert lenient.json()["resourceType"] == "Bundle"
    strict = api.get(
        "/v1/fhir/RiskAssessment",
        params=params,
        headers={**auth, "Prefer": "return=representation, handling=strict"},
    )
    assert strict.status_code == 400, strict.text
    outcome = strict.json()
    assert outcome["resourceType"] == "OperationOutcome"
    text = " ".join(
        i.get("diagnostics", "") + " ".join(i.get("expression", [])) for i in outcome["issue"]
    )
    assert "no-such" in text and "_format" in text
    # Strict handling of a search that names only what the route takes: answered.
    ok = api.get(
        "/v1/fhir/RiskAssessment",
        params={"subject": "Patient/p1"},
        headers={**auth, "Prefer": "handling=strict"},
    )
    assert ok.status_code == 200, ok.text
