"""Single-case submissions ride batches: one scoring message for many concurrent requests.

An EHR feed sends one case per request. Sent as it came, each case is one broker message, and a
worker then spends more on reading and acknowledging messages than on scoring (bench/scoring.py
measures both). So each API process gathers the case ids that concurrent requests have committed,
per queue, and sends them as one message when it holds ``cases_per_message`` ids or
``coalesce_<priority>_ms`` after the first of them came, whichever is first (Settings).

Only committed ids are handed over (the routes commit first), so an API process that dies with
ids in hand loses nothing: the cases are in the database as ``queued`` and the sweeper sends them
(worker/sweeper.py). A request waits for its ids' message to be sent, so its answer still says
whether the broker took them; if the broker is away, the cases are marked unsent and the sweeper
sends them as soon as it is back. Tenants share messages but never rows: a message carries case
ids only, and the worker reads each case's own row.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.tables import Priority
from worker.queues import enqueue_cases, queue_for, send_or_leave


@dataclass
class _Gathering:
    """The ids waiting for one queue's next message, and the requests waiting on them."""

    ids: list[int] = field(default_factory=list)
    waiting: list[Future[bool]] = field(default_factory=list)
    first_at: float = 0.0


class Coalescer:
    """Gathers committed case ids per queue; a thread of its own sends them, a message a window."""

    def __init__(
        self,
        celery: Celery,
        sessions: sessionmaker[Session],
        *,
        per_message: int,
        window_ms: Callable[[str], float],
    ) -> None:
        self.celery = celery
        self.sessions = sessions
        #: Most ids in one message (Settings.cases_per_message).
        self.per_message = per_message
        #: The gathering window of a queue, in ms (0: sent at once, by the request's thread).
        self.window_ms = window_ms
        self.messages_sent = 0
        self._gathering: dict[str, _Gathering] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="medbatch-coalescer", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        """Send what is gathered, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, cases: Iterable[tuple[int, Priority | str]]) -> Future[bool]:
        """Hand over committed ``(case id, priority)`` pairs; the future is True once every
        message that carries them is sent, False if the broker refused one (those cases are
        then marked unsent, for the sweeper)."""
        by_queue: dict[str, list[int]] = {}
        for case_id, priority in cases:
            by_queue.setdefault(queue_for(priority), []).append(int(case_id))
        futures = []
        for queue, ids in by_queue.items():
            gathered: Future[bool] | None = None
            if self.window_ms(queue) > 0:
                # Under the lock: once stop() is under way the thread may have sent its last
                # message and returned, and ids handed to it then would wait for ever.
                with self._cond:
                    if not self._stopping:
                        gathered = Future()
                        gathering = self._gathering.setdefault(queue, _Gathering())
                        if not gathering.ids:
                            gathering.first_at = time.monotonic()
                        gathering.ids += ids
                        gathering.waiting.append(gathered)
                        self._cond.notify()
            if gathered is None:  # no window, or stopping: sent by this thread, now
                futures.append(self._send_now(queue, ids))
                continue
            futures.append(gathered)
            self.start()
        if len(futures) == 1:
            return futures[0]
        return _all(futures)

    def send(self, cases: Iterable[tuple[int, Priority | str]]) -> bool:
        """:meth:`submit`, waiting for the answer (for routes that run in a thread)."""
        return self.submit(cases).result()

    async def send_async(self, cases: Iterable[tuple[int, Priority | str]]) -> bool:
        """:meth:`submit`, awaited (for ``async`` routes: the event loop never blocks). Handed
        over from a worker thread: a queue without a window is sent by the caller's thread, and
        a broker that is slow or away would otherwise hold every request of the event loop."""
        return await asyncio.wrap_future(await asyncio.to_thread(self.submit, list(cases)))

    def _send_now(self, queue: str, ids: list[int]) -> Future[bool]:
        future: Future[bool] = Future()
        future.set_result(self._send(queue, ids))
        return future

    def _run(self) -> None:
        while True:
            with self._cond:
                due, wait_s = self._due()
                while not due and not self._stopping:
                    self._cond.wait(timeout=wait_s)
                    due, wait_s = self._due()
                if self._stopping:
                    due = list(self._gathering)
                ready = [(q, self._gathering.pop(q)) for q in due if q in self._gathering]
                stopping = self._stopping
            for queue, gathering in ready:
                ok = self._send(queue, gathering.ids)
                for future in gathering.waiting:
                    # A request its caller gave up (an awaited one cancelled) has no one to tell;
                    # setting it would raise and end this thread, and every later request wait.
                    if future.set_running_or_notify_cancel():
                        future.set_result(ok)
            if stopping:
                return

    def _due(self) -> tuple[list[str], float | None]:
        """Queues to send now (a full message, or a window over), and how long until the next."""
        now = time.monotonic()
        due, wait_s = [], None
        for queue, gathering in self._gathering.items():
            left = gathering.first_at + self.window_ms(queue) / 1000 - now
            if len(gathering.ids) >= self.per_message or left <= 0:
                due.append(queue)
            else:
                wait_s = left if wait_s is None else min(wait_s, left)
        return due, wait_s

    def _send(self, queue: str, ids: list[int]) -> bool:
        priority = queue.removeprefix("score.")

        def send() -> None:
            self.messages_sent += enqueue_cases(
                self.celery, [(i, priority) for i in ids], per_message=self.per_message
            )

        return send_or_leave(send, self.sessions, repo.mark_unsent, ids, what="scoring messages")


def _all(futures: list[Future[bool]]) -> Future[bool]:
    """One future: True when every one of ``futures`` is True."""
    combined: Future[bool] = Future()
    left = [len(futures)]
    results: list[bool] = []
    lock = threading.Lock()

    def done(f: Future[bool]) -> None:
        with lock:
            results.append(bool(f.result()))
            left[0] -= 1
            if left[0] == 0 and combined.set_running_or_notify_cancel():
                combined.set_result(all(results))

    for f in futures:
        f.add_done_callback(done)
    return combined
