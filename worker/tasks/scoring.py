"""``medbatch.score_cases``: claim the cases, one forward pass per model, upsert scores, settle."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from celery import Task, shared_task
from celery.exceptions import Reject
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from models.featurize import check_features
from models.registry import ArtifactIntegrityError, RegistryError
from models.scoring import LoadedModel
from worker.app import context
from worker.queues import SCORE_TASK

log = logging.getLogger(__name__)

ModelLoader = Callable[[str, str], LoadedModel]


@dataclass
class Outcome:
    scored: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    new_score_rows: int = 0


@dataclass(frozen=True)
class _Claimed:
    id: int
    model_name: str
    model_version: str
    features: dict


def parse_case_ids(args: Sequence[object]) -> list[int]:
    """The message body is ``[[case_id, ...]]``; anything else is malformed."""
    if len(args) != 1 or not isinstance(args[0], list) or not args[0]:
        raise ValueError("expected one argument: a non-empty list of case ids")
    ids = args[0]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids):
        raise ValueError("case ids must be positive integers")
    return list(dict.fromkeys(ids))


def score_cases(
    case_ids: Sequence[int], *, sessions: sessionmaker[Session], load_model: ModelLoader
) -> Outcome:
    """Score the given cases and persist the outcome; safe to run twice for the same ids."""
    with session_scope(sessions) as session:
        claimed = [
            _Claimed(c.id, c.model_name, c.model_version, dict(c.features))
            for c in repo.claim_cases(session, case_ids=case_ids)
        ]
    outcome = Outcome()
    rows: list[dict] = []
    groups: dict[tuple[str, str], list[_Claimed]] = defaultdict(list)
    for case in claimed:
        groups[(case.model_name, case.model_version)].append(case)
    for (name, version), cases in groups.items():
        try:
            model = load_model(name, version)
        except (RegistryError, ArtifactIntegrityError) as exc:
            outcome.failed.update(
                {c.id: f"model {name}@{version} unavailable: {exc}" for c in cases}
            )
            continue
        ready = []
        for case in cases:
            problems = check_features(model.spec, case.features)
            if problems:
                detail = "; ".join(f"{k}: {v}" for k, v in problems.items())
                outcome.failed[case.id] = f"features do not fit the input schema: {detail}"
            else:
                ready.append(case)
        if not ready:
            continue
        batch = model.featurize([c.features for c in ready])
        probabilities, errors = _predict_isolating(model, [c.id for c in ready], batch)
        outcome.failed.update(errors)
        for case_id, row in probabilities.items():
            rows.append(
                {
                    "case_id": case_id,
                    "model_name": name,
                    "model_version": version,
                    "model_sha256": model.sha256,
                    "score": row.score,
                    "label": row.label,
                }
            )
            outcome.scored.append(case_id)
    with session_scope(sessions) as session:
        outcome.new_score_rows = repo.save_scores(session, rows=rows)
        repo.mark_done(session, case_ids=outcome.scored)
        repo.mark_failed(session, errors=outcome.failed)
    return outcome


def _predict_isolating(model: LoadedModel, ids: list[int], batch: torch.Tensor):
    """One forward pass for the batch; if it raises, split it so a bad case fails alone."""
    try:
        rows = model.to_rows(model.predict(batch))
    except Exception as exc:
        if len(ids) == 1:
            return {}, {ids[0]: f"model raised {type(exc).__name__}: {exc}"}
        mid = len(ids) // 2
        left_rows, left_err = _predict_isolating(model, ids[:mid], batch[:mid])
        right_rows, right_err = _predict_isolating(model, ids[mid:], batch[mid:])
        return {**left_rows, **right_rows}, {**left_err, **right_err}
    scored, errors = {}, {}
    for case_id, row in zip(ids, rows, strict=True):
        if math.isfinite(row.score):
            scored[case_id] = row
        else:
            errors[case_id] = "model produced a non-finite score"
    return scored, errors


class ScoringTask(Task):
    """Thin task: decode ids, call the scoring function with this process's resources."""

    #: The database may blink (failover, restart): retry with backoff, the message is not lost.
    autoretry_for = (OperationalError,)
    retry_backoff = True
    retry_backoff_max = 60
    max_retries = 10


@shared_task(bind=True, base=ScoringTask, name=SCORE_TASK)
def score_cases_task(self: ScoringTask, *args: object) -> dict[str, int]:
    try:
        case_ids = parse_case_ids(args)
    except ValueError as exc:
        # A malformed message names no case we could fail; drop it loudly, never loop on it.
        log.error("rejected malformed %s message %s: %s", SCORE_TASK, self.request.id, exc)
        raise Reject(str(exc), requeue=False) from exc
    ctx = context(self.app)
    outcome = score_cases(case_ids, sessions=ctx.sessions, load_model=ctx.model)
    # Counts and internal ids only: no external ids (they may be MRNs), no feature values.
    log.info(
        "message %s: %d cases, %d scored, %d new score rows, %d failed",
        self.request.id,
        len(case_ids),
        len(outcome.scored),
        outcome.new_score_rows,
        len(outcome.failed),
    )
    return {"scored": len(outcome.scored), "failed": len(outcome.failed)}
