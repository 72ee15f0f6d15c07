"""Pairs-only KING jobs on the real databases: 2-D tiles counted once, plink2's .kin0 streamed
from the stored pairs, degree counts, query mode, and submissions refused with the field named."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import genome as jobs
from db.engine import session_scope
from db.tables import GenomeJob, JobTile, RelatedPair
from models.genome import api as genome
from tests.helpers import SHARED_DIR, assert_refused, new_tenant, require_shared
from worker.tasks import genome as tasks

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "genome"
RELATIVES = DATA / "hm3_relatives"
GOLDEN = DATA / "hm3_relatives_0.0442.kin0"


def _submit(sessions: sessionmaker[Session], artifact_dir: Path, **options: object) -> dict:
    """A pairs-only KING job (unless ``options`` say otherwise) for a new tenant."""
    request = {"metric": "king", "output": "pairs", **options}
    tenant_id = new_tenant(sessions, "biobank")
    return tasks.submit(sessions, None, tenant_id=tenant_id, artifact_dir=artifact_dir, **request)


def _golden_across(founders: set[str]) -> list[str]:
    """The golden .kin0's lines of the pairs with one sample in ``founders`` and one outside
    (what a query job of the others against ``founders`` reports)."""
    return [
        line for line in GOLDEN.read_text().splitlines()[1:]
        if (line.split("\t")[1] in founders) != (line.split("\t")[3] in founders)
    ]  # fmt: skip


def _run(sessions: sessionmaker[Session], job: dict) -> dict:
    """Run the job's tiles here; it must finish. Returns its summary."""
    summary = tasks.run_inline(sessions, job_id=job["id"], device="cpu")
    assert summary["status"] == "done", summary["error"]
    return summary


