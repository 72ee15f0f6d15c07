"""The registry through real processes: a hospital's own TorchScript and torch.export models, and
a shadowing candidate, registered into the artifact store, submitted over HTTP, scored by a real
worker on the real Redis and PostgreSQL."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.tables import Score
from models.cases.byo import register
from models.cases.registry import Registry
from models.cases.shadow import set_shadow
from models.reference import breast_cancer
from tests.e2e.support import Processes, start_worker, wait_for_done
from tests.helpers import register_mlp, wdbc_cases

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

FEATURES = [{"name": n, "unit": "1"} for n in ("a", "b", "c")]
RELEASED = Registry.load().resolve("breast-cancer")


def _own_module() -> torch.nn.Module:
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).eval()


@pytest.fixture
def processes(processes: Processes, tmp_path: Path) -> Processes:
    """The e2e processes with an artifact store holding the hospital's models and a shadow."""
    store = tmp_path / "store"
    schema = tmp_path / "own.json"
    schema.write_text(json.dumps({"inputs": FEATURES, "output": "risk of X", "status": "released"}))
    module = _own_module()
    scripted = tmp_path / "own.pt"
    with warnings.catch_warnings():  # PyTorch 2.13 deprecates making new TorchScript files
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(scripted))
    register(scripted, name="own", version="1.0", schema_path=schema, artifact_dir=store)
    program = torch.export.export(
        module, (torch.zeros(2, 3),), dynamic_shapes={"input": {0: torch.export.Dim("batch")}}
    )
    exported = tmp_path / "own.pt2"
    torch.export.save(program, str(exported))
    register(exported, name="own", version="2.0", schema_path=schema, artifact_dir=store)

    candidate = tmp_path / "bc-1.1.0.safetensors"
    breast_cancer.train(candidate, seed=7)
    bc_schema = tmp_path / "bc.json"
    bc_schema.write_text(
        json.dumps(
            {
                "inputs": [f.to_json() for f in RELEASED.inputs],
                "output": RELEASED.output,
                "labels": list(RELEASED.labels),
            }
        )
    )
    register_mlp(
        candidate,
        name="breast-cancer",
        version="1.1.0",
        schema_path=bc_schema,
        artifact_dir=store,
        hidden=[32, 16],
        dropout=0.1,
    )
    set_shadow(store, "breast-cancer@1.1.0")
    processes.env["MEDBATCH_ARTIFACT_DIR"] = str(store)
    return processes


def _submit_and_score(
    processes: Processes, api: httpx.Client, sessions: sessionmaker[Session], cases: list[dict]
) -> list[int]:
    """POST the cases (accepted), then start a worker and wait until all are done. Their ids."""
    response = api.post("/v1/cases", json=cases)
    assert response.status_code == 202, response.text
    ids = [c["id"] for c in response.json()["cases"]]
    worker = start_worker(processes)
    wait_for_done(sessions, len(cases), worker=worker, processes=processes)
    return ids


def test_own_torchscript_and_torch_export_models_are_scored_by_the_worker(
    processes: Processes, api: httpx.Client, pg_sessions: sessionmaker[Session]
) -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(40, 3))
    payload = [
        {
            "external_id": f"own-{i}",
            "model": "own@1.0" if i % 2 else "own@2.0",
            "features": dict(zip("abc", map(float, row), strict=True)),
        }
        for i, row in enumerate(rows)
    ]
    ids = _submit_and_score(processes, api, pg_sessions, payload)
    with torch.no_grad():
        expected = torch.sigmoid(_own_module()(torch.tensor(rows, dtype=torch.float32)))[:, 0]
    with pg_sessions() as s:
        scores = {r.case_id: r for r in s.scalars(select(Score))}
    for i, case_id in enumerate(ids):
        row = scores[case_id]
        assert row.model_version == ("1.0" if i % 2 else "2.0")
        assert row.score == pytest.approx(float(expected[i]), abs=1e-6)


def test_a_shadowing_candidate_scores_beside_the_released_model(
    processes: Processes, api: httpx.Client, pg_sessions: sessionmaker[Session]
) -> None:
    ids = _submit_and_score(processes, api, pg_sessions, wdbc_cases(50))
    with pg_sessions() as s:
        rows = s.execute(select(Score.model_version, Score.shadow)).all()
    assert sorted(rows) == [("1.0.0", False)] * 50 + [("1.1.0", True)] * 50
    body = api.get(f"/v1/cases/{ids[0]}").json()
    assert [sc["model_version"] for sc in body["scores"]] == ["1.0.0"]
    listed = api.get("/v1/scores", params={"limit": 100}).json()
    assert len(listed["items"]) == 50
    drift = processes.run_cli("models", "drift", "breast-cancer", "--json")
    assert drift.returncode == 0, drift.stderr
    report = json.loads(drift.stdout)
    assert report["cases"] == 50 and report["released"] == "breast-cancer@1.0.0"
    assert 0 < report["mean_abs_diff"] < 0.2


class _FirstFour(torch.nn.Module):
    """A candidate with a bug its dry run cannot see: one logit for each of the first 4 cases."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:4, 0]


def test_a_candidate_answering_the_wrong_shape_costs_the_released_model_nothing(
    processes: Processes, api: httpx.Client, pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Its rows are dropped and logged; every case is done with the released score. The zip of
    its rows with the batch's cases failed the whole batch, again at each delivery."""
    store = Path(processes.env["MEDBATCH_ARTIFACT_DIR"])
    scripted = tmp_path / "first-four.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_FirstFour()), str(scripted))
    schema = tmp_path / "first-four.json"
    inputs = [f.to_json() for f in RELEASED.inputs]
    schema.write_text(json.dumps({"inputs": inputs, "output": RELEASED.output}))
    register(
        scripted, name="breast-cancer", version="1.2.0", schema_path=schema, artifact_dir=store
    )
    set_shadow(store, "breast-cancer@1.2.0")
    ids = _submit_and_score(processes, api, pg_sessions, wdbc_cases(30))
    with pg_sessions() as s:
        rows = s.execute(select(Score.case_id, Score.model_version, Score.shadow)).all()
    assert sorted(rows) == [(i, "1.0.0", False) for i in ids]
