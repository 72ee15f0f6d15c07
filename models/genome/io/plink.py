"""PLINK 1 binary filesets (.bed/.bim/.fam) read into :class:`Genotypes`, and their headers
checked without reading the genotypes (what a submission needs). numpy and bed-reader only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.genome._codes import _codes, allele_frequencies

#: bed-reader's int8 code for a missing call.
MISSING_INT8 = -127
#: SNP-major PLINK 1 .bed: magic 0x6c 0x1b, then 0x01 (the PLINK 1.9 file-format spec).
BED_MAGIC = b"\x6c\x1b\x01"


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
    #: (M,) the .bim's first column (a VCF's CHROM); empty where the source has none (.npy).
    chrom: tuple[str, ...] = ()
    #: (N,) True for a founder (no father and no mother in the .fam); empty: all are (a VCF).
    founder: tuple[bool, ...] = ()

    @property
    def n_samples(self) -> int:
        return int(self.dosages.shape[0])

    @property
    def n_variants(self) -> int:
        return int(self.dosages.shape[1])


# --- reading ----------------------------------------------------------------------------------


#: What a PLINK 2 user converts a .pgen fileset with; the message names it (PLINK 2 filesets
#: are not read: a .pgen user was told only that the .bed was not found).
PGEN_HINT = (
    "a PLINK 2 .pgen/.pvar/.psam fileset is not read: write a PLINK 1 fileset with "
    "`plink2 --pfile PREFIX --make-bed --out PREFIX`"
)


def _plink_paths(prefix: str | Path) -> tuple[Path, Path, Path]:
    prefix = Path(prefix)
    if prefix.suffix in (".bed", ".bim", ".fam", ".pgen", ".pvar", ".psam"):
        prefix = prefix.with_suffix("")
    # Not with_suffix: names such as "1kg.ref.phase1_release_v3.20101123_..." hold dots.
    bed, bim, fam = (prefix.with_name(prefix.name + ext) for ext in (".bed", ".bim", ".fam"))
    for path in (bed, bim, fam):
        if not path.is_file():
            hint = ""
            if prefix.with_name(prefix.name + ".pgen").is_file():
                hint = f" ({PGEN_HINT})"
            raise FileNotFoundError(f"PLINK fileset {prefix}: {path} not found{hint}")
    return bed, bim, fam


def _read_columns(path: Path, expected: int, names: tuple[int, ...]) -> list[tuple[str, ...]]:
    """Whitespace-separated columns ``names`` of a .fam/.bim, every line checked for its width.

    Lines starting with ``#`` before the first sample or variant are a header or comments, as
    plink2 reads them (its own ``#FID IID ...`` header); one after it is refused, as plink2 does
    ("only permitted before the first nonheader line"): counted as a line, a header would shift
    every sample's genotypes by one where the .bed's size still fits.

    Fields are split at ASCII whitespace only, as plink2 splits them (a no-break space inside an
    IID is part of it), and must be UTF-8."""
    rows: list[list[str]] = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                fields = [field.decode("utf-8") for field in line.split()]
            except UnicodeDecodeError:
                raise ValueError(
                    f"{path}, line {number}: not UTF-8 text; re-encode the file "
                    "(e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if not fields:
                continue
            if fields[0].startswith("#"):
                if rows:
                    raise ValueError(
                        f"{path}, line {number}: starts with '#' below the first data line "
                        "(plink2 takes '#' header and comment lines only at the top)"
                    )
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
    if len(magic) < 3:  # cut off inside its 3 magic bytes: a truncated file, said as one
        _check_size(path, n_samples, n_variants, fam, bim)
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
    _check_size(path, n_samples, n_variants, fam, bim)


def _check_size(path: Path, n_samples: int, n_variants: int, fam: Path, bim: Path) -> None:
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
    by_pair: dict[tuple[str, str], list[int]] = {}
    for n, pair in enumerate(zip(fid, iid, strict=True)):
        by_pair.setdefault(pair, []).append(n)
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
            found = by_pair.get((f, i), [])
            if len(found) > 1:  # plink2 --keep stops here too ("Duplicate ID")
                raise ValueError(f"{fam}: sample {(f, i)!r} is listed more than once")
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
    #: The variants' ids and alleles (the .bim's second, fifth and sixth columns).
    variant_id: tuple[str, ...] = ()
    a1: tuple[str, ...] = ()
    a2: tuple[str, ...] = ()
    #: The variants' chromosomes (the .bim's first column).
    chrom: tuple[str, ...] = ()
    #: The samples' founder flags (:attr:`Genotypes.founder`).
    founder: tuple[bool, ...] = ()


def inspect_bed(prefix: str | Path) -> FilesetInfo:
    """Check a fileset as :func:`read_bed` does (files, magic, size, line widths); read only ids."""
    bed, bim, fam = _plink_paths(prefix)
    fid, iid, father, mother = _read_columns(fam, 6, (0, 1, 2, 3))
    chrom, variant_id, a1, a2 = _read_columns(bim, 6, (0, 1, 4, 5))
    _check_bed(bed, len(iid), len(variant_id), fam, bim)
    return FilesetInfo(
        bed.with_suffix(""), fid, iid, len(variant_id), variant_id, a1, a2, chrom,
        _founders(father, mother),
    )  # fmt: skip


def _founders(father: tuple[str, ...], mother: tuple[str, ...]) -> tuple[bool, ...]:
    """PLINK's founders: both parents ``0`` (a parent named but absent from the file still makes
    a non-founder; checked against plink2 v2.00a3.5)."""
    return tuple(f == "0" and m == "0" for f, m in zip(father, mother, strict=True))


def maf_columns(p: np.ndarray, min_maf: float) -> np.ndarray:
    """Variants whose minor allele frequency ``p`` (A1 frequencies over the founders' calls) is
    at least ``min_maf``, as ``plink2 --maf``."""
    return np.flatnonzero(np.minimum(p, 1.0 - p) >= min_maf)


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
    fid, iid, father, mother = _read_columns(fam, 6, (0, 1, 2, 3))
    founder = _founders(father, mother)
    chrom, variant_id, a1, a2 = _read_columns(bim, 6, (0, 1, 4, 5))
    _check_bed(bed, len(iid), len(variant_id), fam, bim)
    rows = np.arange(len(iid), dtype=np.intp) if keep is None else _keep_index(keep, fid, iid, fam)
    from bed_reader import open_bed

    with open_bed(bed, iid_count=len(iid), sid_count=len(variant_id), count_A1=True) as reader:
        dosages = reader.read(index=np.s_[rows, :], dtype="int8", order="C")
    columns = np.arange(len(variant_id))
    founders = np.array([founder[r] for r in rows], dtype=bool)
    if min_maf is not None and founders.any():  # none: plink2 filters nothing
        columns = maf_columns(allele_frequencies(dosages[founders]), min_maf)
        dosages = np.ascontiguousarray(dosages[:, columns])
    return Genotypes(
        dosages=dosages,
        fid=tuple(fid[r] for r in rows),
        iid=tuple(iid[r] for r in rows),
        variant_id=tuple(variant_id[c] for c in columns),
        a1=tuple(a1[c] for c in columns),
        a2=tuple(a2[c] for c in columns),
        chrom=tuple(chrom[c] for c in columns),
        founder=tuple(founder[r] for r in rows),
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
