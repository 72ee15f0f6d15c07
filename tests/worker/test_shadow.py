"""Shadow scoring on the real PostgreSQL: a candidate scores the released version's cases beside
it, only the released score is the result, drift compares the two, and a broken shadow costs the
released model nothing."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import Case, CaseStatus, Priority, Score
from medbatch.cli import main
from medbatch.settings import Settings
from models.cases.inference import LoadedModel
from models.cases.registry import Registry, load_registry
from models.cases.shadow import ShadowError, drift, set_shadow
from models.device import torch_threads
from models.reference import breast_cancer
from tests.helpers import (
    counting_hashes,
    register_breast_cancer,
    register_mlp,
    save_mlp,
    wdbc_cases,
)
from worker.context import WorkerContext
from worker.tasks.scoring import score_cases

pytestmark = pytest.mark.integration

RELEASED = Registry.load().resolve("breast-cancer")


@pytest.fixture(scope="module")
def candidate_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """breast-cancer's recipe with another seed: a plausible next version that differs a little."""
    out = tmp_path_factory.mktemp("candidate") / "bc-1.1.0.safetensors"
    breast_cancer.train(out, seed=7)
    return out


def _schema(tmp_path: Path, **extra: object) -> Path:
    path = tmp_path / "schema.json"
    inputs = [f.to_json() for f in RELEASED.inputs]
    path.write_text(json.dumps({"inputs": inputs, "output": RELEASED.output, **extra}))
    return path


@pytest.fixture
def store(tmp_path: Path, candidate_weights: Path) -> Path:
    """An artifact store holding breast-cancer@1.1.0, a candidate, set to shadow 1.0.0."""
    store = tmp_path / "store"
    register_mlp(
        candidate_weights,
        name="breast-cancer",
        version="1.1.0",
        schema_path=_schema(tmp_path, threshold=0.4, labels=list(RELEASED.labels)),
        artifact_dir=store,
        hidden=[32, 16],
        dropout=0.1,
    )
    released, candidate = set_shadow(store, "breast-cancer@1.1.0")
    assert (released.ref, candidate.ref) == ("breast-cancer@1.0.0", "breast-cancer@1.1.0")
    return store


def _add(sessions: sessionmaker[Session], cases: list[dict], version: str = "1.0.0") -> list[int]:
    with session_scope(sessions) as s:
        tenant, _ = repo.create_tenant(s, name="shadowed")
        new = [
            repo.NewCase(
                c["external_id"], "breast-cancer", version, Priority.routine, c["features"]
            )
            for c in cases
        ]
        return [a.id for a in repo.add_cases(s, tenant_id=tenant.id, cases=new)]


def _context(pg_url: str, store: Path) -> WorkerContext:
    return WorkerContext(Settings(database_url=pg_url, artifact_dir=store, device="cpu"))


