"""``medbatch.score_cases``: claim the cases, one forward pass per model and batch, upsert, settle.

Messages of this task are not run one by one: :class:`worker.batching.Batcher` gathers them per
queue and calls :func:`score_cases` once for all the case ids they carry.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from celery import Task, shared_task
from celery.exceptions import Reject
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import utcnow
from models.explain import explain, explainable
from models.featurize import case_length, check_features
from models.registry import ArtifactIntegrityError, RegistryError
from models.scoring import LoadedModel, ModelInput, ScoreRow
from worker import metrics
from worker.app import context
from worker.queues import SCORE_TASK

log = logging.getLogger(__name__)

ModelLoader = Callable[[str, str], LoadedModel]
ShadowLoader = Callable[[str, str], LoadedModel | None]


@dataclass
class Outcome:
    scored: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    dead_letters: list[int] = field(default_factory=list)
    new_score_rows: int = 0
    forward_passes: int = 0


@dataclass
class _Pass:
    """One forward pass and what it produced, waiting to be written."""

    model: LoadedModel
    size: int
    inference_ms: float
    started: datetime
    rows: list[tuple[int, int, ScoreRow, float | None]]  # (case id, position, row, wait ms)
    explanations: dict[int, dict] = field(default_factory=dict)  # case id -> attributions
    shadow: bool = False


def parse_case_ids(args: Sequence[object]) -> list[int]:
    """The message body is ``[[case_id, ...]]``; anything else is malformed."""
    if len(args) != 1 or not isinstance(args[0], list) or not args[0]:
        raise ValueError("expected one argument: a non-empty list of case ids")
    ids = args[0]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids):
        raise ValueError("case ids must be positive integers")
    return list(dict.fromkeys(ids))


def score_cases(
    case_ids: Sequence[int],
    *,
    sessions: sessionmaker[Session],
    load_model: ModelLoader,
    queue: str = "score.routine",
    max_batch_size: int = 1024,
    max_deliveries: int = 5,
    explain_top_k: int = 0,
    explain_steps: int = 16,
    explain_sequences: bool = False,
    load_shadow: ShadowLoader | None = None,
) -> Outcome:
    """Score the given cases and persist the outcome; safe to run twice for the same ids.

    Cases are grouped by model version and cut into forward passes of at most ``max_batch_size``.
    Where ``load_shadow`` gives a candidate for a version, it scores the same batch too; its rows
    are stored as shadow scores, and its failures cost nothing but its own rows.
    """
    with session_scope(sessions) as session:
        claimed, dead = repo.claim_cases(session, case_ids=case_ids, max_deliveries=max_deliveries)
    outcome = Outcome(dead_letters=dead)
    passes: list[_Pass] = []
    groups: dict[tuple[str, str], list[repo.ClaimedCase]] = defaultdict(list)
    for case in claimed:
        groups[(case.model_name, case.model_version)].append(case)
    for (name, version), cases in groups.items():
        try:
            model = load_model(name, version)
        except (RegistryError, ArtifactIntegrityError) as exc:
            reason = f"model {name}@{version} unavailable: {exc}"
            outcome.failed.update({c.id: reason for c in cases})
            continue
        shadow = load_shadow(name, version) if load_shadow is not None else None
        ready = []
        for case in cases:
            problems = check_features(model.spec, case.features)
            if problems:
                detail = "; ".join(f"{k}: {v}" for k, v in problems.items())
                outcome.failed[case.id] = f"features do not fit the input schema: {detail}"
            else:
                ready.append(case)
        # Bucket by length: neighbours in length share a pass, so padding stays short.
        if model.spec.input_kind != "tabular":
            ready.sort(key=lambda c: case_length(model.spec, c.features))
        for start in range(0, len(ready), max_batch_size):
            chunk = ready[start : start + max_batch_size]
            started = utcnow()
            t0 = time.perf_counter()
            batch = model.featurize([c.features for c in chunk], checked=True)
            counter = [0]
            results, errors = _predict_isolating(model, [c.id for c in chunk], batch, counter)
            inference_ms = (time.perf_counter() - t0) * 1000
            outcome.forward_passes += counter[0]
            outcome.failed.update(errors)
            rows = [
                (c.id, position, results[c.id], _wait_ms(c.enqueued_at, started))
                for position, c in enumerate(chunk)
                if c.id in results
            ]
            explanations = {}
            wanted = model.spec.input_kind == "tabular" or explain_sequences
            if explain_top_k and wanted and explainable(model) and rows:
                explanations = _explain(model, batch, chunk, results, explain_top_k, explain_steps)
            passes.append(_Pass(model, len(chunk), inference_ms, started, rows, explanations))
            if shadow is not None and rows:
                passes.extend(_shadow_pass(shadow, batch, chunk, results))
    with session_scope(sessions) as session:
        score_rows = []
        for p in passes:
            batch_id = repo.add_batch(
                session,
                queue=queue,
                model_name=p.model.spec.name,
                model_version=p.model.spec.version,
                model_sha256=p.model.sha256,
                device=str(p.model.device),
                size=p.size,
                inference_ms=p.inference_ms,
            )
            for case_id, position, row, wait_ms in p.rows:
                score_rows.append(
                    {
                        "case_id": case_id,
                        "model_name": p.model.spec.name,
                        "model_version": p.model.spec.version,
                        "model_sha256": p.model.sha256,
                        "score": row.score,
                        "label": row.label,
                        "batch_id": batch_id,
                        "position": position,
                        "queue_wait_ms": wait_ms,
                        "explanation": p.explanations.get(case_id),
                        "shadow": p.shadow,
                    }
                )
                if not p.shadow:
                    outcome.scored.append(case_id)
        outcome.new_score_rows = repo.save_scores(session, rows=score_rows)
        repo.mark_done(session, case_ids=outcome.scored)
        repo.mark_failed(session, errors=outcome.failed)
    _observe(queue, passes, outcome, claimed)
    return outcome


def _shadow_pass(
    shadow: LoadedModel,
    batch: ModelInput,
    chunk: list[repo.ClaimedCase],
    results: dict[int, ScoreRow],
) -> list[_Pass]:
    """The candidate's scores of the cases the released version scored in this pass."""
    keep = [i for i, c in enumerate(chunk) if c.id in results]
    lengths = None if batch.lengths is None else batch.lengths[keep]
    started = utcnow()
    t0 = time.perf_counter()
    try:
        rows = shadow.to_rows(shadow.predict(ModelInput(batch.values[keep], lengths)))
    except Exception as exc:
        log.warning(
            "shadow %s failed on a pass of %d: %s", shadow.spec.ref, len(keep), type(exc).__name__
        )
        return []
    inference_ms = (time.perf_counter() - t0) * 1000
    scored: list[tuple[int, int, ScoreRow, float | None]] = [
        (chunk[i].id, position, row, None)
        for position, (i, row) in enumerate(zip(keep, rows, strict=True))
        if math.isfinite(row.score)
    ]
    return [_Pass(shadow, len(keep), inference_ms, started, scored, shadow=True)]


