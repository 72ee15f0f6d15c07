"""models.genome.io.output against PLINK's own files, a line-by-line port of its dtoa_g, a pedigree."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from models.genome.api import Genotypes, pairwise, read_bed
from models.genome.io.output import (
    DUPLICATE_MIN_KINSHIP,
    FIRST_DEGREE_MIN_KINSHIP,
    SECOND_DEGREE_MIN_KINSHIP,
    THIRD_DEGREE_MIN_KINSHIP,
    MatrixWriter,
    RelatedPair,
    format_plink,
    king_pair_counts,
    kinship_degree,
    related_pairs,
    write_kin0,
    write_king,
    write_mibs,
    write_rel,
)
from tests.helpers import GENOME_DATA, PLINK_MATRICES

PREFIX = GENOME_DATA / "hm3_small"
HAS_PLINK2 = shutil.which("plink2") is not None

WRITERS = {"grm": write_rel, "king": write_king, "ibs": write_mibs}
#: (metric, ibs_missing, writer, golden matrix file) for every PLINK text matrix stored.
GOLDENS = [(metric, missing, WRITERS[metric], name) for metric, missing, name in PLINK_MATRICES]


@pytest.fixture(scope="module")
def cohort() -> Genotypes:
    return read_bed(PREFIX)


@pytest.fixture(scope="module")
def matrices(cohort) -> dict[str, np.ndarray]:
    return {
        name: pairwise(cohort.dosages, metric=metric, ibs_missing=missing, device="cpu")
        for metric, missing, _, name in GOLDENS
    }


def _ids(genotypes: Genotypes) -> list[tuple[str, str]]:
    return list(zip(genotypes.fid, genotypes.iid, strict=True))


def _golden_bin(name: str, n: int) -> np.ndarray:
    return np.fromfile(GENOME_DATA / f"{name}.bin", dtype="<f8").reshape(n, n)


# --- PLINK goldens ----------------------------------------------------------------------------


@pytest.mark.parametrize(("metric", "missing", "writer", "name"), GOLDENS)
def test_text_matrix_and_ids_equal_plink_byte_for_byte(
    tmp_path, cohort, matrices, metric, missing, writer, name
) -> None:
    """Our float64 matrix, written as text, is PLINK's file to the byte, and so is the .id."""
    stem = name.rsplit(".", 1)[0]
    path = writer(tmp_path / stem, matrices[name], _ids(cohort))
    assert path.name == name
    assert path.read_bytes() == (GENOME_DATA / name).read_bytes()
    assert Path(f"{path}.id").read_bytes() == (GENOME_DATA / f"{name}.id").read_bytes()


@pytest.mark.parametrize(("metric", "missing", "writer", "name"), GOLDENS)
def test_binary_matrix_layout_equals_plink(
    tmp_path, cohort, matrices, metric, missing, writer, name
) -> None:
    """PLINK's own .bin numbers round-trip to its bytes; ours match them to 1e-12 (KING: bytes)."""
    stem, n = name.rsplit(".", 1)[0], cohort.n_samples
    golden = (GENOME_DATA / f"{name}.bin").read_bytes()
    path = writer(tmp_path / f"{stem}_golden", _golden_bin(name, n), _ids(cohort), binary=True)
    assert path.name == f"{stem}_golden.{name.rsplit('.', 1)[1]}.bin"
    assert path.read_bytes() == golden
    ours = writer(tmp_path / stem, matrices[name], _ids(cohort), binary=True)
    written = np.fromfile(ours, dtype="<f8").reshape(n, n)
    np.testing.assert_array_equal(written, matrices[name])
    np.testing.assert_allclose(written, _golden_bin(name, n), rtol=1e-12, atol=1e-14)
    if metric == "king":  # integer counts, one division: the same doubles as plink2's
        assert ours.read_bytes() == golden


