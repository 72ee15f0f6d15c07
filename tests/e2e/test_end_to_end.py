"""Real processes: the API (uvicorn) and a Celery worker, on the real Redis and PostgreSQL."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
import redis
from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.tables import Case, CaseStatus, Score
from models.cases.inference import LoadedModel
from models.cases.registry import Registry
from tests.e2e.support import Processes, count_cases, start_worker, wait_for, wait_for_done
from tests.helpers import wdbc_cases
from worker.queues import SCORE_TASK

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_200_cases_over_http_get_exactly_one_correct_score_each(
    processes: Processes, api: httpx.Client, pg_sessions: sessionmaker[Session]
) -> None:
    """200 real cases: each ends done with one score row equal to the in-process model to 1e-6."""
    cases = wdbc_cases(200)
    for i, case in enumerate(cases):
        case["priority"] = ("stat", "routine", "bulk")[i % 3]
    ids: list[int] = []
    for start in range(0, 200, 50):
        response = api.post("/v1/cases", json=cases[start : start + 50])
        assert response.status_code == 202, response.text
        ids += [c["id"] for c in response.json()["cases"]]
    worker = start_worker(processes)
    wait_for(
        lambda: (
            count_cases(pg_sessions, Case.status.in_([CaseStatus.done, CaseStatus.failed])) == 200
        ),
        worker=worker,
        processes=processes,
    )
    model = LoadedModel(Registry.load().resolve("breast-cancer"), device="cpu")
    expected = {
        case_id: row
        for case_id, row in zip(ids, model.score([c["features"] for c in cases]), strict=True)
    }
    with pg_sessions() as s:
        rows = s.scalars(select(Score)).all()
        assert set(s.scalars(select(Case.status))) == {CaseStatus.done}
    assert sorted(r.case_id for r in rows) == sorted(ids)  # exactly one row per case
    for r in rows:
        assert abs(r.score - expected[r.case_id].score) <= 1e-6
        assert r.label == expected[r.case_id].label
    # And the API serves them back, with the attributions once the explain stage stored them.
    wait_for(
        lambda: api.get(f"/v1/cases/{ids[0]}").json()["explanation_status"] == "done",
        worker=worker,
        processes=processes,
    )
    body = api.get(f"/v1/cases/{ids[0]}").json()
    assert len(body["scores"][0]["explanation"]["top"]) == 5
    assert body["status"] == "done" and body["scores"][0]["score"] == pytest.approx(
        expected[ids[0]].score, abs=1e-6
    )
    # No external ids or feature values in the worker's log.
    log = processes.log("worker")
    assert "scored" in log
    assert not any(c["external_id"] in log for c in cases)
    assert str(cases[0]["features"]["mean_area"]) not in log


def test_the_same_message_delivered_twice_leaves_one_score_row(
    processes: Processes,
    api: httpx.Client,
    celery: Celery,
    redis_client: redis.Redis,
    pg_sessions: sessionmaker[Session],
) -> None:
    """Send one task message twice (same task id) for a done case: both are consumed and
    settled without a forward pass (no delivery counted); still one score row."""
    worker = start_worker(processes)
    case_id = api.post("/v1/cases", json=wdbc_cases(1)).json()["cases"][0]["id"]
    wait_for_done(pg_sessions, 1, worker=worker, processes=processes)
    task_id = str(uuid.uuid4())
    for _ in range(2):
        celery.send_task(SCORE_TASK, args=[[case_id]], task_id=task_id, queue="score.routine")
    # Both copies read and acknowledged (they may share a batch).
    wait_for(
        lambda: (
            "1 settled as they were" in processes.log("worker")
            and redis_client.llen("score.routine") == 0
            and redis_client.hlen("unacked") == 0
        ),
        worker=worker,
        processes=processes,
    )
    with pg_sessions() as s:
        assert s.scalar(select(func.count()).select_from(Score)) == 1
        assert s.scalars(select(Case.status)).one() == CaseStatus.done
        assert s.scalars(select(Case.delivery_count)).one() == 1


def test_a_malformed_message_is_dropped_and_the_worker_goes_on(
    processes: Processes, api: httpx.Client, celery: Celery, pg_sessions: sessionmaker[Session]
) -> None:
    """Garbage on the queue is rejected with a log line; the next real case is scored."""
    celery.send_task(SCORE_TASK, args=["not ids"], queue="score.stat")
    celery.send_task(SCORE_TASK, args=[[987654321]], queue="score.stat")  # an id with no row
    worker = start_worker(processes)
    api.post("/v1/cases", json=wdbc_cases(3))
    wait_for_done(pg_sessions, 3, worker=worker, processes=processes)
    assert "rejected malformed medbatch.score_cases message" in processes.log("worker")


def test_lost_messages_are_found_by_the_sweeper_and_scored(
    processes: Processes,
    api: httpx.Client,
    redis_client: redis.Redis,
    pg_sessions: sessionmaker[Session],
) -> None:
    """Cases whose messages vanished from the broker are re-enqueued from SQL and scored."""
    response = api.post("/v1/cases", json=wdbc_cases(10))
    assert response.status_code == 202
    redis_client.flushdb()  # the broker loses every message (a restart without persistence)
    time.sleep(1.5)
    worker = start_worker(processes, MEDBATCH_REQUEUE_AFTER_S="1")
    wait_for_done(pg_sessions, 10, worker=worker, processes=processes)
    assert "sweeper: sent again 10 cases" in processes.log("worker")
