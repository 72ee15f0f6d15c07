"""The fault scenarios, sized by their arguments: small in tests/faults/, large in bench/faults.py.

Each starts real processes (``medbatch api``, ``worker``, ``sweeper``) on a fresh database of the
suite's PostgreSQL and its empty Redis, injects its fault, waits for every accepted case to settle
and returns the invariant's counts (tests/faults/harness.py ``Cluster.report``) with
``recover_s``: seconds from the end of the fault until the last case it touched was settled.
Timing settings are the defaults unless a scenario says otherwise.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from db import explanations, repo
from db.engine import session_scope
from db.tables import Case, Priority, Score, Tenant
from tests.faults.harness import Cluster, NotSeenMidBatch, Servers, make_cases

Result = dict[str, Any]


def _round(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds, 1)


def worker_sigkill(servers: Servers, *, cases: int, kills: int) -> Result:
    """Two workers score a bulk load; ``kills`` times, one is SIGKILLed in the middle of a batch
    and a new one started. Defaults: 30 s leases, a sweep every 10 s, 900 s visibility timeout.
    ``recover_s``: the longest wait, from a kill to the score of the last case the killed worker
    held."""
    with Cluster.fresh(servers, "sigkill") as c:
        c.start("w1", "w2")
        live = [c.workers["w1"], c.workers["w2"]]
        accepted: list[int] = []
        kills_done: list[tuple[datetime, list[int]]] = []
        per_round = max(1, cases // kills)
        for k in range(kills):
            # Kill after kill, each while a worker is mid-batch; the recoveries overlap.
            # A load may be scored between two looks (the harness shares the host with the
            # workers): then another load, until a worker is caught mid-batch.
            for load in range(5):
                accepted += c.submit(make_cases(per_round, prefix=f"kill{k}-{load}"))
                try:
                    victim, killed_at, held = c.kill_mid_batch(live, timeout=20)
                    break
                except NotSeenMidBatch:
                    if load == 4:
                        raise
            kills_done.append((killed_at, held))
            live.remove(victim)
            live.append(c.start_worker(f"w{k + 3}"))
            # One worker stays up throughout (as with any second replica): the next kill waits
            # for the replacement, so what is measured is the leases' and the sweeper's delay,
            # not a worker's start-up.
            c.wait_ready(f"w{k + 3}")
        waits = []
        for killed_at, held in kills_done:
            c.wait_settled(held, timeout=180)
            scored = c.scored_at(held)
            complete = bool(held) and len(scored) == len(held)
            waits.append((max(scored) - killed_at).total_seconds() if complete else math.nan)
        held_total = sum(len(held) for _, held in kills_done)
        c.wait_settled(accepted)
        report = c.report(accepted)
        deliveries = _max_deliveries(c, accepted)
        survivors = [proc.poll() for proc in live]
    return {
        **report,
        "recover_s": _round(max(waits)) if waits else None,
        "kills": kills,
        "cases_held_by_killed_workers": held_total,
        "max_deliveries_of_a_case": deliveries,
        "other_workers_alive": all(status is None for status in survivors),
    }


def redis_crash(servers: Servers, *, cases: int, crashes: int = 1, down_s: float = 1.0) -> Result:
    """``crashes`` times, Redis is SIGKILLed while workers hold unacknowledged messages and
    restarted empty after ``down_s``; cases submitted while it is down are accepted and sent
    once it is back. ``recover_s``: the longest wait from a restart until every case accepted
    so far was settled."""
    with Cluster.fresh(servers, "redis") as c:
        c.start("w1", "w2")
        accepted: list[int] = []
        unacked: list[int] = []
        during: list[int] = []
        waits: list[float] = []
        for k in range(crashes):
            accepted += c.submit(make_cases(max(1, cases // crashes), prefix=f"redis{k}"))
            broker = servers.redis.client()
            deadline = time.monotonic() + 60
            while broker.hlen("unacked") == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            unacked.append(int(broker.hlen("unacked")))
            broker.close()
            servers.redis.kill()
            # Accepted while the broker is down: stored, answered 202, sent later.
            during += c.submit(make_cases(50, prefix=f"redis{k}-down"), chunk=25)
            time.sleep(down_s)
            servers.redis.start()
            back = time.monotonic()
            accepted = [*accepted, *during[-50:]]
            waits.append(c.wait_settled(accepted) - back)
        report = c.report(accepted)
        alive = c.workers_alive()
        unrecoverable = any("Unrecoverable error" in c.processes.log(name) for name in c.workers)
    return {
        **report,
        "recover_s": _round(max(waits)),
        "crashes": crashes,
        "unacked_at_crash": min(unacked),
        "accepted_while_down": len(during),
        "workers_alive": all(s is None for s in alive.values()),
        "worker_unrecoverable_errors": unrecoverable,
    }


def postgres_outage(servers: Servers, *, cases: int, down_s: float, **timing: str) -> Result:
    """PostgreSQL is stopped for ``down_s`` while two workers score a bulk load; STAT cases
    (committed just before) reach the workers during the outage; the API is asked for
    everything meanwhile. ``recover_s``: from the restart until every accepted case is settled.
    ``api_answers``: status codes seen during the outage (each must be a 503 with Retry-After
    and JSON); ``bulk_before_stat``: bulk cases scored after the restart before the last STAT
    case was (a worker finishes at most the pass it holds before it serves STAT)."""
    from worker.app import create_app
    from worker.queues import enqueue_cases

    with Cluster.fresh(servers, "postgres", **timing) as c:
        api = c.start("w1", "w2")
        accepted = c.submit(make_cases(cases, prefix="pg"))
        stat_ids = _store(c, make_cases(20, prefix="pg-stat", priority="stat"), unsent=False)
        servers.pg.stop("fast")
        stopped = time.monotonic()
        sender = create_app(c_settings(c), include_tasks=False)
        try:
            enqueue_cases(sender, [(i, Priority.stat) for i in stat_ids], per_message=1)
        finally:
            sender.close()
        answers: dict[str, int] = {}
        problems: list[str] = []
        while time.monotonic() - stopped < down_s:
            for name, status, ok in _probe(api):
                answers[f"{name} {status}"] = answers.get(f"{name} {status}", 0) + 1
                if not ok:
                    problems.append(f"{name}: {status}")
            time.sleep(0.5)
        servers.pg.start()
        back, back_at = time.monotonic(), datetime.now(UTC)
        accepted += stat_ids
        settled = c.wait_settled(accepted)
        report = c.report(accepted)
        bulk_before_stat = _bulk_before_stat(c, stat_ids, after=back_at)
        alive = c.workers_alive()
        deliveries = _max_deliveries(c, accepted)
    return {
        **report,
        "max_deliveries_of_a_case": deliveries,
        "recover_s": _round(settled - back),
        "down_s": down_s,
        "api_answers": answers,
        "api_problems": sorted(set(problems))[:10],
        "bulk_before_stat": bulk_before_stat,
        "workers_alive": all(s is None for s in alive.values()),
    }


def c_settings(c: Cluster) -> Any:
    from medbatch.settings import Settings

    return Settings(database_url=c.db_url, broker_url=c.servers.redis.url)


def _store(c: Cluster, cases: list[dict[str, Any]], *, unsent: bool) -> list[int]:
    """Cases committed as the API would (``unsent``: as if the broker had been down)."""
    with session_scope(c.sessions) as s:
        tenant_id = s.scalar(select(Tenant.id).where(Tenant.name == "faults"))
        added = repo.add_cases(
            s,
            tenant_id=tenant_id,
            cases=[
                repo.NewCase(
                    w["external_id"],
                    "breast-cancer",
                    "1.0.0",
                    Priority(w["priority"]),
                    w["features"],
                )
                for w in cases
            ],
        )
        ids = [a.id for a in added]
        if unsent:
            repo.mark_unsent(s, case_ids=ids)
    return ids


def _probe(api: httpx.Client) -> list[tuple[str, int | str, bool]]:
    """Every kind of request during an outage: each must be a 503 with Retry-After and JSON (an
    OperationOutcome on FHIR routes); ``readyz`` must name the database."""
    found = []
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": []}
    requests = [
        ("POST /v1/cases", "POST", "/v1/cases", make_cases(1, prefix="probe")),
        ("GET /v1/cases/1", "GET", "/v1/cases/1", None),
        ("GET /v1/scores", "GET", "/v1/scores", None),
        ("POST /v1/fhir", "POST", "/v1/fhir", bundle),
        ("GET /readyz", "GET", "/readyz", None),
    ]
    for name, method, path, body in requests:
        try:
            response = api.request(method, path, json=body, timeout=30)
        except httpx.TransportError as exc:
            found.append((name, type(exc).__name__, False))
            continue
        ok = response.status_code == 503 and response.headers.get("retry-after") is not None
        try:
            payload = response.json()
        except ValueError:
            payload, ok = None, False
        if ok and path.startswith("/v1/fhir"):
            ok = payload.get("resourceType") == "OperationOutcome"
        if ok and path == "/readyz":
            ok = str(payload.get("database", "")).startswith("unreachable")
        found.append((name, response.status_code, ok))
    return found


def _bulk_before_stat(c: Cluster, stat_ids: list[int], *, after: datetime) -> int | None:
    """Bulk cases scored after ``after`` and before the last of ``stat_ids`` was."""
    with c.sessions() as s:
        last_stat = s.scalar(select(func.max(Score.created_at)).where(Score.case_id.in_(stat_ids)))
        if last_stat is None:
            return None
        return int(
            s.scalar(
                select(func.count())
                .select_from(Score)
                .join(Case, Case.id == Score.case_id)
                .where(
                    Case.priority == Priority.bulk,
                    Score.created_at > after,
                    Score.created_at < last_stat,
                )
            )
            or 0
        )


def _max_deliveries(c: Cluster, ids: list[int]) -> int:
    with c.sessions() as s:
        return int(s.scalar(select(func.max(Case.delivery_count)).where(Case.id.in_(ids))) or 0)


SPIKY_SCHEMA = {
    "inputs": [{"name": "a", "unit": "1"}, {"name": "b", "unit": "1"}],
    "output": "fault-suite model whose attributions overflow when b is far above 1e6",
    "threshold": 0.5,
}

SPIKY_SOURCE = '''
import torch

class Spiky(torch.nn.Module):
    """logit = 0.1 a + 1e38 relu(b - 1e6): finite scores, attributions past float32 for big b."""

    def forward(self, x):
        return 0.1 * x[:, 0] + torch.relu(x[:, 1] - 1e6) * 1e38

torch.jit.save(torch.jit.script(Spiky()), __import__("sys").argv[1])
'''


def _register_spiky(c: Cluster) -> None:
    """A registered TorchScript model (a hospital's own) that scores every case but cannot
    explain some: the poison whose attributions are infinite while its score is finite."""
    artifact, schema, source = c.root / "spiky.pt", c.root / "spiky.json", c.root / "spiky.py"
    schema.write_text(json.dumps(SPIKY_SCHEMA))
    source.write_text(SPIKY_SOURCE)  # TorchScript compiles from source files
    subprocess.run([sys.executable, str(source), str(artifact)], check=True)
    subprocess.run(
        [
            *(sys.executable, "-m", "medbatch.cli", "models", "register", str(artifact)),
            *("--name", "spiky", "--version", "1.0", "--schema", str(schema)),
        ],
        env=c.env,
        cwd=c.root,
        check=True,
        capture_output=True,
    )


def poison(servers: Servers, *, cases: int) -> Result:
    """Clean cases and poison cases of every kind in the same requests and batches: a value past
    float32 (refused with 422, never stored), a case whose forward pass is NaN, a case whose
    attributions are infinite (score finite), a stored case whose features do not fit. Every
    poison case fails with its own reason; every clean one is scored."""
    with Cluster.fresh(servers, "poison") as c:
        _register_spiky(c)
        api = c.start("w1")
        misfit = _store_misfit(c)
        clean = make_cases(cases, prefix="clean")
        nan = make_cases(5, prefix="nan")
        for case in nan:
            for name in list(case["features"])[:5]:
                case["features"][name] = -3e38
        spiky = [
            {"external_id": f"spiky-{i}", "model": "spiky", "features": {"a": i, "b": 0.5}}
            for i in range(cases // 10 or 1)
        ]
        inf = [
            {"external_id": f"inf-{i}", "model": "spiky", "features": {"a": 1.0, "b": 2e6}}
            for i in range(3)
        ]
        overflow = make_cases(1, prefix="overflow")[0]
        overflow["features"]["mean_area"] = 1e39
        refused = api.post("/v1/cases", json=[*clean[:5], overflow])
        refused_ok = refused.status_code == 422 and "1e+39" not in refused.text
        mixed = [*clean[: len(clean) // 2], *nan, *clean[len(clean) // 2 :]]
        accepted = c.submit(mixed, chunk=400)
        accepted_spiky = c.submit([*spiky[:1], *inf, *spiky[1:]])
        everything = [*accepted, *accepted_spiky, misfit]
        by_external = _external_ids(c, everything)
        reasons = {}
        for case_id, external_id in by_external.items():
            if external_id.startswith("nan-"):
                reasons[case_id] = "model produced a non-finite score"
            elif external_id.startswith("misfit-"):
                reasons[case_id] = "features do not fit the input schema"
        settled_at = c.wait_settled(everything)
        report = c.report(everything, reasons)
        with c.sessions() as s:
            stored_overflow = s.scalar(
                select(func.count()).select_from(Case).where(Case.external_id.like("overflow-%"))
            )
        # Infinite attributions cost a case its explanation, never its score: explained after
        # the score, the inf cases end done with their explanation failed, the others explained.
        inf_ids = {i for i, x in by_external.items() if x.startswith("inf-")}
        explained_ids = [i for i in everything if i not in reasons]
        deadline = time.monotonic() + 120
        while True:
            with c.sessions() as s:
                found = explanations.states(s, case_ids=explained_ids)
            if sum(e.status != "pending" for e in found.values()) == len(explained_ids):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        explanations_ok = len(found) == len(explained_ids) and all(
            (e.status == "failed" and "explanation holds a non-finite number" in (e.error or ""))
            if i in inf_ids
            else e.status == "done"
            for i, e in found.items()
        )
    return {
        **report,
        # Nothing stops, so nothing recovers: each poison case fails in its own batch.
        "recover_s": None,
        "poison_cases": len(reasons) + 1,
        "refused_with_422": bool(refused_ok and not stored_overflow),
        "settled": not math.isnan(settled_at),
        "inf_explanations_failed_alone": explanations_ok,
    }


def _store_misfit(c: Cluster) -> int:
    """A case stored with a feature missing (as if written around the API), never sent: the
    sweeper sends it, the worker fails it."""
    case = make_cases(1, prefix="misfit", priority="routine")[0]
    del case["features"]["mean_texture"]
    (case_id,) = _store(c, [case], unsent=True)
    return case_id


def _external_ids(c: Cluster, ids: list[int]) -> dict[int, str]:
    with c.sessions() as s:
        return dict(
            s.execute(select(Case.id, Case.external_id).where(Case.id.in_(ids))).tuples().all()
        )


def sweeper_backlog(servers: Servers, *, backlog: int, stranded: int) -> Result:
    """Cases accepted during a broker outage (never sent) wait behind a routine backlog that the
    only worker is just starting on; the sweeper, a process of its own, sends them at its next
    sweep whatever the backlog (its predecessor, a task on score.routine, expired unrun behind
    such a backlog). ``resend_s``: from their arrival to their sending; ``backlog_left_at_resend``:
    routine messages still queued at that moment."""
    with Cluster.fresh(servers, "backlog") as c:
        # The backlog is queued before the (only) worker starts, and that worker scores one case
        # a forward pass: the routine queue stays long for several sweep intervals.
        c.start()
        accepted = c.submit(make_cases(backlog, prefix="backlog", priority="routine"))
        ids = _store(c, make_cases(stranded, prefix="stranded", priority="routine"), unsent=True)
        arrived = time.monotonic()
        c.start_worker("w1", MEDBATCH_ROUTINE_MAX_BATCH_SIZE="1")
        broker = servers.redis.client()
        resent_at, backlog_left = math.nan, -1
        while time.monotonic() - arrived < 120:
            with c.sessions() as s:
                unsent = s.scalar(
                    select(func.count())
                    .select_from(Case)
                    .where(Case.id.in_(ids), Case.enqueued_at.is_(None))
                )
            if unsent == 0:
                resent_at = time.monotonic()
                backlog_left = int(broker.llen("score.routine"))
                break
            time.sleep(0.1)
        broker.close()
        accepted += ids
        c.wait_settled(accepted)
        report = c.report(accepted)
    return {
        **report,
        # The safety net's recovery: from the cases' arrival until the sweeper sent them.
        "recover_s": _round(resent_at - arrived),
        "resend_s": _round(resent_at - arrived),
        "backlog_left_at_resend": backlog_left,
    }


#: The poison's settle stalls in the database (the worker is then SIGKILLed there): a case
#: whose batch kills its worker on every delivery, as a segfault or an OOM kill would.
_STALL_FUNCTION = """
CREATE FUNCTION faults_poison_stalls() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.id = {case_id} AND OLD.status = 'running' AND NEW.status IN ('done', 'failed')
     AND NOT NEW.dead_letter THEN
    PERFORM pg_sleep(120);
  END IF;
  RETURN NEW;
END $$
"""
_STALL_TRIGGER = (
    "CREATE TRIGGER faults_poison_stalls BEFORE UPDATE ON cases "
    "FOR EACH ROW EXECUTE FUNCTION faults_poison_stalls()"
)


def poison_crash(servers: Servers, *, cases: int, max_deliveries: int = 3) -> Result:
    """One case kills the worker that scores it, on every delivery; ``cases`` clean ones were
    submitted with it, in the same request and batch. Each time a worker is caught holding the
    poison in the middle of its batch, it is SIGKILLed and a new one started. The poison must end
    a dead letter after ``max_deliveries``; the clean cases, scored (not dead-lettered with it).
    Short leases and sweeps (3 s, 1 s) so the rounds are quick."""
    import psycopg

    timing = {
        "MEDBATCH_LEASE_TTL_S": "3",
        "MEDBATCH_SWEEP_INTERVAL_S": "1",
        "MEDBATCH_MAX_DELIVERIES": str(max_deliveries),
    }
    with Cluster.fresh(servers, "crash", **timing) as c:
        c.start("w0")
        batch = make_cases(cases + 1, prefix="crash")
        poison_id, *clean = ids = c.submit(batch)
        db = c.db_url
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(_STALL_FUNCTION.format(case_id=int(poison_id)))
            conn.execute(_STALL_TRIGGER)
        kills = 0
        deadline = time.monotonic() + 300
        worker = c.workers["w0"]
        while time.monotonic() < deadline and kills <= max_deliveries + 1:
            with c.sessions() as s:
                row = s.execute(
                    select(Case.status, Case.dead_letter).where(Case.id == poison_id)
                ).one()
            if row.status in ("done", "failed"):
                break
            with psycopg.connect(db, autocommit=True) as conn:
                stalled = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                ).fetchall()
                if not stalled:
                    time.sleep(0.05)
                    continue
                worker.kill()
                worker.wait()
                kills += 1
                for (backend,) in stalled:
                    conn.execute("SELECT pg_terminate_backend(%s)", (backend,))
            worker = c.start_worker(f"w{kills}")
            c.wait_ready(f"w{kills}")
        c.wait_settled(ids, timeout=120)
        with c.sessions() as s:
            poison_row = s.execute(
                select(Case.status, Case.dead_letter, Case.delivery_count).where(
                    Case.id == poison_id
                )
            ).one()
            dead_clean = int(
                s.scalar(
                    select(func.count())
                    .select_from(Case)
                    .where(Case.id.in_(clean), Case.dead_letter.is_(True))
                )
                or 0
            )
        report = c.report(clean)
    return {
        **report,
        "recover_s": None,
        "kills": kills,
        "poison_dead_letter": poison_row.status == "failed" and bool(poison_row.dead_letter),
        "poison_deliveries": int(poison_row.delivery_count),
        "clean_dead_letters": dead_clean,
    }


def worker_sigterm(servers: Servers, *, cases: int) -> Result:
    """A worker gets SIGTERM (a warm shutdown: a deploy, a scale-down) in the middle of a batch
    while its buffers hold more; it exits 0, and what it held is scored once, by the other
    worker, without waiting for the broker's visibility timeout. ``recover_s``: from the signal
    to the score of the last case it held."""
    with Cluster.fresh(servers, "sigterm") as c:
        c.start("w1", "w2")
        accepted = c.submit(make_cases(cases, prefix="term"))
        victim = c.workers["w1"]
        deadline = time.monotonic() + 60
        held: list[int] = []
        while time.monotonic() < deadline and not held:
            if c.running_under(victim) > 0:
                victim.send_signal(signal.SIGSTOP)
                held = c.held_by(victim)
                if held:
                    victim.send_signal(signal.SIGTERM)
                victim.send_signal(signal.SIGCONT)
            else:
                time.sleep(0.01)
        termed_at = datetime.now(UTC)
        exit_status = victim.wait(60)
        c.wait_settled(accepted)
        scored = c.scored_at(held)
        report = c.report(accepted)
        other = c.workers["w2"].poll()
    return {
        **report,
        "recover_s": _round((max(scored) - termed_at).total_seconds()) if held else None,
        "cases_held_at_sigterm": len(held),
        "exit_status": exit_status,
        "other_worker_alive": other is None,
    }


#: Genotypes and PLINK 2's own outputs for them (tests/data/genome).
GENOME_DATA = Path(__file__).resolve().parents[1] / "data" / "genome"


def genome_postgres_restart(servers: Servers, *, down_s: float) -> Result:
    """PostgreSQL is stopped for ``down_s`` in the middle of a tiled genome job (KING pairs over
    2-D tiles, two workers); afterwards the job finishes with every tile counted once, and its
    table is byte for byte PLINK 2's. Short leases and sweeps (3 s, 1 s) so it is quick.
    ``recover_s``: from the restart until the job is done."""
    timing = {
        "MEDBATCH_LEASE_TTL_S": "3",
        "MEDBATCH_SWEEP_INTERVAL_S": "1",
        "MEDBATCH_GENOTYPE_DIR": str(GENOME_DATA),
    }
    with Cluster.fresh(servers, "genome", **timing) as c:
        api = c.start_api(wait=False)
        c.start_sweeper()
        for name in ("g1", "g2"):
            c.start_worker(name, "--queues", "genome")
        c.wait_api()
        c.wait_ready("g1", "g2")
        response = api.post(
            "/v1/genome-comparisons",
            json={"metric": "king", "bfile": "hm3_relatives", "output": "pairs", "block": 16,
                  "threshold": 0.0442},
        )  # fmt: skip
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = api.get(f"/v1/genome-comparisons/{job_id}").json()
            if job["tiles_done"] >= 2:
                break
            time.sleep(0.05)
        tiles_before = job["tiles_done"]
        servers.pg.stop("fast")
        time.sleep(down_s)
        servers.pg.start()
        back = time.monotonic()
        deadline = back + 180
        while time.monotonic() < deadline:
            try:
                job = api.get(f"/v1/genome-comparisons/{job_id}").json()
            except (httpx.TransportError, ValueError):
                job = {}
            if job.get("status") in ("done", "failed"):
                break
            time.sleep(0.3)
        done_at = time.monotonic()
        same = False
        if job.get("status") == "done" and len(job.get("outputs", [])) == 1:
            table = api.get(job["outputs"][0]).content
            same = table == (GENOME_DATA / "hm3_relatives_0.0442.kin0").read_bytes()
        alive = c.workers_alive()
    return {
        "status": job.get("status"),
        "error": job.get("error"),
        "tiles_done": job.get("tiles_done"),
        "tiles_total": job.get("tiles_total"),
        "tiles_done_at_stop": tiles_before,
        "same_as_plink": same,
        "recover_s": _round(done_at - back) if job.get("status") == "done" else None,
        "workers_alive": all(s is None for s in alive.values()),
    }


def coalescer_broker_restart(servers: Servers, *, requests: int, window_ms: int = 1000) -> Result:
    """Single-case requests, each committed and handed to the API's coalescer (a window of
    ``window_ms``), while Redis is SIGKILLed and restarted empty: every one is answered 202 and
    scored once, whether its message went to the old broker, failed, or went to the new one."""
    from concurrent.futures import ThreadPoolExecutor

    with Cluster.fresh(servers, "coalesce", MEDBATCH_COALESCE_ROUTINE_MS=str(window_ms)) as c:
        api = c.start("w1")
        items = make_cases(requests, prefix="one", priority="routine")

        def post(item: dict[str, Any]) -> tuple[int, int | None, bool | None]:
            response = api.post("/v1/cases", json=item)
            if response.status_code != 202:
                return response.status_code, None, None
            body = response.json()
            return 202, body["cases"][0]["id"], body["enqueued"]

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, item) for item in items]
            time.sleep(window_ms / 2000)
            servers.redis.kill()
            time.sleep(1.0)
            servers.redis.start()
            answers = [f.result() for f in futures]
        accepted = [case_id for status, case_id, _ in answers if case_id is not None]
        c.wait_settled(accepted)
        report = c.report(accepted)
    return {
        **report,
        "recover_s": None,
        "refused": sorted({status for status, _, _ in answers if status != 202}),
        "not_enqueued": sum(1 for _, _, enqueued in answers if enqueued is False),
    }


def explain_sigkill(servers: Servers, *, cases: int) -> Result:
    """A worker is SIGKILLed while the explain stage holds a batch of explanations (their scores
    committed); another worker explains them after the lease, each stored once, none failed.
    Short leases and sweeps (3 s, 1 s) so it is quick."""
    from db.tables import Explanation, JobStatus

    timing = {"MEDBATCH_LEASE_TTL_S": "3", "MEDBATCH_SWEEP_INTERVAL_S": "1"}
    with Cluster.fresh(servers, "explainkill", **timing) as c:
        c.start("w1", "w2")
        accepted = c.submit(make_cases(cases, prefix="xk"))
        victim, held = None, []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and victim is None:
            for proc in (c.workers["w1"], c.workers["w2"]):
                pattern = f"%:{proc.pid}:%"
                running = Explanation.status == JobStatus.running
                mine = Explanation.lease_owner.like(pattern)
                with c.sessions() as s:
                    seen = s.scalar(select(func.count()).where(running, mine))
                if not seen:
                    continue
                proc.send_signal(signal.SIGSTOP)
                with c.sessions() as s:
                    held = list(s.scalars(select(Explanation.case_id).where(running, mine)))
                if not held:
                    proc.send_signal(signal.SIGCONT)
                    continue
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                victim = proc
                break
            time.sleep(0.005)
        c.start_worker("w3")
        c.wait_settled(accepted)
        report = c.report(accepted)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with c.sessions() as s:
                found = explanations.states(s, case_ids=accepted)
            if all(e.status != "pending" for e in found.values()):
                break
            time.sleep(0.3)
        with c.sessions() as s:
            stored = int(
                s.scalar(
                    select(func.count())
                    .select_from(Score)
                    .where(Score.case_id.in_(accepted), Score.explanation.is_not(None))
                )
                or 0
            )
            attempts = dict(
                s.execute(
                    select(Explanation.case_id, Explanation.attempts).where(
                        Explanation.case_id.in_(accepted)
                    )
                )
                .tuples()
                .all()
            )
    return {
        **report,
        "recover_s": None,
        "explanations_held_by_killed_worker": len(held),
        # The killed worker's attempt and the one that finished: no other counted meanwhile.
        "attempts_of_held": sorted({attempts.get(i) for i in held}),
        "max_attempts_of_others": max(
            (n for i, n in attempts.items() if i not in set(held)), default=0
        ),
        "explanations": {
            st: sum(e.status == st for e in found.values()) for st in ("done", "failed", "pending")
        },
        "scores_with_explanation": stored,
    }


def _explanation_counts(c: Cluster, ids: list[int], *, timeout: float = 120) -> dict[str, int]:
    """Wait until no explanation of ``ids`` is pending (at most ``timeout``); count each state."""
    deadline = time.monotonic() + timeout
    while True:
        with c.sessions() as s:
            found = explanations.states(s, case_ids=ids)
        if all(e.status != "pending" for e in found.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    return {st: sum(e.status == st for e in found.values()) for st in ("done", "failed", "pending")}


def explain_redis_crash(servers: Servers, *, cases: int) -> Result:
    """Redis is SIGKILLed while explain messages wait in its queue and workers hold others, and
    restarted empty: every explanation is computed once all the same (the sweeper sends again
    what the broker lost), none failed, none pending. Short leases and sweeps (3 s, 1 s)."""
    from db.tables import Explanation, JobStatus

    timing = {"MEDBATCH_LEASE_TTL_S": "3", "MEDBATCH_SWEEP_INTERVAL_S": "1"}
    with Cluster.fresh(servers, "explainredis", **timing) as c:
        c.start("w1", "w2")
        accepted = c.submit(make_cases(cases, prefix="xr"))
        broker = servers.redis.client()
        deadline = time.monotonic() + 60
        waiting = 0
        while time.monotonic() < deadline and waiting == 0:
            waiting = int(broker.llen("explain"))
            time.sleep(0.005)
        broker.close()
        with c.sessions() as s:
            done_at_crash = int(
                s.scalar(
                    select(func.count()).where(
                        Explanation.case_id.in_(accepted), Explanation.status == JobStatus.done
                    )
                )
                or 0
            )
        servers.redis.kill()
        time.sleep(1.0)
        servers.redis.start()
        back = time.monotonic()
        c.wait_settled(accepted)
        report = c.report(accepted)
        counts = _explanation_counts(c, accepted)
        settled = time.monotonic()
        with c.sessions() as s:
            stored = int(
                s.scalar(
                    select(func.count())
                    .select_from(Score)
                    .where(Score.case_id.in_(accepted), Score.explanation.is_not(None))
                )
                or 0
            )
            attempts = int(
                s.scalar(
                    select(func.max(Explanation.attempts)).where(Explanation.case_id.in_(accepted))
                )
                or 0
            )
        alive = c.workers_alive()
    return {
        **report,
        "recover_s": _round(settled - back),
        "explain_messages_at_crash": waiting,
        "explanations_done_at_crash": done_at_crash,
        "explanations": counts,
        "scores_with_explanation": stored,
        "max_attempts_of_an_explanation": attempts,
        "workers_alive": all(s is None for s in alive.values()),
    }
