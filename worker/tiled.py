"""Tiled jobs, whatever their kind: a kind declares what is its own, the rest is written here once.

A kind is two declarations. :class:`Kind` is what its submission, the API and the CLI see: its job
table (with :class:`db.tables.TiledJob`'s columns), its tile task and queue, how a job is described;
it sends a recorded job's tiles (one message a tile, after the commit) and follows a job with a
progress bar. :class:`JobKind` adds what workers run: a tile's compute, how a tile's results are
stored, how the job is finished. Shared by every kind:

- the ledger (:mod:`db.tiles`): tiles in one table, each counted on its job once;
- one tile task body (:func:`tile_task`): a message ``[job_id, index]``, leased while it runs, a
  failed tile retried and then failing its job, the last tile finishing the job;
- computing a job's tiles in the CLI's own process (:meth:`JobKind.run_inline`).

docs/adding-a-job-kind.md shows a third kind end to end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery, shared_task
from celery.exceptions import Reject
from sqlalchemy.orm import Session, class_mapper, sessionmaker

from db import tiles
from db.engine import is_outage, session_scope
from db.leases import TileKey
from db.tables import TiledJob
from worker.context import context
from worker.progress import progress_bar

log = logging.getLogger(__name__)

Describe = Callable[[], dict[str, Any]]


class SubmissionError(ValueError):
    """A job that cannot start; ``field`` names the offending input (the API answers 422)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Submitter:
    """Whose tiled job is submitted and where it goes: the database, the broker (None: the
    caller computes the tiles itself), the artifact store."""

    tenant_id: int
    sessions: sessionmaker[Session]
    app: Celery | None
    artifact_dir: Path

    def submit(
        self,
        submit: Callable[..., dict[str, Any]],
        refusal: Callable[[SubmissionError], Exception],
        **arguments: Any,
    ) -> dict[str, Any]:
        """A kind's ``submit`` (worker/jobs/); a job it refuses to start raises ``refusal(exc)``
        (the API's 422, the CLI's one-line error)."""
        try:
            return submit(
                self.sessions,
                self.app,
                tenant_id=self.tenant_id,
                artifact_dir=self.artifact_dir,
                **arguments,
            )
        except SubmissionError as exc:
            raise refusal(exc) from None


@dataclass(frozen=True)
class Tile:
    """One tile as its compute sees it: the job's spec and columns, the tile's rows and columns."""

    job_id: int
    index: int
    spec: dict[str, Any]
    #: The job's row, as plain values (``metric``, ``output_prefix``, ...).
    job: Mapping[str, Any]
    rows: slice
    cols: slice | None

    def where(self, rows_name: str = "rows") -> str:
        cols = f", cols {self.cols.start}:{self.cols.stop}" if self.cols else ""
        return f"{rows_name} {self.rows.start}:{self.rows.stop}{cols}"


@dataclass(frozen=True)
class Kind:
    """A kind as its submission, the API and the CLI's follower see it (nothing computes here)."""

    #: The kind's name in the ledger and in tile leases (``genome``, ``chem``, ...).
    name: str
    #: Its job table.
    table: type[TiledJob]
    #: The Celery task name of its tiles, and their queue.
    task: str
    queue: str
    #: A job as the API and the CLI show it.
    describe: Callable[[Any], dict[str, Any]]

    def submitted(self, app: Celery | None, summary: dict[str, Any]) -> dict[str, Any]:
        """Send a just-committed job's tiles (none without ``app``: the CLI runs them inline)."""
        if app is not None:
            for index in range(summary["tiles_total"]):
                app.send_task(
                    self.task, args=[summary["id"], index], queue=self.queue, routing_key=self.queue
                )
        return summary

    def record(
        self, sessions: sessionmaker[Session], app: Celery | None, create: Callable[[Session], Any]
    ) -> dict[str, Any]:
        """Record a job (``create`` adds it and its tiles), commit, then send its tiles."""
        with session_scope(sessions) as session:
            summary = self.describe(create(session))
        return self.submitted(app, summary)

    def describe_id(self, sessions: sessionmaker[Session], job_id: int) -> dict[str, Any]:
        with session_scope(sessions) as session:
            job = tiles.get_job(session, self.table, job_id=job_id)
            assert job is not None
            return self.describe(job)

    def wait(
        self, sessions: sessionmaker[Session], *, job_id: int, progress: bool = False
    ) -> dict[str, Any]:
        """Follow a job the workers run until it is done or failed."""
        return follow(lambda: self.describe_id(sessions, job_id), progress=progress)


