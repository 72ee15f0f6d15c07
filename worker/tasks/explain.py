"""``medbatch.explain_cases``: attributions of scores already committed, batched, off the scoring path.

The scoring path commits a case's score (the case is ``done``, its result readable) and, in the
same transaction, a ledger row asking for its attributions (db/explanations.py); after the
commit it sends the case ids to the ``explain`` queue, which a worker reads after every scoring
queue. Here one statement claims a message's cases, the attributions are computed per model in
batches, and one statement settles them.

One bad case never costs another: a case whose features no longer featurize, whose attribution
raises, or whose attributions hold a NaN or an infinity has its explanation ``failed`` with its
reason; its score is untouched. A worker that dies mid-batch leaves its lease to expire, and the
sweeper sends the cases again (worker/sweeper.py); an attempt counter ends a poison case as failed.

A model that cannot be loaded for a reason that may pass (its artifact unreadable or being
copied, the store's registry file missing for a moment) costs its cases an attempt each and no
more: they are given back for the sweeper to send at its next sweep, and fail with the reason
only at their last attempt. One that cannot be loaded for good (an unknown version, an artifact
that steadily fails its check) fails them at once.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from celery import Task, shared_task
from celery.exceptions import Reject
from sqlalchemy.orm import Session, sessionmaker

from db import explanations as ledger
from db.engine import session_scope
from db.leases import Lease
from models.cases.explain import explain, explainable
from models.cases.inference import LoadedModel, ModelInput
from models.cases.registry import ArtifactIntegrityError, RegistryError, RegistryFileError
from models.device import torch_threads
from worker import metrics
from worker.context import ModelFilesChanging, context
from worker.leases import LeaseKeeper
from worker.queues import EXPLAIN_TASK, enqueue_explanations
from worker.tasks.scoring import claim_apart, model_unavailable, parse_case_ids

log = logging.getLogger(__name__)

ModelLoader = Callable[[str, str], LoadedModel]


@dataclass
class ExplainOutcome:
    done: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    #: Cases whose explanation was done, failed or held by another worker: left as they were.
    skipped: int = 0
    #: Cases left for a new message, the time given to this one being spent.
    handed_back: list[int] = field(default_factory=list)
    #: Cases given back because their model could not be loaded for now (case id -> why), for
    #: the sweeper to send again.
    deferred: dict[int, str] = field(default_factory=dict)


#: Cases per attribution pass: a recurrence's backward pass per path step makes a sequence case
#: ~50x a tabular one (bench/scoring.py), so sequences go in small chunks. A chunk is what a
#: STAT case may wait for beyond ``explain_yield_ms``: about 20 ms either way on a 2-core VM.
TABULAR_CHUNK = 32
SEQUENCE_CHUNK = 4

#: Errors loading a model that may pass: the artifact or the registry file unreadable for a
#: moment (OSError: PermissionError, FileNotFoundError, ... while a deploy copies files), a
#: registry file read half-written, an artifact written to while it was hashed.
PASSING_LOAD_ERRORS: tuple[type[Exception], ...] = (OSError, RegistryFileError, ModelFilesChanging)


def chunk_size(model: LoadedModel) -> int:
    return TABULAR_CHUNK if model.spec.input_kind == "tabular" else SEQUENCE_CHUNK


def _explain_chunk(
    model: LoadedModel,
    cases: list[ledger.ClaimedExplanation],
    top_k: int,
    steps: int,
    found: dict[int, tuple[int, dict]],
    failed: dict[int, str],
) -> None:
    """Attributions of one chunk of a model's cases, into ``found`` or ``failed``."""
    batch, cases, unprepared = _featurize_isolating(model, cases)
    failed.update(unprepared)
    if not cases:
        return
    attributions, errors = _explain_isolating(
        model, batch, [c.case_id for c in cases], list(range(len(cases))), top_k, steps
    )
    failed.update(errors)
    for c in cases:
        e = attributions.get(c.case_id)
        if e is None:
            continue
        problem = storable(e)
        if problem is None:
            found[c.case_id] = (c.score_id, e)
        else:
            failed[c.case_id] = problem


