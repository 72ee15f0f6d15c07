"""models/compounds/chem.py against RDKit itself, on molecules shipped in the RDKit wheel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem, DataStructs, RDConfig

from models.compounds import _popcount as chem_popcount
from models.compounds import chem

NCI = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
N_QUERIES = 300
CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)
#: Every engine, forced: the popcount kernels, the CPU GEMM as it runs by default (bfloat16 on
#: AMX, else int8 or float32), the int8 GEMM, and the GEMM on CUDA.
ENGINES = ["popcount", "gemm", "gemm-int8", CUDA]


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


def _all_pairs_but_self(fps: chem.Fingerprints) -> np.ndarray:
    """Every pair's score (the GEMM engine's), each molecule's own set to -inf."""
    full = chem.similarity(fps, fps, engine="gemm")
    np.fill_diagonal(full, -np.inf)
    return full


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


_REFERENCE: dict[tuple[str, str], tuple[list, np.ndarray]] = {}


def _reference(nci: chem.Molecules, kind: chem.FingerprintKind, metric: chem.Metric):
    """RDKit's fingerprints of the NCI set and its scores for the first N_QUERIES (cached)."""
    if (kind, metric) not in _REFERENCE:
        bvs = _bitvects(nci, kind)
        _REFERENCE[kind, metric] = bvs, _rdkit(bvs[:N_QUERIES], bvs, metric)
    return _REFERENCE[kind, metric]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("metric", ["tanimoto", "dice"])
@pytest.mark.parametrize("kind", ["morgan", "rdkit", "atom-pair"])
def test_similarity_is_bit_identical_to_rdkit(
    nci: chem.Molecules, kind: chem.FingerprintKind, metric: chem.Metric, engine: chem.Engine
) -> None:
    """Every score equals DataStructs.Bulk*Similarity's float64, bit for bit, on every engine."""
    bvs, reference = _reference(nci, kind, metric)
    fps = chem.Fingerprints.from_bitvects(bvs)
    if kind == "rdkit":  # paths up to 7 bonds: popcounts above 256, beyond the bfloat16 GEMM
        assert fps.popcounts.max() > 256
    ours = chem.similarity(fps.take(range(N_QUERIES)), fps, metric=metric, engine=engine)
    assert np.array_equal(ours, reference)


def test_bf16_gemm_matches_rdkit_where_exact_and_refuses_otherwise(nci: chem.Molecules) -> None:
    """Morgan counts fit bfloat16; RDKit-path counts (above 256) do not, and are refused."""
    bvs, reference = _reference(nci, "morgan", "tanimoto")
    fps = chem.Fingerprints.from_bitvects(bvs)
    query = fps.take(range(N_QUERIES))
    assert np.array_equal(chem.similarity(query, fps, engine="gemm-bf16"), reference)
    paths = chem.Fingerprints.from_bitvects(_reference(nci, "rdkit", "tanimoto")[0])
    with pytest.raises(ValueError, match="exact for counts up to 256"):
        chem.top_k(paths.take(range(5)), paths, 3, engine="gemm-bf16")


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_fingerprints_score_as_rdkit(engine: chem.Engine) -> None:
    """RDKit returns 0 for two empty fingerprints (0/0), for Tanimoto and Dice."""
    empty, one = DataStructs.ExplicitBitVect(64), DataStructs.ExplicitBitVect(64)
    one.SetBit(5)
    bvs = [empty, one, DataStructs.ExplicitBitVect(64)]
    fps = chem.Fingerprints.from_bitvects(bvs)
    for metric in chem.METRICS:
        full = chem.similarity(fps, fps, metric=metric, engine=engine)
        assert np.array_equal(full, _rdkit(bvs, bvs, metric))
        got = chem.top_k(fps, fps, 3, metric=metric, engine=engine)
        index, score = _brute_top_k(full, 3)
        assert np.array_equal(got.index, index) and np.array_equal(got.score, score)
        hits = chem.threshold_all_pairs(fps, 0.0, metric=metric, engine=engine)
        assert len(hits) == 6 and (hits.score == 0.0).all()
    assert chem.similarity(fps, fps, engine=engine)[0, 2] == 0.0