@pytest.mark.skipif(not HAS_PLINK2, reason="plink2 is not on PATH")
def test_kin0_equals_live_plink2_make_king_table(tmp_path, cohort, matrices) -> None:
    """All pairs with counts: plink2's default .kin0 to the byte; a filtered kinship-only table too."""
    king, n, ids = matrices["hm3_small.king"], cohort.n_samples, _ids(cohort)
    pairs = related_pairs(king, threshold=-np.inf)
    assert len(pairs) == n * (n - 1) // 2
    counts = king_pair_counts(cohort.dosages, [(p.i, p.j) for p in pairs])
    ours = write_kin0(tmp_path / "ours.kin0", pairs, ids, counts=counts)
    filtered = write_kin0(tmp_path / "ours_filtered.kin0", pairs, ids, min_kinship=0.01)
    base = ["plink2", "--bfile", str(PREFIX), "--threads", "1", "--make-king-table"]
    filtered_out = str(tmp_path / "filtered")
    subprocess.run([*base, "--out", str(tmp_path / "all")], check=True, capture_output=True)
    subprocess.run(
        [*base, "cols=maybefid,id,kinship", "--king-table-filter", "0.01", "--out", filtered_out],
        check=True,
        capture_output=True,
    )
    assert ours.read_bytes() == (tmp_path / "all.kin0").read_bytes()
    assert filtered.read_bytes() == (tmp_path / "filtered.kin0").read_bytes()
    assert 0 < len(filtered.read_text().splitlines()) - 1 < len(pairs)


