"""``medbatch.score_cases``: claim the cases, one forward pass per model and batch, upsert, settle.

Messages of this task are not run one by one: :class:`worker.batching.Batcher` gathers them per
queue and calls :func:`score_cases` once for all the case ids they carry.

One bad case never costs another: every step that touches a case (its features, the forward
pass, its serialization, its row in the database) is isolated, and a failure or a non-finite
number there is that case's failure, with its reason. Only a database outage fails the batch
(:func:`db.engine.is_outage`); the batcher then hands it back.

Attributions are not computed here: the transaction that stores a score also asks for its
explanation (db/explanations.py), and once it commits the case ids go to the ``explain`` queue
(worker/tasks/explain.py), which a worker reads after every scoring queue.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import torch
from celery import Task, shared_task
from celery.exceptions import Reject
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from db import explanations, repo
from db.engine import is_outage, session_scope
from db.tables import Batch, utcnow
from models.cases.explain import explainable
from models.cases.featurize import case_length, check_features
from models.cases.inference import LoadedModel, ModelInput, ModelOutputError, ScoreRow
from models.cases.registry import ArtifactIntegrityError, RegistryError
from models.device import torch_threads
from worker import metrics
from worker.batching import raised_at
from worker.context import context
from worker.leases import LeaseKeeper
from worker.queues import SCORE_TASK, enqueue_explanations, send_or_leave

log = logging.getLogger(__name__)

ModelLoader = Callable[[str, str], LoadedModel]
ShadowLoader = Callable[[str, str], LoadedModel | None]
C = TypeVar("C")


@dataclass
class Outcome:
    scored: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    dead_letters: list[int] = field(default_factory=list)
    #: Cases of the messages that were done, failed or held by another worker: settled as they
    #: were, without a forward pass.
    skipped: int = 0
    new_score_rows: int = 0
    forward_passes: int = 0
    #: Scored cases whose explanation was asked for in the batch's transaction (to send).
    to_explain: list[int] = field(default_factory=list)


@dataclass
class _Pass:
    """One forward pass and what it produced, waiting to be written."""

    model: LoadedModel
    size: int
    inference_ms: float
    started: datetime
    rows: list[tuple[int, int, ScoreRow, float | None]]  # (case id, position, row, wait ms)
    #: Its cases' attributions are wanted (computed later by the explain stage).
    explain: bool = False
    shadow: bool = False


def explain_sender(app: Any) -> Callable[[list[int]], object]:
    """Sends committed cases' ids to the explain queue, ``explain_max_batch_size`` a message."""
    per_message = context(app).settings.explain_max_batch_size
    return lambda case_ids: enqueue_explanations(app, case_ids, per_message=per_message)


def model_unavailable(name: str, version: str, exc: RegistryError | ArtifactIntegrityError) -> str:
    """Why a case's model could not be loaded, as the API shows it: the registry's reason, or
    that its artifact failed the check, never the artifact's path on this server (docs/security.md)."""
    if isinstance(exc, ArtifactIntegrityError):
        # The worker's context raises the same error again, without hashing, until the
        # artifact changes (worker/context.py): logged once, not at every batch.
        if not exc.logged:
            log.error("model %s@%s unavailable: %s", name, version, exc)  # the path: log only
            exc.logged = True
        return f"model {name}@{version} unavailable: {exc.reason}"
    return f"model {name}@{version} unavailable: {exc}"


def parse_case_ids(args: Sequence[object]) -> list[int]:
    """The message body is ``[[case_id, ...]]``; anything else is malformed."""
    if len(args) != 1 or not isinstance(args[0], list) or not args[0]:
        raise ValueError("expected one argument: a non-empty list of case ids")
    ids = args[0]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids):
        raise ValueError("case ids must be positive integers")
    return list(dict.fromkeys(ids))


def claim_apart(
    ids: Sequence[int],
    claim: Callable[..., tuple[list[C], list[int]]],
    unfinished: Callable[..., list[int]],
    *,
    id_of: Callable[[C], int],
) -> tuple[list[C], list[int], list[int], list[int]]:
    """Claim a message's rows (cases, explanations) with ``claim``, of first tries only when
    there is more than one, and find the suspects apart: of the ids the claim left, those
    ``unfinished`` says were tried before and never finished (their worker died holding them:
    perhaps killed by them), for the caller to take one at a time after the others. Returns
    what was claimed, the ids that became dead letters, the ids left and the suspects."""
    # The suspects are found by the claim itself (it leaves them): nothing more on the hot path.
    first_only = len(ids) > 1
    claimed, dead = claim(case_ids=ids, first_only=first_only)
    left: list[int] = []
    suspects: list[int] = []
    if first_only and len(claimed) + len(dead) < len(ids):
        taken = {id_of(c) for c in claimed}.union(dead)
        left = [i for i in ids if i not in taken]
        suspects = unfinished(case_ids=left)
    return claimed, dead, left, suspects


