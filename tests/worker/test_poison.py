"""One bad case never costs another: a fault at every step that touches a case fails that case
alone, with its reason; a database outage is never blamed on a case (real PostgreSQL)."""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from datetime import timedelta

import psycopg
import pytest
import torch
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from db import explanations, repo
from db.engine import is_outage, make_engine, make_sessionmaker, session_scope
from db.tables import Case, CaseStatus, Priority, Score
from models.cases.inference import LoadedModel, ModelInput, ScoreRow
from models.cases.registry import Registry
from tests.helpers import score_collecting_explanations, wdbc_cases
from worker.tasks import explain as explain_stage
from worker.tasks.explain import explain_cases
from worker.tasks.scoring import save_isolating, score_cases

pytestmark = pytest.mark.integration

SPEC = Registry.load().resolve("breast-cancer")
#: A case whose mean_radius is this is the poison (a value no real case has).
MARK = 12345.5


class FaultyModel(LoadedModel):
    """The real model; at ``step``, the case marked MARK goes wrong the way a poison case can."""

    def __init__(self, step: str) -> None:
        super().__init__(SPEC, device="cpu")
        self.step = step
        self.predictions = 0

    def featurize(self, cases, *, checked=False):  # type: ignore[no-untyped-def]
        if self.step == "featurize" and any(c.get("mean_radius") == MARK for c in cases):
            raise ValueError("cannot featurize")
        return super().featurize(cases, checked=checked)

    def predict(self, batch: ModelInput | torch.Tensor) -> torch.Tensor:
        self.predictions += 1
        assert isinstance(batch, ModelInput)
        marked = batch.values[:, 0] == MARK
        self._marked = marked.tolist()
        if self.step == "forward-raises" and marked.any():
            raise RuntimeError("poisoned input")
        out = super().predict(batch)
        if self.step == "forward-nan":
            out = torch.where(marked, torch.tensor(math.nan), out)
        return out

    def to_rows(self, probabilities: torch.Tensor) -> list[ScoreRow]:
        rows = super().to_rows(probabilities)
        if self.step == "write":
            # The database refuses this row (labels are VARCHAR(50)); nothing in Python does.
            rows = [
                ScoreRow(r.score, "x" * 60) if bad else r
                for r, bad in zip(rows, self._marked, strict=True)
            ]
        return rows


def _explain_patch(step: str) -> Callable:
    real = explain_stage.explain

    def explain(model, batch, *, top_k, n_steps):  # type: ignore[no-untyped-def]
        marked = (batch.values[:, 0] == MARK).tolist()
        if step == "explain-raises" and any(marked):
            raise RuntimeError("attribution failed")
        found = real(model, batch, top_k=top_k, n_steps=n_steps)
        for e, bad in zip(found, marked, strict=True):
            if bad and step == "explain-nan":
                e["top"][0]["attribution"] = -math.inf
            if bad and step == "serialize":
                e["baseline"] = {1, 2}  # a set: JSON has none
        return found

    return explain


REASONS = {
    "featurize": "features could not be prepared for the model (featurize raised)",
    "forward-raises": "model raised RuntimeError",
    "forward-nan": "model produced a non-finite score",
    "write": "the database refused its score row: StringDataRightTruncation",
}
#: Faults of the explain stage: the case keeps its score; only its explanation fails.
EXPLAIN_REASONS = {
    "explain-raises": "explanation failed: RuntimeError",
    "explain-nan": "explanation holds a non-finite number at explanation.top[0].attribution",
    "serialize": "explanation cannot be stored as JSON: TypeError",
}


def _add(sessions: sessionmaker[Session], cases: list[dict]) -> list[int]:
    with session_scope(sessions) as s:
        tenant, _ = repo.create_tenant(s, name=f"t-{cases[0]['external_id']}")
        new = [
            repo.NewCase(
                c["external_id"], "breast-cancer", "1.0.0", Priority.routine, c["features"]
            )
            for c in cases
        ]
        return [a.id for a in repo.add_cases(s, tenant_id=tenant.id, cases=new)]


