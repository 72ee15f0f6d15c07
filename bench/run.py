"""medbatch benchmarks, measured side by side in one run (``make bench``).

1. inference: one forward pass over N cases vs N forward passes of one case (same model, same cases);
2. pipeline: real worker process, embedded Redis, SQLite: N cases sent 64 ids per message vs
   one id per message, timed from the first send until the last case is ``done`` in SQL.

The last line is one JSON object with the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db import repo  # noqa: E402
from db.engine import make_engine, make_sessionmaker, session_scope  # noqa: E402
from db.migrate import upgrade  # noqa: E402
from db.tables import Case, CaseStatus, Priority  # noqa: E402
from medbatch.settings import Settings  # noqa: E402
from models.cases.inference import LoadedModel  # noqa: E402
from models.cases.registry import Registry  # noqa: E402
from models.reference import breast_cancer  # noqa: E402
from worker.app import create_app  # noqa: E402
from worker.broker import embedded_broker_url, shutdown_embedded_brokers  # noqa: E402
from worker.queues import enqueue_cases  # noqa: E402


def _cases(n: int) -> list[dict[str, float]]:
    """n real WDBC cases (the 569 repeated as needed)."""
    split = breast_cancer.split()
    x = np.concatenate([split.x_train, split.x_test])
    return [
        dict(zip(split.feature_names, map(float, x[i % len(x)]), strict=True)) for i in range(n)
    ]


def bench_inference(n: int = 4096, repeats: int = 3) -> dict[str, float]:
    model = LoadedModel(Registry.load().resolve("breast-cancer"), device="cpu")
    cases = _cases(n)
    batch = model.featurize(cases)
    model.predict(batch)  # warm-up
    batched = min(_timed(lambda: model.to_rows(model.predict(batch))) for _ in range(repeats))
    singles = [model.featurize([c]) for c in cases]
    single = min(
        _timed(lambda: [model.to_rows(model.predict(b)) for b in singles]) for _ in range(repeats)
    )
    return {
        "inference_cases": n,
        "inference_batched_cases_per_s": n / batched,
        "inference_single_cases_per_s": n / single,
        "inference_batched_vs_single": single / batched,
    }


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_pipeline(n: int = 1000) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="medbatch-bench-"))
    db_url = f"sqlite:///{tmp / 'bench.sqlite'}"
    upgrade(db_url)
    broker = embedded_broker_url(tmp)
    env = {
        **os.environ,
        "MEDBATCH_DATABASE_URL": db_url,
        "MEDBATCH_BROKER_URL": broker,
        "MEDBATCH_DEVICE": "cpu",
        "MEDBATCH_LOG_LEVEL": "WARNING",
    }
    log = (tmp / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "medbatch.cli", "worker"],
        env=env,
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    app = create_app(Settings(database_url=db_url), broker_url=broker, include_tasks=False)
    results: dict[str, float] = {}
    try:
        # Warm the worker (model load, imports) before timing anything.
        _run(sessions, app, _cases(8), per_message=8, tenant="warm-up", worker=worker)
        for per_message in (64, 1):
            seconds = _run(
                sessions,
                app,
                _cases(n),
                per_message=per_message,
                tenant=f"bench-{per_message}",
                worker=worker,
            )
            results[f"pipeline_{per_message}_per_message_cases_per_s"] = n / seconds
        results["pipeline_cases"] = n
        results["pipeline_64_vs_1_per_message"] = (
            results["pipeline_64_per_message_cases_per_s"]
            / results["pipeline_1_per_message_cases_per_s"]
        )
    finally:
        app.close()
        worker.terminate()
        worker.wait(30)
        engine.dispose()
        shutdown_embedded_brokers()
    return results


def _run(sessions, app, cases, *, per_message: int, tenant: str, worker) -> float:  # type: ignore[no-untyped-def]
    with session_scope(sessions) as s:
        tenant_id = repo.create_tenant(s, name=tenant)[0].id
        new = [
            repo.NewCase(f"{tenant}-{i}", "breast-cancer", "1.0.0", Priority.bulk, c)
            for i, c in enumerate(cases)
        ]
        ids = [a.id for a in repo.add_cases(s, tenant_id=tenant_id, cases=new)]
    start = time.perf_counter()
    enqueue_cases(app, [(i, Priority.bulk) for i in ids], per_message=per_message)
    while True:
        with sessions() as s:
            done = s.scalar(
                select(func.count())
                .select_from(Case)
                .where(Case.tenant_id == tenant_id, Case.status == CaseStatus.done)
            )
        if done == len(ids):
            return time.perf_counter() - start
        if worker.poll() is not None:
            raise RuntimeError("bench worker exited")
        time.sleep(0.05)


def main() -> None:
    figures = bench_inference()
    print(
        f"inference, {figures['inference_cases']} cases on cpu: one batched pass "
        f"{figures['inference_batched_cases_per_s']:,.0f} cases/s, one pass per case "
        f"{figures['inference_single_cases_per_s']:,.0f} cases/s; "
        f"batched vs one-per-case: {figures['inference_batched_vs_single']:.1f}x"
    )
    pipeline = bench_pipeline()
    figures.update(pipeline)
    print(
        f"pipeline, {pipeline['pipeline_cases']:.0f} cases through a real worker (embedded Redis, SQLite): "
        f"64 ids per message {pipeline['pipeline_64_per_message_cases_per_s']:,.0f} cases/s, "
        f"1 id per message {pipeline['pipeline_1_per_message_cases_per_s']:,.0f} cases/s; "
        f"64 vs 1 id per message (both gathered into batches by the worker): {pipeline['pipeline_64_vs_1_per_message']:.1f}x"
    )
    print(json.dumps({k: round(v, 2) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