def _edited_fileset(tmp_path: Path) -> Path:
    """hm3_small with sample 1 a copy of sample 0 and sample 2 stripped of its heterozygotes."""
    n, m = 60, 2000
    raw = np.fromfile(PREFIX.with_suffix(".bed"), dtype=np.uint8)
    body = raw[3:].reshape(m, (n + 3) // 4).copy()

    def codes(s: int) -> np.ndarray:
        return (body[:, s // 4] >> (2 * (s % 4))) & 3

    def put(s: int, new: np.ndarray) -> None:
        shift = 2 * (s % 4)
        body[:, s // 4] = (body[:, s // 4] & ~np.uint8(3 << shift)) | (new << shift).astype(
            np.uint8
        )

    put(1, codes(0))
    put(2, np.where(codes(2) == 2, 3, codes(2)))  # .bed code 10 (het) -> 11 (no A1)
    out = tmp_path / "edited"
    np.concatenate([raw[:3], body.ravel()]).tofile(out.with_suffix(".bed"))
    for ext in (".bim", ".fam"):
        shutil.copy(PREFIX.with_suffix(ext), out.with_suffix(ext))
    return out


@pytest.mark.skipif(not HAS_PLINK2, reason="plink2 is not on PATH")
def test_duplicate_and_infinite_kinship_equal_live_plink2(tmp_path) -> None:
    """A duplicate (0.5) and a sample without hets (-inf) print as plink2 prints them."""
    prefix = _edited_fileset(tmp_path)
    genotypes = read_bed(prefix)
    king = pairwise(genotypes.dosages, metric="king", device="cpu")
    assert king[0, 1] == 0.5 and np.isneginf(king[2, 0])
    ours = write_king(tmp_path / "ours", king, _ids(genotypes))
    n = genotypes.n_samples  # every pair, -inf included (related_pairs keeps only > threshold)
    upper = [RelatedPair(i, j, float(king[i, j]), None) for j in range(n) for i in range(j)]
    counts = king_pair_counts(genotypes.dosages, [(p.i, p.j) for p in upper])
    table = write_kin0(tmp_path / "ours.kin0", upper, _ids(genotypes), counts=counts)
    top = write_kin0(tmp_path / "top.kin0", upper, _ids(genotypes), min_kinship=0.5)
    base = ["plink2", "--bfile", str(prefix), "--threads", "1"]
    subprocess.run(
        [*base, "--make-king", "square", "--make-king-table", "--out", str(tmp_path / "live")],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *base,
            "--make-king-table",
            "cols=maybefid,id,kinship",
            "--king-table-filter",
            "0.5",
            "--out",
            str(tmp_path / "top_live"),
        ],
        check=True,
        capture_output=True,
    )
    assert ours.read_bytes() == (tmp_path / "live.king").read_bytes()
    assert "-inf" in ours.read_text()
    assert table.read_bytes() == (tmp_path / "live.kin0").read_bytes()
    assert top.read_bytes() == (tmp_path / "top_live.kin0").read_bytes()
    assert top.read_text().splitlines()[1:] == ["2424\tNA19835\t2431\tNA19916\t0.5"]


# --- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True])
def test_uneven_row_blocks_write_the_same_bytes_as_one_shot(
    tmp_path, cohort, matrices, binary
) -> None:
    """Rows appended as 3 uneven blocks (and an empty one) give the one-shot file."""
    matrix, ids = matrices["hm3_small.rel"], _ids(cohort)
    one_shot = write_rel(tmp_path / "one", matrix, ids, binary=binary)
    with MatrixWriter(tmp_path / "blocks", ids, kind="rel", binary=binary) as writer:
        for rows in (slice(0, 7), slice(7, 7), slice(7, 48), slice(48, 60)):
            writer.write_rows(matrix[rows])
    assert writer.path.read_bytes() == one_shot.read_bytes()
    assert writer.id_path.read_bytes() == (GENOME_DATA / "hm3_small.rel.id").read_bytes()


def test_incomplete_or_overfull_matrix_is_refused_and_leaves_no_file(tmp_path, cohort) -> None:
    """Too few rows, too many rows or a wrong width raise; nothing that looks complete is left."""
    ids = _ids(cohort)
    with (
        pytest.raises(ValueError, match="10 of 60 rows"),
        MatrixWriter(tmp_path / "short", ids, kind="king") as writer,
    ):
        writer.write_rows(np.zeros((10, 60)))
    with (
        pytest.raises(ValueError, match="exceed the 60 rows"),
        MatrixWriter(tmp_path / "long", ids, kind="king") as writer,
    ):
        writer.write_rows(np.zeros((59, 60)))
        writer.write_rows(np.zeros((2, 60)))
    with (
        pytest.raises(ValueError, match=r"expected \(rows, 60\)"),
        MatrixWriter(tmp_path / "wide", ids, kind="king", binary=True) as writer,
    ):
        writer.write_rows(np.zeros((5, 61)))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"expected \(60, 60\)"):
        write_mibs(tmp_path / "square", np.zeros((60, 59)), ids)
    with pytest.raises(ValueError, match="without whitespace"):
        write_rel(tmp_path / "ids", np.zeros((1, 1)), [("fam 1", "a")])


# --- number formatting ------------------------------------------------------------------------


def _dtoa_g_reference(x: float) -> str:
    """plink2_string.cc dtoa_g transliterated one scalar C statement at a time (no numpy)."""
    br = (0.499999995, 0.500000005)

    def bround(y: float) -> int:
        t = int(y)
        return t + int((y - t) + br[t & 1])

    def trunc6(u: int) -> str:  # uitoa_trunc6: 6 digits, trailing zeros dropped
        return f"{u:06d}".rstrip("0") or "0"

    def q1p5(u: int) -> str:  # qrtoa_1p5 on BankerRoundD5's quotient/remainder
        quotient, remainder = divmod(u, 100000)
        return str(quotient) + ("." + f"{remainder:05d}".rstrip("0") if remainder else "")

    if x != x:
        return "nan"
    sign = ""
    if x < 0:
        sign, x = "-", -x
    xp = 0
    if x < 9.9999949999999e-5:
        if x == 0.0:
            return sign + "0"
        if x < 9.9999949999999e-16:
            if x < 9.9999949999999e-128:
                if x < 9.9999949999999e-256:
                    x, xp = x * 1.0e256, xp | 256
                else:
                    x, xp = x * 1.0e128, xp | 128
            for limit, factor, bit in ((9.9999949999999e-64, 1.0e64, 64),
                                       (9.9999949999999e-32, 1.0e32, 32),
                                       (9.9999949999999e-16, 1.0e16, 16)):  # fmt: skip
                if x < limit:
                    x, xp = x * factor, xp | bit
        for limit, factor, bit in ((9.9999949999999e-8, 100000000.0, 8),
                                   (9.9999949999999e-4, 10000.0, 4),
                                   (9.9999949999999e-2, 100.0, 2),
                                   (9.9999949999999e-1, 10.0, 1)):  # fmt: skip
            if x < limit:
                x, xp = x * factor, xp | bit
        return f"{sign}{q1p5(bround(x * 100000.0))}e-{xp:02d}"
    if x >= 999999.49999999:
        if x > 1.7976931348623157e308:
            return sign + "inf"
        if x >= 9.9999949999999e15:
            if x >= 9.9999949999999e127:
                if x >= 9.9999949999999e255:
                    x, xp = x * 1.0e-256, xp | 256
                else:
                    x, xp = x * 1.0e-128, xp | 128
            for limit, factor, bit in ((9.9999949999999e63, 1.0e-64, 64),
                                       (9.9999949999999e31, 1.0e-32, 32),
                                       (9.9999949999999e15, 1.0e-16, 16)):  # fmt: skip
                if x >= limit:
                    x, xp = x * factor, xp | bit
        for limit, factor, bit in ((9.9999949999999e7, 1.0e-8, 8),
                                   (9.9999949999999e3, 1.0e-4, 4),
                                   (9.9999949999999e1, 1.0e-2, 2),
                                   (9.9999949999999e0, 1.0e-1, 1)):  # fmt: skip
            if x >= limit:
                x, xp = x * factor, xp | bit
        return f"{sign}{q1p5(bround(x * 100000.0))}e+{xp:02d}"
    if x >= 0.99999949999999:  # dtoa_so6
        for limit, factor, digits in ((9.9999949999999, 100000.0, 1),
                                     (99.999949999999, 10000.0, 2),
                                     (999.99949999999, 1000.0, 3),
                                     (9999.9949999999, 100.0, 4)):  # fmt: skip
            if x < limit:
                text, whole = f"{bround(x * factor):06d}", digits
                break
        else:
            text = f"{bround(x):06d}" if x >= 99999.949999999 else f"{bround(x * 10.0):06d}"
            whole = 6 if x >= 99999.949999999 else 5
        fraction = text[whole:].rstrip("0")
        return sign + text[:whole] + ("." + fraction if fraction else "")
    head = "0."
    if x < 9.9999949999999e-3:
        x, head = x * 100.0, head + "00"
    if x < 9.9999949999999e-2:
        x, head = x * 10.0, head + "0"
    return sign + head + trunc6(bround(x * 1000000.0))


def test_formatter_equals_the_scalar_port_of_dtoa_g() -> None:
    """Vectorized formatting equals a statement-by-statement port on 200k values of every scale."""
    rng = np.random.default_rng(7)
    magnitudes = 10.0 ** rng.uniform(-320, 308, 100_000)
    values = magnitudes * rng.choice([-1.0, 1.0], magnitudes.size)
    # Near-halves at the 7th digit (where PLINK's tolerance matters) and near the branch bounds.
    ties = (rng.integers(100000, 999999, 60_000) + 0.5) * 10.0 ** rng.integers(-12, 8, 60_000)
    nudged = ties * (1.0 + rng.uniform(-2e-8, 2e-8, ties.size))
    bounds = np.array([9.9999949999999e-5, 999999.49999999, 0.99999949999999, 9.9999949999999e-3])
    near_bounds = (bounds[:, None] * (1.0 + np.linspace(-1e-12, 1e-12, 101))).ravel()
    everything = np.concatenate([values, ties, nudged, near_bounds])
    expected = [_dtoa_g_reference(v) for v in everything.tolist()]
    assert format_plink(everything) == expected


def test_formatter_special_values_and_where_it_departs_from_printf() -> None:
    """PLINK's spellings of special values, its notation switch, and its banker's near-halves."""
    values = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 0.5, 1.0, -1e-5, 1.5e6, 1e-300, 5e-324]
    assert format_plink(values) == [
        "nan", "nan", "inf", "-inf", "0", "0", "0.5", "1", "-1e-05", "1.5e+06", "1e-300",
        "4.94066e-324",
    ]  # fmt: skip
    assert format_plink([9.99999e-5, 1e-4, 999999.0, 999999.5]) == [
        "9.99999e-05", "0.0001", "999999", "1e+06",
    ]  # fmt: skip
    # Just above a half in binary: C's %g rounds up, PLINK calls it a half and rounds to even.
    assert f"{0.0001234565:g}" == "0.000123457"
    assert format_plink([0.0001234565]) == ["0.000123456"]
    assert format_plink(np.array([[0.25, -0.125]])) == ["0.25", "-0.125"]


