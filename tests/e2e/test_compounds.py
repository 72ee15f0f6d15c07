"""Compound searches through real processes: a worker on the ``chem`` queue runs the tiles."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from rdkit import DataStructs, RDConfig
from rdkit.Chem import MolFromSmiles, rdFingerprintGenerator

from tests.e2e.support import Processes, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

NCI = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "compounds"


def test_cli_search_runs_on_chem_workers_and_equals_rdkit(
    processes: Processes, tmp_path: Path
) -> None:
    lines = [line for line in NCI.read_text().splitlines() if line.strip()]
    library, query = tmp_path / "library.smi", tmp_path / "query.smi"
    library.write_text("\n".join(lines[:400]) + "\n")
    query.write_text("\n".join(lines[1000:1010]) + "\n")
    processes.env["MEDBATCH_ARTIFACT_DIR"] = str(tmp_path / "store")
    processes.start(
        "worker", "worker", "--queues", "chem", "--hostname", f"c-{uuid.uuid4().hex[:6]}@%h"
    )
    out = tmp_path / "neighbours.csv"
    result = subprocess.run(
        [
            sys.executable, "-m", "medbatch.cli", "compounds", "search",
            "--library", str(library), "--query", str(query), "--top-k", "4",
            "--tile-rows", "3", "--out", str(out),
        ],
        env=processes.env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr + processes.log("worker")[-2000:]
    assert "4 tiles" in result.stdout
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    assert len(rows) == 40
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    ids = [line.split()[1] for line in lines[:400]]
    fps = [generator.GetFingerprint(MolFromSmiles(line.split()[0])) for line in lines[:400]]
    q_smiles = [line.split()[0] for line in lines[1000:1010]]
    for qi, smiles in enumerate(q_smiles):
        sims = DataStructs.BulkTanimotoSimilarity(
            generator.GetFingerprint(MolFromSmiles(smiles)), fps
        )
        best = sorted(range(400), key=lambda j: (-sims[j], j))[:4]
        mine = rows[qi * 4 : qi * 4 + 4]
        assert [r[1] for r in mine] == [ids[j] for j in best]
        assert [float(r[2]) for r in mine] == [sims[j] for j in best]


def test_cli_search_leaves_the_job_to_the_workers_unless_told_to_wait(
    processes: Processes, tmp_path: Path
) -> None:
    """As `genome compare`: without --wait (or --out) the search is submitted and the command
    says how to follow it; `compounds status` shows it done once a chem worker ran it; --wait
    shows the tiles' progress until the job is done, then its output."""
    processes.env["MEDBATCH_ARTIFACT_DIR"] = str(tmp_path / "store")
    search = (
        "compounds", "search", "--library", str(EXAMPLES / "library.sdf"),
        "--query", str(EXAMPLES / "hits.smi"), "--top-k", "2", "--tile-rows", "2",
    )  # fmt: skip

    def status(job_id: int) -> dict:  # type: ignore[type-arg]
        shown = processes.run_cli("compounds", "status", str(job_id))
        assert shown.returncode == 0, shown.stderr
        return json.loads(shown.stdout)  # type: ignore[no-any-return]

    submitted = processes.run_cli(*search)  # no worker listens yet: it must not wait for one
    assert submitted.returncode == 0, submitted.stderr
    found = re.search(r"compound search (\d+): .* 3 tiles", submitted.stdout)
    assert found, submitted.stdout
    job_id = int(found.group(1))
    assert f"follow it: medbatch compounds status {job_id}" in submitted.stdout
    assert status(job_id)["status"] == "queued"
    worker = processes.start(
        "worker", "worker", "--queues", "chem", "--hostname", f"c-{uuid.uuid4().hex[:6]}@%h"
    )
    wait_for(lambda: status(job_id)["status"] == "done", worker=worker, processes=processes)
    done = status(job_id)
    assert done["tiles_done"] == 3
    assert len(Path(done["output"]).read_text().splitlines()) == 1 + 5 * 2

    waited = processes.run_cli(*search, "--wait")
    assert waited.returncode == 0, waited.stderr + processes.log("worker")[-2000:]
    assert "follow it" not in waited.stdout
    assert re.search(r"tiles .* 3/3", waited.stdout), waited.stdout
    output = waited.stdout.splitlines()[-1].strip()
    assert output.endswith("neighbours.csv")
    assert Path(output).read_text() == Path(done["output"]).read_text()
