"""Explanations after the score, and single cases that ride batches: real API and worker
processes on the real Redis and PostgreSQL."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
import redis
from celery import Celery
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import explanations
from db.engine import session_scope
from db.tables import Batch, Case, Explanation, JobStatus, Score, utcnow
from models.cases.inference import LoadedModel
from models.cases.registry import Registry
from tests.e2e.support import Processes, start_worker, wait_for, wait_for_done
from tests.helpers import wdbc_cases
from worker.queues import EXPLAIN_QUEUE, EXPLAIN_TASK

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SCORING_ONLY = "score.stat,score.routine,score.bulk"


def _states(sessions: sessionmaker[Session], ids: list[int]) -> dict[int, str]:
    with sessions() as s:
        return {i: e.status for i, e in explanations.states(s, case_ids=ids).items()}


def _score_without_explaining(
    processes: Processes, sessions: sessionmaker[Session], n: int
) -> None:
    """Start a worker on the scoring queues only; wait until the ``n`` cases are done."""
    scorer = processes.start("worker", "worker", "--queues", SCORING_ONLY, "--hostname", "s@%h")
    wait_for_done(sessions, n, worker=scorer, processes=processes)


def _wait_explained(
    sessions: sessionmaker[Session],
    ids: list[int],
    *,
    worker: subprocess.Popen[bytes],
    processes: Processes,
) -> None:
    wait_for(
        lambda: set(_states(sessions, ids).values()) == {"done"},
        worker=worker,
        processes=processes,
    )


def _explain(processes: Processes, sessions: sessionmaker[Session], ids: list[int]) -> None:
    """Start a worker on the explain queue only; wait until every case's explanation is done."""
    explainer = processes.start(
        "explainer", "worker", "--queues", EXPLAIN_QUEUE, "--hostname", "x@%h"
    )
    _wait_explained(sessions, ids, worker=explainer, processes=processes)


def test_the_score_is_readable_before_its_explanation_which_follows(
    processes: Processes, api: httpx.Client, pg_sessions: sessionmaker[Session]
) -> None:
    """A worker that reads only the scoring queues finishes the cases: done, score readable (and
    as a RiskAssessment-ready result), explanation pending. A worker on the explain queue then
    stores the attributions, which the API serves."""
    cases = wdbc_cases(12)
    ids = [c["id"] for c in api.post("/v1/cases", json=cases).json()["cases"]]
    _score_without_explaining(processes, pg_sessions, 12)
    body = api.get(f"/v1/cases/{ids[0]}").json()
    assert body["status"] == "done" and body["explanation_status"] == "pending"
    assert body["scores"][0]["explanation"] is None and 0 <= body["scores"][0]["score"] <= 1
    listed = api.get("/v1/scores").json()["items"]
    assert {i["explanation_status"] for i in listed} == {"pending"}
    assert {i["status"] for i in listed} == {"done"}
    assert _states(pg_sessions, ids) == {i: "pending" for i in ids}
    _explain(processes, pg_sessions, ids)
    body = api.get(f"/v1/cases/{ids[0]}").json()
    assert body["explanation_status"] == "done" and body["explanation_error"] is None
    top = body["scores"][0]["explanation"]["top"]
    assert len(top) == 5
    spec = Registry.load().resolve("breast-cancer")
    assert {a["feature"] for a in top} <= set(spec.feature_names)
    listed = api.get("/v1/scores").json()["items"]
    assert all(len(i["explanation"]["top"]) == 5 for i in listed)


def test_concurrent_single_cases_ride_batches_and_are_scored_exactly_once(
    processes: Processes, api: httpx.Client, pg_sessions: sessionmaker[Session]
) -> None:
    """120 one-case POSTs from 24 concurrent clients: every case done with exactly one score
    row equal to the in-process model's, in far fewer forward passes than cases."""
    cases = wdbc_cases(120, prefix="single")
    worker = start_worker(processes)

    def post(case: dict) -> int:
        r = api.post("/v1/cases", json=case)
        assert r.status_code == 202, r.text
        assert r.json()["enqueued"] is True
        return int(r.json()["cases"][0]["id"])

    with ThreadPoolExecutor(24) as pool:
        ids = list(pool.map(post, cases))
    assert len(set(ids)) == 120
    wait_for_done(pg_sessions, 120, worker=worker, processes=processes)
    model = LoadedModel(Registry.load().resolve("breast-cancer"), device="cpu")
    expected = dict(zip(ids, model.score([c["features"] for c in cases]), strict=True))
    with pg_sessions() as s:
        rows = s.scalars(select(Score)).all()
        passes = s.scalar(select(func.count()).select_from(Batch))
        deliveries = set(s.scalars(select(Case.delivery_count)))
    assert sorted(r.case_id for r in rows) == sorted(ids)  # exactly one row per case
    assert all(abs(r.score - expected[r.case_id].score) <= 1e-6 for r in rows)
    assert deliveries == {1}
    assert passes is not None and passes < 60  # one case per pass would be 120
    _wait_explained(pg_sessions, ids, worker=worker, processes=processes)


def test_a_lost_explain_message_is_sent_again_by_the_sweeper(
    processes: Processes,
    api: httpx.Client,
    pg_sessions: sessionmaker[Session],
    redis_client: redis.Redis,
) -> None:
    """The explain messages vanish and one explanation was held by a worker that died: the
    sweeper process sends them again, and a worker explains them."""
    ids = [c["id"] for c in api.post("/v1/cases", json=wdbc_cases(8)).json()["cases"]]
    _score_without_explaining(processes, pg_sessions, 8)
    redis_client.delete(EXPLAIN_QUEUE)  # lost (a broker restart without persistence)
    with session_scope(pg_sessions) as s:
        s.execute(
            update(Explanation)
            .where(Explanation.case_id == ids[0])
            .values(
                status=JobStatus.running,
                attempts=1,
                lease_owner="dead-host:1:00000000",
                lease_expires_at=utcnow() - timedelta(seconds=1),
            )
        )
    assert _states(pg_sessions, ids) == {i: "pending" for i in ids}
    processes.start("sweeper", "sweeper", MEDBATCH_SWEEP_INTERVAL_S="0.5", MEDBATCH_LEASE_TTL_S="3")
    _explain(processes, pg_sessions, ids)
    assert "explanations" in processes.log("sweeper")  # it says what it sent again
    with pg_sessions() as s:
        assert s.scalar(select(Explanation.attempts).where(Explanation.case_id == ids[0])) == 2


def test_malformed_explain_messages_are_refused_and_the_worker_goes_on(
    processes: Processes,
    api: httpx.Client,
    redis_client: redis.Redis,
    celery: Celery,
    pg_sessions: sessionmaker[Session],
) -> None:
    """Garbage on the explain queue (not ids, ids of no case) costs nothing: the next cases are
    scored and explained."""
    for args in (["not ids"], [[0, -1]], [[]], [[987654321]], [[True]]):
        celery.send_task(EXPLAIN_TASK, args=args, queue=EXPLAIN_QUEUE)
    worker = start_worker(processes)
    ids = [c["id"] for c in api.post("/v1/cases", json=wdbc_cases(3)).json()["cases"]]
    wait_for(
        lambda: (
            set(_states(pg_sessions, ids).values()) == {"done"}
            and len(_states(pg_sessions, ids)) == 3
        ),
        worker=worker,
        processes=processes,
    )
    wait_for(
        lambda: redis_client.llen(EXPLAIN_QUEUE) == 0 and redis_client.hlen("unacked") == 0,
        worker=worker,
        processes=processes,
    )
    assert worker.poll() is None