def _case_id(claimed: ledger.ClaimedExplanation) -> int:
    return claimed.case_id


def explain_cases(
    case_ids: Sequence[int],
    *,
    sessions: sessionmaker[Session],
    load_model: ModelLoader,
    reload_model: ModelLoader | None = None,
    lease: Lease | None = None,
    keeper: LeaseKeeper | None = None,
    top_k: int = 5,
    steps: int = 16,
    max_deliveries: int = 5,
    yield_after_s: float | None = None,
    send_rest: Callable[[list[int]], object] | None = None,
) -> ExplainOutcome:
    """Compute and store the attributions of the given cases' scores; safe to run twice.

    The rows are claimed with ``keeper``'s lease, renewed while the message runs (or with
    ``lease``, not renewed). Cases are explained in chunks (:func:`chunk_size`); once
    ``yield_after_s`` has passed, the cases left are handed back and given to ``send_rest`` (a
    new explain message) instead.

    ``reload_model`` (the worker context's ``reloaded``) gives a model as its files are now: it
    is asked when a score's sha256 is not the loaded model's, or when ``load_model`` found the
    version unknown or its artifact broken, before the explanation fails for that (this
    worker's copy may be older than the score). A model that cannot be loaded for now
    (:data:`PASSING_LOAD_ERRORS`) has its cases given back, until their ``max_deliveries``-th
    attempt fails them with the reason.

    A case attempted before without finishing (its worker died explaining it: perhaps killed by
    that very case) is claimed and explained alone, after the others, leased meanwhile (or the
    sweeper would send it again while it waits): an explanation that kills its worker then costs
    no other one an attempt. Those still waiting when the time is spent are handed back too, a
    message each."""
    lease = keeper.lease if keeper is not None else lease
    if lease is None:
        raise TypeError("explain_cases needs a lease or a keeper")
    started = time.monotonic()
    with session_scope(sessions) as session:
        claim = partial(
            ledger.claim_explanations, session, max_deliveries=max_deliveries, lease=lease
        )
        unfinished = partial(ledger.attempted_unfinished, session, owner=lease.owner)
        claimed, dead, _, suspects = claim_apart(case_ids, claim, unfinished, id_of=_case_id)
        # Those whose worker died are still ``running`` under its lapsed lease: leased to this
        # worker while they wait their turn, or the sweeper sends them again.
        suspects = ledger.hold_explanations(session, case_ids=suspects, lease=lease)
    if keeper is not None:
        keeper.hold_explanations(suspects)
    try:
        outcome = ExplainOutcome(skipped=len(case_ids) - len(claimed) - len(dead) - len(suspects))
        outcome.failed.update(
            {i: "explanation attempted too often without finishing" for i in dead}
        )
        # Counted here, not with the claimed (a message whose every case its claim ended
        # failed computes nothing): a poison explanation, tried alone at the end, is one.
        metrics.EXPLANATIONS.labels("failed").inc(len(dead))
        common: dict[str, Any] = {
            "sessions": sessions,
            "load_model": load_model,
            "reload_model": reload_model,
            "lease": lease,
            "keeper": keeper,
            "top_k": top_k,
            "steps": steps,
            "yield_after_s": yield_after_s,
            "send_rest": send_rest,
        }
        if claimed:
            _explain_claimed(claimed, dead, outcome, max_deliveries=max_deliveries, **common)
        for n, case_id in enumerate(suspects):
            worked = bool(claimed) or n > 0
            spent = yield_after_s is not None and time.monotonic() - started > yield_after_s
            if worked and spent:
                # The time is spent: the rest wait in messages of their own (one case each, so
                # none waits behind another suspect), at the back of the explain queue.
                _hand_back_suspects(suspects[n:], sessions, lease, send_rest)
                outcome.handed_back += suspects[n:]
                break
            part = explain_cases([case_id], max_deliveries=max_deliveries, **common)
            outcome.done += part.done
            outcome.failed.update(part.failed)
            outcome.skipped += part.skipped
            outcome.handed_back += part.handed_back
            outcome.deferred.update(part.deferred)
    finally:
        if keeper is not None:
            keeper.drop_explanations(suspects)
    return outcome