def test_candidate_scores_beside_the_released_version_and_only_released_is_the_result(
    pg_url: str, pg_sessions: sessionmaker[Session], store: Path
) -> None:
    cases = wdbc_cases(60)
    ids = _add(pg_sessions, cases)
    ctx = _context(pg_url, store)
    outcome = score_cases(
        ids, sessions=pg_sessions, load_model=ctx.model, load_shadow=ctx.shadow, max_batch_size=25
    )
    assert sorted(outcome.scored) == ids and outcome.failed == {}
    features = [c["features"] for c in cases]
    released = [r.score for r in LoadedModel(RELEASED, device="cpu").score(features)]
    spec = load_registry(store).resolve("breast-cancer@1.1.0")
    shadowed = [r.score for r in LoadedModel(spec, device="cpu").score(features)]
    with pg_sessions() as s:
        rows = s.scalars(select(Score).order_by(Score.case_id, Score.shadow)).all()
        assert set(s.scalars(select(Case.status))) == {CaseStatus.done}
        tenant_id = s.scalar(select(Case.tenant_id))
        results = repo.list_results(s, tenant_id=tenant_id, limit=500)
        case = repo.get_case(s, tenant_id=tenant_id, case_id=ids[0])
        assert case is not None
        listed = [(sc.model_version, sc.shadow) for sc in case.scores]
    primary = [r for r in rows if not r.shadow]
    shadow = [r for r in rows if r.shadow]
    assert [r.case_id for r in primary] == ids and [r.case_id for r in shadow] == ids
    assert {r.model_version for r in primary} == {"1.0.0"}
    assert {(r.model_version, r.model_sha256) for r in shadow} == {("1.1.0", spec.sha256)}
    np.testing.assert_allclose([r.score for r in primary], released, atol=1e-6)
    np.testing.assert_allclose([r.score for r in shadow], shadowed, atol=1e-6)
    assert [r.label for r in shadow] == [
        "malignant" if p >= 0.4 else "benign" for p in (r.score for r in shadow)
    ]
    # The result is the released version's score, once per case.
    assert [(c.id, sc.model_version) for c, sc in results if sc is not None] == [
        (i, "1.0.0") for i in ids
    ]
    assert sorted(listed) == [("1.0.0", False), ("1.1.0", True)]


def test_drift_against_a_plain_numpy_recomputation(
    pg_url: str, pg_sessions: sessionmaker[Session], store: Path
) -> None:
    ids = _add(pg_sessions, wdbc_cases(120))
    ctx = _context(pg_url, store)
    score_cases(ids, sessions=pg_sessions, load_model=ctx.model, load_shadow=ctx.shadow)
    with pg_sessions() as s:
        pairs = repo.shadow_pairs(s, name="breast-cancer", released="1.0.0", candidate="1.1.0")
    candidate = load_registry(store).resolve("breast-cancer@1.1.0")
    result = drift(RELEASED, candidate, pairs)
    a, b = np.array(pairs).T
    assert result.cases == 120
    assert result.mean_abs_diff == pytest.approx(np.mean(np.abs(a - b)))

    def ranks(x: np.ndarray) -> np.ndarray:
        """Ranks with ties given their mean rank (saturated scores tie at 1.0)."""
        first = np.empty(len(x))
        first[np.argsort(x, kind="stable")] = np.arange(len(x))
        _, group = np.unique(x, return_inverse=True)
        return (np.bincount(group, first) / np.bincount(group))[group]

    assert result.spearman == pytest.approx(np.corrcoef(ranks(a), ranks(b))[0, 1])
    up = int(np.sum((a < 0.5) & (b >= 0.4)))
    down = int(np.sum((a >= 0.5) & (b < 0.4)))
    assert (result.flips_up, result.flips_down, result.flips) == (up, down, up + down)
    assert 0.0 < result.mean_abs_diff < 0.2 and result.spearman > 0.8  # a close relative


def test_cases_pinned_to_another_version_are_not_shadowed(
    pg_url: str, pg_sessions: sessionmaker[Session], store: Path
) -> None:
    """Only the default version's cases are shadowed; a case pinned to the candidate is its own."""
    ids = _add(pg_sessions, wdbc_cases(5), version="1.1.0")
    ctx = _context(pg_url, store)
    score_cases(ids, sessions=pg_sessions, load_model=ctx.model, load_shadow=ctx.shadow)
    with pg_sessions() as s:
        rows = s.execute(select(Score.model_version, Score.shadow)).all()
    assert sorted(rows) == [("1.1.0", False)] * 5


def test_a_broken_shadow_costs_the_released_model_nothing(
    pg_url: str, pg_sessions: sessionmaker[Session], store: Path
) -> None:
    """A candidate whose artifact no longer matches its sha256 is skipped, with a warning."""
    artifact = load_registry(store).resolve("breast-cancer@1.1.0").artifact
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    ids = _add(pg_sessions, wdbc_cases(10))
    ctx = _context(pg_url, store)
    outcome = score_cases(ids, sessions=pg_sessions, load_model=ctx.model, load_shadow=ctx.shadow)
    assert sorted(outcome.scored) == ids and outcome.failed == {}
    with pg_sessions() as s:
        assert s.execute(select(Score.model_version, Score.shadow)).all() == [("1.0.0", False)] * 10


