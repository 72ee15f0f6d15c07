"""models.genome.api against PLINK's own output, an independent .bed decoder and textbook pair loops."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from models.genome import _gemm as genome_gemm
from models.genome.api import (
    MISSING_INT8,
    allele_frequencies,
    pairwise,
    pairwise_block,
    read_bed,
    read_npy,
)
from tests.helpers import GENOME_DATA, PLINK_MATRICES, SHARED_DIR, require_shared

PREFIX = GENOME_DATA / "hm3_small"
GENOTYPES_DIR = SHARED_DIR / "data" / "genotypes"
REAL_SETS = [
    "HM3_thinned_autosomal_overlap",
    "1kg.ref.phase1_release_v3.20101123_thinned_autosomal_overlap",
]


@pytest.fixture(scope="module")
def cohort():
    return read_bed(PREFIX)


def _golden_bin(name: str, n: int) -> np.ndarray:
    return np.fromfile(GENOME_DATA / f"{name}.bin", dtype="<f8").reshape(n, n)


# --- PLINK goldens ----------------------------------------------------------------------------


@pytest.mark.parametrize(("metric", "ibs_missing", "name"), PLINK_MATRICES)
def test_matrix_equals_plink_binary_output(cohort, metric, ibs_missing, name) -> None:
    """Each metric equals PLINK's float64 .bin matrix to 1e-12 on real data with missing calls."""
    ours = pairwise(cohort.dosages, metric=metric, ibs_missing=ibs_missing, device="cpu")
    np.testing.assert_allclose(ours, _golden_bin(name, cohort.n_samples), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("metric", "ibs_missing", "name"), PLINK_MATRICES)
def test_matrix_equals_plink_text_output(cohort, metric, ibs_missing, name) -> None:
    """Each metric equals PLINK's text matrix to the 6 significant digits PLINK prints."""
    ours = pairwise(cohort.dosages, metric=metric, ibs_missing=ibs_missing, device="cpu")
    np.testing.assert_allclose(ours, np.loadtxt(GENOME_DATA / name), rtol=6e-6, atol=0)


@pytest.mark.parametrize("name", [name for _, _, name in PLINK_MATRICES])
def test_sample_order_equals_plink_id_files(cohort, name) -> None:
    """The reader's (FID, IID) order is the row order PLINK wrote."""
    lines = [ln.split() for ln in (GENOME_DATA / f"{name}.id").read_text().splitlines()]
    ids = [tuple(f) for f in lines if not f[0].startswith("#")]
    assert ids == list(zip(cohort.fid, cohort.iid, strict=True))


def test_golden_input_exercises_missingness_and_monomorphic_variants(cohort) -> None:
    """The golden slice has missing calls (some in both samples of a pair) and monomorphic SNPs."""
    missing = cohort.dosages == MISSING_INT8
    assert (cohort.n_samples, cohort.n_variants) == (60, 2000)
    assert missing.sum() == 557
    assert (missing[5] & missing[11]).sum() == 50
    p = allele_frequencies(cohort.dosages)
    assert [cohort.variant_id[j] for j in np.flatnonzero(p == 0)] == ["rs12740476"]
    assert [cohort.variant_id[j] for j in np.flatnonzero(p == 1)] == ["rs17095902"]


