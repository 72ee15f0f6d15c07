"""Real API, worker and sweeper processes on the fault suite's own Redis and PostgreSQL, and the
invariant every scenario is held to:

    each accepted case ends with exactly one score row, or ``failed`` with its own reason;
    no clean case failed or was dead-lettered; no case has two rows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import make_engine, make_sessionmaker, session_scope
from db.migrate import upgrade
from db.tables import Case, CaseStatus, Score
from models.reference import breast_cancer
from tests.e2e.support import Processes, free_port
from tests.faults.servers import PrivatePostgres, PrivateRedis


class NotSeenMidBatch(AssertionError):
    """Every batch of a load was scored between two looks (a load scored fast, a busy host)."""


#: The repository whose code the scenarios' processes run.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: How long a scenario waits for every accepted case to settle, at most.
SETTLE_TIMEOUT_S = 240.0


def make_cases(n: int, *, prefix: str, priority: str = "bulk") -> list[dict[str, Any]]:
    """``n`` POST /v1/cases items: the real Wisconsin cases, cycled, each with its own id."""
    split = breast_cancer.split()
    rows = [*split.x_test, *split.x_train]
    names = split.feature_names
    return [
        {
            "external_id": f"{prefix}-{i:06d}",
            "model": "breast-cancer",
            "priority": priority,
            "features": dict(zip(names, map(float, rows[i % len(rows)]), strict=True)),
        }
        for i in range(n)
    ]


@dataclass
class Servers:
    """The suite's Redis and PostgreSQL (one of each, shared by the scenarios of a run)."""

    root: Path
    redis: PrivateRedis
    pg: PrivatePostgres

    @classmethod
    @contextmanager
    def started(cls, root: Path) -> Iterator[Servers]:
        pg = PrivatePostgres()
        redis_server = PrivateRedis(root)
        try:
            pg.init()
            pg.start()
            redis_server.start()
            yield cls(root, redis_server, pg)
        finally:
            redis_server.stop()
            pg.destroy()