# --- degrees ----------------------------------------------------------------------------------


def test_degree_bounds_are_exact_powers_of_two_and_belong_to_the_farther_degree() -> None:
    """Each bound 2^(-k/2) maps to the more distant degree; the next double up to the closer."""
    bounds = [
        (DUPLICATE_MIN_KINSHIP, 2.0**-1.5, "duplicate/MZ twin", "1st"),
        (FIRST_DEGREE_MIN_KINSHIP, 2.0**-2.5, "1st", "2nd"),
        (SECOND_DEGREE_MIN_KINSHIP, 2.0**-3.5, "2nd", "3rd"),
        (THIRD_DEGREE_MIN_KINSHIP, 2.0**-4.5, "3rd", None),
    ]
    printed = [0.354, 0.177, 0.0884, 0.0442]  # the KING manual's rounding of them
    for (bound, power, above, at), shown in zip(bounds, printed, strict=True):
        assert bound == power and float(f"{bound:.3g}") == shown
        assert kinship_degree(bound) == at
        assert kinship_degree(np.nextafter(bound, 1.0)) == above
    assert [kinship_degree(k) for k in (0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0, -0.3)] == [
        "duplicate/MZ twin", "1st", "2nd", "3rd", None, None, None,
    ]  # fmt: skip
    assert kinship_degree(float("nan")) is None and kinship_degree(float("-inf")) is None
    grid = np.array([[b for b, *_ in bounds], [np.nextafter(b, 1.0) for b, *_ in bounds]])
    grid = np.concatenate([grid, [[np.nan, 0.6, -np.inf, 0.04]]])
    assert kinship_degree(grid).tolist() == [[kinship_degree(float(v)) for v in r] for r in grid]


