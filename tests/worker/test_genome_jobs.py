"""Genome-comparison jobs on the real databases: tiles computed and counted once, outputs equal to
the untiled matrix, related pairs with their degree, and bad inputs that leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import genome as jobs
from db.engine import session_scope
from db.tables import GenomeJob, JobTile, RelatedPair
from models.genome import api as genome
from tests.helpers import assert_refused, new_tenant
from worker.tasks import genome as tasks

pytestmark = pytest.mark.integration

SMALL = Path(__file__).resolve().parents[1] / "data" / "genome" / "hm3_small"


def write_cohort_with_relatives(folder: Path) -> tuple[Path, genome.Genotypes]:
    """hm3_small (60 real HapMap3 samples) plus a duplicate of sample 3 (two calls discordant)
    and a child of samples 10 and 20 (one allele from each at every variant)."""
    from bed_reader import to_bed

    cohort = genome.read_bed(SMALL)
    x = cohort.dosages.astype(np.float64)
    x[x < 0] = np.nan
    rng = np.random.default_rng(7)
    duplicate = x[3].copy()
    duplicate[[100, 900]] = np.where(duplicate[[100, 900]] == 2, 1, 2)

    def transmit(parent: np.ndarray) -> np.ndarray:
        allele = (rng.random(parent.shape) < parent / 2).astype(float)
        return np.where(np.isnan(parent), np.nan, allele)

    child = transmit(x[10]) + transmit(x[20])
    values = np.vstack([x, duplicate, child])
    prefix = folder / "relatives"
    iid = [*cohort.iid, "DUP3", "CHILD"]
    to_bed(
        prefix.with_suffix(".bed"),
        values,
        properties={
            "fid": [*cohort.fid, "F3", "F10"],
            "iid": iid,
            "sid": list(cohort.variant_id),
            "allele_1": list(cohort.a1),
            "allele_2": list(cohort.a2),
        },
    )
    return prefix, genome.read_bed(prefix)


def _tenant(sessions: sessionmaker[Session]) -> int:
    return new_tenant(sessions, "biobank")


def assert_same_matrix(got: np.ndarray, expected: np.ndarray, metric: str) -> None:
    """Counting metrics are exact integers divided the same way: identical bits. The GRM's
    float64 products are summed by BLAS in an order that depends on the block's shape (MKL's
    AVX2 kernels differ between a 7-row tile and the 512-row triangle blocks): equal to 1e-14."""
    if metric == "grm":
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-14)
    else:
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("metric", ["grm", "king", "ibs", "dot"])
def test_tiled_job_equals_the_untiled_matrix(
    sessions: sessionmaker[Session], tmp_path: Path, metric: str
) -> None:
    """Tiles of 7 rows (not a divisor of 60) reassemble to pairwise() of the whole cohort."""
    job = tasks.submit(
        sessions,
        None,
        tenant_id=_tenant(sessions),
        metric=metric,
        bfile=SMALL,
        tile_rows=7,
        artifact_dir=tmp_path,
    )
    assert job["tiles_total"] == 9 and job["status"] == "queued"
    summary = tasks.run_inline(sessions, job_id=job["id"], device="cpu")
    assert summary["status"] == "done" and summary["tiles_done"] == 9
    x = genome.read_bed(SMALL).dosages
    expected = genome.pairwise(
        x, metric=metric, frequencies=genome.allele_frequencies(x), device="cpu"
    )
    prefix = Path(summary["outputs"][0]).parent / metric
    got = np.vstack([np.load(tasks.tile_path(str(prefix), i)) for i in range(9)])
    assert_same_matrix(got, expected, metric)
    assert summary["outputs"]  # PLINK-format files written


def test_king_job_finds_the_constructed_relatives_with_their_degree(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    prefix, cohort = write_cohort_with_relatives(tmp_path)
    job = tasks.submit(
        sessions,
        None,
        tenant_id=_tenant(sessions),
        metric="king",
        bfile=prefix,
        tile_rows=16,
        artifact_dir=tmp_path / "store",
    )
    assert tasks.run_inline(sessions, job_id=job["id"], device="cpu")["status"] == "done"
    with session_scope(sessions) as s:
        pairs = {(p.iid1, p.iid2): p.degree for p in jobs.list_pairs(s, job_id=job["id"])}
    assert pairs[(cohort.iid[3], "DUP3")] == "duplicate/MZ twin"
    assert pairs[(cohort.iid[10], "CHILD")] == "1st"
    assert pairs[(cohort.iid[20], "CHILD")] == "1st"
    # Among the real HapMap3 founders, exactly the pairs PLINK's own KING (the golden) puts at
    # third degree or closer.
    plink = np.loadtxt(f"{SMALL}.king")
    close = {
        (cohort.iid[i], cohort.iid[j])
        for i in range(60)
        for j in range(i + 1, 60)
        if plink[i, j] > 2**-4.5
    }
    founders = set(cohort.iid[:60])
    assert {p for p in pairs if set(p) <= founders} == close


def test_a_tile_delivered_twice_is_counted_once(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job = tasks.submit(
        sessions, None, tenant_id=_tenant(sessions), metric="king", bfile=SMALL,
        tile_rows=30, artifact_dir=tmp_path,
    )  # fmt: skip
    assert tasks.run_tile(sessions, job_id=job["id"], index=0, device="cpu") == "tile done"
    assert tasks.run_tile(sessions, job_id=job["id"], index=0, device="cpu") == "already done"
    assert tasks.run_tile(sessions, job_id=job["id"], index=1, device="cpu") == "finished job"
    with sessions() as s:
        assert s.get(GenomeJob, job["id"]).tiles_done == 2  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda p: p.with_suffix(".fam").unlink(), "not found"),
        (lambda p: p.with_suffix(".bed").write_bytes(b"\x00\x00\x01" + b"\x00" * 20), "magic"),
        (
            lambda p: p.with_suffix(".bed").write_bytes(p.with_suffix(".bed").read_bytes()[:-5]),
            "truncated",
        ),
    ],
)
def test_bad_filesets_are_refused_and_leave_no_job(
    sessions: sessionmaker[Session], tmp_path: Path, damage, fragment: str
) -> None:  # type: ignore[no-untyped-def]
    prefix = tmp_path / "bad"
    for ext in (".bed", ".bim", ".fam"):
        prefix.with_suffix(ext).write_bytes(SMALL.with_suffix(ext).read_bytes())
    damage(prefix)
    tenant = _tenant(sessions)
    submit = lambda: tasks.submit(  # noqa: E731
        sessions, None, tenant_id=tenant, metric="grm", bfile=prefix, artifact_dir=tmp_path
    )
    assert_refused(sessions, GenomeJob, submit, "bfile", fragment)


def test_a_fileset_that_breaks_after_submission_fails_the_job_not_done(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The job says why and is never marked done with a half-written result."""
    prefix = tmp_path / "later"
    for ext in (".bed", ".bim", ".fam"):
        prefix.with_suffix(ext).write_bytes(SMALL.with_suffix(ext).read_bytes())
    job = tasks.submit(
        sessions, None, tenant_id=_tenant(sessions), metric="grm", bfile=prefix,
        tile_rows=20, artifact_dir=tmp_path / "store",
    )  # fmt: skip
    prefix.with_suffix(".bed").write_bytes(prefix.with_suffix(".bed").read_bytes()[:-5])
    summary = tasks.run_inline(sessions, job_id=job["id"], device="cpu")
    assert summary["status"] == "failed" and "truncated" in summary["error"]
    assert summary["outputs"] == []
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(RelatedPair)) == 0
        statuses = set(s.scalars(select(JobTile.status)))
    assert "done" not in statuses


