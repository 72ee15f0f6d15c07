"""Compound-similarity jobs on the real databases: tiled results equal RDKit's brute force under
the tie-break, unreadable records are reported and skipped, bad requests leave no job."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem, DataStructs, RDConfig
from rdkit.Chem import rdFingerprintGenerator
from sqlalchemy.orm import Session, sessionmaker

from db import compounds as jobs
from db.engine import session_scope
from db.tables import CompoundJob
from models.compounds import chem
from tests.helpers import assert_refused, new_tenant
from worker.tasks import compounds as tasks

pytestmark = pytest.mark.integration

NCI = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """300 real NCI molecules as the library (with a duplicate, for ties), 12 queries and one
    SMILES RDKit cannot read."""
    lines = [line for line in NCI.read_text().splitlines() if line.strip()][:300]
    library = tmp_path / "library.smi"
    library.write_text("\n".join([*lines, lines[5].split()[0] + " DUP5"]) + "\n")
    query = tmp_path / "query.smi"
    query.write_text("\n".join([*lines[:6], "C1CC(N bad-ring", *lines[100:106]]) + "\n")
    return library, query


def _submit(sessions: sessionmaker[Session], artifact_dir: Path, **request: object) -> dict:
    """A compound search for a new tenant."""
    tenant_id = new_tenant(sessions, "pharmacy")
    return tasks.submit(sessions, None, tenant_id=tenant_id, artifact_dir=artifact_dir, **request)


def _neighbours(sessions: sessionmaker[Session], job_id: int) -> list:
    with session_scope(sessions) as s:
        return jobs.list_neighbours(s, job_id=job_id, limit=100_000)


def _ranked(rows: list) -> dict[int, list[tuple]]:
    """Each query's (library index, similarity) neighbours, best rank first."""
    got: dict[int, list[tuple]] = {}
    for r in sorted(rows, key=lambda r: (r.query_index, r.rank)):
        got.setdefault(r.query_index, []).append((r.library_index, r.similarity))
    return got


