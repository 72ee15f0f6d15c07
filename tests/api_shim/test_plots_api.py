"""Pictures over HTTP on the real PostgreSQL: score evaluations of stored scores (numbers and PNGs,
links from the JSON), their bad input as precise 422s without echoed values, tenants kept apart;
a genome job's kinship plot and a compound search's histogram once they are done."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.metrics import roc_auc_score
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import Priority, Tenant
from tests.helpers import score_row, tenant_headers, wdbc_cases

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def api_settings() -> dict[str, object]:
    return {
        "genotype_dir": ROOT / "examples" / "genotypes",
        "compound_dir": ROOT / "examples" / "compounds",
    }


def _scored(api: TestClient, headers: dict[str, str], sessions, scores: list[float]) -> list[str]:  # type: ignore[no-untyped-def]
    cases = api.post("/v1/cases", json=wdbc_cases(len(scores)), headers=headers).json()["cases"]
    with session_scope(sessions) as s:
        repo.save_scores(
            s,
            rows=[
                score_row(c["id"], score=score, label="x", sha256="a" * 64)
                for c, score in zip(cases, scores, strict=True)
            ],
        )
    return [c["external_id"] for c in cases]


def test_an_evaluation_of_stored_scores_links_its_pictures(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    headers = tenant_headers(pg_sessions, "hospital-a")
    scores = [0.9, 0.8, 0.35, 0.3, 0.6, 0.1]
    ids = _scored(api, headers, pg_sessions, scores)
    truth = [1, 1, 0, 1, 0, 0]
    labels = dict(zip(ids, truth, strict=True)) | {"never-scored": 1}
    response = api.post(
        "/v1/score-evaluations", json={"model": "breast-cancer", "labels": labels}, headers=headers
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["n"], body["unscored"], body["positives"]) == (6, 1, 3)
    assert body["roc_auc"] == pytest.approx(roc_auc_score(truth, scores))
    assert body["brier"] == pytest.approx(np.mean((np.array(scores) - np.array(truth)) ** 2))
    assert api.get(f"/v1/score-evaluations/{body['id']}", headers=headers).json() == body
    for link in body["plots"].values():
        picture = api.get(link, headers=headers)
        assert picture.status_code == 200 and picture.content.startswith(PNG)
        assert picture.headers["content-type"] == "image/png"
    other = tenant_headers(pg_sessions, "hospital-b")
    assert api.get(f"/v1/score-evaluations/{body['id']}", headers=other).status_code == 404
    assert api.get(body["plots"]["roc"], headers=other).status_code == 404


def test_an_evaluation_s_accuracy_uses_the_model_s_threshold_unless_told(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """whas500-mortality labels its scores at 0.29: the accuracy was taken at 0.5 whatever the
    model, and the answer did not say at which cut."""
    headers = tenant_headers(pg_sessions, "hospital-a")
    scores, truth = [0.4, 0.35, 0.1, 0.2], [1, 1, 0, 0]
    with session_scope(pg_sessions) as s:
        tenant_id = s.scalar(select(Tenant.id).where(Tenant.name == "hospital-a"))
        new = [
            repo.NewCase(f"whas-{i}", "whas500-mortality", "1.0.0", Priority.routine, {})
            for i in range(len(scores))
        ]
        added = repo.add_cases(s, tenant_id=tenant_id, cases=new)
        rows = [
            score_row(a.id, score=p, label="x") | {"model_name": "whas500-mortality"}
            for a, p in zip(added, scores, strict=True)
        ]
        repo.save_scores(s, rows=rows)
    labels = {f"whas-{i}": y for i, y in enumerate(truth)}
    for extra, threshold, accuracy in (({}, 0.29, 1.0), ({"threshold": 0.5}, 0.5, 0.5)):
        body = {"model": "whas500-mortality", "labels": labels, **extra}
        response = api.post("/v1/score-evaluations", json=body, headers=headers)
        assert response.status_code == 201, response.text
        found = response.json()
        assert (found["threshold"], found["accuracy"]) == (threshold, accuracy)


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"model": "breast-cancer", "labels": {"a": 2, "b": 0}}, ["body", "labels", "*"]),
        ({"model": "breast-cancer", "labels": {"a": 1}}, ["body", "labels"]),
        ({"model": "", "labels": {"a": 1, "b": 0}}, ["body", "model"]),
        ({"labels": {"a": 1, "b": 0}}, ["body", "model"]),
    ],
)
def test_bad_evaluation_requests_are_422_naming_the_field(
    api: TestClient, pg_sessions: sessionmaker[Session], body: dict, where: list
) -> None:
    headers = tenant_headers(pg_sessions, "hospital-a")
    response = api.post("/v1/score-evaluations", json=body, headers=headers)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][: len(where)] == where


def test_an_evaluation_without_scored_cases_of_both_outcomes_is_422_without_ids(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    headers = tenant_headers(pg_sessions, "hospital-a")
    ids = _scored(api, headers, pg_sessions, [0.9, 0.2])
    labels = {ids[0]: 1, ids[1]: 1, "MRN-SECRET-123": 0}
    response = api.post(
        "/v1/score-evaluations", json={"model": "breast-cancer", "labels": labels}, headers=headers
    )
    assert response.status_code == 422
    assert "both outcomes" in response.text and "MRN-SECRET-123" not in response.text
    for bad in ("nothex", "0" * 31):
        assert api.get(f"/v1/score-evaluations/{bad}", headers=headers).status_code in (404, 422)
    assert api.get(f"/v1/score-evaluations/{'0' * 32}", headers=headers).status_code == 404


def test_an_evaluation_of_an_unknown_model_names_the_registry_s_models_not_the_caller_s_text(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """The model field was echoed in the 422 ("... have a stored 'MRN-SECRET-77' score"): an id
    pasted into the wrong field came back in the error body."""
    headers = tenant_headers(pg_sessions, "hospital-a")
    body = {"model": "MRN-SECRET-77", "labels": {"a": 1, "b": 0}}
    response = api.post("/v1/score-evaluations", json=body, headers=headers)
    assert response.status_code == 422 and "MRN-SECRET-77" not in response.text
    assert response.json()["detail"][0]["loc"] == ["body", "model"]
    assert "breast-cancer" in response.json()["detail"][0]["msg"]


def test_job_pictures_exist_once_the_jobs_are_done(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    """Linked from the job JSON when done; 404 naming why before."""
    from worker.tasks import compounds as compound_tasks
    from worker.tasks import genome as genome_tasks

    headers = tenant_headers(pg_sessions, "hospital-a")
    job = api.post(
        "/v1/genome-comparisons", json={"metric": "king", "bfile": "hm3_small"}, headers=headers
    ).json()
    link = f"/v1/genome-comparisons/{job['id']}/plots/kinship.png"
    early = api.get(link, headers=headers)
    assert early.status_code == 404 and "finished KING job" in early.text
    assert api.get(f"/v1/genome-comparisons/{job['id']}", headers=headers).json()["plots"] == []
    genome_tasks.run_inline(pg_sessions, job_id=job["id"], device="cpu")
    done = api.get(f"/v1/genome-comparisons/{job['id']}", headers=headers).json()
    assert done["plots"] == [link]
    picture = api.get(link, headers=headers)
    assert picture.status_code == 200 and picture.content.startswith(PNG)
    search = api.post(
        "/v1/compound-similarity",
        json={"library": "library.smi", "query": "hits.smi", "top_k": 3},
        headers=headers,
    ).json()
    link = f"/v1/compound-similarity/{search['id']}/plots/similarity.png"
    assert api.get(link, headers=headers).status_code == 404
    compound_tasks.run_inline(pg_sessions, job_id=search["id"], device="cpu")
    found = api.get(f"/v1/compound-similarity/{search['id']}", headers=headers).json()
    assert found["plots"] == [link]
    assert api.get(link, headers=headers).content.startswith(PNG)
    other = tenant_headers(pg_sessions, "hospital-b")
    assert api.get(link, headers=other).status_code == 404
