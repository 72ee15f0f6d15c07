"""Genome comparisons: PLINK 1 binary genotypes in, relationship matrices out, numbers as PLINK's.

A cohort is an (N, M) matrix of allele dosages (0, 1, 2 copies of A1; missing calls allowed). Each
metric is a sum over variants, so it is computed as a few matrix products over indicator or
standardized matrices, streamed over chunks of variants (peak memory O(N² + N·chunk)), on the CPU
or a CUDA device; never a loop over pairs. Counts are integers, so their products are exact
(float32 within a chunk, float64 across chunks); the GRM's standardized products are float64.
Missing calls are rare, so their corrections are products over only the columns that hold one.
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

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from bed_reader import open_bed

from models.scoring import Device, resolve_device

Metric = Literal["grm", "king", "ibs", "dot"]
IbsMissing = Literal["frequency", "flat"]
METRICS: tuple[Metric, ...] = ("grm", "king", "ibs", "dot")

#: Variants per streamed chunk. The largest operands are (N, 3·chunk) float32 (IBS indicators,
#: 25 MB at N = 1,000) and (N, chunk) float64 (GRM).
DEFAULT_VARIANT_CHUNK = 2048
#: bed-reader's int8 code for a missing call.
MISSING_INT8 = -127
#: SNP-major PLINK 1 .bed: magic 0x6c 0x1b, then 0x01 (the PLINK 1.9 file-format spec).
BED_MAGIC = b"\x6c\x1b\x01"

# PLINK 2 treats a variant as monomorphic when 2p(1-p) falls below kSmallEpsilon and gives it a
# zero column (plink2_matrix_calc.cc, ExpandCenteredVarmaj); it still counts in the denominators.
_MONOMORPHIC_VARIANCE = 2.0**-44
_FLOAT32_EXACT_CHUNK = 2**20


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
    for cols in _chunks(genotypes.shape[1], variant_chunk):
        codes = _codes(genotypes[:, cols])
        observed = (codes >= 0).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[cols] = np.where(codes >= 0, codes, 0).sum(axis=0) / (2.0 * observed)
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
# adds its terms to the accumulators; the finishers turn the sums into the metric.


def _onehot(
    codes: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indicators of 0, 1 and 2 copies; a missing call (-1) is in none of them."""
    return (codes == 0).to(dtype), (codes == 1).to(dtype), (codes == 2).to(dtype)


def _count_dtype(n_variants: int) -> torch.dtype:
    # Count terms are integers of at most 16·chunk in magnitude, so float32 products over one
    # chunk are exact up to 2²⁰ variants (and twice as fast as float64); chunks add up in float64.
    return torch.float32 if n_variants <= _FLOAT32_EXACT_CHUNK else torch.float64


