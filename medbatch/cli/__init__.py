"""The ``medbatch`` command line: demo, api, worker, sweeper, submit, nightly, cases, genome,
compounds, models, db.

One module per command group; each adds its subcommands with ``add_parsers`` and imports what it
needs only when it runs, so ``medbatch --help`` stays fast (no torch, Celery or SQLAlchemy).
"""

from __future__ import annotations

import argparse
import os
import sys

from medbatch.cli import _common, cases, compounds, db, genome, models, nightly, service, submit
from models.cases.registry import RegistryFileError
from models.device import DeviceUnavailable

#: The order the groups appear in ``medbatch --help``.
GROUPS = (service, submit, nightly, cases, genome, compounds, models, db)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medbatch",
        description="Batch scoring of patient cases, genome comparisons and compound searches.",
        epilog="Configuration: MEDBATCH_* environment variables (docs/configuration.md).",
        formatter_class=_common.HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    _describe(parser)
    return parser


def _describe(parser: argparse.ArgumentParser) -> None:
    """Each command's one-line help becomes the description its own --help starts with."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                child.description = child.description or helps.get(name)
                _describe(child)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from medbatch.settings import get_settings, setting_problems, unknown_variables

    try:
        settings = get_settings()
    except ValidationError as exc:
        for problem in setting_problems(exc):
            print(f"medbatch: {problem}", file=sys.stderr)
        return 2
    for line in unknown_variables(os.environ):
        print(f"medbatch: warning: {line}", file=sys.stderr)
    _common.setup_logging(settings)
    try:
        return int(args.func(args, settings))
    except (_common.CliError, DeviceUnavailable, RegistryFileError) as exc:
        print(f"medbatch {_name(args)}: {exc}", file=sys.stderr)
        return exc.code if isinstance(exc, _common.CliError) else 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        refused = _environment_problem(exc)
        if refused is None:
            raise
        print(f"medbatch {_name(args)}: {refused}", file=sys.stderr)
        return 1


def _name(args: argparse.Namespace) -> str:
    """The command as typed: ``db create-tenant``."""
    return " ".join(
        str(getattr(args, key))
        for key in ("command", f"{args.command}_command")
        if getattr(args, key, None)
    )


def _environment_problem(exc: Exception) -> str | None:
    """One line for what the machine refused (a folder that cannot be made, a database that
    cannot be reached), or None for a bug, which keeps its traceback. The line holds the
    driver's own first line, never the SQL or its parameters (they may hold a patient's
    values)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    # sqlalchemy is not imported for --help; an exception of it means it was.
    sa = sys.modules.get("sqlalchemy.exc")
    # Celery's send_task raises kombu's OperationalError when the broker does not answer; the
    # rows committed before it are queued with a send time, so a sweeper sends them again.
    kombu = sys.modules.get("kombu.exceptions")
    if kombu is not None and isinstance(exc, kombu.OperationalError):
        return (
            f"cannot reach the broker (MEDBATCH_BROKER_URL): {str(exc).rstrip('.')}; what was "
            "stored before is kept, and a sweeper (medbatch sweeper) sends it once the broker "
            "answers"
        )
    # PostgreSQL is migrated on purpose (SQLite on first use): a missing table or column there
    # means `db upgrade` was not run (SQLSTATE 42P01 undefined table, 42703 undefined column).
    if (
        sa is not None
        and isinstance(exc, sa.ProgrammingError)
        and getattr(exc.orig, "sqlstate", None) in ("42P01", "42703")
    ):
        return "the database has no medbatch schema, or an older one: run `medbatch db upgrade`"
    if sa is not None and isinstance(exc, sa.OperationalError):
        first = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
        return f"cannot use the database (MEDBATCH_DATABASE_URL): {first}"
    return None


if __name__ == "__main__":
    sys.exit(main())
