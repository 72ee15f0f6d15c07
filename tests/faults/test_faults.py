"""Fault injection: real API, worker and sweeper processes on a Redis and a PostgreSQL of the
suite's own, which it kills, stops and restarts. Every scenario holds the invariant: each
accepted case ends with exactly one score row or ``failed`` with its own reason; no clean case
failed or was dead-lettered; no duplicate row. ``make bench-faults`` runs them larger."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import scenarios
from tests.faults.harness import Servers

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with (
        tempfile.TemporaryDirectory(prefix="medbatch-faults-") as root,
        Servers.started(Path(root)) as started,
    ):
        yield started


def _holds(result: dict) -> None:
    assert result["lost"] == 0, result
    assert result["duplicated"] == 0, result
    assert result["wrongly_failed"] == 0, result
    assert result["exactly_one"] == result["accepted"], result


def test_workers_sigkilled_mid_batch_with_default_timings(servers: Servers) -> None:
    """Twice, a worker is killed mid-batch: what it held is scored again within 60 s (30 s
    leases, 10 s sweeps, the broker's 900 s visibility timeout untouched)."""
    result = scenarios.worker_sigkill(servers, cases=800, kills=2)
    _holds(result)
    assert result["cases_held_by_killed_workers"] > 0
    assert result["recover_s"] is not None and result["recover_s"] <= 60, result
    assert result["other_workers_alive"]


def test_redis_killed_and_restarted_empty(servers: Servers) -> None:
    """Workers holding unacknowledged messages outlive the broker; what it lost, and what was
    accepted while it was down, is sent again and scored."""
    result = scenarios.redis_crash(servers, cases=800)
    _holds(result)
    assert result["unacked_at_crash"] > 0
    assert result["workers_alive"] and not result["worker_unrecoverable_errors"], result


def test_postgres_stopped_and_started(servers: Servers) -> None:
    """During the outage every request gets a 503 with Retry-After and JSON; afterwards the
    workers go on, STAT first, and nothing is lost or dead-lettered."""
    result = scenarios.postgres_outage(servers, cases=1000, down_s=6)
    _holds(result)
    assert result["api_problems"] == [], result
    assert result["workers_alive"]
    # At most the bulk batch each of the two workers held (256 cases, and the message that
    # crossed the limit) goes before the STAT cases.
    assert result["bulk_before_stat"] is not None and result["bulk_before_stat"] <= 2 * (256 + 63)


def test_poison_cases_of_every_kind_fail_alone(servers: Servers) -> None:
    """Overflow refused at the door; NaN forward pass and unfit stored features each fail their
    own case only; infinite attributions fail that case's explanation only (its score stands)."""
    result = scenarios.poison(servers, cases=150)
    _holds(result)
    assert result["refused_with_422"] and result["settled"]
    assert result["inf_explanations_failed_alone"], result


def test_the_sweeper_is_not_starved_by_a_routine_backlog(servers: Servers) -> None:
    """Cases accepted while the broker was down are sent at the next sweep (every 10 s) even
    while the routine queue holds a backlog."""
    result = scenarios.sweeper_backlog(servers, backlog=1500, stranded=50)
    _holds(result)
    assert result["resend_s"] is not None and result["resend_s"] <= 10 + 5, result
    assert result["backlog_left_at_resend"] > 0, result


def test_a_case_that_kills_its_worker_ends_a_dead_letter_alone(servers: Servers) -> None:
    """A case whose batch kills the worker on every delivery ends a dead letter after
    MEDBATCH_MAX_DELIVERIES; the clean cases of its batch are scored, none dead-lettered."""
    result = scenarios.poison_crash(servers, cases=40, max_deliveries=3)
    _holds(result)
    assert result["poison_dead_letter"], result
    assert result["clean_dead_letters"] == 0, result
    assert result["kills"] == 3, result


def test_a_worker_given_sigterm_mid_batch_hands_back_what_it_held(servers: Servers) -> None:
    """A warm shutdown mid-batch exits 0; the cases it held are scored once, by the other worker,
    long before the broker's visibility timeout (900 s)."""
    result = scenarios.worker_sigterm(servers, cases=800)
    _holds(result)
    assert result["cases_held_at_sigterm"] > 0, result
    assert result["exit_status"] == 0, result
    assert result["other_worker_alive"], result
    assert result["recover_s"] is not None and result["recover_s"] <= 60, result


def test_postgres_stopped_in_the_middle_of_a_tiled_genome_job(servers: Servers) -> None:
    """The job goes on once PostgreSQL is back: done, each tile counted once, PLINK 2's table;
    the workers survive the outage."""
    result = scenarios.genome_postgres_restart(servers, down_s=4)
    assert result["status"] == "done", result
    assert result["tiles_done"] == result["tiles_total"] == 21, result
    assert result["tiles_done_at_stop"] < 21, result
    assert result["same_as_plink"], result
    assert result["workers_alive"], result


def test_redis_restarted_while_the_coalescer_holds_committed_ids(servers: Servers) -> None:
    """Single-case requests gathered by the API while Redis is killed and restarted empty: all
    answered 202, each case scored once."""
    result = scenarios.coalescer_broker_restart(servers, requests=60)
    _holds(result)
    assert result["refused"] == [], result
    assert result["accepted"] == 60, result


def test_a_worker_sigkilled_while_explaining(servers: Servers) -> None:
    """The explanations a killed worker held are computed by another, each once, none failed."""
    result = scenarios.explain_sigkill(servers, cases=600)
    _holds(result)
    assert result["explanations_held_by_killed_worker"] > 0, result
    assert result["explanations"] == {"done": 600, "failed": 0, "pending": 0}, result
    assert result["scores_with_explanation"] == 600, result
    assert result["attempts_of_held"] == [2] and result["max_attempts_of_others"] <= 1, result


def test_postgres_away_for_longer_than_a_lease(servers: Servers) -> None:
    """The workers lose the database for longer than their leases (3 s leases, 1 s sweeps, 10 s
    down): what they held is scored once, none failed or dead-lettered."""
    result = scenarios.postgres_outage(
        servers,
        cases=1000,
        down_s=10,
        MEDBATCH_LEASE_TTL_S="3",
        MEDBATCH_SWEEP_INTERVAL_S="1",
    )
    _holds(result)
    assert result["api_problems"] == [], result
    assert result["workers_alive"], result


def test_redis_restarted_empty_while_explanations_are_in_flight(servers: Servers) -> None:
    """Explain messages lost with the broker are sent again by the sweeper: every explanation is
    stored once, none failed or left pending, the workers survive."""
    result = scenarios.explain_redis_crash(servers, cases=600)
    _holds(result)
    assert result["explain_messages_at_crash"] > 0, result
    assert result["explanations_done_at_crash"] < 600, result
    assert result["explanations"] == {"done": 600, "failed": 0, "pending": 0}, result
    assert result["scores_with_explanation"] == 600, result
    assert result["workers_alive"], result
