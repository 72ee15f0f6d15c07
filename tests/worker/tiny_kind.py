"""A third tiled job kind in one module, as docs/adding-a-job-kind.md shows: the squares of
0..n-1, in tiles of rows; each tile stores its squares, the job writes their sum to a file.

Its tables live in a metadata of their own (the service's migrations know nothing of them); the
test creates them beside the service's tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import ForeignKey, MetaData, String, UniqueConstraint, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from db import tiles
from db.engine import session_scope
from db.tables import Base, Id, TiledJob
from worker import tiled

KIND, TASK, QUEUE = "tiny", "medbatch.tests.tiny_tile", "tiny"


class TinyBase(DeclarativeBase):
    metadata = MetaData(naming_convention=Base.metadata.naming_convention)
    type_annotation_map = Base.type_annotation_map


class TinyJob(TiledJob, TinyBase):
    """The kind's job table: the shared columns, and where its output goes."""

    __tablename__ = "tiny_jobs"

    output_dir: Mapped[str] = mapped_column(String(500))


class Square(TinyBase):
    """A tile's results: one row per number."""

    __tablename__ = "tiny_squares"
    __table_args__ = (UniqueConstraint("job_id", "i"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("tiny_jobs.id", ondelete="CASCADE"))
    i: Mapped[int]
    square: Mapped[int]


@dataclass(frozen=True)
class NewSquare:
    """A tile's result row, typed (``columns()`` is what the ledger inserts)."""

    i: int
    square: int

    def columns(self) -> dict[str, int]:
        return asdict(self)


def compute(tile: tiled.Tile, options: Mapping[str, Any]) -> list[NewSquare]:
    if tile.spec.get("fail_at") in range(tile.rows.start, tile.rows.stop):
        raise ValueError(f"asked to fail at {tile.spec['fail_at']}")
    return [NewSquare(i, i * i) for i in range(tile.rows.start, tile.rows.stop)]


def store(session: Session, job_id: int, rows: list[NewSquare]) -> None:
    tiles.add_results(session, Square, job_id=job_id, rows=rows, key=("job_id", "i"))


def finish(sessions: sessionmaker[Session], job_id: int) -> None:
    with session_scope(sessions) as session:
        job = session.get(TinyJob, job_id)
        assert job is not None
        total = sum(session.scalars(select(Square.square).where(Square.job_id == job_id)))
        folder = Path(job.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sum.txt").write_text(f"{total}\n")


TINY = tiled.Kind(KIND, TinyJob, TASK, QUEUE, lambda job: describe(job))
tiny_tile_task = tiled.register(tiled.JobKind(TINY, compute, store, finish))


def submit(
    sessions: sessionmaker[Session],
    app: Celery | None,
    *,
    tenant_id: int,
    n: int,
    tile_rows: int,
    out: Path,
    fail_at: int | None = None,
) -> dict[str, Any]:
    if n < 1:
        raise tiled.SubmissionError("n", f"must be at least 1, got {n}")
    job = TinyJob(tenant_id=tenant_id, spec={"n": n, "fail_at": fail_at}, output_dir=str(out))
    bounds = tiles.row_tiles(n, tile_rows)
    return TINY.record(sessions, app, lambda s: tiles.add_job(s, job, kind=KIND, tiles=bounds))


def describe(job: TinyJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": str(job.status),
        "tiles_total": job.tiles_total,
        "tiles_done": job.tiles_done,
        "error": job.error,
    }


def describe_id(sessions: sessionmaker[Session], job_id: int) -> dict[str, Any]:
    return TINY.describe_id(sessions, job_id)


def main() -> None:
    """A worker for this kind alone, settings from the environment (the test starts it)."""
    import sys

    from medbatch.settings import Settings
    from worker.app import create_app, run_worker, worker_argv

    settings = Settings()
    sys.exit(run_worker(create_app(settings), worker_argv(settings, queues=(QUEUE,))))


if __name__ == "__main__":
    main()
