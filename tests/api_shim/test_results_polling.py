"""Polling GET /v1/scores with `since`: a cursor that skips no committed change."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import Case
from tests.helpers import score_row, wdbc_cases

pytestmark = pytest.mark.integration


@pytest.fixture
def api_settings() -> dict[str, object]:
    # No margin: what holds next_since back here is the open transaction alone (a cursor that
    # ignored it would skip the case, whatever margin hid that on a slow machine).
    return {"poll_clock_margin_s": 0.0}


@pytest.fixture
def auth(pg_sessions: sessionmaker[Session]) -> dict[str, str]:
    with session_scope(pg_sessions) as s:
        return {"Authorization": f"Bearer {repo.create_tenant(s, name='ehr')[1]}"}


def _poll(api: TestClient, auth: dict[str, str], **params: Any) -> dict[str, Any]:
    response = api.get("/v1/scores", params=params, headers=auth)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _settle(session: Session, case_id: int) -> None:
    """Score and settle a case as a worker does (its score first, then the case stamped)."""
    repo.save_scores(session, rows=[score_row(case_id, score=0.7, label="malignant")])
    repo.mark_done(session, case_ids=[case_id])


def _at(moment: str) -> datetime:
    return datetime.fromisoformat(moment)


def test_a_case_committed_after_a_later_stamped_one_is_not_skipped(
    api: TestClient, auth: dict[str, str], pg_sessions: sessionmaker[Session]
) -> None:
    """A worker's transaction stamps case A, another commits case B (a later stamp), a poll sees
    B, then A commits: the next poll from the returned next_since lists A. Advancing to the
    largest updated_at seen (B's) would have skipped A for good."""
    a, b = (
        c["id"] for c in api.post("/v1/cases", json=wdbc_cases(2), headers=auth).json()["cases"]
    )
    since = _poll(api, auth)["next_since"]

    slow = pg_sessions()
    try:
        slow.begin()
        _settle(slow, a)
        stamped_a = slow.scalar(select(Case.updated_at).where(Case.id == a))
        with session_scope(pg_sessions) as s:
            _settle(s, b)
        first = _poll(api, auth, since=since)
        assert [(i["case_id"], i["status"]) for i in first["items"]] == [(b, "done")]
        largest_seen = max(_at(i["updated_at"]) for i in first["items"])
        assert stamped_a is not None and stamped_a < largest_seen
        assert _at(first["next_since"]) <= stamped_a
        slow.commit()
    finally:
        slow.close()

    second = _poll(api, auth, since=first["next_since"])
    assert (a, "done") in [(i["case_id"], i["status"]) for i in second["items"]]
    # The cursor a client kept before next_since existed loses the case:
    assert a not in [
        i["case_id"] for i in _poll(api, auth, since=largest_seen.isoformat())["items"]
    ]


def test_pages_of_one_poll_end_at_its_first_next_since(
    api: TestClient, auth: dict[str, str], pg_sessions: sessionmaker[Session]
) -> None:
    """Pages after the first, asked with `until` (the last page's next_since), list no case
    changed after the poll began; the next poll, from the last next_since, lists it."""
    ids = [c["id"] for c in api.post("/v1/cases", json=wdbc_cases(5), headers=auth).json()["cases"]]
    first = _poll(api, auth, limit=2)
    assert [i["case_id"] for i in first["items"]] == ids[:2]
    with session_scope(pg_sessions) as s:
        _settle(s, ids[4])
    pages, page = [first], first
    while page["next_cursor"] is not None:
        page = _poll(api, auth, limit=2, cursor=page["next_cursor"], until=page["next_since"])
        pages.append(page)
        assert page["next_since"] == first["next_since"]
    assert [i["case_id"] for p in pages for i in p["items"]] == ids[:4]
    later = _poll(api, auth, since=pages[-1]["next_since"])
    assert [(i["case_id"], i["status"]) for i in later["items"]] == [(ids[4], "done")]


def test_next_since_never_moves_a_cursor_back(api: TestClient, auth: dict[str, str]) -> None:
    """A `since` ahead of the watermark (a client's own clock, say) comes back as next_since."""
    ahead = "2999-01-01T00:00:00Z"
    assert _at(_poll(api, auth, since=ahead)["next_since"]) == _at(ahead)


@pytest.mark.parametrize(
    ("until", "fragment"),
    [("yesterday", "RFC 3339 date-time"), ("2026-01-01T00:00:00", "with an offset")],
)
def test_a_bad_until_is_422(
    api: TestClient, auth: dict[str, str], until: str, fragment: str
) -> None:
    """`until` takes what `since` takes, and names itself when it is wrong."""
    response = api.get("/v1/scores", params={"until": until}, headers=auth)
    assert response.status_code == 422
    problem = response.json()["detail"][0]
    assert problem["loc"] == ["query", "until"] and fragment in problem["msg"]
