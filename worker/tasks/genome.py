"""Genome comparisons as Celery tasks: one task per tile, on the ``genome`` queue.

A job's result (all pairs of a cohort, or query samples against it) is cut into tiles of rows;
a pairs-only KING job (``output="pairs"``, :mod:`models.genome.pairs`) into 2-D tiles of the upper
triangle (row block x column block), each of which reads only its two blocks of samples from the
.bed and stores only its pairs at or above the cut-off, never a matrix.
Each tile is its own message, so any number of workers on any number of machines share a job,
and a lost worker costs its tile only (acks late: the message is delivered again). A tile writes
its block to the artifact store as it finishes and counts itself on the job once; the tile that
completes the count writes the PLINK-format outputs and settles the job. No Celery result backend
is needed: the database is the ledger.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from celery import Celery, shared_task
from celery.exceptions import Reject
from sqlalchemy.orm import Session, object_session, sessionmaker

from db import genome as jobs
from db.engine import session_scope
from db.leases import TileKey
from models.device import device_type
from models.genome import api as genome
from models.genome import pairs as genome_pairs
from models.genome.cohort import keep_rows, subset
from models.genome.io import output as genome_output
from models.genome.io import vcf
from worker import tiles as tiled
from worker.context import context
from worker.queues import GENOME_QUEUE, GENOME_TASK

log = logging.getLogger(__name__)

#: A tile that failed this many times fails its job.
MAX_TILE_ATTEMPTS = 3


@dataclass(frozen=True)
class Cohort:
    """A job's inputs in memory: the cohort, the query rows (the cohort itself for all pairs)."""

    cohort: genome.Genotypes
    query: genome.Genotypes
    frequencies: np.ndarray | None


def _signature(source: str) -> tuple[str, float, int]:
    """A fileset prefix or VCF path, with its genotype file's mtime and size (a changed file is
    read again)."""
    data = Path(source) if vcf.is_vcf(source) else Path(source + ".bed")
    stat = data.stat()
    return source, stat.st_mtime, stat.st_size


@lru_cache(maxsize=4)
def _read(signature: tuple[str, float, int]) -> genome.Genotypes:
    """Genotypes read once per worker process (tiles of one job share them), read-only: the
    engine then keeps the cohort's bit planes from one tile to the next."""
    source = signature[0]
    genotypes = vcf.read_vcf(source) if vcf.is_vcf(source) else genome.read_bed(source)
    genotypes.dosages.flags.writeable = False
    return genotypes


def inspect_input(path: Path) -> genome.FilesetInfo:
    """Check a PLINK fileset (ids only) or a VCF/BCF (read whole: every record must be
    biallelic) before a job is recorded."""
    if vcf.is_vcf(path):
        found = vcf.read_vcf(path)
        return genome.FilesetInfo(path, found.fid, found.iid, found.n_variants)
    return genome.inspect_bed(path)


def _keep(spec: dict[str, Any]) -> tuple[str | tuple[str, str], ...] | None:
    keep = spec.get("keep")
    return None if keep is None else tuple(k if isinstance(k, str) else tuple(k) for k in keep)


def load_inputs(spec: dict[str, Any], metric: str) -> Cohort:
    """The job's cohort (its ``keep`` samples and ``min_maf`` variants) and query rows."""
    cohort = _cohort(_signature(spec["bfile"]), _keep(spec), spec.get("min_maf"))
    query = cohort
    if spec.get("query"):
        query = _read(_signature(spec["query"]))
        if query.variant_id != cohort.variant_id:
            try:
                query = subset(query, variants=cohort.variant_id)
            except ValueError as exc:
                raise ValueError(f"{spec['query']} against {spec['bfile']}: {exc}") from None
    needs_frequencies = metric == "grm" or (
        metric == "ibs" and spec.get("ibs_missing", "frequency") == "frequency"
    )
    frequencies = (
        _frequencies(_signature(spec["bfile"]), _keep(spec), spec.get("min_maf"))
        if needs_frequencies
        else None
    )
    return Cohort(cohort, query, frequencies)


@lru_cache(maxsize=4)
def _cohort(
    signature: tuple[str, float, int],
    keep: tuple[str | tuple[str, str], ...] | None,
    min_maf: float | None,
) -> genome.Genotypes:
    return subset(_read(signature), keep=keep, min_maf=min_maf)


