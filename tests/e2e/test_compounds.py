"""Compound searches through real processes: a worker on the ``chem`` queue runs the tiles."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from rdkit import DataStructs, RDConfig
from rdkit.Chem import MolFromSmiles, rdFingerprintGenerator

from tests.e2e.support import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

NCI = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"


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
