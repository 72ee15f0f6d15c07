"""Queries of the genome-comparison jobs: create them with their tiles, store and list pairs.
The tiles are counted by the shared ledger (:mod:`db.tiles`)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db import tiles
from db.tables import GenomeJob, RelatedPair
from models.genome.io.output import SampleId

KIND = "genome"
#: The longest FID or IID a stored pair holds (PostgreSQL refuses a longer one).
MAX_ID_CHARS: int = RelatedPair.__table__.c.fid1.type.length  # type: ignore[attr-defined]


@dataclass(frozen=True)
class NewPair:
    """A related pair a tile found, as :func:`add_pairs` stores it (a row of ``genome_pairs``)."""

    #: Indices into the job's row samples and its cohort samples, and their (FID, IID).
    row: int
    col: int
    first: SampleId
    second: SampleId
    kinship: float
    degree: str
    #: plink2's .kin0 counts (pairs-only jobs): nsnp, hethet, ibs0.
    counts: tuple[int, int, int] | None = None

    def columns(self) -> dict[str, Any]:
        nsnp, hethet, ibs0 = self.counts or (None, None, None)
        (fid1, iid1), (fid2, iid2) = self.first, self.second
        # A NaN kinship (no heterozygous call to judge by) is stored as NULL: SQLite has no NaN.
        kinship = None if math.isnan(self.kinship) else self.kinship
        return {
            "row": self.row, "col": self.col, "fid1": fid1, "iid1": iid1, "fid2": fid2,
            "iid2": iid2, "kinship": kinship, "degree": self.degree, "nsnp": nsnp,
            "hethet": hethet, "ibs0": ibs0,
        }  # fmt: skip


def create_job(
    session: Session,
    *,
    tenant_id: int,
    metric: str,
    spec: dict[str, Any],
    n_samples: int,
    n_rows: int,
    n_variants: int,
    tile_rows: int,
    artifact_root: str,
    tiles_2d: Sequence[tuple[int, int, int, int]] | None = None,
) -> GenomeJob:
    """A queued job with one tile per ``tile_rows`` rows of its result, or the 2-D ``tiles_2d``
    (row start, row end, column start, column end) of a pairs-only job; flushed, not committed."""
    bounds = tiles.row_tiles(n_rows, tile_rows) if tiles_2d is None else list(tiles_2d)
    job = GenomeJob(tenant_id=tenant_id, metric=metric, spec=spec, output_prefix="")
    job.n_samples, job.n_rows, job.n_variants = n_samples, n_rows, n_variants
    tiles.add_job(session, job, kind=KIND, tiles=bounds)
    job.output_prefix = f"{artifact_root}/genome/{job.id}/{metric}"
    session.flush()
    return job


def set_variants_used(session: Session, *, job_id: int, n_variants: int) -> None:
    """The variants a job's tiles compared the samples over, once ``min_maf`` dropped some (at
    submission only the fileset's autosomal variants are counted: the frequencies are counted
    by the tiles, in one pass over the .bed)."""
    session.execute(update(GenomeJob).where(GenomeJob.id == job_id).values(n_variants=n_variants))


#: ``get_job(session, job_id=..., tenant_id=None)``: a job, or None (db.tiles.get_job).
get_job = partial(tiles.get_job, table=GenomeJob)


def add_pairs(session: Session, *, job_id: int, pairs: Sequence[NewPair]) -> None:
    tiles.add_results(session, RelatedPair, job_id=job_id, rows=pairs, key=("job_id", "row", "col"))


def list_pairs(
    session: Session, *, job_id: int, min_kinship: float | None = None, **page: int
) -> list[RelatedPair]:
    """A page of a job's pairs (``after_id``, ``limit``), those of ``min_kinship`` or more."""
    where = [] if min_kinship is None else [RelatedPair.kinship >= min_kinship]
    return tiles.result_page(session, RelatedPair, job_id=job_id, where=where, **page)


def degree_counts(session: Session, *, job_id: int) -> dict[str, int]:
    """How many of a job's pairs fall in each degree (``duplicate/MZ twin``, ``1st``, ...)."""
    rows = session.execute(
        select(RelatedPair.degree, func.count())
        .where(RelatedPair.job_id == job_id)
        .group_by(RelatedPair.degree)
    )
    return {str(degree): int(count) for degree, count in rows}


def iter_pairs(
    session: Session, *, job_id: int, later_first: bool, batch: int = 10_000
) -> Iterator[list[RelatedPair]]:
    """A job's pairs in batches, in plink2's ``.kin0`` order: by column then row
    (``later_first``: all pairs, row < column), or by row then column (query mode). One sorted
    query, read ``batch`` rows at a time (a server-side cursor on PostgreSQL)."""
    order = (
        (RelatedPair.col, RelatedPair.row) if later_first else (RelatedPair.row, RelatedPair.col)
    )
    stmt = select(RelatedPair).where(RelatedPair.job_id == job_id).order_by(*order)
    result = session.execute(stmt.execution_options(yield_per=batch))
    for part in result.scalars().partitions(batch):
        yield list(part)