def _explain(
    model: LoadedModel,
    batch: ModelInput,
    chunk: list[repo.ClaimedCase],
    results: dict[int, ScoreRow],
    top_k: int,
    steps: int,
) -> dict[int, dict]:
    """Attributions for the scored cases of one pass; a failure costs the explanations only."""
    keep = [i for i, c in enumerate(chunk) if c.id in results]
    try:
        lengths = None if batch.lengths is None else batch.lengths[keep]
        found = explain(model, ModelInput(batch.values[keep], lengths), top_k=top_k, n_steps=steps)
    except Exception as exc:
        log.warning(
            "%s: no explanations for a pass of %d: %s",
            model.spec.ref,
            len(keep),
            type(exc).__name__,
        )
        return {}
    return {chunk[i].id: e for i, e in zip(keep, found, strict=True)}


def _wait_ms(enqueued_at: datetime | None, started: datetime) -> float | None:
    if enqueued_at is None:
        return None
    return max(0.0, (started - enqueued_at).total_seconds() * 1000)


def _predict_isolating(
    model: LoadedModel, ids: list[int], batch: ModelInput, counter: list[int]
) -> tuple[dict[int, ScoreRow], dict[int, str]]:
    """One forward pass for the batch; if it raises, split it in halves until the bad case is
    alone, so every other case is scored (at most 1 + 2·log2(n) passes for one bad case)."""
    counter[0] += 1
    try:
        rows = model.to_rows(model.predict(batch))
    except Exception as exc:
        if len(ids) == 1:
            return {}, {ids[0]: f"model raised {type(exc).__name__}: {exc}"}
        mid = len(ids) // 2
        left_rows, left_err = _predict_isolating(model, ids[:mid], batch[:mid], counter)
        right_rows, right_err = _predict_isolating(model, ids[mid:], batch[mid:], counter)
        return {**left_rows, **right_rows}, {**left_err, **right_err}
    scored, errors = {}, {}
    for case_id, row in zip(ids, rows, strict=True):
        if math.isfinite(row.score):
            scored[case_id] = row
        else:
            errors[case_id] = "model produced a non-finite score"
    return scored, errors


def _observe(
    queue: str, passes: list[_Pass], outcome: Outcome, claimed: list[repo.ClaimedCase]
) -> None:
    for p in passes:
        if p.shadow:
            metrics.SHADOW_SCORED.labels(p.model.spec.ref).inc(len(p.rows))
            continue
        model = p.model.spec.ref
        metrics.BATCH_SIZE.labels(queue, model).observe(p.size)
        metrics.INFERENCE.labels(queue, model).observe(p.inference_ms / 1000)
        metrics.CASES_SCORED.labels(queue, model).inc(len(p.rows))
        for _, _, _, wait_ms in p.rows:
            if wait_ms is not None:
                metrics.QUEUE_WAIT.labels(queue).observe(wait_ms / 1000)
    model_of = {c.id: f"{c.model_name}@{c.model_version}" for c in claimed}
    for case_id in [*outcome.failed, *outcome.dead_letters]:
        metrics.CASES_FAILED.labels(queue, model_of.get(case_id, "unknown")).inc()


class ScoringTask(Task):
    """The scoring task; its messages are gathered into batches by :class:`Batcher`."""

    def Strategy(self, task: Task, app, consumer):
        from worker.batching import Batcher

        return Batcher(task, app, consumer).on_message


@shared_task(bind=True, base=ScoringTask, name=SCORE_TASK)
def score_cases_task(self: ScoringTask, *args: object) -> dict[str, int]:
    """Run directly (``apply``) as one batch of the given ids; workers batch across messages."""
    try:
        case_ids = parse_case_ids(args)
    except ValueError as exc:
        raise Reject(str(exc), requeue=False) from exc
    ctx = context(self.app)
    queue = (self.request.delivery_info or {}).get("routing_key") or "score.routine"
    max_batch_size, _ = ctx.settings.batching(queue)
    outcome = score_cases(
        case_ids,
        sessions=ctx.sessions,
        load_model=ctx.model,
        queue=queue,
        max_batch_size=max_batch_size,
        max_deliveries=ctx.settings.max_deliveries,
        explain_top_k=ctx.settings.explain_top_k,
        explain_steps=ctx.settings.explain_steps,
        explain_sequences=ctx.settings.explain_sequences,
        load_shadow=ctx.shadow,
    )
    return {"scored": len(outcome.scored), "failed": len(outcome.failed)}
