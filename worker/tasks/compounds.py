"""Compound-similarity searches as Celery tasks: tiles of query rows on the ``chem`` queue.

The same ledger as the genome jobs (:mod:`db.genome`): each tile is its own message, counts
itself once, and writes its neighbours to SQL; the tile that completes the count writes the
neighbours table as a CSV in the artifact store and settles the job.
"""

from __future__ import annotations

import csv
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Celery, shared_task
from celery.exceptions import Reject
from sqlalchemy.orm import Session, sessionmaker

from db import compounds as jobs
from db import genome as ledger
from db.engine import session_scope
from db.leases import TileKey
from db.tables import CompoundJob, CompoundTile
from models.compounds import chem
from models.device import Device
from worker import tiles as tiled
from worker.context import context
from worker.queues import CHEM_QUEUE, CHEM_TASK

log = logging.getLogger(__name__)

MAX_TILE_ATTEMPTS = 3
#: Failures reported with a job (the count is always complete).
MAX_REPORTED_FAILURES = 100


class SubmissionError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def read_molecules(path: Path, *, smiles_column: str = "smiles") -> chem.Molecules:
    """A SMILES file (``.smi``, ``.txt``, ``.gz``), an SDF (``.sdf``) or a CSV (``.csv``)."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".sdf", ".mol")):
        return chem.read_sdf(path)
    if name.endswith(".csv"):
        return chem.read_csv(path, smiles_column=smiles_column)
    return chem.read_smiles(path)


@lru_cache(maxsize=4)
def _fingerprints(
    path: str, mtime: float, kind: str, radius: int, fp_size: int, smiles_column: str
) -> tuple[chem.Fingerprints, tuple[chem.ParseFailure, ...]]:
    """A file's fingerprints, computed once per worker process (its tiles share them)."""
    molecules = read_molecules(Path(path), smiles_column=smiles_column)
    fps = chem.fingerprints(molecules, kind=kind, radius=radius, fp_size=fp_size)  # type: ignore[arg-type]
    return fps, molecules.failures


def load(spec: dict[str, Any], which: str) -> tuple[chem.Fingerprints, tuple[Any, ...]]:
    path = Path(spec[which])
    return _fingerprints(
        str(path),
        path.stat().st_mtime,
        spec["kind"],
        spec["radius"],
        spec["fp_size"],
        spec.get("smiles_column", "smiles"),
    )


def _rows(fps: chem.Fingerprints, rows: slice) -> chem.Fingerprints:
    return chem.Fingerprints(fps.bits[rows], fps.popcounts[rows], fps.n_bits, tuple(fps.ids[rows]))


def search_tile(
    spec: dict[str, Any],
    rows: slice,
    device: Device,
    engine: chem.Engine = "auto",
    engine_cache: Path | None = None,
) -> list[dict[str, Any]]:
    """The neighbours of query rows ``rows``: top-k (ranked) or everything ≥ the threshold.

    ``engine`` is ``MEDBATCH_CHEM_ENGINE``; ``auto`` is settled once per process (its probe
    verdict kept in ``engine_cache``)."""
    engine = chem.resolve_engine(engine, device=device, cache=engine_cache)
    library, _ = load(spec, "library")
    query = library if spec["all_pairs"] else load(spec, "query")[0]
    block = _rows(query, rows)
    found: list[dict[str, Any]] = []
    metric = spec["metric"]
    if spec["mode"] == "top_k":
        k = int(spec["k"]) + (1 if spec["all_pairs"] else 0)  # room for the query itself
        result = chem.top_k(block, library, k, metric=metric, device=device, engine=engine)
        for i in range(len(block.popcounts)):
            q = rows.start + i
            rank = 0
            for j, score in zip(result.index[i], result.score[i], strict=True):
                if j < 0 or (spec["all_pairs"] and j == q) or rank == int(spec["k"]):
                    continue
                rank += 1
                found.append(_row(q, int(j), float(score), rank, query, library))
        return found
    hits = chem.threshold_search(
        block, library, float(spec["threshold"]), metric=metric, device=device, engine=engine
    )
    rank, last = 0, -1
    for qi, j, score in zip(hits.query, hits.library, hits.score, strict=True):
        q = rows.start + int(qi)
        if spec["all_pairs"] and int(j) == q:
            continue
        rank = rank + 1 if q == last else 1
        last = q
        found.append(_row(q, int(j), float(score), rank, query, library))
    return found


