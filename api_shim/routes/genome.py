"""Genome comparisons over HTTP: submit a job, follow its tiles, read its related pairs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from api_shim import deps
from api_shim.deps import TEXT
from api_shim.paths import public_message
from api_shim.routes import tiled
from db import genome as jobs
from db.tables import GenomeJob

if TYPE_CHECKING:
    from worker.tiled import SubmissionError

router = APIRouter(prefix="/v1", tags=["genome"])

_WHAT = "genome comparison"
OwnedJob = Annotated[GenomeJob, Depends(tiled.owned(GenomeJob, _WHAT))]
Submission = Annotated[tiled.Submission, Depends(tiled.submission("genome:submit"))]

#: KING kinship of third-degree relatives: 2^(-9/2) (Manichaikul et al. 2010).
THIRD_DEGREE = 2.0**-4.5


#: A sample's FID or IID.
SampleName = Annotated[str, Field(min_length=1, max_length=200, pattern=TEXT)]


class GenomeComparisonCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            **deps.exactly_one("bfile", "vcf"),
            "examples": [{"metric": "king", "bfile": "cohort"}],
        },
    )

    metric: Literal["grm", "king", "ibs", "dot"]
    #: A PLINK 1 fileset prefix, relative to the server's genotype folder ...
    bfile: str | None = Field(default=None, min_length=1, max_length=500, pattern=TEXT)
    #: ... or a VCF/BCF file there (give exactly one of the two).
    vcf: str | None = Field(default=None, min_length=1, max_length=500, pattern=TEXT)
    #: Query samples (a fileset prefix or VCF, same variants) to compare against the cohort only.
    query: str | None = Field(default=None, min_length=1, max_length=500, pattern=TEXT)
    #: KING kinship above which pairs are recorded (default: third degree or closer).
    threshold: float = Field(default=THIRD_DEGREE, ge=-1.0, le=1.0)
    ibs_missing: Literal["frequency", "flat"] = "frequency"
    tile_rows: int | None = Field(default=None, ge=1, le=1_000_000)
    #: Samples of the cohort to keep, as ``plink --keep``: IIDs, or [FID, IID] pairs (for an IID
    #: that is not unique in the cohort).
    keep: list[SampleName | tuple[SampleName, SampleName]] | None = Field(
        default=None, min_length=1, max_length=1_000_000
    )
    #: Drop variants whose minor allele frequency in the kept samples is lower, as ``plink --maf``.
    min_maf: float | None = Field(default=None, ge=0.0, le=0.5)
    #: ``square``: the matrix (and, for KING, its related pairs); ``pairs`` (KING, PLINK 1
    #: filesets): only the pairs with kinship ≥ ``threshold`` (plink2 --make-king-table
    #: --king-table-filter), in 2-D tiles, never an N x N matrix.
    output: Literal["square", "pairs"] = "square"
    #: Pairs output: samples per side of a tile (default: 2,048, fewer for many variants).
    block: int | None = Field(default=None, ge=4, le=65_536, multiple_of=4)


class GenomeComparisonPublic(tiled.TiledJobPublic):
    metric: str
    output: str
    n_samples: int
    n_rows: int
    n_variants: int
    query: bool
    threshold: float | None
    #: KING jobs: pairs found so far per degree (duplicate/MZ twin, 1st, 2nd, 3rd, unrelated).
    degree_counts: dict[str, int] | None
    #: Output files once done, as download paths under this job (no server paths).
    outputs: list[str]


class PairPublic(BaseModel):
    fid1: str
    iid1: str
    fid2: str
    iid2: str
    #: None where the kinship is NaN (degree "unknown": no heterozygous call to judge by).
    kinship: float | None
    degree: str


class PairsPublic(BaseModel):
    items: list[PairPublic]
    next_cursor: int | None


_PAIRS = tiled.Results(GenomeJob, _WHAT, jobs.list_pairs, PairPublic)


@tiled.submit_route(router, "/genome-comparisons", GenomeComparisonPublic)
def create_genome_comparison(body: GenomeComparisonCreate, job: Submission) -> dict[str, Any]:
    """Check the filesets, record the job with its tiles, and queue one task per tile."""
    from models.genome.io.vcf import VCF_SUFFIXES, is_vcf
    from worker.jobs.genome import submit

    if (body.bfile is None) == (body.vcf is None):
        raise tiled.refused(("body",), "give exactly one of bfile and vcf")
    field = "bfile" if body.bfile is not None else "vcf"
    given = {field: body.bfile or body.vcf or "", "query": body.query}
    paths = tiled.confine_inputs(job.settings.genotype_dir, given, kind="genotypes")
    if body.vcf is not None and not is_vcf(body.vcf):
        # Checked after the path (a name outside the folder is refused as such). It was read
        # as a PLINK prefix: "<vcf>.bed not found".
        kinds = f"{', '.join(VCF_SUFFIXES[:-1])} or {VCF_SUFFIXES[-1]}"
        raise tiled.refused(
            ("body", "vcf"), f"must name a {kinds} file (a PLINK fileset goes to bfile)"
        )
    return _public(
        job.submitter.submit(
            submit,
            lambda exc: _refused(exc, field, job.settings.genotype_dir, given),
            metric=body.metric,
            bfile=paths[field],
            query=paths["query"],
            threshold=body.threshold,
            ibs_missing=body.ibs_missing,
            tile_rows=body.tile_rows or job.settings.genome_tile_rows,
            keep=list(body.keep) if body.keep is not None else None,  # str or (FID, IID)
            min_maf=body.min_maf,
            output=body.output,
            block=body.block or 0,
        )
    )


def _refused(
    exc: SubmissionError, source: str, root: Path, given: dict[str, str | None]
) -> RequestValidationError:
    """A refusal in words that hold neither a server path nor the caller's values (``source``:
    the body's field of the cohort, bfile or vcf)."""
    loc = source if exc.field == "bfile" else exc.field
    # A refused ``keep`` names its entry by place, never by value (models.genome.cohort).
    message = public_message(str(exc), root, given, kind="genotypes")
    return tiled.refused(("body", loc), message)


