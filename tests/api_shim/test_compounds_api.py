"""POST/GET /v1/compound-similarity on the real PostgreSQL and Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from rdkit import RDConfig
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import CompoundJob
from tests.helpers import post_job, queued_tile_messages, tenant_headers
from worker.queues import CHEM_QUEUE
from worker.tasks import compounds as tasks

pytestmark = pytest.mark.integration

NCI = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "compounds"
    folder.mkdir()
    lines = [line for line in NCI.read_text().splitlines() if line.strip()]
    (folder / "library.smi").write_text("\n".join(lines[:200]) + "\n")
    (folder / "query.smi").write_text("\n".join([*lines[:3], "C1CC(N broken"]) + "\n")
    return folder


@pytest.fixture
def api_settings(folder: Path) -> dict[str, object]:
    return {"compound_dir": folder}


def test_a_search_is_queued_then_served(
    api: TestClient, pg_sessions: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    headers = tenant_headers(pg_sessions, "pharmacy")
    job = post_job(
        api,
        headers,
        "/v1/compound-similarity",
        {"library": "library.smi", "query": "query.smi", "top_k": 3, "tile_rows": 2},
    )
    assert (job["n_query"], job["n_library"], job["tiles_total"], job["unreadable"]) == (
        3,
        200,
        2,
        1,
    )
    assert job["unreadable_examples"][0].startswith("query.smi, line 4")
    assert job["repeated_ids"] == {"library": 0, "query": 0}
    messages = queued_tile_messages(redis_client, CHEM_QUEUE)
    assert sorted(messages) == [[job["id"], 0], [job["id"], 1]]
    tasks.run_inline(pg_sessions, job_id=job["id"], device="cpu")
    done = api.get(f"/v1/compound-similarity/{job['id']}", headers=headers).json()
    assert done["status"] == "done" and done["output"].endswith("/files/neighbours.csv")
    listed = api.get(f"/v1/compound-similarity/{job['id']}/neighbours", headers=headers).json()
    assert len(listed["items"]) == 9
    first = [n for n in listed["items"] if n["rank"] == 1]
    assert all(n["similarity"] == 1.0 and n["query_id"] == n["library_id"] for n in first)
    csv = api.get(done["output"], headers=headers)
    assert csv.status_code == 200 and csv.text.count("\n") == 10
    other = tenant_headers(pg_sessions, "elsewhere")
    for path in (f"/v1/compound-similarity/{job['id']}", done["output"]):
        assert api.get(path, headers=other).status_code == 404


def test_an_unreadable_stereo_smiles_is_reported_with_its_file_and_line(
    api: TestClient, pg_sessions: sessionmaker[Session], folder: Path
) -> None:
    """Only the server's folders are cut from a failure: a SMILES's own "/" (double-bond stereo)
    cut the file name and the line number off with them."""
    (folder / "stereo.smi").write_text("CCO ethanol\nF/C=C/F( broken\n")
    headers = tenant_headers(pg_sessions, "pharmacy")
    body = {"library": "library.smi", "query": "stereo.smi", "top_k": 3}
    job = post_job(api, headers, "/v1/compound-similarity", body)
    read = api.get(f"/v1/compound-similarity/{job['id']}", headers=headers).json()
    for examples in (job["unreadable_examples"], read["unreadable_examples"]):
        (example,) = examples
        assert example.startswith("stereo.smi, line 2 ('F/C=C/F('): "), example
        assert str(folder) not in example


@pytest.mark.parametrize(
    ("body", "loc", "fragment"),
    [
        ({"library": "library.smi", "top_k": 3, "threshold": 0.5}, ["body"], "exactly one"),
        ({"library": "library.smi"}, ["body"], "exactly one"),
        ({"library": "../../etc/passwd", "top_k": 3}, ["body", "library"], "inside the server"),
        (
            {"library": "nope.smi", "top_k": 3},
            ["body", "library"],
            "<library> not found; names are relative to the server's compound folder "
            "(MEDBATCH_COMPOUND_DIR)",
        ),
        ({"library": "library.smi", "top_k": 0}, ["body", "top_k"], "greater"),
        ({"library": "library.smi", "threshold": 2}, ["body", "threshold"], "less"),
        (
            {"library": "library.smi", "top_k": 3, "fingerprint": "ecfp"},
            ["body", "fingerprint"],
            "Input should be",
        ),
    ],
)
def test_bad_searches_are_422_naming_the_field_and_write_nothing(
    api: TestClient,
    pg_sessions: sessionmaker[Session],
    redis_client: redis.Redis,
    folder: Path,
    body: dict,
    loc: list[str],
    fragment: str,
) -> None:
    response = api.post(
        "/v1/compound-similarity", headers=tenant_headers(pg_sessions, "pharmacy"), json=body
    )
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == loc and fragment in error["msg"], error
    assert str(folder) not in response.text
    with pg_sessions() as s:
        assert s.scalar(select(func.count()).select_from(CompoundJob)) == 0
    assert redis_client.llen(CHEM_QUEUE) == 0


def test_the_scope_is_compounds_submit(api: TestClient, pg_sessions: sessionmaker[Session]) -> None:
    with session_scope(pg_sessions) as s:
        tenant = repo.create_tenant(s, name="pharmacy")[0]
        key = repo.create_client(s, tenant_id=tenant.id, name="x", scopes=["results:read"])[1]
    response = api.post(
        "/v1/compound-similarity",
        headers={"Authorization": f"Bearer {key}"},
        json={"library": "library.smi", "top_k": 3},
    )
    assert response.status_code == 403 and "compounds:submit" in response.json()["detail"]
