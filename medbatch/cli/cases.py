"""``medbatch cases``: cases in the database (dead letters)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from medbatch.cli._common import celery, command, database, err, fail, group, row_id, tenant_id

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from medbatch.settings import Settings


#: An argparse ``type``: a case id (a positive bigint); 10**20 was a database traceback.
case_id = row_id("case id")


def add_parsers(sub: Any) -> None:
    cases, csub = group(sub, "cases", "cases in the database")
    replay = command(csub, "replay", "re-queue dead-lettered cases with a fresh count")
    replay.add_argument("case_ids", nargs="*", type=case_id, help="only these case ids")
    replay.add_argument("--tenant", help="only this tenant's cases (default: every tenant)")
    replay.add_argument("--all", action="store_true", help="every dead-lettered case")
    again = command(
        csub, "explain-again", "re-queue failed explanations of scored cases with a fresh count"
    )
    again.add_argument("case_ids", nargs="*", type=case_id, help="only these cases")
    again.add_argument("--tenant", help="only this tenant's cases (default: every tenant)")
    again.add_argument("--all", action="store_true", help="every failed explanation")
    cases.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from db import repo
    from db.engine import session_scope
    from models.cases.registry import load_registry
    from worker.queues import enqueue_cases

    if not (args.all or args.tenant or args.case_ids):
        fail("say which: --all, --tenant NAME or case ids")
    if args.cases_command == "explain-again":
        return explain_again(args, settings)
    # A retired version scores no case: replayed, its cases would only fail again, no longer
    # dead letters. They stay dead letters, to replay if the version is released again.
    retired = [
        (s.name, s.version) for s in load_registry(settings.artifact_dir) if s.status == "retired"
    ]
    with database(settings) as sessions:
        owner = tenant_id(sessions, args.tenant, create=False) if args.tenant else None
        skipped, missing = None, False
        with session_scope(sessions) as session:
            replayed = repo.replay_dead_letters(
                session, tenant_id=owner, case_ids=args.case_ids or None, retired=retired
            )
            if args.case_ids:
                left = sorted(set(args.case_ids) - {i for i, _ in replayed})
                if left:
                    skipped, missing = _why_not(session, left, owner)
            elif retired:
                skipped = _retired_left(session, owner, retired)
        if replayed:
            app = celery(settings)
            try:
                enqueue_cases(app, replayed, per_message=settings.cases_per_message)
            finally:
                app.close()
    print(f"re-queued {len(replayed)} dead-lettered cases")
    if skipped:
        err(skipped)
    # A named case that does not exist is a typo or the wrong database: a script must see it.
    return 1 if missing else 0


def explain_again(args: argparse.Namespace, settings: Settings) -> int:
    """``medbatch cases explain-again``: failed explanations (a model that could not be loaded
    through every attempt, a deploy that lasted longer) computed once more by the explain
    stage; the scores stand as they are."""
    from db import explanations
    from db.engine import session_scope
    from worker.queues import enqueue_explanations, send_or_leave

    with database(settings) as sessions:
        owner = tenant_id(sessions, args.tenant, create=False) if args.tenant else None
        with session_scope(sessions) as session:
            again = explanations.retry_failed(
                session, tenant_id=owner, case_ids=args.case_ids or None
            )
        if again:
            app = celery(settings)
            per_message = settings.explain_max_batch_size
            try:
                # Committed already: if the broker is away, the sweeper sends them.
                send_or_leave(
                    lambda: enqueue_explanations(app, again, per_message=per_message),
                    sessions,
                    explanations.mark_unsent,
                    again,
                    what="explain messages",
                )
            finally:
                app.close()
    print(f"re-queued {len(again)} failed explanations")
    left = sorted(set(args.case_ids) - set(again))
    if left:
        # Internal ids only; a script must see that a named case was not re-queued.
        err(
            f"not re-queued (no failed explanation: none asked, pending, done, or another "
            f"tenant's): {', '.join(map(str, left[:20]))}{' …' if len(left) > 20 else ''}"
        )
        return 1
    return 0


def _retired_left(
    session: Session, owner: int | None, retired: list[tuple[str, str]]
) -> str | None:
    """How many dead letters were left because their model version is retired, by version."""
    from sqlalchemy import func, select

    from db.tables import Case

    stmt = (
        select(Case.model_name, Case.model_version, func.count())
        .where(Case.dead_letter.is_(True))
        .group_by(Case.model_name, Case.model_version)
        .order_by(Case.model_name, Case.model_version)
    )
    if owner is not None:
        stmt = stmt.where(Case.tenant_id == owner)
    left = [f"{n} of {m}@{v}" for m, v, n in session.execute(stmt) if (m, v) in retired]
    return f"not re-queued (model version retired): {', '.join(left)}" if left else None


def _why_not(session: Session, ids: list[int], owner: int | None) -> tuple[str, bool]:
    """Why the named cases ``ids`` were not re-queued: their status, or that there is none; and
    whether some of them do not exist (for this tenant)."""
    from sqlalchemy import select

    from db.tables import Case

    stmt = select(Case.id, Case.status, Case.dead_letter).where(Case.id.in_(ids))
    if owner is not None:
        stmt = stmt.where(Case.tenant_id == owner)
    rows = {i: (s, dead) for i, s, dead in session.execute(stmt)}
    status = {i: s for i, (s, dead) in rows.items() if not dead}
    retired = [str(i) for i in ids if i in rows and rows[i][1]]
    found = [f"{i} ({status[i].value})" for i in ids if i in status]
    missing = [str(i) for i in ids if i not in rows]
    parts = [f"not re-queued (not dead letters): {', '.join(found)}"] if found else []
    if retired:
        parts.append(f"not re-queued (model version retired): {', '.join(retired)}")
    if missing:
        where = " of this tenant" if owner is not None else ""
        parts.append(f"no such case{where}: {', '.join(missing)}")
    return "; ".join(parts), bool(missing)
