"""Genome comparisons through real processes: the API queues tiles on ``genome``, a real worker
runs them, and the outputs are byte for byte what PLINK wrote for the same fileset."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.support import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

DATA = Path(__file__).resolve().parents[1] / "data" / "genome"


@pytest.fixture
def processes(processes: Processes, tmp_path: Path) -> Processes:
    processes.env["MEDBATCH_GENOTYPE_DIR"] = str(DATA)
    processes.env["MEDBATCH_ARTIFACT_DIR"] = str(tmp_path / "store")
    return processes


def _genome_worker(processes: Processes) -> subprocess.Popen[bytes]:
    return processes.start(
        "worker", "worker", "--queues", "genome", "--hostname", f"g-{uuid.uuid4().hex[:6]}@%h"
    )


def test_king_job_over_http_is_run_by_a_worker_and_matches_plink(
    processes: Processes, api: httpx.Client
) -> None:
    worker = _genome_worker(processes)
    response = api.post(
        "/v1/genome-comparisons", json={"metric": "king", "bfile": "hm3_small", "tile_rows": 16}
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while (job := api.get(f"/v1/genome-comparisons/{job_id}").json())["status"] != "done":
        assert job["status"] != "failed", job["error"]
        assert worker.poll() is None, processes.log("worker")[-3000:]
        assert time.monotonic() < deadline, processes.log("worker")[-3000:]
        time.sleep(0.3)
    assert job["tiles_done"] == job["tiles_total"] == 4
    outputs = {Path(p).name: p for p in job["outputs"]}
    assert api.get(outputs["king.king"]).content == (DATA / "hm3_small.king").read_bytes()
    assert api.get(outputs["king.king.id"]).content == (DATA / "hm3_small.king.id").read_bytes()
    assert "king.kin0" in outputs and "king.npy" in outputs


def test_pairs_job_is_shared_by_two_workers_and_is_plink2s_table(
    processes: Processes, api: httpx.Client
) -> None:
    """ "output": "pairs" over HTTP: 2-D tiles taken by two real workers; plink2's .kin0."""
    workers = [_genome_worker(processes), _genome_worker(processes)]
    response = api.post(
        "/v1/genome-comparisons",
        json={"metric": "king", "bfile": "hm3_relatives", "output": "pairs", "block": 16,
              "threshold": 0.0442},
    )  # fmt: skip
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 180
    while (job := api.get(f"/v1/genome-comparisons/{job_id}").json())["status"] != "done":
        assert job["status"] != "failed", job["error"]
        assert all(w.poll() is None for w in workers), processes.log("worker")[-3000:]
        assert time.monotonic() < deadline, processes.log("worker")[-3000:]
        time.sleep(0.3)
    assert job["tiles_done"] == job["tiles_total"] == 6 * 7 // 2
    assert job["degree_counts"]["1st"] == 36
    (kin0,) = job["outputs"]
    assert api.get(kin0).content == (DATA / "hm3_relatives_0.0442.kin0").read_bytes()


def test_cli_compare_waits_for_the_workers_and_copies_the_outputs(
    processes: Processes, tmp_path: Path
) -> None:
    _genome_worker(processes)
    out = tmp_path / "out" / "cohort"
    result = subprocess.run(
        [
            sys.executable, "-m", "medbatch.cli", "genome", "compare",
            "--bfile", str(DATA / "hm3_small"), "--metric", "grm",
            "--tile-rows", "25", "--out", str(out),
        ],
        env=processes.env,
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr + processes.log("worker")[-2000:]
    assert "3 tiles on the genome queue" in result.stdout
    assert Path(f"{out}.rel").read_bytes() == (DATA / "hm3_small.rel").read_bytes()
    assert Path(f"{out}.rel.id").read_bytes() == (DATA / "hm3_small.rel.id").read_bytes()


def test_cli_refuses_a_bad_fileset_naming_the_option(processes: Processes, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "medbatch.cli", "genome", "compare",
            "--bfile", str(tmp_path / "missing"), "--metric", "king", "--inline",
        ],
        env=processes.env,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--bfile" in result.stderr and "missing.bed not found" in result.stderr
