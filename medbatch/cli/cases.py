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
    cases.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from db import repo
    from db.engine import session_scope
    from worker.queues import enqueue_cases

    if not (args.all or args.tenant or args.case_ids):
        fail("say which: --all, --tenant NAME or case ids")
    with database(settings) as sessions:
        owner = tenant_id(sessions, args.tenant, create=False) if args.tenant else None
        skipped = None
        with session_scope(sessions) as session:
            replayed = repo.replay_dead_letters(
                session, tenant_id=owner, case_ids=args.case_ids or None
            )
            if args.case_ids:
                left = sorted(set(args.case_ids) - {i for i, _ in replayed})
                skipped = _why_not(session, left, owner) if left else None
        if replayed:
            app = celery(settings)
            try:
                enqueue_cases(app, replayed, per_message=settings.cases_per_message)
            finally:
                app.close()
    print(f"re-queued {len(replayed)} dead-lettered cases")
    if skipped:
        err(skipped)
    return 0


def _why_not(session: Session, ids: list[int], owner: int | None) -> str:
    """Why the named cases ``ids`` were not re-queued: their status, or that there is none."""
    from sqlalchemy import select

    from db.tables import Case

    stmt = select(Case.id, Case.status).where(Case.id.in_(ids))
    if owner is not None:
        stmt = stmt.where(Case.tenant_id == owner)
    status = {i: s for i, s in session.execute(stmt)}
    found = [f"{i} ({status[i].value})" for i in ids if i in status]
    missing = [str(i) for i in ids if i not in status]
    parts = [f"not re-queued (not dead letters): {', '.join(found)}"] if found else []
    if missing:
        where = " of this tenant" if owner is not None else ""
        parts.append(f"no such case{where}: {', '.join(missing)}")
    return "; ".join(parts)
