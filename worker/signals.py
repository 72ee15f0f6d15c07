"""What a worker does once it is ready, before its first message: metrics, warm models, a sweep."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready, worker_shutting_down

from worker import heartbeat, metrics
from worker.context import context

log = logging.getLogger(__name__)


#: The heartbeat of each worker node in this process, by hostname.
_beating: dict[str, Any] = {}


@worker_ready.connect
def _on_worker_ready(sender: Any, **_: object) -> None:
    app = sender.app
    if not hasattr(app, "medbatch"):
        return
    ctx = context(app)
    # Say which queues this worker reads (a job on a queue nobody reads says so: worker/heartbeat.py).
    queues = sorted(q.name for q in sender.task_consumer.queues)
    _beating[sender.hostname] = heartbeat.start(app, hostname=sender.hostname, queues=queues)
    log.info("listening on queues: %s", ", ".join(queues))
    metrics.serve(ctx.settings.worker_metrics_port, ctx.settings.worker_metrics_host)
    ctx.warm_up()
    # A worker starting after an outage picks up what was stranded, without waiting for beat.
    from worker.tasks.maintenance import requeue_stale_cases_task

    try:
        requeue_stale_cases_task.apply()
    except Exception:
        log.exception("sweep at worker start failed; beat will try again")


@worker_shutting_down.connect
def _on_worker_shutting_down(sender: Any, **_: object) -> None:
    from celery import current_app

    # A second SIGTERM runs this again in the middle of the first: each node is taken once.
    for hostname in list(_beating):
        stop = _beating.pop(hostname, None)
        if stop is None:
            continue
        stop.set()
        heartbeat.forget(current_app, hostname=hostname)
