"""Idempotency-Key on POST, on the real PostgreSQL and Redis: a retry gets the first response and
creates nothing; another payload is 422; a retry while the first runs is 409; keys are per tenant."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import Case, GenomeJob, IdempotencyKey, utcnow
from medbatch.settings import Settings
from tests.helpers import queued_case_ids, wdbc_cases

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "genome"


@pytest.fixture
def api_settings() -> dict[str, object]:
    return {"genotype_dir": DATA}


def _headers(sessions: sessionmaker[Session], name: str, key: str | None) -> dict[str, str]:
    with session_scope(sessions) as s:
        token = repo.create_tenant(s, name=name)[1]
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


def _cases(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Case)) or 0


def test_a_retry_gets_the_first_response_and_creates_nothing(
    api: TestClient, pg_sessions: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    headers = _headers(pg_sessions, "hospital-a", "order-7f3a")
    body = wdbc_cases(3)
    first = api.post("/v1/cases", headers=headers, json=body)
    assert first.status_code == 202
    again = api.post("/v1/cases", headers=headers, json=body)
    assert again.status_code == 202 and again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert _cases(pg_sessions) == 3
    assert sum(len(v) for v in queued_case_ids(redis_client).values()) == 3


def test_the_same_key_with_another_payload_is_422(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    headers = _headers(pg_sessions, "hospital-a", "k-1")
    assert api.post("/v1/cases", headers=headers, json=wdbc_cases(2)).status_code == 202
    other = api.post("/v1/cases", headers=headers, json=wdbc_cases(3))
    assert other.status_code == 422
    assert other.json() == {"detail": "this Idempotency-Key was used with a different request"}
    assert _cases(pg_sessions) == 2


def test_a_retry_while_the_first_is_running_is_409(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    headers = _headers(pg_sessions, "hospital-a", "k-running")
    body = wdbc_cases(1)
    assert api.post("/v1/cases", headers=headers, json=body).status_code == 202
    with session_scope(pg_sessions) as s:  # as if the first request had not answered yet
        row = s.scalar(select(IdempotencyKey))
        assert row is not None
        row.response_status = None
    response = api.post("/v1/cases", headers=headers, json=body)
    assert response.status_code == 409 and "still being processed" in response.json()["detail"]


def test_keys_are_per_client_and_expire(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    a = _headers(pg_sessions, "hospital-a", "shared-key")
    b = _headers(pg_sessions, "hospital-b", "shared-key")
    with session_scope(pg_sessions) as s:  # a second client of hospital-a, same key string
        tenant_id = repo.tenant_for_key(s, api_key=a["Authorization"].split()[1]).id  # type: ignore[union-attr]
        second = repo.create_client(s, tenant_id=tenant_id, name="e2", scopes=["cases:submit"])[1]
    a2 = {"Authorization": f"Bearer {second}", "Idempotency-Key": "shared-key"}
    assert api.post("/v1/cases", headers=a2, json=wdbc_cases(1, prefix="c2")).status_code == 202
    assert api.post("/v1/cases", headers=a, json=wdbc_cases(1)).status_code == 202
    other_tenant = api.post("/v1/cases", headers=b, json=wdbc_cases(1))
    assert other_tenant.status_code == 202 and "idempotent-replayed" not in other_tenant.headers
    assert _cases(pg_sessions) == 3
    with session_scope(pg_sessions) as s:  # tenant a's key is now older than its retention
        for row in s.scalars(select(IdempotencyKey)):
            row.created_at = utcnow() - timedelta(hours=49)
    later = api.post("/v1/cases", headers=a, json=wdbc_cases(2, prefix="later"))
    assert later.status_code == 202 and "idempotent-replayed" not in later.headers
    assert _cases(pg_sessions) == 5


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "del\x7f"])
def test_malformed_keys_are_400(
    api: TestClient, pg_sessions: sessionmaker[Session], key: str
) -> None:
    headers = _headers(pg_sessions, "hospital-a", None)
    response = api.post(
        "/v1/cases", headers={**headers, "Idempotency-Key": key}, json=wdbc_cases(1)
    )
    assert response.status_code == 400 and "Idempotency-Key" in response.json()["detail"]
    assert _cases(pg_sessions) == 0


def test_a_key_given_twice_is_400_and_creates_nothing(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """Two Idempotency-Key headers: which one a retry would match is undefined, so neither is
    taken (a repeated query parameter is refused alike)."""
    headers = [
        *_headers(pg_sessions, "hospital-a", None).items(),
        ("Idempotency-Key", "first"),
        ("Idempotency-Key", "second"),
    ]
    response = api.post("/v1/cases", headers=headers, json=wdbc_cases(1))
    assert response.status_code == 400
    assert response.json()["detail"] == "Idempotency-Key given more than once"
    assert _cases(pg_sessions) == 0


def test_two_authorization_headers_are_400_and_no_tenant_replays_another_s_answer(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """The route authenticated the first Authorization header and the idempotency ledger the
    last: tenant a's answer was filed under tenant b's key, and b's retry was handed it."""
    a = _headers(pg_sessions, "hospital-a", None)["Authorization"]
    b = _headers(pg_sessions, "hospital-b", None)["Authorization"]
    body = wdbc_cases(1, prefix="MRN-A-ONLY")
    both = [("Authorization", a), ("Authorization", b), ("Idempotency-Key", "k-two")]
    response = api.post("/v1/cases", headers=both, json=body)
    assert response.status_code == 400 and _cases(pg_sessions) == 0
    assert "MRN-A-ONLY" not in response.text
    retry = api.post(
        "/v1/cases", headers={"Authorization": b, "Idempotency-Key": "k-two"}, json=body
    )
    assert "idempotent-replayed" not in retry.headers
    assert (
        api.get("/v1/cases/1", headers=[("Authorization", a), ("Authorization", b)]).status_code
        == 400
    )


