"""The embedded broker: its socket under ./var, attached to by later callers, and stopped with
the process that started it, even when that process is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def _start_owner(tmp_path: Path) -> tuple[subprocess.Popen[str], str, int]:
    """A process that starts the embedded broker, prints its URL and server pid, then sleeps."""
    code = (
        "import sys, time\nfrom pathlib import Path\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from worker import broker\n"
        "url = broker.embedded_broker_url(Path('var'))\n"
        "print(url, next(iter(broker._servers.values())).pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    url, pid = owner.stdout.readline().split()
    return owner, url, int(pid)


def test_the_socket_is_under_var_and_later_callers_attach(tmp_path: Path) -> None:
    owner, url, pid = _start_owner(tmp_path)
    try:
        assert url == f"redis+socket://{tmp_path / 'var' / 'broker.sock'}"
        client = redis.Redis(unix_socket_path=str(tmp_path / "var" / "broker.sock"))
        assert client.ping()
        client.close()
        # Another process with the same var/ attaches to the running server.
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from pathlib import Path\nfrom worker import broker\n"
            "print(broker.embedded_broker_url(Path('var')), len(broker._servers))\n"
        )
        attached = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
        )
        assert attached.stdout.split() == [url, "0"]
        assert _alive(pid)  # the attached process exiting did not stop it
    finally:
        owner.kill()
        owner.communicate()


def test_the_server_stops_when_its_starter_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves no atexit hook to run: the kernel's parent-death signal stops the server."""
    owner, _, pid = _start_owner(tmp_path)
    assert _alive(pid)
    owner.send_signal(signal.SIGKILL)
    owner.communicate()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_the_server_stops_when_its_starter_exits(tmp_path: Path) -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from pathlib import Path\nfrom worker import broker\n"
        "broker.embedded_broker_url(Path('var'))\n"
        "print(next(iter(broker._servers.values())).pid)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    pid = int(done.stdout)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
    assert not (tmp_path / "var" / "broker.sock").exists()
