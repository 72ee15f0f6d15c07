"""`medbatch submit` against a live API process: a short summary by default, everything with
--json, a refusal listed by field without the values sent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from tests.e2e.support import Processes, free_port
from tests.helpers import wdbc_cases

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def _submit(processes: Processes, api: httpx.Client, path: Path, *extra: str):  # type: ignore[no-untyped-def]
    key = api.headers["Authorization"].removeprefix("Bearer ")
    return subprocess.run(
        [sys.executable, "-m", "medbatch.cli", "submit", str(path), "--api", str(api.base_url),
         "--api-key", key, *extra],
        env=processes.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_submit_summarises_and_json_tells_all(
    processes: Processes, api: httpx.Client, tmp_path: Path
) -> None:
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(wdbc_cases(569)))  # every WDBC case: two requests (500 each)
    first = _submit(processes, api, path)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("accepted 569 cases: ids ") and lines[0].endswith(
        "569 new, 0 already there"
    )
    assert len(lines) <= 5
    again = _submit(processes, api, path, "--json")
    assert again.returncode == 0
    answers = json.loads(again.stdout)
    assert answers["refused"] is None
    assert sum(len(a["cases"]) for a in answers["accepted"]) == 569
    assert not any(c["created"] for a in answers["accepted"] for c in a["cases"])


def test_a_refused_file_lists_the_problems_without_values(
    processes: Processes, api: httpx.Client, tmp_path: Path
) -> None:
    cases = wdbc_cases(3)
    cases[1]["features"]["mean_radius"] = "871.55523"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cases))
    result = _submit(processes, api, path)
    assert result.returncode == 1
    assert "refused (422) after 0 accepted cases:" in result.stdout
    assert "1.features.mean_radius" in result.stdout
    assert "871.55523" not in result.stdout + result.stderr


def test_a_request_over_the_body_limit_is_sent_again_in_halves(
    processes: Processes, pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """500 cases a request: 500 ECGs (540 samples each) are more than the API's 4 MiB, and the
    file was refused whole (413) with no way to send smaller requests. Here: 300 WDBC cases
    (about 360 KB) against a 64 KiB limit."""
    port = free_port()
    proc = processes.start(
        "api-small", "api", "--port", str(port), MEDBATCH_MAX_BODY_BYTES=str(64 * 1024)
    )
    with session_scope(pg_sessions) as s:
        key = repo.create_tenant(s, name="small")[1]
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}
    ) as api:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, processes.log("api-small")
            try:
                if api.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, processes.log("api-small")
            time.sleep(0.2)
        path = tmp_path / "cases.json"
        path.write_text(json.dumps(wdbc_cases(300)))
        result = _submit(processes, api, path)
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("accepted 300 cases: ids ") and "300 new" in first, result.stdout
