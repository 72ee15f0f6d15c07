"""Genome comparisons: PLINK 1 binary genotypes in, relationship matrices out, numbers as PLINK's.

A cohort is an (N, M) matrix of allele dosages (0, 1, 2 copies of A1; missing calls allowed). Each
metric is a sum over variants, streamed over chunks of variants, on the CPU or a CUDA device; never
a Python loop over pairs. Counts are integers and exact. Two engines:

- ``bitplanes`` (the CPU's, :mod:`models.genome._cpu`; numpy, numba and BLAS, torch is not loaded):
  KING and IBS from popcounts over bit planes as PLINK counts them, each pair finished in place
  with its missing-call corrections; the GRM's standardized products through BLAS ``dsyrk``.
  :func:`pairwise_bed` runs it straight from a .bed, without the dosage matrix.
- ``gemm`` (:mod:`models.genome._gemm`, torch; CUDA, ``dot``, and on request): GEMMs of 0/1 and
  0/1/2 indicator matrices (TF32 on CUDA; int8 on a CPU with AMX/VNNI, float32 elsewhere, exact
  below 2²⁴ per chunk), float64 standardized products, missing-call corrections as products over
  the columns that hold one, and PLINK 1.9's weighted IBS correction as a sparse product.

The results match the PLINK builds to the last digit or two:

- ``grm``: ``plink2 --make-rel`` (variance-standardized, missing calls excluded pairwise).
- ``king``: ``plink2 --make-king`` (KING-robust kinship, Manichaikul et al. 2010, eq. 11).
- ``ibs``: ``plink 1.9 --distance ibs``, with its frequency-weighted missingness correction or
  ``flat-missing``.
- ``dot``: the plain ``A·Aᵀ / M`` with missing calls counted as 0 (no PLINK counterpart).

``pairwise_block`` computes a rectangle (query samples by cohort samples); ``pairwise`` is the
square. Tiles of the square computed with the cohort's allele frequencies give the same numbers as
the square. PLINK drops non-autosomal variants for these commands; here every variant passed in is
used, so filter beforehand.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from models.device import Device, device_type, resolve_device
from models.genome import _cpu as genome_cpu
from models.genome._bits import MAX_CHUNK, WORD, Counter
from models.genome._codes import (
    DEFAULT_VARIANT_CHUNK,
    _check_matrix,
    _chunk_codes,
    _chunks,
    _codes,
    allele_frequencies,
)
from models.genome.io.plink import (
    MISSING_INT8,
    FilesetInfo,
    Genotypes,
    _check_bed,
    _founders,
    _plink_paths,
    _read_columns,
    inspect_bed,
    read_bed,
    read_npy,
)
from models.genome.metrics import METRICS, Metric

#: The public API of genome comparisons; the engines (``_cpu``, ``_gemm``, ``_bits``) are private.
__all__ = [
    "DEFAULT_VARIANT_CHUNK",
    "ENGINES",
    "METRICS",
    "MISSING_INT8",
    "Engine",
    "FilesetInfo",
    "Genotypes",
    "IbsMissing",
    "Metric",
    "PreparedCohort",
    "allele_frequencies",
    "ibs_missing_weights",
    "inspect_bed",
    "pairwise",
    "pairwise_bed",
    "pairwise_block",
    "prepare_cohort",
    "read_bed",
    "read_npy",
]

IbsMissing = Literal["frequency", "flat"]
Engine = Literal["auto", "bitplanes", "gemm"]
ENGINES: tuple[Engine, ...] = ("auto", "bitplanes", "gemm")

#: The weight of IBS0 in each metric's pair distance (see models.genome._bits).
_HOM_WEIGHT = {"king": 4, "ibs": 2}


def ibs_missing_weights(frequencies: np.ndarray) -> np.ndarray:
    """PLINK 1.9's per-variant weights for the ``--distance`` missingness correction.

    The expected allele distance of a random pair under HWE is proportional to
    ``p(1-p)(p²-p+1)``; PLINK 1.9 scales the weights to sum to just under 2³² and rounds each to
    an integer (plink_calc.c, calc_distance). Done the same way here, so the correction matches
    to the last digit, quirk included: PLINK 1.9 skips the formula when the stored frequency is
    exactly 0 or 1 and leaves the weight at that frequency, which at a monomorphic variant is 1
    (it stores the major allele's, having made A1 the minor allele on load). So every
    monomorphic variant weighs 1, not 0 (checked against plink 1.9 b6.26 in both orientations).

    Parameters
    ----------
    frequencies
        (M,) A1 frequencies (:func:`allele_frequencies`). NaN (a variant without calls) is
        taken as 0.5, as PLINK 1.9 does (checked against its output).

    Returns
    -------
    np.ndarray
        (M,) float64 holding integers.
    """
    p = np.nan_to_num(np.asarray(frequencies, dtype=np.float64), nan=0.5)
    polymorphic = p * (1.0 - p) * (p * p - p + 1.0)
    raw = np.where((p > 0.0) & (p < 1.0), polymorphic, np.where((p == 0.0) | (p == 1.0), 1.0, 0.0))
    total = float(np.add.accumulate(raw)[-1]) if raw.size else 0.0  # C's sequential sum
    if total == 0.0:
        return np.zeros_like(raw)
    scale = (4294967296.0 - raw.size) / total
    return np.floor(raw * scale + 0.5)


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """The same elements of the same buffer (two views of one array)."""
    return (
        a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


def _code_chunks(x: np.ndarray, chunk: int, what: str) -> Iterator[tuple[int, np.ndarray]]:
    for cols in _chunks(x.shape[1], chunk):
        yield cols.start, np.ascontiguousarray(_chunk_codes(x, cols, what))


def _int8_codes(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` as int8 dosages, any negative value a missing call: int8 input (what
    :func:`read_bed` returns) as it is, after a check; anything else converted."""
    if x.dtype == np.int8:
        bad = int(genome_cpu._first_above_two(x))
        if bad:
            raise ValueError(
                f"{what}: dosages must be 0, 1, 2 or missing (NaN/negative), found {bad}"
            )
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)
    return _codes(x, what=what)


