"""FHIR end to end through real processes: the shared Synthea Bundles over HTTP and the bulk NDJSON
export by `medbatch nightly`, scored by a real worker into PostgreSQL, read back as RiskAssessments;
a night interrupted half way and run again does only what is missing; no patient identifier in
any log."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from db.tables import Case, CaseStatus
from tests.e2e.support import Processes, count_cases, start_worker, wait_for
from tests.helpers import SHARED_DIR, require_shared

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

FHIR = SHARED_DIR / "data" / "fhir"
AS_OF = "2020-01-01T00:00:00Z"


def _nightly(processes: Processes, folder: Path) -> dict:
    result = subprocess.run(
        [
            sys.executable, "-m", "medbatch.cli", "nightly", "--input", str(folder),
            "--tenant", "e2e", "--as-of", AS_OF, "--wait", "--json",
        ],
        env=processes.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    return json.loads(out[out.index("{") :])


def _patient_ids() -> list[str]:
    lines = (require_shared(FHIR / "ndjson" / "x").parent / "Patient.ndjson").read_text()
    return [json.loads(line)["id"] for line in lines.splitlines() if line.strip()]


def test_bundles_over_http_are_scored_by_the_worker_and_read_back_as_risk(
    processes: Processes, api: httpx.Client, pg_sessions: sessionmaker[Session]
) -> None:
    from fhir.resources.R4B.riskassessment import RiskAssessment

    bundles = sorted(require_shared(FHIR / "bundles" / "x").parent.glob("*.json"))
    subjects = []
    for path in bundles:
        response = api.post(
            "/v1/fhir",
            content=path.read_bytes(),
            params={"as_of": AS_OF},
            headers={"Content-Type": "application/fhir+json"},
        )
        assert response.status_code == 202, response.text
        subjects.append(response.json()["entry"][0]["response"]["location"].split("=")[1])
    worker = start_worker(processes)
    wait_for(
        lambda: count_cases(pg_sessions, Case.status == CaseStatus.done) == len(bundles),
        worker=worker,
        processes=processes,
    )
    for subject in subjects:
        found = api.get("/v1/fhir/RiskAssessment", params={"subject": subject}).json()
        risk = RiskAssessment.model_validate(found["entry"][0]["resource"])
        assert risk.subject.reference == subject
    log = processes.log("worker") + processes.log("api")
    for subject in subjects:
        assert subject.split("/")[1] not in log


def test_nightly_export_is_scored_and_an_interrupted_night_resumes(
    processes: Processes, tmp_path: Path, pg_sessions: sessionmaker[Session]
) -> None:
    ids = _patient_ids()
    source = FHIR / "ndjson"
    half = tmp_path / "interrupted"
    shutil.copytree(source, half)
    patients = (source / "Patient.ndjson").read_text().splitlines(keepends=True)
    (half / "Patient.ndjson").write_text("".join(patients[:4]))  # the night stopped here
    worker = start_worker(processes)
    first = _nightly(processes, half)
    assert first["patients_read"] == 4 and first["accepted"] + first["rejected"] == 4
    assert first["scored"] == first["accepted"]
    second = _nightly(processes, source)
    assert second["patients_read"] == 9
    assert second["already_there"] == first["accepted"]  # done before: not added, not sent
    assert second["accepted"] == 9 - first["accepted"] - second["rejected"]
    assert second["scored"] == second["accepted"] + second["already_there"]
    assert worker.poll() is None
    log = processes.log("worker")
    assert not any(patient_id in log for patient_id in ids)
