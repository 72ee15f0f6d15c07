"""Scoring throughput and STAT latency through the real Redis and PostgreSQL (``make bench-scoring``).

One worker process, the same N cases, measured side by side in one run:

  (a) naive   the lean tutorial worker (bench/naive_worker.py): one Celery task per case, acks
              late, prefetch 1, the same model, one INSERT ... ON CONFLICT per case
  (b) batched medbatch's worker, explanations on (as shipped: computed after the score, by the
              explain stage): the same one-case messages gathered into batches, and the bulk path
              (64 case ids per message); the explain stage's own rate (explanations/s)
  (c) limit   each unavoidable stage alone on the same N cases: featurize + batched forward pass in
              process; reading N messages from Redis through kombu (the transport Celery uses) and
              acknowledging them; bulk-upserting N score rows into PostgreSQL. The one-case path's
              limit is the slowest of the three; the bulk path's the slower of forward and upsert
              (its messages carry 64 cases each).
  HTTP        C concurrent clients each posting one case per request (an EHR feed) through the
              real API process to one worker, end to end (submit to score row); beside it the API's
              accept rate alone (no worker), that path's stage.
  plain       (b) on the bulk path again without explanations (MEDBATCH_EXPLAIN_TOP_K=0), with
              its STAT latency: what asking for attributions with every score still costs.
  STAT        a trickle of STAT cases submitted while a bulk backlog of 3N cases (64 a message, as a
              nightly run sends them) is being scored: submit (row committed, message sent) to
              score row, p50 / p99.

The last line is one JSON object. Usage: python bench/scoring.py [--model NAME] [--cases N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import psycopg
import redis
from kombu import Queue
from sqlalchemy import func, select, update

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workloads import NAIVE_QUEUE, NAIVE_TASK, make_cases  # noqa: E402
from db import repo  # noqa: E402
from db.engine import make_engine, make_sessionmaker, session_scope  # noqa: E402
from db.migrate import upgrade  # noqa: E402
from db.tables import Case, CaseStatus, Explanation, JobStatus, Priority, Score  # noqa: E402
from medbatch.settings import Settings  # noqa: E402
from models.cases.inference import LoadedModel  # noqa: E402
from models.cases.registry import Registry  # noqa: E402
from models.cpu_features import cpu_model  # noqa: E402
from worker.app import create_app  # noqa: E402
from worker.queues import EXPLAIN_QUEUE, enqueue_cases  # noqa: E402

PG_ADMIN = os.environ.get(
    "MEDBATCH_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# Flushed at the start and the end: a database number no test suite uses.
REDIS_URL = os.environ.get("MEDBATCH_BENCH_REDIS", "redis://127.0.0.1:6379/15")


class Bench:
    def __init__(self, model_ref: str, n: int) -> None:
        self.spec = Registry.load().resolve(model_ref)
        self.n = n
        #: Explanations timed per run (all of them for the MLP; a sample for slower models).
        self.explain_sample = 4_000
        self.cases = make_cases(self.spec, n)
        self.db_name = f"medbatch_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        self.db_url = PG_ADMIN.rpartition("/")[0] + f"/{self.db_name}"
        upgrade(self.db_url)
        self.engine = make_engine(self.db_url)
        self.sessions = make_sessionmaker(self.engine)
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.redis.flushdb()
        self.settings = Settings(database_url=self.db_url, broker_url=REDIS_URL)
        self.app = create_app(self.settings, broker_url=REDIS_URL, include_tasks=False)
        self.logs = Path(tempfile.mkdtemp(prefix="medbatch-bench-"))
        self.env = {
            **os.environ,
            "MEDBATCH_DATABASE_URL": self.db_url,
            "MEDBATCH_BROKER_URL": REDIS_URL,
            "MEDBATCH_DEVICE": os.environ.get("MEDBATCH_DEVICE", "auto"),
            "MEDBATCH_LOG_LEVEL": "WARNING",
            "MEDBATCH_WORKER_METRICS_PORT": "0",
        }

    def close(self) -> None:
        self.app.close()
        self.engine.dispose()
        self.redis.flushdb()
        self.redis.close()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    # -- helpers ---------------------------------------------------------------------------------

    def add_cases(
        self, tag: str, priority: Priority, cases: list[dict] | None = None
    ) -> tuple[int, list[int]]:
        cases = self.cases if cases is None else cases
        with session_scope(self.sessions) as s:
            tenant_id = repo.create_tenant(s, name=tag)[0].id
            new = [
                repo.NewCase(f"{tag}-{i}", self.spec.name, self.spec.version, priority, c)
                for i, c in enumerate(cases)
            ]
            ids = [a.id for a in repo.add_cases(s, tenant_id=tenant_id, cases=new)]
        return tenant_id, ids

    def retire(self, tenant_id: int) -> None:
        """End a tenant's cases that are never meant to be scored (the upsert stage's, the API's
        accept-only run): a worker's sweep at start would otherwise send them again, and the
        next timed run would score them too."""
        with session_scope(self.sessions) as s:
            s.execute(
                update(Case)
                .where(Case.tenant_id == tenant_id, Case.status == CaseStatus.queued)
                .values(status=CaseStatus.failed, last_error="benchmark: stored, never sent")
            )

    def drop_explanations(self) -> None:
        """Drop the explanations still to come (their messages and ledger rows), so they cost
        the next timed run nothing (a worker's sweep at start would send them again)."""
        self.redis.delete(EXPLAIN_QUEUE)
        with session_scope(self.sessions) as s:
            s.execute(
                update(Explanation)
                .where(Explanation.status.in_([JobStatus.queued, JobStatus.running]))
                .values(status=JobStatus.failed, error="benchmark: dropped")
            )

    def done(self, tenant_id: int) -> int:
        with self.sessions() as s:
            return (
                s.scalar(
                    select(func.count())
                    .select_from(Case)
                    .where(
                        Case.tenant_id == tenant_id,
                        Case.status.in_([CaseStatus.done, CaseStatus.failed]),
                    )
                )
                or 0
            )

    def wait_done(
        self, tenant_id: int, n: int, worker: subprocess.Popen, timeout: float = 900
    ) -> None:
        """Until ``n`` of a tenant's cases are settled. Every figure is read from the rows'
        timestamps, not from when this loop notices: it looks twice a second, since each look
        (a count over the tenant's cases, several ms of the database's CPU once the tables hold
        the earlier runs) is taken from the machine the worker is measured on."""
        deadline = time.monotonic() + timeout
        while self.done(tenant_id) < n:
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited; see {self.logs}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.done(tenant_id)}/{n} done after {timeout} s")
            time.sleep(0.5)

    def last_score_at(self, tenant_id: int) -> datetime:
        with self.sessions() as s:
            return s.scalar(
                select(func.max(Score.created_at))
                .join(Case, Case.id == Score.case_id)
                .where(Case.tenant_id == tenant_id)
            )  # type: ignore[return-value]

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        return subprocess.Popen(
            argv,
            env={**self.env, **(env or {})},
            cwd=self.logs,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop(self, proc: subprocess.Popen) -> None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        # What the stopped process left queued (explain messages) must not run in the next one.
        self.redis.flushdb()
        self.drop_explanations()

    def warm(self, worker: subprocess.Popen, send) -> None:  # type: ignore[no-untyped-def]
        """Score a few cases first, so model load and imports are not timed."""
        tenant_id, ids = self.add_cases(
            f"warm-{uuid.uuid4().hex[:6]}", Priority.bulk, self.cases[:16]
        )
        send(ids)
        self.wait_done(tenant_id, len(ids), worker, timeout=120)

    def timed_run(self, tag: str, worker: subprocess.Popen, send) -> float:  # type: ignore[no-untyped-def]
        return self.timed(tag, worker, send)[0]

    def timed(self, tag: str, worker: subprocess.Popen, send) -> tuple[float, int, datetime]:  # type: ignore[no-untyped-def]
        """Cases/s from the first send to the last score row; the run's tenant and start."""
        tenant_id, ids = self.add_cases(tag, Priority.bulk)
        start = datetime.now(UTC)
        send(ids)
        self.wait_done(tenant_id, len(ids), worker)
        return self.n / (self.last_score_at(tenant_id) - start).total_seconds(), tenant_id, start

    def explained(self, tenant_id: int) -> tuple[int, datetime | None, datetime | None]:
        """Explanations of a tenant's cases settled (done or failed), the first and last at."""
        with self.sessions() as s:
            row = s.execute(
                select(
                    func.count(), func.min(Explanation.updated_at), func.max(Explanation.updated_at)
                )
                .join(Case, Case.id == Explanation.case_id)
                .where(
                    Case.tenant_id == tenant_id,
                    Explanation.status.in_([JobStatus.done, JobStatus.failed]),
                )
            ).one()
        return int(row[0]), row[1], row[2]

    def wait_explained(
        self, tenant_id: int, n: int, worker: subprocess.Popen, timeout: float = 1800
    ) -> tuple[datetime, datetime]:
        deadline = time.monotonic() + timeout
        while True:
            count, first, last = self.explained(tenant_id)
            if count >= n and first is not None and last is not None:
                return first, last
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited; see {self.logs}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count}/{n} explained after {timeout} s")
            time.sleep(0.2)

    # -- (a) naive ------------------------------------------------------------------------------

    def naive(self) -> float:
        def send(ids: list[int]) -> None:
            for i in ids:
                self.app.send_task(NAIVE_TASK, args=[i], queue=NAIVE_QUEUE, routing_key=NAIVE_QUEUE)

        worker = self.start(
            "naive",
            [sys.executable, str(ROOT / "bench" / "naive_worker.py")],
            env={"MEDBATCH_BENCH_MODEL": self.spec.ref},
        )
        try:
            self.warm(worker, send)
            return self.timed_run("naive", worker, send)
        finally:
            self.stop(worker)

    # -- (b) batched and STAT latency -------------------------------------------------------------

    def without_explanations(self) -> dict[str, float]:
        """The bulk path and STAT latency again, with MEDBATCH_EXPLAIN_TOP_K=0: what the
        explanations stored with every score cost."""

        def send_bulk(ids: list[int]) -> None:
            enqueue_cases(self.app, [(i, Priority.bulk) for i in ids], per_message=64)

        worker = self.start(
            "no-explanations",
            [sys.executable, "-m", "medbatch.cli", "worker"],
            env={"MEDBATCH_EXPLAIN_TOP_K": "0"},
        )
        try:
            self.warm(worker, send_bulk)
            out = {"cases_per_s": self.timed_run("plain-64", worker, send_bulk)}
            out.update(self.stat_latency(worker, send_bulk))
            return out
        finally:
            self.stop(worker)

    def batched(self) -> dict[str, float]:
        def send_one_per_message(ids: list[int]) -> None:
            enqueue_cases(self.app, [(i, Priority.bulk) for i in ids], per_message=1)

        def send_bulk(ids: list[int]) -> None:
            enqueue_cases(self.app, [(i, Priority.bulk) for i in ids], per_message=64)

        worker = self.start("batched", [sys.executable, "-m", "medbatch.cli", "worker"])
        try:
            self.warm(worker, send_one_per_message)
            one, _, _ = self.timed("batched-1", worker, send_one_per_message)
            self.drop_explanations()  # that run's explanations would slow the next
            bulk, tenant_id, _ = self.timed("batched-64", worker, send_bulk)
            # The explain stage reads its queue only when no scoring message waits: its rate is
            # from its first settled explanation to the last of a sample (the first
            # ``explain_sample`` of the run's cases: a GRU takes minutes for all of them).
            sample = min(self.n, self.explain_sample)
            first, last = self.wait_explained(tenant_id, sample, worker)
            count = self.explained(tenant_id)[0]
            self.drop_explanations()
            out = {
                "batched_cases_per_s": one,
                "batched_bulk_messages_cases_per_s": bulk,
                "explanations_per_s": count / max((last - first).total_seconds(), 1e-6),
                "explanations_measured": count,
            }
            # The backlog a nightly run makes: bulk submissions, 64 case ids a message.
            out.update(self.stat_latency(worker, send_bulk))
            return out
        finally:
            self.stop(worker)

    def stat_latency(
        self, worker: subprocess.Popen, send_backlog, trickle: int = 60
    ) -> dict[str, float]:  # type: ignore[no-untyped-def]
        # Three times the run's cases, so the backlog outlasts the trickle; only STAT cases scored
        # while backlog cases were still being scored count (reported).
        backlog_tenant, backlog_ids = self.add_cases(
            f"backlog-{uuid.uuid4().hex[:6]}", Priority.bulk, self.cases * 3
        )
        with session_scope(self.sessions) as s:
            stat_tenant = repo.create_tenant(s, name=f"stat-{uuid.uuid4().hex[:6]}")[0].id
        send_backlog(backlog_ids)
        time.sleep(0.3)  # the worker is into the backlog
        submitted: dict[int, datetime] = {}
        for i in range(trickle):
            t0 = datetime.now(UTC)
            with session_scope(self.sessions) as s:  # what POST /v1/cases does: commit, then send
                (added,) = repo.add_cases(
                    s,
                    tenant_id=stat_tenant,
                    cases=[
                        repo.NewCase(
                            f"stat-{i}",
                            self.spec.name,
                            self.spec.version,
                            Priority.stat,
                            self.cases[i],
                        )
                    ],
                )
            enqueue_cases(self.app, [(added.id, Priority.stat)], per_message=1)
            submitted[added.id] = t0
            time.sleep(0.02)
        self.wait_done(stat_tenant, trickle, worker)
        stat_done_at = self.last_score_at(stat_tenant)
        with self.sessions() as s:
            scored = {
                row[0]: row[1]
                for row in s.execute(
                    select(Score.case_id, Score.created_at).where(
                        Score.case_id.in_(list(submitted))
                    )
                )
            }
        self.wait_done(backlog_tenant, len(backlog_ids), worker)
        backlog_end = self.last_score_at(backlog_tenant)
        with self.sessions() as s:  # only now is the backlog's whole timeline in the table
            backlog_left = s.scalar(
                select(func.count())
                .select_from(Score)
                .join(Case, Case.id == Score.case_id)
                .where(Case.tenant_id == backlog_tenant, Score.created_at > stat_done_at)
            )
        during = {i: t0 for i, t0 in submitted.items() if scored[i] <= backlog_end}
        if len(during) < trickle // 2:
            raise RuntimeError(
                f"only {len(during)} STAT cases overlapped the backlog; make it longer"
            )
        latencies = np.array([(scored[i] - t0).total_seconds() * 1000 for i, t0 in during.items()])
        return {
            "stat_p50_ms": float(np.percentile(latencies, 50)),
            "stat_p99_ms": float(np.percentile(latencies, 99)),
            "stat_cases": len(during),
            "backlog_cases_left_after_last_stat": int(backlog_left or 0),
        }

    # -- HTTP: single cases through the real API ---------------------------------------------------

    def http(self, n: int, clients: int) -> dict[str, float]:
        """One case per request from ``clients`` concurrent clients: the API's accept rate alone
        (no worker), then end to end through one worker (submit to score row)."""
        port = _free_port()
        api = self.start("api", [sys.executable, "-m", "medbatch.cli", "api", "--port", str(port)])
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if api.poll() is not None:
                raise RuntimeError(f"API exited; see {self.logs}")
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the API did not start")
            time.sleep(0.2)
        try:
            # The accept rate alone: no worker listens; the cases stay queued.
            tenant_id, key = self.tenant("http-accept")
            t0 = time.perf_counter()
            accepted = _post_singles(base, key, self.spec.ref, self.cases[:n], "accept", clients)
            accept = n / (time.perf_counter() - t0)
            if accepted != n:
                raise RuntimeError(f"{accepted}/{n} accepted; see {self.logs}")
            self.redis.flushdb()  # those cases are never scored
            self.retire(tenant_id)
            worker = self.start("http-worker", [sys.executable, "-m", "medbatch.cli", "worker"])
            try:
                warm_tenant, warm_key = self.tenant("http-warm")
                _post_singles(base, warm_key, self.spec.ref, self.cases[:32], "warm", clients)
                self.wait_done(warm_tenant, 32, worker, timeout=120)
                tenant_id, key = self.tenant("http-e2e")
                start = datetime.now(UTC)
                _post_singles(base, key, self.spec.ref, self.cases[:n], "e2e", clients)
                self.wait_done(tenant_id, n, worker)
                end_to_end = n / (self.last_score_at(tenant_id) - start).total_seconds()
            finally:
                self.stop(worker)
        finally:
            self.stop(api)
        return {"http_single_cases_per_s": end_to_end, "api_accept_cases_per_s": accept}

    def tenant(self, tag: str) -> tuple[int, str]:
        with session_scope(self.sessions) as s:
            tenant, key = repo.create_tenant(s, name=f"{tag}-{uuid.uuid4().hex[:6]}")
            return tenant.id, key

    # -- (c) the stages alone -------------------------------------------------------------------------

    def stage_forward(self) -> float:
        model = LoadedModel(self.spec, device=self.settings.device)
        size = self.settings.batching("score.bulk")[0]
        model.warm_up(size)
        start = time.perf_counter()
        for i in range(0, self.n, size):
            model.to_rows(model.predict(model.featurize(self.cases[i : i + size])))
        return self.n / (time.perf_counter() - start)

    def stage_redis_read(self) -> tuple[float, float]:
        queue = "bench.read"
        enqueue_ids = list(range(1, self.n + 1))
        for i in enqueue_ids:  # the same one-case messages the workers read
            self.app.send_task("medbatch.score_cases", args=[[i]], queue=queue, routing_key=queue)
        received = 0
        prefetch = sum(
            self.settings.batching(q)[0] for q in ("score.stat", "score.routine", "score.bulk")
        )

        def on_message(body: object, message) -> None:  # type: ignore[no-untyped-def]
            nonlocal received
            message.decode()
            message.ack()
            received += 1

        with self.app.connection_for_read() as conn:  # the transport the workers use
            consumer = conn.Consumer(
                Queue(queue, routing_key=queue), callbacks=[on_message], accept=["json"]
            )
            consumer.qos(prefetch_count=prefetch)
            start = time.perf_counter()
            with consumer:
                while received < self.n:
                    conn.drain_events(timeout=10)
            kombu_rate = self.n / (time.perf_counter() - start)
        # For context: the raw Redis floor, RPOP in pipelines of 1000 (no broker semantics).
        key = "bench.raw"
        self.redis.lpush(key, *[b"x" * 600] * self.n)
        start = time.perf_counter()
        for _ in range(0, self.n, 1000):
            pipe = self.redis.pipeline(transaction=False)
            for _ in range(1000):
                pipe.rpop(key)
            pipe.execute()
        raw_rate = self.n / (time.perf_counter() - start)
        return kombu_rate, raw_rate

    def stage_pg_upsert(self) -> float:
        tenant_id, ids = self.add_cases("upsert", Priority.bulk)
        self.retire(tenant_id)
        size = self.settings.batching("score.bulk")[0]
        rows = [
            {
                "case_id": i,
                "model_name": self.spec.name,
                "model_version": self.spec.version,
                "model_sha256": self.spec.sha256,
                "score": 0.5,
                "label": "x",
                "position": k % size,
                "queue_wait_ms": 1.0,
            }
            for k, i in enumerate(ids)
        ]
        start = time.perf_counter()
        for i in range(0, self.n, size):
            with session_scope(self.sessions) as s:
                repo.save_scores(s, rows=rows[i : i + size])
        return self.n / (time.perf_counter() - start)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post_singles(
    base: str, key: str, model: str, cases: list[dict], tag: str, clients: int
) -> int:
    """POST each case alone, ``clients`` requests in flight at a time; returns the 202s."""

    async def run() -> int:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        headers = {"Authorization": f"Bearer {key}"}
        todo = iter(enumerate(cases))
        accepted = 0
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

            async def one_client() -> None:
                nonlocal accepted
                for i, features in todo:
                    body = {"external_id": f"{tag}-{i}", "model": model, "features": features}
                    r = await client.post("/v1/cases", json=body, headers=headers)
                    if r.status_code == 202:
                        accepted += 1
                    else:
                        raise RuntimeError(f"POST /v1/cases answered {r.status_code}")

            await asyncio.gather(*(one_client() for _ in range(clients)))
        return accepted

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="breast-cancer")
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument(
        "--http-cases", type=int, default=2_000, help="cases posted one per request (HTTP mode)"
    )
    parser.add_argument("--http-clients", type=int, default=32, help="concurrent HTTP clients")
    parser.add_argument("--skip-naive", action="store_true", help="for quick tuning runs")
    parser.add_argument("--skip-http", action="store_true", help="for quick tuning runs")
    parser.add_argument(
        "--skip-plain", action="store_true", help="skip the run without explanations"
    )
    args = parser.parse_args()
    bench = Bench(args.model, args.cases)
    nan = float("nan")
    try:
        print(f"CPU: {cpu_model()}, {os.cpu_count()} cores seen", flush=True)
        print(
            f"model {bench.spec.ref}, {args.cases} cases, one worker process, "
            f"Redis {REDIS_URL}, PostgreSQL {bench.db_name}",
            flush=True,
        )
        forward = bench.stage_forward()
        kombu_read, raw_read = bench.stage_redis_read()
        upsert = bench.stage_pg_upsert()
        stages = {"forward": forward, "redis_read": kombu_read, "pg_upsert": upsert}
        limit_stage = min(stages, key=stages.__getitem__)
        # The bulk path reads one message per 64 cases: its unavoidable stages are the forward
        # pass and the upsert.
        bulk_limit_stage = min(("forward", "pg_upsert"), key=stages.__getitem__)
        print(
            f"  stages alone: forward {forward:,.0f}/s, redis read+ack via kombu {kombu_read:,.0f}/s "
            f"(raw RPOP {raw_read:,.0f}/s), pg upsert {upsert:,.0f}/s -> limit {limit_stage}",
            flush=True,
        )
        naive = nan if args.skip_naive else bench.naive()
        print(f"  naive (lean tutorial worker): {naive:,.0f} cases/s", flush=True)
        batched = bench.batched()
        print(
            f"  batched: {batched['batched_cases_per_s']:,.0f} cases/s (bulk messages: "
            f"{batched['batched_bulk_messages_cases_per_s']:,.0f}/s); explanations "
            f"{batched['explanations_per_s']:,.0f}/s; STAT p50 {batched['stat_p50_ms']:.1f} ms, "
            f"p99 {batched['stat_p99_ms']:.1f} ms",
            flush=True,
        )
        http = (
            {"http_single_cases_per_s": nan, "api_accept_cases_per_s": nan}
            if args.skip_http
            else bench.http(min(args.http_cases, args.cases), args.http_clients)
        )
        print(
            f"  HTTP, one case per request, {args.http_clients} clients: "
            f"{http['http_single_cases_per_s']:,.0f} cases/s end to end; the API accepts "
            f"{http['api_accept_cases_per_s']:,.0f}/s alone",
            flush=True,
        )
        plain = (
            {"cases_per_s": nan, "stat_p50_ms": nan, "stat_p99_ms": nan}
            if args.skip_plain
            else bench.without_explanations()
        )
        print(
            f"  without explanations: bulk messages {plain['cases_per_s']:,.0f} cases/s; "
            f"STAT p50 {plain['stat_p50_ms']:.1f} ms, p99 {plain['stat_p99_ms']:.1f} ms",
            flush=True,
        )
    finally:
        bench.close()
    limit = stages[limit_stage]
    bulk_limit = stages[bulk_limit_stage]
    bulk = batched["batched_bulk_messages_cases_per_s"]
    result = {
        "model": bench.spec.ref,
        "cpu": cpu_model(),
        "cases": args.cases,
        "naive": "lean tutorial worker: one task per case, acks late, prefetch 1, one upsert",
        "naive_cases_per_s": round(naive, 1),
        "batched_cases_per_s": round(batched["batched_cases_per_s"], 1),
        "batched_bulk_messages_cases_per_s": round(bulk, 1),
        "limit_cases_per_s": round(limit, 1),
        "limit_stage": limit_stage,
        "bulk_limit_cases_per_s": round(bulk_limit, 1),
        "bulk_limit_stage": bulk_limit_stage,
        "forward_cases_per_s": round(forward, 1),
        "redis_read_cases_per_s": round(kombu_read, 1),
        "redis_raw_rpop_per_s": round(raw_read, 1),
        "pg_upsert_cases_per_s": round(upsert, 1),
        "speedup_vs_naive": round(batched["batched_cases_per_s"] / naive, 2),
        "bulk_speedup_vs_naive": round(bulk / naive, 2),
        "fraction_of_limit": round(batched["batched_cases_per_s"] / limit, 3),
        "bulk_fraction_of_limit": round(bulk / bulk_limit, 3),
        "http_single_cases_per_s": round(http["http_single_cases_per_s"], 1),
        "api_accept_cases_per_s": round(http["api_accept_cases_per_s"], 1),
        "http_fraction_of_accept": round(
            http["http_single_cases_per_s"] / http["api_accept_cases_per_s"], 3
        ),
        "http_clients": args.http_clients,
        "http_cases": min(args.http_cases, args.cases),
        "stat_p50_ms": round(batched["stat_p50_ms"], 1),
        "stat_p99_ms": round(batched["stat_p99_ms"], 1),
        "stat_cases": batched["stat_cases"],
        "backlog_cases_left_after_last_stat": batched["backlog_cases_left_after_last_stat"],
        "explain_top_k": bench.settings.explain_top_k,
        "explain_steps": bench.settings.explain_steps,
        "explanations_per_s": round(batched["explanations_per_s"], 1),
        "explanations_measured": batched["explanations_measured"],
        "without_explanations_bulk_cases_per_s": round(plain["cases_per_s"], 1),
        "explanations_throughput_ratio": round(bulk / plain["cases_per_s"], 3),
        "without_explanations_stat_p50_ms": round(plain["stat_p50_ms"], 1),
        "without_explanations_stat_p99_ms": round(plain["stat_p99_ms"], 1),
    }
    result["targets"] = {
        "bulk_at_least_20x_naive": bool(bulk / naive >= 20),
        "bulk_at_least_half_of_limit": bool(bulk / bulk_limit >= 0.5),
        "http_at_least_half_of_accept": bool(result["http_fraction_of_accept"] >= 0.5),
        "stat_p99_at_most_100ms": bool(batched["stat_p99_ms"] <= 100),
    }
    rows = [
        ("(a) naive: lean tutorial worker", result["naive_cases_per_s"], "1.0x"),
        (
            "(b) medbatch batched, one case per message",
            result["batched_cases_per_s"],
            f"{result['speedup_vs_naive']}x",
        ),
        (
            "(b) medbatch batched, 64 cases per message",
            result["batched_bulk_messages_cases_per_s"],
            f"{result['bulk_speedup_vs_naive']}x",
        ),
        ("(b) explain stage (explanations/s)", result["explanations_per_s"], ""),
        (
            "(b) 64 per message, without explanations",
            result["without_explanations_bulk_cases_per_s"],
            f"{result['without_explanations_bulk_cases_per_s'] / naive:.1f}x",
        ),
        (
            "HTTP, one case per request, end to end",
            result["http_single_cases_per_s"],
            f"{result['http_single_cases_per_s'] / naive:.1f}x",
        ),
        ("HTTP stage: the API's accept rate alone", result["api_accept_cases_per_s"], ""),
        ("(c) stage: featurize + forward", result["forward_cases_per_s"], ""),
        ("(c) stage: redis read + ack (kombu)", result["redis_read_cases_per_s"], ""),
        ("(c) stage: pg upsert of score rows", result["pg_upsert_cases_per_s"], ""),
    ]
    print(f"\n{'':46} {'cases/s':>12} {'vs naive':>9}")
    for name, rate, ratio in rows:
        print(f"{name:46} {rate:>12,.0f} {ratio:>9}")
    print(
        f"one case per message: limit {limit_stage} at {limit:,.0f} cases/s, reached "
        f"{result['fraction_of_limit']:.0%}; bulk: limit {bulk_limit_stage} at "
        f"{bulk_limit:,.0f} cases/s, reached {result['bulk_fraction_of_limit']:.0%}"
    )
    print(f"HTTP singles reach {result['http_fraction_of_accept']:.0%} of the API's accept rate")
    print(
        f"STAT ({result['stat_cases']} cases) while a {3 * args.cases}-case backlog runs: p50 {result['stat_p50_ms']} ms, p99 {result['stat_p99_ms']} ms "
        f"({result['backlog_cases_left_after_last_stat']} backlog cases scored after the last STAT case)"
    )
    print(
        f"explanations (top {result['explain_top_k']}, {result['explain_steps']} steps) after "
        f"the score: bulk throughput x{result['explanations_throughput_ratio']} of the run "
        f"without; STAT p99 {result['stat_p99_ms']} ms vs "
        f"{result['without_explanations_stat_p99_ms']} ms; the explain stage: "
        f"{result['explanations_per_s']:,.0f}/s over {result['explanations_measured']} cases"
    )
    print(
        "targets: "
        + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["targets"].items())
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
