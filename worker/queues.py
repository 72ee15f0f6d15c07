"""Queues, routing and the one way cases are put on them."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

from celery import Celery
from kombu import Queue
from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_scope
from db.tables import Priority

log = logging.getLogger(__name__)

SCORE_TASK = "medbatch.score_cases"
REQUEUE_TASK = "medbatch.requeue_stale_cases"
GENOME_TASK = "medbatch.genome_tile"
NIGHTLY_TASK = "medbatch.nightly_drop"
CHEM_TASK = "medbatch.compound_tile"
EXPLAIN_TASK = "medbatch.explain_cases"

#: One queue per priority, plus the genome queue; a scoring worker listens on the score queues.
SCORE_QUEUES = tuple(f"score.{p.value}" for p in Priority)
GENOME_QUEUE = "genome"
CHEM_QUEUE = "chem"
#: Attributions of scores already committed: read after every scoring queue (lowest priority).
EXPLAIN_QUEUE = "explain"
#: What a scoring worker listens to by default, in the order it reads them.
SCORING_WORKER_QUEUES = (*SCORE_QUEUES, EXPLAIN_QUEUE)
ALL_QUEUES = (*SCORE_QUEUES, EXPLAIN_QUEUE, GENOME_QUEUE, CHEM_QUEUE)


def queue_for(priority: Priority | str) -> str:
    return f"score.{Priority(priority).value}"


def task_queues() -> list[Queue]:
    return [Queue(name, routing_key=name) for name in ALL_QUEUES]


def enqueue_cases(
    app: Celery, cases: Iterable[tuple[int, Priority | str]], *, per_message: int
) -> int:
    """Send scoring messages for ``(case id, priority)`` pairs, ``per_message`` ids a message.

    Call only after the cases' rows are committed: a worker must never receive an id it cannot read.
    Returns the number of messages sent.
    """
    by_queue: dict[str, list[int]] = defaultdict(list)
    for case_id, priority in cases:
        by_queue[queue_for(priority)].append(int(case_id))
    sent = 0
    for queue, ids in by_queue.items():
        for start in range(0, len(ids), per_message):
            chunk = ids[start : start + per_message]
            app.send_task(SCORE_TASK, args=[chunk], queue=queue, routing_key=queue)
            sent += 1
    return sent


def enqueue_explanations(app: Celery, case_ids: Iterable[int], *, per_message: int) -> int:
    """Send explain messages for cases whose score (and explanation ledger row) is committed."""
    ids = [int(i) for i in case_ids]
    sent = 0
    for start in range(0, len(ids), per_message):
        chunk = ids[start : start + per_message]
        app.send_task(EXPLAIN_TASK, args=[chunk], queue=EXPLAIN_QUEUE, routing_key=EXPLAIN_QUEUE)
        sent += 1
    return sent


def send_or_leave(
    send: Callable[[], object],
    sessions: sessionmaker[Session],
    mark_unsent: Callable[..., None],
    case_ids: Sequence[int],
    *,
    what: str,
) -> bool:
    """Send the messages of rows already committed; if the broker is away, mark the rows unsent
    (``mark_unsent``: db.repo's for cases, db.explanations' for their ledger), and the sweeper
    sends them once it is back (at its next sweep). True if they were sent."""
    try:
        send()
        return True
    except Exception as exc:
        log.warning(
            "%s for %d cases not sent, left for the sweeper: %s",
            what,
            len(case_ids),
            type(exc).__name__,
        )
    try:
        with session_scope(sessions) as session:
            mark_unsent(session, case_ids=case_ids)
    except Exception as exc:
        log.warning(
            "could not mark %d cases unsent either (the sweeper finds them later): %s",
            len(case_ids),
            type(exc).__name__,
        )
    return False
