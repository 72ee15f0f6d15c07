"""``medbatch.requeue_stale_cases``: the sweeper that makes a lost message cost a delay, not a case."""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import Celery, shared_task
from sqlalchemy.orm import Session, sessionmaker

from db import idempotency, repo
from db.engine import session_scope
from db.tables import utcnow
from worker.app import context
from worker.queues import REQUEUE_TASK, enqueue_cases

log = logging.getLogger(__name__)


def requeue_stale_cases(
    app: Celery,
    *,
    sessions: sessionmaker[Session],
    older_than_s: float,
    running_grace_s: float,
    per_message: int,
) -> int:
    """Enqueue again every case still ``queued`` whose last message went out ``older_than_s`` ago,
    and every case ``running`` with no progress for ``running_grace_s`` (its worker and message
    are gone: Redis would have redelivered an unacknowledged message within the visibility timeout).

    The database is the record of truth: a message lost with a broker restart (or never sent,
    because the broker was down when the API committed) is found here and sent again.
    """
    now = utcnow()
    with session_scope(sessions) as session:
        stale = repo.stale_cases(
            session,
            queued_before=now - timedelta(seconds=older_than_s),
            running_before=now - timedelta(seconds=running_grace_s),
        )
        if not stale:
            return 0
        # Mark first, send second: if sending fails the transaction rolls back and the next
        # sweep finds the same cases; if the commit fails after sending, a duplicate message is
        # harmless (scoring is idempotent).
        repo.mark_enqueued(session, case_ids=[case_id for case_id, _ in stale], at=now)
        enqueue_cases(app, stale, per_message=per_message)
    log.warning("re-enqueued %d stale cases", len(stale))
    return len(stale)


def forget_idempotency_keys(sessions: sessionmaker[Session], *, retention_h: float) -> int:
    """Delete Idempotency-Key records older than their retention (they no longer answer)."""
    with sessions() as session:
        return idempotency.forget_older_than(
            session, before=utcnow() - timedelta(hours=retention_h)
        )


@shared_task(bind=True, name=REQUEUE_TASK, ignore_result=True)
def requeue_stale_cases_task(self) -> int:
    ctx = context(self.app)
    forget_idempotency_keys(ctx.sessions, retention_h=ctx.settings.idempotency_retention_h)
    return requeue_stale_cases(
        self.app,
        sessions=ctx.sessions,
        older_than_s=ctx.settings.requeue_after_s,
        running_grace_s=ctx.settings.visibility_timeout_s + ctx.settings.requeue_after_s,
        per_message=ctx.settings.cases_per_message,
    )
