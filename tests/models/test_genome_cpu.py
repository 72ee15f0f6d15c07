"""The torch-free CPU engine (models/genome/_cpu.py): its layouts, its fallback and its .bed path.

Its numbers are checked against the GEMM engine in test_genome_bits.py and against PLINK's own
outputs in test_genome.py; here: the packed triangle and the square written from it, planes
decoded from the .bed against planes packed from dosages, the fallback taken when a sample misses
more calls than the uint16 correction fields hold, and ``pairwise_bed`` end to end.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.genome import _cpu as genome_cpu
from models.genome.api import (
    allele_frequencies,
    ibs_missing_weights,
    pairwise,
    pairwise_bed,
    pairwise_block,
    prepare_cohort,
    read_bed,
)

ROOT = Path(__file__).resolve().parents[2]
PREFIX = ROOT / "tests" / "data" / "genome" / "hm3_small"


def _cohort(n: int, m: int, missing: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.binomial(2, rng.uniform(0.02, 0.98, size=m), size=(n, m)).astype(np.int8)
    x[rng.random((n, m)) < missing] = -1
    return x


def _planes(x: np.ndarray) -> genome_cpu.Planes:
    return genome_cpu.cohort_from_dosages(x, None)


def _planes_with_rare(x: np.ndarray) -> genome_cpu.Planes:
    return genome_cpu.cohort_from_dosages(x, genome_cpu.classify(_counts(x), x.shape[0]))


def _counts(x: np.ndarray) -> np.ndarray:
    return genome_cpu.dosage_counts(x)


def test_planes_from_the_bed_equal_planes_from_dosages(tmp_path) -> None:
    """131 samples: a last .bed byte with 3 samples and padding, a last 64-sample block of 3."""
    x = _cohort(131, 1000, 0.05, seed=3)
    _write_bed(tmp_path / "p", x)
    counts = genome_cpu.bed_genotype_counts(tmp_path / "p.bed", 131, 1000)
    np.testing.assert_array_equal(counts, _counts(x))
    assert counts[:, 2].tolist() == (x == 1).sum(axis=0).tolist()
    for rare in (False, True):
        split = genome_cpu.classify(counts, 131, rare)
        a = genome_cpu.cohort_from_dosages(x, split if rare else None)
        b = genome_cpu.cohort_from_bed(tmp_path / "p.bed", 131, 1000, counts, rare=rare)
        for name in ("het", "hom", "n_het", "miss_starts", "miss_variants"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        if rare:
            assert a.rare is not None and b.rare is not None
            for name in ("variants", "c_starts", "c_samples", "c_copies", "m_starts", "m_samples"):
                np.testing.assert_array_equal(getattr(a.rare, name), getattr(b.rare, name))
    plain = _planes(x)
    assert plain.n_het.tolist() == (x == 1).sum(axis=1).tolist()
    assert np.diff(plain.miss_starts).tolist() == (x < 0).sum(axis=1).tolist()


@pytest.mark.parametrize("metric", ["king", "ibs"])
def test_packed_triangle_and_written_square_equal_the_square(metric) -> None:
    x = _cohort(150, 1300, 0.05, seed=4)
    weights = ibs_missing_weights(allele_frequencies(x)) if metric == "ibs" else None
    planes = _planes(x)
    square = genome_cpu.counts_metric(metric, planes, None, weights=weights)
    tri = genome_cpu.counts_metric(metric, planes, None, weights=weights, packed=True)
    rows, cols = np.tril_indices(150)
    np.testing.assert_array_equal(tri, square[rows, cols])
    np.testing.assert_array_equal(square, square.T)
    sink = io.BytesIO()
    genome_cpu.write_square(tri, 150, sink, rows=64)  # blocks of rows that do not divide N
    np.testing.assert_array_equal(np.frombuffer(sink.getvalue(), "<f8").reshape(150, 150), square)


@pytest.mark.parametrize("metric", ["king", "ibs"])
def test_more_missing_calls_than_the_fields_hold_take_the_counter(metric) -> None:
    """A sample missing 17,000 calls overflows KING's uint16 field (4·16,383): the engine refuses
    it, and pairwise falls back to the N x N int32 counter with the same numbers as the GEMMs."""
    x = _cohort(5, 17_100, 0.01, seed=5)
    x[2, :17_000] = -1
    with pytest.raises(genome_cpu.TooManyMissing):
        genome_cpu.counts_metric("king", _planes(x), None)
    ours = pairwise(x, metric=metric, device="cpu")
    gemm = pairwise(x, metric=metric, device="cpu", engine="gemm")
    np.testing.assert_array_equal(ours, gemm)


@pytest.mark.parametrize("metric", ["grm", "king", "ibs"])
def test_pairwise_bed_equals_pairwise_of_read_bed(tmp_path, metric) -> None:
    expected = pairwise(read_bed(PREFIX).dosages, metric=metric, device="cpu")
    returned = pairwise_bed(PREFIX, metric=metric)
    assert returned is not None
    np.testing.assert_array_equal(returned, expected)
    out = tmp_path / f"{metric}.bin"
    assert pairwise_bed(PREFIX, metric=metric, out=out) is None
    n = expected.shape[0]
    np.testing.assert_array_equal(np.fromfile(out, "<f8").reshape(n, n), expected)


@pytest.mark.parametrize(("metric", "golden"), [("grm", "rel"), ("ibs", "mibs")])
def test_pairwise_bed_counts_frequencies_over_founders_as_plink_does(tmp_path, metric, golden):
    """hm3_small with 10 samples given parents: plink2 --make-rel and plink 1.9 --distance ibs
    take the 50 founders' allele frequencies, and so does pairwise_bed (written out too)."""
    data = PREFIX.parent
    prefix = tmp_path / "pedigree"
    for ext in (".bed", ".bim"):
        Path(f"{prefix}{ext}").write_bytes(Path(f"{PREFIX}{ext}").read_bytes())
    Path(f"{prefix}.fam").write_bytes((data / "hm3_pedigree.fam").read_bytes())
    expected = np.fromfile(data / f"hm3_pedigree.{golden}.bin", "<f8").reshape(60, 60)
    np.testing.assert_allclose(
        pairwise_bed(prefix, metric=metric), expected, rtol=1e-12, atol=1e-14
    )
    out = tmp_path / f"{metric}.bin"
    assert pairwise_bed(prefix, metric=metric, out=out) is None
    np.testing.assert_allclose(
        np.fromfile(out, "<f8").reshape(60, 60), expected, rtol=1e-12, atol=1e-14
    )


