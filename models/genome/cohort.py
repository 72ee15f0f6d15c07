"""Sample and variant selection on :class:`models.genome.api.Genotypes`, whatever file they came from
(``plink --keep``, ``--maf`` and ``--extract`` semantics)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.genome._codes import allele_frequencies
from models.genome.io.plink import Genotypes


def keep_rows(
    fid: Sequence[str], iid: Sequence[str], keep: Sequence[str | tuple[str, str]]
) -> np.ndarray:
    """Row numbers of the kept samples, in file order; ``keep`` holds IIDs or (FID, IID) pairs.

    Raises
    ------
    ValueError
        Naming the first id that is not in the file, or an IID that is not unique there.
    """
    pairs = {(f, i): n for n, (f, i) in enumerate(zip(fid, iid, strict=True))}
    by_iid: dict[str, list[int]] = {}
    for n, i in enumerate(iid):
        by_iid.setdefault(i, []).append(n)
    rows: set[int] = set()
    for wanted in keep:
        if isinstance(wanted, tuple):
            if wanted not in pairs:
                raise ValueError(f"sample {wanted[0]} {wanted[1]} (FID IID) is not in the cohort")
            rows.add(pairs[wanted])
            continue
        found = by_iid.get(wanted, [])
        if not found:
            raise ValueError(f"sample {wanted!r} is not in the cohort")
        if len(found) > 1:
            raise ValueError(f"IID {wanted!r} is not unique in the cohort; give FID and IID")
        rows.update(found)
    return np.array(sorted(rows), dtype=np.intp)


def subset(
    genotypes: Genotypes,
    *,
    keep: Sequence[str | tuple[str, str]] | None = None,
    min_maf: float | None = None,
    variants: Sequence[str] | None = None,
) -> Genotypes:
    """The kept samples; then the variants named in ``variants`` (in that order) or those whose
    minor allele frequency over the kept samples' calls is at least ``min_maf``."""
    g = genotypes
    rows = np.arange(g.n_samples, dtype=np.intp) if keep is None else keep_rows(g.fid, g.iid, keep)
    columns = np.arange(g.n_variants, dtype=np.intp)
    if variants is not None:
        index = {v: n for n, v in enumerate(g.variant_id)}
        missing = [v for v in variants if v not in index]
        if missing:
            raise ValueError(f"{len(missing)} variants of the cohort are absent, e.g. {missing[0]}")
        columns = np.array([index[v] for v in variants], dtype=np.intp)
    elif min_maf is not None:
        p = allele_frequencies(g.dosages[rows])
        columns = np.flatnonzero(np.minimum(p, 1.0 - p) >= min_maf)
    if len(rows) == g.n_samples and len(columns) == g.n_variants and variants is None:
        return g
    return Genotypes(
        dosages=np.ascontiguousarray(g.dosages[np.ix_(rows, columns)]),
        fid=tuple(g.fid[r] for r in rows),
        iid=tuple(g.iid[r] for r in rows),
        variant_id=tuple(g.variant_id[c] for c in columns),
        a1=tuple(g.a1[c] for c in columns),
        a2=tuple(g.a2[c] for c in columns),
    )
