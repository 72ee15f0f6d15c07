"""PLINK-compatible files for relationship matrices, and KING relationship degrees.

The writers take what :mod:`models.genome.api` computes (float64 matrices, or row blocks of them, and
the ``(FID, IID)`` of each sample) and write the files the reference tools write:

- ``.rel`` / ``.rel.bin`` + ``.rel.id``: ``plink2 --make-rel square [bin]``.
- ``.king`` / ``.king.bin`` + ``.king.id``: ``plink2 --make-king square [bin]``.
- ``.mibs`` / ``.mibs.bin`` + ``.mibs.id``: ``plink 1.9 --distance square ibs [bin]``.
- ``.kin0``: ``plink2 --make-king-table`` (its default columns, or ``cols=maybefid,id,kinship``).

Text numbers go through :func:`format_plink`, a port of the ``dtoa_g`` both PLINK builds print
with (plink2_string.cc; plink_common.c in 1.9): 6 significant digits like C's ``%g``, but rounded
by PLINK's own "banker's" rule, which takes anything within ~5e-9 of a half as the half and rounds
it to even, where ``%g`` rounds the exact binary value. The two differ only on such near-halves.
Binary matrices are row-major little-endian float64, as both builds write them.

:class:`MatrixWriter` appends row blocks in order, so a cohort's matrix can be written tile row by
tile row without ever holding it whole; the one-shot writers use it.

Degrees follow the KING paper (Manichaikul et al. 2010, Bioinformatics 26:2867, Table 1): a
kinship above 2^(-3/2) is a duplicate or MZ twin, then 1st, 2nd and 3rd degree down to 2^(-9/2),
each range open below and closed above (see :func:`kinship_degree`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, NamedTuple, Self, overload

import numpy as np

MatrixKind = Literal["rel", "king", "mibs"]
Degree = Literal["duplicate/MZ twin", "1st", "2nd", "3rd"]
SampleId = tuple[str, str]  # (FID, IID)

#: Lower bounds (exclusive) of the KING inference ranges: the geometric means of the expected
#: kinships 1/2, 1/4, 1/8, 1/16, 1/32 of adjacent degrees (Manichaikul et al. 2010, Table 1;
#: the KING manual prints them as 0.354, 0.177, 0.0884, 0.0442).
DUPLICATE_MIN_KINSHIP = 2.0**-1.5
FIRST_DEGREE_MIN_KINSHIP = 2.0**-2.5
SECOND_DEGREE_MIN_KINSHIP = 2.0**-3.5
THIRD_DEGREE_MIN_KINSHIP = 2.0**-4.5
_DEGREES: tuple[tuple[float, Degree], ...] = (
    (DUPLICATE_MIN_KINSHIP, "duplicate/MZ twin"),
    (FIRST_DEGREE_MIN_KINSHIP, "1st"),
    (SECOND_DEGREE_MIN_KINSHIP, "2nd"),
    (THIRD_DEGREE_MIN_KINSHIP, "3rd"),
)

# The .id headers: plink2 writes "#FID<tab>IID" (the FID column is kept for .fam input, even when
# every FID is 0; checked against plink2 v2.00a3.5), plink 1.9 writes no header.
_ID_HEADER: dict[MatrixKind, str] = {"rel": "#FID\tIID\n", "king": "#FID\tIID\n", "mibs": ""}

# --- number formatting ------------------------------------------------------------------------
# PLINK's dtoa_g, step for step (same constants, same order of float operations), vectorized.

_BANKER_ROUND8 = np.array([0.499999995, 0.500000005])
_SMALL_EXP = 9.9999949999999e-5  # below: exponential notation, "e-"
_LARGE_EXP = 999999.49999999  # at or above: exponential notation, "e+"
_UNIT = 0.99999949999999  # at or above (and below _LARGE_EXP): dtoa_so6


def _banker_round(y: np.ndarray) -> np.ndarray:
    """PLINK's BankerRoundD with kBankerRound8: ties within ~5e-9 go to the even integer."""
    t = y.astype(np.int64)  # C's (int32_t) cast truncates toward 0; y ≥ 0 here
    return t + ((y - t) + _BANKER_ROUND8[t & 1]).astype(np.int64)