@pytest.fixture(scope="module")
def with_duplicates(nci: chem.Molecules) -> chem.Fingerprints:
    """NCI Morgan fingerprints with copies of some molecules scattered through them: ties."""
    fps = chem.fingerprints(nci)
    rows = np.arange(2000)
    copies = np.repeat([3, 10, 500, 1999], 4)
    order = np.random.default_rng(7).permutation(rows.size + copies.size)
    return fps.take(np.concatenate([rows, copies])[order])


@pytest.fixture(params=["default", "small"])
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Streaming sizes: the defaults, or small ones that put block edges everywhere (the GEMM's
    library and query blocks; the popcount engine's query groups and library chunks)."""
    if request.param == "default":
        return {}
    monkeypatch.setattr(chem_popcount, "GROUP", 3)
    monkeypatch.setattr(chem_popcount, "CHUNK_BYTES", 64 * 32)  # 64-row chunks at 2,048 bits
    return {"library_block": 97, "query_block": 31}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("metric", ["tanimoto", "dice"])
def test_top_k_equals_brute_force_with_ties(
    with_duplicates: chem.Fingerprints,
    metric: chem.Metric,
    engine: chem.Engine,
    blocks: dict[str, int],
) -> None:
    """Top 10 as a full sort would give it: best first, equal scores by lower library index."""
    library = with_duplicates
    query = library.take(range(0, len(library), 7))
    full = chem.similarity(query, library, metric=metric, engine="gemm")
    index, score = _brute_top_k(full, 10)
    assert (score[:, :-1] == score[:, 1:]).any()  # the ties are there
    got = chem.top_k(query, library, 10, metric=metric, engine=engine, **blocks)
    assert np.array_equal(got.index, index)
    assert np.array_equal(got.score, score)


@pytest.mark.parametrize("engine", ENGINES)
def test_top_k_all_pairs_excludes_only_self(
    with_duplicates: chem.Fingerprints, engine: chem.Engine, blocks: dict[str, int]
) -> None:
    """Each molecule's own row is left out; its duplicates stay (score 1, lowest index first)."""
    fps = with_duplicates.take(range(800))
    index, score = _brute_top_k(_all_pairs_but_self(fps), 5)
    got = chem.top_k_all_pairs(fps, 5, engine=engine, **blocks)
    assert np.array_equal(got.index, index)
    assert np.array_equal(got.score, score)
    assert not (got.index == np.arange(len(fps))[:, None]).any()


@pytest.mark.parametrize("engine", ENGINES)
def test_top_k_pads_a_short_library(nci: chem.Molecules, engine: chem.Engine) -> None:
    fps = chem.fingerprints(nci)
    got = chem.top_k(fps.take(range(3)), fps.take(range(4)), 6, engine=engine)
    assert (got.index[:, 4:] == -1).all() and np.isnan(got.score[:, 4:]).all()
    index, score = _brute_top_k(chem.similarity(fps.take(range(3)), fps.take(range(4))), 4)
    assert np.array_equal(got.index[:, :4], index) and np.array_equal(got.score[:, :4], score)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("threshold", [0.0, 0.35, 0.7, 1.0])
@pytest.mark.parametrize("metric", ["tanimoto", "dice"])
def test_threshold_hits_equal_rdkits(
    nci: chem.Molecules, metric: chem.Metric, threshold: float, engine: chem.Engine
) -> None:
    """Pairs with RDKit's score >= threshold, no more, no fewer, in query/score/index order."""
    bvs = _bitvects(nci, "morgan")
    fps = chem.Fingerprints.from_bitvects(bvs)
    query = fps.take(range(0, len(fps), 25))
    reference = _rdkit(bvs[::25], bvs, metric)
    q, lib = np.nonzero(reference >= threshold)
    s = reference[q, lib]
    order = np.lexsort((lib, -s, q))
    got = chem.threshold_search(
        query, fps, threshold, metric=metric, engine=engine, library_block=500
    )
    assert np.array_equal(got.query, q[order])
    assert np.array_equal(got.library, lib[order])
    assert np.array_equal(got.score, s[order])


@pytest.mark.parametrize("engine", ENGINES)
def test_threshold_all_pairs_without_self(
    with_duplicates: chem.Fingerprints, engine: chem.Engine, blocks: dict[str, int]
) -> None:
    fps = with_duplicates.take(range(900))
    got = chem.threshold_all_pairs(fps, 0.6, engine=engine, **blocks)
    q, lib = np.nonzero(_all_pairs_but_self(fps) >= 0.6)
    assert set(zip(got.query.tolist(), got.library.tolist(), strict=True)) == set(
        zip(q.tolist(), lib.tolist(), strict=True)
    )
    assert len(got) == q.size


@pytest.mark.parametrize("kind", ["rdkit", "atom-pair"])
def test_popcount_searches_on_dense_fingerprints_equal_rdkits(
    nci: chem.Molecules, kind: chem.FingerprintKind
) -> None:
    """Fingerprints whose shared bits pass 255 (RDKit paths) skip the uint8 segment bound;
    top-k and threshold still equal RDKit's brute force."""
    bvs, reference = _reference(nci, kind, "tanimoto")
    fps = chem.Fingerprints.from_bitvects(bvs)
    query = fps.take(range(N_QUERIES))
    index, score = _brute_top_k(reference, 7)
    got = chem.top_k(query, fps, 7, engine="popcount")
    assert np.array_equal(got.index, index) and np.array_equal(got.score, score)
    hits = chem.threshold_search(query, fps, 0.55, engine="popcount")
    q, lib = np.nonzero(reference >= 0.55)
    assert set(zip(hits.query.tolist(), hits.library.tolist(), strict=True)) == set(
        zip(q.tolist(), lib.tolist(), strict=True)
    )
    assert np.array_equal(np.sort(hits.score), np.sort(reference[q, lib]))


@pytest.mark.parametrize("fp_size", [167, 1000, 4096])
def test_popcount_engine_on_other_lengths(nci: chem.Molecules, fp_size: int) -> None:
    """Lengths that are no multiple of 64 (or of 512) are padded with zero words that count
    nothing: scores, top-k and hits equal RDKit's."""
    mols = nci.mols[:1500]
    bvs = list(chem.fingerprint_generator("morgan", fp_size=fp_size).GetFingerprints(mols))
    fps = chem.Fingerprints.from_bitvects(bvs)
    query = fps.take(range(100))
    reference = _rdkit(bvs[:100], bvs, "tanimoto")
    assert np.array_equal(chem.similarity(query, fps, engine="popcount"), reference)
    index, score = _brute_top_k(reference, 5)
    got = chem.top_k(query, fps, 5, engine="popcount")
    assert np.array_equal(got.index, index) and np.array_equal(got.score, score)
    hits = chem.threshold_search(query, fps, 0.5, engine="popcount")
    assert len(hits) == int((reference >= 0.5).sum())


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
    # One line, with the position (RDKit says it in five: the CLI printed them all).
    assert (
        syntax.reason == "SMILES Parse Error: syntax error while parsing: C1CC( (around position 5)"
    )
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


def test_a_csv_id_column_names_its_molecules_without_being_asked(tmp_path: Path) -> None:
    """A CSV of ``id,smiles`` had its ids replaced by line numbers ("2", "3"): every neighbour
    of a search named by a number the chemist never wrote. An empty id is still the line."""
    path = tmp_path / "mols.csv"
    path.write_text("id,smiles,name\nCHEMBL545, CCO ,ethanol\n,c1ccccc1,benzene\n")
    assert chem.read_csv(path).ids == ("CHEMBL545", "3")
    assert chem.read_csv(path, id_column="name").ids == ("ethanol", "benzene")
    (tmp_path / "plain.csv").write_text("smiles\nCCO\n")
    assert chem.read_csv(tmp_path / "plain.csv").ids == ("2",)


@pytest.mark.parametrize("name", ["mols.csv", "mols.csv.gz", "mols.smi", "mols.sdf"])
def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path: Path, name: str) -> None:
    """Excel's "CSV UTF-8" starts with a BOM: the header's first column was '\\ufeffsmiles',
    and the whole library was refused (no column 'smiles')."""
    import gzip

    ethanol = Chem.MolFromSmiles("CCO")
    ethanol.SetProp("_Name", "eth")
    text = {
        "mols.csv": "smiles,id\nCCO,eth\n",
        "mols.smi": "CCO eth\n",
        "mols.sdf": Chem.MolToMolBlock(ethanol) + "$$$$\n",
    }[name.removesuffix(".gz")]
    raw = "\ufeff".join(["", text]).encode("utf-8")
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    read = (
        chem.read_sdf if ".sdf" in name else chem.read_csv if ".csv" in name else chem.read_smiles
    )
    mols = read(path)
    assert not mols.failures and len(mols) == 1
    assert mols.ids == ("eth",)


