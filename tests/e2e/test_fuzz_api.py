"""Schemathesis against a live API: every operation of /openapi.json, every built-in check.

The API runs as its own uvicorn process on a free port, on a PostgreSQL database of its own and
the test Redis, with a worker on every queue (so submitted cases are scored and jobs finish, and
their results and files are read back too); Schemathesis runs as its CLI, with the pinned version,
a fixed seed and example budget (tests/e2e/schemathesis.toml), in its four phases (examples,
coverage, fuzzing, stateful). It must find nothing: no 5xx, no undocumented status, media type or
body shape, no schema-violating request accepted, no schema-valid one refused (but for the rules
that config names), no ignored auth.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from db import repo
from db.engine import make_engine, make_sessionmaker, session_scope
from db.migrate import upgrade
from tests.conftest import PG_ADMIN_URL, REDIS_TEST_URL, _pg_url
from tests.e2e.support import Processes, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = Path(__file__).with_name("schemathesis.toml")
GENOME = Path(__file__).resolve().parents[1] / "data" / "genome"
MOLECULES = (
    "CCO ethanol\nc1ccccc1O phenol\nCC(=O)Oc1ccccc1C(=O)O aspirin\nCN1CCC[C@H]1c1cccnc1 nicotine\n"
)
SEED = 14


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """(base URL, a tenant's key, the run's folder): the API on a database of its own."""
    name = f"medbatch_fuzz_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _pg_url(name)
    folder = tmp_path_factory.mktemp("fuzz")
    procs = None
    try:
        upgrade(url)
        engine = make_engine(url)
        with session_scope(make_sessionmaker(engine)) as session:
            key = repo.create_tenant(session, name="fuzz")[1]
        engine.dispose()
        for sub in ("genotypes", "compounds", "artifacts"):
            (folder / sub).mkdir()
        # The files the schema's examples name, so the examples phase gets its jobs accepted and
        # the stateful phase follows the links to real records.
        for ext in (".bed", ".bim", ".fam"):
            (folder / "genotypes" / f"cohort{ext}").write_bytes(
                (GENOME / f"hm3_small{ext}").read_bytes()
            )
        (folder / "compounds" / "library.smi").write_text(MOLECULES)
        env = {
            **os.environ,
            "MEDBATCH_DATABASE_URL": url,
            "MEDBATCH_BROKER_URL": REDIS_TEST_URL,
            "MEDBATCH_DEVICE": "cpu",
            "MEDBATCH_GENOTYPE_DIR": str(folder / "genotypes"),
            "MEDBATCH_COMPOUND_DIR": str(folder / "compounds"),
            "MEDBATCH_ARTIFACT_DIR": str(folder / "artifacts"),
            "MEDBATCH_LOG_LEVEL": "WARNING",
        }
        procs = Processes(env, folder)
        port = free_port()
        proc = procs.start("api", "api", "--port", str(port))
        worker = procs.start(
            "worker",
            "worker",
            "--queues",
            "score.stat,score.routine,score.bulk,explain,genome,chem",
            "--hostname",
            f"fuzz-{uuid.uuid4().hex[:6]}@%h",
            MEDBATCH_LOG_LEVEL="INFO",
            MEDBATCH_WORKER_METRICS_PORT="0",
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, procs.log("api")
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, procs.log("api")
            time.sleep(0.2)
        while " ready." not in procs.log("worker"):
            assert worker.poll() is None, procs.log("worker")
            assert time.monotonic() < deadline + 60, procs.log("worker")
            time.sleep(0.5)
        yield base, key, folder
    finally:
        if procs is not None:
            procs.stop_all()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.timeout(900)  # about two minutes here; the suite's 300 s default is too close
def test_schemathesis_finds_nothing_on_any_operation(live_api: tuple[str, str, Path]) -> None:
    """All operations, all default checks, fixed seed and budget: zero failures, zero errors."""
    base, key, folder = live_api
    report = folder / "schemathesis.json"
    har = folder / "schemathesis.har"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(CONFIG),
            "--no-color",
            "run",
            f"{base}/openapi.json",
            "--header",
            f"Authorization: Bearer {key}",
            "--seed",
            str(SEED),
            "--workers",
            "1",
            "--report",
            "json,har",
            "--report-json-path",
            str(report),
            "--report-har-path",
            str(har),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=folder,
    )
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    summary = json.loads(report.read_text())
    operations = json.loads(httpx.get(f"{base}/openapi.json").text)["paths"]
    n_operations = sum(len(item) for item in operations.values())
    assert summary["operations"]["tested"] == summary["operations"]["total"] == n_operations
    assert summary["failures"] == [] and summary["errors"] == []
    assert summary["test_cases"]["generated"] > 20 * n_operations
    assert summary["phases"]["examples"]["status"] == "success"
    # The examples reached real records (accepted submissions, then reads of them by link) ...
    answered = har.read_text()
    statuses = _statuses(json.loads(answered))
    for operation, status in [
        ("POST /v1/cases", 202),
        ("POST /v1/genome-comparisons", 202),
        ("POST /v1/compound-similarity", 202),
        ("GET /v1/cases/{id}", 200),
        ("GET /v1/genome-comparisons/{id}", 200),
        ("GET /v1/compound-similarity/{id}/neighbours", 200),
    ]:
        assert statuses[operation, status] > 0, (operation, status)
    # ... nothing it got back names the server's folders, and the API logged no traceback.
    assert str(folder) not in answered
    assert "Traceback" not in (folder / "api.log").read_text()
    assert "Traceback" not in (folder / "worker.log").read_text()
    phases = ", ".join(f"{k}={v['status']}" for k, v in summary["phases"].items())
    print(
        f"\nschemathesis {summary['schemathesis_version']}: {n_operations} operations, "
        f"{summary['test_cases']['generated']} generated cases, phases {phases}, "
        f"{summary['running_time']:.0f} s"
    )


def _statuses(har: dict[str, Any]) -> Counter[tuple[str, int]]:
    """How often each operation (ids written ``{id}``) answered each status."""
    found: Counter[tuple[str, int]] = Counter()
    for entry in har["log"]["entries"]:
        path = re.sub(r"/\d+(?=/|$)", "/{id}", urlsplit(entry["request"]["url"]).path)
        found[f"{entry['request']['method']} {path}", entry["response"]["status"]] += 1
    return found
