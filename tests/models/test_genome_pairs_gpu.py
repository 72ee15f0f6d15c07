"""The KING tile kernel as integer GEMMs (models.genome._pairs_gpu) equals the bit-plane kernel bit
for bit: on the CPU everywhere (the same torch code), on CUDA where torch sees a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.genome import api as genome
from models.genome._pairs_gpu import king_tile_gemm, king_tile_pairs_gemm
from models.genome.pairs import bed_samples, king_pairs, tile_pairs, triangle_tiles

DATA = Path(__file__).resolve().parents[1] / "data" / "genome"
SMALL = DATA / "hm3_small"
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.fixture(scope="module")
def dosages() -> np.ndarray:
    return genome.read_bed(SMALL).dosages


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("rows", "cols"), [((0, 60), None), ((0, 13), (13, 60)), ((5, 6), (0, 60))]
)
def test_gemm_tile_equals_the_square(dosages: np.ndarray, device: str, rows, cols) -> None:  # type: ignore[no-untyped-def]
    """Blocks with runs of missing calls, a one-sample block, a block against itself."""
    square = genome.pairwise(dosages, metric="king", device="cpu")
    q = dosages[rows[0] : rows[1]]
    got = king_tile_gemm(q, None if cols is None else dosages[cols[0] : cols[1]], device=device)
    c0, c1 = rows if cols is None else cols
    np.testing.assert_array_equal(got, square[rows[0] : rows[1], c0:c1])


@pytest.mark.parametrize("device", DEVICES)
def test_chunks_and_samples_without_hets_are_exact(device: str) -> None:
    """Chunk sums add exactly; a sample with no heterozygous call gives plink2's -inf/NaN."""
    rng = np.random.default_rng(4)
    x = rng.binomial(2, 0.3, size=(20, 3000)).astype(np.int8)
    x[rng.random(x.shape) < 0.05] = -1
    x[7][x[7] == 1] = 2
    expected = genome.pairwise(x, metric="king", device="cpu")
    got = king_tile_gemm(x, None, device=device, variant_chunk=512)
    np.testing.assert_array_equal(got, expected)
    assert np.isneginf(got[7, 8])


@pytest.mark.parametrize("device", DEVICES)
def test_pairs_job_tiles_on_the_gemm_engine_equal_the_bit_planes(device: str) -> None:
    source, _ = bed_samples(DATA / "hm3_relatives")
    split = source.split()
    for tile in triangle_tiles(source.n, 40):
        cpu = tile_pairs(source, source, tile, split, cutoff=0.02)
        other = tile_pairs(source, source, tile, split, cutoff=0.02, device=device)
        np.testing.assert_array_equal(other.kinship, cpu.kinship)
        np.testing.assert_array_equal(other.counts, cpu.counts)
    assert len(king_pairs(source, cutoff=0.0442, block=40)) == 64


@pytest.mark.parametrize("device", DEVICES)
def test_pairs_are_selected_on_the_device(dosages: np.ndarray, device: str) -> None:
    """Only pairs ≥ the cut-off come back; a block against itself gives row < column only."""
    square = genome.pairwise(dosages, metric="king", device="cpu")
    r, c, k = king_tile_pairs_gemm(dosages, None, cutoff=0.0, device=device)
    er, ec = np.nonzero(np.triu(square >= 0.0, 1))
    np.testing.assert_array_equal(r, er)
    np.testing.assert_array_equal(c, ec)
    np.testing.assert_array_equal(k, square[er, ec])
    r, c, k = king_tile_pairs_gemm(dosages[:10], dosages[10:], cutoff=-0.05, device=device)
    er, ec = np.nonzero(square[:10, 10:] >= -0.05)
    np.testing.assert_array_equal(k, square[:10, 10:][er, ec])


@pytest.mark.parametrize("device", DEVICES)
def test_pairs_with_a_nan_kinship_are_kept_as_on_the_bit_planes(device: str) -> None:
    """A sample with every call missing: its pairs' kinship is 0/0, which plink2's
    --king-table-filter keeps (NaN is never < the filter); the GEMM engine dropped them."""
    rng = np.random.default_rng(5)
    x = rng.binomial(2, 0.3, size=(12, 2000)).astype(np.int8)
    x[4] = -1
    r, c, k = king_tile_pairs_gemm(x, None, cutoff=0.0442, device=device)
    unknown = {(a, b) for a, b, z in zip(r.tolist(), c.tolist(), np.isnan(k), strict=True) if z}
    assert unknown == {(min(i, 4), max(i, 4)) for i in range(12) if i != 4}
    r, c, k = king_tile_pairs_gemm(x[:6], x[6:], cutoff=0.0442, device=device)
    assert sorted(zip(r[np.isnan(k)].tolist(), c[np.isnan(k)].tolist(), strict=True)) == [
        (4, j) for j in range(6)
    ]


def test_blocks_over_different_variants_are_refused() -> None:
    with pytest.raises(ValueError, match="same variants"):
        king_tile_gemm(np.zeros((3, 10), np.int8), np.zeros((3, 11), np.int8), device="cpu")
