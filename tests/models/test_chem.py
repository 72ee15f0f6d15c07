"""models/chem.py against RDKit itself, on molecules shipped in the RDKit wheel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem, DataStructs, RDConfig

from models import chem

NCI = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
N_QUERIES = 300


@pytest.fixture(scope="module")
def nci() -> chem.Molecules:
    return chem.read_smiles(NCI)


def _bitvects(mols: chem.Molecules, kind: chem.FingerprintKind) -> list:
    return list(chem.fingerprint_generator(kind).GetFingerprints(list(mols.mols)))


def _rdkit(query: list, library: list, metric: chem.Metric) -> np.ndarray:
    bulk = (
        DataStructs.BulkTanimotoSimilarity
        if metric == "tanimoto"
        else DataStructs.BulkDiceSimilarity
    )
    return np.array([bulk(bv, library) for bv in query])


def _brute_top_k(full: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    columns = np.broadcast_to(np.arange(full.shape[1]), full.shape)
    order = np.lexsort((columns, -full), axis=1)[:, :k]
    return order, np.take_along_axis(full, order, axis=1)


def test_reads_the_nci_set_and_reports_what_rdkit_rejects(nci: chem.Molecules) -> None:
    """RDKit's NCI sample: 4,999 lines, 8 of which RDKit's sanitizer rejects."""
    assert len(nci) + len(nci.failures) == 4999
    assert len(nci.failures) == 8
    assert all("valence" in f.reason or "kekulize" in f.reason for f in nci.failures)
    assert nci.ids[0] == "1" and nci.records[0] == 1


@pytest.mark.parametrize("kind", ["morgan", "feature-morgan", "rdkit", "atom-pair", "torsion"])
def test_packed_bits_are_rdkits(nci: chem.Molecules, kind: chem.FingerprintKind) -> None:
    """Packing keeps every bit, and to_bitvects gives RDKit's vectors back."""
    mols = chem.Molecules(nci.mols[:200], nci.ids[:200], nci.records[:200], ())
    fps = chem.fingerprints(mols, kind=kind)
    reference = _bitvects(mols, kind)
    assert fps.ids == mols.ids
    assert fps.popcounts.tolist() == [bv.GetNumOnBits() for bv in reference]
    assert all(a == b for a, b in zip(fps.to_bitvects(), reference, strict=True))


@pytest.mark.parametrize("metric", ["tanimoto", "dice"])
@pytest.mark.parametrize("kind", ["morgan", "rdkit", "atom-pair"])
def test_similarity_is_bit_identical_to_rdkit(
    nci: chem.Molecules, kind: chem.FingerprintKind, metric: chem.Metric
) -> None:
    """Every score equals DataStructs.Bulk*Similarity's float64, bit for bit."""
    bvs = _bitvects(nci, kind)
    fps = chem.Fingerprints.from_bitvects(bvs)
    if kind == "rdkit":  # paths up to 7 bonds: popcounts above 256, so the int8 GEMM
        assert fps.popcounts.max() > 256
    ours = chem.similarity(fps.take(range(N_QUERIES)), fps, metric=metric, device="cpu")
    assert np.array_equal(ours, _rdkit(bvs[:N_QUERIES], bvs, metric))


def test_int8_path_matches_bf16_path(nci: chem.Molecules, monkeypatch: pytest.MonkeyPatch) -> None:
    """Morgan counts fit bfloat16; forcing the int8 GEMM gives the same numbers."""
    fps = chem.fingerprints(nci)
    query = fps.take(range(N_QUERIES))
    bf16 = chem.similarity(query, fps, device="cpu")
    monkeypatch.setattr(chem, "_BF16_EXACT_COUNT", 0)
    assert np.array_equal(chem.similarity(query, fps, device="cpu"), bf16)


