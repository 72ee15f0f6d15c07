"""The explain stage as robust as scoring: leases held and renewed, suspects bounded by the
message's time, attributions only of the weights that made the score. On the real PostgreSQL;
the lease tests (``sessions``) on SQLite too."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db import explanations, repo
from db.engine import session_scope
from db.tables import Case, Explanation, Priority, Score, utcnow
from medbatch.settings import Settings
from models.cases import registry as registry_module
from models.cases.inference import LoadedModel
from models.cases.registry import Registry, sha256_file, user_registry_path
from tests.helpers import (
    counting_hashes,
    register_breast_cancer,
    save_mlp,
    score_collecting_explanations,
    wdbc_cases,
)
from worker.context import WorkerContext
from worker.leases import LeaseKeeper
from worker.tasks.explain import ExplainOutcome, explain_cases

pytestmark = pytest.mark.integration

SPEC = Registry.load().resolve("breast-cancer")


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return LoadedModel(SPEC, device="cpu")


def _scored(
    sessions: sessionmaker[Session], model: LoadedModel, n: int, *, prefix: str
) -> list[int]:
    """``n`` cases scored by ``model`` (breast-cancer@its version), explanations pending."""
    with session_scope(sessions) as s:
        tenant, _ = repo.create_tenant(s, name=f"t-{prefix}")
        new = [
            repo.NewCase(
                c["external_id"],
                "breast-cancer",
                model.spec.version,
                Priority.routine,
                c["features"],
            )
            for c in wdbc_cases(n, prefix=prefix)
        ]
        ids = [a.id for a in repo.add_cases(s, tenant_id=tenant.id, cases=new)]
    outcome, _ = score_collecting_explanations(sessions, ids, lambda n, v: model, explain_top_k=2)
    assert sorted(outcome.scored) == ids
    return ids


def _died_explaining(sessions: sessionmaker[Session], case_ids: list[int]) -> None:
    """As if a worker had died explaining these: ``running`` under its lapsed lease, 1 attempt."""
    with session_scope(sessions) as s:
        s.execute(
            update(Explanation)
            .where(Explanation.case_id.in_(case_ids))
            .values(
                status="running",
                attempts=1,
                lease_owner="dead-worker:1:gone",
                lease_expires_at=datetime(2020, 1, 1, tzinfo=UTC),
            )
        )


def _sweep(sessions: sessionmaker[Session]) -> list[int]:
    """What the sweeper takes as stranded now (and marks sent again)."""
    now = utcnow()
    with session_scope(sessions) as s:
        return explanations.take_stranded_explanations(
            s, rules=repo.Stranded(now=now, lost_before=now - timedelta(seconds=300))
        )


def _ledger(sessions: sessionmaker[Session], ids: list[int]) -> dict[int, Explanation]:
    with sessions() as s:
        rows = s.scalars(select(Explanation).where(Explanation.case_id.in_(ids))).all()
        s.expunge_all()
    return {r.case_id: r for r in rows}


def test_an_explanation_whose_worker_died_is_leased_while_it_waits_to_be_explained_alone(
    sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """Its row is still ``running`` under the dead worker's lapsed lease: while the rest of its
    message is explained it must be leased to this worker, or the sweeper takes it as stranded
    and sends it again (another worker then tries it meanwhile, another attempt counted)."""
    ids = _scored(sessions, model, 4, prefix="xheld")
    _died_explaining(sessions, [ids[1]])
    swept: list[list[int]] = []

    def load(name: str, version: str) -> LoadedModel:
        if not swept:  # the rest's chunk: the suspect waits its turn
            swept.append(_sweep(sessions))
        return model

    lease = repo.Lease("test:1:held", timedelta(seconds=60))
    outcome = explain_cases(ids, sessions=sessions, load_model=load, lease=lease, top_k=2)
    assert swept == [[]]
    assert outcome.done == [ids[0], ids[2], ids[3], ids[1]] and outcome.failed == {}
    rows = _ledger(sessions, ids)
    assert {i: r.attempts for i, r in rows.items()} == {**dict.fromkeys(ids, 1), ids[1]: 2}


def test_the_explanations_a_worker_holds_are_renewed_while_it_explains(
    sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """A chunk that outlasts the lease (a long sequence model's backward passes, a loaded host)
    must not let it lapse: the sweeper would send the rows again and a second worker explain
    them beside the first, an attempt counted that never failed. The keeper renews them, as it
    renews a scoring batch's cases: here its renewal runs by hand after the lease ran out."""
    ids = _scored(sessions, model, 3, prefix="xrenew")
    _died_explaining(sessions, [ids[2]])  # and a suspect waiting meanwhile
    keeper = LeaseKeeper(sessions, ttl_s=3000)  # its thread renews nothing during the test
    swept: list[list[int]] = []

    def load(name: str, version: str) -> LoadedModel:
        if not swept:
            with session_scope(sessions) as s:  # the lease ran out meanwhile
                s.execute(
                    update(Explanation)
                    .where(Explanation.case_id.in_(ids))
                    .values(lease_expires_at=datetime(2020, 1, 1, tzinfo=UTC))
                )
            keeper.renew()
            swept.append(_sweep(sessions))
        return model

    try:
        outcome = explain_cases(ids, sessions=sessions, load_model=load, keeper=keeper, top_k=2)
    finally:
        keeper.stop()
    assert swept == [[]]
    assert outcome.done == ids and outcome.failed == {}
    rows = _ledger(sessions, ids)
    assert {i: r.attempts for i, r in rows.items()} == {ids[0]: 1, ids[1]: 1, ids[2]: 2}
    assert {r.lease_owner for r in rows.values()} == {None}


def test_suspects_left_when_the_time_is_spent_are_handed_back_a_message_each(
    sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """A message of explanations whose worker died (the sweeper sends a dead worker's rows 64 a
    message) explained each alone, one after the other, whatever the time: STAT cases waited
    behind them. Past ``yield_after_s`` they are handed back instead, a message each, their
    attempts as they were; those messages finish the job."""
    ids = _scored(sessions, model, 4, prefix="xyield")
    _died_explaining(sessions, ids[1:])
    sent: list[list[int]] = []
    lease = repo.Lease("test:1:yield", timedelta(seconds=60))
    first = explain_cases(
        ids,
        sessions=sessions,
        load_model=lambda n, v: model,
        lease=lease,
        top_k=2,
        yield_after_s=0.0,
        send_rest=sent.append,
    )
    assert first.done == [ids[0]] and first.handed_back == ids[1:]
    assert sent == [[i] for i in ids[1:]]
    rows = _ledger(sessions, ids[1:])
    assert {(r.status, r.attempts, r.lease_owner) for r in rows.values()} == {("queued", 1, None)}
    assert all(r.enqueued_at is not None for r in rows.values())
    for message in sent:
        again = explain_cases(
            message,
            sessions=sessions,
            load_model=lambda n, v: model,
            lease=lease,
            top_k=2,
            yield_after_s=0.0,
        )
        assert again.done == message and again.handed_back == []
    rows = _ledger(sessions, ids)
    assert {i: (r.status, r.attempts) for i, r in rows.items()} == {
        ids[0]: ("done", 1),
        **dict.fromkeys(ids[1:], ("done", 2)),
    }


def test_a_message_of_suspects_alone_explains_one_before_it_hands_back(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """However short the time, a message makes progress: its first suspect is explained."""
    ids = _scored(pg_sessions, model, 3, prefix="xfirst")
    _died_explaining(pg_sessions, ids)
    sent: list[list[int]] = []
    outcome = explain_cases(
        ids,
        sessions=pg_sessions,
        load_model=lambda n, v: model,
        lease=repo.Lease("test:1:first", timedelta(seconds=60)),
        top_k=2,
        yield_after_s=0.0,
        send_rest=sent.append,
    )
    assert outcome.done == [ids[0]] and outcome.handed_back == ids[1:]
    assert sent == [[ids[1]], [ids[2]]]


def test_a_score_whose_model_changed_since_gets_no_explanation_of_other_weights(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """The registry's sha256 of a version changed between the score and its explanation (the
    artifact was replaced, a rebuilt image): the attributions of the new weights would be shown
    beside a score the old ones made. That explanation fails with the reason; the others are
    explained."""
    ids = _scored(pg_sessions, model, 3, prefix="xsha")
    with session_scope(pg_sessions) as s:  # scored by an earlier build of the artifact
        s.execute(update(Score).where(Score.case_id == ids[1]).values(model_sha256="0" * 64))
    outcome = explain_cases(
        ids,
        sessions=pg_sessions,
        load_model=lambda n, v: model,
        lease=repo.Lease("test:1:sha", timedelta(seconds=60)),
        top_k=2,
    )
    assert outcome.done == [ids[0], ids[2]]
    assert list(outcome.failed) == [ids[1]]
    with pg_sessions() as s:
        states = explanations.states(s, case_ids=ids)
        stored = dict(s.execute(select(Score.case_id, Score.explanation)).tuples().all())
    assert states[ids[1]].status == "failed"
    assert "breast-cancer@1.0.0 changed since the score" in (states[ids[1]].error or "")
    assert stored[ids[1]] is None and stored[ids[0]] is not None


def test_an_artifact_gone_before_the_explanation_fails_it_once_with_the_reason(
    pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Scored, then the artifact is deleted; a worker started since explains: each explanation
    fails at its first attempt with a reason naming no server path, and a message sent again
    changes nothing (no attempt counted, no retry loop)."""
    store = tmp_path / "store"
    register_breast_cancer(store, "2.0.0")
    settings = Settings(database_url="sqlite:///unused.sqlite", artifact_dir=store, device="cpu")
    scorer = WorkerContext(settings).loaded("breast-cancer", "2.0.0")
    ids = _scored(pg_sessions, scorer, 3, prefix="xgone")
    scorer.spec.artifact.unlink()
    fresh = WorkerContext(settings)  # a worker started after the artifact went
    lease = repo.Lease("test:1:gone", timedelta(seconds=60))
    for _ in range(2):
        _explainer(pg_sessions, fresh, lease, max_deliveries=5)(ids)
    with pg_sessions() as s:
        states = explanations.states(s, case_ids=ids)
    rows = _ledger(pg_sessions, ids)
    assert {r.attempts for r in rows.values()} == {1}
    assert {e.status for e in states.values()} == {"failed"}
    for e in states.values():
        assert e.error == (
            "model breast-cancer@2.0.0 unavailable: breast-cancer@2.0.0: its artifact does not exist"
        )
        assert str(store) not in (e.error or "")


class KillingFeaturizer(LoadedModel):
    """The real model, made to end the process (as a segfault would) whenever it prepares the
    marked case's features for its attributions."""

    def featurize(self, cases, *, checked: bool = False):  # type: ignore[no-untyped-def]
        if any(c.get("mean_radius") == 1234.5 for c in cases):
            raise SystemExit("killed")
        return super().featurize(cases, checked=checked)


def test_an_explanation_that_kills_every_worker_ends_failed_alone_in_few_rounds(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """Each round: a worker takes the message and dies on the poison; its leases lapse and the
    sweeper sends what it held again. The poison ends ``failed`` after ``max_deliveries``
    attempts with the reason; the others of its message are explained (one attempt lost with
    the first worker, then one that finished); no loop."""
    ids = _scored(pg_sessions, model, 4, prefix="xpoison")
    with session_scope(pg_sessions) as s:  # its stored features make the explainer crash
        case = s.get(Case, ids[1])
        assert case is not None
        case.features = {**case.features, "mean_radius": 1234.5}
    killing = KillingFeaturizer(SPEC, device="cpu")
    message, rounds = ids, 0
    while message and rounds < 10:
        rounds += 1
        with contextlib.suppress(SystemExit):
            explain_cases(
                message,
                sessions=pg_sessions,
                load_model=lambda n, v: killing,
                lease=repo.Lease(f"worker-{rounds}:1:x", timedelta(seconds=60)),
                top_k=2,
                max_deliveries=2,
            )
        later = utcnow() + timedelta(hours=1)  # the dead worker's leases have lapsed
        with session_scope(pg_sessions) as s:
            message = explanations.take_stranded_explanations(
                s, rules=repo.Stranded(now=later, lost_before=later - timedelta(seconds=300))
            )
    assert rounds == 3
    rows = _ledger(pg_sessions, ids)
    assert (rows[ids[1]].status, rows[ids[1]].error) == (
        "failed",
        "explanation attempted 3 times without finishing",
    )
    others = [rows[i] for i in ids if i != ids[1]]
    assert {(r.status, r.attempts) for r in others} == {("done", 2)}


def test_a_model_that_cannot_be_loaded_fails_its_explanations_with_the_reason(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """Loading raised something other than the registry's or the artifact check's errors (an
    artifact the upgraded torch cannot read): the message raised, its rows waited out their
    lease, and each round the sweeper sent them again they came back as suspects, one attempt
    a round for one case, towards "attempted too often". They fail at once, with the reason."""
    ids = _scored(pg_sessions, model, 3, prefix="xload")

    def load(name: str, version: str) -> LoadedModel:
        raise RuntimeError("PytorchStreamReader failed reading zip archive")

    lease = repo.Lease("test:1:load", timedelta(seconds=60))
    for _ in range(2):
        explain_cases(ids, sessions=pg_sessions, load_model=load, lease=lease, top_k=2)
    rows = _ledger(pg_sessions, ids)
    assert {(r.status, r.attempts) for r in rows.values()} == {("failed", 1)}
    assert {r.error for r in rows.values()} == {
        "model breast-cancer@1.0.0 could not be loaded: RuntimeError"
    }


def _store(tmp_path: Path) -> Settings:
    """Settings of workers sharing an artifact store where breast-cancer@2.0.0 is registered."""
    store = tmp_path / "store"
    register_breast_cancer(store, "2.0.0")
    return Settings(database_url="sqlite:///unused.sqlite", artifact_dir=store, device="cpu")


def _republish(settings: Settings) -> str:
    """breast-cancer@2.0.0 re-published in place, as an operator would: other weights written
    over its artifact, and its sha256 in the store's registry file; returns that sha256."""
    assert settings.artifact_dir is not None
    path = user_registry_path(settings.artifact_dir)
    raw = json.loads(path.read_text())
    (entry,) = [m for m in raw["models"] if m["version"] == "2.0.0"]
    artifact = settings.artifact_dir / entry["artifact"]
    save_mlp(artifact, len(SPEC.inputs), hidden=(4,))
    entry["sha256"] = sha256_file(artifact)
    path.write_text(json.dumps(raw))
    return str(entry["sha256"])


def test_a_worker_whose_model_was_republished_since_it_loaded_explains_the_new_scores(
    pg_sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker loaded breast-cancer@2.0.0; its artifact was then re-published in place (same
    version, other bytes, the registry's sha256 with them) and a worker started since scored
    with it. The first worker failed those explanations as 'changed since the score', its own
    copy being the stale one. It looks at the files again (a stat; it hashes only what
    changed): the scores of its old copy are explained with it, the new ones with the new
    artifact, which it keeps. A score of weights no longer on disk still fails, re-hashing
    nothing."""
    settings = _store(tmp_path)
    stale = WorkerContext(settings)
    old = stale.loaded("breast-cancer", "2.0.0")
    old_ids = _scored(pg_sessions, old, 2, prefix="xrepub-old")
    new_sha = _republish(settings)
    new = WorkerContext(settings).loaded("breast-cancer", "2.0.0")
    assert new.sha256 == new_sha != old.sha256
    new_ids = _scored(pg_sessions, new, 2, prefix="xrepub-new")
    lease = repo.Lease("test:1:repub", timedelta(seconds=60))
    outcome = _explainer(pg_sessions, stale, lease, max_deliveries=5)(
        [new_ids[0], old_ids[0], new_ids[1], old_ids[1]]
    )
    assert outcome.failed == {} and outcome.deferred == {}
    assert outcome.done == sorted(old_ids + new_ids)
    assert stale.loaded("breast-cancer", "2.0.0").sha256 == new_sha

    hashed = counting_hashes(monkeypatch)
    late = _scored(pg_sessions, old, 1, prefix="xrepub-late")  # the old weights, gone from disk
    outcome = _explainer(pg_sessions, stale, lease, max_deliveries=5)(late)
    assert outcome.failed == {
        late[0]: "model breast-cancer@2.0.0 changed since the score: "
        "its artifact's sha256 is not the score's, and attributions of "
        "other weights would not explain this score"
    }
    assert hashed == []


def test_a_worker_that_read_the_registry_before_a_version_was_added_explains_its_scores(
    pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The worker read the store's registry before breast-cancer@2.0.0 was registered; another
    worker scored with it. 'Unknown model version' would fail the explanations for good: the
    registry's file changed since, so it is read again."""
    store = tmp_path / "store"
    settings = Settings(database_url="sqlite:///unused.sqlite", artifact_dir=store, device="cpu")
    early = WorkerContext(settings)
    assert "breast-cancer@2.0.0" not in {s.ref for s in early.registry}
    register_breast_cancer(store, "2.0.0")
    ids = _scored(
        pg_sessions, WorkerContext(settings).loaded("breast-cancer", "2.0.0"), 2, prefix="xadded"
    )
    outcome = _explainer(
        pg_sessions, early, repo.Lease("test:1:added", timedelta(seconds=60)), max_deliveries=5
    )(ids)
    assert outcome.done == ids and outcome.failed == {}


def test_an_unknown_version_still_fails_its_explanation_at_once(
    pg_sessions: sessionmaker[Session], model: LoadedModel, tmp_path: Path
) -> None:
    """No file changed and the store's registry is there: the version is gone for good (its
    entry removed), so the explanation fails at its first attempt with the registry's reason."""
    settings = _store(tmp_path)
    worker = WorkerContext(settings)
    ids = _scored(pg_sessions, model, 2, prefix="xunknown")
    with session_scope(pg_sessions) as s:
        s.execute(update(Score).where(Score.case_id == ids[1]).values(model_version="9.9.9"))
    outcome = _explainer(
        pg_sessions, worker, repo.Lease("test:1:unknown", timedelta(seconds=60)), max_deliveries=5
    )(ids)
    assert outcome.done == [ids[0]] and outcome.deferred == {}
    assert "unknown model version 'breast-cancer@9.9.9'" in outcome.failed[ids[1]]
    rows = _ledger(pg_sessions, ids)
    assert (rows[ids[1]].status, rows[ids[1]].attempts) == ("failed", 1)


def test_a_registry_file_missing_for_a_moment_defers_the_explanations_until_it_is_back(
    pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A worker started while a deploy replaced the store's registry file knew no
    breast-cancer@2.0.0: its explanations failed for good as 'unknown model version'. They are
    given back instead, an attempt counted, pending for the API, unsent (the sweeper sends them
    at its next sweep, a pause rather than a loop) and no suspects; once the file is back they
    are explained, as first tries of one message."""
    settings = _store(tmp_path)
    assert settings.artifact_dir is not None
    ids = _scored(
        pg_sessions,
        WorkerContext(settings).loaded("breast-cancer", "2.0.0"),
        3,
        prefix="xregmissing",
    )
    path = user_registry_path(settings.artifact_dir)
    aside = path.rename(path.with_name("registry.json.deploying"))
    worker = WorkerContext(settings)
    lease = repo.Lease("test:1:regmissing", timedelta(seconds=60))
    explain = _explainer(pg_sessions, worker, lease)
    first = explain(ids)
    assert first.done == [] and first.failed == {} and sorted(first.deferred) == ids
    assert "the artifact store's registry file is missing" in first.deferred[ids[0]]
    rows = _ledger(pg_sessions, ids)
    assert {(r.status, r.attempts, r.lease_owner, r.enqueued_at) for r in rows.values()} == {
        ("queued", 1, None, None)
    }
    with pg_sessions() as s:
        assert {e.status for e in explanations.states(s, case_ids=ids).values()} == {"pending"}
        assert explanations.attempted_unfinished(s, case_ids=ids) == []
    assert _sweep(pg_sessions) == ids

    aside.rename(path)
    again = explain(ids)
    assert again.done == ids and again.failed == {} and again.deferred == {}
    rows = _ledger(pg_sessions, ids)
    assert {(r.status, r.attempts, r.error) for r in rows.values()} == {("done", 2, None)}


def _explainer(
    sessions: sessionmaker[Session],
    worker: WorkerContext,
    lease: repo.Lease,
    max_deliveries: int = 3,
) -> Callable[[list[int]], ExplainOutcome]:
    """One explain message of ``worker`` (its ``loaded`` and ``reloaded``), ``max_deliveries``
    attempts at most."""
    return lambda ids: explain_cases(
        ids,
        sessions=sessions,
        load_model=worker.loaded,
        reload_model=worker.reloaded,
        lease=lease,
        top_k=2,
        max_deliveries=max_deliveries,
    )


def test_an_artifact_being_copied_while_it_is_checked_defers_its_explanations(
    pg_sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deploy was writing the artifact while the worker hashed it: the sha256 did not match,
    and the explanations failed for good with 'its artifact has sha256 …'. The file changed
    while it was checked, so they are given back; the copy done, they are explained."""
    settings = _store(tmp_path)
    ids = _scored(
        pg_sessions, WorkerContext(settings).loaded("breast-cancer", "2.0.0"), 2, prefix="xcopying"
    )
    artifact = WorkerContext(settings).registry.resolve("breast-cancer@2.0.0").artifact
    whole = artifact.read_bytes()
    real = registry_module.sha256_file

    def copying(path: Path) -> str:  # the deploy's next block lands while it is read
        with path.open("ab") as fh:
            fh.write(b"\0" * 64)
        return real(path)

    monkeypatch.setattr(registry_module, "sha256_file", copying)
    worker = WorkerContext(settings)
    lease = repo.Lease("test:1:copying", timedelta(seconds=60))
    explain = _explainer(pg_sessions, worker, lease)
    first = explain(ids)
    assert first.failed == {} and sorted(first.deferred) == ids
    assert first.deferred[ids[0]] == (
        "model breast-cancer@2.0.0 could not be loaded: "
        "breast-cancer@2.0.0: its artifact changed while it was checked"
    )
    monkeypatch.setattr(registry_module, "sha256_file", real)
    artifact.write_bytes(whole)  # the copy is done
    assert _sweep(pg_sessions) == ids
    again = explain(ids)
    assert again.done == ids and again.failed == {}


def test_a_model_that_keeps_failing_to_load_fails_its_explanations_at_the_last_attempt(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """An artifact unreadable (PermissionError) at each try: the explanations are given back
    and sent again by the sweeper, then, at their ``max_deliveries``-th attempt, fail with the
    reason (the error's name, never the file's path), not 'attempted too often'. No loop."""
    ids = _scored(pg_sessions, model, 3, prefix="xperm")
    tries: list[int] = []

    def load(name: str, version: str) -> LoadedModel:
        tries.append(1)
        raise PermissionError(13, "Permission denied", "/srv/store/models/secret.safetensors")

    message, rounds = ids, 0
    lease = repo.Lease("test:1:perm", timedelta(seconds=60))
    while message and rounds < 10:
        rounds += 1
        explain_cases(
            message, sessions=pg_sessions, load_model=load, lease=lease, top_k=2, max_deliveries=3
        )
        message = _sweep(pg_sessions)
    assert rounds == 3 and len(tries) == 3  # one load a round: the message's cases together
    rows = _ledger(pg_sessions, ids)
    assert {(r.status, r.attempts) for r in rows.values()} == {("failed", 3)}
    assert {r.error for r in rows.values()} == {
        "model breast-cancer@1.0.0 could not be loaded: PermissionError (at each of 3 attempts)"
    }


def _explanations_counted(outcome: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("medbatch_explanations_total", {"outcome": outcome}) or 0.0


def test_an_explanation_failed_at_its_last_attempt_is_counted_once_in_the_metrics(
    pg_sessions: sessionmaker[Session], model: LoadedModel
) -> None:
    """medbatch_explanations_total{outcome="failed"} counts an explanation that its claim ends
    failed (tried too often), alone in its message or beside one explained, once each."""
    ids = _scored(pg_sessions, model, 3, prefix="xmetric")
    _died_explaining(pg_sessions, ids[:2])
    with session_scope(pg_sessions) as s:  # each at its last attempt
        s.execute(update(Explanation).where(Explanation.case_id.in_(ids[:2])).values(attempts=2))
        # given back by a model that could not load (no suspect): claimed beside a first try
        s.execute(
            update(Explanation)
            .where(Explanation.case_id == ids[1])
            .values(status="queued", lease_owner=None, error="could not be loaded: OSError")
        )
    failed, done = _explanations_counted("failed"), _explanations_counted("done")
    lease = repo.Lease("test:1:metric", timedelta(seconds=60))
    common = {"sessions": pg_sessions, "load_model": lambda n, v: model, "lease": lease}
    alone = explain_cases([ids[0]], top_k=2, max_deliveries=2, **common)
    assert list(alone.failed) == [ids[0]] and alone.done == []
    assert _explanations_counted("failed") == failed + 1
    beside = explain_cases(ids[1:], top_k=2, max_deliveries=2, **common)
    assert list(beside.failed) == [ids[1]] and beside.done == [ids[2]]
    assert _explanations_counted("failed") == failed + 2
    assert _explanations_counted("done") == done + 1
    assert {r.status for r in _ledger(pg_sessions, ids[:2]).values()} == {"failed"}
