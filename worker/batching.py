"""The batcher: many scoring messages, one forward pass.

A Celery task *strategy* decides what a worker does with each message it receives. Celery's
default runs the task once per message. :class:`Batcher` instead keeps each message unacknowledged
in a buffer per queue and scores every case id in the buffer as one batch when it holds
``max_batch_size`` cases or ``max_delay_ms`` after its first message came, whichever is first:
:func:`~worker.tasks.scoring.start_cases` claims and scores it, and its write (one transaction)
runs in a writer thread while this thread goes on to the next batch (a STAT batch is written at
once, here); the messages are acknowledged after their batch's commit. (The pattern is
celery-batches'; that package pins Celery < 5.7 and counts messages, where a batch here is counted
in cases, because one bulk message may carry many.)

Bounded: Celery's prefetch limit (twice the sum of the per-queue batch sizes, each message holding
at least one case: one batch is written while the next gathers) caps the unacknowledged messages
a worker holds. Priority: the transport reads
queues in the order given to ``--queues`` (kombu's ``priority`` queue order), and a flush runs the
STAT buffer first, so STAT cases never wait behind a bulk backlog for more than one batch.

Leases: a flush claims its cases with this worker's lease, and leases the cases waiting in the
other buffers too; a thread renews both while the batch runs (worker/leases.py). A worker that
dies holds nothing for longer than ``lease_ttl_s``: the sweeper sends its cases again. Its
unacknowledged messages come back from Redis too, later; they find their cases done and are
settled without a forward pass.

Failures: one case's failure is that case's (worker/tasks/scoring.py). Only a database outage
fails a batch: the batcher then waits until the database answers again (up to a pause that grows
while the outage lasts), gives back the cases it claimed without counting the delivery, and
returns the messages to their queues, which it reads again STAT first.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, Task

from db import repo
from db.engine import database_answers, is_outage, session_scope
from worker import metrics
from worker.context import context
from worker.queues import SCORE_QUEUES

log = logging.getLogger(__name__)

#: Longest wait for the database after an outage failed a batch (doubling from 0.5 s to this).
MAX_BACKOFF_S = 30.0
#: How often the database is asked whether it is back, during that wait.
PROBE_EVERY_S = 0.5
#: Pause before handing back a batch that failed for a reason that is neither a case's nor an
#: outage (a defect): each delivery counts, so such cases end as dead letters, not in a loop.
DEFECT_PAUSE_S = 1.0
#: How often the event loop looks whether the batch being written has committed, when no next
#: batch comes to wait for it (its messages are acknowledged then).
WRITE_POLL_S = 0.002


@dataclass
class _Message:
    task_id: str
    case_ids: list[int]
    ack: Callable[[], None]
    reject: Callable[[bool], None]


@dataclass
class _Writing:
    """A batch scored and being written by the writer thread; its messages wait for the commit."""

    queue: str
    messages: list[_Message]
    case_ids: set[int]
    scored: Any  # worker.tasks.scoring.Scored
    future: Future[None] | None = None


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
        #: A :class:`worker.tasks.scoring.ScoringTask`: it parses a message's ids and scores a
        #: batch (this module does not import the task: the task imports it).
        self.task: Any = task
        self.ctx = context(app)
        self.timer = consumer.timer
        self.connection_errors = consumer.connection_errors
        self.failures = 0
        #: The batch being written (at most one), and the thread that writes it.
        self.writing: _Writing | None = None
        self.writer: ThreadPoolExecutor | None = None
        #: Cases an outage stopped and the database could not take back yet.
        self.to_release: set[int] = set()
        settings = self.ctx.settings
        self.buffers: dict[str, _Buffer] = {}
        for queue in SCORE_QUEUES:
            size, delay_ms = settings.batching(queue)
            self.buffers[queue] = _Buffer(queue, size, delay_ms / 1000)
        # The newest batcher of the process is the one whose waiting cases keep their leases.
        self.ctx.leases.waiting = self.waiting_case_ids
        self.ctx.leases.start()

    def waiting_case_ids(self) -> list[int]:
        """Cases of the messages waiting in the buffers (read by the lease keeper's thread)."""
        return [
            i for b in list(self.buffers.values()) for m in list(b.messages) for i in m.case_ids
        ]

    def on_message(self, message: Any, payload: Any, ack: Any, reject: Any, callbacks: Any) -> None:
        """Celery's consumer calls this for every ``medbatch.score_cases`` message it receives."""
        queue = (message.delivery_info or {}).get("routing_key") or "score.routine"
        buffer = self.buffers.get(queue) or self.buffers["score.routine"]
        task_id = (message.headers or {}).get("id", "?")
        try:
            args, _kwargs, _embed = message.decode()
            case_ids = self.task.parse_ids(args)
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
        """Score what ``queue`` holds; first, whatever waits in the queues ahead of it.

        The cases left waiting in the other buffers are leased before the batch, or, when the
        batch is STAT's, just after it: a STAT case does not wait for that statement (the
        waiting cases were as unleased from their arrival until now)."""
        latency_first = queue == SCORE_QUEUES[0]
        if not latency_first:
            self._hold_others(queue)
        for name in SCORE_QUEUES:
            buffer = self.buffers[name]
            if buffer.messages:
                self._score(buffer)
            if name == queue:
                break
        if latency_first:
            self._hold_others(queue)

    def _hold_others(self, queue: str) -> None:
        """Lease the cases waiting in the buffers this flush leaves (one statement), so a worker
        killed mid-batch strands none of them for longer than a lease."""
        ahead = SCORE_QUEUES[: SCORE_QUEUES.index(queue) + 1] if queue in SCORE_QUEUES else ()
        waiting = [
            case_id
            for name, buffer in self.buffers.items()
            if name not in ahead
            for m in buffer.messages
            for case_id in m.case_ids
        ]
        if not waiting:
            return
        try:
            with session_scope(self.ctx.sessions) as session:
                repo.hold_cases(session, case_ids=waiting, lease=self.ctx.leases.lease)
        except Exception as exc:
            log.warning("could not lease %d waiting cases: %s", len(waiting), type(exc).__name__)

    def _score(self, buffer: _Buffer) -> None:
        """Claim and score a buffer's cases, then write them in the writer thread while this
        thread goes on to the next batch; the previous batch's write is waited for first (one
        write at a time), and its messages acknowledged once it committed. A STAT batch is
        written here and now, beside the write in progress: it does not wait for a bulk
        batch's commit."""
        messages = buffer.take()
        case_ids = list(dict.fromkeys(i for m in messages for i in m.case_ids))
        if self.writing is not None and not self.writing.case_ids.isdisjoint(case_ids):
            self._settle_write()  # a case in both batches: its first write goes first
        if self.to_release:
            self._release(sorted(self.to_release))
        try:
            scored = self.task.start_batch(
                case_ids, queue=buffer.queue, max_batch_size=buffer.max_cases
            )
        except Exception as exc:
            self.ctx.leases.drop(case_ids)
            self._hand_back(buffer.queue, messages, case_ids, exc)
            return
        writing = _Writing(buffer.queue, messages, set(case_ids), scored)
        latency_first = buffer.queue == SCORE_QUEUES[0]
        if latency_first or not scored.to_write or self.timer is None:
            self._finish(writing)
            return
        self._settle_write()
        writing.future = self._writer().submit(scored.write)
        self.writing = writing
        self.timer.call_after(WRITE_POLL_S, self._check_write, (writing,))

    def _writer(self) -> ThreadPoolExecutor:
        if self.writer is None:
            self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medbatch-write")
        return self.writer

    def _check_write(self, writing: _Writing) -> None:
        """The event loop's look at the batch being written: settled once its commit is in."""
        if self.writing is not writing:
            return  # settled meanwhile, by the next batch
        if writing.future is None or writing.future.done():
            self._settle_write()
        elif self.timer is not None:
            self.timer.call_after(WRITE_POLL_S, self._check_write, (writing,))

    def _settle_write(self) -> None:
        """Wait for the batch being written, then :meth:`_finish` it."""
        writing, self.writing = self.writing, None
        if writing is not None:
            self._finish(writing)

    def _finish(self, writing: _Writing) -> None:
        """Write the batch if it is not written yet (or wait for the writer thread's write);
        acknowledge its messages once committed, or hand them back if its write failed."""
        try:
            if writing.future is not None:
                writing.future.result()
            outcome = writing.scored.finish()
        except Exception as exc:
            self._hand_back(writing.queue, writing.messages, sorted(writing.case_ids), exc)
            return
        finally:
            self.ctx.leases.drop(writing.case_ids)
        self.failures = 0
        for m in writing.messages:
            m.ack()
        # Counts and internal ids only: no external ids (they may be MRNs), no feature values.
        log.info(
            "%s: %d messages, %d cases, %d scored in %d forward passes, %d failed, "
            "%d dead letters, %d settled as they were",
            writing.queue,
            len(writing.messages),
            len(writing.case_ids),
            len(outcome.scored),
            outcome.forward_passes,
            len(outcome.failed),
            len(outcome.dead_letters),
            outcome.skipped,
        )

    def _hand_back(
        self, queue: str, messages: list[_Message], case_ids: list[int], exc: Exception
    ) -> None:
        """Return a failed batch's messages to their queue: after the database is back, with
        the deliveries uncounted, if it was an outage; after a short pause otherwise."""
        outage = is_outage(exc)
        if outage:
            self.failures += 1
            cap = min(MAX_BACKOFF_S, 0.5 * 2 ** (self.failures - 1))
            log.warning(
                "database unreachable (%s): %d cases from %s wait for it (up to %.1f s)",
                type(exc).__name__,
                len(case_ids),
                queue,
                cap,
            )
            self._wait_for_database(cap)
            self._release(case_ids)
        else:
            # The class and where it was raised, not the text: an exception's text may hold
            # the data it choked on (PostgreSQL's errors quote the value they refused).
            log.error(
                "batch of %d cases from %s failed: %s at %s; returning %d messages",
                len(case_ids),
                queue,
                type(exc).__name__,
                raised_at(exc),
                len(messages),
            )
            self._note_error(case_ids, exc)
            time.sleep(DEFECT_PAUSE_S)
        for m in messages:
            m.reject(True)

    def _wait_for_database(self, cap_s: float) -> None:
        deadline = time.monotonic() + cap_s
        while time.monotonic() < deadline:
            time.sleep(min(PROBE_EVERY_S, max(0.0, deadline - time.monotonic())))
            if database_answers(self.ctx.engine):
                return

    def _release(self, case_ids: list[int]) -> None:
        """Give the cases back (the sweeper sends them at once); if the database is still away,
        try again before the next batch (meanwhile their leases run out all the same)."""
        try:
            with session_scope(self.ctx.sessions) as session:
                repo.release_cases(
                    session, case_ids=case_ids, owner=self.ctx.leases.owner, uncount=True
                )
        except Exception as exc:
            log.warning("could not give back %d cases: %s", len(case_ids), type(exc).__name__)
            self.to_release.update(case_ids)
        else:
            self.to_release.difference_update(case_ids)

    def _note_error(self, case_ids: list[int], exc: Exception) -> None:
        try:
            with session_scope(self.ctx.sessions) as session:
                # Its class only: the batch holds other tenants' cases, and the text may hold
                # their data.
                error = f"batch failed: {type(exc).__name__} (the worker's log says where)"
                repo.record_error(session, case_ids=case_ids, error=error)
        except Exception:
            log.warning("could not record the error on the cases (database unreachable?)")


def raised_at(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame that ``exc`` was raised through."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "an unknown place"
    last = frames[-1]
    return f"{last.filename}:{last.lineno} in {last.name}"
