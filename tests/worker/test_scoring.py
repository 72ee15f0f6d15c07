"""The scoring function and the sweeper, on the real PostgreSQL and the real Redis."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import explanations, repo
from db.engine import session_scope
from db.tables import Batch, Case, CaseStatus, Explanation, Priority, Score
from medbatch.settings import Settings
from models.cases.inference import LoadedModel, ModelInput
from models.cases.registry import Registry
from tests.helpers import register_breast_cancer, score_collecting_explanations, wdbc_cases
from worker.context import WorkerContext
from worker.tasks.explain import explain_cases
from worker.tasks.scoring import parse_case_ids, score_cases

pytestmark = pytest.mark.integration

SPEC = Registry.load().resolve("breast-cancer")


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return LoadedModel(SPEC, device="cpu")


def _add(
    sessions: sessionmaker[Session], cases: list[dict], *, version: str = "1.0.0"
) -> list[int]:
    with session_scope(sessions) as s:
        tenant, _ = repo.create_tenant(s, name=f"t-{cases[0]['external_id']}")
        new = [
            repo.NewCase(
                c["external_id"], "breast-cancer", version, Priority(c["priority"]), c["features"]
            )
            for c in cases
        ]
        return [a.id for a in repo.add_cases(s, tenant_id=tenant.id, cases=new)]


@pytest.fixture(scope="module")
def gru() -> LoadedModel:
    return LoadedModel(Registry.load().resolve("vitals-gru"), device="cpu")


def _add_series(sessions: sessionmaker[Session], series: list[dict], *, tenant: str) -> list[int]:
    """vitals-gru cases, one per series, for a new tenant (external ids ``{tenant}-{i}``)."""
    with session_scope(sessions) as s:
        tenant_id = repo.create_tenant(s, name=tenant)[0].id
        new = [
            repo.NewCase(f"{tenant}-{i}", "vitals-gru", "0.1.0", Priority.routine, f)
            for i, f in enumerate(series)
        ]
        return [a.id for a in repo.add_cases(s, tenant_id=tenant_id, cases=new)]


def _loader(model: LoadedModel):  # type: ignore[no-untyped-def]
    def load(name: str, version: str) -> LoadedModel:
        return (
            LoadedModel(Registry.load().resolve(f"{name}@{version}"), device="cpu")
            if ((name, version) != (model.spec.name, model.spec.version))
            else model
        )

    return load


def test_scores_are_the_models_output_with_provenance(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """Each case gets one score row equal to the model's output, with name, version and sha256."""
    cases = wdbc_cases(20)
    ids = _add(pg_sessions, cases)
    outcome = score_cases(ids, sessions=pg_sessions, load_model=_loader(model))
    assert sorted(outcome.scored) == ids and outcome.failed == {}
    expected = model.score([c["features"] for c in cases])
    with pg_sessions() as s:
        scores = {r.case_id: r for r in s.scalars(select(Score))}
        statuses = set(s.scalars(select(Case.status)))
    assert statuses == {CaseStatus.done}
    for case_id, row in zip(ids, expected, strict=True):
        stored = scores[case_id]
        assert stored.score == pytest.approx(row.score, abs=1e-12)
        assert stored.label == row.label
        assert (stored.model_name, stored.model_version, stored.model_sha256) == (
            "breast-cancer",
            "1.0.0",
            SPEC.sha256,
        )


