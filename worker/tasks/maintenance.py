"""``medbatch.requeue_stale_cases``: one sweep (worker/sweeper.py), as a task a worker runs when it
starts, so a worker starting after an outage picks up what was stranded at once.

The periodic sweeps do not go through a queue: ``medbatch sweeper`` (or a worker's --sweeper
thread) runs them, so no backlog can starve the safety net.
"""

from __future__ import annotations

from celery import shared_task

from worker.context import context
from worker.queues import REQUEUE_TASK
from worker.sweeper import sweep


@shared_task(bind=True, name=REQUEUE_TASK, ignore_result=True)
def requeue_stale_cases_task(self) -> int:
    ctx = context(self.app)
    return sweep(self.app, sessions=ctx.sessions, settings=ctx.settings).sent