def _hand_back_suspects(
    case_ids: list[int],
    sessions: sessionmaker[Session],
    lease: Lease,
    send_rest: Callable[[list[int]], object] | None,
) -> None:
    """Give back the suspects this worker held unexplained (their attempts as they were) and
    send each in a message of its own; if that fails, the sweeper sends them."""
    with session_scope(sessions) as session:
        ledger.hand_back_held(session, case_ids=case_ids, owner=lease.owner)
    if send_rest is None:
        return
    try:
        for case_id in case_ids:
            send_rest([case_id])
    except Exception as exc:
        log.warning("could not send back %d explanations: %s", len(case_ids), exc)
        with session_scope(sessions) as session:
            ledger.mark_unsent(session, case_ids=case_ids)


def model_changed(name: str, version: str) -> str:
    """Why a case's explanation is not computed: its model's artifact is no longer the one that
    made its score (its sha256 differs from the score's)."""
    return (
        f"model {name}@{version} changed since the score: its artifact's sha256 is not the "
        "score's, and attributions of other weights would not explain this score"
    )


def passing_load_error(name: str, version: str, exc: Exception) -> str:
    """Why ``name@version`` could not be loaded for now, naming no server path (an OSError's
    message and a registry file's error name the file: they go to the log only)."""
    if isinstance(exc, ModelFilesChanging):
        return f"model {name}@{version} could not be loaded: {exc.reason}"
    if isinstance(exc, RegistryFileError):
        return f"model {name}@{version} could not be loaded: the model registry could not be read"
    return f"model {name}@{version} could not be loaded: {type(exc).__name__}"


def _explain_claimed(
    claimed: list[ledger.ClaimedExplanation],
    dead: list[int],
    outcome: ExplainOutcome,
    *,
    sessions: sessionmaker[Session],
    load_model: ModelLoader,
    reload_model: ModelLoader | None,
    lease: Lease,
    keeper: LeaseKeeper | None,
    top_k: int,
    steps: int,
    max_deliveries: int,
    yield_after_s: float | None,
    send_rest: Callable[[list[int]], object] | None,
) -> None:
    """The attributions of the rows a claim took, stored (into ``outcome``); their leases are
    renewed meanwhile (``keeper``)."""
    held = [c.case_id for c in claimed]
    if keeper is not None:
        keeper.hold_explanations(held)
    try:
        loaders = _Loaders(load_model, reload_model)
        found = _compute(claimed, outcome, loaders, top_k, steps, max_deliveries, yield_after_s)
        with session_scope(sessions) as session:
            # The dead are settled by the claim already; settling them again changes nothing.
            ledger.settle_explanations(
                session,
                done=found,
                failed={k: v for k, v in outcome.failed.items() if k not in dead},
            )
            if outcome.handed_back:
                ledger.release_explanations(
                    session, case_ids=outcome.handed_back, owner=lease.owner, resend=True
                )
            ledger.defer_explanations(session, reasons=outcome.deferred, owner=lease.owner)
    finally:
        if keeper is not None:
            keeper.drop_explanations(held)
    if outcome.handed_back and send_rest is not None:
        try:
            send_rest(outcome.handed_back)
        except Exception as exc:
            log.warning("could not send back %d explanations: %s", len(outcome.handed_back), exc)
            with session_scope(sessions) as session:
                ledger.mark_unsent(session, case_ids=outcome.handed_back)
    outcome.done = sorted(found)
    metrics.EXPLANATIONS.labels("done").inc(len(found))
    # Those the claim ended failed are counted by explain_cases.
    metrics.EXPLANATIONS.labels("failed").inc(len(set(outcome.failed).difference(dead)))


@dataclass(frozen=True)
class _Loaders:
    load: ModelLoader
    #: The model as its files are now (None: ``load``'s copy is taken as current).
    reload: ModelLoader | None

    def model(self, name: str, version: str, *, fresh: bool) -> LoadedModel:
        """``name@version``: as loaded before, unless ``fresh``; asked again as its files are
        now when the copy loaded before does not know the version or failed its check (this
        worker may have read the registry or the artifact before they were re-published)."""
        if fresh and self.reload is not None:
            return self.reload(name, version)
        try:
            return self.load(name, version)
        except ModelFilesChanging:
            raise
        except (RegistryError, ArtifactIntegrityError):
            if self.reload is None:
                raise
            return self.reload(name, version)


