"""The API process loads no compute library: checked in a fresh interpreter, as it starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "numba", "rdkit", "captum")

_PROBE = """
import json, sys
from api_shim.main import create_app
from medbatch.settings import Settings
from starlette.testclient import TestClient

settings = Settings(database_url=sys.argv[1], broker_url=sys.argv[2], artifact_dir=sys.argv[3])
app = create_app(settings)
with TestClient(app) as client:
    status = client.get("/healthz").status_code
    docs = client.get("/openapi.json").status_code
print(json.dumps({"status": [status, docs], "loaded": [m for m in %r if m in sys.modules]}))
"""


def test_the_api_app_starts_and_answers_without_torch_numba_or_rdkit(
    tmp_path: Path, redis_url: str
) -> None:
    """Import api_shim.main, build the app, answer /healthz and /openapi.json: none is loaded."""
    db = f"sqlite:///{tmp_path / 'api.sqlite'}"
    out = subprocess.run(
        [sys.executable, "-c", _PROBE % (HEAVY,), db, redis_url, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["status"] == [200, 200]
    assert found["loaded"] == []


def test_the_probe_sees_a_heavy_import(tmp_path: Path) -> None:
    """The same check run on the worker's tasks does see torch: it can fail."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys, worker.tasks.scoring; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "True"
