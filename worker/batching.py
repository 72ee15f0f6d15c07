"""The batcher: many scoring messages, one forward pass.

A Celery task *strategy* decides what a worker does with each message it receives. Celery's
default runs the task once per message. :class:`Batcher` instead keeps each message unacknowledged
in a buffer per queue and runs one :func:`~worker.tasks.scoring.score_cases` over every case id in
the buffer when it holds ``max_batch_size`` cases or ``max_delay_ms`` after its first message came,
whichever is first; then it acknowledges the messages, after the database commit. (The pattern is
celery-batches'; that package pins Celery < 5.7 and counts messages, where a batch here is counted
in cases, because one bulk message may carry many.)

Bounded: Celery's prefetch limit (set to the sum of the per-queue batch sizes, each message holding
at least one case) caps the unacknowledged messages a worker holds. Priority: the transport reads
queues in the order given to ``--queues`` (kombu's ``priority`` queue order), and a flush runs the
STAT buffer first, so STAT cases never wait behind a bulk backlog for more than one batch.
A worker that dies with messages in its buffers never acknowledged them: Redis hands them out again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, Task

from worker import metrics
from worker.app import context
from worker.queues import SCORE_QUEUES
from worker.tasks.scoring import parse_case_ids, score_cases

log = logging.getLogger(__name__)

#: Seconds to wait before handing a batch back after the database failed, doubling to this cap.
MAX_BACKOFF_S = 30.0


@dataclass
class _Message:
    task_id: str
    case_ids: list[int]
    ack: Callable[[], None]
    reject: Callable[[bool], None]


@dataclass
class _Buffer:
    queue: str
    max_cases: int
    max_delay_s: float
    messages: list[_Message] = field(default_factory=list)
    n_cases: int = 0
    timer: Any = None

    def take(self) -> list[_Message]:
        messages, self.messages, self.n_cases = self.messages, [], 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        return messages


class Batcher:
    """Gathers one worker's scoring messages per queue and scores them in batches."""

    def __init__(self, task: Task, app: Celery, consumer: Any) -> None:
        self.task = task
        self.ctx = context(app)
        self.timer = consumer.timer
        self.connection_errors = consumer.connection_errors
        self.failures = 0
        settings = self.ctx.settings
        self.buffers: dict[str, _Buffer] = {}
        for queue in SCORE_QUEUES:
            size, delay_ms = settings.batching(queue)
            self.buffers[queue] = _Buffer(queue, size, delay_ms / 1000)

    def on_message(self, message: Any, payload: Any, ack: Any, reject: Any, callbacks: Any) -> None:
        """Celery's consumer calls this for every ``medbatch.score_cases`` message it receives."""
        queue = (message.delivery_info or {}).get("routing_key") or "score.routine"
        buffer = self.buffers.get(queue) or self.buffers["score.routine"]
        task_id = (message.headers or {}).get("id", "?")
        try:
            args, _kwargs, _embed = message.decode()
            case_ids = parse_case_ids(args)
        except Exception as exc:
            # A malformed message names no case we could fail; drop it loudly, never loop on it.
            log.error("rejected malformed medbatch.score_cases message %s: %s", task_id, exc)
            metrics.MESSAGES_REJECTED.labels(queue).inc()
            reject(log, self.connection_errors, False)
            return
        buffer.messages.append(
            _Message(
                task_id,
                case_ids,
                ack=lambda: ack(log, self.connection_errors),
                reject=lambda requeue: reject(log, self.connection_errors, requeue),
            )
        )
        buffer.n_cases += len(case_ids)
        if buffer.n_cases >= buffer.max_cases:
            self.flush(buffer.queue)
        elif buffer.timer is None:
            buffer.timer = self.timer.call_after(buffer.max_delay_s, self.flush, (buffer.queue,))

    def flush(self, queue: str) -> None:
        """Score what ``queue`` holds; first, whatever waits in the queues ahead of it."""
        for name in SCORE_QUEUES:
            buffer = self.buffers[name]
            if buffer.messages:
                self._score(buffer)
            if name == queue:
                break

    def _score(self, buffer: _Buffer) -> None:
        messages = buffer.take()
        case_ids = list(dict.fromkeys(i for m in messages for i in m.case_ids))
        try:
            outcome = score_cases(
                case_ids,
                sessions=self.ctx.sessions,
                load_model=self.ctx.model,
                queue=buffer.queue,
                max_batch_size=buffer.max_cases,
                max_deliveries=self.ctx.settings.max_deliveries,
                explain_top_k=self.ctx.settings.explain_top_k,
                explain_steps=self.ctx.settings.explain_steps,
                explain_sequences=self.ctx.settings.explain_sequences,
                load_shadow=self.ctx.shadow,
            )
        except Exception as exc:
            # Nothing was committed for these cases (or a delivery was counted and nothing else):
            # hand the messages back for another delivery, after a pause that grows while the
            # failure lasts. The delivery counter turns a case that always fails into a dead letter.
            self.failures += 1
            pause = min(MAX_BACKOFF_S, 0.5 * 2 ** (self.failures - 1))
            log.exception(
                "batch of %d cases from %s failed; returning %d messages in %.1f s",
                len(case_ids),
                buffer.queue,
                len(messages),
                pause,
            )
            self._note_error(case_ids, exc)
            time.sleep(pause)
            for m in messages:
                m.reject(True)
            return
        self.failures = 0
        for m in messages:
            m.ack()
        # Counts and internal ids only: no external ids (they may be MRNs), no feature values.
        log.info(
            "%s: %d messages, %d cases, %d scored in %d forward passes, %d failed, %d dead letters",
            buffer.queue,
            len(messages),
            len(case_ids),
            len(outcome.scored),
            outcome.forward_passes,
            len(outcome.failed),
            len(outcome.dead_letters),
        )

    def _note_error(self, case_ids: list[int], exc: Exception) -> None:
        from db import repo
        from db.engine import session_scope

        try:
            with session_scope(self.ctx.sessions) as session:
                repo.record_error(session, case_ids=case_ids, error=f"{type(exc).__name__}: {exc}")
        except Exception:
            log.warning("could not record the error on the cases (database unreachable?)")