def test_a_molecule_too_large_to_fingerprint_is_a_failure_of_its_record(tmp_path: Path) -> None:
    """A 20,000-atom chain took RDKit's atom-pair generator hours (the submission with it)."""
    huge = "C" * (chem.MAX_HEAVY_ATOMS + 1)
    smi = tmp_path / "mols.smi"
    smi.write_text(f"CCO eth\n{huge} polymer\nc1ccccc1O phen\n")
    csv = tmp_path / "mols.csv"
    csv.write_text(f"smiles\nCCO\n{huge}\n")
    sdf = tmp_path / "mols.sdf"
    sdf.write_text(Chem.MolToMolBlock(Chem.MolFromSmiles(huge)) + "$$$$\n")
    for mols, kept in (
        (chem.read_smiles(smi), ("eth", "phen")),
        (chem.read_csv(csv), ("2",)),
        (chem.read_sdf(sdf), ()),
    ):
        assert mols.ids == kept
        (failure,) = mols.failures
        assert failure.reason == f"{chem.MAX_HEAVY_ATOMS + 1} heavy atoms, more than 1000"
        assert len(failure.text) <= 80
    smi.write_text("C" * chem.MAX_HEAVY_ATOMS + " largest\n")
    assert chem.read_smiles(smi).ids == ("largest",)