@pytest.mark.skipif(shutil.which("plink2") is None, reason="plink2 is not on PATH")
def test_live_plink2_recomputes_the_grm_golden(tmp_path, cohort) -> None:
    """plink2 on PATH, run now, writes the stored .rel.bin; our matrix equals both."""
    out = tmp_path / "live"
    flags = ["--threads", "1", "--make-rel", "square", "bin"]
    cmd = ["plink2", "--bfile", str(PREFIX), *flags, "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    live = np.fromfile(f"{out}.rel.bin", dtype="<f8").reshape(cohort.n_samples, -1)
    # plink2's last digits follow the system BLAS (the golden was written with the reference
    # BLAS; Debian's OpenBLAS, once installed, moves entries near 0 by ~1e-16): absolute 1e-14.
    golden = _golden_bin("hm3_small.rel", cohort.n_samples)
    np.testing.assert_allclose(live, golden, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(pairwise(cohort.dosages, device="cpu"), live, rtol=1e-12, atol=1e-14)


# --- the reader -------------------------------------------------------------------------------


def _member(prefix: Path, ext: str) -> Path:
    return prefix.with_name(prefix.name + ext)  # names like "1kg.ref.phase1..." hold dots


def _decode_bed(prefix: Path) -> np.ndarray:
    """Plain-numpy SNP-major .bed decoder: 00 → 2 copies of A1, 10 → 1, 11 → 0, 01 → missing."""
    n = len(_member(prefix, ".fam").read_text().splitlines())
    m = len(_member(prefix, ".bim").read_text().splitlines())
    raw = np.fromfile(_member(prefix, ".bed"), dtype=np.uint8)
    assert raw[:3].tolist() == [0x6C, 0x1B, 0x01]
    body = raw[3:].reshape(m, (n + 3) // 4)
    codes = np.stack([(body >> (2 * k)) & 3 for k in range(4)], axis=2).reshape(m, -1)[:, :n]
    lookup = np.array([2, MISSING_INT8, 1, 0], dtype=np.int8)
    return lookup[codes].T


@pytest.mark.parametrize("name", REAL_SETS)
def test_reader_equals_plain_numpy_decoder_on_real_files(name) -> None:
    """HapMap3 and 1000 Genomes decode to the same dosages and ids as a plain numpy decoder."""
    prefix = require_shared(GENOTYPES_DIR / name)
    genotypes = read_bed(prefix)
    expected = _decode_bed(prefix)
    assert genotypes.dosages.dtype == np.int8
    np.testing.assert_array_equal(genotypes.dosages, expected)
    fam = [line.split()[:2] for line in _member(prefix, ".fam").read_text().splitlines()]
    bim = [line.split() for line in _member(prefix, ".bim").read_text().splitlines()]
    assert list(genotypes.iid) == [f[1] for f in fam]
    assert list(genotypes.variant_id) == [b[1] for b in bim]
    assert list(genotypes.a1) == [b[4] for b in bim]


def test_reader_keep_and_min_maf_select_like_plink(cohort) -> None:
    """``keep`` takes IIDs or (FID, IID) in file order; ``min_maf`` drops variants below it."""
    keep = [cohort.iid[7], (cohort.fid[2], cohort.iid[2]), cohort.iid[40]]
    sub = read_bed(PREFIX, keep=keep, min_maf=0.2)
    x = cohort.dosages[[2, 7, 40]]
    observed = x != MISSING_INT8
    p = np.where(observed, x, 0).sum(0) / (2.0 * observed.sum(0))
    cols = np.flatnonzero(np.minimum(p, 1 - p) >= 0.2)
    assert sub.iid == (cohort.iid[2], cohort.iid[7], cohort.iid[40])
    assert sub.variant_id == tuple(cohort.variant_id[c] for c in cols)
    np.testing.assert_array_equal(sub.dosages, x[:, cols])


def test_read_npy_accepts_nan_and_minus_one_as_missing(tmp_path) -> None:
    """An .npy of 0/1/2 with NaN or -1 reads as int8 dosages with the missing code."""
    np.save(tmp_path / "f.npy", np.array([[0, 1, np.nan], [2, 1, 0]]))
    np.save(tmp_path / "i.npy", np.array([[0, 1, -1], [2, 1, 0]]))
    expected = np.array([[0, 1, MISSING_INT8], [2, 1, 0]], dtype=np.int8)
    for name in ("f.npy", "i.npy"):
        genotypes = read_npy(tmp_path / name)
        np.testing.assert_array_equal(genotypes.dosages, expected)
        assert genotypes.iid == ("0", "1")
        assert genotypes.variant_id == ("v0", "v1", "v2")


# --- textbook references ----------------------------------------------------------------------


def _reference(x: np.ndarray, metric: str, ibs_missing: str = "frequency") -> np.ndarray:
    """The per-pair loops as the PLINK docs and papers state them (x: float, NaN missing)."""
    n, m = x.shape
    obs = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.nansum(x, axis=0) / (2.0 * obs.sum(axis=0))
    out = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            both = [v for v in range(m) if obs[i, v] and obs[j, v]]
            if metric == "grm":  # Yang et al. 2011 standardization, averaged over joint calls
                terms = [
                    (x[i, v] - 2 * p[v]) * (x[j, v] - 2 * p[v]) / (2 * p[v] * (1 - p[v]))
                    for v in both
                    if 0 < p[v] < 1
                ]
                out[i, j] = sum(terms) / len(both)
            elif metric == "king":  # Manichaikul et al. 2010, eq. 11, between-family estimator
                sq = sum((x[i, v] - x[j, v]) ** 2 for v in both)
                het_i = sum(x[i, v] == 1 for v in both)
                het_j = sum(x[j, v] == 1 for v in both)
                out[i, j] = 0.5 if i == j else 0.5 - sq / (4 * min(het_i, het_j))
            elif metric == "ibs":
                dist = sum(abs(x[i, v] - x[j, v]) for v in range(m) if v in both)
                if ibs_missing == "flat":
                    scale = m / len(both)
                else:  # expected-distance weights; PLINK 1.9 weighs a monomorphic variant 1
                    w = [
                        q * (1 - q) * (q * q - q + 1) if 0 < q < 1 else float(q in (0, 1))
                        for q in np.nan_to_num(p, nan=0.5)
                    ]
                    scale = sum(w) / sum(w[v] for v in both)
                out[i, j] = 1.0 if i == j else 1 - dist * scale / (2 * m)
            else:
                out[i, j] = sum(x[i, v] * x[j, v] for v in both) / m
    return out


def _random_cohort(seed: int = 7, n: int = 9, m: int = 61) -> np.ndarray:
    """0/1/2 with ~15% missing, an A1-free, an all-A1 and one uncalled variant."""
    rng = np.random.default_rng(seed)
    x = rng.choice([0.0, 1.0, 2.0], size=(n, m), p=[0.3, 0.45, 0.25])
    x[rng.random((n, m)) < 0.15] = np.nan
    x[:, 3] = np.where(np.isnan(x[:, 3]), np.nan, 0.0)
    x[:, 8] = np.where(np.isnan(x[:, 8]), np.nan, 2.0)
    x[:, 20] = np.nan
    return x


ENCODINGS = {
    "float-nan": lambda x: x,
    "int8-minus1": lambda x: np.where(np.isnan(x), -1, x).astype(np.int8),
    "int8-bed-reader": lambda x: np.where(np.isnan(x), MISSING_INT8, x).astype(np.int8),
}
CASES = [
    ("grm", "frequency"),
    ("king", "frequency"),
    ("ibs", "frequency"),
    ("ibs", "flat"),
    ("dot", "frequency"),
]


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize(("metric", "ibs_missing"), CASES)
def test_metric_equals_textbook_pair_loop(metric, ibs_missing, encoding) -> None:
    """Every metric equals its per-pair loop on a small matrix with missing and monomorphic calls."""
    x = _random_cohort()
    ours = pairwise(
        ENCODINGS[encoding](x),
        metric=metric,
        ibs_missing=ibs_missing,
        device="cpu",
        variant_chunk=16,
    )
    # PLINK 1.9 rounds its missingness weights to integers summing to ~2^32: ~1e-9 relative.
    rtol = 1e-8 if (metric, ibs_missing) == ("ibs", "frequency") else 1e-12
    np.testing.assert_allclose(ours, _reference(x, metric, ibs_missing), rtol=rtol, atol=1e-14)


@pytest.mark.parametrize(("metric", "ibs_missing"), CASES)
def test_variant_chunk_size_does_not_change_results(cohort, metric, ibs_missing) -> None:
    """Streaming 7 variants at a time gives the single-pass numbers."""
    kw = {"metric": metric, "ibs_missing": ibs_missing, "device": "cpu"}
    np.testing.assert_allclose(
        pairwise(cohort.dosages, variant_chunk=7, **kw),
        pairwise(cohort.dosages, variant_chunk=5000, **kw),
        rtol=1e-12,
        atol=1e-14,
    )


@pytest.mark.parametrize(("metric", "ibs_missing"), CASES)
def test_tiles_assemble_to_the_full_matrix(cohort, metric, ibs_missing) -> None:
    """3-by-2 tiles computed with the cohort's frequencies reassemble into ``pairwise``."""
    x = cohort.dosages
    p = allele_frequencies(x)
    full = pairwise(x, metric=metric, ibs_missing=ibs_missing, device="cpu")
    rows, cols = np.array_split(np.arange(len(x)), 3), np.array_split(np.arange(len(x)), 2)
    tiled = np.block(
        [
            [
                pairwise_block(
                    x[r], x[c], metric=metric, frequencies=p, ibs_missing=ibs_missing, device="cpu"
                )
                for c in cols
            ]
            for r in rows
        ]
    )
    if metric == "king":
        np.fill_diagonal(tiled, 0.5)
    np.testing.assert_allclose(tiled, full, rtol=1e-12, atol=1e-14)


def test_query_against_cohort_equals_rows_of_the_full_matrix(cohort) -> None:
    """A new sample scored against the cohort (cohort frequencies) gets its row of the GRM."""
    x, p = cohort.dosages, allele_frequencies(cohort.dosages)
    block = pairwise_block(x[[4]], x, metric="grm", frequencies=p, device="cpu")
    np.testing.assert_allclose(block[0], pairwise(x, device="cpu")[4], rtol=1e-12)


# --- the kernels' code paths ------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 7, 8, 61, 2049])
def test_int8_products_equal_int64_matmul(k) -> None:
    """The int8 GEMM (and its narrow-chunk fallback) is exact, extreme int8 values included."""
    rng = np.random.default_rng(k)
    left = torch.from_numpy(rng.integers(-128, 128, size=(37, k), dtype=np.int8))
    right = torch.from_numpy(rng.integers(-128, 128, size=(19, k), dtype=np.int8))
    expected = left.long() @ right.long().T
    assert torch.equal(genome_gemm._int_products(left, right, 128 * 128).long(), expected)


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize(("metric", "ibs_missing", "name"), PLINK_MATRICES)
def test_small_blocks_and_both_missing_paths_equal_plink(
    monkeypatch, cohort, metric, ibs_missing, name, path
) -> None:
    """The GEMM engine's upper-triangle blocks, narrow float64 blocks, sparse or digit-split
    weighted IBS: PLINK's."""
    monkeypatch.setattr(genome_gemm, "_TRIANGLE_BLOCK", 7)
    monkeypatch.setattr(genome_gemm, "_FLOAT64_BLOCK", 300)
    monkeypatch.setattr(genome_gemm, "_SPARSE_JOINT_RATIO", 1 if path == "sparse" else 10**9)
    ours = pairwise(
        cohort.dosages, metric=metric, ibs_missing=ibs_missing, device="cpu", engine="gemm"
    )
    np.testing.assert_allclose(ours, _golden_bin(name, cohort.n_samples), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_weighted_ibs_tiles_take_either_missing_path(monkeypatch, cohort, path) -> None:
    """GEMM-engine query-by-cohort tiles of weighted IBS equal the square on both joint-missing
    paths."""
    monkeypatch.setattr(genome_gemm, "_SPARSE_JOINT_RATIO", 1 if path == "sparse" else 10**9)
    x, p = cohort.dosages, allele_frequencies(cohort.dosages)
    block = pairwise_block(x[:25], x[10:], metric="ibs", frequencies=p, device="cpu", engine="gemm")
    full = pairwise(x, metric="ibs", device="cpu", variant_chunk=300)
    np.testing.assert_allclose(block, full[:25, 10:], rtol=1e-12, atol=1e-14)


# --- bad inputs -------------------------------------------------------------------------------


def _copy_fileset(tmp_path: Path) -> Path:
    for ext in (".bed", ".bim", ".fam"):
        shutil.copy(PREFIX.with_suffix(ext), tmp_path / f"set{ext}")
    return tmp_path / "set"


def test_truncated_bed_is_rejected_with_sizes(tmp_path) -> None:
    """A .bed shorter than 3 + M·ceil(N/4) names the file and both sizes."""
    prefix = _copy_fileset(tmp_path)
    data = prefix.with_suffix(".bed").read_bytes()
    prefix.with_suffix(".bed").write_bytes(data[:-5])
    with pytest.raises(ValueError, match=r"set\.bed: 29998 bytes, expected 30003"):
        read_bed(prefix)


@pytest.mark.parametrize("size", [0, 2])
def test_a_bed_cut_off_inside_its_magic_bytes_is_called_truncated(tmp_path, size) -> None:
    """A 2-byte .bed was called "sample-major (mode byte )", an empty one "not a PLINK 1 .bed"."""
    prefix = _copy_fileset(tmp_path)
    bed = prefix.with_suffix(".bed")
    bed.write_bytes(bed.read_bytes()[:size])
    with pytest.raises(ValueError, match=rf"set\.bed: {size} bytes, expected 30003 .*truncated"):
        read_bed(prefix)


def test_wrong_magic_bytes_are_rejected(tmp_path) -> None:
    """A file that does not start 6c 1b 01 is not read as a .bed."""
    prefix = _copy_fileset(tmp_path)
    data = prefix.with_suffix(".bed").read_bytes()
    prefix.with_suffix(".bed").write_bytes(b"BED" + data[3:])
    with pytest.raises(ValueError, match=r"set\.bed: not a PLINK 1 \.bed"):
        read_bed(prefix)
    prefix.with_suffix(".bed").write_bytes(b"\x6c\x1b\x00" + data[3:])
    with pytest.raises(ValueError, match="sample-major"):
        read_bed(prefix)


@pytest.mark.parametrize("ext", [".fam", ".bim", ".bed"])
def test_missing_member_of_the_fileset_is_named(tmp_path, ext) -> None:
    """A missing .bed/.bim/.fam raises FileNotFoundError naming it."""
    prefix = _copy_fileset(tmp_path)
    prefix.with_suffix(ext).unlink()
    with pytest.raises(FileNotFoundError, match=rf"set\{ext} not found"):
        read_bed(prefix)


def test_fam_with_extra_line_mismatches_the_bed(tmp_path) -> None:
    """A .fam with one sample too many no longer fits the .bed's size."""
    prefix = _copy_fileset(tmp_path)
    with prefix.with_suffix(".fam").open("a") as handle:
        handle.write("X\tNA0\t0\t0\t1\t-9\n")
    with pytest.raises(ValueError, match=r"ceil\(61 samples .*set\.fam\) / 4\); truncated"):
        read_bed(prefix)


def test_bim_with_a_short_line_is_rejected(tmp_path) -> None:
    """A .bim line without 6 fields names the file and line."""
    prefix = _copy_fileset(tmp_path)
    lines = prefix.with_suffix(".bim").read_text().splitlines()
    lines[9] = "1 rsBROKEN 0 100"
    prefix.with_suffix(".bim").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"set\.bim, line 10: expected 6 fields, found 4"):
        read_bed(prefix)


def test_header_and_comment_lines_at_the_top_are_skipped_as_plink2_does(tmp_path, cohort) -> None:
    """plink2 skips '#' lines above the first sample or variant (its own '#FID IID' header);
    they were read as a sample: with 59 samples the .bed's size still fitted, every sample took
    the genotypes of the one before it, and the header was named in the pairs."""
    from bed_reader import to_bed

    x = cohort.dosages[:59].astype(np.float64)
    x[x < 0] = np.nan
    prefix = tmp_path / "set"
    to_bed(
        prefix.with_suffix(".bed"), x,
        properties={"fid": list(cohort.fid[:59]), "iid": list(cohort.iid[:59]),
                    "sid": list(cohort.variant_id), "allele_1": list(cohort.a1),
                    "allele_2": list(cohort.a2)},
    )  # fmt: skip
    fam, bim = prefix.with_suffix(".fam"), prefix.with_suffix(".bim")
    fam.write_text("#FID\tIID\tPAT\tMAT\tSEX\tPHENO1\n" + fam.read_text())
    bim.write_text("# from a pipeline\n#CHROM\tID\tCM\tPOS\tALT\tREF\n" + bim.read_text())
    got = read_bed(prefix)
    assert got.iid == cohort.iid[:59] and got.variant_id == cohort.variant_id
    np.testing.assert_array_equal(got.dosages, cohort.dosages[:59])
    lines = fam.read_text().splitlines(keepends=True)
    fam.write_text("".join([*lines[:5], "#late comment\n", *lines[5:]]))
    with pytest.raises(ValueError, match=r"set\.fam, line 6: starts with '#' below the first"):
        read_bed(prefix)


def test_fam_fields_split_at_ascii_whitespace_and_must_be_utf8(tmp_path, cohort) -> None:
    """plink2 keeps a no-break space inside an IID; it was split there ("expected 6 fields,
    found 7"). A Latin-1 byte was "'utf-8' codec can't decode byte 0xe9 in position 90", naming
    neither the file nor the line."""
    prefix = _copy_fileset(tmp_path)
    fam = prefix.with_suffix(".fam")
    lines = fam.read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b"NA", b"N\xc2\xa0A", 1)
    fam.write_bytes(b"\n".join(lines))
    got = read_bed(prefix)
    assert got.iid[4] == cohort.iid[4].replace("NA", "N\u00a0A", 1)
    np.testing.assert_array_equal(got.dosages, cohort.dosages)
    lines[4] = lines[4].replace(b"N\xc2\xa0A", b"J\xe9", 1)
    fam.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=r"set\.fam, line 5: not UTF-8 text; re-encode"):
        read_bed(prefix)


def test_unknown_keep_id_is_rejected(cohort) -> None:
    with pytest.raises(ValueError, match="NA_NOBODY"):
        read_bed(PREFIX, keep=[cohort.iid[0], "NA_NOBODY"])


def test_keep_of_a_sample_the_fam_lists_twice_is_rejected_as_plink2_does(tmp_path, cohort):
    """plink2 --keep stops on a .fam listing one FID and IID twice ("Duplicate ID")."""
    lines = (PREFIX.parent / "hm3_small.fam").read_text().splitlines()
    lines[1] = "\t".join([cohort.fid[0], cohort.iid[0], *lines[1].split()[2:]])
    prefix = tmp_path / "twice"
    for ext in (".bed", ".bim"):
        Path(f"{prefix}{ext}").write_bytes(Path(f"{PREFIX}{ext}").read_bytes())
    Path(f"{prefix}.fam").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="listed more than once"):
        read_bed(prefix, keep=[(cohort.fid[0], cohort.iid[0])])


