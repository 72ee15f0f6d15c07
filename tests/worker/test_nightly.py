"""Beat's nightly run over a drop folder of FHIR exports, on the real PostgreSQL and Redis."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.tables import Case
from medbatch.settings import Settings
from tests.helpers import SHARED_DIR, queued_case_ids, require_shared
from worker.app import beat_schedule, create_app
from worker.context import WorkerContext
from worker.queues import NIGHTLY_TASK
from worker.tasks.nightly import MARKER, run_drop

pytestmark = pytest.mark.integration


def test_beat_schedules_the_nightly_run_only_with_a_drop_folder(tmp_path: Path) -> None:
    assert "nightly-fhir-export" not in beat_schedule(Settings())
    entry = beat_schedule(Settings(nightly_dir=tmp_path, nightly_hour_utc=3))["nightly-fhir-export"]
    assert entry["task"] == NIGHTLY_TASK
    assert entry["schedule"].hour == {3} and entry["schedule"].minute == {0}


def test_each_export_in_the_drop_folder_is_queued_once(
    pg_url: str,
    pg_sessions: sessionmaker[Session],
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    source = require_shared(SHARED_DIR / "data" / "fhir" / "ndjson" / "x").parent
    drop = tmp_path / "drop"
    shutil.copytree(source, drop / "2026-11-22")
    settings = Settings(
        database_url=pg_url, broker_url=redis_url, nightly_dir=drop, nightly_lookback_days=36500
    )
    app = create_app(settings, broker_url=redis_url, include_tasks=False)
    ctx = WorkerContext(settings)
    try:
        (record,) = run_drop(app, ctx, settings)
        assert record["patients_read"] == 9 and record["accepted"] + record["rejected"] == 9
        marker = json.loads((drop / "2026-11-22" / MARKER).read_text())
        assert marker["accepted"] == record["accepted"]
        queued = queued_case_ids(redis_client)["score.bulk"]
        with pg_sessions() as s:
            assert s.scalar(select(func.count()).select_from(Case)) == record["accepted"]
        assert len(queued) == record["accepted"]
        assert run_drop(app, ctx, settings) == []  # marked: not run again
        assert len(queued_case_ids(redis_client)["score.bulk"]) == len(queued)
    finally:
        app.close()
        ctx.engine.dispose()


def test_the_shared_export_rejects_the_patients_who_died_before_as_of(
    pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Four of the nine exported patients died before 2020 (Patient.deceasedDateTime)."""
    from datetime import UTC, datetime

    from db import repo
    from db.engine import session_scope
    from models.cases.registry import Registry
    from worker.fhir_intake import run_nightly

    source = require_shared(SHARED_DIR / "data" / "fhir" / "ndjson" / "x").parent
    with session_scope(pg_sessions) as s:
        tenant_id = repo.create_tenant(s, name="nightly")[0].id
    summary = run_nightly(
        source,
        Registry.load().resolve("whas500-mortality"),
        sessions=pg_sessions,
        app=None,
        tenant_id=tenant_id,
        as_of=datetime(2020, 1, 1, tzinfo=UTC),
        lookback_days=730,
    )
    assert summary.as_dict()["patients_read"] == 9
    assert (summary.accepted, dict(summary.rejected)) == (
        5,
        {"patient: deceased before as_of": 4},
    )


def test_the_summary_counts_a_run_of_more_cases_than_a_statement_has_parameters(
    sessions: sessionmaker[Session],
) -> None:
    """settle_counts named every case id as a parameter: a run of more than 65,535 cases
    (32,766 on SQLite) ended, after queuing them all, in 'cannot use the database … number of
    parameters must be between 0 and 65535', and --wait failed at its first look."""
    from db import repo
    from db.engine import session_scope
    from db.tables import Priority
    from worker.fhir_intake import NightlySummary, settle_counts

    with session_scope(sessions) as s:
        tenant_id = repo.create_tenant(s, name="nightly")[0].id
        added = repo.add_cases(
            s,
            tenant_id=tenant_id,
            cases=[
                repo.NewCase(f"c{i}", "whas500-mortality", "1.0.0", Priority.bulk, {"age": 1.0})
                for i in range(3)
            ],
        )
        repo.settle_cases(s, done=[added[0].id], failed={added[1].id: "why"})
    summary = NightlySummary(case_ids=[a.id for a in added] + list(range(10**6, 10**6 + 70_000)))
    assert settle_counts(sessions, summary) is False
    assert (summary.scored, summary.failed) == (1, 1)
    summary.case_ids = [a.id for a in added[:2]]
    assert settle_counts(sessions, summary) is True