def test_related_pairs_over_tiles_equal_the_full_matrix(matrices) -> None:
    """Uneven tiles report each pair once, as the whole matrix does; lower tiles report nothing."""
    king = matrices["hm3_small.king"]
    threshold = 0.01  # unrelated HapMap samples: a low cut so that many pairs pass
    full = related_pairs(king, threshold=threshold)
    assert 100 < len(full) < 60 * 59 // 2
    assert all(p.i < p.j and p.kinship > threshold for p in full)
    edges = [0, 13, 31, 32, 60]
    tiled = []
    for r0, r1 in itertools.pairwise(edges):
        for c0, c1 in itertools.pairwise(edges):
            tile = related_pairs(
                king[r0:r1, c0:c1], threshold=threshold, row_offset=r0, col_offset=c0
            )
            if r0 > c0:
                assert tile == []
            if r0 == c0:
                assert all(p.i < p.j for p in tile)
            tiled += tile
    assert sorted(tiled) == full
    both_ways = related_pairs(king, threshold=threshold, upper_only=False)
    assert len(both_ways) == 2 * len(full)
    assert {(p.j, p.i) for p in both_ways if p.i > p.j} == {(p.i, p.j) for p in full}


def test_related_pairs_checks_shapes_and_skips_nan() -> None:
    """Id counts must match the tile; NaN kinship is never reported."""
    tile = np.array([[0.5, np.nan, 0.3], [0.3, 0.5, 0.05]])
    ids = [("f", "a"), ("f", "b"), ("f", "c")]
    assert related_pairs(tile, ids[:2], ids) == [
        RelatedPair(0, 2, 0.3, "1st"),
        RelatedPair(1, 2, 0.05, "3rd"),
    ]
    with pytest.raises(ValueError, match="row_ids: 3 ids"):
        related_pairs(tile, ids, ids)


