"""Shared test data: real Wisconsin cases as API payloads, and broker inspection."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