def _with_a_poison_case(sessions: sessionmaker[Session], step: str) -> tuple[list[dict], list[int]]:
    """32 stored cases (and their ids); the 14th is marked as the poison."""
    cases = wdbc_cases(32, prefix=step)
    cases[13]["features"]["mean_radius"] = MARK
    return cases, _add(sessions, cases)


def _explain(sessions: sessionmaker[Session], ids: list[int], model: LoadedModel):  # type: ignore[no-untyped-def]
    return explain_cases(
        ids,
        sessions=sessions,
        load_model=lambda n, v: model,
        lease=repo.Lease("test:1:poison", timedelta(seconds=30)),
        top_k=3,
    )


@pytest.mark.parametrize("step", sorted(REASONS))
def test_a_poison_case_fails_alone_at_every_step(
    pg_sessions: sessionmaker[Session], step: str
) -> None:
    """32 cases, one poisoned at ``step``: 31 scored (then explained), 1 failed with its reason,
    in a bounded number of forward passes; nothing is dead-lettered."""
    cases, ids = _with_a_poison_case(pg_sessions, step)
    model = FaultyModel(step)
    if step == "write":
        model._marked_score = model.score([cases[13]["features"]])[0].score
    outcome, sent = score_collecting_explanations(
        pg_sessions, ids, lambda n, v: model, explain_top_k=3
    )
    assert outcome.failed == {ids[13]: REASONS[step]}
    assert sorted(outcome.scored) == sorted(set(ids) - {ids[13]})
    assert outcome.dead_letters == []
    assert model.predictions <= 1 + 2 * math.log2(32)
    assert sent == [sorted(set(ids) - {ids[13]})]
    _explain(pg_sessions, sent[0], LoadedModel(SPEC, device="cpu"))
    with pg_sessions() as s:
        scores = s.scalars(select(Score)).all()
        statuses = dict(s.execute(select(Case.id, Case.status)).tuples().all())
        bad = s.get(Case, ids[13])
    assert sorted(sc.case_id for sc in scores) == sorted(set(ids) - {ids[13]})
    assert all(sc.explanation is not None and len(sc.explanation["top"]) == 3 for sc in scores)
    assert statuses[ids[13]] == CaseStatus.failed and bad is not None
    assert bad.last_error == REASONS[step] and not bad.dead_letter
    assert {statuses[i] for i in ids if i != ids[13]} == {CaseStatus.done}


