"""Compound-similarity searches as the API and the CLI see them: a submission read and
fingerprinted (to report what RDKit cannot read), recorded with its tiles of query rows and sent;
a job described. The tiles are computed by worker/tasks/compounds.py.

RDKit is loaded by the first submission, never when the API starts (``make lint`` checks that
nothing else reaches it).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from db import compounds as jobs
from db.tables import CompoundJob
from worker import tiled
from worker.queues import CHEM_QUEUE, CHEM_TASK
from worker.tiled import SubmissionError

if TYPE_CHECKING:
    from models.compounds import chem

__all__ = [
    "SubmissionError",
    "describe",
    "describe_id",
    "load",
    "search_options",
    "submit",
    "wait",
]

#: Failures reported with a job (the count is always complete).
MAX_REPORTED_FAILURES = 100


def read_molecules(
    path: Path, *, smiles_column: str = "smiles", id_column: str | None = None
) -> chem.Molecules:
    """A SMILES file (``.smi``, ``.txt``, ``.gz``), an SDF (``.sdf``; ids from its ``id_column``
    data item where a record has one, else its title) or a CSV (``.csv``; ids from
    ``id_column``, else its ``id`` column if it has one, else line numbers)."""
    from models.compounds import chem  # RDKit: loaded by the first submission

    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".sdf", ".mol")):
        return chem.read_sdf(path, id_field=id_column)
    if name.endswith(".csv"):
        return chem.read_csv(path, smiles_column=smiles_column, id_column=id_column)
    return chem.read_smiles(path)


@lru_cache(maxsize=4)
def _fingerprints(
    path: str,
    mtime: float,
    kind: str,
    radius: int,
    fp_size: int,
    smiles_column: str,
    id_column: str | None = None,
) -> tuple[chem.Fingerprints, tuple[chem.ParseFailure, ...]]:
    """A file's fingerprints, computed once per worker process (its tiles share them)."""
    from models.compounds import chem

    molecules = read_molecules(Path(path), smiles_column=smiles_column, id_column=id_column)
    fps = chem.fingerprints(molecules, kind=kind, radius=radius, fp_size=fp_size)  # type: ignore[arg-type]
    return fps, molecules.failures


def _stamp(path: Path) -> list[int]:
    """What tells a file changed: its mtime (ns) and size."""
    stat = path.stat()
    return [stat.st_mtime_ns, stat.st_size]


def _changed(stamp: list[int], submitted: list[int]) -> bool:
    """Another size, or an mtime a second or more apart (hosts that share the folder may keep
    mtimes at a coarser grain than the one that submitted)."""
    return stamp[1] != submitted[1] or abs(stamp[0] - submitted[0]) >= 1_000_000_000


def load(spec: dict[str, Any], which: str) -> tuple[chem.Fingerprints, tuple[Any, ...]]:
    """The fingerprints of the job's ``which`` file, as it was when the job was submitted (a
    tile's rows are rows of that file: one changed since would pair them with other molecules)."""
    path = Path(spec[which])
    stamp = _stamp(path)
    if (submitted := spec.get("stamps", {}).get(which)) is not None and _changed(stamp, submitted):
        raise ValueError(f"{which} {path} changed since the search was submitted: submit it again")
    return _fingerprints(
        str(path),
        stamp[0] / 1e9,
        spec["kind"],
        spec["radius"],
        spec["fp_size"],
        spec.get("smiles_column", "smiles"),
        spec.get("id_column"),
    )


def default_tile_rows(n_library: int) -> int:
    """About 200 million pairs a tile (seconds of GEMM)."""
    return max(1, 200_000_000 // max(n_library, 1))


def search_options(given: Any) -> dict[str, Any]:
    """:func:`submit`'s search options from an API request or a command line, which name them
    alike (``fingerprint``, ``bits``: the fingerprint's kind and size)."""
    return {
        "top_k": given.top_k,
        "threshold": given.threshold,
        "metric": given.metric,
        "kind": given.fingerprint,
        "radius": given.radius,
        "fp_size": given.bits,
        "smiles_column": given.smiles_column,
        "id_column": given.id_column,
    }


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
    id_column: str | None = None,
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
    # The API's bounds, for the command line too (a negative radius was a traceback).
    if not 0 <= radius <= 6:
        raise SubmissionError("radius", f"must be between 0 and 6, got {radius}")
    if not 64 <= fp_size <= 16384:
        raise SubmissionError("bits", f"must be between 64 and 16384, got {fp_size}")
    if tile_rows < 0:  # a negative one cut the last rows off the only tile
        raise SubmissionError("tile_rows", f"must be 0 (automatic) or more, got {tile_rows}")
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
        "id_column": id_column,
    }
    counts = {}
    repeated = {}
    failures: list[str] = []
    for which in ("library", "query"):
        if spec[which] is None:
            continue
        if Path(spec[which]).is_dir():  # it was "not found", though it is there
            raise SubmissionError(which, f"{spec[which]} is a folder: give a .smi, .sdf or .csv")
        if not Path(spec[which]).is_file():
            raise SubmissionError(which, f"{spec[which]} not found")
        try:
            spec.setdefault("stamps", {})[which] = _stamp(Path(spec[which]))
            fps, failed = load(spec, which)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise SubmissionError(which, str(exc)) from None
        if len(fps.popcounts) == 0:
            why = (
                f"; {len(failed)} records RDKit could not read, the first: {failed[0]}"
                if failed
                else ""
            )
            raise SubmissionError(which, f"{spec[which]}: no molecule could be read{why}")
        counts[which] = len(fps.popcounts)
        failures += [str(f) for f in failed]
        # Neighbours are named by ids: one that names several molecules leaves them ambiguous.
        repeated[which] = len(fps.ids) - len(set(fps.ids))
    spec["unreadable"] = len(failures)
    spec["unreadable_examples"] = failures[:MAX_REPORTED_FAILURES]
    spec["repeated_ids"] = repeated
    n_library = counts["library"]
    sizes = {"n_query": counts.get("query", n_library), "n_library": n_library}
    root = str(artifact_dir.resolve())
    rows = tile_rows or default_tile_rows(n_library)
    return COMPOUNDS.record(
        sessions,
        app,
        lambda s: jobs.create_job(
            s, tenant_id=tenant_id, spec=spec, tile_rows=rows, artifact_root=root, **sizes
        ),
    )


def _fingerprint(spec: dict[str, Any]) -> str:
    """The fingerprint in words; a radius only for the Morgan kinds (the others have none)."""
    radius = f" r={spec['radius']}" if spec["kind"] in ("morgan", "feature-morgan") else ""
    return f"{spec['kind']}{radius} {spec['fp_size']} bits"


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
        "fingerprint": _fingerprint(spec),
        "all_pairs": spec["all_pairs"],
        "n_query": job.n_query,
        "n_library": job.n_library,
        "unreadable": spec.get("unreadable", 0),
        "unreadable_examples": spec.get("unreadable_examples", [])[:10],
        "repeated_ids": spec.get("repeated_ids", {}),
        "tiles_total": job.tiles_total,
        "tiles_done": job.tiles_done,
        "error": job.error,
        "output": str(csv_path) if job.status == "done" and csv_path else None,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
    }


COMPOUNDS = tiled.Kind(jobs.KIND, CompoundJob, CHEM_TASK, CHEM_QUEUE, describe)
describe_id = COMPOUNDS.describe_id
wait = COMPOUNDS.wait