@dataclass
class Cluster:
    """One scenario's deployment: a fresh database, an empty broker, the processes it starts."""

    servers: Servers
    root: Path
    db_url: str
    env: dict[str, str]
    processes: Processes
    sessions: sessionmaker[Session]
    api: httpx.Client | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    api_key: str = ""
    _api_proc: Any = None

    @classmethod
    @contextmanager
    def fresh(cls, servers: Servers, name: str, **env: str) -> Iterator[Cluster]:
        root = servers.root / name
        root.mkdir(parents=True, exist_ok=True)
        if servers.redis.proc is None or servers.redis.proc.poll() is not None:
            servers.redis.start()
        client = servers.redis.client()
        client.flushall()
        client.close()
        db_url = servers.pg.create_database(f"faults_{name}_{uuid.uuid4().hex[:6]}")
        upgrade(db_url)
        full_env = {
            **os.environ,
            # The processes run the code under test (an editable install elsewhere would
            # otherwise win: tests/e2e/test_job_kind.py does the same for its worker).
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            "MEDBATCH_DATABASE_URL": db_url,
            "MEDBATCH_BROKER_URL": servers.redis.url,
            "MEDBATCH_DEVICE": "cpu",
            "MEDBATCH_ARTIFACT_DIR": str(root / "artifacts"),
            "MEDBATCH_WORKER_METRICS_PORT": "0",
            "MEDBATCH_LOG_LEVEL": "INFO",
            **env,
        }
        engine = make_engine(db_url)
        cluster = cls(
            servers, root, db_url, full_env, Processes(full_env, root), make_sessionmaker(engine)
        )
        try:
            yield cluster
        finally:
            if cluster.api is not None:
                cluster.api.close()
            cluster.processes.stop_all()
            engine.dispose()

    # processes ----------------------------------------------------------------------------

    def start_api(self, *, wait: bool = True) -> httpx.Client:
        port = free_port()
        self._api_proc = self.processes.start("api", "api", "--port", str(port))
        with session_scope(self.sessions) as s:
            self.api_key = repo.create_tenant(s, name="faults")[1]
        self.api = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=60,
        )
        if wait:
            self.wait_api()
        return self.api

    def wait_api(self) -> None:
        assert self.api is not None
        api = self.api
        self._until(lambda: _answers(api, "/readyz") == 200, self._api_proc, "api", 120)

    def start(self, *workers: str, sweeper: bool = True, **worker_env: str) -> httpx.Client:
        """The API, the sweeper and ``workers``, started side by side; returns when all are up."""
        api = self.start_api(wait=False)
        if sweeper:
            self.start_sweeper()
        for name in workers:
            self.start_worker(name, **worker_env)
        self.wait_api()
        self.wait_ready(*workers)
        return api

    def start_worker(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        proc = self.processes.start(name, "worker", "--hostname", f"{name}@%h", *args, **env)
        self.workers[name] = proc
        return proc

    def wait_ready(self, *names: str, timeout: float = 120) -> None:
        for name in names:
            proc = self.workers[name]
            self._until(lambda n=name: " ready." in self.processes.log(n), proc, name, timeout)

    def start_sweeper(self, **env: str) -> subprocess.Popen[bytes]:
        return self.processes.start("sweeper", "sweeper", **env)

    def _until(
        self,
        condition: Callable[[], bool],
        proc: subprocess.Popen[bytes],
        name: str,
        timeout: float,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited:\n{self.processes.log(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not ready:\n{self.processes.log(name)[-3000:]}")
            time.sleep(0.1)

    # cases --------------------------------------------------------------------------------

    def submit(self, cases: list[dict[str, Any]], *, chunk: int = 1000) -> list[int]:
        """POST the cases; every request must be accepted (202). Returns the case ids."""
        assert self.api is not None
        ids: list[int] = []
        for start in range(0, len(cases), chunk):
            response = self.api.post("/v1/cases", json=cases[start : start + chunk])
            assert response.status_code == 202, response.text[:500]
            ids += [c["id"] for c in response.json()["cases"]]
        return ids

    def unsettled(self, ids: list[int]) -> int:
        with self.sessions() as s:
            settled = s.scalar(
                select(func.count())
                .select_from(Case)
                .where(Case.id.in_(ids), Case.status.in_((CaseStatus.done, CaseStatus.failed)))
            )
        return len(ids) - int(settled or 0)

    def wait_settled(self, ids: list[int], *, timeout: float = SETTLE_TIMEOUT_S) -> float:
        """Wait until every case is done or failed; return when that was (time.monotonic())."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                left = self.unsettled(ids)
            except Exception:
                left = -1  # the database is away
            if left == 0:
                return time.monotonic()
            if time.monotonic() > deadline:
                return float("nan")
            time.sleep(0.2)

    def held_by(self, proc: subprocess.Popen[bytes]) -> list[int]:
        """Cases a worker process holds a lease on (claimed or waiting in its buffers)."""
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(Case.id).where(
                        Case.lease_owner.like(f"%:{proc.pid}:%"),
                        Case.status.in_((CaseStatus.queued, CaseStatus.running)),
                    )
                )
            )

    def running_under(self, proc: subprocess.Popen[bytes]) -> int:
        with self.sessions() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(Case)
                    .where(
                        Case.lease_owner.like(f"%:{proc.pid}:%"),
                        Case.status == CaseStatus.running,
                    )
                )
                or 0
            )

    def kill_mid_batch(
        self, candidates: list[subprocess.Popen[bytes]], *, timeout: float = 60
    ) -> tuple[subprocess.Popen[bytes], datetime, list[int]]:
        """SIGKILL the first worker seen holding a running batch; return it, when, and what it
        held at that moment.

        A batch lasts tens of milliseconds, so one seen running may be settled by the time the
        kill lands: the worker is stopped (SIGSTOP) first, and killed only if it still holds
        cases then; otherwise it goes on (SIGCONT) and the search too."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in candidates:
                if proc.poll() is None and self.running_under(proc) > 0:
                    proc.send_signal(signal.SIGSTOP)
                    held = self.held_by(proc)
                    if not held:
                        proc.send_signal(signal.SIGCONT)
                        continue
                    proc.send_signal(signal.SIGKILL)
                    killed_at = datetime.now(UTC)
                    proc.wait()
                    return proc, killed_at, held
            time.sleep(0.01)
        raise NotSeenMidBatch("no worker was seen mid-batch")

    def scored_at(self, ids: list[int]) -> list[datetime]:
        with self.sessions() as s:
            return list(
                s.scalars(select(Score.created_at).where(Score.case_id.in_(ids), ~Score.shadow))
            )

    def report(self, accepted: list[int], poison: dict[int, str] | None = None) -> dict[str, int]:
        """The invariant, counted: accepted / exactly-one / lost / duplicated / wrongly failed.

        ``poison``: case id → the words its reason must contain. A poison case counts as
        exactly-one when it failed with that reason (and not as a dead letter).
        """
        poison = poison or {}
        n_scores = (
            select(func.count(Score.id))
            .where(
                and_(
                    Score.case_id == Case.id,
                    Score.model_name == Case.model_name,
                    Score.model_version == Case.model_version,
                    ~Score.shadow,
                )
            )
            .scalar_subquery()
        )
        with self.sessions() as s:
            rows = {
                r.id: r
                for r in s.execute(
                    select(
                        Case.id,
                        Case.status,
                        Case.dead_letter,
                        Case.last_error,
                        n_scores.label("n"),
                    ).where(Case.id.in_(accepted))
                )
            }
        exactly_one = lost = duplicated = wrongly_failed = 0
        for case_id in accepted:
            row = rows.get(case_id)
            if row is None or row.status in (CaseStatus.queued, CaseStatus.running):
                lost += 1
                continue
            if row.n > 1:
                duplicated += 1
            if case_id in poison:
                ok = (
                    row.status == CaseStatus.failed
                    and not row.dead_letter
                    and row.n == 0
                    and poison[case_id] in (row.last_error or "")
                )
            else:
                ok = row.status == CaseStatus.done and row.n == 1
                if row.status == CaseStatus.failed:
                    wrongly_failed += 1
            exactly_one += ok
        return {
            "accepted": len(accepted),
            "exactly_one": exactly_one,
            "lost": lost,
            "duplicated": duplicated,
            "wrongly_failed": wrongly_failed,
        }

    def workers_alive(self) -> dict[str, int | None]:
        """Each worker started and not killed by the scenario: its exit status, None if alive."""
        return {name: proc.poll() for name, proc in self.workers.items()}


def _answers(client: httpx.Client, path: str) -> int:
    try:
        return client.get(path).status_code
    except httpx.TransportError:
        return 0