def _compute(
    claimed: list[ledger.ClaimedExplanation],
    outcome: ExplainOutcome,
    loaders: _Loaders,
    top_k: int,
    steps: int,
    max_deliveries: int,
    yield_after_s: float | None,
) -> dict[int, tuple[int, dict]]:
    """The attributions of the claimed cases, per model in chunks, until the time is spent
    (what is left goes to ``outcome.handed_back``); each case's failure goes to ``outcome``,
    and those whose model could not be loaded for now to ``outcome.deferred``."""
    found: dict[int, tuple[int, dict]] = {}
    groups: dict[tuple[str, str], list[ledger.ClaimedExplanation]] = defaultdict(list)
    for c in claimed:
        groups[(c.model_name, c.model_version)].append(c)
    started = time.monotonic()
    # (model, its cases, whether the model is to be taken as its files are now)
    todo = [(key, cases, False) for key, cases in groups.items()]
    while todo:
        (name, version), cases, fresh = todo.pop(0)
        try:
            model = loaders.model(name, version, fresh=fresh)
        except PASSING_LOAD_ERRORS as exc:
            log.warning("model %s@%s not loaded for explanations, for now: %r", name, version, exc)
            reason = passing_load_error(name, version, exc)
            for c in cases:
                if c.attempts >= max_deliveries:
                    outcome.failed[c.case_id] = f"{reason} (at each of {c.attempts} attempts)"
                else:
                    outcome.deferred[c.case_id] = reason
            continue
        except (RegistryError, ArtifactIntegrityError) as exc:
            reason = model_unavailable(name, version, exc)
            outcome.failed.update({c.case_id: reason for c in cases})
            continue
        except Exception as exc:
            # Anything else loading raised (an artifact this torch cannot read) is the model's,
            # not the cases': raised, the message would be sent again and again, its cases
            # tried alone one a round, until each was "attempted too often".
            log.error("model %s@%s not loaded for explanations: %r", name, version, exc)
            reason = f"model {name}@{version} could not be loaded: {type(exc).__name__}"
            outcome.failed.update({c.case_id: reason for c in cases})
            continue
        if not explainable(model):
            outcome.failed.update(
                {c.case_id: f"{model.spec.ref} has no attributions" for c in cases}
            )
            continue
        # Scored by other weights than these. This worker's copy may be the stale one (the
        # artifact was re-published in place and another worker scored with the new one): the
        # model is asked for again as its files are now, once the cases of this copy are done
        # (it may replace the copy). Failed only when the files now are not the score's either:
        # attributions of other weights would explain another model's score.
        changed = [c for c in cases if c.model_sha256 != model.sha256]
        if changed:
            if fresh or loaders.reload is None:
                outcome.failed.update({c.case_id: model_changed(name, version) for c in changed})
            else:
                todo.append(((name, version), changed, True))
            cases = [c for c in cases if c.model_sha256 == model.sha256]
            if not cases:
                continue
        size = chunk_size(model)
        chunk, rest = cases[:size], cases[size:]
        if rest:
            todo.insert(0, ((name, version), rest, fresh))
        _explain_chunk(model, chunk, top_k, steps, found, outcome.failed)
        if todo and yield_after_s is not None and time.monotonic() - started > yield_after_s:
            # Long enough: hand the rest back (as a new message, at the back of the explain
            # queue), so a scoring message never waits behind more than one such stretch.
            outcome.handed_back = [c.case_id for _, left, _ in todo for c in left]
            break
    return found


