"""Sample and variant selection on :class:`models.genome.api.Genotypes`, whatever file they came from
(``plink --keep``, ``--maf`` and ``--extract`` semantics)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from models.genome._codes import allele_frequencies
from models.genome.io.plink import Genotypes, maf_columns


def keep_rows(
    fid: Sequence[str], iid: Sequence[str], keep: Sequence[str | tuple[str, str]]
) -> np.ndarray:
    """Row numbers of the kept samples, in file order; ``keep`` holds IIDs or (FID, IID) pairs.

    Raises
    ------
    ValueError
        Naming by its place in ``keep`` (counted from 1; never by its value: sample ids may be
        patient identifiers) the first entry that is not in the file, an IID not unique there, or
        an (FID, IID) the file lists twice (plink2 --keep stops there: "Duplicate ID").
    """
    pairs: dict[tuple[str, str], list[int]] = {}
    for n, pair in enumerate(zip(fid, iid, strict=True)):
        pairs.setdefault(pair, []).append(n)
    by_iid: dict[str, list[int]] = {}
    for n, i in enumerate(iid):
        by_iid.setdefault(i, []).append(n)
    rows: set[int] = set()
    for place, wanted in enumerate(keep, start=1):
        if isinstance(wanted, tuple):
            if wanted not in pairs:
                raise ValueError(f"entry {place}: no sample of the cohort has that FID and IID")
            if len(pairs[wanted]) > 1:
                raise ValueError(f"entry {place}: the cohort lists that FID and IID more than once")
            rows.update(pairs[wanted])
            continue
        found = by_iid.get(wanted, [])
        if not found:
            raise ValueError(f"entry {place}: no sample of the cohort has that IID")
        if len(found) > 1:
            raise ValueError(
                f"entry {place}: that IID is not unique in the cohort; give [FID, IID]"
            )
        rows.update(found)
    return np.array(sorted(rows), dtype=np.intp)


#: Chromosomes plink2 (--make-king[-table], --make-rel) and plink 1.9 (--distance) leave out
#: ("Excluding N variants on non-autosomes"): X, Y and MT by name or number, with or without
#: "chr", in any case. XY (the pseudo-autosomal region), 0 and contigs stay in. Checked against
#: plink2 v2.00a3.5 and plink 1.9 b6.26.
NON_AUTOSOMES = frozenset({"X", "23", "Y", "24", "M", "MT", "26"})


def autosomal(chrom: Sequence[str]) -> np.ndarray:
    """(M,) bool: True where a variant's chromosome is one PLINK keeps (not in
    :data:`NON_AUTOSOMES`)."""
    return np.array(
        [c.upper().removeprefix("CHR") not in NON_AUTOSOMES for c in chrom], dtype=bool
    ).reshape(-1)


#: Allele codes that name no allele: PLINK's ``0`` (a variant with one allele seen), VCF's ``.``.
NO_ALLELE = frozenset({"0", "."})


def variant_columns(variant_id: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
    """Where each of ``wanted`` is among ``variant_id``: by place where the two list the same ids
    in the same order, ``.`` (no id, as plink2 writes a VCF's missing ID) matching any id there
    (repeated ids are then matched as they stand); else by id.

    Raises
    ------
    ValueError
        Naming one of ``wanted`` that is absent, or that is not unique on either side (an id
        such as ``.`` cannot say which variant it is).
    """
    if len(variant_id) == len(wanted) and all(
        v == w or "." in (v, w) for v, w in zip(variant_id, wanted, strict=True)
    ):
        return np.arange(len(wanted), dtype=np.intp)
    index: dict[str, int] = {}
    repeated = set()
    for n, v in enumerate(variant_id):
        if v in index:
            repeated.add(v)
        index[v] = n
    missing = [v for v in wanted if v not in index]
    if missing:
        raise ValueError(f"{len(missing)} variants of the cohort are absent, e.g. {missing[0]}")
    seen: set[str] = set()
    for v in wanted:
        if v in repeated or v in seen:
            raise ValueError(
                f"variant id {v} is not unique, and the variants are not listed in the same order "
                "as the cohort's: give them unique ids (plink2 --set-all-var-ids) or the same order"
            )
        seen.add(v)
    return np.array([index[v] for v in wanted], dtype=np.intp)


def allele_flips(
    variant_id: Sequence[str],
    a1: Sequence[str],
    a2: Sequence[str],
    cohort_a1: Sequence[str],
    cohort_a2: Sequence[str],
) -> np.ndarray:
    """Per variant (aligned with the cohort's): True where its A1/A2 are the cohort's swapped, so
    its dosages count the cohort's A2 (as merging filesets in PLINK, the calls are matched by
    allele, not by column). A missing allele code (:data:`NO_ALLELE`) matches any allele.

    Raises
    ------
    ValueError
        Naming one variant whose alleles are neither the cohort's nor swapped (another strand,
        or another variant under the same id).
    """

    def same(x: str, y: str) -> bool:
        return x.upper() == y.upper() or x in NO_ALLELE or y in NO_ALLELE

    flips = np.zeros(len(variant_id), dtype=bool)
    bad = []
    for n, (q1, q2, c1, c2) in enumerate(zip(a1, a2, cohort_a1, cohort_a2, strict=True)):
        if same(q1, c1) and same(q2, c2):
            continue
        if same(q1, c2) and same(q2, c1):
            flips[n] = True
        else:
            bad.append(n)
    if bad:
        n = bad[0]
        raise ValueError(
            f"{len(bad)} variants have alleles other than the cohort's, e.g. {variant_id[n]}: "
            f"{a1[n]}/{a2[n]} here, {cohort_a1[n]}/{cohort_a2[n]} in the cohort"
        )
    return flips


def align(
    genotypes: Genotypes,
    variant_id: Sequence[str],
    a1: Sequence[str],
    a2: Sequence[str],
    *,
    columns: np.ndarray | None = None,
) -> Genotypes:
    """``genotypes`` (query samples) over the cohort's variants ``variant_id``, in that order,
    their dosages counting the cohort's A1 (``a1``): a variant whose A1/A2 are the cohort's
    swapped has its calls recounted (:func:`allele_flips`). ValueError for a variant that is
    absent, or whose alleles do not match. ``columns``: then only the cohort's variants at
    those places (those a job uses: the query is matched to the cohort's whole file first, so
    that ids matched by place stay in place)."""
    g = genotypes
    if g.variant_id != tuple(variant_id):
        g = subset(g, variants=variant_id)
    flips = allele_flips(g.variant_id, g.a1, g.a2, a1, a2)
    if flips.any():
        dosages = g.dosages.copy()
        turned = dosages[:, flips]
        dosages[:, flips] = np.where(turned >= 0, 2 - turned, turned)
        g = replace(
            g,
            dosages=dosages,
            a1=tuple(b if f else a for a, b, f in zip(g.a1, g.a2, flips.tolist(), strict=True)),
            a2=tuple(a if f else b for a, b, f in zip(g.a1, g.a2, flips.tolist(), strict=True)),
        )
    if columns is None or len(columns) == g.n_variants:
        return g
    return take(g, np.arange(g.n_samples, dtype=np.intp), np.asarray(columns, dtype=np.intp))


def selection(
    genotypes: Genotypes,
    *,
    keep: Sequence[str | tuple[str, str]] | None = None,
    min_maf: float | None = None,
    variants: Sequence[str] | None = None,
    autosomes: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The rows and columns :func:`subset` keeps."""
    g = genotypes
    rows = np.arange(g.n_samples, dtype=np.intp) if keep is None else keep_rows(g.fid, g.iid, keep)
    columns = np.arange(g.n_variants, dtype=np.intp)
    if variants is not None:
        columns = variant_columns(g.variant_id, variants)
    else:
        if autosomes and g.chrom:
            columns = np.flatnonzero(autosomal(g.chrom))
        # Frequencies over the kept founders, as plink2 --maf counts them (none: no filter).
        founders = rows if not g.founder else rows[np.array(g.founder, dtype=bool)[rows]]
        if min_maf is not None and len(founders):
            p = allele_frequencies(g.dosages[np.ix_(founders, columns)])
            columns = columns[maf_columns(p, min_maf)]
    return rows, columns