def _rdkit(path: Path) -> tuple[list[str], list]:
    """Ids and RDKit Morgan fingerprints (r=2, 2048 bits) of the readable molecules."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    ids, fps = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        smiles, *rest = line.split(None, 1)
        mol = Chem.MolFromSmiles(smiles)
        if mol is not None:
            ids.append(rest[0].strip() if rest else str(number))
            fps.append(generator.GetFingerprint(mol))
    RDLogger.EnableLog("rdApp.*")
    return ids, fps


def _brute_top_k(query: list, library: list, k: int, skip_self: bool) -> list[list[tuple]]:
    out = []
    for qi, fp in enumerate(query):
        sims = np.array(DataStructs.BulkTanimotoSimilarity(fp, library))
        order = sorted(range(len(sims)), key=lambda j: (-sims[j], j))
        order = [j for j in order if not (skip_self and j == qi)][:k]
        out.append([(j, sims[j]) for j in order])
    return out


@pytest.mark.parametrize("chem_engine", ["auto", "popcount", "gemm"])
def test_tiled_top_k_equals_rdkit_brute_force_and_reports_unreadable_lines(
    sessions: sessionmaker[Session], tmp_path: Path, files: tuple[Path, Path], chem_engine: str
) -> None:
    """The same on every engine (MEDBATCH_CHEM_ENGINE reaches the tiles)."""
    library, query = files
    job = _submit(sessions, tmp_path / "store", library=library, query=query, top_k=5, tile_rows=5)
    assert (job["n_query"], job["n_library"], job["tiles_total"]) == (12, 301, 3)
    assert job["unreadable"] == 1 and "line 7" in job["unreadable_examples"][0]
    assert job["repeated_ids"] == {"library": 0, "query": 0}
    summary = tasks.run_inline(
        sessions,
        job_id=job["id"],
        device="cpu",
        engine=chem_engine,  # type: ignore[arg-type]
        engine_cache=tmp_path / "chem-engine.json",
    )
    assert summary["status"] == "done", summary["error"]
    q_ids, q_fps = _rdkit(query)
    _, l_fps = _rdkit(library)
    expected = _brute_top_k(q_fps, l_fps, 5, skip_self=False)
    rows = _neighbours(sessions, job["id"])
    got = _ranked(rows)
    for qi, want in enumerate(expected):
        assert got[qi] == want  # same neighbours, same order, bit-identical similarities
    assert {r.query_id for r in rows} == set(q_ids)
    csv_lines = Path(summary["output"]).read_text().splitlines()
    assert csv_lines[0] == "query_id,library_id,similarity,rank" and len(csv_lines) == 61


def test_csv_and_sdf_ids_name_the_neighbours_of_a_job(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A CSV's ``id`` column (or the one ``id_column`` names) names the neighbours, not the
    line numbers; an SDF's ``id_column`` data item, not its title (or record number)."""
    query = tmp_path / "query.csv"
    query.write_text("id,smiles,name\nQ-1,CCO,ethanol\nQ-2,c1ccccc1O,phenol\n")
    library = tmp_path / "library.sdf"
    with Chem.SDWriter(str(library)) as writer:
        for smiles, title, name in (("OCC", "", "L-1"), ("Oc1ccccc1", "T-2", "L-2")):
            mol = Chem.MolFromSmiles(smiles)
            mol.SetProp("_Name", title)
            mol.SetProp("name", name)
            writer.write(mol)
    tenant_id = new_tenant(sessions, "pharmacy")
    for id_column, want in ((None, {"Q-1", "Q-2"}), ("name", {"ethanol", "phenol"})):
        job = tasks.submit(
            sessions,
            None,
            tenant_id=tenant_id,
            artifact_dir=tmp_path / "store",
            library=library,
            query=query,
            top_k=1,
            id_column=id_column,
        )
        summary = tasks.run_inline(sessions, job_id=job["id"], device="cpu")
        assert summary["status"] == "done", summary["error"]
        rows = _neighbours(sessions, job["id"])
        assert {r.query_id for r in rows} == want
        assert {r.library_id for r in rows} == (
            {"1", "T-2"} if id_column is None else {"L-1", "L-2"}
        )