@pytest.mark.parametrize("bad", [3, 0.5])
def test_dosages_outside_0_1_2_are_rejected(bad) -> None:
    x = np.zeros((3, 4))
    x[1, 2] = bad
    with pytest.raises(ValueError, match=f"0, 1, 2 or missing.*found {bad}"):
        pairwise(x, metric="king", device="cpu")


@pytest.mark.parametrize("metric", ["king", "ibs"])
def test_int8_dosages_above_2_are_rejected_on_both_sides(metric) -> None:
    """int8 input (read_bed's) is checked in place by the CPU engine, query and cohort alike."""
    x = np.zeros((3, 70), np.int8)
    x[2, 65] = 5
    with pytest.raises(ValueError, match=r"dosages must be 0, 1, 2 or missing.*found 5"):
        pairwise(x, metric=metric, device="cpu")
    with pytest.raises(ValueError, match=r"against: dosages must be 0, 1, 2 .*found 5"):
        pairwise_block(x[:2], x, metric=metric, frequencies=np.full(70, 0.5), device="cpu")


def test_shapes_and_arguments_are_checked() -> None:
    """1-D input, variant mismatch, absent or misshapen frequencies and unknown metrics fail."""
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"expected an \(N, M\) genotype matrix"):
        pairwise(np.zeros(4), device="cpu")
    with pytest.raises(ValueError, match="query has 4 variants, against has 5"):
        pairwise_block(x, np.zeros((2, 5)), metric="dot", device="cpu")
    with pytest.raises(ValueError, match="needs the cohort's allele frequencies"):
        pairwise_block(x, x, metric="grm", device="cpu")
    with pytest.raises(ValueError, match=r"expected shape \(4,\)"):
        pairwise_block(x, x, metric="grm", frequencies=np.zeros(3), device="cpu")
    with pytest.raises(ValueError, match="metric must be one of"):
        pairwise(x, metric="hamming", device="cpu")  # type: ignore[arg-type]


