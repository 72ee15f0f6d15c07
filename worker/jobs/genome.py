"""Genome comparisons as the API and the CLI see them: a submission checked (file headers only),
recorded with its tiles and sent; a job described. The tiles are computed by worker/tasks/genome.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, object_session, sessionmaker

from db import genome as jobs
from db.tables import GenomeJob
from models.genome import plan
from models.genome.cohort import allele_flips, autosomal, keep_rows, variant_columns
from models.genome.io import vcf
from models.genome.io.output import THIRD_DEGREE_MIN_KINSHIP
from models.genome.io.plink import FilesetInfo, inspect_bed
from models.genome.metrics import METRICS
from worker import tiled
from worker.queues import GENOME_QUEUE, GENOME_TASK
from worker.tiled import SubmissionError

__all__ = ["SubmissionError", "describe", "describe_id", "submit", "wait"]


def inspect_input(path: Path) -> FilesetInfo:
    """Check a PLINK fileset (ids only) or a VCF/BCF (read whole: every record must be
    biallelic) before a job is recorded."""
    if vcf.is_vcf(path):
        found = vcf.read_vcf(path)
        return FilesetInfo(
            path, found.fid, found.iid, found.n_variants, found.variant_id, found.a1, found.a2,
            found.chrom,
        )  # fmt: skip
    return inspect_bed(path)


def _check_ids(field: str, path: Path, found: FilesetInfo) -> None:
    """KING jobs store their pairs with the samples' FID and IID, of at most
    :data:`db.genome.MAX_ID_CHARS` characters: a longer one (plink2 takes them) is refused here,
    by its place, not after the tiles ran (PostgreSQL refused the row, and the job stayed
    running)."""
    for n, (fid, iid) in enumerate(zip(found.fid, found.iid, strict=True), start=1):
        if max(len(fid), len(iid)) > jobs.MAX_ID_CHARS:
            raise SubmissionError(
                field,
                f"{path}: sample {n} has an FID or IID longer than {jobs.MAX_ID_CHARS} "
                "characters, more than a KING pair stores",
            )


def _check_unique(field: str, path: Path, found: FilesetInfo) -> None:
    """Current plink2 stops on a sample listed twice ("Duplicate sample ID"): its pairs could not be
    told apart in a .kin0, .id or pairs listing. Refused here, the samples named by place."""
    seen: dict[tuple[str, str], int] = {}
    for n, sample in enumerate(zip(found.fid, found.iid, strict=True), start=1):
        first = seen.setdefault(sample, n)
        if first != n:
            raise SubmissionError(
                field,
                f"{path}: samples {first} and {n} have the same FID and IID; give each sample "
                "its own (current plink2 stops on it: 'Duplicate sample ID')",
            )


def _inspect(field: str, path: Path, metric: str, *, unique: bool = True) -> FilesetInfo:
    """:func:`inspect_input`, a refusal as the submission's error on ``field``; each sample
    listed once (``unique``: :func:`_check_unique`); for KING, with the samples' ids checked
    (:func:`_check_ids`)."""
    try:
        found = inspect_input(path)
    except (FileNotFoundError, ValueError) as exc:
        raise SubmissionError(field, str(exc)) from None
    if unique:
        _check_unique(field, path, found)
    if metric == "king":
        _check_ids(field, path, found)
    return found


def job_dir(output_prefix: str) -> Path:
    return Path(output_prefix).parent


#: What a job writes: the square matrix (and, for KING, its related pairs), or only the pairs.
OUTPUTS = ("square", "pairs")


def default_tile_rows(n_rows: int, n_samples: int) -> int:
    """About four million entries (32 MB of float64) a tile."""
    return max(1, min(n_rows, 4_000_000 // max(n_samples, 1)))


def submit(
    sessions: sessionmaker[Session],
    app: Celery | None,
    *,
    tenant_id: int,
    metric: str,
    bfile: Path,
    query: Path | None = None,
    threshold: float = THIRD_DEGREE_MIN_KINSHIP,
    ibs_missing: str = "frequency",
    tile_rows: int = 0,
    keep: list[str | tuple[str, str]] | None = None,
    min_maf: float | None = None,
    artifact_dir: Path,
    output: str = "square",
    block: int = 0,
) -> dict[str, Any]:
    """Check the inputs, record the job and its tiles, then send one message per tile (none
    without ``app``: :func:`run_inline` computes them). ``bfile`` and ``query`` are PLINK 1
    fileset prefixes or VCF/BCF files (by their suffix).

    ``output="pairs"`` (KING only): every pair with kinship ≥ ``threshold`` and nothing else, in
    2-D tiles of ``block`` samples a side (default :func:`models.genome.pairs.default_block`);
    the cohort must then be a PLINK 1 fileset, which tiles read block by block."""
    if metric not in METRICS:
        raise SubmissionError("metric", f"unknown metric {metric!r} (one of {METRICS})")
    if output not in OUTPUTS:
        raise SubmissionError("output", f"unknown output {output!r} (one of {OUTPUTS})")
    if block and output != "pairs":
        raise SubmissionError(
            "block",
            'a tile\'s block of samples is for pairs output (--table, "output": "pairs"); '
            "a square job is cut into rows (tile_rows)",
        )
    if output == "pairs":
        if metric != "king":
            raise SubmissionError(
                "output", f"pairs output is KING kinship: metric must be 'king', got {metric!r}"
            )
        if vcf.is_vcf(bfile):
            raise SubmissionError(
                "bfile",
                f"{bfile}: pairs output reads the cohort block by block from a PLINK 1 .bed; "
                "convert it first (plink2 --vcf ... --make-bed)",
            )
        if block and (block < 4 or block % 4):
            raise SubmissionError("block", f"must be a positive multiple of 4, got {block}")
    # A keep list cannot take in both of a sample listed twice (models.genome.cohort.keep_rows).
    cohort = _inspect("bfile", bfile, metric, unique=keep is None)
    n_samples = len(cohort.iid)
    # X, Y and MT are left out, as PLINK leaves them out of KING, the GRM and IBS.
    n_variants = int(autosomal(cohort.chrom).sum()) if cohort.chrom else cohort.n_variants
    if cohort.n_variants and not n_variants:
        raise SubmissionError(
            "bfile",
            f"{bfile}: none of its {cohort.n_variants} variants is on an autosome (X, Y and MT "
            "are left out, as plink2 leaves them out: 'No variants remaining')",
        )
    if not n_variants:
        raise SubmissionError("bfile", f"{bfile}: no variants to compare the samples over")
    if keep is not None:
        try:
            n_samples = len(keep_rows(cohort.fid, cohort.iid, keep))
        except ValueError as exc:
            raise SubmissionError("keep", str(exc)) from None
    if query is None and n_samples < 2:  # a job 'done' with no pair in it
        raise SubmissionError(
            "bfile" if keep is None else "keep",
            f"{n_samples} sample{'s' if n_samples != 1 else ''}: comparing pairs needs at least "
            "2 (plink2: '--make-king-table requires at least 2 samples')",
        )
    if not math.isfinite(threshold):
        raise SubmissionError("threshold", f"must be a finite number, got {threshold}")
    if output == "pairs" and threshold > 0.5:
        raise SubmissionError(
            "threshold",
            f"a kinship cut-off is at most 0.5 (plink2's --king-table-filter), got {threshold}",
        )
    if min_maf is not None and not 0.0 <= min_maf <= 0.5:
        raise SubmissionError("min_maf", f"must be between 0 and 0.5, got {min_maf}")
    rows = cohort
    if query is not None:
        rows = _inspect("query", query, metric)
        if rows.n_variants != cohort.n_variants:
            raise SubmissionError(
                "query",
                f"{query} holds {rows.n_variants} variants, {bfile} {cohort.n_variants}: "
                "extract the same variants, in the same order, from both",
            )
        try:  # the same variants, by id, with the cohort's alleles (or swapped: recounted)
            at = variant_columns(rows.variant_id, cohort.variant_id)
            allele_flips(
                cohort.variant_id, [rows.a1[i] for i in at], [rows.a2[i] for i in at],
                cohort.a1, cohort.a2,
            )  # fmt: skip
        except ValueError as exc:
            raise SubmissionError("query", f"{query} against {bfile}: {exc}") from None
    n_rows = len(rows.iid) if query is not None else n_samples
    spec: dict[str, Any] = {
        "bfile": str(cohort.prefix),
        "query": None if query is None else str(rows.prefix),
        "threshold": threshold,
        "ibs_missing": ibs_missing,
        "keep": None if keep is None else [list(k) if isinstance(k, tuple) else k for k in keep],
        "min_maf": min_maf,
    }
    tiles = None
    if output == "pairs":
        block = block or plan.default_block(n_variants)
        planned = (
            plan.rectangle_tiles(n_rows, n_samples, block)
            if query is not None
            else plan.triangle_tiles(n_samples, block)
        )
        tiles = [(t.row_start, t.row_end, t.col_start, t.col_end) for t in planned]
        spec.update(output="pairs", block=block)
    return GENOME.record(
        sessions,
        app,
        lambda session: jobs.create_job(
            session,
            tenant_id=tenant_id,
            metric=metric,
            spec=spec,
            n_samples=n_samples,
            n_rows=n_rows,
            n_variants=n_variants,
            tile_rows=tile_rows or default_tile_rows(n_rows, n_samples),
            artifact_root=str(artifact_dir.resolve()),
            tiles_2d=tiles,
        ),
    )


def output_names(metric: str, *, query: bool, pairs: bool) -> list[str]:
    """The files a job writes into its folder (worker/tasks/genome.py): the pairs' ``.kin0``
    alone, or the ``.npy``, PLINK's square and ``.id`` (all pairs) or the rows' and columns'
    ``.id`` (query mode), and KING's ``.kin0``."""
    if pairs:
        return [f"{metric}.kin0"]
    plink = {"grm": ".rel", "king": ".king", "ibs": ".mibs"}.get(metric)
    names = [f"{metric}.npy"]
    if query:
        names += [f"{metric}.rows.id", f"{metric}.cols.id"]
    elif plink is not None:
        names += [f"{metric}{plink}", f"{metric}{plink}.id"]
    if metric == "king":
        names.append(f"{metric}.kin0")
    return names


