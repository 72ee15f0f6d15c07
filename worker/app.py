"""The Celery app: broker, queues, delivery guarantees and the beat schedule, all as configuration."""

from __future__ import annotations

from celery import Celery

from medbatch.settings import Settings
from worker.queues import NIGHTLY_TASK, SCORE_QUEUES, SCORING_WORKER_QUEUES, task_queues

#: The modules that register tasks (and signal handlers) on the app, imported by Celery's loader
#: (``include``): they read the app's context through worker/context.py, never this module.
TASK_MODULES = (
    "worker.signals",
    "worker.tasks.compounds",
    "worker.tasks.explain",
    "worker.tasks.genome",
    "worker.tasks.maintenance",
    "worker.tasks.nightly",
    "worker.tasks.scoring",
)


def resolve_broker_url(settings: Settings) -> str:
    if settings.embedded_broker:
        from worker.broker import embedded_broker_url

        return embedded_broker_url(settings.var_dir)
    return settings.broker_url


def create_app(
    settings: Settings, *, broker_url: str | None = None, include_tasks: bool = True
) -> Celery:
    """The Celery app. The API only sends by task name, so it asks for no tasks (and no torch)."""
    app = Celery(
        "medbatch", set_as_current=include_tasks, include=TASK_MODULES if include_tasks else ()
    )
    url = broker_url or resolve_broker_url(settings)
    app.conf.update(
        broker_url=url,
        # kombu's Redis transport, reusing one client per channel (see worker/transport.py).
        broker_transport=(
            "worker.transport:Transport" if url.split("://", 1)[0] in ("redis", "rediss") else None
        ),
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Redis holds an unacknowledged message invisible this long, then hands it out
            # again: longer than any task runs, so a slow task is not run twice for nothing.
            "visibility_timeout": settings.visibility_timeout_s,
            # Read the queues in the order given to --queues (stat, routine, bulk, explain)
            # instead of round robin: a STAT message is always the next one read, and an
            # explain message only when no scoring message waits.
            "queue_order_strategy": "priority",
        },
        task_queues=task_queues(),
        task_default_queue="score.routine",
        task_serializer="json",
        accept_content=["json"],
        # The database is where results go; no Celery result backend.
        task_ignore_result=True,
        # Acknowledge after the task (and its commit) finished; a worker killed mid-task
        # leaves its message to be delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # The batcher holds messages unacknowledged until their batch is committed, so the
        # prefetch limit is what bounds a batch: twice the sum of the per-queue batch sizes (a
        # message carries at least one case; one batch is written while the next gathers).
        # Never "the whole queue" (Celery's optimizing guide).
        worker_prefetch_multiplier=2 * sum(settings.batching(q)[0] for q in SCORE_QUEUES),
        worker_hijack_root_logger=False,
        beat_schedule=beat_schedule(settings),
    )
    # Read by worker/context.py, which builds the process's context from it on first use.
    app.medbatch_settings = settings
    if include_tasks:
        app.loader.import_default_modules()
        app.finalize()
    return app


def beat_schedule(settings: Settings) -> dict[str, dict]:
    """The nightly run when a drop folder is set. (The sweeper is no beat task: a task waits in
    its queue behind any backlog, and beat dies with its worker; see worker/sweeper.py.)"""
    from celery.schedules import crontab

    schedule: dict[str, dict] = {}
    if settings.nightly_dir is not None:
        schedule["nightly-fhir-export"] = {
            "task": NIGHTLY_TASK,
            "schedule": crontab(minute=0, hour=settings.nightly_hour_utc),
            "options": {"queue": "score.routine"},
        }
    return schedule


def worker_argv(
    settings: Settings,
    *,
    queues: tuple[str, ...] = SCORING_WORKER_QUEUES,
    beat: bool = False,
    hostname: str | None = None,
) -> list[str]:
    """Arguments for ``app.worker_main``: one process per device (solo pool: no fork after CUDA)."""
    argv = ["worker", "--pool=solo", f"--queues={','.join(queues)}"]
    argv += [f"--loglevel={settings.log_level}", "--without-gossip", "--without-mingle"]
    if hostname:
        argv.append(f"--hostname={hostname}")
    if beat:
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", f"--schedule={settings.var_dir / 'celerybeat-schedule'}"]
    return argv


def run_worker(app: Celery, argv: list[str]) -> int:
    """Run ``celery worker`` with ``argv`` and return its exit status.

    Not ``app.worker_main``: it drops the status, and so does ``app.start`` with click 8.2+
    (its ``main(standalone_mode=False)`` returns the code instead of raising it, and Celery 5.7
    discards the return value). A worker that stopped on an error ("Unrecoverable error")
    must never exit 0: restart-on-failure policies rely on it.
    """
    from celery.bin.celery import celery as celery_command
    from click.exceptions import Exit

    celery_command.params[0].default = app
    try:
        status = celery_command.main(args=argv, standalone_mode=False)
    except Exit as exc:
        status = exc.exit_code
    finally:
        celery_command.params[0].default = None
    return int(status or 0)