def test_query_samples_against_the_cohort_give_a_block_of_the_matrix(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The everyday question: is this new patient a duplicate or relative of anyone we have?"""
    from bed_reader import to_bed

    _, cohort = write_cohort_with_relatives(tmp_path)
    new = tmp_path / "new"
    x = cohort.dosages.astype(np.float64)
    x[x < 0] = np.nan
    to_bed(
        new.with_suffix(".bed"),
        x[[60, 61]],
        properties={
            "fid": ["F3", "F10"],
            "iid": ["DUP3", "CHILD"],
            "sid": list(cohort.variant_id),
            "allele_1": list(cohort.a1),
            "allele_2": list(cohort.a2),
        },
    )
    job = tasks.submit(
        sessions, None, tenant_id=_tenant(sessions), metric="king", bfile=SMALL, query=new,
        artifact_dir=tmp_path / "store",
    )  # fmt: skip
    assert (job["n_rows"], job["n_samples"], job["query"]) == (2, 60, True)
    assert tasks.run_inline(sessions, job_id=job["id"], device="cpu")["status"] == "done"
    with session_scope(sessions) as s:
        pairs = {(p.iid1, p.iid2): p.degree for p in jobs.list_pairs(s, job_id=job["id"])}
    assert pairs[("DUP3", cohort.iid[3])] == "duplicate/MZ twin"
    assert pairs[("CHILD", cohort.iid[10])] == "1st"


@pytest.mark.parametrize("source", ["bed", "vcf"])
def test_keep_and_min_maf_select_like_plink(
    sessions: sessionmaker[Session], tmp_path: Path, source: str
) -> None:
    """--keep and --min-maf on a job equal read_bed's own keep/min_maf (plink --keep --maf)."""
    all_iids = genome.read_bed(SMALL).iid
    keep = [all_iids[i] for i in range(0, 60, 2)]
    bfile = SMALL if source == "bed" else SMALL.with_name("hm3_small.vcf.gz")
    job = tasks.submit(
        sessions, None, tenant_id=_tenant(sessions), metric="grm", bfile=bfile, keep=keep,
        min_maf=0.2, tile_rows=11, artifact_dir=tmp_path,
    )  # fmt: skip
    assert (job["n_samples"], job["n_rows"], job["tiles_total"]) == (30, 30, 3)
    summary = tasks.run_inline(sessions, job_id=job["id"], device="cpu")
    assert summary["status"] == "done", summary["error"]
    expected_input = genome.read_bed(SMALL, keep=keep, min_maf=0.2)
    assert 0 < expected_input.n_variants < 2000
    # Submitted over the fileset's 2,000; done, over the variants used.
    assert job["n_variants"] == 2000
    assert summary["n_variants"] == expected_input.n_variants
    x = expected_input.dosages
    expected = genome.pairwise(x, metric="grm", frequencies=genome.allele_frequencies(x))
    npy = next(p for p in summary["outputs"] if p.endswith(".npy"))
    assert_same_matrix(np.load(npy), expected, "grm")


def test_unknown_keep_ids_and_bad_min_maf_are_refused(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    tenant_id = _tenant(sessions)
    first = SMALL.with_suffix(".fam").read_text().split()[:2]
    for keep, fragment in [
        (["NOPE"], "entry 1: no sample of the cohort has that IID"),
        ([first[1], ("NOPE", first[1])], "entry 2: no sample of the cohort has that FID and IID"),
    ]:
        with pytest.raises(tasks.SubmissionError, match=fragment) as e:
            tasks.submit(
                sessions, None, tenant_id=tenant_id, metric="king", bfile=SMALL,
                keep=keep, artifact_dir=tmp_path,
            )  # fmt: skip
        assert e.value.field == "keep"
        assert "NOPE" not in str(e.value)  # a sample id may be a patient identifier
    with pytest.raises(tasks.SubmissionError, match=r"between 0 and 0\.5") as e:
        tasks.submit(
            sessions, None, tenant_id=tenant_id, metric="king", bfile=SMALL,
            min_maf=0.7, artifact_dir=tmp_path,
        )  # fmt: skip
    assert e.value.field == "min_maf"


def test_a_keep_entry_naming_a_sample_the_fam_lists_twice_is_refused(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A .fam listing one FID and IID twice: plink2 --keep stops ("Duplicate ID"), where the job
    kept one of the two rows, unsaid. Refused, naming the entry by its place only."""
    lines = SMALL.with_suffix(".fam").read_text().splitlines()
    fid, iid = lines[0].split()[:2]
    lines[1] = "\t".join([fid, iid, *lines[1].split()[2:]])
    prefix = tmp_path / "twice"
    for ext in (".bed", ".bim"):
        prefix.with_suffix(ext).write_bytes(SMALL.with_suffix(ext).read_bytes())
    prefix.with_suffix(".fam").write_text("\n".join(lines) + "\n")
    with pytest.raises(tasks.SubmissionError, match="entry 2: the cohort lists that FID") as e:
        tasks.submit(
            sessions, None, tenant_id=_tenant(sessions), metric="king", bfile=prefix,
            keep=[lines[2].split()[1], (fid, iid)], artifact_dir=tmp_path,
        )  # fmt: skip
    assert e.value.field == "keep" and iid not in str(e.value)


@pytest.mark.parametrize(
    ("panel", "golden"),
    [
        ("HM3_thinned_autosomal_overlap", "hm3_full_0.0442.kin0"),
        ("1kg.ref.phase1_release_v3.20101123_thinned_autosomal_overlap", "1kg_full_0.0442.kin0"),
    ],
)
def test_related_pairs_of_the_whole_real_panels_are_plinks(
    pg_sessions: sessionmaker[Session], tmp_path: Path, panel: str, golden: str
) -> None:
    """On all of HapMap3 (957) and 1000 Genomes (1,092) x 14,079 SNPs, the pairs at kinship
    ≥ 0.0442 are exactly plink2 --make-king-table's, and our .kin0 is its file byte for byte."""
    from tests.helpers import SHARED_DIR, require_shared

    prefix = require_shared(SHARED_DIR / "data" / "genotypes" / f"{panel}.bed").with_suffix("")
    job = tasks.submit(
        pg_sessions, None, tenant_id=_tenant(pg_sessions), metric="king", bfile=prefix,
        threshold=0.0442, artifact_dir=tmp_path,
    )  # fmt: skip
    summary = tasks.run_inline(pg_sessions, job_id=job["id"], device="cpu")
    assert summary["status"] == "done", summary["error"]
    expected = (Path(__file__).resolve().parents[1] / "data" / "genome" / golden).read_text()
    kin0 = next(Path(p) for p in summary["outputs"] if p.endswith(".kin0"))
    assert kin0.read_text() == expected
    with session_scope(pg_sessions) as s:
        assert len(jobs.list_pairs(s, job_id=job["id"], limit=10_000)) == expected.count("\n") - 1


@pytest.mark.parametrize(("metric", "golden"), [("grm", "rel"), ("ibs", "mibs")])
def test_grm_and_ibs_count_frequencies_over_founders_as_plink_does(
    sessions: sessionmaker[Session], tmp_path: Path, metric: str, golden: str
) -> None:
    """hm3_small with 10 samples given parents in the .fam: plink2 --make-rel and plink 1.9
    --distance ibs standardize with the 50 founders' allele frequencies, and so does the job."""
    data = SMALL.parent
    prefix = tmp_path / "pedigree"
    for ext in (".bed", ".bim"):
        prefix.with_suffix(ext).write_bytes(SMALL.with_suffix(ext).read_bytes())
    prefix.with_suffix(".fam").write_bytes((data / "hm3_pedigree.fam").read_bytes())
    job = tasks.submit(
        sessions, None, tenant_id=_tenant(sessions), metric=metric, bfile=prefix, tile_rows=25,
        artifact_dir=tmp_path / "artifacts",
    )  # fmt: skip
    summary = tasks.run_inline(sessions, job_id=job["id"], device="cpu")
    assert summary["status"] == "done", summary["error"]
    npy = next(p for p in summary["outputs"] if p.endswith(".npy"))
    expected = np.fromfile(data / f"hm3_pedigree.{golden}.bin", dtype="<f8").reshape(60, 60)
    np.testing.assert_allclose(np.load(npy), expected, rtol=1e-12, atol=1e-14)


def test_a_vcf_cohorts_id_files_and_kin0_have_no_fid_as_plink2_writes_them(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """plink2 --vcf --make-king / --make-rel write ``#IID`` and IIDs alone (a VCF has no FID) and
    a .kin0 without FID1/FID2; plink 1.9 --vcf --distance writes the IID as FID too."""
    iids = genome.read_bed(SMALL).iid
    lines: dict[str, list[str]] = {}
    tenant = _tenant(sessions)
    for metric in ("king", "grm", "ibs"):
        job = tasks.submit(
            sessions, None, tenant_id=tenant, metric=metric,
            bfile=SMALL.with_name("hm3_small.vcf.gz"), artifact_dir=tmp_path / metric,
        )  # fmt: skip
        summary = tasks.run_inline(sessions, job_id=job["id"], device="cpu")
        assert summary["status"] == "done", summary["error"]
        for path in summary["outputs"]:
            if path.endswith((".id", ".kin0")):
                lines[Path(path).name.split(".", 1)[1]] = Path(path).read_text().splitlines()
    assert lines["king.id"] == lines["rel.id"] == ["#IID", *iids]
    assert lines["mibs.id"] == [f"{i}\t{i}" for i in iids]
    assert lines["kin0"][0] == "#IID1\tIID2\tNSNP\tHETHET\tIBS0\tKINSHIP"
    assert len(lines["kin0"]) > 1 and all(len(ln.split("\t")) == 6 for ln in lines["kin0"])


def test_a_grm_job_names_a_variant_only_non_founders_carry_as_plink2_stops_on_it(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Samples 41-50 given parents: rs12031044's A1 is carried by no founder, only by them.
    plink2 --make-rel stops ("Zero-MAF variant is not actually monomorphic"); the job fails
    naming the variant's id, not a column number a user cannot look up."""
    lines = SMALL.with_suffix(".fam").read_text().splitlines()
    for k in range(40, 50):
        fields = lines[k].split()
        lines[k] = "\t".join([*fields[:2], "NA19916", "NA19835", *fields[4:]])
    prefix = tmp_path / "carriers"
    for ext in (".bed", ".bim"):
        prefix.with_suffix(ext).write_bytes(SMALL.with_suffix(ext).read_bytes())
    prefix.with_suffix(".fam").write_text("\n".join(lines) + "\n")
    job = tasks.submit(
        sessions, None, tenant_id=_tenant(sessions), metric="grm", bfile=prefix,
        artifact_dir=tmp_path / "artifacts",
    )  # fmt: skip
    summary = tasks.run_inline(sessions, job_id=job["id"], device="cpu")
    assert summary["status"] == "failed"
    assert "variant rs12031044: no founder carries one of its alleles" in summary["error"]