@tiled.read_route(router, "/genome-comparisons/{job_id}", GenomeComparisonPublic)
def read_genome_comparison(
    job: OwnedJob, celery: deps.CeleryDep, settings: deps.SettingsDep
) -> dict[str, Any]:
    """A job's status and progress (tiles done of total); its output files once done."""
    from worker.jobs.genome import GENOME

    return _public(tiled.described(job, GENOME, celery, settings))


def _public(job: dict[str, Any]) -> dict[str, Any]:
    """A job as clients see it: outputs as download paths, not where the server keeps them."""
    names = [Path(p).name for p in job["outputs"]]
    base = f"/v1/genome-comparisons/{job['id']}"
    plots = [f"{base}/plots/kinship.png"] if any(n.endswith(".kin0") for n in names) else []
    return {**job, "outputs": [f"{base}/files/{n}" for n in names], "plots": plots}


@router.get("/genome-comparisons/{job_id}/files/{name}", responses={404: {}})
def download_output(job: OwnedJob, name: str) -> FileResponse:
    """One output file of a finished job (``.rel``, ``.king.id``, ``.kin0``, ``.npy``, ...)."""
    from worker.jobs.genome import describe

    files = {Path(p).name: Path(p) for p in describe(job)["outputs"]}
    if name not in files:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no such output (outputs: {', '.join(sorted(files))})"
        )
    return FileResponse(files[name], filename=name, media_type="application/octet-stream")


@tiled.read_route(router, "/genome-comparisons/{job_id}/pairs", PairsPublic)
def list_related_pairs(
    read: tiled.JobReaderDep,
    min_kinship: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
    cursor: deps.CursorQuery = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> PairsPublic:
    """Related pairs (KING jobs) above ``min_kinship``, with their inferred degree."""
    return PairsPublic(**read.page(_PAIRS, cursor, limit, min_kinship=min_kinship))
