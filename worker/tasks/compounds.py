"""Compound-similarity searches as Celery tasks: tiles of query rows on the ``chem`` queue.

The kind's tiles, as worker/tiled.py runs them: each tile finds the neighbours of its query rows
(top-k or above a threshold) and stores them in SQL; the job is finished by writing the
neighbours table as a CSV in the artifact store. Submission and description: worker/jobs/compounds.py.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import compounds as jobs
from db.engine import session_scope
from models.compounds import chem
from models.device import Device
from worker import tiled
from worker.jobs.compounds import (  # noqa: F401  (the kind's API, used with its tasks)
    COMPOUNDS,
    SubmissionError,
    describe,
    describe_id,
    load,
    read_molecules,
    search_options,
    submit,
    wait,
)


def _rows(fps: chem.Fingerprints, rows: slice) -> chem.Fingerprints:
    return chem.Fingerprints(fps.bits[rows], fps.popcounts[rows], fps.n_bits, tuple(fps.ids[rows]))


def search_tile(
    spec: dict[str, Any],
    rows: slice,
    device: Device,
    engine: chem.Engine = "auto",
    engine_cache: Path | None = None,
) -> list[jobs.NewNeighbour]:
    """The neighbours of query rows ``rows``: top-k (ranked) or everything ≥ the threshold.

    ``engine`` is ``MEDBATCH_CHEM_ENGINE``; ``auto`` is settled once per process (its probe
    verdict kept in ``engine_cache``)."""
    engine = chem.resolve_engine(engine, device=device, cache=engine_cache)
    library, _ = load(spec, "library")
    query = library if spec["all_pairs"] else load(spec, "query")[0]
    block = _rows(query, rows)
    found: list[jobs.NewNeighbour] = []
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
) -> jobs.NewNeighbour:
    return jobs.NewNeighbour(q, j, query.ids[q], library.ids[j], score, rank)


def store_neighbours(session: Session, job_id: int, rows: list[jobs.NewNeighbour]) -> None:
    jobs.add_neighbours(session, job_id=job_id, rows=rows)


def compute_tile(tile: tiled.Tile, options: Mapping[str, Any]) -> list[jobs.NewNeighbour]:
    return search_tile(
        dict(tile.spec), tile.rows, options["device"], options["engine"], options["engine_cache"]
    )


def finish_job(sessions: sessionmaker[Session], job_id: int) -> None:
    """Write ``neighbours.csv`` (query id, library id, similarity, rank) (the ledger settles the job)."""
    with session_scope(sessions) as session:
        job = jobs.get_job(session, job_id=job_id)
        assert job is not None
        folder = Path(job.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "neighbours.csv"
        part = target.with_name(target.name + ".part")
        after = (-1, 0)
        with part.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["query_id", "library_id", "similarity", "rank"])
            # By query row and rank across the whole file: tiles stored out of order (workers
            # finish them in any order) were sorted only within each batch of 50,000 rows.
            while batch := jobs.neighbours_in_order(session, job_id=job_id, after=after):
                writer.writerows(
                    (n.query_id, n.library_id, repr(n.similarity), n.rank) for n in batch
                )
                after = (batch[-1].query_index, batch[-1].rank)
        part.replace(target)


TILES = tiled.JobKind(
    COMPOUNDS,
    compute_tile,
    store_neighbours,
    finish_job,
    options=lambda s: {
        "device": s.device,
        "engine": s.chem_engine,
        "engine_cache": s.chem_engine_cache,
    },
    rows_name="queries",
)
compound_tile_task = tiled.register(TILES)


def run_tile(
    sessions: sessionmaker[Session],
    *,
    job_id: int,
    index: int,
    device: Device,
    engine: chem.Engine = "auto",
    engine_cache: Path | None = None,
) -> str:
    options = {"device": device, "engine": engine, "engine_cache": engine_cache}
    return TILES.run_tile(sessions, job_id=job_id, index=index, **options)


def run_inline(
    sessions: sessionmaker[Session],
    *,
    job_id: int,
    device: Device,
    progress: bool = False,
    engine: chem.Engine = "auto",
    engine_cache: Path | None = None,
) -> dict[str, Any]:
    options = {"device": device, "engine": engine, "engine_cache": engine_cache}
    return TILES.run_inline(sessions, job_id=job_id, progress=progress, **options)
