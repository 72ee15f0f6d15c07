"""POST/GET /v1/genome-comparisons on the real PostgreSQL and Redis: jobs queued as tile messages,
bad input refused with the field named and nothing written, other tenants' jobs invisible."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.tables import GenomeJob
from tests.helpers import post_job, queued_tile_messages, tenant_headers
from worker.queues import GENOME_QUEUE
from worker.tasks import genome as tasks

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "genome"
MULTIALLELIC_VCF = (
    "##fileformat=VCFv4.2\n##contig=<ID=1>\n"
    '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">\n'
    "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\ts1\ts2\n"
    "1\t100\trs1\tA\tG\t.\t.\t.\tGT\t0/1\t1/1\n"
    "1\t200\trs2\tC\tT,G\t.\t.\t.\tGT\t0/2\t1/1\n"
)


@pytest.fixture
def genotypes(tmp_path: Path) -> Path:
    """The server's genotype folder: the real HapMap3 slice, and it with constructed relatives."""
    from tests.worker.test_genome_jobs import write_cohort_with_relatives
    from tests.worker.test_genome_pairs_jobs import write_cohort_with_holes

    folder = tmp_path / "genotypes"
    folder.mkdir()
    for ext in (".bed", ".bim", ".fam"):
        (folder / f"hm3_small{ext}").write_bytes((DATA / f"hm3_small{ext}").read_bytes())
        (folder / f"hm3_relatives{ext}").write_bytes((DATA / f"hm3_relatives{ext}").read_bytes())
    write_cohort_with_relatives(folder)
    write_cohort_with_holes(folder)
    (folder / "hm3_small.vcf.gz").write_bytes((DATA / "hm3_small.vcf.gz").read_bytes())
    (folder / "multi.vcf").write_text(MULTIALLELIC_VCF)
    for ext in (".pgen", ".pvar", ".psam"):  # a PLINK 2 fileset, which is not read
        (folder / f"plink2{ext}").write_bytes(b"")
    return folder


@pytest.fixture
def api_settings(genotypes: Path) -> dict[str, object]:
    return {"genotype_dir": genotypes}


def _submit(api: TestClient, sessions: sessionmaker[Session], body: dict) -> tuple[dict, dict]:
    """A new biobank tenant's headers, and the job it submitted (accepted)."""
    headers = tenant_headers(sessions, "biobank")
    return headers, post_job(api, headers, "/v1/genome-comparisons", body)