def _id(case: repo.ClaimedCase) -> int:
    return case.id


def score_cases(case_ids: Sequence[int], **options: Any) -> Outcome:
    """Score the given cases and persist the outcome; safe to run twice for the same ids.

    :func:`start_cases` (claim, forward passes), then the write and the rest, in this thread.
    """
    return start_cases(case_ids, **options).finish()


def start_cases(
    case_ids: Sequence[int],
    *,
    sessions: sessionmaker[Session],
    load_model: ModelLoader,
    queue: str = "score.routine",
    max_batch_size: int = 1024,
    max_deliveries: int = 5,
    explain_top_k: int = 0,
    explain_sequences: bool = True,
    load_shadow: ShadowLoader | None = None,
    keeper: LeaseKeeper | None = None,
    send_explanations: Callable[[list[int]], object] | None = None,
) -> Scored:
    """Claim the given cases and run their forward passes; the returned :class:`Scored` writes
    them. Safe to run twice for the same ids.

    One statement claims the batch (with ``keeper``'s lease, renewed until the batch is
    written) and one settles it. Cases are grouped by model version and cut into forward passes
    of at most ``max_batch_size``. Where ``load_shadow`` gives a candidate for a version, it
    scores the same batch too; its rows are stored as shadow scores, and its failures cost
    nothing but its own rows.

    With ``explain_top_k`` > 0, the write's transaction asks for the attributions of each
    scored case of an explainable model; after the commit ``send_explanations`` gets their ids
    (if it fails, or there is none, they wait for the sweeper).

    A case delivered before without finishing (its worker died holding it: perhaps killed by
    that very case) is claimed and scored alone, after the others, each leased meanwhile: a
    case that kills its worker then costs no other case a delivery, and ends a dead letter
    alone after ``max_deliveries``. Such a batch is written whole before this returns.
    """
    lease = keeper.lease if keeper is not None else None
    owner = lease.owner if lease is not None else None
    with session_scope(sessions) as session:
        claim = partial(repo.claim_cases, session, max_deliveries=max_deliveries, lease=lease)
        unfinished = partial(repo.delivered_unfinished, session, owner=owner)
        claimed, dead, left, suspects = claim_apart(case_ids, claim, unfinished, id_of=_id)
        if suspects and lease is not None:
            # Those whose worker died are still ``running``: leased too, or the sweeper
            # sends them again (another delivery counted) while they wait their turn.
            repo.hold_cases(session, case_ids=suspects, lease=lease, stranded=True)
    common: dict[str, Any] = {
        "sessions": sessions,
        "load_model": load_model,
        "queue": queue,
        "max_batch_size": max_batch_size,
        "explain_top_k": explain_top_k,
        "explain_sequences": explain_sequences,
        "load_shadow": load_shadow,
        "keeper": keeper,
        "send_explanations": send_explanations,
    }
    if suspects:
        rest = Outcome(dead_letters=dead, skipped=len(left) - len(suspects))
        outcome = _alone_after_the_rest(
            lambda: _begin(claimed, rest, **common).finish(),
            partial(score_cases, max_deliveries=max_deliveries, **common),
            suspects,
            keeper,
        )
        return Scored(outcome, queue=queue, observed=True)
    outcome = Outcome(dead_letters=dead, skipped=len(case_ids) - len(claimed) - len(dead))
    return _begin(claimed, outcome, **common)