def test_a_shadow_that_failed_to_load_is_not_tried_again_at_every_batch(
    pg_url: str, store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each try hashed the whole candidate artifact again, on the released model's path, and
    logged the same warning: once per worker is enough (the assignment is read at start)."""
    artifact = load_registry(store).resolve("breast-cancer@1.1.0").artifact
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    ctx = _context(pg_url, store)
    with caplog.at_level("WARNING", logger="worker.context"):
        assert [ctx.shadow("breast-cancer", "1.0.0") for _ in range(3)] == [None] * 3
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "shadow breast-cancer@1.1.0 not loaded (until the worker restarts)"
    ]


def test_a_released_model_with_a_broken_artifact_is_not_hashed_at_every_batch(
    pg_url: str,
    pg_sessions: sessionmaker[Session],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each batch of a released model whose artifact failed its sha256 hashed the whole
    artifact again and logged the same error. Its cases still fail with the reason, without a
    hash, until the file changes (or a while has passed): then it loads, with no restart."""
    import models.cases.registry as registry_module
    import worker.context as context_module

    store = tmp_path / "store"
    schema = tmp_path / "own.json"
    inputs = [{"name": "a", "unit": "1"}, {"name": "b", "unit": "1"}]
    schema.write_text(json.dumps({"inputs": inputs, "output": "x", "status": "released"}))
    weights = tmp_path / "own.safetensors"
    save_mlp(weights, 2, hidden=(4,))
    register_mlp(
        weights, name="own", version="1", schema_path=schema, artifact_dir=store, hidden=[4]
    )
    artifact = load_registry(store).resolve("own@1").artifact
    good = artifact.read_bytes()
    artifact.write_bytes(good + b"\0")
    hashed = counting_hashes(monkeypatch)
    with session_scope(pg_sessions) as s:
        tenant, _ = repo.create_tenant(s, name="broken")
        new = [
            repo.NewCase(f"c{i}", "own", "1", Priority.routine, {"a": 1.0, "b": 2.0})
            for i in range(3)
        ]
        ids = [a.id for a in repo.add_cases(s, tenant_id=tenant.id, cases=new)]
    ctx = _context(pg_url, store)
    with caplog.at_level("ERROR", logger="worker.tasks.scoring"):
        for case_id in ids:  # one batch each
            outcome = score_cases([case_id], sessions=pg_sessions, load_model=ctx.model)
            assert outcome.scored == [] and "its artifact has sha256" in outcome.failed[case_id]
    assert hashed == [artifact]
    assert len(caplog.records) == 1 and "own@1 unavailable" in caplog.records[0].getMessage()

    artifact.write_bytes(good)  # fixed: its size changes, so it is checked again at once
    assert ctx.model("own", "1").spec.ref == "own@1"
    assert hashed == [artifact, artifact]

    # Broken again and left as it is: checked again only once the retry interval has passed.
    ctx._models.clear()
    artifact.write_bytes(good[:-1] + b"\0")
    with pytest.raises(registry_module.ArtifactIntegrityError):
        ctx.model("own", "1")
    error, state, since = ctx._broken_artifacts[("own", "1")]
    ctx._broken_artifacts[("own", "1")] = (error, state, since - 1.0)
    with pytest.raises(registry_module.ArtifactIntegrityError):
        ctx.model("own", "1")
    assert len(hashed) == 3
    ctx._broken_artifacts[("own", "1")] = (
        error,
        state,
        since - context_module.BROKEN_ARTIFACT_RETRY_S,
    )
    with pytest.raises(registry_module.ArtifactIntegrityError):
        ctx.model("own", "1")
    assert len(hashed) == 4


def test_a_candidate_whose_artifact_is_changed_or_gone_cannot_shadow(
    tmp_path: Path, candidate_weights: Path
) -> None:
    """Workers would skip it with a warning in their log, and drift would find nothing: the
    command that names it says so instead of 'shadows breast-cancer@1.0.0'."""
    store = tmp_path / "store"
    register_mlp(
        candidate_weights,
        name="breast-cancer",
        version="1.1.0",
        schema_path=_schema(tmp_path),
        artifact_dir=store,
        hidden=[32, 16],
        dropout=0.1,
    )
    artifact = load_registry(store).resolve("breast-cancer@1.1.0").artifact
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    with pytest.raises(ShadowError, match=r"has sha256 \w+, the registry expects"):
        set_shadow(store, "breast-cancer@1.1.0")
    artifact.unlink()
    with pytest.raises(ShadowError, match="does not exist; workers could not load it"):
        set_shadow(store, "breast-cancer@1.1.0")
    assert not (store / "shadows.json").exists()


def test_one_broken_default_model_does_not_stop_the_warm_up_of_the_others(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """warm_up raised at the first default whose artifact was changed: the models after it
    stayed cold, and the sweep that follows it at worker start (worker/signals.py) never ran."""
    store = tmp_path / "store"
    schema = tmp_path / "own.json"
    inputs = [{"name": "a", "unit": "1"}, {"name": "b", "unit": "1"}]
    schema.write_text(
        json.dumps({"inputs": inputs, "output": "x", "status": "released", "default": True})
    )
    weights = tmp_path / "own.safetensors"
    save_mlp(weights, 2, hidden=(4,))
    register_mlp(
        weights, name="own", version="1", schema_path=schema, artifact_dir=store, hidden=[4]
    )
    artifact = load_registry(store).resolve("own@1").artifact
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    ctx = _context(pg_url, store)
    with caplog.at_level("ERROR", logger="worker.context"):
        ctx.warm_up()
    warm = set(ctx._models)
    assert ("own", "1") not in warm
    assert {("breast-cancer", "1.0.0"), ("whas500-mortality", "1.0.0")} <= warm  # after "own"
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["model own@1 not warmed up"]


def test_warm_up_loads_the_version_unpinned_cases_get_when_none_is_marked_default(
    pg_url: str, tmp_path: Path
) -> None:
    """A hospital's released model that marks no version default was left cold: its first
    case, a STAT one maybe, waited for the load and the warm-up pass."""
    store = tmp_path / "store"
    register_breast_cancer(store, "9.0.0", status="released")
    schema = tmp_path / "own.json"
    inputs = [{"name": "a", "unit": "1"}, {"name": "b", "unit": "1"}]
    schema.write_text(json.dumps({"inputs": inputs, "output": "x", "status": "released"}))
    weights = tmp_path / "own.safetensors"
    save_mlp(weights, 2, hidden=(4,))
    for version in ("1.9", "1.10"):
        register_mlp(
            weights, name="own", version=version, schema_path=schema, artifact_dir=store, hidden=[4]
        )
    ctx = _context(pg_url, store)
    ctx.warm_up()
    assert {k for k in ctx._models if k[0] in ("own", "breast-cancer")} == {
        ("own", "1.10"),
        ("breast-cancer", "1.0.0"),
    }


def test_only_a_compatible_candidate_can_shadow(tmp_path: Path, candidate_weights: Path) -> None:
    store = tmp_path / "store"
    with pytest.raises(ShadowError, match=r"name the candidate's version: breast-cancer@VERSION"):
        set_shadow(store, "breast-cancer")
    with pytest.raises(ShadowError, match=r"unknown model version 'breast-cancer@9\.0'"):
        set_shadow(store, "breast-cancer@9.0")
    with pytest.raises(ShadowError, match=r"breast-cancer@1\.0\.0 is released; only a candidate"):
        set_shadow(store, "breast-cancer@1.0.0")
    narrow = tmp_path / "narrow.json"
    narrow.write_text(json.dumps({"inputs": [{"name": "a", "unit": "1"}], "output": "x"}))
    weights = tmp_path / "narrow.safetensors"
    save_mlp(weights, 1, hidden=(4,))
    register_mlp(
        weights,
        name="breast-cancer",
        version="2.0.0",
        schema_path=narrow,
        artifact_dir=store,
        hidden=[4],
    )
    with pytest.raises(ShadowError, match=r"breast-cancer@2\.0\.0 takes other inputs"):
        set_shadow(store, "breast-cancer@2.0.0")
    assert not (store / "shadows.json").exists()


def test_cli_shadow_and_drift(
    pg_url: str,
    pg_sessions: sessionmaker[Session],
    store: Path,
    cli_env: Callable[..., None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli_env(MEDBATCH_ARTIFACT_DIR=str(store), MEDBATCH_DATABASE_URL=pg_url)
    assert main(["models", "drift", "breast-cancer"]) == 2
    assert "no case has been scored by both" in capsys.readouterr().err
    ids = _add(pg_sessions, wdbc_cases(30))
    ctx = _context(pg_url, store)
    score_cases(ids, sessions=pg_sessions, load_model=ctx.model, load_shadow=ctx.shadow)
    assert main(["models", "drift", "breast-cancer", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cases"] == 30 and report["candidate"] == "breast-cancer@1.1.0"
    assert main(["models", "shadow", "breast-cancer", "--off"]) == 0
    assert "(was 1.1.0)" in capsys.readouterr().out
    assert main(["models", "drift", "breast-cancer"]) == 2
    assert "breast-cancer has no shadow" in capsys.readouterr().err
    assert main(["models", "shadow", "breast-cancer@1.0.0"]) == 2
    assert "only a candidate can shadow" in capsys.readouterr().err


@pytest.mark.parametrize(("threads", "inside"), [(1, 1), (2, 2), (0, 3)])
def test_scoring_runs_torch_on_its_own_threads_and_gives_the_process_its_own_back(
    threads: int, inside: int
) -> None:
    """``torch_threads`` (around each scoring and explain batch) sets PyTorch's threads for the
    batch and restores the process's number after, even when the batch raises, so a genome or
    chem tile in the same worker keeps every core; 0 leaves them alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with torch_threads(threads):
            assert torch.get_num_threads() == inside
        assert torch.get_num_threads() == 3
        with pytest.raises(RuntimeError), torch_threads(threads):
            raise RuntimeError("a batch that fails")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_new_candidate_leaves_the_released_version_its_cases_and_can_shadow_it(
    tmp_path: Path, cli_env: Callable[..., None], capsys: pytest.CaptureFixture[str]
) -> None:
    """A hospital's own model, no version marked default: unpinned cases get the newest released
    version (1.10.0 is newer than 1.9.0), not a candidate registered after it to be shadowed."""
    store = tmp_path / "store"
    inputs = [{"name": "a", "unit": "1"}, {"name": "b", "unit": "1"}]
    released = tmp_path / "released.json"
    released.write_text(json.dumps({"inputs": inputs, "output": "x", "status": "released"}))
    candidate = tmp_path / "candidate.json"
    candidate.write_text(json.dumps({"inputs": inputs, "output": "x"}))
    weights = tmp_path / "w.safetensors"
    save_mlp(weights, 2, hidden=(4,))
    for version, schema in (("1.9.0", released), ("1.10.0", released), ("2.0.0", candidate)):
        register_mlp(
            weights,
            name="sepsis",
            version=version,
            schema_path=schema,
            artifact_dir=store,
            hidden=[4],
        )
    assert load_registry(store).resolve("sepsis").ref == "sepsis@1.10.0"
    shadowed, shadow = set_shadow(store, "sepsis@2.0.0")
    assert (shadowed.ref, shadow.ref) == ("sepsis@1.10.0", "sepsis@2.0.0")
    cli_env(MEDBATCH_ARTIFACT_DIR=str(store))
    assert main(["models", "list"]) == 0
    listed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert [line for line in listed if line.startswith("sepsis")] == [
        "sepsis@1.9.0",
        "sepsis@1.10.0 (default)",
        "sepsis@2.0.0",
    ]


def test_a_shadow_or_model_answering_the_wrong_shape_fails_only_its_own_rows(
    pg_url: str, pg_sessions: sessionmaker[Session], store: Path
) -> None:
    """A candidate that answers one logit for a whole batch (its dry run on 4 cases cannot see
    every batch size) costs the released version nothing; a released version that answers one
    logit too many fails its own cases, each with the reason, and never the whole batch."""
    added = _add(pg_sessions, wdbc_cases(14))
    ids, more = added[:10], added[10:]
    ctx = _context(pg_url, store)
    shadow = ctx.shadow("breast-cancer", "1.0.0")
    assert shadow is not None
    candidate = shadow.module
    shadow.module = lambda x: candidate(x)[:1]
    outcome = score_cases(ids, sessions=pg_sessions, load_model=ctx.model, load_shadow=ctx.shadow)
    assert sorted(outcome.scored) == ids and outcome.failed == {}
    with pg_sessions() as s:
        assert s.execute(select(Score.model_version, Score.shadow)).all() == [("1.0.0", False)] * 10

    model = ctx.model("breast-cancer", "1.0.0")
    released = model.module
    model.module = lambda x: torch.cat([released(x), released(x)[:1]])
    outcome = score_cases(more, sessions=pg_sessions, load_model=ctx.model)
    assert outcome.scored == [] and sorted(outcome.failed) == more
    assert all("answered shape (2,) for a batch of 1" in r for r in outcome.failed.values())


def test_a_candidate_reading_its_inputs_otherwise_cannot_shadow(
    tmp_path: Path, candidate_weights: Path
) -> None:
    """Same names are not the same inputs: another unit, or series of another length, would be
    scored from the released version's batch without an error and mean nothing."""
    store = tmp_path / "store"
    with pytest.raises(ShadowError, match=r"ecg-cnn@0\.1\.0 takes other inputs.*min_length 360"):
        set_shadow(store, "ecg-cnn@0.1.0")
    inputs = [f.to_json() for f in RELEASED.inputs]
    inputs[0]["unit"] = "mm"
    schema = tmp_path / "mm.json"
    schema.write_text(json.dumps({"inputs": inputs, "output": RELEASED.output}))
    register_mlp(
        candidate_weights,
        name="breast-cancer",
        version="1.2.0",
        schema_path=schema,
        artifact_dir=store,
        hidden=[32, 16],
        dropout=0.1,
    )
    with pytest.raises(ShadowError, match=r"mean_radius in 'mm' vs 'px'"):
        set_shadow(store, "breast-cancer@1.2.0")
    assert not (store / "shadows.json").exists()


@pytest.mark.parametrize("pairs", [[(0.2, 0.3)], [(0.5, 0.1), (0.5, 0.9)]])
def test_drift_without_a_rank_correlation_is_still_json(pairs: list[tuple[float, float]]) -> None:
    """One case, or constant released scores, have no Spearman correlation: `--json` said NaN,
    which is not JSON (jq and json.loads in strict mode refuse it); it is null."""
    result = drift(RELEASED, RELEASED, pairs)
    assert math.isnan(result.spearman)
    parsed = json.loads(
        json.dumps(result.as_dict(), allow_nan=False), parse_constant=lambda c: 1 / 0
    )
    assert parsed["spearman"] is None and parsed["cases"] == len(pairs)