def test_a_job_is_recorded_then_one_message_per_tile_is_queued(
    api: TestClient, pg_sessions: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    headers, job = _submit(
        api, pg_sessions, {"metric": "king", "bfile": "hm3_small", "tile_rows": 25}
    )
    assert (job["n_samples"], job["n_rows"], job["n_variants"]) == (60, 60, 2000)
    assert (job["tiles_total"], job["tiles_done"], job["status"]) == (3, 0, "queued")
    assert sorted(queued_tile_messages(redis_client, GENOME_QUEUE)) == [
        [job["id"], i] for i in range(3)
    ]
    # Progress and pairs are readable by the owner; another tenant sees nothing.
    assert (
        api.get(f"/v1/genome-comparisons/{job['id']}", headers=headers).json()["tiles_total"] == 3
    )
    other = tenant_headers(pg_sessions, "someone-else")
    for path in (
        f"/v1/genome-comparisons/{job['id']}",
        f"/v1/genome-comparisons/{job['id']}/pairs",
    ):
        assert api.get(path, headers=other).status_code == 404
    assert api.get(f"/v1/genome-comparisons/{job['id']}/pairs", headers=headers).json() == {
        "items": [],
        "next_cursor": None,
    }


def test_pairs_are_served_with_their_degree_once_the_tiles_ran(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    headers, job = _submit(api, pg_sessions, {"metric": "king", "bfile": "relatives"})
    tasks.run_inline(pg_sessions, job_id=job["id"], device="cpu")
    body = api.get(
        f"/v1/genome-comparisons/{job['id']}/pairs", headers=headers, params={"min_kinship": 0.4}
    ).json()
    assert [(p["iid2"], p["degree"]) for p in body["items"]] == [("DUP3", "duplicate/MZ twin")]
    done = api.get(f"/v1/genome-comparisons/{job['id']}", headers=headers).json()
    assert done["status"] == "done"
    assert f"/v1/genome-comparisons/{job['id']}/files/king.king" in done["outputs"]
    king = api.get(f"/v1/genome-comparisons/{job['id']}/files/king.king", headers=headers)
    assert king.status_code == 200 and king.content.count(b"\n") == 62
    other = tenant_headers(pg_sessions, "elsewhere")
    assert (
        api.get(f"/v1/genome-comparisons/{job['id']}/files/king.king", headers=other).status_code
        == 404
    )
    missing = api.get(f"/v1/genome-comparisons/{job['id']}/files/..%2Fsecret", headers=headers)
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("body", "loc", "fragment"),
    [
        ({"metric": "kinship", "bfile": "hm3_small"}, ["body", "metric"], "Input should be"),
        ({"metric": "grm", "bfile": "../../../etc/passwd"}, ["body", "bfile"], "inside the server"),
        ({"metric": "grm", "bfile": "/etc/hosts"}, ["body", "bfile"], "inside the server"),
        (
            {"metric": "grm", "bfile": "nope"},
            ["body", "bfile"],
            "<bfile>.bed not found; names are relative to the server's genotype folder "
            "(MEDBATCH_GENOTYPE_DIR)",
        ),
        ({"metric": "king", "bfile": "plink2"}, ["body", "bfile"], "`plink2 --pfile PREFIX"),
        # A PLINK prefix given as vcf was read as one: "<vcf>.bed not found".
        ({"metric": "king", "vcf": "hm3_small"}, ["body", "vcf"], "must name a .vcf, .vcf.gz"),
        ({"metric": "king", "bfile": "plink2.pgen"}, ["body", "bfile"], "--make-bed --out"),
        ({"metric": "grm", "bfile": "hm3_small", "query": "nope"}, ["body", "query"], "not found"),
        ({"metric": "grm", "bfile": "hm3_small", "tile_rows": 0}, ["body", "tile_rows"], "greater"),
        ({"metric": "grm", "bfile": "hm3_small", "extra": 1}, ["body", "extra"], "Extra inputs"),
        ({"metric": "grm"}, ["body"], "exactly one of bfile and vcf"),
        (
            {"metric": "grm", "bfile": "hm3_small", "keep": ["NOPE"]},
            ["body", "keep"],
            "entry 1: no sample of the cohort has that IID",
        ),
        ({"metric": "grm", "bfile": "hm3_small", "min_maf": 0.7}, ["body", "min_maf"], "less"),
        ({"metric": "grm", "bfile": "hm3_small", "vcf": "x.vcf"}, ["body"], "exactly one"),
        ({"metric": "grm", "vcf": "multi.vcf"}, ["body", "vcf"], "is not biallelic"),
        ({"metric": "grm", "bfile": "hm3_small", "output": "pairs"}, ["body", "output"], "king"),
        ({"metric": "king", "bfile": "hm3_small", "output": "table"}, ["body", "output"], "Input"),
        (
            {"metric": "king", "vcf": "hm3_small.vcf.gz", "output": "pairs"},
            ["body", "vcf"],
            "PLINK 1 .bed",
        ),
        (
            {"metric": "king", "bfile": "hm3_small", "output": "pairs", "block": 6},
            ["body", "block"],
            "multiple of 4",
        ),
        (
            {"metric": "king", "bfile": "hm3_small", "block": 8},
            ["body", "block"],
            "is for pairs output",
        ),
    ],
)
def test_bad_submissions_are_422_naming_the_field_and_write_nothing(
    api: TestClient,
    pg_sessions: sessionmaker[Session],
    redis_client: redis.Redis,
    genotypes: Path,
    body: dict,
    loc: list[str],
    fragment: str,
) -> None:
    headers = tenant_headers(pg_sessions, "biobank")
    response = api.post("/v1/genome-comparisons", headers=headers, json=body)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == loc and fragment in error["msg"], error
    assert str(genotypes) not in response.text  # server paths are not disclosed
    assert "NOPE" not in response.text and "nope" not in response.text  # nor the caller's values
    with pg_sessions() as s:
        assert s.scalar(select(func.count()).select_from(GenomeJob)) == 0
    assert redis_client.llen(GENOME_QUEUE) == 0


def test_a_pairs_job_serves_plink2s_kin0_and_counts_per_degree(
    api: TestClient, pg_sessions: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    """ "output": "pairs": 2-D tile messages, then only the .kin0 and the degree summary."""
    headers, job = _submit(
        api, pg_sessions,
        {"metric": "king", "bfile": "hm3_relatives", "output": "pairs", "block": 32,
         "threshold": 0.0442},
    )  # fmt: skip
    assert (job["output"], job["tiles_total"], job["n_samples"]) == ("pairs", 6, 96)
    assert sorted(queued_tile_messages(redis_client, GENOME_QUEUE)) == [
        [job["id"], i] for i in range(6)
    ]
    tasks.run_inline(pg_sessions, job_id=job["id"], device="cpu")
    done = api.get(f"/v1/genome-comparisons/{job['id']}", headers=headers).json()
    assert done["status"] == "done"
    assert done["degree_counts"] == {
        "duplicate/MZ twin": 4, "1st": 36, "2nd": 20, "3rd": 4, "unrelated": 0, "unknown": 0,
    }  # fmt: skip
    assert done["outputs"] == [f"/v1/genome-comparisons/{job['id']}/files/king.kin0"]
    kin0 = api.get(done["outputs"][0], headers=headers)
    assert kin0.content == (DATA / "hm3_relatives_0.0442.kin0").read_bytes()
    pairs = api.get(
        f"/v1/genome-comparisons/{job['id']}/pairs", headers=headers, params={"min_kinship": 0.4}
    ).json()["items"]
    assert sorted(p["degree"] for p in pairs) == ["duplicate/MZ twin"] * 4


def test_pairs_whose_kinship_is_nan_are_served_with_a_null_kinship(
    api: TestClient, pg_sessions: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    """A pairs job keeps plink2's "nan" pairs (no variant called in both samples): the pairs
    page serves them with kinship null and degree "unknown" (a float field made it a 500)."""
    headers, job = _submit(
        api, pg_sessions, {"metric": "king", "bfile": "holes", "output": "pairs", "block": 48}
    )
    tasks.run_inline(pg_sessions, job_id=job["id"], device="cpu")
    done = api.get(f"/v1/genome-comparisons/{job['id']}", headers=headers).json()
    assert (done["status"], done["degree_counts"]["unknown"]) == ("done", 96)
    found = api.get(
        f"/v1/genome-comparisons/{job['id']}/pairs", headers=headers, params={"limit": 1000}
    )
    assert found.status_code == 200, found.text
    unknown = [p for p in found.json()["items"] if p["degree"] == "unknown"]
    assert len(unknown) == 96 and {p["kinship"] for p in unknown} == {None}


def test_a_vcf_job_is_accepted_like_its_plink_fileset(
    api: TestClient, pg_sessions: sessionmaker[Session]
) -> None:
    _, job = _submit(api, pg_sessions, {"metric": "grm", "vcf": "hm3_small.vcf.gz"})
    assert (job["n_samples"], job["n_variants"]) == (60, 2000)
    summary = tasks.run_inline(pg_sessions, job_id=job["id"], device="cpu")
    assert summary["status"] == "done"
    rel = next(Path(p) for p in summary["outputs"] if p.endswith(".rel"))
    assert rel.read_bytes() == (DATA / "hm3_small.rel").read_bytes()


def test_genome_routes_need_a_key(api: TestClient) -> None:
    assert api.post("/v1/genome-comparisons", json={}).status_code == 401
    assert api.get("/v1/genome-comparisons/1").status_code == 401


def test_keep_takes_fid_iid_pairs_as_its_refusal_advises(
    api: TestClient, pg_sessions: sessionmaker[Session], genotypes: Path
) -> None:
    """An IID not unique in the cohort is refused with "give [FID, IID]"; that form is taken, and
    it keeps the one sample it names (as plink --keep's two columns)."""
    fam = (genotypes / "hm3_small.fam").read_text().splitlines()
    first = fam[0].split()
    clash = fam[1].split()
    fam[1] = "\t".join(["OTHER", first[1], *clash[2:]])  # a second family's sample, same IID
    (genotypes / "hm3_small.fam").write_text("\n".join(fam) + "\n")
    headers = tenant_headers(pg_sessions, "biobank")
    body = {"metric": "king", "bfile": "hm3_small", "output": "pairs"}
    refused = api.post("/v1/genome-comparisons", headers=headers, json={**body, "keep": [first[1]]})
    assert refused.status_code == 422 and "give [FID, IID]" in refused.text
    pairs = [[first[0], first[1]], ["OTHER", first[1]], fam[2].split()[:2]]
    job = post_job(api, headers, "/v1/genome-comparisons", {**body, "keep": pairs})
    assert job["n_samples"] == 3


def test_a_failed_jobs_error_names_no_server_path(
    api: TestClient, pg_sessions: sessionmaker[Session], genotypes: Path
) -> None:
    """A tile's error names the files it read; over HTTP they are written as the folder, never
    where the server keeps them (docs/security.md: error bodies hold no server paths)."""
    headers, job = _submit(
        api, pg_sessions, {"metric": "king", "bfile": "hm3_small", "tile_rows": 25}
    )
    bed = genotypes.resolve() / "hm3_small.bed"
    with pg_sessions.begin() as session:
        row = session.get(GenomeJob, job["id"])
        assert row is not None
        row.status = "failed"  # type: ignore[assignment]
        row.error = f"tile 0 (rows 0:25): ValueError: {bed}: 10 bytes, expected 30003"
    error = api.get(f"/v1/genome-comparisons/{job['id']}", headers=headers).json()["error"]
    assert str(genotypes.resolve()) not in error, error
    assert (
        error
        == "tile 0 (rows 0:25): ValueError: <genotype folder>/hm3_small.bed: 10 bytes, expected 30003"
    )
