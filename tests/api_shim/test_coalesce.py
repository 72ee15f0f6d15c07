"""Single-case submissions share messages (api_shim/coalesce.py), on the real Redis and PostgreSQL."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api_shim.coalesce import Coalescer
from api_shim.main import create_app
from db import repo
from db.engine import session_scope
from db.tables import Case, Priority
from medbatch.settings import Settings
from tests.helpers import queued_case_ids, queued_messages, wdbc_cases
from worker.app import create_app as create_celery

pytestmark = pytest.mark.integration


def _add(sessions: sessionmaker[Session], n: int, tenant: str, priority: Priority) -> list[int]:
    with session_scope(sessions) as s:
        tenant_id = repo.create_tenant(s, name=tenant)[0].id
        new = [
            repo.NewCase(c["external_id"], "breast-cancer", "1.0.0", priority, c["features"])
            for c in wdbc_cases(n, prefix=tenant)
        ]
        return [a.id for a in repo.add_cases(s, tenant_id=tenant_id, cases=new)]


@pytest.fixture
def celery(redis_url: str, pg_url: str) -> Iterator[Celery]:
    app = create_celery(Settings(database_url=pg_url, broker_url=redis_url), include_tasks=False)
    yield app
    app.close()


def test_concurrent_single_cases_share_messages_and_each_is_sent_once(
    celery: Celery, pg_sessions: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    """200 concurrent one-case sends of two tenants: every id in exactly one message of at most
    64, far fewer messages than cases; STAT ids in STAT messages only."""
    routine = _add(pg_sessions, 150, "a", Priority.routine) + _add(
        pg_sessions, 30, "b", Priority.routine
    )
    stat = _add(pg_sessions, 20, "c", Priority.stat)
    coalescer = Coalescer(celery, pg_sessions, per_message=64, window_ms=lambda q: 30.0)
    work = [(i, Priority.routine) for i in routine] + [(i, Priority.stat) for i in stat]
    try:
        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(lambda c: coalescer.send([c]), work))
    finally:
        coalescer.stop()
    assert answers == [True] * len(work)
    ids = queued_case_ids(redis_client)
    assert sorted(ids["score.routine"]) == sorted(routine)
    assert sorted(ids["score.stat"]) == sorted(stat)
    messages = queued_messages(redis_client)
    sizes = [len(m) for m in messages["score.routine"]]
    assert len(messages["score.routine"]) < len(routine) / 4
    assert coalescer.messages_sent == len(messages["score.routine"]) + len(messages["score.stat"])
    assert all(s >= 1 for s in sizes)
    assert max(len(ids) for ids in _per_message(redis_client, "score.routine")) <= 64
    assert len(messages["score.routine"]) >= math.ceil(len(routine) / 64)


def _per_message(client: redis.Redis, queue: str) -> list[list[int]]:
    import base64
    import json

    return [json.loads(base64.b64decode(m["body"]))[0][0] for m in queued_messages(client)[queue]]


def test_a_zero_window_sends_each_request_at_once(
    celery: Celery, pg_sessions: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    """Window 0: one message per call, sent by the caller's thread."""
    ids = _add(pg_sessions, 3, "z", Priority.stat)
    coalescer = Coalescer(celery, pg_sessions, per_message=64, window_ms=lambda q: 0.0)
    for i in ids:
        assert coalescer.send([(i, Priority.stat)])
    assert sorted(_per_message(redis_client, "score.stat")) == [[i] for i in ids]
    assert coalescer._thread is None


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_broker_outage_leaves_the_cases_marked_unsent(
    pg_url: str, pg_sessions: sessionmaker[Session]
) -> None:
    """The broker refuses: every waiting request hears False, the cases stay committed and are
    marked unsent (the sweeper sends those at its next sweep)."""
    down = f"redis://127.0.0.1:{_closed_port()}/0"
    app = create_celery(Settings(database_url=pg_url, broker_url=down), include_tasks=False)
    app.conf.broker_transport_options = {"max_retries": 0}
    app.conf.broker_connection_retry = False
    ids = _add(pg_sessions, 5, "down", Priority.routine)
    coalescer = Coalescer(app, pg_sessions, per_message=64, window_ms=lambda q: 10.0)
    try:
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda i: coalescer.send([(i, "routine")]), ids))
    finally:
        coalescer.stop()
        app.close()
    assert answers == [False] * 5
    with pg_sessions() as s:
        sent_at = list(s.scalars(select(Case.enqueued_at).where(Case.id.in_(ids))))
    assert sent_at == [None] * 5