@lru_cache(maxsize=4)
def _frequencies(
    signature: tuple[str, float, int],
    keep: tuple[str | tuple[str, str], ...] | None,
    min_maf: float | None,
) -> np.ndarray:
    return genome.allele_frequencies(_cohort(signature, keep, min_maf).dosages)


def job_dir(output_prefix: str) -> Path:
    return Path(output_prefix).parent


def tile_path(output_prefix: str, index: int) -> Path:
    return job_dir(output_prefix) / "tiles" / f"{index:05d}.npy"


def _save_atomically(path: Path, block: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, block)
    tmp.replace(path)


def run_tile(sessions: sessionmaker[Session], *, job_id: int, index: int, device: str) -> str:
    """Compute, store and count one tile; finish the job if it was the last. Returns what it did."""
    with session_scope(sessions) as session:
        job = jobs.get_job(session, job_id=job_id)
        tile = jobs.get_tile(session, job_id=job_id, index=index)
        if job is None or tile is None:
            return "unknown"
        if tile.status == "done" or job.status in ("done", "failed"):
            return "already done"
        jobs.start_tile(session, tile)
        spec, metric, prefix = dict(job.spec), job.metric, job.output_prefix
        rows = slice(tile.row_start, tile.row_end)
        col_start = getattr(tile, "col_start", None)
        cols = None if col_start is None else slice(col_start, tile.col_end)  # type: ignore[union-attr]
        attempts = tile.attempts
    try:
        if spec.get("output") == "pairs":
            assert cols is not None
            pairs = _pair_tile(spec, rows, cols, device)
            return _count_tile(sessions, job_id=job_id, index=index, pairs=pairs)
        inputs = load_inputs(spec, metric)
        block = genome.pairwise_block(
            inputs.query.dosages[rows],
            inputs.cohort.dosages,
            metric=metric,  # type: ignore[arg-type]
            frequencies=inputs.frequencies,
            ibs_missing=spec.get("ibs_missing", "frequency"),
            device=device,  # type: ignore[arg-type]
        )
        _save_atomically(tile_path(prefix, index), block)
        pairs = _pairs(spec, metric, inputs, block, rows.start) if metric == "king" else []
    except Exception as exc:
        where = f"rows {rows.start}:{rows.stop}" + (
            f", cols {cols.start}:{cols.stop}" if cols else ""
        )
        reason = f"tile {index} ({where}): {type(exc).__name__}: {exc}"
        log.warning("genome job %d: %s (attempt %d)", job_id, reason, attempts)
        if attempts >= MAX_TILE_ATTEMPTS or isinstance(exc, (ValueError, FileNotFoundError)):
            with session_scope(sessions) as session:
                jobs.settle_job(session, job_id=job_id, error=reason)
            return "failed"
        raise
    return _count_tile(sessions, job_id=job_id, index=index, pairs=pairs)


def _count_tile(
    sessions: sessionmaker[Session], *, job_id: int, index: int, pairs: list[dict[str, Any]]
) -> str:
    """Store a tile's pairs and count the tile on its job, once; the last tile finishes the job."""
    with session_scope(sessions) as session:
        jobs.add_pairs(session, job_id=job_id, pairs=pairs)
        done = jobs.finish_tile(session, job_id=job_id, index=index)
        total = session.get(jobs.GenomeJob, job_id).tiles_total  # type: ignore[union-attr]
    if done is not None and done == total:
        finish_job(sessions, job_id=job_id)
        return "finished job"
    return "tile done"


# --- pairs-only KING jobs ------------------------------------------------------------------------


@dataclass(frozen=True)
class PairInputs:
    """A pairs-only job's sides: the cohort read block by block from its .bed, query samples (in
    memory: new samples are few), the variant split both share, and each side's (FID, IID)."""

    cohort: genome_pairs.BedSamples
    split: genome_pairs.Split
    cohort_ids: list[tuple[str, str]]
    query: genome_pairs.DosageSamples | None
    query_ids: list[tuple[str, str]]


