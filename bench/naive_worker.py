"""The tutorial way, for comparison only: one Celery task per case, prefetch 1, no batching.

Run by bench/scoring.py as a worker process; it scores through the same code path as medbatch
(``score_cases``), one case per task and per forward pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from celery import Task

from bench.workloads import NAIVE_QUEUE, NAIVE_TASK
from medbatch.settings import get_settings
from worker.app import create_app
from worker.context import context
from worker.tasks.scoring import score_cases

app = create_app(get_settings())
app.conf.worker_prefetch_multiplier = 1


@app.task(bind=True, name=NAIVE_TASK, acks_late=True)
def score_one_case(self: Task, case_id: int) -> None:
    ctx = context(self.app)
    score_cases(
        [case_id], sessions=ctx.sessions, load_model=ctx.model, queue=NAIVE_QUEUE, max_batch_size=1
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