def test_single_posts_through_the_api_are_accepted_each_alone_and_tenants_stay_apart(
    pg_url: str, pg_sessions: sessionmaker[Session], redis_url: str, redis_client: redis.Redis
) -> None:
    """Concurrent one-case POSTs of two tenants share messages, yet each answer names its own
    case, and neither tenant can read the other's."""
    with session_scope(pg_sessions) as s:
        key_a = repo.create_tenant(s, name="hosp-a")[1]
        key_b = repo.create_tenant(s, name="hosp-b")[1]
    settings = Settings(database_url=pg_url, broker_url=redis_url, coalesce_routine_ms=50)
    cases = wdbc_cases(40, prefix="single")
    with TestClient(create_app(settings)) as api:

        def post(i: int) -> tuple[str, dict]:
            key = key_a if i % 2 else key_b
            r = api.post("/v1/cases", json=cases[i], headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 202, r.text
            return key, r.json()

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(post, range(len(cases))))
        for i, (key, body) in enumerate(answers):
            assert body["enqueued"] is True and body["count"] == 1
            assert body["cases"][0]["external_id"] == cases[i]["external_id"]
            other = key_b if key == key_a else key_a
            case_id = body["cases"][0]["id"]
            mine = api.get(f"/v1/cases/{case_id}", headers={"Authorization": f"Bearer {key}"})
            theirs = api.get(f"/v1/cases/{case_id}", headers={"Authorization": f"Bearer {other}"})
            assert mine.status_code == 200 and theirs.status_code == 404
        # The same case again (idempotent by external id): accepted, not created, not sent.
        again = api.post(
            "/v1/cases", json=cases[1], headers={"Authorization": f"Bearer {key_a}"}
        ).json()
        assert again["cases"][0]["created"] is False
    ids = [body["cases"][0]["id"] for _, body in answers]
    assert sorted(queued_case_ids(redis_client)["score.routine"]) == sorted(ids)
    assert len(queued_messages(redis_client)["score.routine"]) < len(ids)


@pytest.mark.parametrize(
    "env", [{"MEDBATCH_COALESCE_STAT_MS": "-1"}, {"MEDBATCH_COALESCE_ROUTINE_MS": "soon"}]
)
def test_bad_windows_are_refused_with_their_name(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A negative or non-numeric window is a settings error naming the variable."""
    from pydantic import ValidationError

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert next(iter(env)).removeprefix("MEDBATCH_").lower() in str(refused.value)


def test_every_request_is_answered_when_the_api_stops_in_the_middle_of_traffic(
    celery: Celery, pg_sessions: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    """stop() while requests keep coming: each is answered (what was gathered is sent by the
    stopping thread, what comes after by its own request), none waits for ever, none is lost."""
    import threading

    ids = _add(pg_sessions, 240, "s", Priority.routine)
    coalescer = Coalescer(celery, pg_sessions, per_message=64, window_ms=lambda q: 5.0)
    stopper = threading.Timer(0.02, coalescer.stop)
    stopper.start()
    with ThreadPoolExecutor(16) as pool:
        futures = list(pool.map(lambda i: coalescer.submit([(i, Priority.routine)]), ids))
    stopper.join()
    assert [f.result(timeout=10) for f in futures] == [True] * len(ids)
    assert sorted(queued_case_ids(redis_client)["score.routine"]) == sorted(ids)


def test_a_request_given_up_by_its_caller_leaves_the_others_answered(
    celery: Celery, pg_sessions: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    """An awaited send cancelled mid-window (its caller gone): its ids are still sent, the
    requests gathered with it and every later one are answered."""
    import asyncio

    ids = _add(pg_sessions, 4, "g", Priority.routine)
    coalescer = Coalescer(celery, pg_sessions, per_message=64, window_ms=lambda q: 200.0)

    async def give_up_on_the_first() -> None:
        first = asyncio.ensure_future(coalescer.send_async([(ids[0], Priority.routine)]))
        await asyncio.sleep(0)
        first.cancel()
        second = coalescer.send_async([(ids[1], Priority.routine)])
        assert await asyncio.wait_for(second, timeout=10)

    try:
        asyncio.run(give_up_on_the_first())
        later = coalescer.submit([(ids[2], Priority.routine), (ids[3], Priority.stat)])
        assert later.result(timeout=10)
    finally:
        coalescer.stop()
    assert sorted(queued_case_ids(redis_client)["score.routine"]) == ids[:3]


def test_an_awaited_send_without_a_window_leaves_the_event_loop_free(
    celery: Celery, pg_sessions: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    """Window 0 (sent at once, by the caller): an ``async`` route's send publishes from another
    thread than the event loop's, which a slow or absent broker would otherwise hold."""
    import asyncio
    import threading

    from celery.signals import before_task_publish

    ids = _add(pg_sessions, 2, "loop", Priority.routine)
    coalescer = Coalescer(celery, pg_sessions, per_message=64, window_ms=lambda q: 0.0)
    publishers: list[int] = []

    def published(**_: object) -> None:
        publishers.append(threading.get_ident())

    async def send() -> int:
        assert await coalescer.send_async([(i, Priority.routine) for i in ids])
        return threading.get_ident()

    before_task_publish.connect(published, weak=False)
    try:
        loop_thread = asyncio.run(send())
    finally:
        before_task_publish.disconnect(published)
    assert len(publishers) == 1 and publishers[0] != loop_thread
    assert sorted(queued_case_ids(redis_client)["score.routine"]) == ids
