"""The lean tutorial worker, for comparison only: what a competent engineer writes without batching.

One Celery task per case, ``acks_late``, prefetch 1; the same model (loaded once per process, the
same weights and forward pass as medbatch's); per case one transaction: read its features, one
``INSERT ... ON CONFLICT DO NOTHING`` of its score, mark it done. No leases, no batch records, no
explanations. Run by bench/scoring.py as a worker process on the same Redis and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from celery import Celery
from sqlalchemy import create_engine, text

from bench.workloads import NAIVE_QUEUE, NAIVE_TASK
from models.cases.inference import LoadedModel
from models.cases.registry import Registry

app = Celery("naive", broker=os.environ["MEDBATCH_BROKER_URL"])
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
)
engine = create_engine(
    os.environ["MEDBATCH_DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
)
model = LoadedModel(
    Registry.load().resolve(os.environ["MEDBATCH_BENCH_MODEL"]),
    device=os.environ.get("MEDBATCH_DEVICE", "auto"),  # type: ignore[arg-type]
)
model.warm_up()

_UPSERT = text(
    "INSERT INTO scores (case_id, model_name, model_version, model_sha256, score, label, "
    "shadow, created_at) VALUES (:case_id, :name, :version, :sha256, :score, :label, false, "
    "clock_timestamp()) ON CONFLICT (case_id, model_name, model_version) DO NOTHING"
)


@app.task(name=NAIVE_TASK)
def score_one_case(case_id: int) -> None:
    with engine.begin() as conn:
        features = conn.execute(
            text("SELECT features FROM cases WHERE id = :id"), {"id": case_id}
        ).scalar_one()
        if isinstance(features, str):
            features = json.loads(features)
        (row,) = model.to_rows(model.predict(model.featurize([features])))
        conn.execute(
            _UPSERT,
            {
                "case_id": case_id,
                "name": model.spec.name,
                "version": model.spec.version,
                "sha256": model.sha256,
                "score": row.score,
                "label": row.label,
            },
        )
        conn.execute(
            text("UPDATE cases SET status = 'done', updated_at = clock_timestamp() WHERE id = :id"),
            {"id": case_id},
        )


if __name__ == "__main__":
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            f"--queues={NAIVE_QUEUE}",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
        ]
    )