@pytest.mark.parametrize("step", sorted(EXPLAIN_REASONS))
def test_a_poison_explanation_fails_alone_and_keeps_its_score(
    pg_sessions: sessionmaker[Session], step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 cases, one whose attributions go wrong at ``step``: all 32 scored and done, 31
    explanations stored, 1 failed with its reason (its score untouched)."""
    _, ids = _with_a_poison_case(pg_sessions, step)
    model = FaultyModel("none")
    outcome, sent = score_collecting_explanations(
        pg_sessions, ids, lambda n, v: model, explain_top_k=3
    )
    assert sorted(outcome.scored) == ids and outcome.failed == {}
    monkeypatch.setattr(explain_stage, "explain", _explain_patch(step))
    done = _explain(pg_sessions, sent[0], model)
    assert done.failed == {ids[13]: EXPLAIN_REASONS[step]}
    assert done.done == sorted(set(ids) - {ids[13]})
    with pg_sessions() as s:
        scores = {sc.case_id: sc for sc in s.scalars(select(Score))}
        statuses = set(s.scalars(select(Case.status)))
        states = explanations.states(s, case_ids=ids)
    assert sorted(scores) == ids and statuses == {CaseStatus.done}
    assert scores[ids[13]].explanation is None and math.isfinite(scores[ids[13]].score)
    assert states[ids[13]] == explanations.ExplanationState("failed", EXPLAIN_REASONS[step])
    assert {states[i].status for i in ids if i != ids[13]} == {"done"}
    assert all(len(scores[i].explanation["top"]) == 3 for i in ids if i != ids[13])  # type: ignore[index]


def test_rows_the_database_refuses_fail_alone_on_both_databases(
    sessions: sessionmaker[Session],
) -> None:
    """save_isolating splits a refused insert until the bad row is alone (NOT NULL here)."""
    ids = _add(sessions, wdbc_cases(5, prefix="nn"))
    rows = [
        {
            "case_id": i,
            "model_name": "breast-cancer",
            "model_version": "1.0.0",
            "model_sha256": SPEC.sha256,
            "score": None if i == ids[3] else 0.5,
            "label": "benign",
            "shadow": False,
        }
        for i in ids
    ]
    with session_scope(sessions) as s:
        new, refused = save_isolating(s, rows)
    assert new == 4 and list(refused) == [ids[3]]
    assert refused[ids[3]].startswith("the database refused its score row: ")
    with sessions() as s:
        assert sorted(s.scalars(select(Score.case_id))) == sorted(set(ids) - {ids[3]})


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_outage_is_an_outage_and_a_data_error_is_not(pg_url: str) -> None:
    """A refused connection is an outage; a value, integrity or JSON error is the data's."""
    down = make_engine(f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres")
    with pytest.raises(Exception) as refused:
        down.connect().close()
    assert is_outage(refused.value)
    engine = make_engine(pg_url)
    try:
        for statement in (
            "SELECT CAST('Infinity' AS json)",  # PostgreSQL's json has no infinities
            "SELECT CAST('x' AS integer)",
            "INSERT INTO scores (case_id) VALUES (NULL)",
        ):
            with pytest.raises(Exception) as data_error, engine.begin() as conn:
                conn.execute(text(statement))
            assert not is_outage(data_error.value), statement
    finally:
        engine.dispose()
        down.dispose()
    assert not is_outage(ValueError("x"))


def test_scoring_during_an_outage_raises_and_blames_no_case(pg_sessions, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    """With the database gone, score_cases raises an outage and writes nothing on the cases."""
    ids = _add(pg_sessions, wdbc_cases(3, prefix="out"))
    down = make_sessionmaker(
        make_engine(f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres")
    )
    with pytest.raises(Exception) as raised:
        score_cases(ids, sessions=down, load_model=lambda n, v: FaultyModel("none"))
    assert is_outage(raised.value)
    with pg_sessions() as s:
        assert {(c.status, c.delivery_count, c.last_error) for c in s.scalars(select(Case))} == {
            (CaseStatus.queued, 0, None)
        }
    assert psycopg  # the driver the outage came through


def test_a_failed_batch_tells_each_case_the_error_class_only(
    pg_url: str,
    pg_sessions: sessionmaker[Session],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch that failed for neither a case's fault nor an outage wrote the exception's text
    into the last_error of every case in it, whatever its tenant: a database error's text holds
    its statement's parameters (here another tenant's external id), GET /v1/cases shows it;
    the worker's log printed it too."""
    from types import SimpleNamespace

    from medbatch.settings import Settings
    from worker.app import create_app
    from worker.batching import Batcher, _Buffer, _Message
    from worker.context import context

    ids = _add(pg_sessions, wdbc_cases(2, prefix="tenant-a")) + _add(
        pg_sessions, wdbc_cases(2, prefix="tenant-b")
    )
    app = create_app(Settings(database_url=pg_url), broker_url=redis_url, include_tasks=False)
    ctx = context(app)

    class Defective:
        """Claims the batch, then meets a data error naming a patient in its parameters."""

        def start_batch(self, case_ids: list[int], *, queue: str, max_batch_size: int) -> None:
            with session_scope(ctx.sessions) as s:
                repo.claim_cases(s, case_ids=case_ids, max_deliveries=5, lease=ctx.leases.lease)
            with ctx.sessions() as s:
                s.execute(text("SELECT CAST(:v AS integer)"), {"v": "tenant-b-0001"})

    batcher = Batcher(Defective(), app, SimpleNamespace(timer=None, connection_errors=()))
    try:
        requeued: list[bool] = []
        buffer = _Buffer("score.routine", 256, 0.02)
        buffer.messages.append(_Message("m1", ids, ack=lambda: None, reject=requeued.append))
        batcher._score(buffer)
    finally:
        ctx.leases.stop()
        ctx.engine.dispose()
        app.close()
    assert requeued == [True]
    assert "DataError at" in caplog.text and "tenant-b-0001" not in caplog.text
    with pg_sessions() as s:
        errors = s.scalars(select(Case.last_error).where(Case.id.in_(ids))).all()
    assert errors == ["batch failed: DataError (the worker's log says where)"] * 4
