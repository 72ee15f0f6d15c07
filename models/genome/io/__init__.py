"""Genotype files: PLINK 1 filesets (:mod:`.plink`), VCF/BCF (:mod:`.vcf`), PLINK-format
matrices and pair tables (:mod:`.output`)."""
