"""API clients with scopes, and the audit trail of every request, allowed or denied."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import AuditEvent
from medbatch.cli import main
from tests.helpers import wdbc_cases

pytestmark = pytest.mark.integration


def _client(sessions: sessionmaker[Session], tenant: str, *scopes: str) -> dict[str, str]:
    with session_scope(sessions) as s:
        found = s.scalar(select(repo.Tenant).where(repo.Tenant.name == tenant))
        tenant_id = found.id if found else repo.create_tenant(s, name=tenant)[0].id
        key = repo.create_client(s, tenant_id=tenant_id, name="engine", scopes=scopes)[1]
    return {"Authorization": f"Bearer {key}"}


def _events(sessions: sessionmaker[Session]) -> list[tuple]:
    with sessions() as s:
        return [
            (e.action, e.resource, e.status, e.outcome, e.tenant_id is not None, e.client_id)
            for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))
        ]


def test_scopes_decide_what_a_client_may_do(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    submitter = _client(pg_sessions, "hospital-a", "cases:submit")
    reader = _client(pg_sessions, "hospital-a", "results:read")
    accepted = api.post("/v1/cases", headers=submitter, json=wdbc_cases(1))
    assert accepted.status_code == 202
    case_id = accepted.json()["cases"][0]["id"]
    denied = api.get(f"/v1/cases/{case_id}", headers=submitter)
    assert denied.status_code == 403 and "results:read" in denied.json()["detail"]
    assert api.get(f"/v1/cases/{case_id}", headers=reader).status_code == 200
    assert api.post("/v1/cases", headers=reader, json=wdbc_cases(1)).status_code == 403
    genome = api.post("/v1/genome-comparisons", headers=reader, json={"metric": "king"})
    assert genome.status_code == 403 and "genome:submit" in genome.json()["detail"]


def test_unknown_scopes_are_refused() -> None:
    with pytest.raises(ValueError, match="scopes must be among"):
        repo.create_client(None, tenant_id=1, name="x", scopes=["everything"])  # type: ignore[arg-type]


def test_every_request_is_audited_with_who_what_which_and_outcome(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    a = _client(pg_sessions, "hospital-a", "cases:submit", "results:read")
    b = _client(pg_sessions, "hospital-b", "results:read")
    case_id = api.post("/v1/cases", headers=a, json=wdbc_cases(1)).json()["cases"][0]["id"]
    api.get(f"/v1/cases/{case_id}", headers=a)
    api.get(f"/v1/cases/{case_id}", headers=b)  # another tenant's case: 404
    api.get(f"/v1/cases/{case_id}")  # no key: 401
    api.post("/v1/cases", headers=b, json=wdbc_cases(1))  # no scope: 403
    events = _events(pg_sessions)
    assert [e[:4] for e in events] == [
        ("POST /v1/cases", "", 202, "ok"),
        ("GET /v1/cases/{case_id}", f"case_id={case_id}", 200, "ok"),
        ("GET /v1/cases/{case_id}", f"case_id={case_id}", 404, "not_found"),
        ("GET /v1/cases/{case_id}", f"case_id={case_id}", 401, "denied"),
        ("POST /v1/cases", "", 403, "denied"),
    ]
    assert [e[4] for e in events] == [True, True, True, False, True]  # who, when known
    assert all(e[5] is not None for i, e in enumerate(events) if i != 3)


def test_an_idempotent_replay_is_audited_with_its_route_and_client(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """A replay answers with the first response (external ids and all) without the route
    running: its row names the route template and the client like the first one's."""
    key = _client(pg_sessions, "hospital-a", "cases:submit")
    headers = {**key, "Idempotency-Key": "order-1"}
    body = wdbc_cases(1)
    assert api.post("/v1/cases", headers=headers, json=body).status_code == 202
    again = api.post("/v1/cases", headers=headers, json=body)
    assert again.headers["idempotent-replayed"] == "true"
    other = api.post("/v1/cases", headers=headers, json=wdbc_cases(2))  # same key, other body
    assert other.status_code == 422
    first, replay, mismatch = _events(pg_sessions)
    assert first[0] == replay[0] == mismatch[0] == "POST /v1/cases"
    assert first[5] is not None and replay[5] == mismatch[5] == first[5]
    assert replay[2:4] == (202, "ok") and mismatch[2:4] == (422, "invalid")