def _row(
    q: int, j: int, score: float, rank: int, query: chem.Fingerprints, library: chem.Fingerprints
) -> dict[str, Any]:
    return {
        "query_index": q,
        "library_index": j,
        "query_id": query.ids[q],
        "library_id": library.ids[j],
        "similarity": score,
        "rank": rank,
    }


def run_tile(
    sessions: sessionmaker[Session],
    *,
    job_id: int,
    index: int,
    device: Device,
    engine: chem.Engine = "auto",
    engine_cache: Path | None = None,
) -> str:
    with session_scope(sessions) as session:
        job = jobs.get_job(session, job_id=job_id)
        tile = ledger.get_tile(session, job_id=job_id, index=index, tile=CompoundTile)
        if job is None or tile is None:
            return "unknown"
        if tile.status == "done" or job.status in ("done", "failed"):
            return "already done"
        ledger.start_tile(session, tile, job=CompoundJob)
        spec, rows, attempts = dict(job.spec), slice(tile.row_start, tile.row_end), tile.attempts
    try:
        found = search_tile(spec, rows, device, engine, engine_cache)
    except Exception as exc:
        reason = f"tile {index} (queries {rows.start}:{rows.stop}): {type(exc).__name__}: {exc}"
        log.warning("compound job %d: %s (attempt %d)", job_id, reason, attempts)
        if attempts >= MAX_TILE_ATTEMPTS or isinstance(exc, (ValueError, FileNotFoundError)):
            with session_scope(sessions) as session:
                ledger.settle_job(session, job_id=job_id, error=reason, job=CompoundJob)
            return "failed"
        raise
    with session_scope(sessions) as session:
        jobs.add_neighbours(session, job_id=job_id, rows=found)
        done = ledger.finish_tile(
            session, job_id=job_id, index=index, job=CompoundJob, tile=CompoundTile
        )
        total = session.get(CompoundJob, job_id).tiles_total  # type: ignore[union-attr]
    if done is not None and done == total:
        finish_job(sessions, job_id=job_id)
        return "finished job"
    return "tile done"


def finish_job(sessions: sessionmaker[Session], *, job_id: int) -> None:
    """Write ``neighbours.csv`` (query id, library id, similarity, rank) and settle the job."""
    with session_scope(sessions) as session:
        job = jobs.get_job(session, job_id=job_id)
        assert job is not None
        folder = Path(job.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "neighbours.csv"
        part = target.with_name(target.name + ".part")
        after = 0
        with part.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["query_id", "library_id", "similarity", "rank"])
            while batch := jobs.list_neighbours(
                session, job_id=job_id, after_id=after, limit=50_000
            ):
                ordered = sorted(batch, key=lambda n: (n.query_index, n.rank))
                writer.writerows(
                    (n.query_id, n.library_id, repr(n.similarity), n.rank) for n in ordered
                )
                after = batch[-1].id
        part.replace(target)
        ledger.settle_job(session, job_id=job_id, job=CompoundJob)


