"""Shared test data and helpers: real Wisconsin cases as API payloads, score rows, broker
inspection, the API in process, PLINK goldens and model artifacts."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from db import repo
from db.engine import session_scope
from medbatch.settings import Settings
from models.reference import breast_cancer
from worker.queues import ALL_QUEUES

if TYPE_CHECKING:
    from models.cases.architectures import StandardizedMLP
    from models.cases.registry import ModelSpec
    from models.reference.train import TrainReport
    from worker.tasks.scoring import ModelLoader, Outcome


def wdbc_cases(n: int, *, prefix: str = "wdbc", priority: str = "routine") -> list[dict]:
    """``n`` real Wisconsin cases (held-out ones first) as POST /v1/cases items."""
    split = breast_cancer.split()
    rows = [*split.x_test, *split.x_train]
    return [
        {
            "external_id": f"{prefix}-{i:04d}",
            "model": "breast-cancer",
            "priority": priority,
            "features": dict(zip(split.feature_names, map(float, x), strict=True)),
        }
        for i, x in enumerate(rows[:n])
    ]


def queued_messages(client: redis.Redis) -> dict[str, list[dict]]:
    """Messages waiting in each medbatch queue (kombu's Redis transport keeps a list per queue)."""
    out: dict[str, list[dict]] = {}
    for queue in ALL_QUEUES:
        out[queue] = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    return out


def queued_tile_messages(client: redis.Redis, queue: str) -> list[list[int]]:
    """The (job id, tile index) arguments of the tile messages waiting in ``queue``."""
    return [
        json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
        for raw in client.lrange(queue, 0, -1)
    ]


def queued_case_ids(client: redis.Redis) -> dict[str, list[int]]:
    """Case ids carried by the queued scoring messages, per queue."""
    out: dict[str, list[int]] = {}
    for queue, messages in queued_messages(client).items():
        ids: list[int] = []
        for message in messages:
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            ids += args[0]
        out[queue] = ids
    return out


def score_row(
    case_id: int, *, score: float, label: str, sha256: str = "0" * 64
) -> dict[str, object]:
    """A breast-cancer@1.0.0 score row as ``repo.save_scores`` takes it."""
    return {
        "case_id": case_id,
        "model_name": "breast-cancer",
        "model_version": "1.0.0",
        "model_sha256": sha256,
        "score": score,
        "label": label,
    }


def score_collecting_explanations(
    sessions: sessionmaker[Session], ids: list[int], load_model: ModelLoader, **options: Any
) -> tuple[Outcome, list[list[int]]]:
    """``score_cases`` on ``ids``; also the case ids of the explain messages it sent."""
    from worker.tasks.scoring import score_cases

    sent: list[list[int]] = []
    outcome = score_cases(
        ids, sessions=sessions, load_model=load_model, send_explanations=sent.append, **options
    )
    return outcome, sent


#: Genotypes and PLINK's own output for them, stored beside the tests.
GENOME_DATA = Path(__file__).resolve().parent / "data" / "genome"
#: (metric, ibs_missing, golden matrix file) for every PLINK matrix of hm3_small stored there.
PLINK_MATRICES = [
    ("grm", "frequency", "hm3_small.rel"),
    ("king", "frequency", "hm3_small.king"),
    ("ibs", "frequency", "hm3_small.mibs"),
    ("ibs", "flat", "hm3_small_flat.mibs"),
]

#: The project's shared data (read-only, beside the repository: ../shared), or where
#: MEDBATCH_SHARED_DIR points.
SHARED_DIR = Path(
    os.environ.get("MEDBATCH_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared")
)
ECG_RECORD = SHARED_DIR / "data" / "ecg" / "100"


def require_shared(path: Path) -> Path:
    """Skip, saying where it looked, when the shared data set is not beside this checkout."""
    if not path.parent.is_dir():
        pytest.skip(f"shared data not found at {path.parent} (set MEDBATCH_SHARED_DIR)")
    return path


def read_mitbih_212(record: Path = ECG_RECORD) -> np.ndarray:
    """Both leads of an MIT-BIH record in WFDB format 212, in ADC units, shape (samples, 2).

    Format 212: two 12-bit two's-complement samples in three bytes (PhysioNet's WFDB docs,
    signal(5)). The tests check the decoding against the checksums in the record's header.
    """
    raw = (
        np.fromfile(require_shared(record).with_suffix(".dat"), dtype=np.uint8)
        .reshape(-1, 3)
        .astype(np.int16)
    )
    first = raw[:, 0] | ((raw[:, 1] & 0x0F) << 8)
    second = raw[:, 2] | ((raw[:, 1] & 0xF0) << 4)
    samples = np.stack([first, second], axis=1)
    return np.where(samples >= 2048, samples - 4096, samples)


def mitbih_windows(
    n: int, *, length: int = 360, gain: float = 200.0, baseline: int = 1024
) -> list[list[float]]:
    """``n`` one-second windows of lead MLII in mV, every 10 s from the start of record 100."""
    mlii = (read_mitbih_212()[:, 0] - baseline) / gain
    return [[round(float(v), 4) for v in mlii[i * 3600 : i * 3600 + length]] for i in range(n)]


def tenant_headers(sessions: sessionmaker[Session], name: str) -> dict[str, str]:
    """A new tenant's own key, as the API's Authorization header."""
    with session_scope(sessions) as s:
        return {"Authorization": f"Bearer {repo.create_tenant(s, name=name)[1]}"}


def new_tenant(sessions: sessionmaker[Session], name: str) -> int:
    with session_scope(sessions) as s:
        return repo.create_tenant(s, name=name)[0].id


@contextmanager
def api_client(
    database_url: str, broker_url: str, tmp: Path, **settings: Any
) -> Iterator[TestClient]:
    """The API in this process (lifespan run), its artifact store under ``tmp``."""
    from api_shim.main import create_app

    store = tmp / "store"
    config = Settings(
        database_url=database_url, broker_url=broker_url, artifact_dir=store, **settings
    )
    with TestClient(create_app(config)) as client:
        yield client


def assert_refused(
    sessions: sessionmaker[Session],
    table: Any,
    submit: Callable[[], object],
    field: str,
    match: str,
) -> None:
    """A submission refused for ``field`` (message matching ``match``), with nothing recorded."""
    from worker.tiled import SubmissionError

    with pytest.raises(SubmissionError, match=match) as refused:
        submit()
    assert refused.value.field == field
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(table)) == 0


