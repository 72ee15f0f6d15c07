"""VCF/BCF input: the same dosages as the PLINK fileset it was exported from, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.genome.api import MISSING_INT8, read_bed
from models.genome.io.vcf import read_vcf

DATA = Path(__file__).resolve().parents[1] / "data" / "genome"
HEADER = (
    "##fileformat=VCFv4.2\n##contig=<ID=1>\n"
    '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">\n'
    "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\ts1\ts2\ts3\n"
)


def test_plink2_export_reads_back_as_the_fileset() -> None:
    """hm3_small.vcf.gz is `plink2 --export vcf` of hm3_small (README): ALT = A1, same calls."""
    from_vcf, from_bed = read_vcf(DATA / "hm3_small.vcf.gz"), read_bed(DATA / "hm3_small")
    np.testing.assert_array_equal(from_vcf.dosages, from_bed.dosages)
    assert (from_vcf.iid, from_vcf.variant_id) == (from_bed.iid, from_bed.variant_id)
    assert (from_vcf.a1, from_vcf.a2) == (from_bed.a1, from_bed.a2)
    assert (from_vcf.dosages == MISSING_INT8).sum() > 0


def test_calls_and_missing_alleles(tmp_path: Path) -> None:
    path = tmp_path / "calls.vcf"
    path.write_text(HEADER + "1\t5\trs5\tA\tC\t.\t.\t.\tGT\t0|0\t1/0\t./.\n")
    assert read_vcf(path).dosages.tolist() == [[0], [1], [MISSING_INT8]]


def test_a_monomorphic_record_with_alt_dot_reads_as_plink2_reads_it(tmp_path: Path) -> None:
    """ALT '.' (what plink2 --export vcf writes for a .bim's A1 '.' or '0'): it was refused as
    "not biallelic (ALT none)", so plink2's own VCF of a fileset with a monomorphic variant could
    not be a query. plink2 --vcf reads it as A1 '.', every called sample with 0 copies."""
    path = tmp_path / "mono.vcf"
    path.write_text(HEADER + "1\t5\trs5\tT\t.\t.\t.\t.\tGT\t0/0\t./.\t0|0\n")
    found = read_vcf(path)
    assert found.dosages.tolist() == [[0], [MISSING_INT8], [0]]
    assert (found.a1, found.a2) == ((".",), ("T",))
    path.write_text(HEADER + "1\t5\trs5\tT\t.\t.\t.\t.\tGT\t0/0\t0/1\t0|0\n")
    with pytest.raises(ValueError, match=r"1:5 \(rs5\): a call of ALT allele 1, but its ALT is"):
        read_vcf(path)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("1\t7\trs7\tA\tC,G\t.\t.\t.\tGT\t0/1\t0/2\t1/1\n", "1:7 (rs7) is not biallelic (ALT C,G)"),
        ("1\t8\trs8\tA\tC\t.\t.\t.\tGT\t0\t1\t1\n", "ploidy 1, expected diploid"),
    ],
)
def test_records_that_do_not_fit_are_named(tmp_path: Path, body: str, fragment: str) -> None:
    path = tmp_path / "bad.vcf"
    path.write_text(HEADER + "1\t5\trs5\tA\tC\t.\t.\t.\tGT\t0/0\t0/1\t1/1\n" + body)
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        read_vcf(path)


def test_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.vcf not found"):
        read_vcf(tmp_path / "nope.vcf")
    sites = tmp_path / "sites.vcf"
    sites.write_text(HEADER.replace("\tFORMAT\ts1\ts2\ts3", "") + "1\t5\trs5\tA\tC\t.\t.\t.\n")
    with pytest.raises(ValueError, match="no samples"):
        read_vcf(sites)
    junk = tmp_path / "junk.vcf"
    junk.write_bytes(b"\x00\x01 not a vcf at all\n")
    with pytest.raises(ValueError, match="not a VCF/BCF that htslib can read"):
        read_vcf(junk)