def test_ids_that_repeat_are_counted_per_file(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Neighbours are named by ids: a library where two molecules share one was searched
    without a word, and its hits could not be told apart."""
    library = tmp_path / "library.smi"
    library.write_text("CCO A\nc1ccccc1 A\nCCN B\nCCC A\n")
    query = tmp_path / "query.smi"
    query.write_text("CCO q\n")
    job = _submit(sessions, tmp_path / "store", library=library, query=query, top_k=2)
    assert job["repeated_ids"] == {"library": 2, "query": 0}
    with session_scope(sessions) as s:
        found = jobs.get_job(s, job_id=job["id"])
        assert found is not None
        assert tasks.describe(found)["repeated_ids"] == {"library": 2, "query": 0}


def test_the_csv_is_in_query_order_when_the_tiles_were_stored_out_of_order(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Workers finish tiles in any order. The CSV was sorted only within batches of 50,000
    stored rows, so a query's rows (and the queries) came out of order past the first batch."""
    lines = [line for line in NCI.read_text().splitlines() if line.strip()][:250]
    library = tmp_path / "library.smi"
    library.write_text("\n".join(lines) + "\n")
    job = _submit(
        sessions, tmp_path / "store", library=library, query=None, threshold=0.0, tile_rows=125
    )
    assert job["tiles_total"] == 2
    for index in (1, 0):  # the second tile stored first
        tasks.run_tile(sessions, job_id=job["id"], index=index, device="cpu")
    with session_scope(sessions) as s:
        found = jobs.get_job(s, job_id=job["id"])
        assert found is not None and found.status == "done", found and found.error
        output = Path(tasks.describe(found)["output"])
    ids = [line.split()[1] for line in lines]
    with output.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 250 * 249  # every pair at threshold 0, no self pairs
    got = [(ids.index(r["query_id"]), int(r["rank"])) for r in rows]
    assert got == sorted(got) and got[0] == (0, 1) and got[-1] == (249, 249)


@pytest.mark.parametrize(
    ("new", "later_s"), [("c1ccccc1 B\nCCO A\nCCN C\n", 0), ("c1ccccc1 B\nCCO A\n", 10)]
)
def test_a_library_changed_after_submission_fails_the_job_instead_of_pairing_other_molecules(
    sessions: sessionmaker[Session], tmp_path: Path, new: str, later_s: int
) -> None:
    """The tiles read the files again: a library edited while the job waited was searched as
    it now was, its rows named by the new file, under the counts of the old one."""
    library = tmp_path / "library.smi"
    library.write_text("CCO A\nc1ccccc1 B\n")
    query = tmp_path / "query.smi"
    query.write_text("CCO q\n")
    job = _submit(sessions, tmp_path / "store", library=library, query=query, top_k=1)
    before = library.stat().st_mtime
    library.write_text(new)  # another size, or the same size saved later
    if later_s:
        os.utime(library, (before + later_s, before + later_s))
    summary = tasks.run_inline(sessions, job_id=job["id"], device="cpu")
    assert summary["status"] == "failed"
    assert (
        "library" in summary["error"]
        and "changed since the search was submitted" in (summary["error"])
    )
    assert _neighbours(sessions, job["id"]) == []


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("morgan", "morgan r=3 1024 bits"),
        ("feature-morgan", "feature-morgan r=3 1024 bits"),
        ("rdkit", "rdkit 1024 bits"),
        ("atom-pair", "atom-pair 1024 bits"),
        ("torsion", "torsion 1024 bits"),
    ],
)
def test_a_radius_is_described_only_for_the_morgan_kinds(
    sessions: sessionmaker[Session], tmp_path: Path, kind: str, words: str
) -> None:
    """ "rdkit r=3" read as a path length the RDKit fingerprint was never given."""
    library = tmp_path / "library.smi"
    library.write_text("CCO A\nc1ccccc1 B\n")
    job = _submit(
        sessions,
        tmp_path / "store",
        library=library,
        query=None,
        top_k=1,
        kind=kind,
        radius=3,
        fp_size=1024,
    )
    assert job["fingerprint"] == words


def test_the_chem_engine_setting_reaches_the_tiles(
    sessions: sessionmaker[Session], tmp_path: Path, files: tuple[Path, Path]
) -> None:
    """MEDBATCH_CHEM_ENGINE=cuda: the job runs on the GPU where there is one, else it fails at
    once with the reason (a setting no retry can mend)."""
    library, query = files
    job = _submit(sessions, tmp_path / "store", library=library, query=query, top_k=3)
    summary = tasks.run_inline(sessions, job_id=job["id"], device="auto", engine="cuda")
    if torch.cuda.is_available():
        assert summary["status"] == "done", summary["error"]
    else:
        assert summary["status"] == "failed"
        assert "MEDBATCH_CHEM_ENGINE=cuda but torch sees no CUDA device" in summary["error"]


def test_all_pairs_excludes_each_molecule_itself_and_breaks_ties_by_index(
    sessions: sessionmaker[Session], tmp_path: Path, files: tuple[Path, Path]
) -> None:
    library, _ = files
    job = _submit(sessions, tmp_path / "store", library=library, query=None, top_k=3, tile_rows=64)
    assert tasks.run_inline(sessions, job_id=job["id"], device="cpu")["status"] == "done"
    _, fps = _rdkit(library)
    expected = _brute_top_k(fps, fps, 3, skip_self=True)
    got = _ranked(_neighbours(sessions, job["id"]))
    assert [got[i] for i in range(len(fps))] == expected
    assert got[5][0] == (300, 1.0) and got[300][0] == (5, 1.0)  # the duplicate finds its twin