@dataclass(frozen=True)
class JobKind:
    """What a tiled job kind declares to be computed: everything else is shared."""

    kind: Kind
    #: A tile's compute: (tile, options) -> the tile's results (anything ``store`` takes).
    compute: Callable[[Tile, Mapping[str, Any]], Any]
    #: Store a tile's results, in the transaction that counts the tile (so, once).
    store: Callable[[Session, int, Any], None]
    #: Finish a job whose tiles are all counted: write its outputs (it is settled afterwards;
    #: an exception fails it with the message).
    finish: Callable[[sessionmaker[Session], int], None]
    #: The worker options a tile takes, from the worker's settings (device, engine, ...).
    options: Callable[[Any], Mapping[str, Any]] = field(default=lambda settings: {})
    #: How a tile's rows are named in a failure ("rows", "queries").
    rows_name: str = "rows"
    #: A tile that failed this many times fails its job; these exceptions fail it at once (the
    #: input is wrong: trying again cannot help).
    max_attempts: int = 3
    fatal: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)

    @property
    def name(self) -> str:
        return self.kind.name

    def run_tile(
        self, sessions: sessionmaker[Session], *, job_id: int, index: int, **options: Any
    ) -> str:
        """Compute, store and count one tile in this process, as a worker does."""
        return run_tile(self, sessions, job_id=job_id, index=index, options=options)

    def run_inline(
        self,
        sessions: sessionmaker[Session],
        *,
        job_id: int,
        progress: bool = False,
        **options: Any,
    ) -> dict[str, Any]:
        """Compute every tile of a job in this process (no worker), the way a worker does."""
        return run_inline(
            lambda index: self.run_tile(sessions, job_id=job_id, index=index, **options),
            lambda: self.kind.describe_id(sessions, job_id),
            progress=progress,
        )


def register(kind: JobKind) -> Any:
    """Add a kind: its job table to the ledger and its tile task to Celery's shared tasks."""
    tiles.register(kind.name, kind.kind.table)
    return tile_task(kind)


def run_tile(
    kind: JobKind,
    sessions: sessionmaker[Session],
    *,
    job_id: int,
    index: int,
    options: Mapping[str, Any],
) -> str:
    """Compute, store and count one tile; finish the job if it was the last. Returns what it did."""
    with session_scope(sessions) as session:
        job = tiles.get_job(session, kind.kind.table, job_id=job_id)
        row = tiles.get_tile(session, kind=kind.name, job_id=job_id, index=index)
        if job is None or row is None:
            return "unknown"
        if row.status == "done" or job.status in ("done", "failed"):
            return "already done"
        # Every tile counted, the job not settled: the worker finishing it died, or the
        # database went away meanwhile (db/tiles.py finish_tile). Finish it now.
        finishing = job.tiles_done >= job.tiles_total
        if not finishing:
            tiles.start_tile(session, row)
        tile = Tile(
            job_id=job_id,
            index=index,
            spec=dict(job.spec),
            job={c.key: getattr(job, c.key) for c in class_mapper(type(job)).column_attrs},
            rows=slice(row.row_start, row.row_end),
            cols=None if row.col_start is None else slice(row.col_start, row.col_end),
        )
        attempts = row.attempts
        if not finishing and attempts > kind.max_attempts:
            # Started that often without finishing, and without raising (a raise fails the job
            # at max_attempts): its worker died each time, e.g. killed for memory on a block
            # too large. Fail the job, rather than lose a worker every lease for ever.
            reason = (
                f"tile {index} ({tile.where(kind.rows_name)}): its worker died on each of "
                f"{attempts - 1} attempts"
            )
            log.warning("%s job %d: %s", kind.name, job_id, reason)
            tiles.settle_job(session, kind=kind.name, job_id=job_id, error=reason)
            return "failed"
    if finishing:
        finish_job(kind, sessions, job_id=job_id)
        return "finished job"
    storing = False
    try:
        found = kind.compute(tile, options)
        # Storing can fail the job too: a row the database refuses was raised as it was, and
        # the job stayed running however often the tile was sent again.
        storing = True
        with session_scope(sessions) as session:
            kind.store(session, job_id, found)
            counted = tiles.finish_tile(session, kind=kind.name, job_id=job_id, index=index)
    except Exception as exc:
        if storing and is_outage(exc):
            # The database away, not the tile's fault: it is sent again, never failed, and the
            # attempt does not count (if the database answers already; else it stays counted).
            try:
                with session_scope(sessions) as session:
                    tiles.uncount_attempt(session, kind=kind.name, job_id=job_id, index=index)
            except Exception:
                log.warning("%s job %d: tile %d's attempt stays counted", kind.name, job_id, index)
            raise
        reason = f"tile {index} ({tile.where(kind.rows_name)}): {type(exc).__name__}: {exc}"
        log.warning("%s job %d: %s (attempt %d)", kind.name, job_id, reason, attempts)
        if attempts >= kind.max_attempts or isinstance(exc, kind.fatal):
            with session_scope(sessions) as session:
                tiles.settle_job(session, kind=kind.name, job_id=job_id, error=reason)
            return "failed"
        raise
    if counted is None or counted[0] != counted[1]:
        return "tile done"
    finish_job(kind, sessions, job_id=job_id)
    return "finished job"