def _scale_small(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dtoa_g's small branch: multiply up to [~1, ~10), returning the value and 10's power."""
    x = x.copy()
    xp = np.zeros(x.shape, dtype=np.int64)
    tiny = x < 9.9999949999999e-16
    below128 = tiny & (x < 9.9999949999999e-128)
    below256 = below128 & (x < 9.9999949999999e-256)
    x[below256] *= 1.0e256
    xp[below256] |= 256
    only128 = below128 & ~below256
    x[only128] *= 1.0e128
    xp[only128] |= 128
    for threshold, factor, bit in ((9.9999949999999e-64, 1.0e64, 64),
                                   (9.9999949999999e-32, 1.0e32, 32),
                                   (9.9999949999999e-16, 1.0e16, 16)):  # fmt: skip
        sel = tiny & (x < threshold)
        x[sel] *= factor
        xp[sel] |= bit
    for threshold, factor, bit in ((9.9999949999999e-8, 100000000.0, 8),
                                   (9.9999949999999e-4, 10000.0, 4),
                                   (9.9999949999999e-2, 100.0, 2),
                                   (9.9999949999999e-1, 10.0, 1)):  # fmt: skip
        sel = x < threshold
        x[sel] *= factor
        xp[sel] |= bit
    return x, xp


def _scale_large(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dtoa_g's large branch: multiply down to [~1, ~10), returning the value and 10's power."""
    x = x.copy()
    xp = np.zeros(x.shape, dtype=np.int64)
    huge = x >= 9.9999949999999e15
    above128 = huge & (x >= 9.9999949999999e127)
    above256 = above128 & (x >= 9.9999949999999e255)
    x[above256] *= 1.0e-256
    xp[above256] |= 256
    only128 = above128 & ~above256
    x[only128] *= 1.0e-128
    xp[only128] |= 128
    for threshold, factor, bit in ((9.9999949999999e63, 1.0e-64, 64),
                                   (9.9999949999999e31, 1.0e-32, 32),
                                   (9.9999949999999e15, 1.0e-16, 16)):  # fmt: skip
        sel = huge & (x >= threshold)
        x[sel] *= factor
        xp[sel] |= bit
    for threshold, factor, bit in ((9.9999949999999e7, 1.0e-8, 8),
                                   (9.9999949999999e3, 1.0e-4, 4),
                                   (9.9999949999999e1, 1.0e-2, 2),
                                   (9.9999949999999e0, 1.0e-1, 1)):  # fmt: skip
        sel = x >= threshold
        x[sel] *= factor
        xp[sel] |= bit
    return x, xp


def _significand(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6 digits PLINK prints for finite positive ``d`` (int64) and its leading digit's power.

    The printed number is ``digits · 10^(exponent - 5)``.
    """
    digits = np.zeros(d.shape, dtype=np.int64)
    exponent = np.zeros(d.shape, dtype=np.int64)
    small, large = d < _SMALL_EXP, d >= _LARGE_EXP
    unit = ~small & ~large & (d >= _UNIT)
    decimal = ~small & ~large & ~unit
    if small.any():
        x, xp = _scale_small(d[small])
        digits[small], exponent[small] = _banker_round(x * 100000.0), -xp
    if large.any():
        x, xp = _scale_large(d[large])
        digits[large], exponent[large] = _banker_round(x * 100000.0), xp
    if unit.any():  # dtoa_so6: one case per number of integer digits
        x = d[unit]
        power = np.select(
            [x < 9.9999949999999, x < 99.999949999999, x < 999.99949999999, x < 9999.9949999999,
             x >= 99999.949999999],
            [0, 1, 2, 3, 5],
            default=4,
        )  # fmt: skip
        factor = np.array([100000.0, 10000.0, 1000.0, 100.0, 10.0, 1.0])[power]
        # BankerRoundD (the 6-integer-digit case) rounds dxx itself, with no "* 1".
        scaled = np.where(power == 5, x, x * factor)
        digits[unit], exponent[unit] = _banker_round(scaled), power
    if decimal.any():  # "0." then up to three zeros, then 6 digits
        x = d[decimal].copy()
        power = np.full(x.shape, -1, dtype=np.int64)
        sel = x < 9.9999949999999e-3
        x[sel] *= 100.0
        power[sel] -= 2
        sel = x < 9.9999949999999e-2
        x[sel] *= 10.0
        power[sel] -= 1
        digits[decimal], exponent[decimal] = _banker_round(x * 1000000.0), power
    # PLINK's thresholds leave a gap below each power of 10 so that this cannot happen; kept so a
    # value it does not foresee still prints as a number rather than 7 digits.
    carry = digits >= 1000000
    digits[carry] //= 10
    exponent[carry] += 1
    return digits, exponent


def _exponential(negative: bool, digits: int, exponent: int) -> str:
    kept = str(digits)[1:].rstrip("0")
    mantissa = str(digits)[0] + ("." + kept if kept else "")
    return f"{'-' if negative else ''}{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"


def format_plink(values: np.ndarray | Sequence[float]) -> list[str]:
    """Numbers as PLINK prints them in text matrices and tables (its ``dtoa_g``).

    Six significant digits with trailing zeros dropped, exponential notation below 1e-4 and from
    1e6 up (``1e-05``, ``1.5e+06``), ``nan``, ``inf``, ``-inf``, and ``0`` for both zeros.

    Parameters
    ----------
    values
        (K,) or any shape of float64; read in C order.

    Returns
    -------
    list[str]
        (K,) strings, in the order of ``values.ravel()``.
    """
    a = np.ascontiguousarray(values, dtype=np.float64).ravel()
    finite = np.isfinite(a) & (a != 0.0)
    digits, exponent = _significand(np.abs(a[finite]))
    # Inside [1e-4, 1e6) C's %g lays the digits out as dtoa_g does, and digits·10^(e-5) is one
    # division of exact powers of ten away from them, so "%g" of it prints exactly those digits.
    plain = (exponent >= -4) & (exponent <= 5)
    shown = np.zeros(a.shape, dtype=np.float64)
    shown_finite = np.zeros(digits.shape, dtype=np.float64)
    shown_finite[plain] = digits[plain] / 10.0 ** (5 - exponent[plain])
    shown[finite] = np.copysign(shown_finite, a[finite])
    out = [f"{v:g}" for v in shown.tolist()]  # zeros (either sign) print as "0" here
    out = [s if s != "-0" else "0" for s in out]
    finite_index = np.flatnonzero(finite)
    for k in np.flatnonzero(~plain):
        index = int(finite_index[k])
        out[index] = _exponential(bool(a[index] < 0), int(digits[k]), int(exponent[k]))
    for special in np.flatnonzero(~np.isfinite(a)).tolist():
        value = float(a[special])
        out[special] = "nan" if value != value else ("inf" if value > 0 else "-inf")
    return out


# --- matrices ---------------------------------------------------------------------------------


def _check_ids(ids: Sequence[SampleId]) -> list[SampleId]:
    checked = [tuple(pair) for pair in ids]
    for n, pair in enumerate(checked):
        if len(pair) != 2:
            raise ValueError(f"ids[{n}]: expected an (FID, IID) pair, got {pair!r}")
        if any(not field or any(c.isspace() for c in field) for field in pair):
            raise ValueError(
                f"ids[{n}]: FID and IID must be non-empty, without whitespace: {pair!r}"
            )
    return [(str(f), str(i)) for f, i in checked]


def _with_suffix(prefix: str | Path, suffix: str) -> Path:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + suffix)  # names such as "hm3.chr1" hold dots


def write_ids(
    path: str | Path, ids: Sequence[SampleId], *, kind: MatrixKind, with_fid: bool = True
) -> Path:
    """The ``.id`` file beside a matrix: one ``FID<tab>IID`` line per row, plink2's header for
    ``rel``/``king``, none for ``mibs`` (plink 1.9).

    ``with_fid=False`` (samples read from a VCF, which has no FID): plink2's ``#IID`` and IIDs
    alone for ``rel``/``king``; plink 1.9 writes the IID as the FID too, as ``ids`` hold it."""
    checked = _check_ids(ids)
    path = Path(path)
    if not with_fid and kind != "mibs":
        text = "#IID\n" + "".join(f"{i}\n" for _, i in checked)
        path.write_text(text, encoding="utf-8", newline="\n")
        return path
    text = _ID_HEADER[kind] + "".join(f"{f}\t{i}\n" for f, i in checked)
    path.write_text(text, encoding="utf-8", newline="\n")
    return path


class MatrixWriter:
    """Writes a square PLINK matrix (and its ``.id``) from row blocks appended in order.

    Text rows are tab-separated :func:`format_plink` numbers, one line per row; binary rows are
    little-endian float64. The file is written under a ``.part`` name and renamed when every row
    has arrived, so an interrupted run never leaves a matrix that looks complete.

    Parameters
    ----------
    prefix
        Output path without extension, like PLINK's ``--out``.
    ids
        (N,) ``(FID, IID)`` of the rows (and columns), in matrix order.
    kind
        ``"rel"``, ``"king"`` or ``"mibs"``: the extension and the ``.id`` header convention.
    binary
        Write ``<prefix>.<kind>.bin`` instead of the text matrix.
    with_fid
        False for samples read from a VCF: the ``.id`` as plink2 writes it then (:func:`write_ids`).

    Examples
    --------
    >>> with MatrixWriter("out/cohort", ids, kind="king") as writer:  # doctest: +SKIP
    ...     for start in range(0, n, 1024):
    ...         writer.write_rows(pairwise_block(g[start : start + 1024], g, metric="king"))
    """

    def __init__(
        self,
        prefix: str | Path,
        ids: Sequence[SampleId],
        *,
        kind: MatrixKind,
        binary: bool = False,
        with_fid: bool = True,
    ) -> None:
        if kind not in _ID_HEADER:
            raise ValueError(f"kind must be one of {tuple(_ID_HEADER)}, got {kind!r}")
        self.ids = _check_ids(ids)
        self.kind: MatrixKind = kind
        self.binary = binary
        self.with_fid = with_fid
        self.path = _with_suffix(prefix, f".{kind}" + (".bin" if binary else ""))
        self.id_path = _with_suffix(prefix, f".{kind}.id")
        self.rows_written = 0
        self._part = self.path.with_name(self.path.name + ".part")
        self._handle = self._part.open("wb")

    @property
    def n_samples(self) -> int:
        return len(self.ids)

    def write_rows(self, block: np.ndarray) -> None:
        """Append the next rows.

        Parameters
        ----------
        block
            (B, N) the matrix's next B rows, B ≥ 0, following the rows written so far.
        """
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[1] != self.n_samples:
            raise ValueError(
                f"block: expected (rows, {self.n_samples}) for {self.n_samples} samples, "
                f"got shape {block.shape}"
            )
        if self.rows_written + block.shape[0] > self.n_samples:
            raise ValueError(
                f"block of {block.shape[0]} rows after {self.rows_written} would exceed "
                f"the {self.n_samples} rows of the matrix"
            )
        if self.binary:
            self._handle.write(np.ascontiguousarray(block, dtype="<f8").tobytes())
        else:
            n = self.n_samples
            cells = format_plink(block)
            lines = ["\t".join(cells[r * n : (r + 1) * n]) + "\n" for r in range(block.shape[0])]
            self._handle.write("".join(lines).encode("ascii"))
        self.rows_written += block.shape[0]

    def close(self) -> None:
        """Finish the files; raises if rows are missing (the partial file is removed)."""
        if self._handle.closed:
            return
        self._handle.close()
        if self.rows_written != self.n_samples:
            self._part.unlink(missing_ok=True)
            raise ValueError(
                f"{self.path}: {self.rows_written} of {self.n_samples} rows were written"
            )
        os.replace(self._part, self.path)
        write_ids(self.id_path, self.ids, kind=self.kind, with_fid=self.with_fid)

    def abort(self) -> None:
        """Drop the partial file."""
        if not self._handle.closed:
            self._handle.close()
        self._part.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _write_matrix(
    prefix: str | Path,
    matrix: np.ndarray,
    ids: Sequence[SampleId],
    *,
    kind: MatrixKind,
    binary: bool,
) -> Path:
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape != (len(ids), len(ids)):
        raise ValueError(
            f"matrix: expected ({len(ids)}, {len(ids)}) for {len(ids)} ids, got {matrix.shape}"
        )
    with MatrixWriter(prefix, ids, kind=kind, binary=binary) as writer:
        writer.write_rows(matrix)
    return writer.path


def write_rel(
    prefix: str | Path, matrix: np.ndarray, ids: Sequence[SampleId], *, binary: bool = False
) -> Path:
    """``<prefix>.rel`` (or ``.rel.bin``) and ``.rel.id``, as ``plink2 --make-rel square [bin]``.

    Parameters
    ----------
    matrix
        (N, N) float64 GRM (``pairwise(..., metric="grm")``).
    ids
        (N,) ``(FID, IID)`` pairs in matrix order.

    Returns
    -------
    Path
        The matrix file written.
    """
    return _write_matrix(prefix, matrix, ids, kind="rel", binary=binary)


def write_king(
    prefix: str | Path, matrix: np.ndarray, ids: Sequence[SampleId], *, binary: bool = False
) -> Path:
    """``<prefix>.king`` (or ``.king.bin``) and ``.king.id``, as ``plink2 --make-king square
    [bin]``; ``matrix`` is (N, N) (``pairwise(..., metric="king")``), ``ids`` (N,)."""
    return _write_matrix(prefix, matrix, ids, kind="king", binary=binary)


def write_mibs(
    prefix: str | Path, matrix: np.ndarray, ids: Sequence[SampleId], *, binary: bool = False
) -> Path:
    """``<prefix>.mibs`` (or ``.mibs.bin``) and ``.mibs.id``, as ``plink 1.9 --distance square
    ibs [bin]``; ``matrix`` is (N, N) (``pairwise(..., metric="ibs")``), ``ids`` (N,)."""
    return _write_matrix(prefix, matrix, ids, kind="mibs", binary=binary)


# --- degrees and pairs ------------------------------------------------------------------------


@overload
def kinship_degree(kinship: float) -> Degree | None: ...
@overload
def kinship_degree(kinship: np.ndarray) -> np.ndarray: ...
def kinship_degree(kinship: float | np.ndarray) -> Degree | np.ndarray | None:
    """The KING relationship degree a kinship coefficient falls in.

    ===================== =====================================
    degree                kinship φ
    ===================== =====================================
    ``duplicate/MZ twin`` 2^(-3/2) < φ (≈ 0.354)
    ``1st``               2^(-5/2) < φ ≤ 2^(-3/2) (≈ 0.177)
    ``2nd``               2^(-7/2) < φ ≤ 2^(-5/2) (≈ 0.0884)
    ``3rd``               2^(-9/2) < φ ≤ 2^(-7/2) (≈ 0.0442)
    None                  φ ≤ 2^(-9/2), or NaN
    ===================== =====================================

    Each bound belongs to the more distant degree: KING's manual prints closed ranges
    ("[0.177, 0.354]") and leaves the shared ends open, while plink2's ``--king-cutoff`` removes
    pairs "greater than the given threshold"; a strict ``>`` agrees with the latter.

    Parameters
    ----------
    kinship
        A float, or an array of any shape.

    Returns
    -------
    str or None, or np.ndarray
        For an array, an object array of the same shape holding the strings and None.
    """
    if np.ndim(kinship) == 0:
        value = float(kinship)
        for bound, degree in _DEGREES:
            if value > bound:
                return degree
        return None
    k = np.asarray(kinship, dtype=np.float64)
    out = np.full(k.shape, None, dtype=object)
    for bound, degree in reversed(_DEGREES):  # closer degrees overwrite
        out[k > bound] = degree
    return out


class RelatedPair(NamedTuple):
    """One pair of samples: global row indices ``i < j``, their kinship and KING degree."""

    i: int
    j: int
    kinship: float
    degree: Degree | None


def related_pairs(
    block: np.ndarray,
    row_ids: Sequence[SampleId] | None = None,
    col_ids: Sequence[SampleId] | None = None,
    *,
    threshold: float = THIRD_DEGREE_MIN_KINSHIP,
    row_offset: int = 0,
    col_offset: int = 0,
    upper_only: bool = True,
    keep_diagonal: bool = False,
) -> list[RelatedPair]:
    """Pairs in a tile of a square KING matrix whose kinship is above ``threshold``.

    Parameters
    ----------
    block
        (B_r, B_c) tile: rows ``row_offset …`` by columns ``col_offset …`` of the (N, N) matrix.
    row_ids, col_ids
        (B_r,) and (B_c,) ``(FID, IID)`` of the tile's rows and columns; only checked against the
        tile's shape (pass None to skip).
    threshold
        Keep pairs with kinship strictly above it; the default, 2^(-9/2) ≈ 0.0442, keeps exactly
        the pairs :func:`kinship_degree` gives a degree. NaN kinships are never kept.
    row_offset, col_offset
        Global indices of the tile's first row and column.
    upper_only
        Keep only ``i < j`` (global), so that tiles covering the square report each pair once
        and the diagonal never; False keeps every (i, j) of the tile, i ≠ j.
    keep_diagonal
        With ``upper_only=False``: keep ``i == j`` too. For a query-by-cohort tile, whose rows
        and columns are different samples, so query ``i`` against cohort ``i`` is a real pair.

    Returns
    -------
    list[RelatedPair]
        Sorted by (i, j).
    """
    block = np.asarray(block, dtype=np.float64)
    if block.ndim != 2:
        raise ValueError(f"block: expected a 2-D tile, got shape {block.shape}")
    for name, given, size in (("row_ids", row_ids, block.shape[0]), ("col_ids", col_ids, block.shape[1])):  # fmt: skip
        if given is not None and len(given) != size:
            raise ValueError(f"{name}: {len(given)} ids for a tile of shape {block.shape}")
    rows = np.arange(block.shape[0])[:, None] + row_offset
    cols = np.arange(block.shape[1])[None, :] + col_offset
    keep = block > threshold
    if upper_only:
        keep &= rows < cols
    elif not keep_diagonal:
        keep &= rows != cols
    r, c = np.nonzero(keep)
    values = block[r, c]
    degrees = kinship_degree(values)
    return [
        RelatedPair(int(i), int(j), float(v), d)
        for i, j, v, d in zip(
            (r + row_offset).tolist(), (c + col_offset).tolist(), values.tolist(), degrees,
            strict=True,
        )
    ]  # fmt: skip


def king_pair_counts(genotypes: np.ndarray, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """The counts behind plink2's .kin0 NSNP, HETHET and IBS0 columns, for the given pairs.

    Parameters
    ----------
    genotypes
        (N, M) dosages 0/1/2, missing as NaN or a negative value (as :mod:`models.genome.api`).
    pairs
        (P,) ``(i, j)`` row indices.

    Returns
    -------
    np.ndarray
        (P, 3) int64: variants called in both, both heterozygous, opposite homozygotes.
    """
    g = np.asarray(genotypes)
    if g.ndim != 2:
        raise ValueError(f"genotypes: expected an (N, M) matrix, got shape {g.shape}")
    index = np.array(list(pairs), dtype=np.intp).reshape(-1, 2)
    out = np.zeros((index.shape[0], 3), dtype=np.int64)
    codes = (
        np.where(np.isnan(g) | (g < 0), -1, g) if g.dtype.kind == "f" else np.where(g < 0, -1, g)
    )
    codes = codes.astype(np.int8)
    step = max(1, 2**24 // max(1, g.shape[1]))  # bound the (pairs, M) temporaries
    for start in range(0, index.shape[0], step):
        a = codes[index[start : start + step, 0]]
        b = codes[index[start : start + step, 1]]
        called = (a >= 0) & (b >= 0)
        out[start : start + step, 0] = called.sum(axis=1)
        out[start : start + step, 1] = ((a == 1) & (b == 1)).sum(axis=1)
        out[start : start + step, 2] = (called & (np.abs(a.astype(np.int16) - b) == 2)).sum(axis=1)
    return out


def kin0_header(with_counts: bool) -> str:
    """The header line of plink2's ``.kin0``: its default columns, or ``maybefid,id,kinship``."""
    if with_counts:
        return "#FID1\tIID1\tFID2\tIID2\tNSNP\tHETHET\tIBS0\tKINSHIP\n"
    return "#FID1\tIID1\tFID2\tIID2\tKINSHIP\n"


def kin0_lines(
    first: Sequence[SampleId],
    second: Sequence[SampleId],
    kinship: np.ndarray,
    counts: np.ndarray | None = None,
) -> list[str]:
    """``.kin0`` lines, in the order given: ``FID1 IID1 FID2 IID2 [NSNP HETHET IBS0] KINSHIP``.

    Parameters
    ----------
    first, second
        (P,) ``(FID, IID)`` of each pair's first and second sample (plink2 puts the later sample
        of the file first).
    kinship
        (P,) float64.
    counts
        (P, 3) NSNP, HETHET and IBS0 as counts (printed as plink2 prints them: NSNP, then the
        other two as proportions of NSNP), or None for the kinship-only columns.
    """
    kinships = format_plink(np.asarray(kinship, dtype=np.float64))
    if counts is not None:
        counts = np.asarray(counts).reshape(-1, 3)
        nsnp = counts[:, 0].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            hethet = format_plink(counts[:, 1] / nsnp)
            ibs0 = format_plink(counts[:, 2] / nsnp)
        extra = [
            f"\t{int(s)}\t{h}\t{z}" for s, h, z in zip(counts[:, 0], hethet, ibs0, strict=True)
        ]
    else:
        extra = [""] * len(kinships)
    return [
        f"{f1}\t{i1}\t{f2}\t{i2}{tail}\t{k}\n"
        for (f1, i1), (f2, i2), tail, k in zip(first, second, extra, kinships, strict=True)
    ]


def write_kin0(
    path: str | Path,
    pairs: Iterable[RelatedPair],
    ids: Sequence[SampleId],
    *,
    counts: np.ndarray | None = None,
    min_kinship: float | None = None,
    with_fid: bool = True,
) -> Path:
    """A KING pair table as ``plink2 --make-king-table`` writes it (``.kin0``).

    Rows come in plink2's order, by the later sample then the earlier one, with the later sample
    as ``FID1/IID1``; whatever order ``pairs`` has. Columns: with ``counts``, plink2's default
    set ``#FID1 IID1 FID2 IID2 NSNP HETHET IBS0 KINSHIP`` (HETHET and IBS0 as proportions of
    NSNP); without, ``#FID1 IID1 FID2 IID2 KINSHIP``, which is ``cols=maybefid,id,kinship``.

    Parameters
    ----------
    path
        The file to write (``.kin0`` is not appended).
    pairs
        (P,) pairs with row indices into ``ids`` (from :func:`related_pairs`, or built as
        ``RelatedPair(i, j, kinship, None)``).
    ids
        (N,) ``(FID, IID)`` of the matrix the indices refer to.
    counts
        (P, 3) from :func:`king_pair_counts`, aligned with ``pairs``.
    with_fid
        False for samples read from a VCF: no FID1/FID2 columns, as plink2 writes them.
    min_kinship
        Keep pairs with kinship ≥ this, like ``--king-table-filter`` (plink2 keeps a pair at
        exactly the filter value: checked with a duplicate sample, kinship 0.5, filter 0.5).

    Returns
    -------
    Path
        The file written.
    """
    checked = _check_ids(ids)
    rows = list(pairs)
    if counts is not None:
        counts = np.asarray(counts)
        if counts.shape != (len(rows), 3):
            raise ValueError(
                f"counts: expected ({len(rows)}, 3) for {len(rows)} pairs, got {counts.shape}"
            )
    order: list[tuple[int, int, float, int]] = []
    for n, pair in enumerate(rows):
        i, j, kinship = int(pair[0]), int(pair[1]), float(pair[2])
        if i == j or not (0 <= i < len(checked) and 0 <= j < len(checked)):
            raise ValueError(f"pairs[{n}]: ({i}, {j}) is not a pair of the {len(checked)} samples")
        if min_kinship is not None and not kinship >= min_kinship:
            continue
        order.append((max(i, j), min(i, j), kinship, n))
    order.sort()
    first = [checked[a] for a, _, _, _ in order]
    second = [checked[b] for _, b, _, _ in order]
    values = np.array([k for _, _, k, _ in order], dtype=np.float64)
    picked = None if counts is None else counts[[n for *_, n in order]].reshape(-1, 3)
    lines = [kin0_header(counts is not None), *kin0_lines(first, second, values, picked)]
    if not with_fid:  # a VCF's samples: plink2's maybefid leaves out FID1 and FID2
        lines = ["\t".join(line.split("\t")[1:2] + line.split("\t")[3:]) for line in lines]
        lines[0] = "#" + lines[0]
    path = Path(path)
    part = path.with_name(path.name + ".part")
    part.write_text("".join(lines), encoding="utf-8", newline="\n")
    os.replace(part, path)
    return path