def test_threshold_hits_equal_rdkits(
    sessions: sessionmaker[Session], tmp_path: Path, files: tuple[Path, Path]
) -> None:
    library, query = files
    job = _submit(sessions, tmp_path / "store", library=library, query=query, threshold=0.3)
    assert tasks.run_inline(sessions, job_id=job["id"], device="cpu")["status"] == "done"
    _, q_fps = _rdkit(query)
    _, l_fps = _rdkit(library)
    expected = {
        (qi, j, s)
        for qi, fp in enumerate(q_fps)
        for j, s in enumerate(DataStructs.BulkTanimotoSimilarity(fp, l_fps))
        if s >= 0.3
    }
    rows = _neighbours(sessions, job["id"])
    assert {(r.query_index, r.library_index, r.similarity) for r in rows} == expected
    assert expected  # the threshold really selects something


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"top_k": 5, "threshold": 0.5}, "mode", "exactly one"),
        ({}, "mode", "exactly one"),
        ({"top_k": 0}, "top_k", "between 1 and 1000"),
        ({"threshold": 1.5}, "threshold", "between 0 and 1"),
        ({"top_k": 5, "library": Path("/nonexistent/lib.smi")}, "library", "not found"),
        # --tile-rows -1 made one tile of rows 0:-1: the last query was dropped, the job "done".
        ({"top_k": 5, "tile_rows": -1}, "tile_rows", "0 \\(automatic\\) or more"),
        # --radius -1 was an OverflowError traceback, --bits 0 a refusal of --library.
        ({"top_k": 5, "radius": -1}, "radius", "between 0 and 6"),
        ({"top_k": 5, "fp_size": 0}, "bits", "between 64 and 16384"),
    ],
)
def test_bad_requests_are_refused_and_leave_no_job(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    files: tuple[Path, Path],
    kwargs: dict,
    field: str,
    fragment: str,
) -> None:
    library, query = files
    arguments = {"library": library, "query": query, **kwargs}
    submit = lambda: _submit(sessions, tmp_path, **arguments)  # noqa: E731
    assert_refused(sessions, CompoundJob, submit, field, fragment)


