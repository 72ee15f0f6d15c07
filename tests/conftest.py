"""Fixtures on the real services: a fresh PostgreSQL database per session, SQLite files, and a
Redis database number of our own, flushed around every test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
import redis
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_sessionmaker
from db.migrate import upgrade

PG_ADMIN_URL = os.environ.get(
    "MEDBATCH_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_TEST_URL = os.environ.get("MEDBATCH_TEST_REDIS", "redis://127.0.0.1:6379/11")


def _pg_url(database: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database created for this test session, migrated, and dropped at the end."""
    name = f"medbatch_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _pg_url(name)
    upgrade(url)
    yield url
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'medbatch.sqlite'}"
    upgrade(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs once on PostgreSQL and once on SQLite."""
    return str(request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url"))


def _empty_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(
                text(
                    "TRUNCATE compound_neighbours, job_tiles, compound_jobs, audit_events, "
                    "api_keys, api_clients, idempotency_keys, genome_pairs, "
                    "genome_jobs, explanations, scores, "
                    "batches, cases, "
                    "tenants RESTART IDENTITY CASCADE"
                )
            )
        else:
            for table in (
                "compound_neighbours",
                "job_tiles",
                "compound_jobs",
                "audit_events",
                "api_keys",
                "api_clients",
                "idempotency_keys",
                "genome_pairs",
                "genome_jobs",
                "explanations",
                "scores",
                "batches",
                "cases",
                "tenants",
            ):
                conn.execute(text(f"DELETE FROM {table}"))


def _clean_engine(url: str) -> Iterator[Engine]:
    """An engine on empty tables, emptied again afterwards."""
    engine = make_engine(url)
    try:
        _empty_tables(engine)
        yield engine
        _empty_tables(engine)
    finally:
        engine.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    yield from _clean_engine(db_url)


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    yield from _clean_engine(pg_url)


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


@pytest.fixture
def pg_sessions(pg_engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(pg_engine)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The test Redis database, empty before and after each test."""
    client = redis.Redis.from_url(REDIS_TEST_URL)
    client.flushdb()
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Sets environment variables for ``medbatch.cli.main`` run in this process: main() reads its
    settings once per process, so the cached ones are dropped at each change and afterwards."""
    from medbatch.settings import get_settings

    def set_env(**env: str) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield set_env
    get_settings.cache_clear()