def test_empty_fingerprints_score_as_rdkit() -> None:
    """RDKit returns 0 for two empty fingerprints (0/0), for Tanimoto and Dice."""
    empty, one = DataStructs.ExplicitBitVect(64), DataStructs.ExplicitBitVect(64)
    one.SetBit(5)
    bvs = [empty, one, DataStructs.ExplicitBitVect(64)]
    fps = chem.Fingerprints.from_bitvects(bvs)
    for metric in chem.METRICS:
        assert np.array_equal(chem.similarity(fps, fps, metric=metric), _rdkit(bvs, bvs, metric))
    assert chem.similarity(fps, fps)[0, 2] == 0.0


@pytest.fixture(scope="module")
def with_duplicates(nci: chem.Molecules) -> chem.Fingerprints:
    """NCI Morgan fingerprints with copies of some molecules scattered through them: ties."""
    fps = chem.fingerprints(nci)
    rows = np.arange(2000)
    copies = np.repeat([3, 10, 500, 1999], 4)
    order = np.random.default_rng(7).permutation(rows.size + copies.size)
    return fps.take(np.concatenate([rows, copies])[order])


@pytest.mark.parametrize(("library_block", "query_block"), [(97, 31), (2048, 512)])
@pytest.mark.parametrize("metric", ["tanimoto", "dice"])
def test_top_k_equals_brute_force_with_ties(
    with_duplicates: chem.Fingerprints, metric: chem.Metric, library_block: int, query_block: int
) -> None:
    """Top 10 as a full sort would give it: best first, equal scores by lower library index."""
    library = with_duplicates
    query = library.take(range(0, len(library), 7))
    full = chem.similarity(query, library, metric=metric)
    index, score = _brute_top_k(full, 10)
    assert (score[:, :-1] == score[:, 1:]).any()  # the ties are there
    got = chem.top_k(
        query, library, 10, metric=metric, library_block=library_block, query_block=query_block
    )
    assert np.array_equal(got.index, index)
    assert np.array_equal(got.score, score)


def test_top_k_all_pairs_excludes_only_self(with_duplicates: chem.Fingerprints) -> None:
    """Each molecule's own row is left out; its duplicates stay (score 1, lowest index first)."""
    fps = with_duplicates.take(range(800))
    full = chem.similarity(fps, fps)
    np.fill_diagonal(full, -np.inf)
    index, score = _brute_top_k(full, 5)
    got = chem.top_k_all_pairs(fps, 5, library_block=64, query_block=40)
    assert np.array_equal(got.index, index)
    assert np.array_equal(got.score, score)
    assert not (got.index == np.arange(len(fps))[:, None]).any()


def test_top_k_pads_a_short_library(nci: chem.Molecules) -> None:
    fps = chem.fingerprints(nci)
    got = chem.top_k(fps.take(range(3)), fps.take(range(4)), 6)
    assert (got.index[:, 4:] == -1).all() and np.isnan(got.score[:, 4:]).all()
    index, score = _brute_top_k(chem.similarity(fps.take(range(3)), fps.take(range(4))), 4)
    assert np.array_equal(got.index[:, :4], index) and np.array_equal(got.score[:, :4], score)


@pytest.mark.parametrize("threshold", [0.0, 0.35, 0.7, 1.0])
@pytest.mark.parametrize("metric", ["tanimoto", "dice"])
def test_threshold_hits_equal_rdkits(
    nci: chem.Molecules, metric: chem.Metric, threshold: float
) -> None:
    """Pairs with RDKit's score >= threshold, no more, no fewer, in query/score/index order."""
    bvs = _bitvects(nci, "morgan")
    fps = chem.Fingerprints.from_bitvects(bvs)
    query = fps.take(range(0, len(fps), 25))
    reference = _rdkit(bvs[::25], bvs, metric)
    q, lib = np.nonzero(reference >= threshold)
    s = reference[q, lib]
    order = np.lexsort((lib, -s, q))
    got = chem.threshold_search(query, fps, threshold, metric=metric, library_block=500)
    assert np.array_equal(got.query, q[order])
    assert np.array_equal(got.library, lib[order])
    assert np.array_equal(got.score, s[order])