def test_without_a_valid_api_key_the_route_answers_401(api: TestClient) -> None:
    response = api.post("/v1/cases", headers={"Idempotency-Key": "k"}, json=wdbc_cases(1))
    assert response.status_code == 401


def test_a_refused_request_is_replayed_as_refused(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """A 4xx is the answer to that request: the retry gets the same 4xx, not a second try."""
    headers = _headers(pg_sessions, "hospital-a", "k-bad")
    bad = [{"external_id": "x", "model": "breast-cancer", "features": {}}]
    first = api.post("/v1/cases", headers=headers, json=bad)
    assert first.status_code == 422
    again = api.post("/v1/cases", headers=headers, json=bad)
    assert again.status_code == 422 and again.content == first.content


def test_genome_submissions_are_idempotent_too(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    headers = _headers(pg_sessions, "biobank", "cohort-2026-11")
    body = {"metric": "king", "bfile": "hm3_small"}
    first = api.post("/v1/genome-comparisons", headers=headers, json=body)
    again = api.post("/v1/genome-comparisons", headers=headers, json=body)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    with pg_sessions() as s:
        assert s.scalar(select(func.count()).select_from(GenomeJob)) == 1


def test_the_sweeper_forgets_keys_past_their_retention(
    api: TestClient, pg_url: str, redis_url: str, pg_sessions: sessionmaker[Session]
) -> None:
    from worker.app import create_app as create_celery
    from worker.sweeper import BrokerState, sweep

    settings = Settings(database_url=pg_url, broker_url=redis_url, idempotency_retention_h=48)
    app = create_celery(settings, include_tasks=False)

    def forgotten() -> int:
        return sweep(
            app, sessions=pg_sessions, settings=settings, broker=BrokerState()
        ).idempotency_keys

    headers = _headers(pg_sessions, "hospital-a", "old")
    try:
        assert api.post("/v1/cases", headers=headers, json=wdbc_cases(1)).status_code == 202
        assert forgotten() == 0
        with session_scope(pg_sessions) as s:
            for row in s.scalars(select(IdempotencyKey)):
                row.created_at = utcnow() - timedelta(hours=49)
        assert forgotten() == 1
    finally:
        app.close()
