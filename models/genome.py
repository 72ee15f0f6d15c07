"""Genome comparisons: PLINK 1 binary genotypes in, relationship matrices out, numbers as PLINK's.

A cohort is an (N, M) matrix of allele dosages (0, 1, 2 copies of A1; missing calls allowed). Each
metric is a sum over variants, so it is computed as a few matrix products over indicator or
standardized matrices, streamed over chunks of variants, on the CPU or a CUDA device; never a
Python loop over pairs. Counts are integers and exact. On the CPU they come from popcounts over
bit planes, as PLINK counts them (:mod:`models.genome_bits`, the ``bitplanes`` engine); on CUDA
(and with ``engine="gemm"``) from GEMMs of 0/1 and 0/1/2 indicator matrices: int8 summing in int32
on a CPU with AMX/VNNI, float32 elsewhere (exact below 2²⁴ per chunk), integers across chunks.
The GRM's standardized products are float64; over one cohort only the blocks on and above the
diagonal are multiplied. In the GEMM engine, missing-call corrections are products over only the
columns that hold one, and PLINK 1.9's weighted IBS correction is a sparse product while missing
calls are rare.
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

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from bed_reader import open_bed

from models.cpu_features import fast_int8_gemm
from models.genome_bits import MAX_CHUNK, WORD, Counter
from models.scoring import Device, resolve_device

Metric = Literal["grm", "king", "ibs", "dot"]
IbsMissing = Literal["frequency", "flat"]
Engine = Literal["auto", "bitplanes", "gemm"]
METRICS: tuple[Metric, ...] = ("grm", "king", "ibs", "dot")
ENGINES: tuple[Engine, ...] = ("auto", "bitplanes", "gemm")

#: Variants per streamed chunk. The largest operands are (N, 3·chunk) int8 (KING and IBS
#: indicators, 25 MB at N = 1,000); the GRM's float64 operands are cut to 2,048 variants. Int8
#: GEMMs run faster the longer the chunk (KING at N = 4,000: 8,192 takes ~0.6x the time of 2,048).
DEFAULT_VARIANT_CHUNK = 8192
#: bed-reader's int8 code for a missing call.
MISSING_INT8 = -127
#: SNP-major PLINK 1 .bed: magic 0x6c 0x1b, then 0x01 (the PLINK 1.9 file-format spec).
BED_MAGIC = b"\x6c\x1b\x01"

# PLINK 2 treats a variant as monomorphic when 2p(1-p) falls below kSmallEpsilon and gives it a
# zero column (plink2_matrix_calc.cc, ExpandCenteredVarmaj); it still counts in the denominators.
_MONOMORPHIC_VARIANCE = 2.0**-44
#: Chunks are cut to at most this many variants, so that int8 products of up to ±127 per variant
#: sum exactly in int32 (and indicator products in float32 where there is no int8 GEMM).
_EXACT_CHUNK = 2**20
#: Rows per block of a symmetric float64 product: only blocks on and above the diagonal are
#: multiplied, about half the work of the full product.
_TRIANGLE_BLOCK = 512
#: Variants per standardized float64 block of the GRM within a chunk (N·8 bytes each).
_FLOAT64_BLOCK = 2048
#: torch._int_mm on the CPU (torch 2.13) returns garbage for k = 1 (and an uninitialized matrix
#: for k = 0); narrower products go through float32, exact at that size.
_INT_MM_MIN_K = 8
#: A chunk's weighted joint-missing sums go through sparse products when its pairs of missing
#: calls in one variant number at most 1/this of the dense product's size (1% missing: 1/10,000).
_SPARSE_JOINT_RATIO = 1024
#: Query rows per sparse product (its output is dense).
_SPARSE_ROW_BLOCK = 512
#: The weight of IBS0 in each metric's pair distance (see models.genome_bits).
_HOM_WEIGHT = {"king": 4, "ibs": 2}


@dataclass(frozen=True)
class Genotypes:
    """A cohort read from disk: dosages plus the ids PLINK writes beside its matrices.

    ``dosages`` is (N, M) int8: copies of A1 (the .bim's fifth column, which PLINK 2 calls ALT),
    :data:`MISSING_INT8` for a missing call.
    """

    dosages: np.ndarray  # (N, M) int8
    fid: tuple[str, ...]  # (N,)
    iid: tuple[str, ...]  # (N,)
    variant_id: tuple[str, ...]  # (M,)
    a1: tuple[str, ...]  # (M,)
    a2: tuple[str, ...]  # (M,)

    @property
    def n_samples(self) -> int:
        return int(self.dosages.shape[0])

    @property
    def n_variants(self) -> int:
        return int(self.dosages.shape[1])


# --- reading ----------------------------------------------------------------------------------


def _plink_paths(prefix: str | Path) -> tuple[Path, Path, Path]:
    prefix = Path(prefix)
    if prefix.suffix in (".bed", ".bim", ".fam"):
        prefix = prefix.with_suffix("")
    # Not with_suffix: names such as "1kg.ref.phase1_release_v3.20101123_..." hold dots.
    bed, bim, fam = (prefix.with_name(prefix.name + ext) for ext in (".bed", ".bim", ".fam"))
    for path in (bed, bim, fam):
        if not path.is_file():
            raise FileNotFoundError(f"PLINK fileset {prefix}: {path} not found")
    return bed, bim, fam


def _read_columns(path: Path, expected: int, names: tuple[int, ...]) -> list[tuple[str, ...]]:
    """Whitespace-separated columns ``names`` of a .fam/.bim, every line checked for its width."""
    rows: list[list[str]] = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != expected:
                raise ValueError(
                    f"{path}, line {number}: expected {expected} fields, found {len(fields)}"
                )
            rows.append([fields[i] for i in names])
    return [tuple(column) for column in zip(*rows, strict=True)] or [() for _ in names]


def _check_bed(path: Path, n_samples: int, n_variants: int, fam: Path, bim: Path) -> None:
    with path.open("rb") as handle:
        magic = handle.read(3)
    if magic[:2] != BED_MAGIC[:2]:
        raise ValueError(
            f"{path}: not a PLINK 1 .bed (magic bytes {magic.hex(' ')}, "
            f"expected {BED_MAGIC.hex(' ')})"
        )
    if magic[2:] != BED_MAGIC[2:]:
        raise ValueError(
            f"{path}: sample-major .bed (mode byte {magic[2:].hex()}) "
            "is not supported; rewrite it with plink --make-bed"
        )
    expected = 3 + n_variants * ((n_samples + 3) // 4)
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"{path}: {actual} bytes, expected {expected} = 3 + {n_variants} variants ({bim}) "
            f"* ceil({n_samples} samples ({fam}) / 4); truncated, or .bim/.fam not its own"
        )


def _keep_index(
    keep: Iterable[str | tuple[str, str]], fid: tuple[str, ...], iid: tuple[str, ...], fam: Path
) -> np.ndarray:
    """Row numbers of the kept samples, in file order (as ``plink --keep``)."""
    wanted = [(k if isinstance(k, tuple) else (None, k)) for k in keep]
    by_pair = {(f, i): n for n, (f, i) in enumerate(zip(fid, iid, strict=True))}
    by_iid: dict[str, list[int]] = {}
    for n, i in enumerate(iid):
        by_iid.setdefault(i, []).append(n)
    rows: set[int] = set()
    for f, i in wanted:
        if f is None:
            found = by_iid.get(i, [])
            if len(found) > 1:
                raise ValueError(f"{fam}: IID {i!r} is not unique; keep (FID, IID) pairs")
        else:
            found = [by_pair[(f, i)]] if (f, i) in by_pair else []
        if not found:
            raise ValueError(f"{fam}: sample {i if f is None else (f, i)!r} not found")
        rows.update(found)
    return np.array(sorted(rows), dtype=np.intp)


@dataclass(frozen=True)
class FilesetInfo:
    """What a PLINK fileset holds, checked without reading its genotypes."""

    prefix: Path
    fid: tuple[str, ...]
    iid: tuple[str, ...]
    n_variants: int


def inspect_bed(prefix: str | Path) -> FilesetInfo:
    """Check a fileset as :func:`read_bed` does (files, magic, size, line widths); read only ids."""
    bed, bim, fam = _plink_paths(prefix)
    fid, iid = _read_columns(fam, 6, (0, 1))
    (variant_id,) = _read_columns(bim, 6, (1,))
    _check_bed(bed, len(iid), len(variant_id), fam, bim)
    return FilesetInfo(bed.with_suffix(""), fid, iid, len(variant_id))


def read_bed(
    prefix: str | Path,
    *,
    keep: Iterable[str | tuple[str, str]] | None = None,
    min_maf: float | None = None,
) -> Genotypes:
    """Read a PLINK 1 binary fileset (``prefix.bed/.bim/.fam``) into A1 dosages.

    Parameters
    ----------
    prefix
        The fileset path without extension (a path ending in .bed/.bim/.fam is accepted).
    keep
        Samples to keep, as IIDs or (FID, IID) pairs; file order is kept, like ``plink --keep``.
    min_maf
        Drop variants whose minor allele frequency over the kept samples' observed calls is below
        this, like ``plink --maf``.

    Returns
    -------
    Genotypes
        ``dosages`` (N, M) int8 counting A1 (the .bed's ``00`` code is 2 copies, ``10`` one,
        ``11`` none, ``01`` missing = :data:`MISSING_INT8`), with the sample and variant ids.

    Raises
    ------
    FileNotFoundError
        A file of the set is missing.
    ValueError
        Wrong magic bytes, a .bed whose size is not ``3 + M·ceil(N/4)`` (truncated, or .bim/.fam
        line counts that are not its own), malformed .bim/.fam lines, unknown ``keep`` ids.
    """
    bed, bim, fam = _plink_paths(prefix)
    fid, iid = _read_columns(fam, 6, (0, 1))
    variant_id, a1, a2 = _read_columns(bim, 6, (1, 4, 5))
    _check_bed(bed, len(iid), len(variant_id), fam, bim)
    rows = np.arange(len(iid), dtype=np.intp) if keep is None else _keep_index(keep, fid, iid, fam)
    with open_bed(bed, iid_count=len(iid), sid_count=len(variant_id), count_A1=True) as reader:
        dosages = reader.read(index=np.s_[rows, :], dtype="int8", order="C")
    columns = np.arange(len(variant_id))
    if min_maf is not None:
        p = allele_frequencies(dosages)
        columns = np.flatnonzero(np.minimum(p, 1.0 - p) >= min_maf)
        dosages = np.ascontiguousarray(dosages[:, columns])
    return Genotypes(
        dosages=dosages,
        fid=tuple(fid[r] for r in rows),
        iid=tuple(iid[r] for r in rows),
        variant_id=tuple(variant_id[c] for c in columns),
        a1=tuple(a1[c] for c in columns),
        a2=tuple(a2[c] for c in columns),
    )


def read_npy(path: str | Path) -> Genotypes:
    """An (N, M) ``.npy`` of 0/1/2 dosages (NaN or -1 for missing) as :class:`Genotypes`.

    Samples are named ``"0" … "N-1"`` (FID = IID), variants ``"v0" … "v{M-1}"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2:
        raise ValueError(f"{path}: expected an (N, M) array, got shape {array.shape}")
    codes = _codes(array, what=str(path))
    dosages = np.where(codes < 0, MISSING_INT8, codes).astype(np.int8)
    names = tuple(str(i) for i in range(array.shape[0]))
    variants = tuple(f"v{j}" for j in range(array.shape[1]))
    return Genotypes(dosages, names, names, variants, ("",) * len(variants), ("",) * len(variants))


# --- inputs -----------------------------------------------------------------------------------


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


def _chunk_codes(x: np.ndarray, cols: slice, what: str) -> np.ndarray:
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
    genotypes = _check_matrix(genotypes, "genotypes")
    out = np.empty(genotypes.shape[1], dtype=np.float64)
    with torch.inference_mode():
        for cols in _chunks(genotypes.shape[1], variant_chunk):
            codes = torch.from_numpy(_chunk_codes(genotypes, cols, "genotypes"))
            observed = _column_sums(_int8(codes >= 0)).numpy()
            alt = _column_sums(codes.clamp(min=0)).numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                out[cols] = alt / (2.0 * observed)
    return out


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


# --- kernels ----------------------------------------------------------------------------------
# Each kernel takes one variant chunk of query and cohort codes (int8 tensors, -1 = missing) and
# adds its sums to the accumulators; the finishers turn the sums into the metric. The counting
# metrics (KING, IBS, the joint-call denominators) are products of small integer matrices, done
# as int8 GEMMs with int32 results (AMX/VNNI on x86), exact; only the GRM's standardized product
# needs float64. Each count "over variants called in both" is written as a sum over all variants
# less a product with the missing-call indicator m, taken over the chunk's columns that hold a
# missing call (all of them in a large cohort, few in a small block). When query and cohort are
# the same array, a product L·Rᵀ whose transpose is also needed is computed once.


def _int_products(left: torch.Tensor, right: torch.Tensor, term_bound: int) -> torch.Tensor:
    """``left @ right.T`` for int8 (n, k) and (m, k), exactly, as int32.

    ``term_bound`` bounds |left·right| per variant; chunks are at most :data:`_EXACT_CHUNK`
    variants, so every sum fits int32, and float32 (the CUDA path: torch's int8 GEMM there wants
    multiples of 8) is exact while k·term_bound ≤ 2²⁴.
    """
    if left.device.type == "cpu" and left.shape[1] >= _INT_MM_MIN_K and fast_int8_gemm():
        return torch._int_mm(left, right.T)
    dtype = torch.float32 if left.shape[1] * term_bound <= 2**24 else torch.float64
    if dtype == torch.float32 and left.device.type == "cuda":
        # Tensor cores in TF32: its 11-bit significand holds every operand here (|value| ≤ 127)
        # exactly and the products sum in float32, so the counts stay exact.
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return (left.to(dtype) @ right.to(dtype).T).round().to(torch.int32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return (left.to(dtype) @ right.to(dtype).T).round().to(torch.int32)


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """Row sums of an int8 (n, k) chunk as int64; a GEMM with a ones block is the fast way on x86."""
    if x.device.type == "cpu" and x.shape[1] >= _INT_MM_MIN_K and fast_int8_gemm():
        return torch._int_mm(x, x.new_ones(x.shape[1], 8))[:, 0].to(torch.int64)
    return x.sum(1, dtype=torch.int64)


def _column_sums(x: torch.Tensor) -> torch.Tensor:
    """Column sums of an int8 (n, k) chunk as int64, the same way as :func:`_row_sums`."""
    if x.device.type == "cpu" and 8 <= x.shape[0] < 2**24 and fast_int8_gemm():
        return torch._int_mm(x.new_ones(8, x.shape[0]), x)[0].to(torch.int64)
    return x.sum(0, dtype=torch.int64)


class _Sums(dict[str, torch.Tensor]):
    """The accumulators: integer counts in int32 while every total fits (|term| ≤ 16 per variant)."""

    def __init__(self, n_variants: int) -> None:
        super().__init__()
        self.int_dtype = torch.int32 if 16 * n_variants < 2**31 else torch.int64
        #: Coordinates of missing calls whose weighted joint sums are left to one sparse product.
        self.sparse_q: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.sparse_a: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, name: str, value: torch.Tensor) -> None:
        if name in self:
            self[name] += value
        elif value.dtype == torch.int32:
            self[name] = value.to(self.int_dtype)
        else:
            self[name] = value


def _int8(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.int8)  # bool is one byte holding 0/1: no copy


def _add_gram(out: torch.Tensor, z: torch.Tensor) -> None:
    """``out += z zᵀ`` on the row blocks on and above the diagonal; :func:`_mirror` fills the rest."""
    n = z.shape[0]
    for start in range(0, n, _TRIANGLE_BLOCK):
        stop = min(start + _TRIANGLE_BLOCK, n)
        out[start:stop, start:].addmm_(z[start:stop], z[start:].T)


def _mirror(out: torch.Tensor) -> torch.Tensor:
    n = out.shape[0]
    for start in range(_TRIANGLE_BLOCK, n, _TRIANGLE_BLOCK):
        stop = min(start + _TRIANGLE_BLOCK, n)
        out[start:stop, :start] = out[:start, start:stop].T
    return out


def _standardized(codes: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(x - 2p) / sqrt(2p(1-p)) for observed calls, 0 for missing calls and monomorphic variants."""
    variance = 2.0 * p * (1.0 - p)
    usable = variance >= _MONOMORPHIC_VARIANCE
    scale = torch.where(usable, 1.0 / torch.sqrt(torch.where(usable, variance, 1.0)), 0.0)
    z = codes.to(torch.float64).sub_(2.0 * p).mul_(scale)
    return z.masked_fill_(codes < 0, 0.0)


def _check_monomorphic(codes: torch.Tensor, p: torch.Tensor, offset: int) -> None:
    # PLINK 2 stops here too ("Zero-MAF variant is not actually monomorphic"): frequencies that
    # call a variant monomorphic while the genotypes disagree come from some other cohort.
    flat = torch.nonzero(2.0 * p * (1.0 - p) < _MONOMORPHIC_VARIANCE).flatten()
    if flat.numel() == 0:
        return
    calls = codes[:, flat]
    expected = torch.round(2.0 * p[flat]).to(torch.int8)
    wrong = ((calls >= 0) & (calls != expected)).any(dim=0)
    if bool(wrong.any()):
        j = offset + int(flat[torch.nonzero(wrong)[0]])
        raise ValueError(f"variant {j}: the frequencies call it monomorphic but its calls vary")


def _weighted_rows(mask: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return torch.zeros(mask.shape[0], dtype=w.dtype, device=w.device).index_add_(0, rows, w[cols])


def _add_missing(
    acc: _Sums,
    mq: torch.Tensor,
    ma: torch.Tensor,
    both: torch.Tensor,
    w: torch.Tensor | None,
    symmetric: bool,
    offset: int,
) -> None:
    """Sums for ``Σ w·[called in both] = Σ w - Σ w·m_q - Σ w·m_a + Σ w·m_q·m_a`` (w = 1 if None)."""
    if w is None:
        acc.add("miss_q", _row_sums(_int8(mq)))
        if not symmetric:
            acc.add("miss_a", _row_sums(_int8(ma)))
    else:  # integer weights below 2³²: float64 sums of them are exact
        acc.add("miss_q", _weighted_rows(mq, w))
        if not symmetric:
            acc.add("miss_a", _weighted_rows(ma, w))
    every = both.numel() == mq.shape[1]  # then no copies
    mq_b = _int8(mq if every else mq[:, both])
    ma_b = mq_b if symmetric else _int8(ma if every else ma[:, both])
    if w is None:
        acc.add("joint", _int_products(mq_b, ma_b, 1))
        return
    # Σ w·m_q·m_a: a weighted product of the missing-call indicators, as sparse matrices when
    # missing calls are rare (left for _finish, in one product over all chunks), else with w
    # split into 7-bit digits, one exact int8 GEMM per digit.
    pairs = int((_column_sums(mq_b) * _column_sums(ma_b)).sum())
    if pairs * _SPARSE_JOINT_RATIO <= mq.shape[0] * ma.shape[0] * max(both.numel(), 1):
        acc.sparse_q.append(_coordinates(mq_b, both + offset, w[both]))
        if not symmetric:
            acc.sparse_a.append(_coordinates(ma_b, both + offset, None))
        return
    digits = w[both].to(torch.int64)
    joint = torch.zeros(mq.shape[0], ma.shape[0], dtype=torch.float64, device=w.device)
    shift = 0
    while bool((digits >> shift).any()):
        digit = ((digits >> shift) & 127).to(torch.int8)
        joint.add_(_int_products(mq_b * digit, ma_b, 127), alpha=float(2**shift))
        shift += 7
    acc.add("joint", joint)


def _coordinates(
    mask: torch.Tensor, variant: torch.Tensor, w: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, variant, weight) of each missing call in ``mask`` (samples by chosen columns)."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    weight = torch.ones_like(rows, dtype=torch.float64) if w is None else w[cols]
    return rows, variant[cols], weight


def _sparse_joint(
    q: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    a: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    shape: tuple[int, int],
    n_variants: int,
) -> torch.Tensor:
    """``Σ_v w_v·m_qv·m_av`` from the missing calls' coordinates: sparse products, by row blocks.

    The products hold integers below 2⁵³, so float64 keeps them exact.
    """
    rq, vq, wq = (torch.cat(parts) for parts in zip(*q, strict=True))
    ra, va, _ = (torch.cat(parts) for parts in zip(*a, strict=True))
    out = torch.zeros(shape, dtype=torch.float64, device=rq.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support", UserWarning)
        warnings.filterwarnings("ignore", "Sparse invariant checks", UserWarning)  # torch ≥ 2.11
        ones = torch.ones_like(va, dtype=torch.float64)
        right = torch.sparse_coo_tensor(
            torch.stack([va, ra]), ones, (n_variants, shape[1]), check_invariants=False
        )
        right = right.to_sparse_csr()
        order = torch.argsort(rq, stable=True)
        rq, vq, wq = rq[order], vq[order], wq[order]
        starts = range(0, shape[0], _SPARSE_ROW_BLOCK)
        edges = torch.searchsorted(rq, torch.tensor([*starts, shape[0]], device=rq.device)).tolist()
        for k, start in enumerate(starts):
            lo, hi = edges[k], edges[k + 1]
            if lo == hi:
                continue
            stop = min(start + _SPARSE_ROW_BLOCK, shape[0])
            left = torch.sparse_coo_tensor(
                torch.stack([rq[lo:hi] - start, vq[lo:hi]]),
                wq[lo:hi],
                (stop - start, n_variants),
                check_invariants=False,
            )
            out[start:stop] = torch.sparse.mm(left.to_sparse_csr(), right).to_dense()
    return out


def _add_standardized_products(
    num: torch.Tensor, q: torch.Tensor, a: torch.Tensor, p: torch.Tensor, offset: int
) -> None:
    """``num += Z_q Z_aᵀ`` for one chunk (on and above the diagonal when ``a is q``)."""
    _check_monomorphic(q, p, offset)
    if a is not q:
        _check_monomorphic(a, p, offset)
    for start in range(0, q.shape[1], _FLOAT64_BLOCK):  # float64 operands stay small
        part = slice(start, start + _FLOAT64_BLOCK)
        zq = _standardized(q[:, part], p[part])
        if a is q:
            _add_gram(num, zq)
        else:
            num.addmm_(zq, _standardized(a[:, part], p[part]).T)


def _accumulate(
    metric: Metric,
    q: torch.Tensor,
    a: torch.Tensor,
    acc: _Sums,
    p: torch.Tensor | None,
    w: torch.Tensor | None,
    offset: int,
) -> None:
    symmetric = a is q
    mq = q < 0
    ma = mq if symmetric else a < 0
    missing_q = mq.any(0)
    missing_a = missing_q if symmetric else ma.any(0)
    # Columns where either side has a missing call; the rest need no correction.
    either = torch.nonzero(missing_q | missing_a).flatten()

    def cols(t: torch.Tensor) -> torch.Tensor:  # no copy when every column holds a missing call
        return t if either.numel() == t.shape[1] else t[:, either]

    if metric == "grm":
        assert p is not None
        if "num" not in acc:
            acc["num"] = q.new_zeros(q.shape[0], a.shape[0], dtype=torch.float64)
        _add_standardized_products(acc["num"], q, a, p, offset)
        both = torch.nonzero(missing_q & missing_a).flatten()
        _add_missing(acc, mq, ma, both, None, symmetric, offset)
    elif metric == "dot":
        xq = q.clamp(min=0)
        acc.add("num", _int_products(xq, xq if symmetric else a.clamp(min=0), 4))
    elif metric == "king":
        # Σ (x_i - x_j)² over variants called in both = 4·IBS0 + HET1_HOM2 + HET2_HOM1
        # = Σ x_i² + Σ x_j² - Σ x_i²·m_j - Σ m_i·x_j² - 2·Σ x_i·x_j (x = 0 where missing).
        xq, hq = q.clamp(min=0), _int8(q == 1)
        x2q = xq * xq
        acc.add("sq_q", _row_sums(x2q))
        acc.add("het_q", _row_sums(hq))
        x2q_e, hq_e, mq_e = cols(x2q), cols(hq), _int8(cols(mq))
        if symmetric:  # C + Cᵀ with C = X²·Mᵀ + X·Xᵀ
            left, right = torch.cat([x2q_e, xq], 1), torch.cat([mq_e, xq], 1)
            acc.add("cross", _int_products(left, right, 4))
            acc.add("het_miss_q", _int_products(hq_e, mq_e, 1))
        else:
            xa, ha = a.clamp(min=0), _int8(a == 1)
            x2a = xa * xa
            acc.add("sq_a", _row_sums(x2a))
            acc.add("het_a", _row_sums(ha))
            x2a_e, ha_e, ma_e = cols(x2a), cols(ha), _int8(cols(ma))
            left = torch.cat([x2q_e, mq_e, xq], 1)
            right = torch.cat([ma_e, x2a_e, 2 * xa], 1)
            acc.add("cross", _int_products(left, right, 8))
            # Hets of one sample where the other is called (HETHET + HET1_HOM2, and its mirror).
            acc.add("het_miss_q", _int_products(hq_e, ma_e, 1))
            acc.add("het_miss_a", _int_products(mq_e, ha_e, 1))
    elif metric == "ibs":
        # Σ |x_i - x_j| over variants called in both = Σ x_i + Σ x_j - Σ x_i·m_j - Σ m_i·x_j
        # - 2·Σ min(x_i, x_j), and min(x_i, x_j) = [x_i ≥ 1][x_j ≥ 1] + [x_i = 2][x_j = 2].
        xq = q.clamp(min=0)
        acc.add("sum_q", _row_sums(xq))
        g1q, g2q = _int8(q >= 1), _int8(q == 2)
        xq_e, mq_e = cols(xq), _int8(cols(mq))
        if symmetric:  # E + Eᵀ with E = X·Mᵀ + G1·G1ᵀ + G2·G2ᵀ
            left, right = torch.cat([xq_e, g1q, g2q], 1), torch.cat([mq_e, g1q, g2q], 1)
            acc.add("cross", _int_products(left, right, 2))
        else:
            xa = a.clamp(min=0)
            acc.add("sum_a", _row_sums(xa))
            g1a, g2a = _int8(a >= 1), _int8(a == 2)
            left = torch.cat([xq_e, mq_e, g1q, g2q], 1)
            right = torch.cat([_int8(cols(ma)), cols(xa), 2 * g1a, 2 * g2a], 1)
            acc.add("cross", _int_products(left, right, 2))
        both = torch.nonzero(missing_q & missing_a).flatten()
        _add_missing(acc, mq, ma, both, w, symmetric, offset)


def _finish(
    metric: Metric,
    acc: _Sums,
    shape: tuple[int, int],
    symmetric: bool,
    n_variants: int,
    w_total: float | None,
) -> torch.Tensor:
    def pair(name: str) -> torch.Tensor:  # Σ over i's variants + Σ over j's, as float64
        first = acc[f"{name}_q"].to(torch.float64)
        second = first if symmetric else acc[f"{name}_a"].to(torch.float64)
        return first[:, None] + second[None, :]

    def cross() -> torch.Tensor:
        c = acc["cross"]
        return (c + c.T if symmetric else c).to(torch.float64)

    def called_in_both() -> torch.Tensor:
        total = float(n_variants) if w_total is None else w_total
        den = total - pair("miss")
        if "joint" in acc:
            den += acc["joint"]
        if acc.sparse_q:
            a = acc.sparse_q if symmetric else acc.sparse_a
            den += _sparse_joint(acc.sparse_q, a, shape, n_variants)
        return den

    if metric == "grm":
        # plink2 --make-rel: Σ z_i z_j / (variants called in both), monomorphic ones included.
        num = _mirror(acc["num"]) if symmetric else acc["num"]
        return num.div_(called_in_both())
    if metric == "dot":
        return acc["num"].to(torch.float64) / n_variants
    if metric == "king":
        # plink2 ComputeKinship: 0.5 - (4·IBS0 + HET1_HOM2 + HET2_HOM1) / (4·(HETHET + min(...))),
        # and HETHET + HET1_HOM2 is the first sample's het count where the second is called.
        sq = pair("sq").sub_(cross())
        het_q = acc["het_q"][:, None] - acc["het_miss_q"]
        het_a = het_q.T if symmetric else acc["het_a"][None, :] - acc["het_miss_a"]
        return sq.div_(4.0 * torch.minimum(het_q, het_a).to(torch.float64)).neg_().add_(0.5)
    # plink 1.9 --distance ibs: the allele distance over jointly called variants, scaled by
    # (total weight) / (weight of jointly called variants), then IBS = 1 - dist / (2·M).
    total = float(n_variants) if w_total is None else w_total
    dist = pair("sum").sub_(cross())
    den = called_in_both()
    scale = torch.full_like(den, total).div_(den)  # a true division (torch's scalar / tensor
    return 1.0 - dist * scale / (2.0 * n_variants)  # multiplies by a reciprocal: 1 ulp off)


def _pairwise_cpu(
    metric: Metric,
    query: np.ndarray,
    against: np.ndarray,
    p_all: np.ndarray | None,
    weights: np.ndarray | None,
    variant_chunk: int,
) -> np.ndarray:
    """KING, IBS and the GRM on the CPU: the counts from bit planes (:mod:`models.genome_bits`),
    the GRM's standardized products in float64 BLAS; the same finishing arithmetic as on CUDA."""
    symmetric = against is query
    n_variants = query.shape[1]
    counter = Counter(
        query.shape[0],
        against.shape[0],
        n_variants,
        symmetric=symmetric,
        hom_weight=_HOM_WEIGHT.get(metric),
        joint=metric != "king",
    )
    grm = metric == "grm"  # the only metric with products beside the counts
    num = torch.zeros(query.shape[0] if grm else 0, against.shape[0], dtype=torch.float64)
    chunk = min(max(WORD, variant_chunk - variant_chunk % WORD), MAX_CHUNK)
    with torch.inference_mode():
        for cols in _chunks(n_variants, chunk):
            q = _chunk_codes(query, cols, "query")
            a = q if symmetric else _chunk_codes(against, cols, "against")
            counter.add(q, a, cols.start, None if weights is None else weights[cols])
            if grm:
                assert p_all is not None
                tq = torch.from_numpy(q)
                ta = tq if symmetric else torch.from_numpy(a)
                _add_standardized_products(num, tq, ta, torch.from_numpy(p_all[cols]), cols.start)
    total = float(n_variants) if weights is None else float(weights.sum())
    with np.errstate(divide="ignore", invalid="ignore"):  # PLINK's 0/0 and x/0: NaN and inf
        if grm:
            numerator = (_mirror(num) if symmetric else num).numpy()
            return numerator / counter.called_in_both(total)
        if metric == "king":
            het_ij, het_ji = counter.het_where_called()
            return 0.5 - counter.distance() / (4.0 * np.minimum(het_ij, het_ji))
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
        ``"bitplanes"``: popcounts over bit planes for the counts (:mod:`models.genome_bits`),
        the CPU only, not ``dot``; ``"gemm"``: integer GEMMs (int8 on AMX/VNNI, else float32;
        the CUDA path); ``"auto"``: bit planes on the CPU, GEMMs on CUDA and for ``dot``. Both
        give the same numbers (the GRM's float64 products to rounding).

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
    dev = resolve_device(device)
    symmetric = against is query
    shape = (query.shape[0], against.shape[0])
    if engine == "bitplanes" and (dev.type != "cpu" or metric == "dot"):
        raise ValueError("engine 'bitplanes' runs on the CPU, for grm, king and ibs")
    if engine == "bitplanes" or (engine == "auto" and dev.type == "cpu" and metric != "dot"):
        return _pairwise_cpu(metric, query, against, p_all, weights, variant_chunk)
    with torch.inference_mode():
        acc = _Sums(n_variants)
        # One empty chunk when there are no variants, so that every sum exists (as zeros).
        spans = list(_chunks(n_variants, min(variant_chunk, _EXACT_CHUNK))) or [slice(0, 0)]
        for cols in spans:
            q = torch.from_numpy(_chunk_codes(query, cols, "query")).to(dev)
            a = q if symmetric else torch.from_numpy(_chunk_codes(against, cols, "against")).to(dev)
            p = None if p_all is None else torch.from_numpy(p_all[cols]).to(dev)
            w = None if weights is None else torch.from_numpy(weights[cols]).to(dev)
            _accumulate(metric, q, a, acc, p, w, cols.start)
        w_total = None if weights is None else float(weights.sum())
        return _finish(metric, acc, shape, symmetric, n_variants, w_total).cpu().numpy()


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
        (M,) A1 frequencies; by default computed from ``genotypes`` (PLINK's own default).

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