def describe(job: jobs.GenomeJob) -> dict[str, Any]:
    """A job as the API and the CLI show it (paths of its outputs once it is done): only the
    files it writes, not others its folder may hold (a job of the same id in a database since
    reset left its own there, and they were listed and copied to --out as this job's)."""
    outputs = []
    if job.status == "done":
        folder = job_dir(job.output_prefix)
        written = output_names(
            job.metric,
            query=job.spec.get("query") is not None,
            pairs=job.spec.get("output") == "pairs",
        )
        outputs = sorted(str(folder / name) for name in written if (folder / name).is_file())
    degrees = None
    session = object_session(job)
    if job.metric == "king" and session is not None:
        found = jobs.degree_counts(session, job_id=job.id)
        degrees = {d: found.get(d, 0) for d in plan.DEGREES}
    return {
        "id": job.id,
        "metric": job.metric,
        "output": job.spec.get("output", "square"),
        "status": str(job.status),
        "n_samples": job.n_samples,
        "n_rows": job.n_rows,
        "n_variants": job.n_variants,
        "tiles_total": job.tiles_total,
        "tiles_done": job.tiles_done,
        "query": job.spec.get("query") is not None,
        "threshold": job.spec.get("threshold"),
        "error": job.error,
        "degree_counts": degrees,
        "outputs": outputs,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
    }


GENOME = tiled.Kind(jobs.KIND, GenomeJob, GENOME_TASK, GENOME_QUEUE, describe)
describe_id = GENOME.describe_id
wait = GENOME.wait
