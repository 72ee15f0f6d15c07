"""Dosages as the kernels take them: 0/1/2 int8 codes with -1 for a missing call, streamed in
chunks of variants; and the allele frequencies every metric standardizes with.

Shared by the public API (:mod:`models.genome.api`), the readers (:mod:`models.genome.io.plink`)
and the engines; numba is loaded only when frequencies are counted.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

#: Variants per streamed chunk. The largest operands are (N, 3·chunk) int8 (KING and IBS
#: indicators, 25 MB at N = 1,000); the GRM's float64 operands are cut to 2,048 variants. Int8
#: GEMMs run faster the longer the chunk (KING at N = 4,000: 8,192 takes ~0.6x the time of 2,048).
DEFAULT_VARIANT_CHUNK = 8192


def _codes(x: np.ndarray, *, what: str = "genotypes") -> np.ndarray:
    """0/1/2 as int8, -1 for missing (NaN or any negative value); anything else is an error."""
    if x.dtype.kind == "f":
        missing = np.isnan(x) | (x < 0)
        filled = np.where(missing, 0.0, x)
        bad = (filled != np.round(filled)) | (filled > 2)
    elif x.dtype.kind in "iub":
        missing = x < 0
        filled = np.where(missing, 0, x)
        bad = filled > 2
    else:
        raise ValueError(f"{what}: dtype {x.dtype} is not numeric")
    if bad.any():
        value = x[bad].flat[0]
        raise ValueError(
            f"{what}: dosages must be 0, 1, 2 or missing (NaN/negative), found {value}"
        )
    return np.where(missing, -1, filled).astype(np.int8)


def _check_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected an (N, M) genotype matrix, got shape {x.shape}")
    return x


def _chunk_codes(x: np.ndarray, cols: slice | np.ndarray, what: str) -> np.ndarray:
    """``_codes(x[:, cols])``; int8 input (what :func:`read_bed` returns) in two passes."""
    block = x[:, cols]
    if x.dtype != np.int8 or (block > 2).any():
        return _codes(block, what=what)
    return np.maximum(block, -1)


def _chunks(n_variants: int, variant_chunk: int) -> Iterator[slice]:
    if variant_chunk < 1:
        raise ValueError(f"variant_chunk must be ≥ 1, got {variant_chunk}")
    for start in range(0, n_variants, variant_chunk):
        yield slice(start, min(start + variant_chunk, n_variants))


def allele_frequencies(
    genotypes: np.ndarray, *, variant_chunk: int = DEFAULT_VARIANT_CHUNK
) -> np.ndarray:
    """A1 frequency per variant over the observed calls, NaN where a variant has none.

    This is what PLINK computes when no ``--read-freq`` is given (all samples here are treated as
    founders; PLINK counts founders only).

    Parameters
    ----------
    genotypes
        (N, M) dosages, missing as NaN or a negative value.

    Returns
    -------
    np.ndarray
        (M,) float64.
    """
    from models.genome._cpu import _variant_counts  # numba: compiled kernels

    genotypes = _check_matrix(genotypes, "genotypes")
    observed = np.zeros(genotypes.shape[1], dtype=np.int64)
    alt = np.zeros(genotypes.shape[1], dtype=np.int64)
    for cols in _chunks(genotypes.shape[1], variant_chunk):
        codes = _chunk_codes(genotypes, cols, "genotypes")
        _variant_counts(codes, observed[cols], alt[cols])
    with np.errstate(invalid="ignore", divide="ignore"):
        return alt / (2.0 * observed)