@dataclass
class Scored:
    """A batch claimed and through its forward passes, not yet written.

    :meth:`write` inserts the score rows and settles every case in one transaction; it touches
    the database only, so another thread may run it (the batcher writes one batch while the
    worker's thread claims and scores the next: docs/scoring-path.md). :meth:`finish` then
    sends the explain messages and counts the batch, in the worker's thread."""

    outcome: Outcome
    claimed: list[repo.ClaimedCase] = field(default_factory=list)
    passes: list[_Pass] = field(default_factory=list)
    sessions: sessionmaker[Session] | None = None
    queue: str = "score.routine"
    keeper: LeaseKeeper | None = None
    send_explanations: Callable[[list[int]], object] | None = None
    #: Already sent and counted (a batch scored whole by :func:`start_cases`).
    observed: bool = False
    written: bool = False

    @property
    def to_write(self) -> bool:
        return bool(self.claimed) and not self.written

    def write(self) -> None:
        """Store the batch (once). If it raises, its cases' leases are no longer renewed."""
        if not self.to_write:
            return
        assert self.sessions is not None
        try:
            _write(self.sessions, self.passes, self.outcome, queue=self.queue)
        except BaseException:
            self._drop_leases()
            raise
        self.written = True

    def finish(self) -> Outcome:
        """Write (if not yet written), then send the explain messages and count the batch."""
        try:
            self.write()
        finally:
            self._drop_leases()
        if self.observed:
            return self.outcome
        self.observed = True
        if self.send_explanations is not None and self.outcome.to_explain:
            assert self.sessions is not None
            _send_explanations(self.sessions, self.send_explanations, self.outcome.to_explain)
        _observe(self.queue, self.passes, self.outcome, self.claimed)
        return self.outcome

    def _drop_leases(self) -> None:
        if self.keeper is not None and self.claimed:
            self.keeper.drop([c.id for c in self.claimed])


def _begin(
    claimed: list[repo.ClaimedCase],
    outcome: Outcome,
    *,
    sessions: sessionmaker[Session],
    load_model: ModelLoader,
    queue: str,
    max_batch_size: int,
    explain_top_k: int,
    explain_sequences: bool,
    load_shadow: ShadowLoader | None,
    keeper: LeaseKeeper | None,
    send_explanations: Callable[[list[int]], object] | None,
) -> Scored:
    """The forward passes of the cases a claim took, their leases renewed until written."""
    if not claimed:
        return Scored(outcome, queue=queue)
    held = [c.id for c in claimed]
    if keeper is not None:
        keeper.hold(held)
    try:
        passes = _compute(
            claimed,
            outcome,
            load_model=load_model,
            max_batch_size=max_batch_size,
            explain=explain_top_k > 0,
            explain_sequences=explain_sequences,
            load_shadow=load_shadow,
        )
    except BaseException:
        if keeper is not None:
            keeper.drop(held)
        raise
    return Scored(outcome, claimed, passes, sessions, queue, keeper, send_explanations)


def _alone_after_the_rest(
    rest: Callable[[], Outcome],
    score: Callable[[list[int]], Outcome],
    suspects: list[int],
    keeper: LeaseKeeper | None,
) -> Outcome:
    """Score the claimed rest of a batch, then each suspect alone (in the order given), renewing
    the suspects' leases while they wait."""
    if keeper is not None:
        keeper.hold(suspects)
    try:
        outcome = rest()
        for case_id in suspects:
            part = score([case_id])
            outcome.scored += part.scored
            outcome.failed.update(part.failed)
            outcome.dead_letters += part.dead_letters
            outcome.skipped += part.skipped
            outcome.new_score_rows += part.new_score_rows
            outcome.forward_passes += part.forward_passes
            outcome.to_explain += part.to_explain
    finally:
        if keeper is not None:
            keeper.drop(suspects)
    return outcome


def _send_explanations(
    sessions: sessionmaker[Session], send: Callable[[list[int]], object], case_ids: list[int]
) -> None:
    """Send the explain messages; if the broker is away, mark them unsent for the sweeper (the
    scores are committed whatever happens here)."""
    send_or_leave(
        lambda: send(case_ids),
        sessions,
        explanations.mark_unsent,
        case_ids,
        what="explain messages",
    )


