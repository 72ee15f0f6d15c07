"""The bit-plane engine (models/genome/_bits.py) against the GEMM engine and a plain numpy count.

The GEMM engine is checked against PLINK's own outputs in test_genome.py; here the two engines
must give the same bits for the counting metrics on shapes that stress the bit planes: sample
counts that are odd or below a block, variant counts around a word (64) and a chunk, and missing
rates from none to most calls, where the missing-call corrections carry most of the count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.genome._bits import Counter
from models.genome.api import allele_frequencies, pairwise, pairwise_block


def _cohort(n: int, m: int, missing: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, size=m)
    x = rng.binomial(2, p, size=(n, m)).astype(np.int8)
    x[rng.random((n, m)) < missing] = -1
    return x


def _numpy_counts(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Pair counts over variants called in both, by broadcasting (n_x, n_y, m): the reference."""
    called = (x[:, None, :] >= 0) & (y[None, :, :] >= 0)
    xi = np.where(called, x[:, None, :], 0).astype(np.int64)
    yj = np.where(called, y[None, :, :], 0).astype(np.int64)
    return {
        "sq": ((xi - yj) ** 2).sum(-1),
        "abs": np.abs(xi - yj).sum(-1),
        "het_ij": (called & (x[:, None, :] == 1)).sum(-1),
        "het_ji": (called & (y[None, :, :] == 1)).sum(-1),
        "both": called.sum(-1),
    }


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("n", "m", "missing"), [(1, 1, 0.0), (2, 64, 0.1), (17, 65, 0.0),
                                                  (33, 130, 0.02), (40, 200, 0.6)])  # fmt: skip
def test_counter_equals_numpy_counts(symmetric, n, m, missing) -> None:
    x = _cohort(n, m, missing, seed=n + m)
    y = x if symmetric else _cohort(n + 3, m, missing / 2, seed=n * m + 1)
    expected = _numpy_counts(x, y)
    for hom_weight, name in [(4, "sq"), (2, "abs")]:
        counter = Counter(len(x), len(y), m, symmetric=symmetric, hom_weight=hom_weight, joint=True)
        for start in range(0, m, 64):  # chunks of one word: every chunk boundary is exercised
            cols = slice(start, min(start + 64, m))
            counter.add(x[:, cols], x[:, cols] if symmetric else y[:, cols], start, None)
        np.testing.assert_array_equal(counter.distance(), expected[name])
        het_ij, het_ji = counter.het_where_called()
        np.testing.assert_array_equal(het_ij, expected["het_ij"])
        np.testing.assert_array_equal(het_ji, expected["het_ji"])
        np.testing.assert_array_equal(counter.called_in_both(float(m)), expected["both"])


def test_counter_refuses_unaligned_chunks() -> None:
    counter = Counter(3, 3, 100, symmetric=True, hom_weight=4, joint=False)
    x = np.zeros((3, 36), np.int8)
    with pytest.raises(ValueError, match="multiples of 64"):
        counter.add(x, x, 10, None)


CASES = [("king", "frequency"), ("ibs", "frequency"), ("ibs", "flat"), ("grm", "frequency")]


@pytest.mark.parametrize(("metric", "ibs_missing"), CASES)
@pytest.mark.parametrize(("n", "missing"), [(45, 0.0), (45, 0.01), (45, 0.3), (150, 0.05)])
def test_bitplanes_equal_gemm_engine(metric, ibs_missing, n, missing) -> None:
    """Same cohort, both engines, the square and a rectangle; 1000 variants over 3 chunks; 150
    samples span three 64-sample blocks of the correction kernel, the last one partial."""
    x = _cohort(n, 1000, missing, seed=int(missing * 100) + 5)
    p = allele_frequencies(x)
    kwargs = dict(metric=metric, ibs_missing=ibs_missing, frequencies=p, device="cpu",
                  variant_chunk=384)  # fmt: skip
    bits = pairwise(x, engine="bitplanes", **kwargs)
    gemm = pairwise(x, engine="gemm", **kwargs)
    bits_block = pairwise_block(x[5 : n // 2], x[20:], engine="bitplanes", **kwargs)
    gemm_block = pairwise_block(x[5 : n // 2], x[20:], engine="gemm", **kwargs)
    if metric == "grm":  # float64 BLAS products summed in another order
        np.testing.assert_allclose(bits, gemm, rtol=0, atol=1e-14)
        np.testing.assert_allclose(bits_block, gemm_block, rtol=0, atol=1e-14)
    else:
        np.testing.assert_array_equal(bits, gemm)
        np.testing.assert_array_equal(bits_block, gemm_block)
    np.testing.assert_array_equal(np.isnan(bits), np.isnan(gemm))


def test_bitplanes_refuse_dot_and_cuda() -> None:
    x = _cohort(4, 10, 0.0, seed=1)
    with pytest.raises(ValueError, match="bitplanes"):
        pairwise(x, metric="dot", engine="bitplanes", device="cpu")
    with pytest.raises(ValueError, match="engine must be one of"):
        pairwise(x, metric="king", engine="popcount", device="cpu")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("metric", "ibs_missing"), CASES)
@pytest.mark.parametrize("missing", [0.01, 0.3])
def test_cuda_gemm_equals_cpu_bitplanes(metric, ibs_missing, missing) -> None:
    """The CUDA path (TF32 tensor-core products of indicators) against the CPU's popcounts."""
    x = _cohort(300, 5000, missing, seed=3)
    kwargs = dict(metric=metric, ibs_missing=ibs_missing, frequencies=allele_frequencies(x))
    cpu = pairwise(x, device="cpu", **kwargs)
    cuda = pairwise(x, device="cuda", **kwargs)
    cpu_block = pairwise_block(x[:37], x[100:], device="cpu", **kwargs)
    cuda_block = pairwise_block(x[:37], x[100:], device="cuda", **kwargs)
    atol = 1e-14 if metric != "grm" else 1e-13
    np.testing.assert_allclose(cuda, cpu, rtol=1e-12, atol=atol)
    np.testing.assert_allclose(cuda_block, cpu_block, rtol=1e-12, atol=atol)