@lru_cache(maxsize=2)
def _pair_inputs(
    signature: tuple[str, float, int],
    keep: tuple[str | tuple[str, str], ...] | None,
    min_maf: float | None,
    query: tuple[str, float, int] | None,
) -> PairInputs:
    """Per worker process: one pass over the .bed for the variant split (and ``min_maf``), then
    blocks as tiles ask for them (the last few are kept: a worker's tiles share blocks)."""
    prefix = signature[0]
    cohort, info = genome_pairs.bed_samples(prefix, keep=keep, min_maf=min_maf)
    rows = range(len(info.iid)) if cohort.samples is None else cohort.samples.tolist()
    cohort_ids = [(info.fid[r], info.iid[r]) for r in rows]
    split = cohort.split()
    query_side, query_ids = None, []
    if query is not None:
        found = _read(query)
        (variant_id,) = genome._read_columns(genome._plink_paths(prefix)[1], 6, (1,))
        used = variant_id if cohort.variants is None else [variant_id[v] for v in cohort.variants]
        if found.variant_id != tuple(used):
            try:
                found = subset(found, variants=used)
            except ValueError as exc:
                raise ValueError(f"{query[0]} against {prefix}: {exc}") from None
        query_side = genome_pairs.DosageSamples(found.dosages)
        query_ids = list(zip(found.fid, found.iid, strict=True))
    return PairInputs(cohort, split, cohort_ids, query_side, query_ids)


def pair_inputs(spec: dict[str, Any]) -> PairInputs:
    query = _signature(spec["query"]) if spec.get("query") else None
    return _pair_inputs(_signature(spec["bfile"]), _keep(spec), spec.get("min_maf"), query)


def _pair_tile(spec: dict[str, Any], rows: slice, cols: slice, device: str) -> list[dict[str, Any]]:
    """The pairs of one 2-D tile at or above the job's cut-off, as rows for the database: on the
    CPU by bit planes, on CUDA by integer GEMMs (``auto``: CUDA when present)."""
    inputs = pair_inputs(spec)
    query = inputs.query
    tile = genome_pairs.Tile(rows.start, rows.stop, cols.start, cols.stop)
    found = genome_pairs.tile_pairs(
        inputs.cohort if query is None else query,
        inputs.cohort,
        tile,
        inputs.split,
        cutoff=float(spec["threshold"]),
        all_pairs=query is None,
        device=device_type(device),  # type: ignore[arg-type]
    )
    row_ids = inputs.cohort_ids if query is None else inputs.query_ids
    return [
        {
            "row": r,
            "col": c,
            "fid1": row_ids[r][0],
            "iid1": row_ids[r][1],
            "fid2": inputs.cohort_ids[c][0],
            "iid2": inputs.cohort_ids[c][1],
            "kinship": k,
            "degree": d,
            "nsnp": n,
            "hethet": h,
            "ibs0": z,
        }
        for r, c, k, d, (n, h, z) in zip(
            found.row.tolist(), found.col.tolist(), found.kinship.tolist(), found.degrees(),
            found.counts.tolist(), strict=True,
        )
    ]  # fmt: skip


def write_pairs_table(
    sessions: sessionmaker[Session], *, job_id: int, path: Path, query: bool
) -> None:
    """The job's pairs as plink2's ``.kin0`` (default columns), streamed from the database in
    plink2's order: for all pairs the later sample first, ordered by it; for a query job the query
    sample first. Written under a ``.part`` name and renamed when complete."""
    part = path.with_name(path.name + ".part")
    try:
        with part.open("w", encoding="utf-8", newline="\n") as sink, session_scope(sessions) as s:
            sink.write(genome_output.kin0_header(True))
            for batch in jobs.iter_pairs(s, job_id=job_id, later_first=not query):
                first = [(p.fid1, p.iid1) for p in batch]
                second = [(p.fid2, p.iid2) for p in batch]
                if not query:
                    first, second = second, first
                kinship = np.array([p.kinship for p in batch], np.float64)
                counts = np.array([(p.nsnp, p.hethet, p.ibs0) for p in batch], np.int64)
                sink.write("".join(genome_output.kin0_lines(first, second, kinship, counts)))
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(path)


def _pairs(
    spec: dict[str, Any], metric: str, inputs: Cohort, block: np.ndarray, row_start: int
) -> list[dict[str, Any]]:
    """Pairs of this tile above the job's kinship threshold (each unordered pair once)."""
    all_pairs = not spec.get("query")
    found = genome_output.related_pairs(
        block,
        threshold=float(spec.get("threshold", genome_output.THIRD_DEGREE_MIN_KINSHIP)),
        row_offset=row_start,
        upper_only=all_pairs,
    )
    q, c = inputs.query, inputs.cohort
    return [
        {
            "row": p.i,
            "col": p.j,
            "fid1": q.fid[p.i],
            "iid1": q.iid[p.i],
            "fid2": c.fid[p.j],
            "iid2": c.iid[p.j],
            "kinship": p.kinship,
            # Below third degree (a threshold under 2^-4.5) there is no degree to infer.
            "degree": p.degree or "unrelated",
        }
        for p in found
    ]