def _compute(
    claimed: list[repo.ClaimedCase],
    outcome: Outcome,
    *,
    load_model: ModelLoader,
    max_batch_size: int,
    explain: bool,
    explain_sequences: bool,
    load_shadow: ShadowLoader | None,
) -> list[_Pass]:
    """The forward passes of the claimed cases; each case's failure goes to ``outcome``."""
    passes: list[_Pass] = []
    groups: dict[tuple[str, str], list[repo.ClaimedCase]] = defaultdict(list)
    for case in claimed:
        groups[(case.model_name, case.model_version)].append(case)
    for (name, version), cases in groups.items():
        try:
            model = load_model(name, version)
        except (RegistryError, ArtifactIntegrityError) as exc:
            reason = model_unavailable(name, version, exc)
            outcome.failed.update({c.id: reason for c in cases})
            continue
        shadow = load_shadow(name, version) if load_shadow is not None else None
        ready = []
        for case in cases:
            problem = _feature_problem(model, case)
            if problem is None:
                ready.append(case)
            else:
                outcome.failed[case.id] = problem
        # Bucket by length: neighbours in length share a pass, so padding stays short.
        if model.spec.input_kind != "tabular":
            ready.sort(key=lambda c: case_length(model.spec, c.features))
        for start in range(0, len(ready), max_batch_size):
            started = utcnow()
            t0 = time.perf_counter()
            chunk, batch = _featurize_isolating(model, ready[start : start + max_batch_size])
            for case_id, reason in _featurize_errors(ready[start : start + max_batch_size], chunk):
                outcome.failed[case_id] = reason
            if not chunk:
                continue
            counter = [0]
            results, errors = _predict_isolating(model, [c.id for c in chunk], batch, counter)
            inference_ms = (time.perf_counter() - t0) * 1000
            outcome.forward_passes += counter[0]
            outcome.failed.update(errors)
            for case_id, reason in _unserializable(results).items():
                outcome.failed[case_id] = reason
                results.pop(case_id, None)
            rows = [
                (c.id, position, results[c.id], _wait_ms(c.enqueued_at, started))
                for position, c in enumerate(chunk)
                if c.id in results
            ]
            wanted = explain and explainable(model)
            wanted = wanted and (model.spec.input_kind == "tabular" or explain_sequences)
            passes.append(_Pass(model, len(chunk), inference_ms, started, rows, explain=wanted))
            if shadow is not None and rows:
                passes.extend(_shadow_pass(shadow, batch, chunk, results))
    return passes


def _feature_problem(model: LoadedModel, case: repo.ClaimedCase) -> str | None:
    try:
        problems = check_features(model.spec, case.features)
    except Exception as exc:
        return f"features could not be checked: {type(exc).__name__}"
    if not problems:
        return None
    detail = "; ".join(f"{k}: {v}" for k, v in problems.items())
    return f"features do not fit the input schema: {detail}"


def _featurize_isolating(
    model: LoadedModel, cases: list[repo.ClaimedCase]
) -> tuple[list[repo.ClaimedCase], ModelInput]:
    """The cases that featurize, and their batch: all at once, or, if that raises, each alone
    to find the ones that cannot (then the others together)."""
    try:
        return cases, model.featurize([c.features for c in cases], checked=True)
    except Exception:
        good = []
        for case in cases:
            try:
                model.featurize([case.features], checked=True)
            except Exception:
                continue
            good.append(case)
        if not good:
            return [], ModelInput(torch.empty(0))
        return good, model.featurize([c.features for c in good], checked=True)


def _featurize_errors(
    cases: list[repo.ClaimedCase], featurized: list[repo.ClaimedCase]
) -> list[tuple[int, str]]:
    kept = {c.id for c in featurized}
    return [
        (c.id, "features could not be prepared for the model (featurize raised)")
        for c in cases
        if c.id not in kept
    ]


def _unserializable(results: dict[int, ScoreRow]) -> dict[int, str]:
    """Cases whose score cannot be stored as it is (a non-finite number)."""
    return {
        case_id: "model produced a non-finite score"
        for case_id, row in results.items()
        if not (isinstance(row.score, float) and math.isfinite(row.score))
    }


def _write(
    sessions: sessionmaker[Session], passes: list[_Pass], outcome: Outcome, *, queue: str
) -> None:
    """Record the passes, insert their score rows and settle every case, in one transaction.
    A row the database refuses fails its case alone (its reason names the error, not the value).

    The score rows go in with one statement and no savepoint first (two round trips fewer a
    batch); only if the database refuses that statement for a data error is the transaction
    rolled back and written again, the rows then inserted halves by halves under savepoints."""
    failed = dict(outcome.failed)
    try:
        _write_once(sessions, passes, outcome, queue=queue, isolate=False)
    except DBAPIError as exc:
        if is_outage(exc):
            raise
        outcome.failed, outcome.scored, outcome.to_explain = failed, [], []
        _write_once(sessions, passes, outcome, queue=queue, isolate=True)


