"""The API in this process, on the test PostgreSQL and Redis, its artifact store in tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from tests.helpers import api_client


@pytest.fixture
def api_settings() -> dict[str, Any]:
    """Settings of the API beyond its databases and store; a module overrides this to set some."""
    return {}


@pytest.fixture
def api(
    pg_url: str,
    pg_sessions: sessionmaker[Session],
    redis_url: str,
    tmp_path: Path,
    api_settings: dict[str, Any],
) -> Iterator[TestClient]:
    with api_client(pg_url, redis_url, tmp_path, **api_settings) as client:
        yield client
