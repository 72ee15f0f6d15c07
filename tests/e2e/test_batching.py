"""The batching worker as a real process: priorities under load, dead letters, replay, metrics."""

from __future__ import annotations

import httpx
import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import Batch, Case, CaseStatus, Priority, Score
from tests.e2e.support import (
    Processes,
    count_cases,
    free_port,
    start_worker,
    wait_for,
    wait_for_done,
)
from tests.helpers import wdbc_cases
from worker.queues import enqueue_cases

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def _add(sessions: sessionmaker[Session], cases: list[dict], *, tenant: str) -> list[int]:
    with session_scope(sessions) as s:
        tenant_id = repo.create_tenant(s, name=tenant)[0].id
        new = [
            repo.NewCase(
                c["external_id"], "breast-cancer", "1.0.0", Priority(c["priority"]), c["features"]
            )
            for c in cases
        ]
        return [a.id for a in repo.add_cases(s, tenant_id=tenant_id, cases=new)]


@pytest.mark.slow
def test_a_stat_case_is_scored_before_a_5000_case_bulk_backlog_drains(
    processes: Processes, api: httpx.Client, celery: Celery, pg_sessions: sessionmaker[Session]
) -> None:
    """5,000 bulk cases queued one per message; a STAT case sent afterwards is scored while
    thousands of them still wait."""
    bulk = [
        {**c, "priority": "bulk"}
        for c in (wdbc_cases(569, prefix=f"b{k}") for k in range(9))
        for c in c
    ][:5000]
    bulk_ids = _add(pg_sessions, bulk, tenant="bulk")
    enqueue_cases(celery, [(i, Priority.bulk) for i in bulk_ids], per_message=1)
    worker = start_worker(processes)
    bulk_id_set = set(bulk_ids)
    wait_for(
        lambda: count_cases(pg_sessions, Case.status == CaseStatus.done) >= 100,
        worker=worker,
        processes=processes,
    )
    response = api.post("/v1/cases", json={**wdbc_cases(1, prefix="stat")[0], "priority": "stat"})
    stat_id = response.json()["cases"][0]["id"]
    wait_for_done(pg_sessions, 5001, worker=worker, processes=processes, timeout=300)
    with pg_sessions() as s:
        stat_scored_at = s.scalar(select(Score.created_at).where(Score.case_id == stat_id))
        bulk_after = s.scalar(
            select(func.count()).select_from(Score).where(Score.created_at > stat_scored_at)
        )
        stat_batch = s.scalar(
            select(Batch.queue)
            .join(Score, Score.batch_id == Batch.id)
            .where(Score.case_id == stat_id)
        )
    assert stat_id not in bulk_id_set
    assert stat_batch == "score.stat"
    assert bulk_after >= 2000, (
        f"only {bulk_after} bulk cases were left when the STAT case was scored"
    )


def test_too_many_deliveries_dead_letter_a_case_and_replay_scores_it(
    processes: Processes, api: httpx.Client, pg_sessions: sessionmaker[Session]
) -> None:
    """A case already delivered max_deliveries times ends failed as a dead letter with its last
    error; `medbatch cases replay` re-queues it and it is scored."""
    case_id = api.post("/v1/cases", json=wdbc_cases(1)).json()["cases"][0]["id"]
    with session_scope(pg_sessions) as s:  # as if two workers had died holding it
        s.execute(
            update(Case)
            .where(Case.id == case_id)
            .values(delivery_count=2, last_error="WorkerLostError: killed")
        )
    worker = start_worker(processes, MEDBATCH_MAX_DELIVERIES="2")
    wait_for(
        lambda: count_cases(pg_sessions, Case.dead_letter.is_(True)) == 1,
        worker=worker,
        processes=processes,
    )
    body = api.get(f"/v1/cases/{case_id}").json()
    assert body["status"] == "failed" and body["scores"] == []
    assert body["last_error"] == (
        "dead letter: delivered 3 times without finishing; last error: WorkerLostError: killed"
    )
    replay = processes.run_cli("cases", "replay", str(case_id))
    assert replay.returncode == 0, replay.stderr
    assert "re-queued 1 dead-lettered cases" in replay.stdout
    wait_for_done(pg_sessions, 1, worker=worker, processes=processes)
    assert api.get(f"/v1/cases/{case_id}").json()["scores"][0]["model"] == "breast-cancer"


def test_replay_without_a_selection_or_with_an_unknown_tenant_exits_2(processes: Processes) -> None:
    """`cases replay` needs --all, --tenant or ids, and a tenant that exists."""
    for argv, message in (
        ([], "say which"),
        (["--tenant", "nobody"], "no tenant 'nobody'"),
    ):
        result = processes.run_cli("cases", "replay", *argv)
        assert result.returncode == 2 and message in result.stderr


def test_worker_serves_prometheus_metrics(
    processes: Processes, api: httpx.Client, pg_sessions: sessionmaker[Session]
) -> None:
    """After scoring, the worker's /metrics has batch sizes, waits, inference times and counts."""
    port = free_port()
    worker = start_worker(processes, MEDBATCH_WORKER_METRICS_PORT=str(port))
    cases = wdbc_cases(40)
    cases[0]["priority"] = "stat"
    api.post("/v1/cases", json=cases)
    wait_for_done(pg_sessions, 40, worker=worker, processes=processes)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(
            httpx.get(f"http://127.0.0.1:{port}/metrics").text
        )
        for sample in family.samples
    }
    model = ("model", "breast-cancer@1.0.0")
    assert samples[("medbatch_cases_scored_total", (model, ("queue", "score.routine")))] == 39
    assert samples[("medbatch_cases_scored_total", (model, ("queue", "score.stat")))] == 1
    assert samples[("medbatch_batch_size_sum", (model, ("queue", "score.routine")))] == 39
    assert samples[("medbatch_batch_size_count", (model, ("queue", "score.routine")))] >= 1
    assert samples[("medbatch_queue_wait_seconds_count", (("queue", "score.stat"),))] == 1
    assert samples[("medbatch_inference_seconds_count", (model, ("queue", "score.stat")))] == 1