def test_a_request_refused_by_the_input_gate_is_audited_with_its_route(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    key = _client(pg_sessions, "hospital-a", "cases:submit", "results:read")
    api.get("/v1/cases/7?limit=1&limit=2", headers=key)  # a repeated parameter: 400
    api.post("/v1/cases", headers={**key, "Content-Type": "text/plain"}, content=b"x")  # 415
    assert [e[:3] for e in _events(pg_sessions)] == [
        ("GET /v1/cases/{case_id}", "case_id=7", 400),
        ("POST /v1/cases", "", 415),
    ]


def test_an_id_refused_in_a_path_is_not_audited_as_it_came(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """GET /v1/cases/<an MRN> was 422 and its audit row held case_id=<the MRN>."""
    key = _client(pg_sessions, "hospital-a", "results:read")
    for path in (
        "/v1/cases/MRN-CANARY-4471",
        "/v1/genome-comparisons/MRN-CANARY-4471/pairs",
        "/v1/fhir/RiskAssessment/MRN-CANARY-4471",
        "/v1/score-evaluations/MRN-CANARY-4471",
    ):
        assert api.get(path, headers=key).status_code in (400, 422)
    assert api.get("/v1/cases/12", headers=key).status_code == 404
    evaluation = "0123456789abcdef0123456789abcdef"
    assert api.get(f"/v1/score-evaluations/{evaluation}", headers=key).status_code == 404
    assert [e[1] for e in _events(pg_sessions)] == [
        "case_id=*",
        "job_id=*",
        "score_id=*",
        "evaluation_id=*",
        "case_id=12",
        f"evaluation_id={evaluation}",
    ]


def test_a_request_refused_before_its_route_is_audited_as_its_keys_holders(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """A valid key's request refused by the input gate, or sent to no route, was audited as
    nobody's: the audit trail could not say which client probed for what."""
    key = _client(pg_sessions, "hospital-a", "results:read")
    api.get("/v1/cases/7?limit=1&limit=2", headers=key)  # the input gate: 400
    api.get("/v1/patients/7", headers=key)  # no such route: 404
    api.get("/v1/scores", headers={"Authorization": "Bearer mbk_never-given"})
    with pg_sessions() as s:
        client = s.scalars(select(repo.ApiClient)).one()
    assert [(e[0], e[2], e[4], e[5]) for e in _events(pg_sessions)] == [
        ("GET /v1/cases/{case_id}", 400, True, client.id),
        ("GET unmatched", 404, True, client.id),
        ("GET /v1/scores", 401, False, None),
    ]


def test_the_audit_trail_holds_no_external_ids_or_values(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    key = _client(pg_sessions, "hospital-a", "cases:submit")
    case = wdbc_cases(1, prefix="MRN-CANARY-4471")[0]
    api.post("/v1/cases", headers=key, json=[case])
    with pg_sessions() as s:
        rows = [(e.action, e.resource) for e in s.scalars(select(AuditEvent))]
    text = repr(rows)
    assert "MRN-CANARY-4471" not in text and str(case["features"]["mean_area"]) not in text


def test_cli_creates_a_client_with_scopes_or_says_why_not(
    pg_url: str,
    api: TestClient,
    cli_env: Callable[..., None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli_env(MEDBATCH_DATABASE_URL=pg_url)
    assert main(["db", "create-client", "nobody", "engine", "--scopes", "results:read"]) == 2
    assert "no tenant 'nobody'" in capsys.readouterr().err
    assert main(["db", "create-tenant", "hospital-a"]) == 0
    capsys.readouterr()
    assert main(["db", "create-client", "hospital-a", "engine", "--scopes", "read:all"]) == 2
    assert "scopes must be among" in capsys.readouterr().err
    assert main(["db", "create-client", "hospital-a", "engine", "--scopes", "results:read"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["scopes"] == ["results:read"]
    headers = {"Authorization": f"Bearer {made['api_key']}"}
    assert api.get("/v1/cases/1", headers=headers).status_code == 404  # authenticated, allowed
    assert api.post("/v1/cases", headers=headers, json=wdbc_cases(1)).status_code == 403


# -- key lifecycle: expiry, revocation, rotation with overlap, last use -------------------------


def _tenant_key(sessions: sessionmaker[Session], **kw) -> str:  # type: ignore[no-untyped-def]
    with session_scope(sessions) as s:
        return repo.create_tenant(s, name="hospital-a", **kw)[1]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_new_keys_expire_after_the_default_lifetime(pg_sessions: sessionmaker[Session]) -> None:
    from datetime import timedelta

    from db.tables import ApiKey, utcnow

    _tenant_key(pg_sessions)
    with pg_sessions() as s:
        (expires,) = s.scalars(select(ApiKey.expires_at)).all()
    assert expires is not None
    assert abs(expires - (utcnow() + timedelta(days=365))) < timedelta(minutes=1)


def test_an_expired_key_is_401_and_says_so(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    from datetime import timedelta

    key = _tenant_key(pg_sessions, lifetime=timedelta(seconds=-1))
    response = api.get("/v1/models", headers=_bearer(key))
    assert response.status_code == 401
    assert "expired" in response.json()["detail"] and "rotate-key" in response.json()["detail"]
    # An expired key's POST with an Idempotency-Key is not processed either.
    again = api.post(
        "/v1/cases", json=wdbc_cases(1), headers={**_bearer(key), "Idempotency-Key": "k1"}
    )
    assert again.status_code == 401


def test_a_revoked_client_is_401_and_says_so(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    headers = _client(pg_sessions, "hospital-a", "results:read")
    assert api.get("/v1/models", headers=headers).status_code == 200
    with session_scope(pg_sessions) as s:
        (client_id,) = s.scalars(select(repo.ApiClient.id)).all()
        assert repo.revoke_client(s, client_id=client_id) == 1
    response = api.get("/v1/models", headers=headers)
    assert response.status_code == 401 and "revoked" in response.json()["detail"]


def test_a_refused_key_is_audited_as_its_holders(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """An expired or revoked key's request was audited as nobody's: a stolen key's use after
    its revocation could not be traced to the tenant and client it was taken from."""
    from datetime import timedelta

    revoked = _client(pg_sessions, "hospital-a", "results:read")
    with session_scope(pg_sessions) as s:
        client = s.scalars(select(repo.ApiClient)).one()
        client_id, tenant_a = client.id, client.tenant_id
        repo.revoke_client(s, client_id=client_id)
        tenant_b, expired = repo.create_tenant(s, name="hospital-b", lifetime=timedelta(seconds=-1))
        tenant_b_id = tenant_b.id
    assert api.get("/v1/cases/1", headers=revoked).status_code == 401
    assert api.get("/v1/scores", headers=_bearer(expired)).status_code == 401
    assert api.get("/v1/scores", headers=_bearer("mbk_unknown")).status_code == 401
    with pg_sessions() as s:
        rows = [(e.tenant_id, e.client_id, e.outcome) for e in s.scalars(select(AuditEvent))]
        used = [k["last_used_at"] for k in repo.list_keys(s, tenant_id=tenant_a)]
    assert rows == [
        (tenant_a, client_id, "denied"),
        (tenant_b_id, None, "denied"),
        (None, None, "denied"),
    ]
    assert used == [None, None]  # a refused key is not recorded as used


def test_rotation_keeps_the_old_key_for_the_overlap_only(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    from datetime import timedelta

    old = _tenant_key(pg_sessions)
    with session_scope(pg_sessions) as s:
        tenant_id = s.scalar(select(repo.Tenant.id))
        first = repo.rotate_key(s, tenant_id=tenant_id, client_id=None, overlap=timedelta(hours=1))
    assert len(first.overlapping) == 1  # the old key, until the overlap ends
    for key in (old, first.key):
        assert api.get("/v1/models", headers=_bearer(key)).status_code == 200
    with session_scope(pg_sessions) as s:
        second = repo.rotate_key(s, tenant_id=tenant_id, client_id=None, overlap=timedelta(0))
    assert second.overlapping == []
    for key in (old, first.key):
        response = api.get("/v1/models", headers=_bearer(key))
        assert response.status_code == 401 and "expired" in response.json()["detail"]
    assert api.get("/v1/models", headers=_bearer(second.key)).status_code == 200


def test_last_use_is_recorded_with_the_audit_row(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    key = _tenant_key(pg_sessions)
    with pg_sessions() as s:
        tenant_id = s.scalar(select(repo.Tenant.id))
        assert repo.list_keys(s, tenant_id=tenant_id)[0]["last_used_at"] is None
    assert api.get("/v1/models", headers=_bearer(key)).status_code == 200
    with pg_sessions() as s:
        (row,) = repo.list_keys(s, tenant_id=tenant_id)
        event = s.scalars(select(AuditEvent)).one()
    assert row["last_used_at"] is not None and row["state"] == "active"
    assert abs(row["last_used_at"] - event.at).total_seconds() < 5


def test_cli_rotates_revokes_and_lists_keys(
    pg_url: str,
    api: TestClient,
    cli_env: Callable[..., None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli_env(MEDBATCH_DATABASE_URL=pg_url, MEDBATCH_API_KEY_LIFETIME_DAYS="7")
    assert main(["db", "create-tenant", "hospital-a"]) == 0
    tenant = json.loads(capsys.readouterr().out)
    assert tenant["expires_at"] is not None  # 7 days, from the setting
    assert main(["db", "create-client", "hospital-a", "engine", "--scopes", "results:read"]) == 0
    engine = json.loads(capsys.readouterr().out)
    assert (
        main(["db", "rotate-key", "hospital-a", "--client", "engine", "--overlap-hours", "0"]) == 0
    )
    rotated = json.loads(capsys.readouterr().out)
    assert rotated["api_key"] != engine["api_key"] and rotated["previous_keys_work_until"] == {}
    assert api.get("/v1/models", headers=_bearer(engine["api_key"])).status_code == 401
    assert api.get("/v1/models", headers=_bearer(rotated["api_key"])).status_code == 200
    assert main(["db", "rotate-key", "hospital-a", "--lifetime-days", "0"]) == 0
    never = json.loads(capsys.readouterr().out)
    assert never["expires_at"] is None and len(never["previous_keys_work_until"]) == 1
    assert main(["db", "revoke-client", "hospital-a", "engine"]) == 0
    assert json.loads(capsys.readouterr().out)["keys_revoked"] == 2
    assert api.get("/v1/models", headers=_bearer(rotated["api_key"])).status_code == 401
    assert main(["db", "rotate-key", "hospital-a", "--client", "engine"]) == 2
    assert "revoked" in capsys.readouterr().err
    assert main(["db", "list-clients", "hospital-a"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["client"], r["state"]) for r in listed] == [
        (None, "active"),
        (None, "active"),
        ("engine", "revoked"),
        ("engine", "revoked"),
    ]
    assert all("api_key" not in r for r in listed)
    assert tenant["api_key"] not in json.dumps(listed)
    assert main(["db", "revoke-client", "hospital-a", "nobody"]) == 2
    assert main(["db", "list-clients", "nobody"]) == 2