def _write_once(
    sessions: sessionmaker[Session],
    passes: list[_Pass],
    outcome: Outcome,
    *,
    queue: str,
    isolate: bool,
) -> None:
    with session_scope(sessions) as session:
        score_rows: list[dict[str, Any]] = []
        for p in passes:
            batch = Batch(
                queue=queue,
                model_name=p.model.spec.name,
                model_version=p.model.spec.version,
                model_sha256=p.model.sha256,
                device=str(p.model.device),
                size=p.size,
                inference_ms=p.inference_ms,
            )
            batch_id = repo.add_batch(session, batch)
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
                        "explanation": None,
                        "shadow": p.shadow,
                    }
                )
        wanted = {case_id for p in passes if p.explain for case_id, *_ in p.rows}
        asked: list[int] | None = None
        if isolate:
            outcome.new_score_rows, refused = save_isolating(session, score_rows)
        else:
            asking = [
                r["case_id"] for r in score_rows if not r["shadow"] and r["case_id"] in wanted
            ]
            outcome.new_score_rows, asked = explanations.save_scores_asking(
                session, rows=score_rows, case_ids=asking
            )
            refused = {}
        for stored in score_rows:
            case_id = int(stored["case_id"])
            if stored["shadow"]:
                continue
            if case_id in refused:
                outcome.failed[case_id] = refused[case_id]
            else:
                outcome.scored.append(case_id)
        repo.settle_cases(session, done=outcome.scored, failed=outcome.failed)
        if asked is None:  # rows were refused: ledger rows for the scores that went in
            scored = [case_id for case_id in outcome.scored if case_id in wanted]
            asked = explanations.request_explanations(session, case_ids=scored)
        outcome.to_explain = asked


def save_isolating(session: Session, rows: list[dict]) -> tuple[int, dict[int, str]]:
    """Insert score rows; if the database refuses the lot (a data error, not an outage), split
    them in halves until each refused row is alone. Returns the new rows and, for each refused
    released-model row, its case's reason (a refused shadow row is dropped, nothing more)."""
    if not rows:
        return 0, {}
    try:
        with session.begin_nested():
            return repo.save_scores(session, rows=rows), {}
    except DBAPIError as exc:
        if is_outage(exc):
            raise
        if len(rows) == 1:
            if rows[0]["shadow"]:
                return 0, {}
            kind = type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__
            return 0, {rows[0]["case_id"]: f"the database refused its score row: {kind}"}
    mid = len(rows) // 2
    new_left, refused_left = save_isolating(session, rows[:mid])
    new_right, refused_right = save_isolating(session, rows[mid:])
    return new_left + new_right, {**refused_left, **refused_right}


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
            return {}, {ids[0]: _model_failure(model, exc)}
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


def _model_failure(model: LoadedModel, exc: Exception) -> str:
    """A case's error when its forward pass raised, as the API shows it: medbatch's own check of
    the answer says what it found; a model's exception is named by its class, not its text,
    which may quote the values it choked on (the log says where it was raised)."""
    if isinstance(exc, ModelOutputError):
        return f"model raised {type(exc).__name__}: {exc}"
    log.warning(
        "%s raised %s on one case at %s", model.spec.ref, type(exc).__name__, raised_at(exc)
    )
    return f"model raised {type(exc).__name__}"


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
    """The scoring task; its messages are gathered into batches by :class:`Batcher`, which runs
    them through :meth:`score_batch` (the pipeline's options are read from the context here only)."""

    def Strategy(self, task: Task, app, consumer):
        from worker.batching import Batcher

        return Batcher(task, app, consumer).on_message

    @staticmethod
    def parse_ids(args: Sequence[object]) -> list[int]:
        return parse_case_ids(args)

    def start_batch(self, case_ids: list[int], *, queue: str, max_batch_size: int) -> Scored:
        """Claim and score one batch with this process's models, leases and settings; the
        returned :class:`Scored` writes it."""
        ctx = context(self.app)
        with torch_threads(ctx.settings.torch_threads):
            return start_cases(
                case_ids,
                sessions=ctx.sessions,
                load_model=ctx.model,
                queue=queue,
                max_batch_size=max_batch_size,
                max_deliveries=ctx.settings.max_deliveries,
                explain_top_k=ctx.settings.explain_top_k,
                explain_sequences=ctx.settings.explain_sequences,
                load_shadow=ctx.shadow,
                keeper=ctx.leases,
                send_explanations=explain_sender(self.app),
            )

    def score_batch(self, case_ids: list[int], *, queue: str, max_batch_size: int) -> Outcome:
        """One batch, written before this returns."""
        return self.start_batch(case_ids, queue=queue, max_batch_size=max_batch_size).finish()


@shared_task(bind=True, base=ScoringTask, name=SCORE_TASK)
def score_cases_task(self: ScoringTask, *args: object) -> dict[str, int]:
    """Run directly (``apply``) as one batch of the given ids; workers batch across messages."""
    try:
        case_ids = parse_case_ids(args)
    except ValueError as exc:
        raise Reject(str(exc), requeue=False) from exc
    queue = (self.request.delivery_info or {}).get("routing_key") or "score.routine"
    max_batch_size, _ = context(self.app).settings.batching(queue)
    outcome = self.score_batch(case_ids, queue=queue, max_batch_size=max_batch_size)
    return {"scored": len(outcome.scored), "failed": len(outcome.failed)}