def test_pairs_job_writes_plink2s_kin0_and_counts_each_tile_once(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """96 samples in blocks of 32: 6 tiles; the .kin0 is plink2's to the byte, and only it."""
    job = _submit(sessions, tmp_path, bfile=RELATIVES, threshold=0.0442, block=32)
    assert (job["output"], job["tiles_total"], job["n_samples"]) == ("pairs", 6, 96)
    with session_scope(sessions) as s:
        tiles = s.scalars(select(JobTile).where(JobTile.job_id == job["id"])).all()
        assert sorted((t.row_start, t.col_start) for t in tiles) == [
            (0, 0), (0, 32), (0, 64), (32, 32), (32, 64), (64, 64),
        ]  # fmt: skip
    assert tasks.run_tile(sessions, job_id=job["id"], index=1, device="cpu") == "tile done"
    assert tasks.run_tile(sessions, job_id=job["id"], index=1, device="cpu") == "already done"
    summary = _run(sessions, job)
    assert summary["tiles_done"] == 6
    assert [Path(p).name for p in summary["outputs"]] == ["king.kin0"]  # no matrix, no .npy
    assert Path(summary["outputs"][0]).read_text() == GOLDEN.read_text()
    assert summary["degree_counts"] == {
        "duplicate/MZ twin": 4, "1st": 36, "2nd": 20, "3rd": 4, "unrelated": 0, "unknown": 0,
    }  # fmt: skip
    with session_scope(sessions) as s:
        n = s.scalar(
            select(func.count()).select_from(RelatedPair).where(RelatedPair.job_id == job["id"])
        )
        assert n == 64
        assert not list((tmp_path / "genome" / str(job["id"])).glob("tiles/*"))


def test_files_an_earlier_job_of_the_same_id_left_are_not_this_jobs_outputs(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """After the database was reset (a new SQLite file, the artifact folder kept), job 1's
    folder still held the old job 1's square; they were listed, and --out copied them as this
    pairs job's OUT.king and OUT.king.npy."""
    job = _submit(sessions, tmp_path, bfile=RELATIVES, block=48)
    folder = tmp_path / "genome" / str(job["id"])
    folder.mkdir(parents=True)
    for stale in ("king.king", "king.king.id", "king.npy", "notes.txt"):
        (folder / stale).write_text("an earlier job's\n")
    summary = _run(sessions, job)
    assert [Path(p).name for p in summary["outputs"]] == ["king.kin0"]
    assert Path(summary["outputs"][0]).read_text() == GOLDEN.read_text()


def test_pairs_below_third_degree_are_kept_as_unrelated(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A cut-off under 2^-4.5 keeps more pairs; those get the degree "unrelated"."""
    job = _submit(sessions, tmp_path, bfile=RELATIVES, threshold=0.02, block=48)
    counts = _run(sessions, job)["degree_counts"]
    assert counts["unrelated"] > 0 and counts["3rd"] >= 4
    with session_scope(sessions) as s:
        low = [
            p for p in jobs.list_pairs(s, job_id=job["id"], limit=10_000) if p.kinship <= 2**-4.5
        ]
    assert low and all(p.degree == "unrelated" and p.kinship >= 0.02 for p in low)


def write_cohort_with_holes(folder: Path) -> Path:
    """hm3_relatives with sample 10's calls all missing and samples 20 and 21 never called at
    the same variant: 96 pairs whose KING kinship is NaN (no variant both call), as ``holes``."""
    whole = genome.read_bed(RELATIVES)
    half = whole.n_variants // 2
    holes = dataclasses.replace(whole, dosages=whole.dosages.copy())
    holes.dosages[10] = -1
    holes.dosages[20, :half] = -1
    holes.dosages[21, half:] = -1
    _write_bed(folder / "holes", holes, range(96))
    return folder / "holes"


def test_pairs_with_a_nan_kinship_are_kept_stored_and_counted_as_plink2_keeps_them(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """plink2's --king-table-filter writes a pair whose kinship is NaN (no variant called in
    both: kinship 0/0) with "nan", since only kinship < filter is dropped; the job dropped
    them. They are stored (NULL kinship: SQLite has no NaN), counted as "unknown", and written
    as plink2 writes them."""
    prefix = write_cohort_with_holes(tmp_path)
    job = _submit(sessions, tmp_path, bfile=prefix, threshold=0.0442, block=32)
    summary = _run(sessions, job)
    assert summary["degree_counts"]["unknown"] == 96
    assert summary["degree_counts"]["duplicate/MZ twin"] == 4
    lines = [line.split("\t") for line in Path(summary["outputs"][0]).read_text().splitlines()]
    unknown = [line for line in lines if line[-1] == "nan"]
    assert len(unknown) == 96 and {tuple(line[4:7]) for line in unknown} == {("0", "nan", "nan")}
    with session_scope(sessions) as s:
        stored = jobs.list_pairs(s, job_id=job["id"], limit=10_000)
        assert sum(p.kinship is None for p in stored) == 96
        assert {p.degree for p in stored if p.kinship is None} == {"unknown"}
    if shutil.which("plink2") is not None:
        live = tmp_path / "live"
        cmd = ["plink2", "--bfile", str(prefix), "--threads", "1", "--make-king-table"]
        cmd += ["--king-table-filter", "0.0442", "--out", str(live)]
        subprocess.run(cmd, check=True, capture_output=True)
        assert Path(summary["outputs"][0]).read_text() == live.with_suffix(".kin0").read_text()


def test_query_pairs_are_the_new_samples_against_the_cohort(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The 20 constructed relatives as a query against the 76 founders: exactly the golden's
    relative-founder pairs, each kinship printed as plink2 printed it."""
    from bed_reader import to_bed

    whole = genome.read_bed(RELATIVES)
    x = whole.dosages.astype(np.float64)
    x[x < 0] = np.nan
    for name, rows in (("founders", range(76)), ("new", range(76, 96))):
        to_bed(
            tmp_path / f"{name}.bed", x[list(rows)],
            properties={
                "fid": [whole.fid[r] for r in rows], "iid": [whole.iid[r] for r in rows],
                "sid": list(whole.variant_id), "allele_1": list(whole.a1),
                "allele_2": list(whole.a2),
            },
        )  # fmt: skip
    job = _submit(
        sessions, tmp_path / "store", bfile=tmp_path / "founders", query=tmp_path / "new",
        threshold=0.0442, block=16,
    )  # fmt: skip
    assert job["tiles_total"] == 2 * 5 and job["query"]
    summary = _run(sessions, job)
    founders = set(whole.iid[:76])
    expected = {}
    for line in GOLDEN.read_text().splitlines()[1:]:
        f = line.split("\t")
        (a, b), kinship = (f[1], f[3]), f[7]
        if (a in founders) != (b in founders):
            new, old = (a, b) if b in founders else (b, a)
            expected[(new, old)] = kinship
    got = {}
    for line in Path(summary["outputs"][0]).read_text().splitlines()[1:]:
        f = line.split("\t")
        got[(f[1], f[3])] = f[7]
    assert got == expected and len(got) == 4 + 4 * 9  # duplicates; 9 per family


def _write_bed(
    prefix: Path, whole: genome.Genotypes, rows: range, *, flip: bool = False, **changes: list
) -> None:
    """Samples ``rows`` of ``whole`` as a PLINK 1 fileset (``changes``: other .bim columns;
    ``flip``: the same calls, counted against the other allele)."""
    from bed_reader import to_bed

    x = whole.dosages[list(rows)].astype(np.float64)
    x[x < 0] = np.nan
    properties = {
        "fid": [whole.fid[r] for r in rows], "iid": [whole.iid[r] for r in rows],
        "sid": list(whole.variant_id), "allele_1": list(whole.a1), "allele_2": list(whole.a2),
    }  # fmt: skip
    if flip:
        x = np.where(np.isnan(x), np.nan, 2.0 - x)
        properties["allele_1"], properties["allele_2"] = list(whole.a2), list(whole.a1)
    to_bed(prefix.with_suffix(".bed"), x, properties={**properties, **changes})


@pytest.mark.parametrize("output", ["pairs", "square"])
def test_min_maf_counts_the_founders_as_plink2_maf_does(
    sessions: sessionmaker[Session], tmp_path: Path, output: str
) -> None:
    """plink2 --maf counts allele frequencies over founders (no father and no mother in the
    .fam); every sample was counted, so a cohort with parents listed kept other variants and got
    other kinships than plink2's. The job equals one over the variants the founders select."""
    from models.genome.cohort import subset

    whole = genome.read_bed(RELATIVES)
    fid = [whole.fid[0] if r % 2 else whole.fid[r] for r in range(96)]
    father = [whole.iid[0] if r % 2 else "0" for r in range(96)]
    _write_bed(tmp_path / "families", whole, range(96), fid=fid, father=father)
    p = genome.allele_frequencies(whole.dosages[0::2])
    kept = [v for v, f in zip(whole.variant_id, p, strict=True) if min(f, 1 - f) >= 0.3]
    p_all = genome.allele_frequencies(whole.dosages)
    assert len(kept) != int((np.minimum(p_all, 1 - p_all) >= 0.3).sum())
    _write_bed(tmp_path / "founders", subset(whole, variants=kept), range(96), fid=fid)
    tenant_id = new_tenant(sessions, "biobank")
    kind = "kin0" if output == "pairs" else "king"
    texts = []
    for name, min_maf in (("families", 0.3), ("founders", None)):
        job = tasks.submit(
            sessions, None, tenant_id=tenant_id, artifact_dir=tmp_path / name / "store",
            metric="king", output=output, bfile=tmp_path / name, min_maf=min_maf,
        )  # fmt: skip
        summary = _run(sessions, job)
        (path,) = [p for p in summary["outputs"] if p.endswith(f".{kind}")]
        texts.append(Path(path).read_text())
        assert summary["n_variants"] == len(kept)  # the variants used, as the docs say
    assert texts[0] == texts[1] and len(texts[0].splitlines()) > 60


def test_a_query_with_dot_ids_in_the_cohorts_order_is_matched_by_place(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """'.' ids (a .bim made from a VCF without ids) on both sides, in the same order: each '.'
    was looked up as the query's last '.', and the submission refused the query for alleles
    "other than the cohort's". In another order an id that is not unique cannot be matched."""
    whole = genome.read_bed(RELATIVES)
    ids = ["." if j % 3 == 0 else v for j, v in enumerate(whole.variant_id)]
    _write_bed(tmp_path / "founders", whole, range(76), sid=ids)
    _write_bed(tmp_path / "new", whole, range(76, 96), sid=ids)
    tenant_id = new_tenant(sessions, "biobank")
    request = {"metric": "king", "output": "pairs", "bfile": tmp_path / "founders"}
    job = tasks.submit(
        sessions, None, tenant_id=tenant_id, artifact_dir=tmp_path / "store",
        query=tmp_path / "new", **request,
    )  # fmt: skip
    got = Path(_run(sessions, job)["outputs"][0]).read_text().splitlines()[1:]
    expected = _golden_across(set(whole.iid[:76]))
    assert sorted(got) == sorted(expected) and len(got) == 40
    # The same query as plink2 --export vcf writes it: ID '.' where the .bim had '.'; it was
    # named CHROM:POS and refused ("variants of the cohort are absent, e.g. .").
    gt = {0: "0/0", 1: "0/1", 2: "1/1"}
    records = [
        f"1\t{j + 1}\t{v}\t{whole.a2[j]}\t{whole.a1[j]}\t.\t.\t.\tGT\t"
        + "\t".join(gt.get(int(d), "./.") for d in whole.dosages[76:, j])
        for j, v in enumerate(ids)
    ]
    header = "##fileformat=VCFv4.2\n##contig=<ID=1>\n"
    header += '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">\n'
    header += "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t"
    (tmp_path / "new.vcf").write_text(
        header + "\t".join(whole.iid[76:]) + "\n" + "\n".join(records) + "\n"
    )
    job = tasks.submit(
        sessions, None, tenant_id=tenant_id, artifact_dir=tmp_path / "store",
        query=tmp_path / "new.vcf", **request,
    )  # fmt: skip
    from_vcf = Path(_run(sessions, job)["outputs"][0]).read_text().splitlines()[1:]
    assert sorted(line.split("\t", 1)[1] for line in from_vcf) == sorted(
        line.split("\t", 1)[1] for line in expected
    )
    reordered = [whole.variant_id[1], whole.variant_id[0], *ids[2:]]
    _write_bed(tmp_path / "mixed", whole, range(76, 96), sid=reordered)
    with pytest.raises(tasks.SubmissionError, match=r"variant id \. is not unique"):
        tasks.submit(
            sessions, None, tenant_id=tenant_id, artifact_dir=tmp_path / "store",
            query=tmp_path / "mixed", **request,
        )  # fmt: skip


def test_a_query_vcf_with_monomorphic_records_as_plink2_exports_them_runs(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """No sample of hm3_relatives carries A1 of 10+ variants; with A1 '.' in the .bim (as plink2
    writes an allele nobody has), plink2 --export vcf writes those records with ALT '.', and the
    query was refused ("not biallelic (ALT none)"). Its pairs are plink2's (the golden's)."""
    whole = genome.read_bed(RELATIVES)
    calls = np.where(whole.dosages < 0, 0, whole.dosages)
    absent = calls.max(axis=0) == 0
    a1 = ["." if gone else a for gone, a in zip(absent, whole.a1, strict=True)]
    assert absent.sum() >= 10
    _write_bed(tmp_path / "founders", whole, range(76), allele_1=a1)
    gt = {0: "0/0", 1: "0/1", 2: "1/1"}
    records = [
        f"1\t{j + 1}\t{v}\t{whole.a2[j]}\t{a1[j]}\t.\t.\t.\tGT\t"
        + "\t".join(gt.get(int(d), "./.") for d in whole.dosages[76:, j])
        for j, v in enumerate(whole.variant_id)
    ]
    header = "##fileformat=VCFv4.2\n##contig=<ID=1>\n"
    header += '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">\n'
    header += "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t"
    (tmp_path / "new.vcf").write_text(
        header + "\t".join(whole.iid[76:]) + "\n" + "\n".join(records) + "\n"
    )
    job = _submit(
        sessions, tmp_path / "store", bfile=tmp_path / "founders", query=tmp_path / "new.vcf"
    )
    got = Path(_run(sessions, job)["outputs"][0]).read_text().splitlines()[1:]
    expected = _golden_across(set(whole.iid[:76]))
    # A VCF's sample has no FID (its IID stands in): compare from IID1 on.
    assert sorted(line.split("\t", 1)[1] for line in got) == sorted(
        line.split("\t", 1)[1] for line in expected
    )
    assert len(got) == 40


@pytest.mark.parametrize("output", ["pairs", "square"])
def test_a_query_with_dot_ids_against_a_cohort_with_x_variants_runs(
    sessions: sessionmaker[Session], tmp_path: Path, output: str
) -> None:
    """'.' ids and X variants on both sides: accepted at submission, then every tile failed
    ("variant id . is not unique"), the query being matched to the autosomes alone by id. It is
    matched to the whole file by place, then to the autosomes: the pairs of unique ids."""
    whole = genome.read_bed(RELATIVES)
    chrom = ["X"] * 1500 + ["1"] * (14079 - 1500)
    dots = ["." if j % 3 == 0 else v for j, v in enumerate(whole.variant_id)]
    tenant_id = new_tenant(sessions, "biobank")
    texts = []
    for name, ids in (("dots", dots), ("ids", list(whole.variant_id))):
        _write_bed(tmp_path / f"{name}_old", whole, range(76), sid=ids, chromosome=chrom)
        _write_bed(tmp_path / f"{name}_new", whole, range(76, 96), sid=ids, chromosome=chrom)
        job = tasks.submit(
            sessions, None, tenant_id=tenant_id, artifact_dir=tmp_path / name, metric="king",
            output=output, bfile=tmp_path / f"{name}_old", query=tmp_path / f"{name}_new",
        )  # fmt: skip
        (kin0,) = [Path(p) for p in _run(sessions, job)["outputs"] if p.endswith(".kin0")]
        texts.append(kin0.read_text())
    assert texts[0] == texts[1] and len(texts[0].splitlines()) > 20


@pytest.mark.parametrize("output", ["pairs", "square"])
def test_x_y_and_mt_variants_are_left_out_as_plink_leaves_them_out(
    sessions: sessionmaker[Session], tmp_path: Path, output: str
) -> None:
    """plink2 leaves X, Y and MT out of KING ("Excluding 1600 variants on non-autosomes"); they
    were counted, so every kinship differed from plink2's. With them relabelled the outputs are
    those of the fileset without them (XY, the pseudo-autosomal region, stays in, as in plink2)."""
    from models.genome.cohort import subset

    whole = genome.read_bed(RELATIVES)
    codes = ["X", "chrY", "MT", "23", "chrM", "26", "x", "24"]
    chrom = [codes[j % len(codes)] for j in range(1600)] + ["XY"] * 100 + ["1"] * (14079 - 1700)
    _write_bed(tmp_path / "sexes", whole, range(96), chromosome=chrom)
    _write_bed(tmp_path / "autosomes", subset(whole, variants=whole.variant_id[1600:]), range(96))
    kind = "kin0" if output == "pairs" else "king"
    tenant_id = new_tenant(sessions, "biobank")
    texts = []
    for name in ("sexes", "autosomes"):
        job = tasks.submit(
            sessions, None, tenant_id=tenant_id, artifact_dir=tmp_path / name / "store",
            metric="king", output=output, bfile=tmp_path / name,
        )  # fmt: skip
        assert job["n_variants"] == 14079 - 1600
        summary = _run(sessions, job)
        (path,) = [p for p in summary["outputs"] if p.endswith(f".{kind}")]
        texts.append(Path(path).read_text())
    assert texts[0] == texts[1] and len(texts[0].splitlines()) > 60
    _write_bed(tmp_path / "none", whole, range(96), chromosome=["X"] * 14079)
    with pytest.raises(tasks.SubmissionError, match="none of its 14079 variants is on an auto"):
        tasks.submit(
            sessions, None, tenant_id=tenant_id, artifact_dir=tmp_path, metric="king",
            output=output, bfile=tmp_path / "none",
        )  # fmt: skip


@pytest.mark.parametrize("output", ["pairs", "square"])
def test_a_query_with_a1_and_a2_swapped_finds_the_same_relatives(
    sessions: sessionmaker[Session], tmp_path: Path, output: str
) -> None:
    """The new samples written with the other allele as A1 (as a VCF's REF/ALT or another tool
    may code them): the calls are the same, so the relatives and their kinships are too."""
    whole = genome.read_bed(RELATIVES)
    _write_bed(tmp_path / "founders", whole, range(76))
    _write_bed(tmp_path / "new", whole, range(76, 96))
    _write_bed(tmp_path / "flipped", whole, range(76, 96), flip=True)
    tenant_id, tables = new_tenant(sessions, "biobank"), []
    for new in ("new", "flipped"):
        job = tasks.submit(
            sessions, None, tenant_id=tenant_id, artifact_dir=tmp_path / new / "store",
            metric="king", bfile=tmp_path / "founders", query=tmp_path / new, threshold=0.0442,
            output=output,
        )  # fmt: skip
        summary = _run(sessions, job)
        assert summary["degree_counts"]["duplicate/MZ twin"] == 4
        (kin0,) = [Path(p) for p in summary["outputs"] if p.endswith(".kin0")]
        tables.append(kin0.read_text())
    assert tables[0] == tables[1] and len(tables[0].splitlines()) == 1 + 4 + 4 * 9


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"allele_1": ["T"] * 14079, "allele_2": ["C"] * 14079}, "alleles other than"),
        ({"sid": [f"x{j}" for j in range(14079)]}, "variants of the cohort are absent"),
    ],
)
def test_a_query_with_other_variants_is_refused_and_records_nothing(
    sessions: sessionmaker[Session], tmp_path: Path, changes: dict, fragment: str
) -> None:
    """As many variants as the cohort, but not its variants (other ids, or alleles that are
    neither the cohort's nor swapped): refused at submission, naming the query."""
    whole = genome.read_bed(RELATIVES)
    _write_bed(tmp_path / "new", whole, range(76, 96), **changes)
    submit = lambda: _submit(sessions, tmp_path, bfile=RELATIVES, query=tmp_path / "new")  # noqa: E731
    assert_refused(sessions, GenomeJob, submit, "query", fragment)


