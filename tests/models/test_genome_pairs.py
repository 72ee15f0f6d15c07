"""Pairs-only KING from 2-D tiles: every tile shape against the square engine, plink2's .kin0 on a
cohort with constructed relatives, and memory that does not grow with the cohort."""

from __future__ import annotations

import shutil
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from models.genome import api as genome
from models.genome import pairs as genome_pairs
from models.genome.io import output as genome_output
from models.genome.pairs import (
    BedSamples,
    DosageSamples,
    Tile,
    bed_samples,
    degree_counts,
    king_pairs,
    rectangle_tiles,
    tile_pairs,
    triangle_tiles,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "genome"
SMALL = DATA / "hm3_small"  # 60 samples x 2,000 SNPs, runs of missing calls
RELATIVES = DATA / "hm3_relatives"  # 96 samples x 14,079 SNPs, 64 constructed relative pairs


def write_bed(prefix: Path, dosages: np.ndarray) -> Path:
    """A PLINK 1 fileset of (N, M) dosages (NaN missing), through bed-reader."""
    from bed_reader import to_bed

    to_bed(prefix.with_suffix(".bed"), dosages.astype(np.float64))
    return prefix


def kin0_text(table: genome_pairs.PairTable, ids: list[tuple[str, str]]) -> str:
    """All-pairs table as plink2 prints it (the later sample first)."""
    first = [ids[c] for c in table.col.tolist()]
    second = [ids[r] for r in table.row.tolist()]
    lines = genome_output.kin0_lines(first, second, table.kinship, table.counts)
    return genome_output.kin0_header(True) + "".join(lines)


@pytest.mark.parametrize(("n", "block"), [(1, 4), (5, 4), (60, 8), (60, 28), (61, 60), (64, 64)])
def test_triangle_tiles_hold_each_pair_once(n: int, block: int) -> None:
    seen = np.zeros((n, n), np.int64)
    for tile in triangle_tiles(n, block):
        assert tile.row_start <= tile.col_start and tile.row_start % 4 == 0
        part = seen[tile.row_start : tile.row_end, tile.col_start : tile.col_end]
        if tile.diagonal:
            part[np.triu_indices(tile.row_end - tile.row_start, 1)] += 1
        else:
            part += 1
    assert np.array_equal(seen, np.triu(np.ones((n, n), np.int64), 1))
    assert sum(t.n_pairs for t in triangle_tiles(n, block)) == n * (n - 1) // 2


def test_block_sizes_are_refused_unless_whole_bytes() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        triangle_tiles(10, 6)
    with pytest.raises(ValueError, match="multiple of 4"):
        rectangle_tiles(10, 10, 0)


@pytest.mark.parametrize("block", [4, 8, 12, 20, 28, 32, 60, 64])
def test_tiles_of_every_shape_equal_the_square(block: int) -> None:
    """All pairs (cut-off -inf) from tiles of B samples equal plink2-exact pairwise(), bit for bit;
    the last block is short for every B that does not divide 60, and B=4 is one byte a row."""
    square = genome.pairwise(genome.read_bed(SMALL).dosages, metric="king", device="cpu")
    source, _ = bed_samples(SMALL)
    table = king_pairs(source, cutoff=-np.inf, block=block)
    rows, cols = np.triu_indices(60, 1)
    assert len(table) == len(rows)
    assert np.array_equal(np.sort(table.col * 60 + table.row), np.sort(cols * 60 + rows))
    np.testing.assert_array_equal(table.kinship, square[table.row, table.col])


@pytest.mark.parametrize("block", [4, 16, 36])
def test_query_rectangles_equal_pairwise_block(block: int) -> None:
    """Query mode: in-memory query rows against cohort blocks read from the .bed."""
    cohort = genome.read_bed(SMALL)
    query = cohort.dosages[[5, 11, 20, 33, 59]]  # the samples with long runs of missing calls
    expected = genome.pairwise_block(query, cohort.dosages, metric="king", device="cpu")
    source, _ = bed_samples(SMALL)
    table = king_pairs(source, query=DosageSamples(query), cutoff=-np.inf, block=block)
    assert len(table) == expected.size
    assert np.array_equal(table.row * 60 + table.col, np.arange(expected.size))  # .kin0 order
    np.testing.assert_array_equal(table.kinship, expected[table.row, table.col])


def test_kept_samples_and_variants_are_read_like_read_bed() -> None:
    """--keep (samples off the byte boundaries: the gather path) and --maf select as read_bed."""
    info = genome.inspect_bed(SMALL)
    keep = [info.iid[i] for i in (1, 2, 3, 7, 8, 13, 21, 22, 23, 30, 41, 58, 59)]
    expected_input = genome.read_bed(SMALL, keep=keep, min_maf=0.1)
    assert 0 < expected_input.n_variants < 2000
    square = genome.pairwise(expected_input.dosages, metric="king", device="cpu")
    source, _ = bed_samples(SMALL, keep=keep, min_maf=0.1)
    assert (source.n, source.n_variants) == (13, expected_input.n_variants)
    np.testing.assert_array_equal(
        source.codes(np.arange(13)), np.maximum(expected_input.dosages, -1)
    )
    table = king_pairs(source, cutoff=-np.inf, block=8)
    np.testing.assert_array_equal(table.kinship, square[table.row, table.col])


def test_blocks_of_dosages_equal_bed_reader_across_chunks_and_tiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BedSamples.codes (what a GPU tile ships) against bed-reader's own reading of a .bed it
    wrote: sizes off the 64 x 64 transpose tiles, several variant chunks, missing calls, samples
    in any order and repeated, contiguous from a byte boundary and not."""
    from bed_reader import open_bed, to_bed

    rng = np.random.default_rng(11)
    n, m = 203, 1_337
    values = rng.integers(0, 3, (n, m)).astype(np.float32)
    values[rng.random(values.shape) < 0.05] = np.nan
    bed = tmp_path / "x.bed"
    to_bed(bed, values, properties={"iid": [f"s{i}" for i in range(n)]})
    with open_bed(bed) as reader:
        expected = reader.read(dtype="int8")  # missing as -127
    expected = np.where(expected < 0, -1, expected).astype(np.int8)
    per_variant = (n + 3) // 4
    monkeypatch.setattr(genome_pairs, "READ_BYTES", 100 * per_variant)  # 14 chunks
    source = genome_pairs.BedSamples(bed, n, m)
    for positions in (np.arange(n), np.arange(64, 200), np.array([202, 5, 5, 130, 0, 77, 64])):
        np.testing.assert_array_equal(source.codes(positions), expected[positions])


def test_pairs_equal_plink2_kin0_and_find_every_constructed_relative() -> None:
    """hm3_relatives at cut-off 0.0442: plink2's .kin0 byte for byte (kinship, NSNP, HETHET,
    IBS0), and each of the 64 constructed pairs in its constructed degree."""
    source, info = bed_samples(RELATIVES)
    table = king_pairs(source, cutoff=0.0442, block=32)
    ids = list(zip(info.fid, info.iid, strict=True))
    assert kin0_text(table, ids) == (DATA / "hm3_relatives_0.0442.kin0").read_text()
    constructed = {
        frozenset((a, b)): degree
        for a, b, degree in (
            line.split("\t")
            for line in (DATA / "hm3_relatives.relatives.tsv").read_text().splitlines()[1:]
        )
    }
    found = {
        frozenset((info.iid[r], info.iid[c])): d
        for r, c, d in zip(table.row.tolist(), table.col.tolist(), table.degrees(), strict=True)
    }
    assert found == constructed
    assert degree_counts(table.kinship) == {
        "duplicate/MZ twin": 4, "1st": 36, "2nd": 20, "3rd": 4, "unrelated": 0, "unknown": 0,
    }  # fmt: skip


def test_cut_off_keeps_a_pair_at_exactly_its_value() -> None:
    """--king-table-filter keeps kinship ≥ the filter (plink2 keeps a pair at the filter)."""
    source, _ = bed_samples(RELATIVES)
    top = king_pairs(source, cutoff=0.3, block=96)
    exact = float(top.kinship.min())
    again = king_pairs(source, cutoff=exact, block=96)
    assert exact in again.kinship.tolist()
    assert len(king_pairs(source, cutoff=np.nextafter(exact, 1.0), block=96)) == len(again) - 1


def test_pairs_without_a_heterozygous_call_to_judge_by_are_kept_with_nan_as_plink2_keeps_them(
    tmp_path: Path,
) -> None:
    """A sample whose calls are all missing, and two samples never called at the same variant:
    their pairs' kinship is 0/0. plink2's --king-table-filter drops a pair only when kinship <
    filter, which NaN never is, so it writes them with "nan"; medbatch dropped them."""
    whole = genome.read_bed(RELATIVES)
    x = whole.dosages.astype(np.float64)
    x[x < 0] = np.nan
    half = x.shape[1] // 2
    x[10] = np.nan
    x[20, :half] = np.nan
    x[21, half:] = np.nan
    from bed_reader import to_bed

    prefix = tmp_path / "holes"
    properties = {"fid": list(whole.fid), "iid": list(whole.iid), "sid": list(whole.variant_id)}
    to_bed(prefix.with_suffix(".bed"), x, properties=properties)
    source, info = bed_samples(prefix)
    table = king_pairs(source, cutoff=0.0442, block=32)
    nan = np.isnan(table.kinship)
    unknown = {
        (r, c) for r, c, z in zip(table.row.tolist(), table.col.tolist(), nan, strict=True) if z
    }
    assert unknown == {(min(i, 10), max(i, 10)) for i in range(96) if i != 10} | {(20, 21)}
    assert degree_counts(table.kinship)["unknown"] == 96
    assert set(table.counts[nan, 0].tolist()) == {0}  # NSNP 0: no variant called in both
    if shutil.which("plink2") is None:
        return
    base = ["plink2", "--bfile", str(prefix), "--threads", "1", "--make-king-table"]
    live = tmp_path / "live"
    cmd = [*base, "--king-table-filter", "0.0442", "--out", str(live)]
    subprocess.run(cmd, check=True, capture_output=True)
    ids = list(zip(info.fid, info.iid, strict=True))
    assert kin0_text(table, ids) == live.with_suffix(".kin0").read_text()


def test_samples_with_more_missing_calls_than_16_bits_fall_back_exactly(tmp_path: Path) -> None:
    """A sample missing 17,000 of 17,500 calls overflows the pair kernel's 16-bit corrections;
    the tile then counts with int32 counters and still equals the square."""
    rng = np.random.default_rng(3)
    m = 17_500
    x = rng.binomial(2, rng.uniform(0.05, 0.5, m), size=(12, m)).astype(np.float64)
    x[3, :17_000] = np.nan
    x[4] = x[3]
    x[4, 17_000:17_010] = 1.0
    prefix = write_bed(tmp_path / "missing", x)
    square = genome.pairwise(x, metric="king", device="cpu")
    source, _ = bed_samples(prefix)
    table = king_pairs(source, cutoff=-np.inf, block=8)
    np.testing.assert_array_equal(table.kinship, square[table.row, table.col])


def _tile_peaks(n: int, m: int, block: int, tmp_path: Path) -> list[int]:
    """tracemalloc's peak while each tile of an n-sample cohort runs (its split computed first)."""
    rng = np.random.default_rng(n)
    x = rng.binomial(2, rng.uniform(0.05, 0.5, m), size=(n, m)).astype(np.float64)
    x[rng.random(x.shape) < 0.01] = np.nan
    x[n - 1] = x[0]  # a duplicate pair, so tiles also count a pair
    prefix = write_bed(tmp_path / f"flat{n}", x)
    del x
    source = BedSamples(prefix.with_suffix(".bed"), n, m)
    split = source.split()
    peaks = []
    tracemalloc.start()
    try:
        for tile in triangle_tiles(n, block):
            source._cache.clear()  # each tile reads its blocks, as a fresh worker would
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            tile_pairs(source, source, tile, split, cutoff=0.3)
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()
    return peaks


def test_tile_memory_stays_flat_as_the_cohort_grows(tmp_path: Path) -> None:
    """Allocations traced per tile (blocks of 128 x 3,000 variants) are the same at N = 256 and
    N = 2,048: they follow the block, not N (at 2,048 the float64 square alone is 32 MB)."""
    m, block = 3000, 128
    small = _tile_peaks(256, m, block, tmp_path)
    large = _tile_peaks(2048, m, block, tmp_path)
    assert len(large) == 16 * 17 // 2
    # Planes of two blocks (2 x 128 x 3,000 x 2 bits) and the 128 x 128 float64 tile.
    bound = 2 * 2 * block * m // 8 + 2 * block * block * 8 + 2**20
    assert max(small) < bound and max(large) < bound
    assert max(large) <= 1.05 * max(small)
    assert max(large) < 2048 * 2048 * 8 / 20


def test_tile_geometry_is_checked() -> None:
    source, _ = bed_samples(SMALL)
    split = source.split()
    table = tile_pairs(source, source, Tile(0, 8, 8, 16), split, cutoff=-np.inf)
    assert len(table) == 64 and table.row.min() == 0 and table.col.min() == 8
