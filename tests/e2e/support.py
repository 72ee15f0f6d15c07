"""Real processes for the end-to-end tests: start, watch, stop."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.tables import Case, CaseStatus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.procs = env, logs, []  # type: ignore[var-annotated]

    def start(
        self, name: str, *args: str, module: str = "medbatch.cli", **env: str
    ) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env={**self.env, **env},
            cwd=self.logs,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def run_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``medbatch`` run to its end in these processes' environment."""
        return subprocess.run(
            [sys.executable, "-m", "medbatch.cli", *args],
            env=self.env,
            cwd=self.logs,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_worker(processes: Processes, **env: str) -> subprocess.Popen[bytes]:
    return processes.start(
        "worker", "worker", "--hostname", f"e2e-{uuid.uuid4().hex[:6]}@%h", **env
    )


def wait_for(
    condition: Callable[[], bool],
    *,
    worker: subprocess.Popen[bytes],
    processes: Processes,
    timeout: float = 120,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert worker.poll() is None, "worker exited:\n" + processes.log("worker")[-3000:]
        assert time.monotonic() < deadline, (
            "timed out; worker log:\n" + processes.log("worker")[-3000:]
        )
        time.sleep(0.25)


def wait_for_done(
    sessions: sessionmaker[Session],
    n: int,
    *,
    worker: subprocess.Popen[bytes],
    processes: Processes,
    timeout: float = 120,
) -> None:
    """Wait until exactly ``n`` cases are done (see ``wait_for``)."""
    wait_for(
        lambda: count_cases(sessions, Case.status == CaseStatus.done) == n,
        worker=worker,
        processes=processes,
        timeout=timeout,
    )


def count_cases(sessions: sessionmaker[Session], *where) -> int:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Case).where(*where)) or 0