@pytest.mark.parametrize(
    ("options", "field", "fragment"),
    [
        ({"threshold": float("nan")}, "threshold", "finite"),
        ({"threshold": float("inf")}, "threshold", "finite"),
        ({"threshold": 0.6}, "threshold", "at most 0.5"),
        ({"metric": "grm"}, "output", "metric must be 'king'"),
        ({"metric": "king", "block": 6}, "block", "multiple of 4"),
        ({"metric": "king", "output": "square", "block": 8}, "block", "is for pairs output"),
        ({"metric": "king", "output": "matrix"}, "output", "unknown output"),
        ({"metric": "king", "bfile": DATA / "hm3_small.vcf.gz"}, "bfile", "PLINK 1 .bed"),
        ({"keep": ["NA06989"]}, "keep", "1 sample: comparing pairs needs at least 2"),
    ],
)
def test_bad_pairs_submissions_are_refused_and_record_nothing(
    sessions: sessionmaker[Session], tmp_path: Path, options: dict, field: str, fragment: str
) -> None:
    request = {"bfile": RELATIVES, **options}
    submit = lambda: _submit(sessions, tmp_path, **request)  # noqa: E731
    assert_refused(sessions, GenomeJob, submit, field, fragment)


@pytest.mark.parametrize(("side", "output"), [("bfile", "pairs"), ("query", "square")])
def test_a_sample_id_longer_than_a_pair_stores_is_refused_at_submission(
    sessions: sessionmaker[Session], tmp_path: Path, side: str, output: str
) -> None:
    """A 150-character IID (plink2 takes it): on PostgreSQL the tile's pairs were refused
    (varchar(100)), a traceback in the CLI and a job left running. Refused by its place."""
    whole = genome.read_bed(RELATIVES)
    long_iid = ["S" * 150, *whole.iid[1:]]
    _write_bed(tmp_path / "long", whole, range(96), iid=long_iid)
    request = {"bfile": tmp_path / "long"} if side == "bfile" else {
        "bfile": RELATIVES, "query": tmp_path / "long"}  # fmt: skip
    submit = lambda: _submit(sessions, tmp_path, output=output, **request)  # noqa: E731
    assert_refused(sessions, GenomeJob, submit, side, "sample 1 has an FID or IID longer than 100")


