"""`medbatch demo` in an empty folder on the embedded defaults (SQLite, the embedded broker), as a
new user runs it: every job kind, and every picture it names exists and is a PNG."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_demo_shows_every_job_kind_and_writes_its_pictures(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDBATCH_")}
    # No shared data: the demo falls back to examples/, the same on every machine.
    env |= {"MEDBATCH_SHARED_DIR": str(tmp_path / "no-shared"), "MEDBATCH_WORKER_METRICS_PORT": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "medbatch.cli", "demo"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-2000:]
    assert "114 scored, 0 failed" in out and "ROC AUC 0.9997" in out
    assert "RiskAssessment/" in out
    assert re.search(
        r"│\s+3 │\s+2 │\s+1 │\s+2 │\s+0 │", out
    )  # nightly: read, new, rejected, scored
    assert re.search(r"hm3_small against hm3_small\s+│\s+60 │", out)  # each sample its duplicate
    assert re.search(r"dexibuprofen\s+│ ibuprofen 1\.00", out)
    pictures = re.findall(r"(var/demo/[\w-]+\.png)", out)
    assert len(set(pictures)) == 5
    for picture in set(pictures):
        assert (tmp_path / picture).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "/v1/genome-comparisons/1/plots/kinship.png" in out
    assert not (tmp_path / "var" / "broker.sock").exists()  # the broker stopped with the demo