def post_job(api: TestClient, headers: dict[str, str], path: str, body: dict) -> dict:
    """Submit a tiled job through the API; it must be accepted (202). Returns the job."""
    response = api.post(path, headers=headers, json=body)
    assert response.status_code == 202, response.text
    return response.json()


def save_mlp(path: Path, n_inputs: int, *, hidden: tuple[int, ...]) -> StandardizedMLP:
    """A new ``StandardizedMLP``, its state dict written to ``path`` as safetensors."""
    from safetensors.torch import save_file

    from models.cases.architectures import StandardizedMLP

    mlp = StandardizedMLP(n_inputs, hidden=hidden).eval()
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(path))
    return mlp


def register_mlp(
    weights: Path,
    *,
    name: str,
    version: str,
    schema_path: Path,
    artifact_dir: Path,
    **params: Any,
) -> dict[str, Any]:
    """``register`` a safetensors state dict of the built-in MLP (``params`` as it was built)."""
    from models.cases.byo import register

    return register(
        weights,
        name=name,
        version=version,
        schema_path=schema_path,
        artifact_dir=artifact_dir,
        architecture="mlp",
        params=params,
    )


def register_breast_cancer(artifact_dir: Path, version: str, **schema: Any) -> dict[str, Any]:
    """Register a small MLP taking breast-cancer's inputs as ``breast-cancer@version`` (the
    schema's other fields, e.g. ``status``, from ``schema``)."""
    from models.cases.registry import Registry

    released = Registry.load().resolve("breast-cancer@1.0.0")
    folder = artifact_dir.parent / f"bc-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    schema_path = folder / "schema.json"
    inputs = [f.to_json() for f in released.inputs]
    schema_path.write_text(json.dumps({"inputs": inputs, "output": released.output, **schema}))
    weights = folder / "weights.safetensors"
    save_mlp(weights, len(inputs), hidden=(4,))
    return register_mlp(
        weights,
        name="breast-cancer",
        version=version,
        schema_path=schema_path,
        artifact_dir=artifact_dir,
        hidden=[4],
    )


def assert_same_tensors(fresh: Path, packaged: Path, *, atol: float) -> None:
    """Two safetensors files hold the same tensor names, each equal to within ``atol``."""
    from safetensors.numpy import load_file

    ours, theirs = load_file(str(fresh)), load_file(str(packaged))
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], atol=atol, err_msg=key)


def assert_retrained_is_packaged(
    report: TrainReport, spec: ModelSpec, metrics: dict[str, str]
) -> None:
    """A retrained model has the packaged weights (to 1e-4) and the held-out metrics recorded in
    its registry entry (to 1e-3); ``metrics`` maps the report's names to the entry's."""
    assert_same_tensors(report.artifact, spec.artifact, atol=1e-4)
    for ours, recorded in metrics.items():
        assert report.metrics[ours] == pytest.approx(spec.training[recorded], abs=1e-3), ours


def counting_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The artifacts hashed from now on (each sha256 check of a model load), in order."""
    from models.cases import registry as registry_module

    hashed: list[Path] = []
    real = registry_module.sha256_file

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(registry_module, "sha256_file", counting)
    return hashed