def founder_frequencies(genotypes: Genotypes) -> np.ndarray:
    """A1 frequencies over the founders (both parents ``0`` in the .fam), as plink2 --make-rel and
    plink 1.9 --distance count them; over every sample where none is a founder (or a VCF)."""
    g = genotypes
    founders = np.array(g.founder, dtype=bool) if g.founder else np.ones(g.n_samples, bool)
    if not founders.any() or founders.all():
        return allele_frequencies(g.dosages)
    return allele_frequencies(g.dosages[founders])


def subset(
    genotypes: Genotypes,
    *,
    keep: Sequence[str | tuple[str, str]] | None = None,
    min_maf: float | None = None,
    variants: Sequence[str] | None = None,
    autosomes: bool = False,
) -> Genotypes:
    """The kept samples; then the variants named in ``variants`` (in that order), or those on an
    autosome (``autosomes``, as PLINK: :func:`autosomal`) whose minor allele frequency over the
    kept founders' calls is at least ``min_maf``."""
    g = genotypes
    rows, columns = selection(g, keep=keep, min_maf=min_maf, variants=variants, autosomes=autosomes)
    if len(rows) == g.n_samples and len(columns) == g.n_variants and variants is None:
        return g
    return take(g, rows, columns)


def take(genotypes: Genotypes, rows: np.ndarray, columns: np.ndarray) -> Genotypes:
    """The samples at ``rows`` over the variants at ``columns``."""
    g = genotypes
    return Genotypes(
        dosages=np.ascontiguousarray(g.dosages[np.ix_(rows, columns)]),
        fid=tuple(g.fid[r] for r in rows),
        iid=tuple(g.iid[r] for r in rows),
        variant_id=tuple(g.variant_id[c] for c in columns),
        a1=tuple(g.a1[c] for c in columns),
        a2=tuple(g.a2[c] for c in columns),
        chrom=tuple(g.chrom[c] for c in columns) if g.chrom else (),
        founder=tuple(g.founder[r] for r in rows) if g.founder else (),
    )
