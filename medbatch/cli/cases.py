"""``medbatch cases``: cases in the database (dead letters)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from medbatch.cli._common import celery, command, database, fail, group, tenant_id

if TYPE_CHECKING:
    from medbatch.settings import Settings


def add_parsers(sub: Any) -> None:
    cases, csub = group(sub, "cases", "cases in the database")
    replay = command(csub, "replay", "re-queue dead-lettered cases with a fresh count")
    replay.add_argument("case_ids", nargs="*", type=int, help="only these case ids")
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
        with session_scope(sessions) as session:
            replayed = repo.replay_dead_letters(
                session, tenant_id=owner, case_ids=args.case_ids or None
            )
        if replayed:
            app = celery(settings)
            try:
                enqueue_cases(app, replayed, per_message=settings.cases_per_message)
            finally:
                app.close()
    print(f"re-queued {len(replayed)} dead-lettered cases")
    return 0