def default_tile_rows(n_library: int) -> int:
    """About 200 million pairs a tile (seconds of GEMM)."""
    return max(1, 200_000_000 // max(n_library, 1))


def submit(
    sessions: sessionmaker[Session],
    app: Celery | None,
    *,
    tenant_id: int,
    library: Path,
    query: Path | None,
    top_k: int | None = None,
    threshold: float | None = None,
    metric: str = "tanimoto",
    kind: str = "morgan",
    radius: int = 2,
    fp_size: int = 2048,
    smiles_column: str = "smiles",
    tile_rows: int = 0,
    artifact_dir: Path,
) -> dict[str, Any]:
    """Read and fingerprint the inputs (reporting what RDKit cannot read), record the job and
    its tiles, then send one ``chem`` message per tile (none without ``app``)."""
    if (top_k is None) == (threshold is None):
        raise SubmissionError("mode", "give exactly one of top_k and threshold")
    if top_k is not None and not 1 <= top_k <= 1000:
        raise SubmissionError("top_k", f"must be between 1 and 1000, got {top_k}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise SubmissionError("threshold", f"must be between 0 and 1, got {threshold}")
    spec: dict[str, Any] = {
        "library": str(library.resolve()),
        "query": None if query is None else str(query.resolve()),
        "all_pairs": query is None,
        "mode": "top_k" if top_k is not None else "threshold",
        "k": top_k,
        "threshold": threshold,
        "metric": metric,
        "kind": kind,
        "radius": radius,
        "fp_size": fp_size,
        "smiles_column": smiles_column,
    }
    counts = {}
    failures: list[str] = []
    for which in ("library", "query"):
        if spec[which] is None:
            continue
        if not Path(spec[which]).is_file():
            raise SubmissionError(which, f"{spec[which]} not found")
        try:
            fps, failed = load(spec, which)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise SubmissionError(which, str(exc)) from None
        if len(fps.popcounts) == 0:
            raise SubmissionError(which, f"{spec[which]}: no molecule could be read")
        counts[which] = len(fps.popcounts)
        failures += [str(f) for f in failed]
    spec["unreadable"] = len(failures)
    spec["unreadable_examples"] = failures[:MAX_REPORTED_FAILURES]
    n_query = counts.get("query", counts["library"])
    with session_scope(sessions) as session:
        job = jobs.create_job(
            session,
            tenant_id=tenant_id,
            spec=spec,
            n_query=n_query,
            n_library=counts["library"],
            tile_rows=tile_rows or default_tile_rows(counts["library"]),
            artifact_root=str(artifact_dir.resolve()),
        )
        summary = describe(job)
    if app is not None:
        for index in range(summary["tiles_total"]):
            app.send_task(
                CHEM_TASK, args=[summary["id"], index], queue=CHEM_QUEUE, routing_key=CHEM_QUEUE
            )
    return summary


def run_inline(
    sessions: sessionmaker[Session],
    *,
    job_id: int,
    device: Device,
    progress: bool = False,
    engine: chem.Engine = "auto",
    engine_cache: Path | None = None,
) -> dict[str, Any]:
    """Compute every tile of a job in this process (no worker), the same way a worker does."""
    return tiled.run_inline(
        lambda index: run_tile(
            sessions,
            job_id=job_id,
            index=index,
            device=device,
            engine=engine,
            engine_cache=engine_cache,
        ),
        lambda: describe_id(sessions, job_id),
        progress=progress,
    )


def wait(sessions: sessionmaker[Session], *, job_id: int, progress: bool = False) -> dict[str, Any]:
    """Follow a job the workers run until it is done or failed."""
    return tiled.follow(lambda: describe_id(sessions, job_id), progress=progress)


def describe_id(sessions: sessionmaker[Session], job_id: int) -> dict[str, Any]:
    with session_scope(sessions) as session:
        job = jobs.get_job(session, job_id=job_id)
        assert job is not None
        return describe(job)


def describe(job: CompoundJob) -> dict[str, Any]:
    spec = job.spec
    csv_path = Path(job.output_dir) / "neighbours.csv" if job.output_dir else None
    return {
        "id": job.id,
        "status": str(job.status),
        "mode": spec["mode"],
        "top_k": spec["k"],
        "threshold": spec["threshold"],
        "metric": spec["metric"],
        "fingerprint": f"{spec['kind']} r={spec['radius']} {spec['fp_size']} bits",
        "all_pairs": spec["all_pairs"],
        "n_query": job.n_query,
        "n_library": job.n_library,
        "unreadable": spec.get("unreadable", 0),
        "unreadable_examples": spec.get("unreadable_examples", [])[:10],
        "tiles_total": job.tiles_total,
        "tiles_done": job.tiles_done,
        "error": job.error,
        "output": str(csv_path) if job.status == "done" and csv_path else None,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
    }


@shared_task(bind=True, name=CHEM_TASK, acks_late=True)
def compound_tile_task(self: Any, *args: object) -> str:
    ids = [a for a in args if isinstance(a, int) and not isinstance(a, bool) and a >= 0]
    if len(args) != 2 or len(ids) != 2:
        raise Reject("expected two arguments: job id and tile index", requeue=False)
    ctx = context(self.app)
    settings = ctx.settings
    # Leased while it runs: a dead worker's tile goes back to the queue (worker/sweeper.py).
    with ctx.leases.tile(TileKey("chem", ids[0], ids[1])) as held:
        if not held:
            return "done or held by another worker"
        return run_tile(
            ctx.sessions,
            job_id=ids[0],
            index=ids[1],
            device=settings.device,
            engine=settings.chem_engine,
            engine_cache=settings.chem_engine_cache,
        )