def finish_job(sessions: sessionmaker[Session], *, job_id: int) -> None:
    """Write the PLINK-format outputs from the tiles, in order, and settle the job."""
    with session_scope(sessions) as session:
        job = jobs.get_job(session, job_id=job_id)
        assert job is not None
        spec, metric, prefix, tiles = dict(job.spec), job.metric, job.output_prefix, job.tiles_total
    try:
        if spec.get("output") == "pairs":
            job_dir(prefix).mkdir(parents=True, exist_ok=True)
            write_pairs_table(
                sessions, job_id=job_id, path=Path(prefix + ".kin0"), query=bool(spec.get("query"))
            )
            with session_scope(sessions) as session:
                jobs.settle_job(session, job_id=job_id)
            log.info("genome job %d done: %d tiles, pairs only", job_id, tiles)
            return
        inputs = load_inputs(spec, metric)
        write_outputs(prefix, metric, tiles, inputs, query=bool(spec.get("query")))
        if metric == "king":
            with session_scope(sessions) as session:
                rows = jobs.list_pairs(session, job_id=job_id, limit=10**9)
                pairs = [genome_output.RelatedPair(r.row, r.col, r.kinship, None) for r in rows]
            if not spec.get("query"):
                ids = list(zip(inputs.cohort.fid, inputs.cohort.iid, strict=True))
                counts = genome_output.king_pair_counts(
                    inputs.cohort.dosages, [(p.i, p.j) for p in pairs]
                )
                genome_output.write_kin0(Path(prefix + ".kin0"), pairs, ids, counts=counts)
    except Exception as exc:
        with session_scope(sessions) as session:
            jobs.settle_job(session, job_id=job_id, error=f"writing outputs: {exc}")
        raise
    with session_scope(sessions) as session:
        jobs.settle_job(session, job_id=job_id)
    log.info("genome job %d done: %d tiles", job_id, tiles)


#: PLINK's file kind of each metric's square matrix (``dot`` has none: .npy only).
PLINK_KIND: dict[str, genome_output.MatrixKind] = {"grm": "rel", "king": "king", "ibs": "mibs"}


def write_outputs(prefix: str, metric: str, tiles: int, inputs: Cohort, *, query: bool) -> None:
    """The job's matrix from its tiles, streamed in order: PLINK's square text format for an
    all-pairs grm/king/ibs job (with its .id), and always ``{prefix}.npy`` (float64)."""
    blocks = [tile_path(prefix, i) for i in range(tiles)]
    n_cols = inputs.cohort.n_samples
    n_rows = inputs.query.n_samples
    npy = Path(prefix + ".npy")
    tmp = npy.with_name(npy.name + ".part")
    full = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=(n_rows, n_cols))
    kind = PLINK_KIND.get(metric) if not query else None
    ids = list(zip(inputs.cohort.fid, inputs.cohort.iid, strict=True))
    writer = genome_output.MatrixWriter(prefix, ids, kind=kind) if kind else None
    try:
        start = 0
        for path in blocks:
            block = np.load(path)
            full[start : start + len(block)] = block
            start += len(block)
            if writer is not None:
                writer.write_rows(block)
        full.flush()
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        tmp.unlink(missing_ok=True)
        raise
    del full
    tmp.replace(npy)
    if query:
        query_ids = list(zip(inputs.query.fid, inputs.query.iid, strict=True))
        genome_output.write_ids(Path(prefix + ".rows.id"), query_ids, kind="rel")
        genome_output.write_ids(Path(prefix + ".cols.id"), ids, kind="rel")


def enqueue_tiles(app: Celery, job_id: int, tiles: int) -> None:
    """One message per tile; call after the job's rows are committed."""
    for index in range(tiles):
        app.send_task(
            GENOME_TASK, args=[job_id, index], queue=GENOME_QUEUE, routing_key=GENOME_QUEUE
        )