def test_frequencies_contradicting_the_calls_are_rejected() -> None:
    """As plink2: frequencies calling a variant monomorphic while its calls vary are an error."""
    x = np.array([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="variant 0: the frequencies call it monomorphic"):
        pairwise_block(x, x, metric="grm", frequencies=np.array([0.0, 0.5]), device="cpu")


def test_read_npy_rejects_bad_arrays(tmp_path) -> None:
    np.save(tmp_path / "flat.npy", np.zeros(5))
    np.save(tmp_path / "bad.npy", np.array([[0, 7]]))
    with pytest.raises(ValueError, match=r"expected an \(N, M\) array"):
        read_npy(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match="found 7"):
        read_npy(tmp_path / "bad.npy")
    with pytest.raises(FileNotFoundError, match=r"nothing\.npy"):
        read_npy(tmp_path / "nothing.npy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device_is_refused() -> None:
    with pytest.raises(RuntimeError, match="no CUDA device"):
        pairwise(np.zeros((2, 2)), metric="dot", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("metric", "ibs_missing"), CASES)
def test_cuda_equals_cpu(cohort, metric, ibs_missing) -> None:
    kw = {"metric": metric, "ibs_missing": ibs_missing}
    np.testing.assert_allclose(
        pairwise(cohort.dosages, device="cuda", **kw),
        pairwise(cohort.dosages, device="cpu", **kw),
        rtol=1e-12,
        atol=1e-14,
    )
