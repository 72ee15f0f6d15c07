"""The long-running processes: ``demo``, ``api``, ``worker``, ``sweeper``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import socket
from typing import TYPE_CHECKING, Any

from medbatch.cli._common import (
    ALL_QUEUES,
    command,
    ensure_schema,
    fail,
    number,
    require_broker,
    require_chem_engine,
    require_device,
)

if TYPE_CHECKING:
    from medbatch.settings import Settings


def add_parsers(sub: Any) -> None:
    demo = command(
        sub, "demo", "every job kind on embedded defaults (API + worker + broker), with pictures"
    )
    demo.add_argument(
        "--timeout", type=number(float, 1, 86400), default=150.0, help="seconds to wait for scores"
    )
    demo.add_argument(
        "--out", default="var/demo", help="folder for the pictures and tables the demo writes"
    )
    demo.set_defaults(func=run_demo)

    api = command(sub, "api", "run the HTTP shim")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on")
    api.add_argument("--port", type=number(int, 0, 65535), default=8000, help="port to listen on")
    api.set_defaults(func=run_api)

    worker = command(sub, "worker", "run a Celery worker (one per GPU or core group)")
    worker.add_argument(
        "--queues",
        default=",".join(ALL_QUEUES),
        help="comma-separated queues to consume; production splits them "
        "(score.stat,score.routine,score.bulk,explain | genome | chem)",
    )
    worker.add_argument(
        "--beat", action="store_true", help="also run the beat schedule (nightly) and a sweeper"
    )
    worker.add_argument(
        "--sweeper", action="store_true", help="also run the sweeper, in a thread of its own"
    )
    worker.add_argument(
        "--hostname", default=None, help="Celery node name (default: celery@<host name>)"
    )
    worker.set_defaults(func=run_worker)

    sweeper = command(
        sub,
        "sweeper",
        "hand back what dead workers held and what the broker lost (safe to run several)",
    )
    sweeper.set_defaults(func=run_sweeper)


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from medbatch.demo import run_demo as demo

    return demo(settings, timeout_s=args.timeout, out_dir=args.out)


def run_api(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from api_shim.main import create_app

    ensure_schema(settings.database_url)
    check_listen(args.host, args.port)
    # No uvicorn access log: it prints query strings, which may name a patient
    # (?subject=Patient/…). api_shim/audit.py logs each request by its route template instead.
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        access_log=False,
    )
    return 0


def check_listen(host: str, port: int) -> None:
    """Refuse, before anything starts, an address the API cannot listen on: a port already taken
    (a second `medbatch api`, the README's 8000 in use) was four uvicorn log lines after
    "Application startup complete", and exit 3. Bound as uvicorn binds it (SO_REUSEADDR, IPv6
    for a host with a colon), then let go for uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                fail(
                    f"--port {port}: already in use on {host} (another `medbatch api`?); "
                    "stop it or pick another port with --port"
                )
            if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
                fail(f"--host {host}: not an address of this machine ({exc.strerror})")
            fail(f"--host {host} --port {port}: cannot listen there ({exc.strerror})")


def parse_queues(text: str) -> tuple[str, ...]:
    queues = tuple(q.strip() for q in text.split(",") if q.strip())
    unknown = [q for q in queues if q not in ALL_QUEUES]
    if not queues or unknown:
        fail(
            f"--queues: unknown queue {', '.join(unknown) or '(none)'}; known: {', '.join(ALL_QUEUES)}"
        )
    return queues


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    queues = parse_queues(args.queues)
    require_device(settings)
    if "chem" in queues:
        require_chem_engine(settings)
    if args.beat and settings.nightly_dir is not None:
        require_nightly_model(settings)
    ensure_schema(settings.database_url)
    require_broker(settings)
    from worker.app import create_app, run_worker, worker_argv
    from worker.context import context

    app = create_app(settings)
    if set(queues) <= {"genome", "chem"}:
        # A tile is seconds of work: take one at a time, so every genome worker gets its share.
        app.conf.worker_prefetch_multiplier = 1
    if args.sweeper or args.beat:
        from worker.sweeper import Sweeper

        Sweeper(settings, app=app, sessions=context(app).sessions).start_thread()
    return run_worker(
        app, worker_argv(settings, queues=queues, beat=args.beat, hostname=args.hostname)
    )


def require_nightly_model(settings: Settings) -> None:
    """Refuse now, not at MEDBATCH_NIGHTLY_HOUR_UTC, a nightly model the registry does not
    know, or a retired version (the run takes one that scores: worker/tasks/nightly.py): beat
    started, and the first night's run failed at its hour."""
    from models.cases.registry import RegistryError, load_registry

    registry = load_registry(settings.artifact_dir)
    try:
        registry.resolve_scorable(settings.nightly_model)
    except RegistryError:
        with contextlib.suppress(RegistryError):
            spec = registry.resolve(settings.nightly_model)
            live = [s.ref for s in registry if s.name == spec.name and s.status != "retired"]
            fail(
                "MEDBATCH_NIGHTLY_MODEL: a retired model version "
                f"(versions in use: {', '.join(live) or 'none'})"
            )
        # Named, not quoted, as every setting that does not validate.
        fail(
            "MEDBATCH_NIGHTLY_MODEL: not a registered model or model version "
            f"(known models: {', '.join(registry.names())})"
        )


def run_sweeper(args: argparse.Namespace, settings: Settings) -> int:
    from worker.sweeper import run_sweeper as sweeper

    ensure_schema(settings.database_url)
    require_broker(settings)
    return sweeper(settings)