@pytest.mark.parametrize(("side", "output"), [("bfile", "pairs"), ("query", "square")])
def test_a_sample_listed_twice_is_refused_as_plink2_refuses_it(
    sessions: sessionmaker[Session], tmp_path: Path, side: str, output: str
) -> None:
    """Two .fam lines with the same FID and IID: current plink2 stops ("Duplicate sample ID";
    v2.00a3.5 did not); the job ran and wrote pairs that could not be told apart. Refused by
    place, naming no id."""
    whole = genome.read_bed(RELATIVES)
    iid = [*whole.iid[:5], whole.iid[2], *whole.iid[6:]]
    fid = [*whole.fid[:5], whole.fid[2], *whole.fid[6:]]
    _write_bed(tmp_path / "twice", whole, range(96), iid=iid, fid=fid)
    request = {"bfile": tmp_path / "twice"} if side == "bfile" else {
        "bfile": RELATIVES, "query": tmp_path / "twice"}  # fmt: skip
    submit = lambda: _submit(sessions, tmp_path, output=output, **request)  # noqa: E731
    with pytest.raises(tasks.SubmissionError, match="samples 3 and 6 have the same FID") as refused:
        submit()
    assert refused.value.field == side and whole.iid[2] not in str(refused.value)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(GenomeJob)) == 0


