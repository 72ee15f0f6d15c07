"""What every command shares: the formatter, logging, errors, and one way to open the database.

Nothing heavy is imported here at module level: ``medbatch --help`` imports every command module
to build the parser, and must not pay for SQLAlchemy, Celery or torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session, sessionmaker

    from medbatch.settings import Settings
    from worker.tiled import JobKind, Submitter

#: Kept in step with worker.queues.ALL_QUEUES and models.train.TRAINABLE by tests/test_cli.py
#: (importing those here would import Celery and torch for ``--help``).
ALL_QUEUES = ("score.stat", "score.routine", "score.bulk", "explain", "genome", "chem")
TRAINABLE = (
    "breast-cancer",
    "whas500-mortality",
    "ecg-cnn",
    "vitals-gru",
    "ecg-cnn@0.1.0",
    "events-transformer",
)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_ = action.help or ""
        default = action.default
        if (
            "default" in help_
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not (action.option_strings or action.nargs in ("?", "*"))
        ):
            return help_
        return f"{help_} (default: %(default)s)"


def number(
    kind: Callable[[str], Any], low: float | None = None, high: float | None = None
) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind`` of the text, refused (exit 2, with usage) outside
    ``[low, high]``, where argparse alone would take -5 days or port 99999 and fail deep later."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if (
            value != value
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            bounds = f"at least {low:g}" if high is None else f"between {low:g} and {high:g}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def row_id(what: str) -> Callable[[str], int]:
    """An argparse ``type``: the id of a row (a positive bigint), refused (exit 2, with usage)
    otherwise; a larger one was an OverflowError traceback from the database driver."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {what}: {text!r}") from None
        if not 1 <= value < 2**63:
            raise argparse.ArgumentTypeError(f"not a {what}: {text}")
        return value

    return parse


def entity_name(text: str) -> str:
    """An argparse ``type`` for a tenant's or a client's name: 1 to 100 characters (the column's
    size: PostgreSQL refused a longer one with a traceback), not only spaces."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if len(text) > 100:
        raise argparse.ArgumentTypeError(f"at most 100 characters, got {len(text)}")
    return text


def add_tenant(parser: argparse.ArgumentParser, owns: str = "job") -> None:
    """``--tenant``: the owner of what the command makes (created if new; default ``local``)."""
    parser.add_argument(
        "--tenant", type=entity_name, default="local", help=f"owner of the {owns} (created if new)"
    )


def command(sub: Any, name: str, help: str, **options: Any) -> argparse.ArgumentParser:
    """A command (or a group's subcommand) of ``sub``, its help in the shared formatter."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, formatter_class=HelpFormatter, **options
    )
    return parser


def group(sub: Any, name: str, help: str) -> tuple[argparse.ArgumentParser, Any]:
    """A command group (``medbatch db …``): the group's parser and its subcommands' ``sub``; the
    chosen one is ``args.<name>_command``."""
    parser = command(sub, name, help)
    return parser, parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


