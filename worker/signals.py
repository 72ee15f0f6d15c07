"""What a worker does once it is ready, before its first message: metrics, warm models, a sweep."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from celery.signals import worker_ready, worker_shutting_down

from medbatch.settings import Settings
from worker import heartbeat, metrics
from worker.context import context
from worker.queues import CHEM_QUEUE, GENOME_QUEUE

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
    limit_torch_threads(ctx.settings, queues)
    metrics.serve(ctx.settings.worker_metrics_port, ctx.settings.worker_metrics_host)
    ctx.warm_up()
    # A worker starting after an outage picks up what was stranded, without waiting for beat.
    from worker.tasks.maintenance import requeue_stale_cases_task

    try:
        requeue_stale_cases_task.apply()
    except Exception:
        log.exception("sweep at worker start failed; beat will try again")


def limit_torch_threads(settings: Settings, queues: Iterable[str]) -> None:
    """Give PyTorch ``settings.torch_threads`` threads an operator in a worker that reads only
    scoring and explain queues (small batches, a machine shared with the database and other
    workers). A worker that also reads genome or chem keeps PyTorch's default: their GEMMs
    (``torch._int_mm``) want every core."""
    if settings.torch_threads and not set(queues) & {GENOME_QUEUE, CHEM_QUEUE}:
        import torch

        torch.set_num_threads(settings.torch_threads)


@worker_shutting_down.connect
def _on_worker_shutting_down(sender: Any, **_: object) -> None:
    from celery import current_app

    for hostname, stop in list(_beating.items()):
        stop.set()
        heartbeat.forget(current_app, hostname=hostname)
        del _beating[hostname]