def test_threshold_all_pairs_without_self(with_duplicates: chem.Fingerprints) -> None:
    fps = with_duplicates.take(range(900))
    full = chem.similarity(fps, fps)
    np.fill_diagonal(full, -1.0)
    got = chem.threshold_all_pairs(fps, 0.6, library_block=128, query_block=100)
    q, lib = np.nonzero(full >= 0.6)
    assert set(zip(got.query.tolist(), got.library.tolist(), strict=True)) == set(
        zip(q.tolist(), lib.tolist(), strict=True)
    )
    assert len(got) == q.size


def test_bad_smiles_are_reported_and_skipped(tmp_path: Path) -> None:
    """Syntax, valence and aromaticity errors: line number and RDKit's reason, rest read."""
    path = tmp_path / "mols.smi"
    path.write_text(
        "CCO ethanol\n"
        "C1CC( broken-ring\n"
        "\n"
        "c1ccccc1\tbenzene\n"
        "N(C)(C)(C)(C)C five-bonds\n"
        "c1cccc1 pentagon\n"
        "CC(=O)O\n"
    )
    mols = chem.read_smiles(path)
    assert mols.ids == ("ethanol", "benzene", "7")
    assert mols.records == (1, 4, 7)
    lines = [f.line for f in mols.failures]
    assert lines == [2, 5, 6]
    syntax, valence, kekule = mols.failures
    assert "syntax error" in syntax.reason and syntax.text == "C1CC("
    assert "Explicit valence for atom # 0 N, 5" in valence.reason
    assert "kekulize" in kekule.reason
    assert "line 5" in str(valence)


def test_broken_sdf_record_is_reported_and_skipped(tmp_path: Path) -> None:
    """A record RDKit cannot sanitize and one without its atom block: record and line numbers."""
    good = [Chem.MolFromSmiles(s) for s in ("CCO", "c1ccccc1", "CC(=O)O")]
    blocks = []
    for number, mol in enumerate(good, start=1):
        mol.SetProp("_Name", f"mol{number}")
        mol.SetProp("ID", f"ID-{number}")
        blocks.append(Chem.MolToMolBlock(mol) + f"> <ID>\nID-{number}\n\n$$$$\n")
    bad = Chem.MolFromSmiles("N(C)(C)(C)(C)C", sanitize=False)
    bad.SetProp("_Name", "pentavalent")
    broken = Chem.MolToMolBlock(bad, kekulize=False) + "$$$$\n"
    truncated = "cut\n  RDKit\n\n  3  2  0  0  0  0  0  0  0  0999 V2000\n$$$$\n"
    text = blocks[0] + broken + blocks[1] + truncated + blocks[2]
    path = tmp_path / "mols.sdf"
    path.write_text(text)
    mols = chem.read_sdf(path, id_field="ID")
    assert mols.ids == ("ID-1", "ID-2", "ID-3")
    assert mols.records == (1, 3, 5)
    first, second = mols.failures
    assert (first.record, first.text) == (2, "pentavalent")
    assert first.line == blocks[0].count("\n") + 1
    assert "Explicit valence for atom # 0 N, 5" in first.reason
    assert (second.record, second.text) == (4, "cut")
    assert second.reason
    assert "record 2" in str(first)


def test_csv_column_reader(tmp_path: Path) -> None:
    path = tmp_path / "mols.csv"
    path.write_text('name,smiles\na,CCO\nb,"C1CC("\nc,c1ccccc1\n')
    mols = chem.read_csv(path, smiles_column="smiles", id_column="name")
    assert mols.ids == ("a", "c")
    (failure,) = mols.failures
    assert failure.line == 3 and "syntax error" in failure.reason
    with pytest.raises(ValueError, match="no column 'SMILES'"):
        chem.read_csv(path, smiles_column="SMILES")


def test_shapes_are_checked(nci: chem.Molecules) -> None:
    fps = chem.fingerprints(nci.mols[:5])
    short = chem.fingerprints(nci.mols[:5], fp_size=1024)
    with pytest.raises(ValueError, match="2048-bit fingerprints, library 1024-bit"):
        chem.top_k(fps, short, 3)
    with pytest.raises(ValueError, match="metric must be one of"):
        chem.threshold_search(fps, fps, 0.5, metric="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be"):
        chem.top_k(fps, fps, 0)
