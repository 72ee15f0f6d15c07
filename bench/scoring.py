"""Scoring throughput and STAT latency through the real Redis and PostgreSQL (``make bench-scoring``).

One worker process, the same N cases, measured side by side in one run:

  (a) naive   one Celery task per case, prefetch 1, one forward pass per case (bench/naive_worker.py)
  (b) batched medbatch's worker: the same one-case messages gathered into batches
              (and, for reference, the bulk path: 64 case ids per message)
  (c) limit   each unavoidable stage alone on the same N cases: featurize + batched forward pass in
              process; reading N messages from Redis through kombu (the transport Celery uses) and
              acknowledging them; bulk-upserting N score rows into PostgreSQL. The limit is the
              slowest of the three.
  plain       (b) on the bulk path again without explanations (MEDBATCH_EXPLAIN_TOP_K=0), with
              its STAT latency: what storing attributions with every score costs.
  STAT        a trickle of STAT cases submitted while a bulk backlog of 3N cases (64 a message, as a
              nightly run sends them) is being scored: submit (row committed, message sent) to
              score row, p50 / p99.

The last line is one JSON object. Usage: python bench/scoring.py [--model NAME] [--cases N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
import redis
from kombu import Queue
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workloads import NAIVE_QUEUE, NAIVE_TASK, make_cases  # noqa: E402
from db import repo  # noqa: E402
from db.engine import make_engine, make_sessionmaker, session_scope  # noqa: E402
from db.migrate import upgrade  # noqa: E402
from db.tables import Case, CaseStatus, Priority, Score  # noqa: E402
from medbatch.settings import Settings  # noqa: E402
from models.cases.inference import LoadedModel  # noqa: E402
from models.cases.registry import Registry  # noqa: E402
from worker.app import create_app  # noqa: E402
from worker.queues import enqueue_cases  # noqa: E402

PG_ADMIN = os.environ.get(
    "MEDBATCH_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("MEDBATCH_BENCH_REDIS", "redis://127.0.0.1:6379/12")


class Bench:
    def __init__(self, model_ref: str, n: int) -> None:
        self.spec = Registry.load().resolve(model_ref)
        self.n = n
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
        deadline = time.monotonic() + timeout
        while self.done(tenant_id) < n:
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited; see {self.logs}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.done(tenant_id)}/{n} done after {timeout} s")
            time.sleep(0.1)

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

    def warm(self, worker: subprocess.Popen, send) -> None:  # type: ignore[no-untyped-def]
        """Score a few cases first, so model load and imports are not timed."""
        tenant_id, ids = self.add_cases(
            f"warm-{uuid.uuid4().hex[:6]}", Priority.bulk, self.cases[:16]
        )
        send(ids)
        self.wait_done(tenant_id, len(ids), worker, timeout=120)

    def timed_run(self, tag: str, worker: subprocess.Popen, send) -> float:  # type: ignore[no-untyped-def]
        tenant_id, ids = self.add_cases(tag, Priority.bulk)
        start = datetime.now(UTC)
        send(ids)
        self.wait_done(tenant_id, len(ids), worker)
        return self.n / (self.last_score_at(tenant_id) - start).total_seconds()

    # -- (a) naive ------------------------------------------------------------------------------

    def naive(self) -> float:
        def send(ids: list[int]) -> None:
            for i in ids:
                self.app.send_task(NAIVE_TASK, args=[i], queue=NAIVE_QUEUE, routing_key=NAIVE_QUEUE)

        worker = self.start("naive", [sys.executable, str(ROOT / "bench" / "naive_worker.py")])
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
            out = {
                "batched_cases_per_s": self.timed_run("batched-1", worker, send_one_per_message),
                "batched_bulk_messages_cases_per_s": self.timed_run(
                    "batched-64", worker, send_bulk
                ),
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
        _, ids = self.add_cases("upsert", Priority.bulk)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="breast-cancer")
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--skip-naive", action="store_true", help="for quick tuning runs")
    parser.add_argument(
        "--skip-plain", action="store_true", help="skip the run without explanations"
    )
    args = parser.parse_args()
    bench = Bench(args.model, args.cases)
    try:
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
        print(
            f"  stages alone: forward {forward:,.0f}/s, redis read+ack via kombu {kombu_read:,.0f}/s "
            f"(raw RPOP {raw_read:,.0f}/s), pg upsert {upsert:,.0f}/s -> limit {limit_stage}",
            flush=True,
        )
        naive = float("nan") if args.skip_naive else bench.naive()
        print(f"  naive: {naive:,.0f} cases/s", flush=True)
        batched = bench.batched()
        print(
            f"  batched: {batched['batched_cases_per_s']:,.0f} cases/s (bulk messages: "
            f"{batched['batched_bulk_messages_cases_per_s']:,.0f}/s); STAT p50 {batched['stat_p50_ms']:.1f} ms, "
            f"p99 {batched['stat_p99_ms']:.1f} ms",
            flush=True,
        )
        nan = float("nan")
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
    result = {
        "model": bench.spec.ref,
        "cases": args.cases,
        "naive_cases_per_s": round(naive, 1),
        "batched_cases_per_s": round(batched["batched_cases_per_s"], 1),
        "batched_bulk_messages_cases_per_s": round(batched["batched_bulk_messages_cases_per_s"], 1),
        "limit_cases_per_s": round(limit, 1),
        "limit_stage": limit_stage,
        "forward_cases_per_s": round(forward, 1),
        "redis_read_cases_per_s": round(kombu_read, 1),
        "redis_raw_rpop_per_s": round(raw_read, 1),
        "pg_upsert_cases_per_s": round(upsert, 1),
        "speedup_vs_naive": round(batched["batched_cases_per_s"] / naive, 2),
        "fraction_of_limit": round(batched["batched_cases_per_s"] / limit, 3),
        "stat_p50_ms": round(batched["stat_p50_ms"], 1),
        "stat_p99_ms": round(batched["stat_p99_ms"], 1),
        "stat_cases": batched["stat_cases"],
        "backlog_cases_left_after_last_stat": batched["backlog_cases_left_after_last_stat"],
        "explain_top_k": bench.settings.explain_top_k,
        "explain_steps": bench.settings.explain_steps,
        "without_explanations_bulk_cases_per_s": round(plain["cases_per_s"], 1),
        "explanations_throughput_ratio": round(
            batched["batched_bulk_messages_cases_per_s"] / plain["cases_per_s"], 3
        ),
        "without_explanations_stat_p50_ms": round(plain["stat_p50_ms"], 1),
        "without_explanations_stat_p99_ms": round(plain["stat_p99_ms"], 1),
    }
    rows = [
        ("(a) naive: one task per case, no explanations", result["naive_cases_per_s"], "1.0x"),
        (
            "(b) medbatch batched, one case per message",
            result["batched_cases_per_s"],
            f"{result['speedup_vs_naive']}x",
        ),
        (
            "(b) medbatch batched, 64 cases per message",
            result["batched_bulk_messages_cases_per_s"],
            f"{result['batched_bulk_messages_cases_per_s'] / naive:.1f}x",
        ),
        (
            "(b) 64 per message, without explanations",
            result["without_explanations_bulk_cases_per_s"],
            f"{result['without_explanations_bulk_cases_per_s'] / naive:.1f}x",
        ),
        ("(c) stage: featurize + forward", result["forward_cases_per_s"], ""),
        ("(c) stage: redis read + ack (kombu)", result["redis_read_cases_per_s"], ""),
        ("(c) stage: pg upsert of score rows", result["pg_upsert_cases_per_s"], ""),
    ]
    print(f"\n{'':46} {'cases/s':>12} {'vs naive':>9}")
    for name, rate, ratio in rows:
        print(f"{name:46} {rate:>12,.0f} {ratio:>9}")
    print(
        f"limit: {limit_stage} at {limit:,.0f} cases/s; batched reaches {result['fraction_of_limit']:.0%} of it"
    )
    print(
        f"STAT ({result['stat_cases']} cases) while a {3 * args.cases}-case backlog runs: p50 {result['stat_p50_ms']} ms, p99 {result['stat_p99_ms']} ms "
        f"({result['backlog_cases_left_after_last_stat']} backlog cases scored after the last STAT case)"
    )
    print(
        f"explanations (top {result['explain_top_k']}, {result['explain_steps']} steps) with every "
        f"score: bulk throughput x{result['explanations_throughput_ratio']} of the run without; "
        f"STAT p99 {result['stat_p99_ms']} ms vs {result['without_explanations_stat_p99_ms']} ms"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