@shared_task(bind=True, name=GENOME_TASK, acks_late=True)
def genome_tile_task(self: Any, *args: object) -> str:
    ids = [a for a in args if isinstance(a, int) and not isinstance(a, bool) and a >= 0]
    if len(args) != 2 or len(ids) != 2:
        raise Reject("expected two arguments: job id and tile index", requeue=False)
    ctx = context(self.app)
    # Leased while it runs: a dead worker's tile goes back to the queue (worker/sweeper.py).
    with ctx.leases.tile(TileKey("genome", ids[0], ids[1])) as held:
        if not held:
            return "done or held by another worker"
        return run_tile(ctx.sessions, job_id=ids[0], index=ids[1], device=ctx.settings.device)


class SubmissionError(ValueError):
    """A genome comparison that cannot start; ``field`` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


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
    threshold: float = genome_output.THIRD_DEGREE_MIN_KINSHIP,
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
    if metric not in genome.METRICS:
        raise SubmissionError("metric", f"unknown metric {metric!r} (one of {genome.METRICS})")
    if output not in OUTPUTS:
        raise SubmissionError("output", f"unknown output {output!r} (one of {OUTPUTS})")
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
    try:
        cohort = inspect_input(bfile)
    except (FileNotFoundError, ValueError) as exc:
        raise SubmissionError("bfile", str(exc)) from None
    n_samples = len(cohort.iid)
    if keep is not None:
        try:
            n_samples = len(keep_rows(cohort.fid, cohort.iid, keep))
        except ValueError as exc:
            raise SubmissionError("keep", str(exc)) from None
    if min_maf is not None and not 0.0 <= min_maf <= 0.5:
        raise SubmissionError("min_maf", f"must be between 0 and 0.5, got {min_maf}")
    rows = cohort
    if query is not None:
        try:
            rows = inspect_input(query)
        except (FileNotFoundError, ValueError) as exc:
            raise SubmissionError("query", str(exc)) from None
        if rows.n_variants != cohort.n_variants:
            raise SubmissionError(
                "query",
                f"{query} holds {rows.n_variants} variants, {bfile} {cohort.n_variants}: "
                "extract the same variants, in the same order, from both",
            )
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
        block = block or genome_pairs.default_block(cohort.n_variants)
        planned = (
            genome_pairs.rectangle_tiles(n_rows, n_samples, block)
            if query is not None
            else genome_pairs.triangle_tiles(n_samples, block)
        )
        tiles = [(t.row_start, t.row_end, t.col_start, t.col_end) for t in planned]
        spec.update(output="pairs", block=block)
    with session_scope(sessions) as session:
        job = jobs.create_job(
            session,
            tenant_id=tenant_id,
            metric=metric,
            spec=spec,
            n_samples=n_samples,
            n_rows=n_rows,
            n_variants=cohort.n_variants,
            tile_rows=tile_rows or default_tile_rows(n_rows, n_samples),
            artifact_root=str(artifact_dir.resolve()),
            tiles=tiles,
        )
        summary = describe(job)
    if app is not None:
        enqueue_tiles(app, summary["id"], summary["tiles_total"])
    return summary


def run_inline(
    sessions: sessionmaker[Session], *, job_id: int, device: str, progress: bool = False
) -> dict[str, Any]:
    """Compute every tile of a job in this process (no worker), the same way a worker does."""
    return tiled.run_inline(
        lambda index: run_tile(sessions, job_id=job_id, index=index, device=device),
        lambda: _describe_id(sessions, job_id),
        progress=progress,
    )


def wait(sessions: sessionmaker[Session], *, job_id: int, progress: bool = False) -> dict[str, Any]:
    """Follow a job the workers run until it is done or failed."""
    return tiled.follow(lambda: _describe_id(sessions, job_id), progress=progress)


def _describe_id(sessions: sessionmaker[Session], job_id: int) -> dict[str, Any]:
    with session_scope(sessions) as session:
        job = jobs.get_job(session, job_id=job_id)
        assert job is not None
        return describe(job)


def describe(job: jobs.GenomeJob) -> dict[str, Any]:
    """A job as the API and the CLI show it (paths of its outputs once it is done)."""
    outputs = []
    if job.status == "done":
        folder = job_dir(job.output_prefix)
        outputs = sorted(
            str(p)
            for p in folder.iterdir()
            if p.is_file() and not p.name.endswith((".tmp", ".part"))
        )
    degrees = None
    session = object_session(job)
    if job.metric == "king" and session is not None:
        found = jobs.degree_counts(session, job_id=job.id)
        degrees = {d: found.get(d, 0) for d in genome_pairs.DEGREES}
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
