"""Migration 0015 on PostgreSQL: tiles in the old per-kind tables move into job_tiles and back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from alembic import command
from sqlalchemy import text

from db.engine import make_engine
from db.migrate import alembic_config, upgrade
from tests.conftest import PG_ADMIN_URL, _pg_url

pytestmark = pytest.mark.integration


@pytest.fixture
def at_0013() -> Iterator[str]:
    """A fresh PostgreSQL database migrated to 0013, dropped afterwards."""
    name = f"medbatch_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _pg_url(name)
    try:
        upgrade(url, "0013")
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_OLD_ROWS = """
INSERT INTO tenants (id, name, api_key_sha256, created_at) VALUES (1, 't', 'k', now());
INSERT INTO genome_jobs (id, tenant_id, metric, status, spec, n_samples, n_rows, n_variants,
    tiles_total, tiles_done, output_prefix, created_at, updated_at)
    VALUES (7, 1, 'king', 'running', '{}', 4, 4, 10, 2, 1, '/x/genome/7/king', now(), now());
INSERT INTO genome_tiles (job_id, "index", row_start, row_end, col_start, col_end, status,
    attempts, lease_owner, lease_expires_at, updated_at) VALUES
    (7, 0, 0, 2, 0, 2, 'done', 1, NULL, NULL, now()),
    (7, 1, 0, 2, 2, 4, 'running', 2, 'host:1', '2026-12-03 12:00:00+00', now());
INSERT INTO genome_pairs (job_id, "row", col, fid1, iid1, fid2, iid2, kinship, degree)
    VALUES (7, 0, 1, 'f', 'a', 'f', 'b', 0.25, '1st');
INSERT INTO compound_jobs (id, tenant_id, status, spec, n_query, n_library, tiles_total,
    tiles_done, output_dir, created_at, updated_at)
    VALUES (7, 1, 'queued', '{}', 3, 3, 1, 0, '/x/compounds/7', now(), now());
INSERT INTO compound_tiles (job_id, "index", row_start, row_end, status, attempts, updated_at)
    VALUES (7, 0, 0, 3, 'queued', 0, now());
"""

_TILES = (
    'SELECT kind, job_id, "index", row_start, row_end, col_start, col_end, status, attempts, '
    'lease_owner FROM job_tiles ORDER BY kind, job_id, "index"'
)


def test_0015_keeps_every_tile_and_job_and_goes_back(at_0013: str) -> None:
    """Tiles of both kinds keep bounds, status, attempts and leases; jobs and pairs are untouched;
    the downgrade puts the tiles back where they were."""
    engine = make_engine(at_0013)
    try:
        with engine.begin() as conn:
            for statement in filter(str.strip, _OLD_ROWS.split(";")):
                conn.execute(text(statement))
        upgrade(at_0013, "0015")
        with engine.connect() as conn:
            tiles = [tuple(r) for r in conn.execute(text(_TILES))]
            jobs = conn.execute(text("SELECT count(*) FROM genome_jobs")).scalar_one()
            chem = conn.execute(text("SELECT count(*) FROM compound_jobs")).scalar_one()
            pairs = conn.execute(text("SELECT count(*) FROM genome_pairs")).scalar_one()
            old = conn.execute(text("SELECT to_regclass('genome_tiles')")).scalar_one()
        assert tiles == [
            ("chem", 7, 0, 0, 3, None, None, "queued", 0, None),
            ("genome", 7, 0, 0, 2, 0, 2, "done", 1, None),
            ("genome", 7, 1, 0, 2, 2, 4, "running", 2, "host:1"),
        ]
        assert (jobs, chem, pairs, old) == (1, 1, 1, None)

        command.downgrade(alembic_config(at_0013), "0013")
        with engine.connect() as conn:
            genome = conn.execute(
                text(
                    'SELECT job_id, "index", col_start, col_end, status, attempts, lease_owner '
                    'FROM genome_tiles ORDER BY "index"'
                )
            ).all()
            compound = conn.execute(
                text('SELECT job_id, "index", row_end, status FROM compound_tiles')
            ).all()
            new = conn.execute(text("SELECT to_regclass('job_tiles')")).scalar_one()
        assert [tuple(r) for r in genome] == [
            (7, 0, 0, 2, "done", 1, None),
            (7, 1, 2, 4, "running", 2, "host:1"),
        ]
        assert [tuple(r) for r in compound] == [(7, 0, 3, "queued")]
        assert new is None
    finally:
        engine.dispose()