def _pairwise_cpu(
    metric: Metric,
    query: np.ndarray,
    against: np.ndarray,
    p_all: np.ndarray | None,
    weights: np.ndarray | None,
    variant_chunk: int,
    prepared: PreparedCohort | None = None,
) -> np.ndarray:
    """KING, IBS and the GRM on the CPU (:mod:`models.genome._cpu`), without torch."""
    symmetric = against is query
    chunk = min(max(WORD, variant_chunk - variant_chunk % WORD), MAX_CHUNK)
    if metric == "grm":
        assert p_all is not None
        if symmetric:
            chunks = _code_chunks(query, min(chunk, genome_cpu.CHUNK), "query")
            return genome_cpu.grm_square(chunks, query.shape[0], p_all, variant_major=False)
        return genome_cpu.grm_block(
            _code_chunks(query, min(chunk, genome_cpu.CHUNK), "query"),
            _code_chunks(against, min(chunk, genome_cpu.CHUNK), "against"),
            query.shape[0],
            against.shape[0],
            p_all,
        )
    # Rare variants as lists (split by the cohort's counts); if their terms overflow the uint16
    # correction fields, all variants in the planes; past that, N x N int32 counters.
    q = _int8_codes(query, "query")
    for rare in (True, False):
        split, cohort = (
            prepared.planes(rare)
            if prepared is not None
            else _planes_of(q if symmetric else against, rare)
        )
        planes_q = cohort if symmetric else genome_cpu.cohort_from_dosages(q, split)
        planes_a = None if symmetric else cohort
        try:
            return genome_cpu.counts_metric(metric, planes_q, planes_a, weights=weights)
        except genome_cpu.TooManyMissing:
            del planes_q, planes_a
    return _pairwise_counter(metric, query, against, weights, chunk)


@dataclass
class PreparedCohort:
    """A cohort prepared once for tile after tile against it: its variant split and bit planes,
    built on first use and kept with it (a worker holds one per job's cohort).

    Pass it as ``prepared=`` to :func:`pairwise_block` with its ``dosages`` as ``against``; the
    dosages must not change while it is used (:func:`prepare_cohort` makes them read-only).
    """

    dosages: np.ndarray  # (N, M), read-only
    _planes: dict[bool, tuple[tuple[np.ndarray, np.ndarray] | None, genome_cpu.Planes]] = field(
        default_factory=dict, repr=False
    )

    def planes(self, rare: bool) -> tuple[tuple[np.ndarray, np.ndarray] | None, genome_cpu.Planes]:
        """The variant split (rare variants as lists, or None: all in the planes) and planes."""
        if rare not in self._planes:
            self._planes[rare] = _planes_of(self.dosages, rare)
        return self._planes[rare]