def _export(tmp_path: Path) -> Path:
    """A copy of the shared export (nine patients, five of them alive at 2020-01-01)."""
    source = require_shared(SHARED_DIR / "data" / "fhir" / "ndjson" / "x").parent
    shutil.copytree(source, tmp_path / "export")
    return tmp_path / "export"


def _run(sessions: sessionmaker[Session], export: Path) -> dict[str, object]:
    from datetime import UTC, datetime

    from db import repo
    from db.engine import session_scope
    from models.cases.registry import Registry
    from worker.fhir_intake import run_nightly

    with session_scope(sessions) as s:
        tenant_id = repo.create_tenant(s, name="nightly")[0].id
    summary = run_nightly(
        export,
        Registry.load().resolve("whas500-mortality"),
        sessions=sessions,
        app=None,
        tenant_id=tenant_id,
        as_of=datetime(2020, 1, 1, tzinfo=UTC),
        lookback_days=730,
    )
    return summary.as_dict()


def test_a_byte_order_mark_before_the_first_line_costs_nothing(
    pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Was: the first Patient a bad line ("not JSON"), and its 23 resources bad lines too."""
    export = _export(tmp_path)
    patients = export / "Patient.ndjson"
    patients.write_bytes(b"\xef\xbb\xbf" + patients.read_bytes().replace(b"\n", b"\r\n"))
    summary = _run(pg_sessions, export)
    assert (summary["patients_read"], summary["accepted"], summary["bad_lines"]) == (9, 5, 0)


@pytest.mark.parametrize("text", ["urn:mrn\u0000", "urn:mrn\ud800"], ids=["NUL", "surrogate"])
def test_a_line_with_an_unstorable_string_is_a_bad_line_not_the_end_of_the_run(
    pg_sessions: sessionmaker[Session], tmp_path: Path, text: str
) -> None:
    """A NUL in an identifier's system ended the whole run with PostgreSQL's DataError."""
    export = _export(tmp_path)
    patients = export / "Patient.ndjson"
    first, rest = patients.read_bytes().split(b"\n", 1)
    patient = json.loads(first)
    patient["identifier"] = [{"system": text, "value": "MRN-1"}]
    patients.write_bytes(json.dumps(patient).encode() + b"\n" + rest)
    summary = _run(pg_sessions, export)
    # The first patient (alive, so one of the five) is a bad line; the other eight are read.
    assert (summary["patients_read"], summary["accepted"]) == (8, 4)


def test_the_smart_clients_file_names_are_read_and_files_not_read_are_named(
    pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The SMART bulk-data-client saves an export as 1.Observation.ndjson, 2.Observation.ndjson
    (forceStandardFileNames): none was read, and every vital sign was imputed without a word.
    They are read now; a file named for no resource type, or compressed, is not read, and the
    summary names it."""
    import gzip

    export = _export(tmp_path)
    lines = (export / "Observation.ndjson").read_bytes().splitlines(keepends=True)
    (export / "Observation.ndjson").unlink()
    (export / "1.Observation.ndjson").write_bytes(b"".join(lines[: len(lines) // 2]))
    (export / "2.Observation.ndjson").write_bytes(b"".join(lines[len(lines) // 2 :]))
    (export / "Condition.ndjson").rename(export / "conditions.ndjson")
    encounters = export / "Encounter.ndjson"
    (export / "Encounter.ndjson.gz").write_bytes(gzip.compress(encounters.read_bytes()))
    encounters.unlink()
    summary = _run(pg_sessions, export)
    assert summary["files_not_read"] == ["Encounter.ndjson.gz", "conditions.ndjson"]
    # Of the five patients alive at as_of, BMI and blood pressure are read for some (all five
    # imputed when the observations were not read).
    imputed = summary["imputed_by_feature"]
    assert isinstance(imputed, dict) and summary["accepted"] == 5
    assert imputed["bmi"] < 5 and imputed["systolic_bp"] < 5


def test_bad_lines_counts_lines_not_their_problems(
    pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """One Observation line with three elements R4 does not have said "3 unreadable lines"."""
    export = _export(tmp_path)
    observations = export / "Observation.ndjson"
    lines = observations.read_bytes().splitlines()
    # A BMI reading (LOINC 39156-5): a code the model reads, so its line is validated.
    n = next(i for i, line in enumerate(lines) if b'"39156-5"' in line)
    lines[n] = json.dumps({**json.loads(lines[n]), "colour": 1, "flavour": 2, "odour": 3}).encode()
    observations.write_bytes(b"\n".join(lines) + b"\n")
    summary = _run(pg_sessions, export)
    assert (summary["patients_read"], summary["bad_lines"]) == (9, 1)
    # The summary says where and why (a bare count left nothing to look for), once a line.
    (example,) = summary["bad_line_examples"]
    assert example.startswith(f"Observation.ndjson:{n + 1}: error ")
    assert "colour" in example or "Extra" in example, example


def test_an_unreadable_export_does_not_hold_back_the_newer_ones(
    pg_url: str,
    redis_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An export that cannot be read (here its Observation.ndjson is a folder) raised out of the
    run: every newer export behind it in the drop folder went unscored, night after night."""
    source = require_shared(SHARED_DIR / "data" / "fhir" / "ndjson" / "x").parent
    drop = tmp_path / "drop"
    shutil.copytree(source, drop / "2026-11-21")
    (drop / "2026-11-21" / "Observation.ndjson").unlink()
    (drop / "2026-11-21" / "Observation.ndjson").mkdir()
    shutil.copytree(source, drop / "2026-11-22")
    settings = Settings(
        database_url=pg_url, broker_url=redis_url, nightly_dir=drop, nightly_lookback_days=36500
    )
    app = create_app(settings, broker_url=redis_url, include_tasks=False)
    ctx = WorkerContext(settings)
    try:
        (record,) = run_drop(app, ctx, settings)
        assert record["export"] == "2026-11-22" and record["patients_read"] == 9
        assert (drop / "2026-11-22" / MARKER).is_file()
        assert not (drop / "2026-11-21" / MARKER).exists()  # tried again next night
        assert "nightly export 2026-11-21 skipped" in caplog.text
        assert "Patient/" not in caplog.text
    finally:
        app.close()
        ctx.engine.dispose()


def test_beat_finds_an_export_whose_patients_come_in_parts(tmp_path: Path) -> None:
    """Patient.000.ndjson, Patient.001.ndjson …: an export the reader reads, that beat skipped."""
    from worker.tasks.nightly import exports_in

    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "Patient.000.ndjson").write_text("")
    (tmp_path / "whole").mkdir()
    (tmp_path / "whole" / "Patient.ndjson").write_text("")
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "Observation.000.ndjson").write_text("")
    assert [p.name for p in exports_in(tmp_path)] == ["split", "whole"]
    assert exports_in(tmp_path / "split") == [tmp_path / "split"]


def test_an_unreadable_line_is_told_in_one_printable_line(
    pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """An empty string (code.text "", frequent in real feeds) was told with pydantic's pattern
    '[ \\r\\n\\t\\S]+', its carriage return, newline and tab raw: the summary's "unreadable"
    line printed by `medbatch nightly` broke in two, its start overwritten in a terminal. A code
    with a stray space was told by its regular expression. Both now say what is wrong."""
    export = _export(tmp_path)
    observations = export / "Observation.ndjson"
    lines = observations.read_bytes().splitlines()
    n, m = [i for i, line in enumerate(lines) if b'"39156-5"' in line][:2]
    empty = json.loads(lines[n])
    empty["code"]["text"] = ""
    lines[n] = json.dumps(empty).encode()
    spaced = json.loads(lines[m])
    spaced["code"]["coding"][0]["code"] = "39156-5 "
    lines[m] = json.dumps(spaced).encode()
    observations.write_bytes(b"\n".join(lines) + b"\n")
    summary = _run(pg_sessions, export)
    examples = summary["bad_line_examples"]
    assert isinstance(examples, list) and len(examples) == 2, examples
    assert all(e.isprintable() for e in examples), examples
    assert not any("should match pattern" in e for e in examples), examples
    told = dict(e.split(": error value: ", 1) for e in examples)
    assert told[f"Observation.ndjson:{n + 1}"].startswith("an empty string")
    assert told[f"Observation.ndjson:{m + 1}"].startswith("not an R4 code")