def test_a_file_with_no_readable_molecule_is_refused(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.smi"
    bad.write_text("C1CC(N x\nnot_a_smiles y\n")
    with pytest.raises(tasks.SubmissionError, match="no molecule could be read"):
        _submit(sessions, tmp_path, library=bad, query=None, top_k=3)
    assert chem  # the module under test is importable without a worker


def test_a_tile_whose_results_cannot_be_stored_fails_its_job_after_its_attempts(
    sessions: sessionmaker[Session], tmp_path: Path, files: tuple[Path, Path]
) -> None:
    """A failure storing a tile's rows was raised and never counted: the job stayed 'running'
    however often the sweeper sent the tile again."""
    import dataclasses

    from worker import tiled

    def store(session: Session, job_id: int, rows: list) -> None:
        raise RuntimeError("the INSERT failed")

    kind = dataclasses.replace(tasks.TILES, store=store)
    library, query = files
    job = _submit(sessions, tmp_path / "store", library=library, query=query, top_k=3)
    options = {"device": "cpu", "engine": "auto", "engine_cache": tmp_path / "engine.json"}
    for _ in range(kind.max_attempts - 1):
        with pytest.raises(RuntimeError):
            tiled.run_tile(kind, sessions, job_id=job["id"], index=0, options=options)
    assert tiled.run_tile(kind, sessions, job_id=job["id"], index=0, options=options) == "failed"
    summary = tasks.describe_id(sessions, job["id"])
    assert summary["status"] == "failed" and "the INSERT failed" in summary["error"]


def test_a_database_outage_while_a_tile_is_stored_never_fails_its_job(
    sessions: sessionmaker[Session], tmp_path: Path, files: tuple[Path, Path]
) -> None:
    """The database away while a tile's rows go in: raised for the tile to be sent again, as
    often as it takes; the job is not failed for it (only a row the database refuses is)."""
    import dataclasses

    from sqlalchemy.exc import OperationalError

    from worker import tiled

    def store(session: Session, job_id: int, rows: list) -> None:
        raise OperationalError("INSERT", {}, ConnectionError("server closed the connection"))

    kind = dataclasses.replace(tasks.TILES, store=store)
    library, query = files
    job = _submit(sessions, tmp_path / "store", library=library, query=query, top_k=3)
    options = {"device": "cpu", "engine": "auto", "engine_cache": tmp_path / "engine.json"}
    for _ in range(kind.max_attempts + 2):
        with pytest.raises(OperationalError):
            tiled.run_tile(kind, sessions, job_id=job["id"], index=0, options=options)
    assert tasks.describe_id(sessions, job["id"])["status"] != "failed"
    assert tiled.run_tile(tasks.TILES, sessions, job_id=job["id"], index=0, options=options) in (
        "tile done",
        "finished job",
    )


def test_a_line_that_is_not_utf8_is_reported_with_its_number_and_the_rest_is_read(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """One Latin-1 name refused the whole file, with a byte offset into a decoding buffer
    ('position 7605') for a place."""
    library = tmp_path / "latin1.smi"
    library.write_bytes(b"CCO ethanol\nCCN caf\xe9\nc1ccccc1O phenol\nCC(=O)O acid\n")
    job = _submit(sessions, tmp_path / "store", library=library, query=None, top_k=1)
    assert (job["n_library"], job["unreadable"]) == (3, 1)
    assert "line 2" in job["unreadable_examples"][0]
    assert "not UTF-8" in job["unreadable_examples"][0]
    assert tasks.run_inline(sessions, job_id=job["id"], device="cpu")["status"] == "done"
    assert {r.query_id for r in _neighbours(sessions, job["id"])} == {"ethanol", "phenol", "acid"}


@pytest.mark.parametrize("suffix", [".smi", ".sdf", ".csv"])
def test_not_utf8_records_of_every_format_are_reported(tmp_path: Path, suffix: str) -> None:
    from rdkit import Chem

    if suffix == ".smi":
        data = b"CCO ok\nCCN caf\xe9\n"
    elif suffix == ".csv":  # a column that is not read may hold anything
        data = b"smiles,name\nCCO,ok\nCC\xe9,x\nCCN,caf\xe9\n"
    else:
        blocks = []
        for smiles, title in (("CCO", "ok"), ("CCN", "caf\u00e9")):
            mol = Chem.MolFromSmiles(smiles)
            mol.SetProp("_Name", title)
            blocks.append(Chem.MolToMolBlock(mol) + "$$$$\n")
        data = "".join(blocks).encode("latin-1")
    path = tmp_path / f"mixed{suffix}"
    path.write_bytes(data)
    read = tasks.read_molecules(path)
    assert len(read) == (2 if suffix == ".csv" else 1) and len(read.failures) == 1
    assert read.failures[0].record == (3 if suffix == ".csv" else 2)
    assert "not UTF-8" in str(read.failures[0])
    str(read.failures[0]).encode("utf-8")  # storable: no lone surrogates


def test_a_file_with_no_readable_molecule_says_how_many_and_why(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The refusal counts the unreadable records and shows the first, with RDKit's reason."""
    bad = tmp_path / "bad.smi"
    bad.write_text("C1CC(N x\nnot_a_smiles y\n")
    with pytest.raises(tasks.SubmissionError) as refused:
        _submit(sessions, tmp_path, library=bad, query=None, top_k=3)
    message = str(refused.value)
    assert "2 records RDKit could not read" in message
    assert "line 1 ('C1CC(N')" in message and "SMILES Parse Error" in message


def test_ids_the_neighbours_table_cannot_hold_are_reported_not_left_running(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """An id over 200 characters, or with a NUL byte, failed every tile's INSERT on PostgreSQL
    (value too long; NUL in text), and the job stayed 'running' for ever."""
    library = tmp_path / "ids.smi"
    library.write_text(f"CCO {'x' * 201}\nCCN a\x00b\nCCC ok\nCCCl fine\n")
    job = _submit(sessions, tmp_path / "store", library=library, query=None, top_k=1)
    assert (job["n_library"], job["unreadable"]) == (2, 2)
    examples = " ".join(job["unreadable_examples"])
    assert "longer than 200 characters" in examples and "NUL" in examples
    assert "x" * 201 not in examples
    assert tasks.run_inline(sessions, job_id=job["id"], device="cpu")["status"] == "done"