@pytest.mark.parametrize("output", ["pairs", "square"])
@pytest.mark.parametrize(
    ("name", "fragment"),
    [("one", "1 sample: comparing pairs needs"), ("none", "none: no variants to compare")],
)
def test_one_sample_or_no_variants_is_refused_as_plink2_refuses_it(
    sessions: sessionmaker[Session], tmp_path: Path, output: str, name: str, fragment: str
) -> None:
    """Both ran to 'done' with no pair; plink2 stops: "--make-king-table requires at least 2
    samples", and an empty .bim is no fileset for it."""
    whole = genome.read_bed(RELATIVES)
    _write_bed(tmp_path / "one", whole, range(1))
    (tmp_path / "none.bed").write_bytes(b"\x6c\x1b\x01")
    (tmp_path / "none.bim").write_text("")
    (tmp_path / "none.fam").write_text((tmp_path / "one.fam").read_text())
    submit = lambda: _submit(sessions, tmp_path, bfile=tmp_path / name, output=output)  # noqa: E731
    assert_refused(sessions, GenomeJob, submit, "bfile", fragment)


@pytest.mark.parametrize("output", ["pairs", "square"])
def test_a_min_maf_that_leaves_no_variant_fails_the_job_as_plink2_stops(
    sessions: sessionmaker[Session], tmp_path: Path, output: str
) -> None:
    """plink2 stops where --maf leaves no variant ("No variants remaining"). Over none, every
    pair's kinship is 0/0, NaN, which the pairs job keeps as plink2's filter keeps it: it would
    store N²/2 pairs of nothing. The job fails with the reason instead."""
    from bed_reader import to_bed

    x = np.zeros((6, 40))
    x[:, ::2] = 2.0
    to_bed(tmp_path / "flat.bed", x)
    job = _submit(sessions, tmp_path, bfile=tmp_path / "flat", output=output, min_maf=0.01)
    summary = tasks.run_inline(sessions, job_id=job["id"], device="cpu")
    assert summary["status"] == "failed"
    assert "min_maf 0.01 leaves no variant" in summary["error"]
    assert summary["outputs"] == [] and summary["degree_counts"]["unknown"] == 0