# --- a simulated pedigree ---------------------------------------------------------------------


def _simulate_pedigree(
    n_founders: int, n_variants: int, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Dosages (N, M) with missing calls, the pedigree kinship matrix (N, N), named members."""
    rng = np.random.default_rng(seed)
    p = rng.beta(2.0, 2.0, n_variants)  # common-variant array: most SNPs informative
    haplotypes = [(rng.random((2, n_variants)) < p).astype(np.int8) for _ in range(n_founders)]
    parents: list[tuple[int, int] | None] = [None] * n_founders
    names = {"A": 0, "B": 1, "C": 2, "D": 3, "E": 4, "F": 5}

    def child(mother: int, father: int) -> int:
        picks = rng.integers(0, 2, (2, n_variants))
        columns = np.arange(n_variants)
        haplotypes.append(
            np.stack([haplotypes[mother][picks[0], columns], haplotypes[father][picks[1], columns]])
        )
        parents.append((mother, father))
        return len(haplotypes) - 1

    names["sib1"] = child(names["A"], names["B"])
    names["sib2"] = child(names["A"], names["B"])
    names["halfsib"] = child(names["A"], names["C"])
    names["cousin1"] = child(names["sib1"], names["D"])
    names["cousin2"] = child(names["sib2"], names["E"])
    dosages = np.stack([h.sum(axis=0) for h in haplotypes]).astype(np.int8)
    # A duplicate of F with 0.1% discordant calls.
    duplicate = dosages[names["F"]].copy()
    flip = rng.random(n_variants) < 0.001
    duplicate[flip] = (duplicate[flip] + rng.integers(1, 3, flip.sum())) % 3
    dosages = np.vstack([dosages, duplicate])
    names["F_dup"] = dosages.shape[0] - 1
    parents.append(None)
    dosages[rng.random(dosages.shape) < 0.002] = -1

    # Pedigree kinship, the textbook recursion: phi(i, i) = 1/2 for non-inbred members;
    # phi(i, j) = (phi(i, mother_j) + phi(i, father_j)) / 2 when j comes after i's ancestors.
    n = dosages.shape[0]
    phi = np.zeros((n, n))
    for j in range(n):
        phi[j, j] = 0.5
        if parents[j] is not None:
            mother, father = parents[j]  # type: ignore[misc]
            for i in range(j):
                phi[i, j] = phi[j, i] = (phi[i, mother] + phi[i, father]) / 2
    phi[names["F"], names["F_dup"]] = phi[names["F_dup"], names["F"]] = 0.5
    return dosages, phi, names


def test_constructed_relatives_are_found_with_their_degree() -> None:
    """Every pedigree pair of kinship ≥ 1/16 is found with its degree; no founder pair is."""
    dosages, phi, names = _simulate_pedigree(n_founders=40, n_variants=8000, seed=2024)
    assert (dosages < 0).any()
    theory = phi[np.triu_indices_from(phi, k=1)]
    assert not ((theory > 0) & (theory < 1 / 16)).any()  # nothing between 3rd degree and unrelated
    king = pairwise(dosages, metric="king", device="cpu")

    found = {(p.i, p.j): p.degree for p in related_pairs(king)}
    expected = {
        (i, j): kinship_degree(float(phi[i, j]))
        for i in range(len(phi))
        for j in range(i + 1, len(phi))
        if phi[i, j] >= 1 / 16
    }
    assert found == expected
    named = {
        ("F", "F_dup"): "duplicate/MZ twin",
        ("A", "sib1"): "1st",
        ("B", "sib2"): "1st",
        ("sib1", "sib2"): "1st",
        ("sib1", "halfsib"): "2nd",
        ("A", "cousin1"): "2nd",
        ("sib2", "cousin1"): "2nd",
        ("cousin1", "cousin2"): "3rd",
        ("halfsib", "cousin2"): "3rd",
    }
    for (a, b), degree in named.items():
        i, j = sorted((names[a], names[b]))
        assert found.get((i, j)) == degree, (a, b, king[i, j])
    assert not any(i < 40 and j < 40 for i, j in found)  # founders: 0-39
    unrelated = king[np.triu_indices(40, k=1)]
    assert np.abs(unrelated).max() < THIRD_DEGREE_MIN_KINSHIP


def test_king_pair_counts_equal_a_pair_loop() -> None:
    """NSNP, HETHET and IBS0 counts equal a plain loop over variants, missing calls skipped."""
    dosages, _, _ = _simulate_pedigree(n_founders=6, n_variants=300, seed=3)
    pairs = [(0, 1), (6, 0), (2, 11), (7, 8)]
    ours = king_pair_counts(dosages.astype(np.float64), pairs)
    for row, (i, j) in zip(ours, pairs, strict=True):
        both = [(a, b) for a, b in zip(dosages[i], dosages[j], strict=True) if a >= 0 and b >= 0]
        hethet = sum(a == 1 and b == 1 for a, b in both)
        ibs0 = sum(abs(int(a) - int(b)) == 2 for a, b in both)
        assert row.tolist() == [len(both), hethet, ibs0]


def test_kin0_rows_follow_plink2_order_and_columns(tmp_path) -> None:
    """Later sample first, sorted by it then the earlier; kinship-only without counts."""
    ids = [("f1", "a"), ("f1", "b"), ("f2", "c")]
    pairs = [
        RelatedPair(1, 2, 0.25, "1st"),
        RelatedPair(0, 2, 0.5, None),
        RelatedPair(0, 1, 0.1, None),
    ]
    path = write_kin0(tmp_path / "t.kin0", pairs, ids, min_kinship=0.25)
    assert path.read_text() == (
        "#FID1\tIID1\tFID2\tIID2\tKINSHIP\nf2\tc\tf1\ta\t0.5\nf2\tc\tf1\tb\t0.25\n"
    )
    with pytest.raises(ValueError, match=r"counts: expected \(3, 3\)"):
        write_kin0(tmp_path / "u.kin0", pairs, ids, counts=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="not a pair"):
        write_kin0(tmp_path / "v.kin0", [RelatedPair(0, 3, 0.3, None)], ids)


def test_query_pairs_keep_query_i_against_cohort_i() -> None:
    """In a query-by-cohort tile the diagonal is two different samples: query i and cohort i
    (a duplicate found at the same index was once dropped as if it were a self-pair)."""
    tile = np.array([[0.49, 0.01, 0.2], [0.0, 0.48, 0.0]])
    kept = related_pairs(tile, upper_only=False, keep_diagonal=True)
    assert [(p.i, p.j) for p in kept] == [(0, 0), (0, 2), (1, 1)]
    assert [p.degree for p in kept] == ["duplicate/MZ twin", "1st", "duplicate/MZ twin"]
    assert [(p.i, p.j) for p in related_pairs(tile, upper_only=False)] == [(0, 2)]
