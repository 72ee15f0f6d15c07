"""What a worker does once it is ready, before its first message: metrics, warm models, a sweep."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready

from worker import metrics
from worker.context import context

log = logging.getLogger(__name__)


@worker_ready.connect
def _on_worker_ready(sender: Any, **_: object) -> None:
    app = sender.app
    if not hasattr(app, "medbatch"):
        return
    ctx = context(app)
    metrics.serve(ctx.settings.worker_metrics_port, ctx.settings.worker_metrics_host)
    ctx.warm_up()
    # A worker starting after an outage picks up what was stranded, without waiting for beat.
    from worker.tasks.maintenance import requeue_stale_cases_task

    try:
        requeue_stale_cases_task.apply()
    except Exception:
        log.exception("sweep at worker start failed; beat will try again")