def test_a_tile_that_cannot_read_its_blocks_fails_the_job_with_a_reason(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A .bed truncated after submission: the job fails naming the tile; no pairs, no .kin0."""
    for ext in (".bed", ".bim", ".fam"):
        shutil.copy(RELATIVES.with_suffix(ext), tmp_path / f"cohort{ext}")
    job = _submit(sessions, tmp_path / "store", bfile=tmp_path / "cohort", block=48)
    bed = tmp_path / "cohort.bed"
    bed.write_bytes(bed.read_bytes()[:1000])
    summary = tasks.run_inline(sessions, job_id=job["id"], device="cpu")
    assert summary["status"] == "failed"
    assert "tile 0 (rows 0:48, cols 0:48)" in summary["error"]
    assert summary["outputs"] == []


def test_a_100000_sample_job_is_thousands_of_tiles_each_holding_only_its_blocks(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """100,000 samples (16 variants, so the fileset is small): 4,851 tiles of 1,024, progress
    counted tile by tile, and a tile's traced allocations are its blocks', not the cohort's."""
    import tracemalloc

    n, m = 100_000, 16
    rng = np.random.default_rng(5)
    body = rng.integers(0, 256, size=(m, n // 4), dtype=np.uint8)
    prefix = tmp_path / "biobank"
    prefix.with_suffix(".bed").write_bytes(b"\x6c\x1b\x01" + body.tobytes())
    prefix.with_suffix(".fam").write_text("".join(f"S{i} S{i} 0 0 0 -9\n" for i in range(n)))
    prefix.with_suffix(".bim").write_text("".join(f"1 v{j} 0 {j + 1} A G\n" for j in range(m)))
    job = _submit(sessions, tmp_path / "store", bfile=prefix, block=1024, threshold=0.5)
    assert job["tiles_total"] == 98 * 99 // 2 == 4851
    tasks.pair_inputs(_spec(sessions, job["id"]))  # the worker's one pass: split and sample ids
    tracemalloc.start()
    try:
        for index in (0, 1, 4850):
            tracemalloc.reset_peak()
            assert tasks.run_tile(sessions, job_id=job["id"], index=index, device="cpu") == (
                "tile done"
            )
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 16 * 2**20  # the 100,000² square would be 80 GB; a 1,024² tile 8 MB
    finally:
        tracemalloc.stop()
    summary = tasks.describe_id(sessions, job["id"])
    assert (summary["tiles_done"], summary["status"]) == (3, "running")


def _spec(sessions: sessionmaker[Session], job_id: int) -> dict:
    with session_scope(sessions) as s:
        job = jobs.get_job(s, job_id=job_id)
        assert job is not None
        return dict(job.spec)


@pytest.mark.parametrize(
    ("panel", "golden"),
    [
        ("HM3_thinned_autosomal_overlap", "hm3_full_0.0442.kin0"),
        ("1kg.ref.phase1_release_v3.20101123_thinned_autosomal_overlap", "1kg_full_0.0442.kin0"),
    ],
)
def test_pairs_jobs_on_the_whole_real_panels_write_plink2s_kin0(
    pg_sessions: sessionmaker[Session], tmp_path: Path, panel: str, golden: str
) -> None:
    """HapMap3 (957) and 1000 Genomes (1,092) x 14,079 SNPs in blocks of 128 (36 and 45 tiles):
    plink2 --make-king-table --king-table-filter 0.0442, byte for byte."""
    prefix = require_shared(SHARED_DIR / "data" / "genotypes" / f"{panel}.bed").with_suffix("")
    job = _submit(pg_sessions, tmp_path, bfile=prefix, threshold=0.0442, block=128)
    summary = _run(pg_sessions, job)
    assert Path(summary["outputs"][0]).read_text() == (DATA / golden).read_text()