def _featurize_isolating(
    model: LoadedModel, cases: list[ledger.ClaimedExplanation]
) -> tuple[ModelInput, list[ledger.ClaimedExplanation], dict[int, str]]:
    """The batch of the cases that featurize (all at once or, if that raises, each alone)."""
    try:
        return model.featurize([c.features for c in cases], checked=True), cases, {}
    except Exception:
        good, bad = [], {}
        for c in cases:
            try:
                model.featurize([c.features], checked=True)
            except Exception:
                bad[c.case_id] = "features could not be prepared for the model (featurize raised)"
                continue
            good.append(c)
        if not good:
            return ModelInput(torch.empty(0)), [], bad
        return model.featurize([c.features for c in good], checked=True), good, bad


def _explain_isolating(
    model: LoadedModel,
    batch: ModelInput,
    ids: list[int],
    rows: list[int],
    top_k: int,
    steps: int,
) -> tuple[dict[int, dict], dict[int, str]]:
    """Attributions of ``rows`` of ``batch``: all at once or, if that raises, split in halves
    until the case it raises on is alone."""
    try:
        lengths = None if batch.lengths is None else batch.lengths[rows]
        found = explain(model, ModelInput(batch.values[rows], lengths), top_k=top_k, n_steps=steps)
    except Exception as exc:
        if len(ids) == 1:
            log.warning("%s: no explanation for one case: %s", model.spec.ref, type(exc).__name__)
            return {}, {ids[0]: f"explanation failed: {type(exc).__name__}"}
        mid = len(ids) // 2
        left, left_err = _explain_isolating(model, batch, ids[:mid], rows[:mid], top_k, steps)
        right, right_err = _explain_isolating(model, batch, ids[mid:], rows[mid:], top_k, steps)
        return {**left, **right}, {**left_err, **right_err}
    return dict(zip(ids, found, strict=True)), {}


def storable(explanation: dict) -> str | None:
    """Why these attributions cannot be stored as they are (a NaN or an infinity, or JSON that
    fails), or None."""
    where = non_finite(explanation)
    if where is not None:
        return f"explanation holds a non-finite number at {where}"
    try:
        json.dumps(explanation, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"explanation cannot be stored as JSON: {type(exc).__name__}"
    return None


def non_finite(value: object, path: str = "explanation") -> str | None:
    """Where ``value`` holds a NaN or an infinity (a path such as ``explanation.top[2].value``)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            if (found := non_finite(item, f"{path}.{key}")) is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if (found := non_finite(item, f"{path}[{i}]")) is not None:
                return found
    return None


@shared_task(bind=True, name=EXPLAIN_TASK)
def explain_cases_task(self: Task, *args: object) -> dict[str, int]:
    """One explain message: the attributions of its cases, as one batch per model."""
    try:
        case_ids = parse_case_ids(args)
    except ValueError as exc:
        raise Reject(str(exc), requeue=False) from exc
    ctx = context(self.app)
    try:
        with torch_threads(ctx.settings.torch_threads):
            outcome = explain_cases(
                case_ids,
                sessions=ctx.sessions,
                # A retired version's scores stand: their attributions are still computed.
                load_model=ctx.loaded,
                reload_model=ctx.reloaded,
                keeper=ctx.leases,
                top_k=max(1, ctx.settings.explain_top_k),
                steps=ctx.settings.explain_steps,
                max_deliveries=ctx.settings.max_deliveries,
                yield_after_s=ctx.settings.explain_yield_ms / 1000,
                # What is handed back goes in messages of one chunk each: never claimed twice.
                send_rest=lambda ids: enqueue_explanations(
                    self.app, ids, per_message=SEQUENCE_CHUNK
                ),
            )
    except Exception as exc:
        # The database is away (or a defect): the cases' leases, no longer renewed, expire,
        # then the sweeper sends them again; the attempt counter stops a loop.
        log.warning("explain batch of %d cases failed: %s", len(case_ids), type(exc).__name__)
        return {"done": 0, "failed": 0}
    log.info(
        "explain: %d cases, %d explained, %d failed, %d settled as they were, %d handed back, "
        "%d given back until their model loads",
        len(case_ids),
        len(outcome.done),
        len(outcome.failed),
        outcome.skipped,
        len(outcome.handed_back),
        len(outcome.deferred),
    )
    return {"done": len(outcome.done), "failed": len(outcome.failed)}