def _write_bed(prefix: Path, x: np.ndarray) -> None:
    """A SNP-major PLINK 1 fileset of (N, M) dosages (-1 missing); padding bits left 00."""
    n, m = x.shape
    code = np.array([3, 2, 0, 1], np.uint8)[np.where(x < 0, 3, x)].T  # (M, N) 2-bit codes
    padded = np.zeros((m, 4 * -(-n // 4)), np.uint8)
    padded[:, :n] = code
    quads = padded.reshape(m, -1, 4)
    packed = quads[..., 0] | quads[..., 1] << 2 | quads[..., 2] << 4 | quads[..., 3] << 6
    Path(f"{prefix}.bed").write_bytes(b"\x6c\x1b\x01" + packed.astype(np.uint8).tobytes())
    Path(f"{prefix}.bim").write_text("".join(f"1\tv{j}\t0\t{j + 1}\tA\tG\n" for j in range(m)))
    Path(f"{prefix}.fam").write_text("".join(f"f{i}\ti{i}\t0\t0\t0\t-9\n" for i in range(n)))


@pytest.mark.parametrize("metric", ["grm", "king", "ibs"])
def test_pairwise_bed_decodes_partial_bytes_and_blocks(tmp_path, metric) -> None:
    """131 samples: a last .bed byte holding 3 samples and padding, a last 64-sample block of 3."""
    x = _cohort(131, 1100, 0.02, seed=6)
    _write_bed(tmp_path / "c", x)
    ours = pairwise_bed(tmp_path / "c", metric=metric)
    np.testing.assert_array_equal(ours, pairwise(x, metric=metric, device="cpu"))


def _rare_cohort(n: int, m: int, missing: float, seed: int) -> np.ndarray:
    """Mostly rare variants (minor allele frequency 0.1-5%), A1 the minor allele at half of them
    and the major one at the other half."""
    rng = np.random.default_rng(seed)
    maf = rng.uniform(0.001, 0.05, size=m)
    x = rng.binomial(2, np.where(rng.random(m) < 0.5, maf, 1 - maf), size=(n, m)).astype(np.int8)
    x[rng.random((n, m)) < missing] = -1
    return x


@pytest.mark.parametrize("cost", [4096, 64, 1])
@pytest.mark.parametrize(("metric", "ibs_missing"), [("king", "frequency"), ("ibs", "frequency"),
                                                     ("ibs", "flat")])  # fmt: skip
@pytest.mark.parametrize("missing", [0.02, 0.3])
def test_rare_variant_lists_equal_the_gemm_engine(
    monkeypatch, tmp_path, cost, metric, ibs_missing, missing
) -> None:
    """Rare variants (at most N²/cost pair updates; 1: every variant) taken out of the planes and
    counted from their carriers give the GEMM engine's numbers, bit for bit, from dosages and
    from a .bed."""
    monkeypatch.setattr(genome_cpu, "RARE_COST", cost)
    x = _rare_cohort(150, 1500, missing, seed=cost)
    rare = genome_cpu.classify(_counts(x), 150)[0]
    assert rare.sum() > {4096: 0, 64: 500, 1: 1499}[cost]
    p = allele_frequencies(x)
    kwargs = dict(metric=metric, ibs_missing=ibs_missing, frequencies=p, device="cpu")
    ours = pairwise(x, **kwargs)  # type: ignore[arg-type]
    gemm = pairwise(x, engine="gemm", **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(ours, gemm)
    tile = pairwise_block(x[40:97], x, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(tile, pairwise_block(x[40:97], x, engine="gemm", **kwargs))  # type: ignore[arg-type]
    _write_bed(tmp_path / "r", x)
    np.testing.assert_array_equal(
        pairwise_bed(tmp_path / "r", metric=metric, ibs_missing=ibs_missing), gemm
    )
    for layout in ("triangle", "rows"):  # rows: blocks of 256 rows, so 150 is one partial block
        out = tmp_path / f"r_{layout}.bin"
        pairwise_bed(tmp_path / "r", metric=metric, ibs_missing=ibs_missing, out=out, layout=layout)
        np.testing.assert_array_equal(np.fromfile(out, "<f8").reshape(150, 150), gemm)


def test_rare_terms_past_the_fields_fall_back_to_the_planes(monkeypatch) -> None:
    """One sample carries 5,000 singletons and another misses 10,000 calls: the rare-variant
    terms would pass uint16 (4·10,000 + 8·5,000), all-planes KING fits, and gives the same."""
    x = np.zeros((40, 20_000), np.int8)
    x[0, :5_000] = 1
    x[1, 5_000:15_000] = -1
    x[2:, 15_000:] = np.random.default_rng(7).binomial(2, 0.4, size=(38, 5_000))
    rare = genome_cpu.classify(_counts(x), 40)[0]
    assert rare[:15_000].all()
    with pytest.raises(genome_cpu.TooManyMissing):
        genome_cpu.counts_metric("king", _planes_with_rare(x), None)
    ours = pairwise(x, metric="king", device="cpu")
    np.testing.assert_array_equal(ours, pairwise(x, metric="king", device="cpu", engine="gemm"))


@pytest.mark.parametrize("metric", ["king", "ibs"])
def test_rows_written_block_by_block_equal_the_square(tmp_path, metric) -> None:
    """Blocks of rows that do not divide N, each against the whole cohort, rare lists and all."""
    x = _rare_cohort(150, 900, 0.05, seed=11)
    weights = ibs_missing_weights(allele_frequencies(x)) if metric == "ibs" else None
    planes = _planes_with_rare(x)
    square = genome_cpu.counts_metric(metric, planes, None, weights=weights)
    sink = io.BytesIO()
    genome_cpu.write_square_by_rows(metric, planes, sink, weights=weights, rows=64)
    np.testing.assert_array_equal(np.frombuffer(sink.getvalue(), "<f8").reshape(150, 150), square)


def test_pairwise_bed_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="metric must be"):
        pairwise_bed(PREFIX, metric="dot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layout must be"):
        pairwise_bed(PREFIX, metric="ibs", out=tmp_path / "x.bin", layout="square")  # type: ignore[arg-type]
    for ext in (".bim", ".fam"):
        (tmp_path / f"set{ext}").write_bytes(PREFIX.with_suffix(ext).read_bytes())
    (tmp_path / "set.bed").write_bytes(PREFIX.with_suffix(".bed").read_bytes()[:-5])
    with pytest.raises(ValueError, match="bytes"):
        pairwise_bed(tmp_path / "set", metric="king")
    assert not list(tmp_path.glob("*.bin"))


def test_the_cpu_engine_does_not_load_torch() -> None:
    """KING, IBS and the GRM on the CPU run without importing torch (277 MB resident here)."""
    code = (
        "import sys\n"
        "from models.genome.api import pairwise_bed\n"
        f"for metric in ('grm', 'king', 'ibs'): pairwise_bed({str(PREFIX)!r}, metric=metric)\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("metric", ["grm", "king", "ibs"])
def test_a_tile_of_every_row_is_the_square(metric) -> None:
    """A worker's single tile (rows 0…N, a view of the cohort) takes the square's path."""
    x = _rare_cohort(90, 900, 0.02, seed=8)
    p = allele_frequencies(x)
    tile = pairwise_block(x[0:90], x, metric=metric, frequencies=p, device="cpu")
    np.testing.assert_array_equal(tile, pairwise(x, metric=metric, frequencies=p, device="cpu"))
    gemm = pairwise_block(x[0:90], x, metric=metric, frequencies=p, device="cpu", engine="gemm")
    np.testing.assert_allclose(tile, gemm, rtol=0, atol=1e-14 if metric == "grm" else 0)


def test_a_prepared_cohort_is_reused_and_an_unprepared_one_read_afresh() -> None:
    """Without a prepared cohort every call reads the array, so changing it changes the result;
    prepared, its planes are built once and tiles against it agree with the square."""
    x = _rare_cohort(70, 700, 0.02, seed=9)
    first = pairwise_block(x[:10], x, metric="king", device="cpu")
    x[20:, :] = x[0]  # every later sample a duplicate of the first
    second = pairwise_block(x[:10], x, metric="king", device="cpu")
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(second, pairwise_block(x[:10], x, metric="king", device="cpu",
                                                         engine="gemm"))  # fmt: skip
    cohort = prepare_cohort(x)
    assert not x.flags.writeable
    tiles = [
        pairwise_block(x[r : r + 25], x, metric="king", device="cpu", prepared=cohort)
        for r in (0, 25, 50)
    ]
    np.testing.assert_array_equal(np.vstack(tiles), pairwise(x, metric="king", device="cpu"))
    assert list(cohort._planes) == [True]  # built once: rare variants as lists, the rest planes
    with pytest.raises(ValueError, match="prepared"):
        pairwise_block(x[:5], x.copy(), metric="king", device="cpu", prepared=cohort)