def test_a_csv_field_over_the_csv_limit_is_a_failure_of_its_record(tmp_path: Path) -> None:
    """csv's "field larger than field limit (131072)" escaped the reader: a traceback on the
    command line, a 500 from the API. Whatever the process-wide limit: importing scipy.io.arff
    raises it to the largest C long, and the reader then read such a record whole."""
    import csv

    path = tmp_path / "mols.csv"
    before = csv.field_size_limit(2**62)  # as scipy.io.arff leaves it
    try:
        path.write_text("smiles\nCCO\n" + "C" * 200_000 + "\nc1ccccc1O\n")
        mols = chem.read_csv(path)
        assert len(mols) == 2
        (failure,) = mols.failures
        assert failure.line == 3 and failure.reason.startswith("not CSV: field larger than")
        path.write_text("smiles" + "x" * 200_000 + "\nCCO\n")
        with pytest.raises(ValueError, match="the header line is not CSV"):
            chem.read_csv(path)
        assert csv.field_size_limit() == 2**62  # left as it was found
    finally:
        csv.field_size_limit(before)


def test_shapes_are_checked(nci: chem.Molecules) -> None:
    fps = chem.fingerprints(nci.mols[:5])
    short = chem.fingerprints(nci.mols[:5], fp_size=1024)
    with pytest.raises(ValueError, match="2048-bit fingerprints, library 1024-bit"):
        chem.top_k(fps, short, 3)
    with pytest.raises(ValueError, match="metric must be one of"):
        chem.threshold_search(fps, fps, 0.5, metric="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be"):
        chem.top_k(fps, fps, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_sets_give_empty_results(nci: chem.Molecules, engine: chem.Engine) -> None:
    fps = chem.fingerprints(nci.mols[:20])
    none = fps.take([])
    assert chem.top_k(none, fps, 3, engine=engine).index.shape == (0, 3)
    got = chem.top_k(fps, none, 2, engine=engine)
    assert (got.index == -1).all() and np.isnan(got.score).all()
    assert len(chem.threshold_search(none, fps, 0.5, engine=engine)) == 0
    assert len(chem.threshold_search(fps, none, 0.5, engine=engine)) == 0
    assert chem.similarity(none, fps, engine=engine).shape == (0, 20)
