"""VCF/BCF genotypes (read with cyvcf2, htslib underneath) as :class:`models.genome.api.Genotypes`.

Each record must be biallelic (or monomorphic, ALT ``.``) with diploid GT calls; the dosage counts
the ALT allele (what PLINK 2 counts when it imports a VCF, and what it writes as A1 when it exports
one). A call with a missing allele (``./.``, ``./1``) is missing. Sample ids become FID = IID, as
``plink2 --vcf`` does by default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.genome.io.plink import MISSING_INT8, Genotypes

#: cyvcf2's gt_types with gts012=True: 0 hom REF, 1 het, 2 hom ALT, 3 unknown.
_UNKNOWN = 3
VCF_SUFFIXES = (".vcf", ".vcf.gz", ".vcf.bgz", ".bcf")


def is_vcf(path: str | Path) -> bool:
    return str(path).endswith(VCF_SUFFIXES)


def read_vcf(path: str | Path) -> Genotypes:
    """Read every record of a VCF/BCF into ALT dosages.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a VCF/BCF htslib can read, no samples, a record that is not biallelic (naming its
        CHROM:POS and ID), or a call that is not diploid.
    """
    from cyvcf2 import VCF

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        reader = VCF(str(path), gts012=True, lazy=True)
    except (OSError, Exception) as exc:  # cyvcf2 raises bare Exceptions for unreadable files
        raise ValueError(f"{path}: not a VCF/BCF that htslib can read ({exc})") from None
    samples = tuple(reader.samples)
    if not samples:
        raise ValueError(f"{path}: no samples (a sites-only VCF has no genotypes)")
    columns: list[np.ndarray] = []
    ids: list[str] = []
    ref: list[str] = []
    alt: list[str] = []
    chrom: list[str] = []
    try:
        for record in reader:
            where = f"{path}: record {record.CHROM}:{record.POS} ({record.ID or '.'})"
            # ALT '.' is a monomorphic record: plink2 --export vcf writes one for a variant whose
            # A1 is missing ('.' or '0' in the .bim), and plink2 --vcf reads it back as A1 '.'.
            monomorphic = not record.ALT
            if len(record.ALT) > 1:
                alleles = ",".join(record.ALT)
                raise ValueError(
                    f"{where} is not biallelic (ALT {alleles}); split or drop it first, "
                    "e.g. bcftools norm -m- or bcftools view -m2 -M2"
                )
            if record.ploidy != 2:
                raise ValueError(f"{where}: calls of ploidy {record.ploidy}, expected diploid")
            codes = np.asarray(record.gt_types, dtype=np.int8)
            if monomorphic and np.isin(codes, (1, 2)).any():
                raise ValueError(f"{where}: a call of ALT allele 1, but its ALT is '.'")
            columns.append(np.where(codes == _UNKNOWN, MISSING_INT8, codes).astype(np.int8))
            ids.append(record.ID or ".")  # as plink2 --vcf imports a missing ID
            ref.append(record.REF)
            alt.append("." if monomorphic else record.ALT[0])
            chrom.append(record.CHROM)
    finally:
        reader.close()
    dosages = (
        np.ascontiguousarray(np.stack(columns, axis=1))
        if columns
        else np.empty((len(samples), 0), dtype=np.int8)
    )
    return Genotypes(
        dosages=dosages,
        fid=samples,
        iid=samples,
        variant_id=tuple(ids),
        a1=tuple(alt),
        a2=tuple(ref),
        chrom=tuple(chrom),
    )