def _standardized(codes: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(x - 2p) / sqrt(2p(1-p)) for observed calls, 0 for missing calls and monomorphic variants."""
    variance = 2.0 * p * (1.0 - p)
    usable = variance >= _MONOMORPHIC_VARIANCE
    x = codes.to(torch.float64)
    z = (x - 2.0 * p) / torch.sqrt(torch.where(usable, variance, 1.0))
    return torch.where((codes >= 0) & usable, z, 0.0)


def _check_monomorphic(codes: torch.Tensor, p: torch.Tensor, offset: int) -> None:
    # PLINK 2 stops here too ("Zero-MAF variant is not actually monomorphic"): frequencies that
    # call a variant monomorphic while the genotypes disagree come from some other cohort.
    flat = 2.0 * p * (1.0 - p) < _MONOMORPHIC_VARIANCE
    expected = torch.round(2.0 * p)
    wrong = flat & ((codes >= 0) & (codes.to(torch.float64) != expected)).any(dim=0)
    if bool(wrong.any()):
        j = offset + int(torch.nonzero(wrong)[0])
        raise ValueError(f"variant {j}: the frequencies call it monomorphic but its calls vary")


def _accumulate(
    metric: Metric,
    q: torch.Tensor,
    a: torch.Tensor,
    acc: dict[str, torch.Tensor],
    p: torch.Tensor | None,
    w: torch.Tensor | None,
    offset: int,
) -> None:
    ct = _count_dtype(q.shape[1])
    # Columns of this chunk where either side has a missing call; the rest need no correction.
    sparse = torch.nonzero((q < 0).any(0) | (a < 0).any(0)).flatten()
    mq, ma = (q[:, sparse] < 0).to(ct), (a[:, sparse] < 0).to(ct)
    if metric == "grm":
        assert p is not None
        _check_monomorphic(q, p, offset)
        zq = _standardized(q, p)
        if a is not q:
            _check_monomorphic(a, p, offset)
        acc["num"] += zq @ (zq if a is q else _standardized(a, p)).T
        acc["den"] += q.shape[1] - mq.sum(1)[:, None] - ma.sum(1)[None, :] + mq @ ma.T
    elif metric == "dot":
        acc["num"] += q.clamp(min=0).to(ct) @ a.clamp(min=0).to(ct).T
    elif metric == "king":
        # Σ (x_i - x_j)² over variants called in both = 4·IBS0 + HET1_HOM2 + HET2_HOM1
        # = Σ x_i² + Σ x_j² - 2·x_i·x_j, less the squares standing opposite a missing call.
        dq, da = q.clamp(min=0).to(ct), a.clamp(min=0).to(ct)
        hq, ha = (q == 1).to(ct), (a == 1).to(ct)
        sq_hq = torch.cat([dq[:, sparse] ** 2, hq[:, sparse]]) @ ma.T  # (2·N_q, N_a)
        sq_ha = mq @ torch.cat([da[:, sparse] ** 2, ha[:, sparse]]).T  # (N_q, 2·N_a)
        n_q, n_a = q.shape[0], a.shape[0]
        acc["sq"] += (dq**2).sum(1)[:, None] + (da**2).sum(1)[None, :] - 2.0 * (dq @ da.T)
        acc["sq"] -= sq_hq[:n_q] + sq_ha[:, :n_a]
        # Hets of one sample where the other is called (HETHET + HET1_HOM2, and its mirror).
        acc["het_q"] += hq.sum(1)[:, None] - sq_hq[n_q:]
        acc["het_a"] += ha.sum(1)[None, :] - sq_ha[:, n_a:]
    elif metric == "ibs":
        q0, q1, q2 = _onehot(q, ct)
        a0, a1, a2 = _onehot(a, ct)
        left = torch.cat([q0, q1, q2], dim=1)
        acc["dist"] += left @ torch.cat([a1 + 2.0 * a2, a0 + a2, 2.0 * a0 + a1], dim=1).T
        if w is None:
            acc["den"] += q.shape[1] - mq.sum(1)[:, None] - ma.sum(1)[None, :] + mq @ ma.T
        else:  # integer weights up to ~2³²/M: float64 keeps them exact
            wm = w[sparse]
            mq64, ma64 = mq.double() * wm, ma.double()
            acc["den"] += (
                float(w.sum()) - mq64.sum(1)[:, None] - (ma64 * wm).sum(1)[None, :] + mq64 @ ma64.T
            )


def _finish(
    metric: Metric, acc: dict[str, torch.Tensor], n_variants: int, w_total: float | None
) -> torch.Tensor:
    if metric == "grm":
        # plink2 --make-rel: Σ z_i z_j / (variants called in both), monomorphic ones included.
        return acc["num"] / acc["den"]
    if metric == "dot":
        return acc["num"] / n_variants
    if metric == "king":
        # plink2 ComputeKinship: 0.5 - (4·IBS0 + HET1_HOM2 + HET2_HOM1) / (4·(HETHET + min(...))),
        # and HETHET + HET1_HOM2 is the first sample's het count where the second is called.
        return 0.5 - acc["sq"] / (4.0 * torch.minimum(acc["het_q"], acc["het_a"]))
    # plink 1.9 --distance ibs: the allele distance over jointly called variants, scaled by
    # (total weight) / (weight of jointly called variants), then IBS = 1 - dist / (2·M).
    total = float(n_variants) if w_total is None else w_total
    return 1.0 - acc["dist"] * (total / acc["den"]) / (2.0 * n_variants)


_ACCUMULATORS: dict[Metric, tuple[str, ...]] = {
    "grm": ("num", "den"),
    "dot": ("num",),
    "king": ("sq", "het_q", "het_a"),
    "ibs": ("dist", "den"),
}


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

    Returns
    -------
    np.ndarray
        (N_q, N_a) float64. NaN or ±inf where PLINK's own division is 0/0 or x/0 (no jointly
        called variants; no heterozygous call for KING).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
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
    with torch.inference_mode():
        acc = {
            name: torch.zeros(query.shape[0], against.shape[0], dtype=torch.float64, device=dev)
            for name in _ACCUMULATORS[metric]
        }
        for cols in _chunks(n_variants, variant_chunk):
            q = torch.from_numpy(_codes(query[:, cols], what="query")).to(dev)
            a = (
                q
                if against is query
                else torch.from_numpy(_codes(against[:, cols], what="against")).to(dev)
            )
            p = None if p_all is None else torch.from_numpy(p_all[cols]).to(dev)
            w = None if weights is None else torch.from_numpy(weights[cols]).to(dev)
            _accumulate(metric, q, a, acc, p, w, cols.start)
        w_total = None if weights is None else float(weights.sum())
        return _finish(metric, acc, n_variants, w_total).cpu().numpy()


def pairwise(
    genotypes: np.ndarray,
    *,
    metric: Metric = "grm",
    frequencies: np.ndarray | None = None,
    ibs_missing: IbsMissing = "frequency",
    device: Device = "auto",
    variant_chunk: int = DEFAULT_VARIANT_CHUNK,
) -> np.ndarray:
    """The square matrix of one metric over a cohort, as PLINK writes it.

    Parameters
    ----------
    genotypes
        (N, M) dosages of A1: 0, 1, 2; missing as NaN or a negative value (-1, -127).
    metric, ibs_missing, device, variant_chunk
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
    )
    if metric == "king":
        np.fill_diagonal(out, 0.5)
    elif metric == "ibs":
        np.fill_diagonal(out, 1.0)
    return out
