"""Worker heartbeats on the real Redis: a worker says which queues it reads, and a job waiting on
a queue that no live worker reads says so (GET of a case or a genome job; the CLI follower)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api_shim.main import create_app
from db import repo
from db.engine import session_scope
from medbatch.settings import Settings
from tests.helpers import wdbc_cases
from worker import heartbeat
from worker.app import create_app as create_celery

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "genome"


def test_a_worker_announces_its_queues_and_withdraws_on_sigterm(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "MEDBATCH_BROKER_URL": redis_url,
        "MEDBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'w.sqlite'}",
        "MEDBATCH_WORKER_METRICS_PORT": "0",
        "MEDBATCH_DEVICE": "cpu",
    }
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "medbatch.cli", "worker", "--queues", "genome",
         "--hostname", "hb@test"],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    key = heartbeat.KEY_PREFIX + "hb@test"
    try:
        deadline = time.monotonic() + 120
        while not redis_client.exists(key):
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.2)
        assert json.loads(redis_client.get(key))["queues"] == ["genome"]
        assert 0 < redis_client.ttl(key) <= heartbeat.TTL_S
        app = create_celery(Settings(broker_url=redis_url), include_tasks=False)
        heartbeat._cache.clear()
        assert heartbeat.listening_queues(app) == {"genome"}
        assert heartbeat.waiting_detail(app, "genome") is None
        detail = heartbeat.waiting_detail(app, "chem")
        assert detail is not None and "no worker is listening on queue chem" in detail
        app.close()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    assert worker.returncode == 0
    assert not redis_client.exists(key)


@pytest.fixture
def api(
    pg_url: str, pg_sessions: sessionmaker[Session], redis_url: str, tmp_path: Path
) -> Iterator[TestClient]:
    folder = tmp_path / "genotypes"
    folder.mkdir()
    for ext in (".bed", ".bim", ".fam"):
        (folder / f"hm3_small{ext}").write_bytes((DATA / f"hm3_small{ext}").read_bytes())
    settings = Settings(
        database_url=pg_url,
        broker_url=redis_url,
        genotype_dir=folder,
        artifact_dir=tmp_path / "store",
    )
    heartbeat._cache.clear()
    with TestClient(create_app(settings)) as client:
        with session_scope(pg_sessions) as s:
            client.headers["Authorization"] = f"Bearer {repo.create_tenant(s, name='hb')[1]}"
        yield client
    heartbeat._cache.clear()


def test_a_queued_case_and_job_say_no_worker_listens_until_one_does(
    api: TestClient, redis_url: str
) -> None:
    case = api.post("/v1/cases", json=wdbc_cases(1)).json()["cases"][0]
    job = api.post("/v1/genome-comparisons", json={"metric": "king", "bfile": "hm3_small"}).json()
    waiting = api.get(f"/v1/cases/{case['id']}").json()
    assert waiting["status"] == "queued"
    assert waiting["detail"].startswith("no worker is listening on queue score.routine")
    detail = api.get(f"/v1/genome-comparisons/{job['id']}").json()["detail"]
    assert detail.startswith("no worker is listening on queue genome")
    # A worker on score.* only (the old default) does not help the genome job.
    app = create_celery(Settings(broker_url=redis_url), include_tasks=False)
    heartbeat.beat(app, hostname="w1@test", queues=["score.stat", "score.routine", "score.bulk"])
    heartbeat._cache.clear()
    assert api.get(f"/v1/cases/{case['id']}").json()["detail"] is None
    detail = api.get(f"/v1/genome-comparisons/{job['id']}").json()["detail"]
    assert detail.startswith("no worker is listening on queue genome")
    heartbeat.beat(app, hostname="w2@test", queues=["genome"])
    heartbeat._cache.clear()
    assert api.get(f"/v1/genome-comparisons/{job['id']}").json()["detail"] is None
    app.close()


def test_genome_wait_says_no_worker_listens(redis_url: str, tmp_path: Path) -> None:
    """`genome compare --wait` on a real broker with no genome worker prints the status detail
    instead of a silent progress bar."""
    env = {
        **os.environ,
        "MEDBATCH_BROKER_URL": redis_url,
        "MEDBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'g.sqlite'}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "medbatch.cli", "genome", "compare", "--bfile",
         str(DATA / "hm3_small"), "--metric", "king", "--wait"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 120
        seen = ""
        while "no worker is listening" not in seen and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            seen += line
        assert "no worker is listening on queue genome" in seen, seen
    finally:
        proc.kill()
        proc.communicate()