def finish_job(kind: JobKind, sessions: sessionmaker[Session], *, job_id: int) -> None:
    """Write the job's outputs and settle it (failed, with the reason, if writing them failed)."""
    try:
        kind.finish(sessions, job_id)
    except Exception as exc:
        if is_outage(exc):
            raise  # the database away: the job's last tile is sent again, the job finished then
        with session_scope(sessions) as session:
            tiles.settle_job(
                session, kind=kind.name, job_id=job_id, error=f"writing outputs: {exc}"
            )
        raise
    with session_scope(sessions) as session:
        tiles.settle_job(session, kind=kind.name, job_id=job_id)
    log.info("%s job %d done", kind.name, job_id)


def tile_task(kind: JobKind) -> Any:
    """The kind's tile task: one message per tile, ``[job_id, index]``, leased while it runs (a
    dead worker's tile goes back to the queue: worker/sweeper.py)."""

    @shared_task(bind=True, name=kind.kind.task, acks_late=True)
    def run(self: Any, *args: object) -> str:
        ids = [a for a in args if isinstance(a, int) and not isinstance(a, bool) and a >= 0]
        if len(args) != 2 or len(ids) != 2:
            raise Reject("expected two arguments: job id and tile index", requeue=False)
        ctx = context(self.app)
        with ctx.leases.tile(TileKey(kind.name, ids[0], ids[1])) as held:
            if not held:
                return "done or held by another worker"
            return run_tile(
                kind, ctx.sessions, job_id=ids[0], index=ids[1], options=kind.options(ctx.settings)
            )

    return run


def run_inline(
    run_one: Callable[[int], str], describe: Describe, *, progress: bool = False
) -> dict[str, Any]:
    """Compute every tile in this process, in order, the way a worker does; stop at a failure."""
    total = describe()["tiles_total"]
    with progress_bar(progress, total, "tiles") as advance:
        for index in range(total):
            if run_one(index) == "failed":
                break
            advance(1)
    return describe()


def follow(describe: Describe, *, progress: bool = False, poll_s: float = 0.5) -> dict[str, Any]:
    """Wait for the workers to finish the job (or fail it), showing tiles done."""
    summary = describe()
    with progress_bar(progress, summary["tiles_total"], "tiles") as advance:
        seen = 0
        while summary["status"] not in ("done", "failed"):
            time.sleep(poll_s)
            summary = describe()
            advance(summary["tiles_done"] - seen)
            seen = summary["tiles_done"]
    return summary
