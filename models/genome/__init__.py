"""Genome comparisons: the public API is :mod:`.api` (and :mod:`.pairs` for pairs-only KING);
the engines (``_cpu``, ``_gemm``, ``_bits``, ``_pairs_gpu``) are private; :mod:`.io` reads and
writes PLINK and VCF files. This file imports nothing, so reading a header never loads a kernel."""