class CliError(Exception):
    """A refusal the user can act on: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 2) -> NoReturn:
    raise CliError(message, code)


def setup_logging(settings: Settings) -> None:
    import logging

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Alembic announces each of its plugins at INFO on every import; httpx logs each request of
    # `medbatch submit` at INFO, in the middle of the summary it prints.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def ensure_schema(database_url: str) -> None:
    """Migrate a SQLite database on first use (the embedded default works in an empty folder).

    PostgreSQL is migrated on purpose (``medbatch db upgrade``, compose's migrate service); a
    SQLite file belongs to this folder, so bringing it to the newest schema is always right. A
    file lock keeps two processes (the demo's API and worker) from migrating at once.
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(database_url)
    if parsed.get_backend_name() != "sqlite":
        require_schema(database_url)
        return
    if parsed.database in (None, "", ":memory:"):
        return
    import fcntl
    import logging

    from db.migrate import upgrade

    path = Path(parsed.database)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".migrate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        level = logging.getLogger("alembic").level
        # Alembic logs every step at INFO; a first use should not print a migration log.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        try:
            upgrade(database_url)
        finally:
            logging.getLogger("alembic").setLevel(level)


def require_broker(settings: Settings) -> None:
    """A worker or sweeper configured with a broker that does not answer (Redis not started, a
    wrong MEDBATCH_BROKER_URL) stops in one line: the worker retried a hundred times, logging
    "Cannot connect to worker.transport:Transport://…" each time, and the sweeper "broker state
    unknown: OperationalError" every interval. The embedded broker is started by whoever
    needs it first."""
    if settings.embedded_broker:
        return
    from kombu import Connection
    from kombu.exceptions import OperationalError

    with Connection(settings.broker_url, connect_timeout=5) as connection:
        # Failover brokers (URLs joined by ';'): each in turn, then the first once more after a
        # pause (kombu waits only between rounds). Two tries in all stopped a worker whose third
        # broker answered.
        tries = max(1, len(connection.alt))
        try:
            connection.ensure_connection(max_retries=tries, timeout=5 * (tries + 1))
        except OperationalError as exc:
            # kombu's message names the host and port, never a password.
            fail(
                f"cannot reach the broker (MEDBATCH_BROKER_URL): {str(exc).rstrip('.')}; start "
                "it, or unset MEDBATCH_BROKER_URL for the embedded one",
                1,
            )


def require_schema(database_url: str) -> None:
    """Refuse, before anything starts, a PostgreSQL database that cannot be used: one that does
    not answer (a wrong MEDBATCH_DATABASE_URL, a server that is down) or was never migrated.
    `medbatch api`, `worker` and `sweeper` started on one anyway: the API answered 503s, the
    worker logged a traceback at its first sweep and failed every task, the sweeper logged
    "sweep failed: OperationalError" every interval. The connection error reaches the user as
    one line (medbatch.cli._environment_problem). A schema newer than this code (a revision it
    does not know: another deployment migrated first) is left alone."""
    import logging

    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from db.engine import make_engine
    from db.migrate import alembic_config

    engine = make_engine(database_url)
    alembic_log = logging.getLogger("alembic")
    level = alembic_log.level
    alembic_log.setLevel(logging.WARNING)  # "Context impl PostgresqlImpl." on every command
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    finally:
        alembic_log.setLevel(level)
        engine.dispose()
    script = ScriptDirectory.from_config(alembic_config(database_url))
    known = {revision.revision for revision in script.walk_revisions()}
    if not current or (current <= known and current != set(script.get_heads())):
        fail("the database has no medbatch schema, or an older one: run `medbatch db upgrade`", 1)


@contextmanager
def database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """The one engine of a command (schema ensured), disposed of at the end."""
    from db.engine import make_engine, make_sessionmaker

    ensure_schema(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


@contextmanager
def transaction(settings: Settings) -> Iterator[Session]:
    """One transaction on the command's database (:func:`database`), committed at the end."""
    from db.engine import session_scope

    with database(settings) as sessions, session_scope(sessions) as session:
        yield session


def find_tenant(session: Session, name: str, *, create: bool = False) -> int:
    """The id of tenant ``name``; created (without printing a key) when ``create``."""
    from sqlalchemy import select

    from db import repo
    from db.tables import Tenant

    found = session.scalar(select(Tenant.id).where(Tenant.name == name))
    if found is None:
        if not create:
            fail(f"no tenant {name!r}")
        found = repo.create_tenant(session, name=name)[0].id
    return int(found)


def tenant_id(sessions: sessionmaker[Session], name: str, *, create: bool) -> int:
    """:func:`find_tenant` in a transaction of its own."""
    from db.engine import session_scope

    with session_scope(sessions) as session:
        return find_tenant(session, name, create=create)


def celery(settings: Settings) -> Celery:
    """A sending-only Celery app (no tasks, no torch)."""
    from worker.app import create_app

    return create_app(settings, include_tasks=False)


def refuse_overwrite(paths: list[Path], *, force: bool, option: str = "--out") -> None:
    """Refuse to replace existing outputs unless ``--force``, and a folder where an output
    goes even so (``--force`` computed the whole job, then could not write over it)."""
    if folder := next((p for p in paths if p.is_dir()), None):
        fail(f"{option}: {folder} is a folder; give a file's name (it may be in that folder)")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        shown = ", ".join(existing[:3]) + (" …" if len(existing) > 3 else "")
        fail(f"{option}: {shown} exists; add --force to overwrite")


def copy_out(source: str | Path, target: Path) -> None:
    """Copy a job's output to ``--out`` whole or not at all: into a hidden file beside the
    target, then renamed over it, so an interrupted copy never leaves a half-written table."""
    import os
    import shutil

    partial = target.with_name(f".{target.name}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    except OSError as exc:
        fail(f"--out: cannot write {target} ({exc.strerror}); the output stays at {source}", code=1)
    finally:
        with suppress(OSError):  # where the folder could not be made, there is nothing
            partial.unlink(missing_ok=True)


def print_json(value: Any) -> None:
    import json

    print(json.dumps(value, indent=2, default=str))


def err(message: str) -> None:
    print(message, file=sys.stderr)


def follow(describe: Any, *, app: Celery | None, queue: str) -> dict[str, Any]:
    """Wait for a tiled job the workers run, with a progress bar; say so (once per change) when
    no live worker listens on its queue, instead of waiting in silence."""
    from worker.heartbeat import waiting_detail
    from worker.tiled import follow as follow_tiles

    said: list[str | None] = [None]

    def watched() -> dict[str, Any]:
        summary: dict[str, Any] = describe()
        detail = None
        if summary["status"] not in ("done", "failed") and not summary.get("tiles_done"):
            detail = waiting_detail(app, queue)
        if detail != said[0] and detail is not None:
            err(f"  {detail}")
        said[0] = detail
        summary["detail"] = detail
        return summary

    return follow_tiles(watched, progress=True)


def add_follow(submit: argparse.ArgumentParser, sub: Any) -> None:
    """A tiled job's ``--wait`` and ``--inline`` on its ``submit`` command, and the group's
    ``status`` command (``sub``): ``medbatch genome compare`` and ``genome status``,
    ``compounds search`` and ``compounds status``."""
    submit.add_argument("--wait", action="store_true", help="show progress until it is done")
    submit.add_argument(
        "--inline",
        action="store_true",
        help="run the tiles in this process, no worker (always so with the embedded broker)",
    )
    status = command(sub, "status", "a job's progress and outputs")
    status.add_argument("job_id", type=row_id("job id"), help="the job's id")


def print_job(settings: Settings, kind: JobKind, job_id: int) -> int:
    """``medbatch <group> status ID``: the job as the API describes it, or a refusal."""
    from db.tiles import get_job

    with transaction(settings) as session:
        found = get_job(session, kind.kind.table, job_id=job_id)
        if found is None:
            fail(f"no job {job_id}")
        print_json(kind.kind.describe(found))
    return 0


@dataclass(frozen=True)
class TiledRun:
    """A tiled job (genome, compounds) the CLI submits for ``owner``: its tiles computed in this
    process (``--inline``, and always so with the embedded broker) or by the workers."""

    settings: Settings
    #: The submitter's ``app`` is where the tiles are sent; None: computed here.
    submitter: Submitter
    #: The command group, whose ``status`` command follows the job (``genome``, ``compounds``).
    group: str

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.submitter.sessions

    @property
    def app(self) -> Celery | None:
        return self.submitter.app

    @property
    def inline(self) -> bool:
        return self.app is None

    def submit(
        self,
        submit: Callable[..., dict[str, Any]],
        *,
        option: Callable[[str], str] = lambda field: field.replace("_", "-"),
        **arguments: Any,
    ) -> dict[str, Any]:
        """The kind's ``submit``; a refusal fails the command, naming the option of its field
        (``option``: ``tile_rows`` is ``--tile-rows``, unless the command says otherwise)."""
        return self.submitter.submit(
            submit, lambda exc: CliError(f"--{option(exc.field)}: {exc}"), **arguments
        )

    def finish_if(self, kind: JobKind, job_id: int, *, wait: bool) -> dict[str, Any] | None:
        """:meth:`finish` when computed here or when the user waits; else None, after saying
        how to follow the job (``medbatch <group> status ID``, :func:`add_follow`)."""
        if not (self.inline or wait):
            print(f"  follow it: medbatch {self.group} status {job_id}")
            return None
        return self.finish(kind, job_id)

    def finish(self, kind: JobKind, job_id: int) -> dict[str, Any]:
        """Compute the job's tiles here, or follow the workers; fail unless it ends done."""
        if self.inline:
            summary = kind.run_inline(
                self.sessions, job_id=job_id, progress=True, **kind.options(self.settings)
            )
        else:
            summary = follow(
                lambda: kind.kind.describe_id(self.sessions, job_id),
                app=self.app,
                queue=kind.kind.queue,
            )
        if summary["status"] != "done":
            fail(f"job {job_id} failed: {summary['error']}", code=1)
        return summary


def require_device(settings: Settings) -> None:
    """Refuse at once, where this process computes, a ``MEDBATCH_DEVICE=cuda`` that torch does
    not see (:class:`models.device.DeviceUnavailable`), not at every batch or tile."""
    if settings.device == "cuda":
        from models.device import resolve_device

        resolve_device("cuda")


def require_chem_engine(settings: Settings) -> None:
    """Refuse at once, where this process computes compound tiles, a
    ``MEDBATCH_CHEM_ENGINE=cuda`` that torch does not see, as :func:`require_device` does:
    every chem tile failed on it, the CLI's job after it was made."""
    if settings.chem_engine == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail(
                "MEDBATCH_CHEM_ENGINE=cuda but torch sees no CUDA device "
                "(use MEDBATCH_CHEM_ENGINE=auto on this machine)"
            )


@contextmanager
def tiled_run(args: argparse.Namespace, settings: Settings) -> Iterator[TiledRun]:
    """The database and broker of a tiled job of ``--tenant`` (created if new)."""
    from worker.tiled import Submitter

    inline = args.inline or settings.embedded_broker
    if inline:
        require_device(settings)
    app = None if inline else celery(settings)
    with database(settings) as sessions:
        owner = tenant_id(sessions, args.tenant, create=True)
        submitter = Submitter(owner, sessions, app, settings.artifact_dir)
        yield TiledRun(settings, submitter, args.command)
