"""Compound similarity over HTTP: submit a search, follow its tiles, read its neighbours."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from api_shim import deps
from api_shim.deps import TEXT, IdPath, ReaderDep, SessionDep
from api_shim.paths import public_message
from api_shim.routes import tiled
from db import compounds as jobs
from db.tables import CompoundJob

if TYPE_CHECKING:
    from worker.tiled import SubmissionError

router = APIRouter(prefix="/v1", tags=["compounds"])

_WHAT = "compound search"
OwnedJob = Annotated[CompoundJob, Depends(tiled.owned(CompoundJob, _WHAT))]
Submission = Annotated[tiled.Submission, Depends(tiled.submission("compounds:submit"))]


class CompoundSearchCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            **deps.exactly_one("top_k", "threshold"),
            "examples": [{"library": "library.smi", "top_k": 5}],
        },
    )

    #: Molecule files relative to the server's compound folder: .smi (SMILES id), .sdf, .csv.
    library: str = Field(min_length=1, max_length=500, pattern=TEXT)
    #: Queries; without them, the library is searched against itself (all pairs, self excluded).
    query: str | None = Field(default=None, min_length=1, max_length=500, pattern=TEXT)
    top_k: int | None = Field(default=None, ge=1, le=1000)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    metric: Literal["tanimoto", "dice"] = "tanimoto"
    fingerprint: Literal["morgan", "feature-morgan", "rdkit", "atom-pair", "torsion"] = "morgan"
    radius: int = Field(default=2, ge=0, le=6)
    bits: int = Field(default=2048, ge=64, le=16384)
    smiles_column: str = Field(default="smiles", min_length=1, max_length=100, pattern=TEXT)
    #: The CSV column or SDF data item of the ids (default: a CSV's ``id`` column if the header
    #: has it, else line numbers; an SDF's title lines).
    id_column: str | None = Field(default=None, min_length=1, max_length=100, pattern=TEXT)
    tile_rows: int | None = Field(default=None, ge=1, le=1_000_000)


class CompoundSearchPublic(tiled.TiledJobPublic):
    mode: str
    top_k: int | None
    threshold: float | None
    metric: str
    fingerprint: str
    all_pairs: bool
    n_query: int
    n_library: int
    unreadable: int
    unreadable_examples: list[str]
    #: Per file (library, query), how many molecules share an id with one before them.
    repeated_ids: dict[str, int]
    #: The neighbours CSV once done, as a download path.
    output: str | None


class NeighbourPublic(BaseModel):
    query_id: str
    library_id: str
    similarity: float
    rank: int


class NeighboursPublic(BaseModel):
    items: list[NeighbourPublic]
    next_cursor: int | None


#: The directories of a failure's file: up to the last ``/`` before ", line N (" (or record).
_FOLDERS = re.compile(r"^[^\n]*?/(?=[^/]*?, (?:line|record) \d+ \()")

_NEIGHBOURS = tiled.Results(CompoundJob, _WHAT, jobs.list_neighbours, NeighbourPublic)


def _public(job: dict[str, Any]) -> dict[str, Any]:
    output = f"/v1/compound-similarity/{job['id']}/files/neighbours.csv" if job["output"] else None
    # Names of unreadable records come with the server's path: keep only the file name (the
    # record's SMILES may hold a "/" too: F/C=C/F).
    examples = [_FOLDERS.sub("", str(e), count=1) for e in job["unreadable_examples"]]
    plots = [f"/v1/compound-similarity/{job['id']}/plots/similarity.png"] if output else []
    return {**job, "output": output, "unreadable_examples": examples, "plots": plots}


@tiled.submit_route(router, "/compound-similarity", CompoundSearchPublic)
def create_compound_search(body: CompoundSearchCreate, job: Submission) -> dict[str, Any]:
    """Read and fingerprint the molecules, record the job with its tiles, queue them on ``chem``."""
    from worker.jobs.compounds import search_options, submit

    given = {"library": body.library, "query": body.query}
    paths = tiled.confine_inputs(job.settings.compound_dir, given, kind="molecules")
    return _public(
        job.submitter.submit(
            submit,
            lambda exc: _refused(exc, job.settings.compound_dir, given, body),
            **paths,
            **search_options(body),
            tile_rows=body.tile_rows or 0,
        )
    )


def _refused(
    exc: SubmissionError, root: Path, given: dict[str, str | None], body: CompoundSearchCreate
) -> RequestValidationError:
    """A refusal in words that hold neither a server path nor the caller's values."""
    message = public_message(
        str(exc),
        root,
        given,
        kind="molecules",
        values={"smiles_column": body.smiles_column}
        | ({"id_column": body.id_column} if body.id_column else {}),
    )
    loc = ("body",) if exc.field == "mode" else ("body", exc.field)
    return tiled.refused(loc, message)


@tiled.read_route(router, "/compound-similarity/{job_id}", CompoundSearchPublic)
def read_compound_search(
    job: OwnedJob, celery: deps.CeleryDep, settings: deps.SettingsDep
) -> dict[str, Any]:
    from worker.jobs.compounds import COMPOUNDS

    return _public(tiled.described(job, COMPOUNDS, celery, settings))


@tiled.read_route(router, "/compound-similarity/{job_id}/neighbours", NeighboursPublic)
def list_job_neighbours(
    read: tiled.JobReaderDep,
    query_id: Annotated[str | None, Query(min_length=1, max_length=200, pattern=TEXT)] = None,
    cursor: deps.CursorQuery = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> NeighboursPublic:
    """The neighbours table (query id, library id, similarity, rank), optionally one query's."""
    return NeighboursPublic(**read.page(_NEIGHBOURS, cursor, limit, query_id=query_id))


@router.get("/compound-similarity/{job_id}/files/neighbours.csv", responses={404: {}})
def download_neighbours(job_id: IdPath, tenant: ReaderDep, session: SessionDep) -> FileResponse:
    job = jobs.get_job(session, job_id=job_id, tenant_id=tenant.id)
    path = None if job is None else Path(job.output_dir) / "neighbours.csv"
    if job is None or job.status != "done" or path is None or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no neighbours file for this search (yet)")
    return FileResponse(path, filename=f"neighbours-{job_id}.csv", media_type="text/csv")