def prepare_cohort(dosages: np.ndarray) -> PreparedCohort:
    """``dosages`` (N, M), made read-only, as a :class:`PreparedCohort` (nothing built yet)."""
    dosages.flags.writeable = False
    return PreparedCohort(dosages)


def _planes_of(
    against: np.ndarray, rare: bool
) -> tuple[tuple[np.ndarray, np.ndarray] | None, genome_cpu.Planes]:
    a = _int8_codes(against, "against")
    split = genome_cpu.classify(genome_cpu.dosage_counts(a), a.shape[0]) if rare else None
    return split, genome_cpu.cohort_from_dosages(a, split)


def _pairwise_counter(
    metric: Metric,
    query: np.ndarray,
    against: np.ndarray,
    weights: np.ndarray | None,
    chunk: int,
) -> np.ndarray:
    """KING and IBS with N x N int32 correction arrays (:class:`models.genome._bits.Counter`): for
    samples with more missing calls than :mod:`models.genome._cpu`'s uint16 fields hold."""
    symmetric = against is query
    n_variants = query.shape[1]
    counter = Counter(
        query.shape[0],
        against.shape[0],
        n_variants,
        symmetric=symmetric,
        hom_weight=_HOM_WEIGHT[metric],
        joint=metric == "ibs",
    )
    for cols in _chunks(n_variants, chunk):
        q = _chunk_codes(query, cols, "query")
        a = q if symmetric else _chunk_codes(against, cols, "against")
        counter.add(q, a, cols.start, None if weights is None else weights[cols])
    with np.errstate(divide="ignore", invalid="ignore"):  # PLINK's 0/0 and x/0: NaN and inf
        if metric == "king":
            het_ij, het_ji = counter.het_where_called()
            return 0.5 - counter.distance() / (4.0 * np.minimum(het_ij, het_ji))
        total = float(n_variants) if weights is None else float(weights.sum())
        return 1.0 - counter.distance() * (total / counter.called_in_both(total)) / (
            2.0 * n_variants
        )


# --- public API -------------------------------------------------------------------------------


