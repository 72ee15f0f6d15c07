"""``medbatch.nightly_drop``: beat's nightly run over the configured drop folder of FHIR exports.

Each export (a subfolder holding Patient.ndjson or its parts, or the drop folder itself) is scored once: a
``.medbatch-done.json`` marker with the run's summary is written beside it when its cases are
queued. An export whose run was interrupted has no marker and is run again; the cases it had
queued already are neither added nor sent twice (see worker/fhir_intake.py).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

from celery import Celery, shared_task
from sqlalchemy import select

from db import repo
from db.engine import session_scope
from db.tables import Tenant
from medbatch.settings import Settings
from worker.context import WorkerContext, context
from worker.fhir_intake import has_patients, run_nightly
from worker.queues import NIGHTLY_TASK

log = logging.getLogger(__name__)

MARKER = ".medbatch-done.json"


def exports_in(drop: Path) -> list[Path]:
    """The exports of a drop folder not yet scored, oldest name first."""
    candidates = [drop] if has_patients(drop) else sorted(drop.iterdir())
    return [p for p in candidates if has_patients(p) and not (p / MARKER).exists()]


def run_drop(app: Celery | None, ctx: WorkerContext, settings: Settings) -> list[dict]:
    """Score every new export in ``settings.nightly_dir``; return their summaries."""
    if settings.nightly_dir is None or not settings.nightly_dir.is_dir():
        log.warning("nightly run skipped: MEDBATCH_NIGHTLY_DIR is not a folder")
        return []
    spec = ctx.registry.resolve_scorable(settings.nightly_model)
    with session_scope(ctx.sessions) as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == settings.nightly_tenant))
        if tenant_id is None:
            tenant_id = repo.create_tenant(session, name=settings.nightly_tenant)[0].id
    done = []
    for export in exports_in(settings.nightly_dir):
        as_of = datetime.now(UTC)
        try:
            summary = run_nightly(
                export,
                spec,
                sessions=ctx.sessions,
                app=app,
                tenant_id=tenant_id,
                as_of=as_of,
                lookback_days=settings.nightly_lookback_days,
                per_message=settings.cases_per_message,
            )
        except OSError as exc:
            # One unreadable export must not hold back the newer ones behind it, night after
            # night; it stays unmarked, so the next run tries it again. What failed, not a value.
            log.error(
                "nightly export %s skipped: %s: %s", export.name, type(exc).__name__, exc.strerror
            )
            continue
        record = {"export": export.name, "as_of": as_of.isoformat(), **summary.as_dict()}
        (export / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        done.append(record)
    return done


@shared_task(bind=True, name=NIGHTLY_TASK, ignore_result=True)
def nightly_drop_task(self) -> int:
    ctx = context(self.app)
    return len(run_drop(self.app, ctx, ctx.settings))
