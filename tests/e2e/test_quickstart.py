"""The README's quickstart, run as written (its shell blocks, in order, in bash) against the real
PostgreSQL and Redis: a live API, a real worker, the CLI. Only the port changes (8000 may be taken
on a shared machine). If the README's commands rot, this fails."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.tables import Case, CaseStatus, CompoundJob, GenomeJob
from tests.e2e.support import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def quickstart_blocks(readme: str) -> list[str]:
    """The ```bash blocks between the quickstart markers."""
    start, end = readme.index("<!-- quickstart -->"), readme.index("<!-- /quickstart -->")
    blocks = re.findall(r"```bash\n(.*?)```", readme[start:end], re.S)
    assert len(blocks) >= 5, "the quickstart lost its blocks"
    return blocks


def test_the_readme_quickstart_runs_as_written(
    pg_url: str, pg_engine, redis_url: str, pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    port = str(free_port())
    script = "\n".join(quickstart_blocks((ROOT / "README.md").read_text()))
    assert script.count("8000") >= 5
    # Fail on the first failing command; stop what the script left running, whatever happens,
    # and wait for it: a worker's warm shutdown finishes its tile, and its writes must not meet
    # the teardown's TRUNCATE (a deadlock in CI once).
    harness = (
        "set -euo pipefail\n"
        "trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT\n"
    )
    (tmp_path / "quickstart.sh").write_text(harness + script.replace("8000", port))
    for name in ("examples", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {
        **os.environ,
        "MEDBATCH_DATABASE_URL": pg_url,
        "MEDBATCH_BROKER_URL": redis_url,
        "MEDBATCH_DEVICE": "cpu",
        "MEDBATCH_WORKER_METRICS_PORT": "0",
    }
    result = subprocess.run(
        ["bash", "quickstart.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in tmp_path.glob("*.log"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs
    out = result.stdout
    assert "accepted 5 cases: ids" in out and "5 new, 0 already there" in out
    assert '"created":false' in out  # the same cases again over HTTP
    assert "RiskAssessment?subject=Patient/example-1" in out
    assert "3 patients read: 2 new cases, 0 already there, 1 patients rejected" in out
    assert "scored 2, failed 0" in out
    assert "18 pairs with kinship > 0.0442" in out
    assert (tmp_path / "results" / "hm3.kin0").is_file()
    assert (tmp_path / "results" / "neighbours.csv").read_text().startswith("query_id,")
    assert "Traceback" not in result.stderr
    with pg_sessions() as s:
        assert s.scalar(select(func.count()).where(Case.status == CaseStatus.done)) == 8
        # The CLI's jobs ran on the worker (--wait); the API's were recorded (and may still run).
        for table in (GenomeJob, CompoundJob):
            statuses = sorted(str(x) for x in s.scalars(select(table.status).order_by(table.id)))
            assert len(statuses) == 2 and statuses[0] == "done", (table, statuses)
