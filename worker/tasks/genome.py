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
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from db import genome as jobs
from db.engine import session_scope
from models.device import device_type
from models.genome import api as genome
from models.genome import pairs as genome_pairs
from models.genome.cohort import align, founder_frequencies, selection, take
from models.genome.io import output as genome_output
from models.genome.io import vcf
from worker import tiled
from worker.jobs.genome import (  # noqa: F401  (the kind's API, used with its tasks)
    GENOME,
    SubmissionError,
    describe,
    describe_id,
    inspect_input,
    job_dir,
    submit,
    wait,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cohort:
    """A job's inputs in memory: the cohort, the query rows (the cohort itself for all pairs)."""

    cohort: genome.Genotypes
    query: genome.Genotypes
    frequencies: np.ndarray | None
    #: The cohort's bit planes, built by the first tile and kept for the next ones.
    prepared: genome.PreparedCohort


def _signature(source: str) -> tuple[str, float, int]:
    """A fileset prefix or VCF path, with its genotype file's mtime and size (a changed file is
    read again)."""
    data = Path(source) if vcf.is_vcf(source) else Path(source + ".bed")
    stat = data.stat()
    return source, stat.st_mtime, stat.st_size


@lru_cache(maxsize=4)
def _read(signature: tuple[str, float, int]) -> genome.Genotypes:
    """Genotypes read once per worker process (tiles of one job share them), read-only: the
    cohort is then prepared once for its tiles (see :class:`CohortState`)."""
    source = signature[0]
    genotypes = vcf.read_vcf(source) if vcf.is_vcf(source) else genome.read_bed(source)
    genotypes.dosages.flags.writeable = False
    return genotypes


def _keep(spec: dict[str, Any]) -> tuple[str | tuple[str, str], ...] | None:
    keep = spec.get("keep")
    return None if keep is None else tuple(k if isinstance(k, str) else tuple(k) for k in keep)


def load_inputs(spec: dict[str, Any], metric: str) -> Cohort:
    """The job's cohort (its ``keep`` samples and ``min_maf`` variants) and query rows."""
    state = _cohort_state((_signature(spec["bfile"]), _keep(spec), spec.get("min_maf")))
    cohort = state.genotypes
    query = cohort
    if spec.get("query"):
        query = _read(_signature(spec["query"]))
        try:
            query = align(query, *state.file_variants, columns=state.columns)
        except ValueError as exc:
            raise ValueError(f"{spec['query']} against {spec['bfile']}: {exc}") from None
    needs_frequencies = metric == "grm" or (
        metric == "ibs" and spec.get("ibs_missing", "frequency") == "frequency"
    )
    frequencies = state.frequencies if needs_frequencies else None
    if metric == "grm":
        assert frequencies is not None
        _check_founder_monomorphic(cohort, frequencies)
    return Cohort(cohort, query, frequencies, state.prepared)


def _check_founder_monomorphic(cohort: genome.Genotypes, frequencies: np.ndarray) -> None:
    """plink2 --make-rel stops on a variant whose allele no founder carries but a non-founder
    does ("Zero-MAF variant is not actually monomorphic"): so does the job, naming the variant
    by its id (the kernels know only its column)."""
    variance = 2.0 * frequencies * (1.0 - frequencies)
    flat = np.flatnonzero(variance < 2.0**-44)  # plink2's kSmallEpsilon, as the kernels
    if not len(flat):
        return
    calls = cohort.dosages[:, flat]
    expected = np.round(2.0 * frequencies[flat]).astype(np.int8)
    varies = ((calls >= 0) & (calls != expected)).any(axis=0)
    if varies.any():
        j = int(flat[np.flatnonzero(varies)[0]])
        raise ValueError(
            f"variant {cohort.variant_id[j]}: no founder carries one of its alleles, but a "
            "non-founder does; plink2 --make-rel stops here too (leave it out with min_maf)"
        )


def check_variants_left(n_variants: int, min_maf: float | None) -> None:
    """plink2 stops where ``--maf`` leaves no variant ("No variants remaining after main
    filters"); a job over none would give every pair a NaN kinship (0/0), which a pairs-only job
    keeps, as plink2's --king-table-filter keeps a NaN: N²/2 pairs of nothing."""
    if not n_variants:
        raise ValueError(
            f"min_maf {min_maf} leaves no variant to compare the samples over (plink2 stops "
            "here too: 'No variants remaining after main filters')"
        )


#: A cohort as a job names it: its file (with mtime and size), its ``keep`` samples, ``min_maf``.
CohortKey = tuple[tuple[str, float, int], tuple[str | tuple[str, str], ...] | None, float | None]


class CohortState:
    """A job's cohort as a worker process holds it for the job's tiles: the genotypes, their bit
    planes (prepared on first use) and allele frequencies (counted on first use)."""

    def __init__(self, key: CohortKey) -> None:
        signature, keep, min_maf = key
        whole = _read(signature)
        rows, self.columns = selection(whole, keep=keep, min_maf=min_maf, autosomes=True)
        check_variants_left(len(self.columns), min_maf)
        unchanged = len(rows) == whole.n_samples and len(self.columns) == whole.n_variants
        self.genotypes = whole if unchanged else take(whole, rows, self.columns)
        #: The file's variants (ids, A1, A2): a query is matched to them, then to ``columns``.
        self.file_variants = (whole.variant_id, whole.a1, whole.a2)
        self.prepared = genome.prepare_cohort(self.genotypes.dosages)

    @cached_property
    def frequencies(self) -> np.ndarray:
        return founder_frequencies(self.genotypes)


@lru_cache(maxsize=2)
def _cohort_state(key: CohortKey) -> CohortState:
    """The last two cohorts' states in this process (a worker's tiles share them)."""
    return CohortState(key)


def tile_path(output_prefix: str, index: int) -> Path:
    return job_dir(output_prefix) / "tiles" / f"{index:05d}.npy"


def _save_atomically(path: Path, block: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, block)
    tmp.replace(path)


def compute_tile(tile: tiled.Tile, options: Mapping[str, Any]) -> list[jobs.NewPair]:
    """A tile's block of the matrix, saved to the artifact store, and its related pairs (KING);
    or, for a pairs-only job, its pairs alone. Returns the pairs, as rows for the database."""
    spec, metric, device = tile.spec, tile.job["metric"], options["device"]
    if spec.get("output") == "pairs":
        assert tile.cols is not None
        return _pair_tile(spec, tile.rows, tile.cols, device)
    inputs = load_inputs(spec, metric)
    block = genome.pairwise_block(
        inputs.query.dosages[tile.rows],
        inputs.cohort.dosages,
        metric=metric,
        frequencies=inputs.frequencies,
        ibs_missing=spec.get("ibs_missing", "frequency"),
        device=device,
        prepared=inputs.prepared,
    )
    _save_atomically(tile_path(tile.job["output_prefix"], tile.index), block)
    return _pairs(spec, metric, inputs, block, tile.rows.start) if metric == "king" else []


def store_pairs(session: Session, job_id: int, pairs: list[jobs.NewPair]) -> None:
    jobs.add_pairs(session, job_id=job_id, pairs=pairs)


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
    check_variants_left(cohort.n_variants, min_maf)
    rows = range(len(info.iid)) if cohort.samples is None else cohort.samples.tolist()
    cohort_ids = [(info.fid[r], info.iid[r]) for r in rows]
    split = cohort.split()
    query_side, query_ids = None, []
    if query is not None:
        found = _read(query)
        used = range(info.n_variants) if cohort.variants is None else cohort.variants.tolist()
        try:
            found = align(found, info.variant_id, info.a1, info.a2, columns=np.array(used))
        except ValueError as exc:
            raise ValueError(f"{query[0]} against {prefix}: {exc}") from None
        query_side = genome_pairs.DosageSamples(found.dosages)
        query_ids = list(zip(found.fid, found.iid, strict=True))
    return PairInputs(cohort, split, cohort_ids, query_side, query_ids)


def pair_inputs(spec: dict[str, Any]) -> PairInputs:
    query = _signature(spec["query"]) if spec.get("query") else None
    return _pair_inputs(_signature(spec["bfile"]), _keep(spec), spec.get("min_maf"), query)


def _pair_tile(spec: dict[str, Any], rows: slice, cols: slice, device: str) -> list[jobs.NewPair]:
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
    pairs = []
    for r, c, k, d, (n, h, z) in zip(
        found.row.tolist(), found.col.tolist(), found.kinship.tolist(), found.degrees(),
        found.counts.tolist(), strict=True,
    ):  # fmt: skip
        pairs.append(jobs.NewPair(r, c, row_ids[r], inputs.cohort_ids[c], k, d, (n, h, z)))
    return pairs


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
                kinship = np.array(  # NULL: a NaN kinship (db.genome.NewPair.columns)
                    [np.nan if p.kinship is None else p.kinship for p in batch], np.float64
                )
                counts = np.array([(p.nsnp, p.hethet, p.ibs0) for p in batch], np.int64)
                sink.write("".join(genome_output.kin0_lines(first, second, kinship, counts)))
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(path)


def _pairs(
    spec: dict[str, Any], metric: str, inputs: Cohort, block: np.ndarray, row_start: int
) -> list[jobs.NewPair]:
    """Pairs of this tile above the job's kinship threshold (each unordered pair once)."""
    all_pairs = not spec.get("query")
    found = genome_output.related_pairs(
        block,
        threshold=float(spec.get("threshold", genome_output.THIRD_DEGREE_MIN_KINSHIP)),
        row_offset=row_start,
        upper_only=all_pairs,
        # Query i and cohort i are two different samples (the diagonal is no self-pair here).
        keep_diagonal=not all_pairs,
    )
    q, c = inputs.query, inputs.cohort
    # Below third degree (a threshold under 2^-4.5) there is no degree to infer: "unrelated".
    return [
        jobs.NewPair(p.i, p.j, (q.fid[p.i], q.iid[p.i]), (c.fid[p.j], c.iid[p.j]), p.kinship,
                     p.degree or "unrelated")
        for p in found
    ]  # fmt: skip


def finish_job(sessions: sessionmaker[Session], job_id: int) -> None:
    """Write the PLINK-format outputs from the tiles, in order."""
    with session_scope(sessions) as session:
        job = jobs.get_job(session, job_id=job_id)
        assert job is not None
        spec, metric, prefix, tiles = dict(job.spec), job.metric, job.output_prefix, job.tiles_total
    if spec.get("output") == "pairs":
        if spec.get("min_maf") is not None:
            _record_variants_used(sessions, job_id, pair_inputs(spec).cohort.n_variants)
        job_dir(prefix).mkdir(parents=True, exist_ok=True)
        write_pairs_table(
            sessions, job_id=job_id, path=Path(prefix + ".kin0"), query=bool(spec.get("query"))
        )
        return
    inputs = load_inputs(spec, metric)
    if spec.get("min_maf") is not None:
        _record_variants_used(sessions, job_id, inputs.cohort.n_variants)
    write_outputs(
        prefix, metric, tiles, inputs, query=bool(spec.get("query")),
        with_fid=not vcf.is_vcf(str(spec["bfile"])),
    )  # fmt: skip
    if metric == "king":
        with session_scope(sessions) as session:
            rows = jobs.list_pairs(session, job_id=job_id, limit=10**9)
            pairs = [
                genome_output.RelatedPair(
                    r.row, r.col, math.nan if r.kinship is None else r.kinship, None
                )
                for r in rows
            ]
        ids = list(zip(inputs.cohort.fid, inputs.cohort.iid, strict=True))
        dosages = inputs.cohort.dosages
        if spec.get("query"):
            # One table over query then cohort samples: query i is row i, cohort j is
            # row n_query + j, so write_kin0 and king_pair_counts serve both modes.
            offset = inputs.query.n_samples
            ids = list(zip(inputs.query.fid, inputs.query.iid, strict=True)) + ids
            dosages = np.concatenate([inputs.query.dosages, dosages])
            pairs = [genome_output.RelatedPair(p.i, offset + p.j, p.kinship, None) for p in pairs]
        counts = genome_output.king_pair_counts(dosages, [(p.i, p.j) for p in pairs])
        sources = [spec["bfile"], *([spec["query"]] if spec.get("query") else [])]
        with_fid = not all(vcf.is_vcf(str(source)) for source in sources)
        genome_output.write_kin0(
            Path(prefix + ".kin0"), pairs, ids, counts=counts, with_fid=with_fid
        )


def _record_variants_used(sessions: sessionmaker[Session], job_id: int, n_variants: int) -> None:
    """The job's ``n_variants`` as its tiles used them (``min_maf`` dropped some)."""
    with session_scope(sessions) as session:
        jobs.set_variants_used(session, job_id=job_id, n_variants=n_variants)


#: PLINK's file kind of each metric's square matrix (``dot`` has none: .npy only).
PLINK_KIND: dict[str, genome_output.MatrixKind] = {"grm": "rel", "king": "king", "ibs": "mibs"}


def write_outputs(
    prefix: str, metric: str, tiles: int, inputs: Cohort, *, query: bool, with_fid: bool = True
) -> None:
    """The job's matrix from its tiles, streamed in order: PLINK's square text format for an
    all-pairs grm/king/ibs job (with its .id: IIDs alone, as plink2's, for a VCF cohort, where
    ``with_fid`` is False), and always ``{prefix}.npy`` (float64)."""
    blocks = [tile_path(prefix, i) for i in range(tiles)]
    n_cols = inputs.cohort.n_samples
    n_rows = inputs.query.n_samples
    npy = Path(prefix + ".npy")
    tmp = npy.with_name(npy.name + ".part")
    full = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=(n_rows, n_cols))
    kind = PLINK_KIND.get(metric) if not query else None
    ids = list(zip(inputs.cohort.fid, inputs.cohort.iid, strict=True))
    writer = genome_output.MatrixWriter(prefix, ids, kind=kind, with_fid=with_fid) if kind else None
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


TILES = tiled.JobKind(
    GENOME, compute_tile, store_pairs, finish_job, options=lambda s: {"device": s.device}
)
genome_tile_task = tiled.register(TILES)


def run_tile(sessions: sessionmaker[Session], *, job_id: int, index: int, device: str) -> str:
    return TILES.run_tile(sessions, job_id=job_id, index=index, device=device)


def run_inline(
    sessions: sessionmaker[Session], *, job_id: int, device: str, progress: bool = False
) -> dict[str, Any]:
    return TILES.run_inline(sessions, job_id=job_id, progress=progress, device=device)