def test_each_score_records_its_forward_pass(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """Cases are cut into passes of at most max_batch_size; each score names its batch,
    position, queue wait; each batch its size, device, sha256 and inference time."""
    ids = _add(pg_sessions, wdbc_cases(20))
    outcome = score_cases(
        ids, sessions=pg_sessions, load_model=_loader(model), queue="score.bulk", max_batch_size=8
    )
    assert outcome.forward_passes == 3
    with pg_sessions() as s:
        batches = s.scalars(select(Batch).order_by(Batch.id)).all()
        scores = s.scalars(select(Score).order_by(Score.case_id)).all()
    assert [b.size for b in batches] == [8, 8, 4]
    assert {(b.queue, b.device, b.model_sha256) for b in batches} == {
        ("score.bulk", "cpu", SPEC.sha256)
    }
    assert all(b.inference_ms > 0 for b in batches)
    assert [(sc.batch_id, sc.position) for sc in scores] == [
        (batches[i // 8].id, i % 8) for i in range(20)
    ]
    assert all(sc.queue_wait_ms is not None and sc.queue_wait_ms >= 0 for sc in scores)


def test_a_redelivered_message_for_done_cases_is_settled_without_a_forward_pass(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """The second delivery of done cases claims nothing, runs no pass and adds no row."""
    ids = _add(pg_sessions, wdbc_cases(5))
    first = score_cases(ids, sessions=pg_sessions, load_model=_loader(model))
    second = score_cases(ids, sessions=pg_sessions, load_model=_loader(model))
    assert (first.new_score_rows, first.forward_passes) == (5, 1)
    assert (second.new_score_rows, second.forward_passes, second.skipped) == (0, 0, 5)
    with pg_sessions() as s:
        assert len(s.scalars(select(Score)).all()) == 5
        assert set(s.scalars(select(Case.delivery_count))) == {1}
        assert set(s.scalars(select(Case.status))) == {CaseStatus.done}


def test_two_workers_scoring_the_same_cases_write_one_row_each(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """A worker whose lease ran out and the one that took over both finish: one row per case."""
    ids = _add(pg_sessions, wdbc_cases(4))
    with session_scope(pg_sessions) as s:
        repo.claim_cases(
            s, case_ids=ids, max_deliveries=5, lease=repo.Lease("gone", timedelta(seconds=-1))
        )
    score_cases(ids, sessions=pg_sessions, load_model=_loader(model))
    with session_scope(pg_sessions) as s:
        repo.settle_cases(s, done=ids)  # the first worker settles late
    with pg_sessions() as s:
        assert len(s.scalars(select(Score)).all()) == 4
        assert set(s.scalars(select(Case.status))) == {CaseStatus.done}


def test_a_case_that_does_not_fit_fails_alone_with_its_reason(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """Features stored wrong (bypassing the API) fail that case, naming the feature; others score."""
    cases = wdbc_cases(4)
    del cases[2]["features"]["mean_texture"]
    ids = _add(pg_sessions, cases)
    outcome = score_cases(ids, sessions=pg_sessions, load_model=_loader(model))
    assert sorted(outcome.scored) == [ids[0], ids[1], ids[3]]
    with pg_sessions() as s:
        bad = s.get(Case, ids[2])
    assert bad is not None and bad.status == CaseStatus.failed
    assert bad.last_error == "features do not fit the input schema: mean_texture: missing feature"


def test_an_unavailable_model_version_fails_its_cases_readably(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """A case accepted for a version that is gone fails with the registry's reason."""
    ids = _add(pg_sessions, wdbc_cases(2), version="0.9.0")
    outcome = score_cases(ids, sessions=pg_sessions, load_model=_loader(model))
    assert outcome.scored == []
    with pg_sessions() as s:
        errors = set(s.scalars(select(Case.last_error)))
    assert errors == {
        "model breast-cancer@0.9.0 unavailable: unknown model version 'breast-cancer@0.9.0' "
        "(known versions: breast-cancer@1.0.0)"
    }


def test_a_missing_artifact_fails_its_cases_without_naming_the_server_path(
    pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The reason, shown by GET /v1/cases to the tenant, was the registry's error with the
    artifact's path on the server in it."""
    import dataclasses

    gone = tmp_path / "server-only" / "breast-cancer-1.0.0.safetensors"
    spec = dataclasses.replace(Registry.load().resolve("breast-cancer"), artifact=gone)
    ids = _add(pg_sessions, wdbc_cases(2))
    outcome = score_cases(
        ids, sessions=pg_sessions, load_model=lambda n, v: LoadedModel(spec, device="cpu")
    )
    assert outcome.scored == []
    with pg_sessions() as s:
        errors = set(s.scalars(select(Case.last_error)))
    assert errors == {
        "model breast-cancer@1.0.0 unavailable: breast-cancer@1.0.0: its artifact does not exist"
    }


def test_a_broken_artifact_fails_scores_and_explanations_without_its_server_path(
    pg_sessions: sessionmaker[Session], model: LoadedModel, tmp_path: Path
) -> None:
    """A model whose artifact is gone (on the scoring worker, or on the explaining one after the
    score) fails its cases and explanations with a reason that names no server path."""
    import dataclasses

    def broken(name: str, version: str) -> LoadedModel:
        gone = tmp_path / "models" / "breast-cancer-1.0.0.pt"
        return LoadedModel(dataclasses.replace(SPEC, artifact=gone), device="cpu")

    expected = (
        "model breast-cancer@1.0.0 unavailable: breast-cancer@1.0.0: its artifact does not exist"
    )
    failing = _add(pg_sessions, wdbc_cases(2, prefix="gone"))
    score_cases(failing, sessions=pg_sessions, load_model=broken)
    ids = _add(pg_sessions, wdbc_cases(2, prefix="later"))
    _, sent = score_collecting_explanations(pg_sessions, ids, _loader(model), explain_top_k=2)
    outcome = explain_cases(
        sent[0],
        sessions=pg_sessions,
        load_model=broken,
        lease=repo.Lease("test:1:explain", timedelta(seconds=30)),
    )
    assert outcome.failed == {i: expected for i in ids}
    with pg_sessions() as s:
        assert set(s.scalars(select(Case.last_error).where(Case.id.in_(failing)))) == {expected}
        assert {e.error for e in explanations.states(s, case_ids=ids).values()} == {expected}


def test_an_artifact_changed_on_disk_fails_its_cases_naming_no_server_path(
    pg_sessions: sessionmaker[Session], model: LoadedModel, tmp_path: Path
) -> None:
    """Clients read a case's last_error: the sha256 check is said there, the file's path is not."""
    artifact = tmp_path / "store" / "models" / "breast-cancer-1.0.0.safetensors"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(SPEC.artifact.read_bytes() + b"\0")
    spec = dataclasses.replace(SPEC, artifact=artifact)
    ids = _add(pg_sessions, wdbc_cases(2, prefix="changed"))
    outcome = score_cases(
        ids, sessions=pg_sessions, load_model=lambda *_: LoadedModel(spec, device="cpu")
    )
    assert outcome.scored == [] and sorted(outcome.failed) == ids
    with pg_sessions() as s:
        errors = set(s.scalars(select(Case.last_error).where(Case.id.in_(ids))))
    assert len(errors) == 1
    (error,) = errors
    assert error.startswith("model breast-cancer@1.0.0 unavailable: breast-cancer@1.0.0: its ")
    assert f"the registry expects {SPEC.sha256}" in error
    assert str(tmp_path) not in error and "/" not in error

    # Scored before the file changed, explained after: the explanation's error says it alike.
    scored = _add(pg_sessions, wdbc_cases(2, prefix="explained"))
    _, sent = score_collecting_explanations(pg_sessions, scored, _loader(model), explain_top_k=1)
    explained = explain_cases(
        sent[0],
        sessions=pg_sessions,
        load_model=lambda *_: LoadedModel(spec, device="cpu"),
        lease=repo.Lease("test:1:explain", timedelta(seconds=30)),
    )
    assert sorted(explained.failed) == scored
    assert all("/" not in e and "its artifact has sha256" in e for e in explained.failed.values())


def test_cases_queued_for_a_version_retired_since_fail_saying_so(
    pg_url: str, pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A worker started after a version was retired scores nothing more with it."""
    store = tmp_path / "store"
    register_breast_cancer(store, "0.9.0", status="retired")
    ids = _add(pg_sessions, wdbc_cases(2, prefix="retired"), version="0.9.0")
    ctx = WorkerContext(Settings(database_url=pg_url, artifact_dir=store, device="cpu"))
    outcome = score_cases(ids, sessions=pg_sessions, load_model=ctx.model)
    assert outcome.scored == [] and set(outcome.failed.values()) == {
        "model breast-cancer@0.9.0 unavailable: model version 'breast-cancer@0.9.0' is retired "
        "(versions in use: breast-cancer@1.0.0)"
    }


def test_a_version_retired_after_it_scored_still_gets_its_attributions(
    pg_url: str, pg_sessions: sessionmaker[Session], redis_url: str, tmp_path: Path
) -> None:
    """Retiring a version stops its new cases, not the attributions of the scores it gave (they
    stand, and stay readable): the explain task of a worker started after the retirement failed
    them with 'model ... unavailable: ... is retired'."""
    from models.cases.registry import load_registry
    from worker.app import create_app
    from worker.queues import EXPLAIN_TASK

    store = tmp_path / "store"
    register_breast_cancer(store, "0.9.0", status="retired")
    ids = _add(pg_sessions, wdbc_cases(3, prefix="retired-x"), version="0.9.0")
    before = LoadedModel(load_registry(store).resolve("breast-cancer@0.9.0"), device="cpu")
    _, sent = score_collecting_explanations(pg_sessions, ids, lambda n, v: before, explain_top_k=2)
    settings = Settings(database_url=pg_url, artifact_dir=store, device="cpu", explain_top_k=2)
    app = create_app(settings, broker_url=redis_url)
    assert app.tasks[EXPLAIN_TASK].run(sent[0]) == {"done": 3, "failed": 0}
    with pg_sessions() as s:
        states = explanations.states(s, case_ids=ids)
    assert {e.status for e in states.values()} == {"done"} and len(states) == 3


class PoisonedModel(LoadedModel):
    """The real model, made to raise on any batch holding the marked case (a crafted poison)."""

    MARK = -1.0

    def __init__(self) -> None:
        super().__init__(SPEC, device="cpu")
        self.calls = 0

    def predict(self, batch: ModelInput | torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert isinstance(batch, ModelInput)
        if (batch.values[:, 0] == self.MARK).any():
            # As models' errors often do, it quotes the value it choked on.
            raise RuntimeError(f"poisoned input: mean_radius={self.MARK}")
        return super().predict(batch)


def test_a_case_whose_worker_died_is_leased_while_it_waits_to_be_scored_alone(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """A case whose worker died holding it is still ``running`` under that worker's expired
    lease: while the rest of its batch is scored it must be leased to this worker (as the
    docstring of score_cases says), or the sweeper takes it as stranded and sends it again,
    counting another delivery towards its dead letter."""
    from datetime import UTC, datetime

    from worker.leases import LeaseKeeper

    ids = _add(pg_sessions, wdbc_cases(4, prefix="held"))
    with session_scope(pg_sessions) as s:  # its worker died holding it
        s.execute(
            update(Case)
            .where(Case.id == ids[1])
            .values(
                status=CaseStatus.running,
                delivery_count=1,
                lease_owner="dead-worker:1",
                lease_expires_at=datetime(2020, 1, 1, tzinfo=UTC),
            )
        )
    keeper = LeaseKeeper(pg_sessions, ttl_s=60)
    seen: list[str | None] = []

    def load(name: str, version: str) -> LoadedModel:
        if not seen:  # the rest's batch: the suspect waits
            with pg_sessions() as s:
                seen.append(s.get(Case, ids[1]).lease_owner)  # type: ignore[union-attr]
        return model

    try:
        outcome = score_cases(ids, sessions=pg_sessions, load_model=load, keeper=keeper)
    finally:
        keeper.stop()
    assert seen == [keeper.owner]
    assert sorted(outcome.scored) == ids and outcome.failed == {}


def test_a_case_another_live_worker_scores_costs_the_batch_no_claim_of_its_own(
    pg_sessions: sessionmaker[Session], model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A redelivered message whose case another worker is scoring (``running`` under its live
    lease, delivered before): the case was taken for one that died and claimed alone, a second
    claim transaction that could only skip it. One claim for the batch, the case skipped."""
    from datetime import UTC, datetime

    from worker.leases import LeaseKeeper

    ids = _add(pg_sessions, wdbc_cases(3, prefix="busy"))
    with session_scope(pg_sessions) as s:  # another worker holds it, alive
        s.execute(
            update(Case)
            .where(Case.id == ids[1])
            .values(
                status=CaseStatus.running,
                delivery_count=1,
                lease_owner="live-worker:1",
                lease_expires_at=datetime(2999, 1, 1, tzinfo=UTC),
            )
        )
    claims: list[list[int]] = []
    claim = repo.claim_cases

    def counted(session: Session, **kw: Any) -> Any:
        claims.append(list(kw["case_ids"]))
        return claim(session, **kw)

    monkeypatch.setattr(repo, "claim_cases", counted)
    keeper = LeaseKeeper(pg_sessions, ttl_s=60)
    try:
        outcome = score_cases(
            ids, sessions=pg_sessions, load_model=lambda n, v: model, keeper=keeper
        )
    finally:
        keeper.stop()
    assert claims == [ids]
    assert sorted(outcome.scored) == [ids[0], ids[2]] and outcome.skipped == 1
    with pg_sessions() as s:
        held = s.get(Case, ids[1])
        assert held is not None and (held.status, held.delivery_count) == (CaseStatus.running, 1)
        assert held.lease_owner == "live-worker:1"


def test_a_poisoned_case_fails_alone_in_few_forward_passes(
    pg_sessions: sessionmaker[Session],
) -> None:
    """64 cases, one of which makes the model raise: 63 scores, 1 failure, ≤ 1 + 2·log2(64) passes.
    The case's error names the exception's class, never its text (which quotes the value)."""
    cases = wdbc_cases(64)
    cases[37]["features"]["mean_radius"] = PoisonedModel.MARK
    ids = _add(pg_sessions, cases)
    poisoned = PoisonedModel()
    outcome = score_cases(ids, sessions=pg_sessions, load_model=lambda n, v: poisoned)
    assert len(outcome.scored) == 63
    assert outcome.failed == {ids[37]: "model raised RuntimeError"}
    assert poisoned.calls <= 1 + 2 * math.log2(64)


class KillingModel(LoadedModel):
    """The real model, made to end the process (as a segfault or an OOM kill would) on any batch
    holding the marked case."""

    def predict(self, batch: ModelInput | torch.Tensor) -> torch.Tensor:
        assert isinstance(batch, ModelInput)
        if (batch.values[:, 0] == PoisonedModel.MARK).any():
            raise SystemExit("killed")
        return super().predict(batch)


def test_a_case_whose_worker_died_is_scored_alone_after_the_others(
    pg_sessions: sessionmaker[Session],
) -> None:
    """A case delivered before without finishing that kills the process again costs the other
    cases of its batch no delivery: they are scored first, and it ends alone."""
    cases = wdbc_cases(6)
    cases[2]["features"]["mean_radius"] = PoisonedModel.MARK
    ids = _add(pg_sessions, cases)
    with session_scope(pg_sessions) as s:  # as if its worker had died holding it once
        s.execute(update(Case).where(Case.id == ids[2]).values(delivery_count=1))
    killing = KillingModel(SPEC, device="cpu")
    with pytest.raises(SystemExit):
        score_cases(ids, sessions=pg_sessions, load_model=lambda n, v: killing)
    with pg_sessions() as s:
        rows = {c.id: (c.status, c.delivery_count) for c in s.scalars(select(Case))}
    assert rows.pop(ids[2]) == (CaseStatus.running, 2)
    assert set(rows.values()) == {(CaseStatus.done, 1)}


@pytest.mark.parametrize(
    "args",
    [(), ([],), ("1,2",), ([1, "2"],), ([0],), ([True],), ([1], [2]), ({"ids": [1]},)],
)
def test_malformed_messages_are_refused(args: tuple) -> None:
    """A task message must carry one non-empty list of positive integer ids."""
    with pytest.raises(ValueError):
        parse_case_ids(args)


def test_parse_keeps_order_and_drops_repeats() -> None:
    """Repeated ids in one message are scored once."""
    assert parse_case_ids(([3, 1, 3, 2],)) == [3, 1, 2]


def test_sequence_cases_are_bucketed_by_length_and_scored_as_alone(
    pg_sessions: sessionmaker[Session], gru: LoadedModel
) -> None:
    """vitals-gru cases of mixed lengths: passes hold neighbours in length, scores equal alone."""
    from bench.workloads import vitals_series

    series = vitals_series(24, seed=9, min_length=1)
    ids = _add_series(pg_sessions, series, tenant="icu")
    outcome = score_cases(ids, sessions=pg_sessions, load_model=lambda n, v: gru, max_batch_size=8)
    assert len(outcome.scored) == 24 and outcome.forward_passes == 3
    lengths = {case_id: len(f["heart_rate"]) for case_id, f in zip(ids, series, strict=True)}
    with pg_sessions() as s:
        scores = s.scalars(select(Score)).all()
    by_batch: dict[int, list[int]] = {}
    for sc in scores:
        by_batch.setdefault(sc.batch_id, []).append(lengths[sc.case_id])  # type: ignore[arg-type]
    spans = sorted((min(v), max(v)) for v in by_batch.values())
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # buckets do not overlap
    alone = {case_id: gru.score([f])[0].score for case_id, f in zip(ids, series, strict=True)}
    for sc in scores:
        assert sc.score == pytest.approx(alone[sc.case_id], abs=1e-5)


def _explain_all(sessions: sessionmaker[Session], ids: list[int], model: LoadedModel, k: int):  # type: ignore[no-untyped-def]
    return explain_cases(
        ids,
        sessions=sessions,
        load_model=lambda n, v: model,
        lease=repo.Lease("test:1:explain", timedelta(seconds=30)),
        top_k=k,
    )


def test_the_score_commits_before_its_explanation_on_both_databases(
    sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """Scoring stores the score and a pending explanation; the explain stage then stores each
    case's top-k attributions (PostgreSQL, SQLite)."""
    ids = _add(sessions, wdbc_cases(6))
    outcome, sent = score_collecting_explanations(sessions, ids, _loader(model), explain_top_k=3)
    assert sorted(outcome.scored) == ids and sent == [ids]
    with sessions() as s:
        stored = s.scalars(select(Score).order_by(Score.case_id)).all()
        assert {c.status for c in s.scalars(select(Case))} == {CaseStatus.done}
        assert {i: e.status for i, e in explanations.states(s, case_ids=ids).items()} == {
            i: "pending" for i in ids
        }
    assert len(stored) == 6 and all(sc.explanation is None for sc in stored)
    done = _explain_all(sessions, sent[0], model, 3)
    assert done.done == ids and done.failed == {}
    with sessions() as s:
        stored = s.scalars(select(Score).order_by(Score.case_id)).all()
        assert {e.status for e in explanations.states(s, case_ids=ids).values()} == {"done"}
    for sc in stored:
        assert sc.explanation is not None
        assert sc.explanation["method"] == "integrated_gradients"
        assert len(sc.explanation["top"]) == 3
        assert {a["feature"] for a in sc.explanation["top"]} <= set(SPEC.feature_names)
    # A second delivery of the same message changes nothing.
    again = _explain_all(sessions, sent[0], model, 3)
    assert again.done == [] and again.skipped == 6


def test_a_settled_explanation_moves_its_case_into_a_since_query(
    sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """A client that follows GET /v1/scores?since= learns when the attributions come (or fail):
    settling an explanation updates its case's updated_at (PostgreSQL, SQLite)."""
    from db.tables import utcnow

    ids = _add(sessions, wdbc_cases(4, prefix="since"))
    _, sent = score_collecting_explanations(sessions, ids, _loader(model), explain_top_k=2)
    with session_scope(sessions) as s:
        tenant_id = s.scalars(select(Case.tenant_id).where(Case.id == ids[0])).one()
        s.execute(update(Case).where(Case.id == ids[3]).values(features={"mean_radius": "x"}))
    scored_by = utcnow()

    def since() -> dict[int, str]:
        with sessions() as s:
            rows = repo.list_results(s, tenant_id=tenant_id, since=scored_by)
            states = explanations.states(s, case_ids=[c.id for c, _ in rows])
            return {c.id: states[c.id].status for c, _ in rows}

    assert since() == {}
    outcome = _explain_all(sessions, sent[0], model, 2)
    assert outcome.done == ids[:3] and list(outcome.failed) == [ids[3]]
    assert since() == {**{i: "done" for i in ids[:3]}, ids[3]: "failed"}


def test_no_explanation_is_asked_for_with_top_k_zero(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """explain_top_k=0: scores only, no ledger row, nothing sent."""
    ids = _add(pg_sessions, wdbc_cases(3, prefix="zero"))
    _, sent = score_collecting_explanations(pg_sessions, ids, _loader(model))
    with pg_sessions() as s:
        assert explanations.states(s, case_ids=ids) == {}
    assert sent == []


@pytest.mark.parametrize("explain_sequences", [False, True])
def test_sequence_explanations_follow_their_setting(
    pg_sessions: sessionmaker[Session], gru: LoadedModel, explain_sequences: bool
) -> None:
    """Series models get attributions (channels and steps) unless explain_sequences is off."""
    from bench.workloads import vitals_series

    series = vitals_series(6, seed=1, min_length=2)
    ids = _add_series(pg_sessions, series, tenant="icu")
    _, sent = score_collecting_explanations(
        pg_sessions, ids, _loader(gru), explain_top_k=2, explain_sequences=explain_sequences
    )
    if sent:
        _explain_all(pg_sessions, sent[0], gru, 2)
    with pg_sessions() as s:
        stored = s.scalars(select(Score).order_by(Score.case_id)).all()
    assert len(stored) == 6
    assert bool(sent) == explain_sequences
    for sc, features in zip(stored, series, strict=True):
        if not explain_sequences:
            assert sc.explanation is None
            continue
        assert sc.explanation is not None
        assert {a["feature"] for a in sc.explanation["top"]} <= set(features)
        assert len(sc.explanation["top_steps"]) == 2
        assert all(
            0 <= t["step"] < len(features["heart_rate"]) for t in sc.explanation["top_steps"]
        )


def test_a_long_explain_message_hands_the_rest_back_in_chunks(
    pg_sessions: sessionmaker[Session], gru: LoadedModel
) -> None:
    """Past its time, an explain message stores the chunk it finished and hands the rest back
    (queued, attempt uncounted, for a new message); explaining those finishes the job."""
    from bench.workloads import vitals_series
    from worker.tasks.explain import SEQUENCE_CHUNK as chunk

    ids = _add_series(pg_sessions, vitals_series(20, seed=2, min_length=2), tenant="icu-yield")
    _, sent = score_collecting_explanations(pg_sessions, ids, _loader(gru), explain_top_k=2)
    rest: list[list[int]] = []
    lease = repo.Lease("test:1:yield", timedelta(seconds=30))
    first = explain_cases(
        sent[0],
        sessions=pg_sessions,
        load_model=lambda n, v: gru,
        lease=lease,
        top_k=2,
        yield_after_s=0.0,
        send_rest=rest.append,
    )
    assert len(first.done) == chunk and first.handed_back == ids[chunk:] and rest == [ids[chunk:]]
    with pg_sessions() as s:
        states = explanations.states(s, case_ids=ids)
        attempts = set(
            s.scalars(select(Explanation.attempts).where(Explanation.case_id.in_(ids[chunk:])))
        )
    assert {states[i].status for i in ids[:chunk]} == {"done"}
    assert {states[i].status for i in ids[chunk:]} == {"pending"} and attempts == {0}
    second = explain_cases(
        rest[0], sessions=pg_sessions, load_model=lambda n, v: gru, lease=lease, top_k=2
    )
    assert second.done == ids[chunk:] and second.handed_back == []


_WARM_UP = """
import sys
from medbatch.settings import Settings
from worker.context import WorkerContext

settings = Settings(
    database_url="sqlite:///unused.sqlite",
    artifact_dir=sys.argv[1],
    device="cpu",
    explain_top_k=int(sys.argv[2]),
)
assert "captum" not in sys.modules
WorkerContext(settings).warm_up()
print("captum" in sys.modules)
"""


@pytest.mark.parametrize(("top_k", "warmed"), [(5, True), (0, False)])
def test_a_worker_asked_for_attributions_warms_its_explainer_before_the_first_message(
    tmp_path: Path, top_k: int, warmed: bool
) -> None:
    """The explain stage's first batch would otherwise import Captum (and matplotlib with it,
    about a second) while the cases behind it wait; a worker that explains nothing never
    imports it."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _WARM_UP, str(tmp_path / "store"), str(top_k)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == str(warmed)


class KillingFeaturizer(LoadedModel):
    """The real model, made to end the process (as a segfault would) when it prepares the
    marked case's features for its attributions."""

    def featurize(self, cases, *, checked: bool = False):  # type: ignore[no-untyped-def]
        if any(c.get("mean_radius") == 1234.5 for c in cases):
            raise SystemExit("killed")
        return super().featurize(cases, checked=checked)


def test_an_explanation_whose_worker_died_is_explained_alone_after_the_others(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """A case whose explanation killed its worker once and kills it again costs the other
    explanations of its message no attempt: they are stored first, and it is tried alone."""
    cases = wdbc_cases(6, prefix="xkill")
    cases[2]["features"]["mean_radius"] = 1234.5
    ids = _add(pg_sessions, cases)
    score_collecting_explanations(pg_sessions, ids, _loader(model), explain_top_k=2)
    with session_scope(pg_sessions) as s:  # as if its worker had died explaining it once
        s.execute(update(Explanation).where(Explanation.case_id == ids[2]).values(attempts=1))
    killing = KillingFeaturizer(SPEC, device="cpu")
    with pytest.raises(SystemExit):
        explain_cases(
            ids,
            sessions=pg_sessions,
            load_model=lambda n, v: killing,
            lease=repo.Lease("test:1:explain", timedelta(seconds=30)),
            top_k=2,
        )
    with pg_sessions() as s:
        states = explanations.states(s, case_ids=ids)
        attempts = dict(s.execute(select(Explanation.case_id, Explanation.attempts)).tuples().all())
    assert (states.pop(ids[2]).status, attempts.pop(ids[2])) == ("pending", 2)
    assert {e.status for e in states.values()} == {"done"} and set(attempts.values()) == {1}


def test_an_explanation_another_live_worker_holds_costs_the_message_no_claim_of_its_own(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """A redelivered explain message whose case another worker is explaining (``running``
    under its live lease, attempted before) took it for one whose worker died and claimed it
    alone: a third transaction that could only skip it."""
    from datetime import UTC, datetime

    ids = _add(pg_sessions, wdbc_cases(3, prefix="xbusy"))
    score_collecting_explanations(pg_sessions, ids, _loader(model), explain_top_k=2)
    with session_scope(pg_sessions) as s:  # another worker explains it, alive
        s.execute(
            update(Explanation)
            .where(Explanation.case_id == ids[1])
            .values(
                status="running",
                attempts=1,
                lease_owner="live-worker:1:explain",
                lease_expires_at=datetime(2999, 1, 1, tzinfo=UTC),
            )
        )
    engine = pg_sessions.kw["bind"]
    commits: list[int] = []

    def count(conn) -> None:  # type: ignore[no-untyped-def]
        commits.append(1)

    event.listen(engine, "commit", count)
    try:
        outcome = _explain_all(pg_sessions, ids, model, 2)
    finally:
        event.remove(engine, "commit", count)
    assert outcome.done == [ids[0], ids[2]] and outcome.skipped == 1 and len(commits) == 2
    with pg_sessions() as s:
        row = s.scalars(select(Explanation).where(Explanation.case_id == ids[1])).one()
        assert (row.attempts, row.lease_owner) == (1, "live-worker:1:explain")


def test_an_explain_message_costs_one_transaction_to_claim_and_one_to_settle(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """A message of explanations never attempted before pays no look-up for suspects beside its
    claim: the claim leaves them, so the explain stage keeps one claim and one settle a message
    (docs/scoring-path.md); a suspect among them is still explained alone after the rest."""
    ids = _add(pg_sessions, wdbc_cases(6, prefix="xtx"))
    score_collecting_explanations(pg_sessions, ids, _loader(model), explain_top_k=2)
    engine = pg_sessions.kw["bind"]
    commits: list[int] = []

    def count(conn) -> None:  # type: ignore[no-untyped-def]
        commits.append(1)

    event.listen(engine, "commit", count)
    try:
        outcome = _explain_all(pg_sessions, ids[:4], model, 2)
    finally:
        event.remove(engine, "commit", count)
    assert outcome.done == ids[:4] and len(commits) == 2
    with session_scope(pg_sessions) as s:  # as if a worker had died explaining one of them
        s.execute(update(Explanation).where(Explanation.case_id == ids[4]).values(attempts=1))
    again = _explain_all(pg_sessions, ids, model, 2)
    assert again.done == [ids[5], ids[4]] and again.skipped == 4 and again.failed == {}
    with pg_sessions() as s:
        attempts = dict(s.execute(select(Explanation.case_id, Explanation.attempts)).tuples().all())
    assert attempts == {**dict.fromkeys(ids[:4], 1), ids[4]: 2, ids[5]: 1}