def pairwise_block(
    query: np.ndarray,
    against: np.ndarray,
    *,
    metric: Metric = "grm",
    frequencies: np.ndarray | None = None,
    ibs_missing: IbsMissing = "frequency",
    device: Device = "auto",
    variant_chunk: int = DEFAULT_VARIANT_CHUNK,
    engine: Engine = "auto",
    prepared: PreparedCohort | None = None,
) -> np.ndarray:
    """One metric between every query sample and every cohort sample.

    Parameters
    ----------
    query
        (N_q, M) dosages of A1: 0, 1, 2; missing as NaN or a negative value (-1, -127).
    against
        (N_a, M) dosages of the same variants, same encoding.
    metric
        ``"grm"`` (plink2 --make-rel), ``"king"`` (plink2 --make-king), ``"ibs"`` (plink 1.9
        --distance ibs) or ``"dot"`` (A·Aᵀ / M, missing calls as 0).
    frequencies
        (M,) A1 frequencies of the whole cohort (:func:`allele_frequencies`). Required for
        ``grm`` and for ``ibs`` with ``ibs_missing="frequency"``; passing the cohort's, not the
        block's, is what makes tiles agree with the full matrix.
    ibs_missing
        ``"frequency"``: PLINK 1.9's default correction, weighting each jointly missing variant by
        its expected distance; ``"flat"``: its ``flat-missing`` (every variant weighs the same).
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when present).
    variant_chunk
        Variants per streamed chunk; results do not depend on it beyond float rounding.
        Passing the same array as ``query`` and ``against`` shares the per-chunk work.
    engine
        ``"bitplanes"``: popcounts over bit planes for the counts and BLAS for the GRM
        (:mod:`models.genome._cpu`, no torch), the CPU only, not ``dot``; ``"gemm"``: integer GEMMs (int8 on AMX/VNNI, else float32;
        the CUDA path); ``"auto"``: bit planes on the CPU, GEMMs on CUDA and for ``dot``. Both
        give the same numbers (the GRM's float64 products to rounding).
    prepared
        ``against`` prepared once (:func:`prepare_cohort`): the bit-plane engine reuses its
        planes instead of building them for every call. Its ``dosages`` must be ``against``.

    Returns
    -------
    np.ndarray
        (N_q, N_a) float64. NaN or ±inf where PLINK's own division is 0/0 or x/0 (no jointly
        called variants; no heterozygous call for KING).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if ibs_missing not in ("frequency", "flat"):
        raise ValueError(f"ibs_missing must be 'frequency' or 'flat', got {ibs_missing!r}")
    query, against = _check_matrix(query, "query"), _check_matrix(against, "against")
    if prepared is not None and not _same_array(prepared.dosages, against):
        raise ValueError("prepared: a cohort prepared from another array than against")
    if query is not against and _same_array(query, against):
        against = query  # a worker's single tile: rows 0…N of the cohort, a view of it
    if query.shape[1] != against.shape[1]:
        raise ValueError(f"query has {query.shape[1]} variants, against has {against.shape[1]}")
    n_variants = query.shape[1]
    needs_p = metric == "grm" or (metric == "ibs" and ibs_missing == "frequency")
    p_all: np.ndarray | None = None
    if needs_p:
        if frequencies is None:
            raise ValueError(
                f"metric {metric!r} needs the cohort's allele frequencies "
                "(frequencies=allele_frequencies(cohort))"
            )
        p_all = np.asarray(frequencies, dtype=np.float64)
        if p_all.shape != (n_variants,):
            raise ValueError(f"frequencies: expected shape ({n_variants},), got {p_all.shape}")
    weights = ibs_missing_weights(p_all) if metric == "ibs" and p_all is not None else None
    kind = device_type(device)
    if engine == "bitplanes" and (kind != "cpu" or metric == "dot"):
        raise ValueError("engine 'bitplanes' runs on the CPU, for grm, king and ibs")
    if engine == "bitplanes" or (engine == "auto" and kind == "cpu" and metric != "dot"):
        return _pairwise_cpu(metric, query, against, p_all, weights, variant_chunk, prepared)
    from models.genome import _gemm as genome_gemm  # torch, loaded only for this engine

    # One empty chunk when there are no variants, so that every sum exists (as zeros).
    spans = list(_chunks(n_variants, min(variant_chunk, genome_gemm._EXACT_CHUNK)))
    return genome_gemm.pairwise_gemm(
        metric,
        query,
        against,
        p_all,
        weights,
        resolve_device(device),
        spans or [slice(0, 0)],
        _chunk_codes,
    )


def pairwise(
    genotypes: np.ndarray,
    *,
    metric: Metric = "grm",
    frequencies: np.ndarray | None = None,
    ibs_missing: IbsMissing = "frequency",
    device: Device = "auto",
    variant_chunk: int = DEFAULT_VARIANT_CHUNK,
    engine: Engine = "auto",
) -> np.ndarray:
    """The square matrix of one metric over a cohort, as PLINK writes it.

    Parameters
    ----------
    genotypes
        (N, M) dosages of A1: 0, 1, 2; missing as NaN or a negative value (-1, -127).
    metric, ibs_missing, device, variant_chunk, engine
        As in :func:`pairwise_block`.
    frequencies
        (M,) A1 frequencies; by default computed over every row of ``genotypes``. PLINK counts
        founders only: where the cohort has non-founders, pass the founders' frequencies
        (:func:`pairwise_bed` and genome jobs take them from the .fam).

    Returns
    -------
    np.ndarray
        (N, N) float64, symmetric. The KING diagonal is 0.5 and the IBS diagonal 1, the values
        PLINK writes there; the GRM diagonal is each sample's Σ z² / (its called variants).
    """
    genotypes = _check_matrix(genotypes, "genotypes")
    if frequencies is None and metric in ("grm", "ibs"):
        frequencies = allele_frequencies(genotypes, variant_chunk=variant_chunk)
    out = pairwise_block(
        genotypes,
        genotypes,
        metric=metric,
        frequencies=frequencies,
        ibs_missing=ibs_missing,
        device=device,
        variant_chunk=variant_chunk,
        engine=engine,
    )
    if metric == "king":
        np.fill_diagonal(out, 0.5)
    elif metric == "ibs":
        np.fill_diagonal(out, 1.0)
    return out


def pairwise_bed(
    prefix: str | Path,
    *,
    metric: Literal["grm", "king", "ibs"],
    ibs_missing: IbsMissing = "frequency",
    out: str | Path | None = None,
    layout: Literal["triangle", "rows"] | None = None,
) -> np.ndarray | None:
    """The square of one metric straight from a PLINK 1 fileset, on the CPU, in PLINK's memory.

    The .bed is decoded chunk by chunk into bit planes (KING, IBS: 2 bits per call) or into
    standardized float64 blocks (GRM), never into an N x M dosage matrix. With ``out``, the square
    goes to ``out`` as PLINK's ``.bin`` (little-endian float64, row-major, what ``--make-king
    square bin`` writes) and nothing is returned; without it, the (N, N) matrix is returned, as
    :func:`pairwise` gives it.

    ``layout`` (KING and IBS with ``out``): ``"triangle"`` holds the lower triangle (N²/2 float64)
    and does each pair once; ``"rows"`` holds blocks of 256 rows, each against the whole cohort,
    and does each pair twice. The default is the triangle for KING and rows for IBS: PLINK 1.9's
    IBS runs in 134 MB, where plink2's KING takes 183 MB, and IBS has the time to spare.

    Raises
    ------
    ValueError
        As :func:`read_bed` for a malformed fileset; an unknown metric or layout.
    """
    if metric not in ("grm", "king", "ibs"):
        raise ValueError(f"metric must be 'grm', 'king' or 'ibs', got {metric!r}")
    if layout not in (None, "triangle", "rows"):
        raise ValueError(f"layout must be 'triangle' or 'rows', got {layout!r}")
    layout = layout or ("rows" if metric == "ibs" else "triangle")
    if ibs_missing not in ("frequency", "flat"):
        raise ValueError(f"ibs_missing must be 'frequency' or 'flat', got {ibs_missing!r}")
    bed, bim, fam = _plink_paths(prefix)
    iid, father, mother = _read_columns(fam, 6, (1, 2, 3))
    (variant_id,) = _read_columns(bim, 6, (1,))
    n, m = len(iid), len(variant_id)
    _check_bed(bed, n, m, fam, bim)
    counts = genome_cpu.bed_genotype_counts(bed, n, m)
    p = None
    if metric == "grm" or (metric == "ibs" and ibs_missing == "frequency"):
        # Over the founders, as plink2 --make-rel and plink 1.9 --distance (none: every sample).
        founder = np.array(_founders(father, mother), dtype=bool)
        if founder.any() and not founder.all():
            p = genome_cpu.frequencies(
                genome_cpu.founder_counts(bed, n, m, counts, founder), int(founder.sum())
            )
        else:
            p = genome_cpu.frequencies(counts, n)
    if metric == "grm":
        assert p is not None
        square = genome_cpu.grm_square(genome_cpu.iter_bed(bed, n, m), n, p, variant_major=True)
        if out is None:
            return square
        square.tofile(out)  # float64 is little-endian on every platform torch and numba run on
        return None
    weights = None if p is None else ibs_missing_weights(p)
    for rare in (True, False):  # as in _pairwise_cpu
        planes = genome_cpu.cohort_from_bed(bed, n, m, counts, rare=rare)
        try:
            if out is not None and layout == "rows":
                with open(out, "wb") as sink:
                    genome_cpu.write_square_by_rows(metric, planes, sink, weights=weights)
                return None
            result = genome_cpu.counts_metric(
                metric, planes, None, weights=weights, packed=out is not None
            )
            break
        except genome_cpu.TooManyMissing:
            del planes
    else:  # more missing calls than the uint16 fields hold: the N x N int32 counters
        dosages = read_bed(prefix).dosages
        result = pairwise(dosages, metric=metric, frequencies=p, ibs_missing=ibs_missing,
                          device="cpu")  # fmt: skip
        if out is None:
            return result
        result.tofile(out)
        return None
    del planes
    if out is None:
        return result
    with open(out, "wb") as sink:
        genome_cpu.write_square(result, n, sink)
    return None
