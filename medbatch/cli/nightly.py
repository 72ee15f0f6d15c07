"""``medbatch nightly``: score a FHIR Bulk Data export (an NDJSON folder) on ``score.bulk``."""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medbatch.cli._common import (
    add_tenant,
    celery,
    command,
    database,
    err,
    fail,
    number,
    print_json,
    tenant_id,
)

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session, sessionmaker

    from medbatch.settings import Settings
    from worker.fhir_intake import NightlySummary


def moment(text: str) -> datetime:
    """An argparse ``type``: an ISO 8601 / RFC 3339 date-time; RFC 3339 lets "t" and "z" be lower
    case (section 5.6), which Python's parser refuses."""
    try:
        return datetime.fromisoformat(text.upper())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a date-time: {text!r} (e.g. 2026-11-23T02:00:00Z)"
        ) from None


def add_parsers(sub: Any) -> None:
    nightly = command(sub, "nightly", "score a FHIR Bulk Data export (NDJSON folder) on score.bulk")
    nightly.add_argument(
        "--input", type=Path, required=True, help="folder with Patient.ndjson, Observation.ndjson …"
    )
    nightly.add_argument("--model", default="whas500-mortality", help="NAME or NAME@VERSION")
    add_tenant(nightly, "cases")
    nightly.add_argument(
        "--as-of",
        type=moment,
        help="the moment to score at, with a time zone (default: now)",
    )
    nightly.add_argument(
        "--lookback-days",
        type=number(int, 1, 36500),
        default=730,
        help="oldest observations used, in days",
    )
    nightly.add_argument(
        "--wait",
        action="store_true",
        help="wait until every case is scored (with the embedded broker and no worker "
        "listening, start one for the run)",
    )
    nightly.add_argument("--json", action="store_true", help="print the summary as JSON")
    nightly.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import UTC

    from models.cases.registry import RegistryError, load_registry
    from worker.fhir_intake import has_patients, run_nightly, settle_counts

    # A FHIR user's first try is often the Bundle they POST, or a path typed wrong: "no
    # Patient.ndjson in patient-bundle.json" told them neither.
    if args.input.is_file():
        fail(
            f"--input: {args.input} is a file; give the folder of a FHIR Bulk Data export "
            "(Patient.ndjson, Observation.ndjson …); a Bundle is sent with POST /v1/fhir"
        )
    if not args.input.is_dir():
        fail(f"--input: no folder {args.input}")
    if not has_patients(args.input):
        fail(f"--input: no Patient.ndjson in {args.input}")
    try:
        spec = load_registry(settings.artifact_dir).resolve_scorable(args.model)
    except RegistryError as exc:
        fail(f"--model: {exc}")
    as_of = args.as_of or datetime.now(UTC)
    if as_of.tzinfo is None:
        fail("--as-of needs a time zone, e.g. 2026-11-23T02:00:00Z")
    if not 1900 <= as_of.year <= 2199:  # as the API: look-back windows stay in the calendar
        fail(f"--as-of: must be from 1900 to 2199, got {as_of.isoformat()}")
    app = celery(settings)
    with database(settings) as sessions:
        owner = tenant_id(sessions, args.tenant, create=True)
        summary = run_nightly(
            args.input,
            spec,
            sessions=sessions,
            app=app,
            tenant_id=owner,
            as_of=as_of,
            lookback_days=args.lookback_days,
            per_message=settings.cases_per_message,
            progress=not args.json,
        )
        if args.wait:
            _wait(app, sessions, summary, settings)
        elif settings.embedded_broker and summary.accepted:
            err(
                "embedded broker: it stops with this command; the cases are stored and a worker "
                "sends them again when it starts (medbatch worker), or run with --wait"
            )
        settle_counts(sessions, summary)
    app.close()
    if args.json:
        print_json(summary.as_dict())
    else:
        _print_summary(summary.as_dict())
    return 0


def _wait(
    app: Celery, sessions: sessionmaker[Session], summary: NightlySummary, settings: Settings
) -> None:
    """Until every case settled; on the embedded broker with no worker, run one meanwhile."""
    import subprocess
    import sys
    import time

    from worker.fhir_intake import settle_counts
    from worker.heartbeat import waiting_detail
    from worker.queues import queue_for

    queue = queue_for("bulk")
    helper = None
    if settle_counts(sessions, summary):
        return
    detail = waiting_detail(app, queue)
    if detail is not None and settings.embedded_broker:
        err(f"  {detail}: starting one for this run (medbatch worker --queues {queue})")
        import os

        env = {**os.environ, "MEDBATCH_BROKER_URL": str(app.conf.broker_url)}
        helper = subprocess.Popen(
            [sys.executable, "-m", "medbatch.cli", "worker", "--queues", queue],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    elif detail is not None:
        err(f"  {detail}")
    try:
        said = detail
        while not settle_counts(sessions, summary):
            if helper is not None and helper.poll() is not None:
                fail(f"the worker started for this run exited ({helper.returncode})", code=1)
            time.sleep(1.0)
            if helper is None:
                now = waiting_detail(app, queue)
                if now != said and now is not None:
                    err(f"  {now}")
                said = now
    finally:
        if helper is not None:
            helper.terminate()
            helper.wait(30)


def _print_summary(d: dict[str, Any]) -> None:
    print(
        f"{d['patients_read']} patients read: {d['accepted']} new cases, "
        f"{d['already_there']} already there, {d['rejected']} patients rejected, "
        f"{d['bad_lines']} unreadable lines"
    )
    print(f"  scored {d['scored']}, failed {d['failed']}")
    for name in d["files_not_read"]:
        print(f"  not read: {name} (not <Type>.ndjson, <Type>.<part>.ndjson or <n>.<Type>.ndjson)")
    for example in d.get("bad_line_examples", []):
        print(f"  unreadable {example}")
    for reason, n in sorted(d["rejected_by_reason"].items(), key=lambda kv: -kv[1])[:10]:
        print(f"  rejected for {reason}: {n}")
    for feature, n in sorted(d["imputed_by_feature"].items(), key=lambda kv: -kv[1])[:10]:
        print(f"  imputed {feature}: {n}")
