"""Bad input to the newer entry points: CLI commands exit 2 naming the option; malformed task
messages are rejected (not retried) before they touch anything."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from celery.exceptions import Reject

from medbatch.cli import main


@pytest.fixture
def env(tmp_path: Path, cli_env: Callable[..., None]) -> Path:
    from db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    cli_env(MEDBATCH_DATABASE_URL=url, MEDBATCH_ARTIFACT_DIR=str(tmp_path / "store"))
    upgrade(url)
    return tmp_path


def test_nightly_refuses_a_folder_without_patients_and_a_naive_time(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["nightly", "--input", str(env)]) == 2
    assert "--input: no Patient.ndjson in" in capsys.readouterr().err
    # A FHIR Bundle given as the export, and a folder that is not there, are named as such.
    bundle = env / "patient-bundle.json"
    bundle.write_text('{"resourceType": "Bundle"}')
    assert main(["nightly", "--input", str(bundle)]) == 2
    assert f"--input: {bundle} is a file; give the folder" in capsys.readouterr().err
    assert main(["nightly", "--input", str(env / "nothere")]) == 2
    assert f"--input: no folder {env / 'nothere'}" in capsys.readouterr().err
    (env / "Patient.ndjson").write_text("")
    assert main(["nightly", "--input", str(env), "--as-of", "2020-01-01T00:00:00"]) == 2
    assert "--as-of needs a time zone" in capsys.readouterr().err
    assert main(["nightly", "--input", str(env), "--model", "nope"]) == 2
    assert "--model: unknown model 'nope'" in capsys.readouterr().err


def test_nightly_takes_an_as_of_with_rfc3339_lower_case_t_and_z(
    env: Path, cli_env: Callable[..., None], redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """RFC 3339 (5.6) lets "t" and "z" be lower case, as the API's as_of and since take them:
    the CLI answered "invalid fromisoformat value"."""
    import json

    (env / "Patient.ndjson").write_text("")
    cli_env(MEDBATCH_BROKER_URL=redis_url)
    assert main(["nightly", "--input", str(env), "--as-of", "2020-01-01t00:00:00z", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["patients_read"] == 0
    with pytest.raises(SystemExit) as exit_:
        main(["nightly", "--input", str(env), "--as-of", "yesterday"])
    assert exit_.value.code == 2
    assert "argument --as-of: not a date-time: 'yesterday'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--as-of", "0001-01-02T00:00:00Z"],
        ["--as-of", "9999-12-31T00:00:00Z"],
        ["--as-of", "1899-12-31T23:00:00+00:00"],
    ],
    ids=" ".join,
)
def test_nightly_refuses_a_moment_whose_lookback_leaves_the_calendar(
    env: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An --as-of in year 1 (or a look-back of a million days) was an OverflowError traceback
    after the tenant was created; the API takes 1900 to 2199 and up to 36500 days."""
    (env / "Patient.ndjson").write_text('{"resourceType": "Patient", "id": "p1"}\n')
    assert main(["nightly", "--input", str(env), *argv]) == 2
    assert "--as-of: must be from 1900 to 2199" in capsys.readouterr().err


def test_beat_s_nightly_look_back_is_bounded_as_the_cli_s() -> None:
    """MEDBATCH_NIGHTLY_LOOKBACK_DAYS=1000000 made every nightly run an OverflowError."""
    from pydantic import ValidationError

    from medbatch.settings import Settings

    with pytest.raises(ValidationError, match="nightly_lookback_days"):
        Settings(nightly_lookback_days=1_000_000)


def test_explain_steps_has_a_ceiling() -> None:
    """MEDBATCH_EXPLAIN_STEPS=160000 (a typo) ran the worker out of memory at every explain
    message; it is refused at start instead, and the ceiling itself is accepted."""
    from pydantic import ValidationError

    from medbatch.settings import Settings

    with pytest.raises(ValidationError, match="explain_steps"):
        Settings(explain_steps=160_000)
    assert Settings(explain_steps=512).explain_steps == 512


def test_compounds_search_names_the_bad_option(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    library = env / "library.smi"
    library.write_text("CCO ethanol\nc1ccccc1 benzene\n")
    assert main(["compounds", "search", "--library", str(library), "--top-k", "1"]) == 2
    assert "give --query FILE or --all-pairs" in capsys.readouterr().err
    missing = ["--library", str(env / "nope.smi"), "--all-pairs", "--top-k", "1"]
    assert main(["compounds", "search", *missing]) == 2
    assert "--library:" in capsys.readouterr().err
    zero = ["--library", str(library), "--all-pairs", "--top-k", "0"]
    assert main(["compounds", "search", *zero]) == 2
    assert "--top-k: must be between 1 and 1000" in capsys.readouterr().err


@pytest.mark.parametrize("args", [(), ("1",), (1,), (1, -2), (True, 0), (1, 2, 3)])
def test_malformed_tile_messages_are_rejected(args: tuple) -> None:
    from worker.tasks.compounds import compound_tile_task
    from worker.tasks.genome import genome_tile_task

    for task in (genome_tile_task, compound_tile_task):
        with pytest.raises(Reject, match="job id and tile index"):
            task.run(*args)


@pytest.mark.parametrize(
    "argv",
    [
        ["api", "--port", "99999"],
        ["api", "--port", "-1"],
        ["db", "create-tenant", "t", "--lifetime-days", "-5"],
        ["db", "rotate-key", "t", "--lifetime-days", "999999999"],
        ["db", "rotate-key", "t", "--overlap-hours", "-3"],
        ["db", "rotate-key", "t", "--overlap-hours", "nan"],
        ["nightly", "--input", "x", "--lookback-days", "-5"],
        ["nightly", "--input", "x", "--lookback-days", "1000000"],
        ["submit", "cases.json", "--api-key", "k", "--timeout", "-5"],
        ["submit", "cases.json", "--api-key", "k", "--timeout", "nan"],
        ["submit", "cases.json", "--api-key", "k", "--timeout", "inf"],
        ["demo", "--timeout", "-1"],
        ["genome", "compare", "--bfile", "x", "--metric", "grm", "--tile-rows", "-5"],
        ["compounds", "search", "--library", "x", "--all-pairs", "--top-k", "1", "--radius", "-1"],
        ["compounds", "search", "--library", "x", "--all-pairs", "--top-k", "1", "--bits", "0"],
        [
            "compounds",
            "search",
            "--library",
            "x",
            "--all-pairs",
            "--top-k",
            "1",
            "--tile-rows",
            "-4",
        ],
    ],
    ids=" ".join,
)
def test_a_number_out_of_range_is_refused_before_anything_runs(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """They were taken: a port of 99999 or a radius of -1 was a traceback, -5 days of key
    lifetime an already expired key, --lookback-days -5 a traceback mid-run, a genome
    --tile-rows of -5 a failed job and a half-written .rel, a submit --timeout of -5, nan or inf
    a traceback from the socket, a demo --timeout of -1 a demo that waited for nothing."""
    from medbatch.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert f"argument {argv[-2]}: must be" in capsys.readouterr().err


def test_a_client_name_is_unique_in_its_tenant_and_revoke_stops_every_one_of_it(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """create-client made a second 'ci' beside the first; revoke-client then revoked only the
    first, and the second's key kept working."""
    from sqlalchemy import select

    from db import repo
    from db.engine import make_engine, make_sessionmaker, session_scope
    from db.tables import ApiKey
    from medbatch.settings import get_settings

    assert main(["db", "create-tenant", "t"]) == 0
    assert main(["db", "create-client", "t", "ci", "--scopes", "results:read"]) == 0
    capsys.readouterr()
    assert main(["db", "create-client", "t", "ci", "--scopes", "results:read"]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "medbatch db create-client: tenant 't' already has a client 'ci' "
        "(revoke it first, or choose another name)"
    )
    assert captured.out == ""
    # A database from before the check may hold two: revoke-client stops both, rotate-key asks.
    engine = make_engine(get_settings().database_url)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as session:
        repo.create_client(session, tenant_id=1, name="ci", scopes=["results:read"])
    assert main(["db", "rotate-key", "t", "--client", "ci"]) == 2
    assert "has 2 clients named 'ci'" in capsys.readouterr().err
    assert main(["db", "revoke-client", "t", "ci"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    with session_scope(sessions) as session:
        keys = session.scalars(select(ApiKey).where(ApiKey.client_id.is_not(None))).all()
        assert len(keys) == 2 and all(k.revoked_at is not None for k in keys)
    engine.dispose()
    # Once revoked, the name is free again; rotate-key then finds the live one.
    assert main(["db", "create-client", "t", "ci", "--scopes", "results:read"]) == 0
    assert main(["db", "rotate-key", "t", "--client", "ci"]) == 0
    assert main(["db", "revoke-client", "t", "ci"]) == 0
    assert main(["db", "rotate-key", "t", "--client", "ci"]) == 2
    assert "client 'ci' is revoked; create a new one" in capsys.readouterr().err


def test_db_upgrade_to_an_unknown_revision_is_one_line(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "upgrade", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "medbatch db upgrade: revision 'nonsense': Can't locate revision identified by 'nonsense'"
    )


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("MEDBATCH_LOG_LEVEL", "verbose-secret", "must be one of CRITICAL, ERROR, WARNING"),
        ("MEDBATCH_DATABASE_URL", "not-a-url-secret", "not a SQLAlchemy URL"),
        ("MEDBATCH_DATABASE_URL", "mysql://u:secret@host/db", "SQLite or on PostgreSQL"),
        ("MEDBATCH_DATABASE_URL", "postgresql+asyncpg://u:secret@h/db", "with psycopg 3"),
        ("MEDBATCH_DATABASE_URL", "postgres://u:secret@h/db", "write postgresql://…, not postgres"),
        ("MEDBATCH_DATABASE_URL", "secretdb://u@h/db", "SQLite or on PostgreSQL"),
        ("MEDBATCH_BROKER_URL", "rdis://:secret@host:6379/0", "not a broker URL"),
        ("MEDBATCH_BROKER_URL", "secret-host:6379", "not a broker URL"),
        ("MEDBATCH_BROKER_URL", "", "not a broker URL"),
        ("MEDBATCH_SWEEP_INTERVAL_S", "inf", "should be a finite number"),
        ("MEDBATCH_IDEMPOTENCY_RETENTION_H", "nan", "should be a finite number"),
        ("MEDBATCH_LEASE_TTL_S", "1e300", "should be less than or equal to 86400"),
        ("MEDBATCH_TORCH_THREADS", "1099511627776", "should be less than or equal to 4096"),
    ],
)
def test_a_setting_that_cannot_work_is_a_setting_problem(
    name: str,
    value: str,
    says: str,
    cli_env: Callable[..., None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each was a traceback (logging's 'Unknown level', SQLAlchemy's ArgumentError, a dialect or
    driver that is not installed, kombu's 'No such transport'), or, for a broker URL without a
    scheme or an empty one, an AMQP broker on localhost that the worker tried for ever; for an
    infinite or astronomical duration, an OverflowError in the sweeper or the worker."""
    cli_env(**{name: value})
    assert main(["models", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"medbatch: {name}: ") and says in err
    assert "secret" not in err and len(err.strip().splitlines()) == 1


def test_a_database_or_folder_the_machine_refuses_is_one_line(
    tmp_path: Path, cli_env: Callable[..., None], capsys: pytest.CaptureFixture[str]
) -> None:
    """A SQLite file that cannot be opened and a folder that cannot be made were tracebacks."""
    cli_env(MEDBATCH_DATABASE_URL=f"sqlite:///{tmp_path}")  # a folder, not a file
    assert main(["db", "list-clients", "t"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "medbatch db list-clients: cannot use the database (MEDBATCH_DATABASE_URL): "
        "unable to open database file"
    )
    blocker = tmp_path / "file"
    blocker.write_text("")
    cli_env(MEDBATCH_DATABASE_URL=f"sqlite:///{blocker / 'sub' / 'db.sqlite'}")
    assert main(["db", "list-clients", "t"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"medbatch db list-clients: {blocker / 'sub'}: Not a directory"


def test_an_empty_keep_file_is_refused(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It ran a 0 x 0 comparison, 'done' with no pairs; plink --keep keeps none and stops."""
    data = Path(__file__).resolve().parent / "data" / "genome" / "hm3_small"
    keep = env / "keep.txt"
    keep.write_text("\n\n")
    argv = ["genome", "compare", "--bfile", str(data), "--metric", "king", "--keep", str(keep)]
    assert main(argv) == 2
    assert f"--keep: {keep} names no sample" in capsys.readouterr().err


def test_a_keep_file_with_a_byte_order_mark_or_another_encoding(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A BOM became part of the first IID (refused as a sample not in the cohort); Latin-1 was
    a UnicodeDecodeError traceback."""
    data = Path(__file__).resolve().parent / "data" / "genome" / "hm3_small"
    iids = [line.split()[1] for line in data.with_suffix(".fam").read_text().splitlines()[:3]]
    keep = env / "keep.txt"
    keep.write_bytes(("\ufeff" + "\r\n".join(iids) + "\r\n").encode("utf-8"))
    argv = ["genome", "compare", "--bfile", str(data), "--metric", "king", "--keep", str(keep)]
    assert main(argv) == 0, capsys.readouterr().err
    keep.write_bytes("Jos\u00e9\n".encode("latin-1"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"medbatch genome compare: --keep: {keep} is not UTF-8 text (byte 4)\n", err


def test_a_keep_file_with_plink2s_header_and_comments_keeps_its_samples(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """plink2's own '#FID IID' header (a .king.id) and '#' comments were read as samples and
    refused ("entry 1: no sample"); a file that is not UTF-8 was a UnicodeDecodeError traceback."""
    data = Path(__file__).resolve().parent / "data" / "genome" / "hm3_small"
    pairs = [line.split()[:2] for line in data.with_suffix(".fam").read_text().splitlines()[:30]]
    plain, headed, iids = env / "plain.txt", env / "headed.txt", env / "iids.txt"
    plain.write_text("".join(f"{f} {i}\n" for f, i in pairs))
    headed.write_text("#FID\tIID\n# first 30\n" + "".join(f"{f}\t{i}\n" for f, i in pairs))
    iids.write_text("#IID\tSEX\n" + "".join(f"{i}\t0\n" for _, i in pairs))
    tables = []
    for keep in (plain, headed, iids):
        argv = ["genome", "compare", "--bfile", str(data), "--metric", "king", "--table",
                "--threshold", "-1", "--keep", str(keep), "--out", str(env / keep.stem)]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        tables.append((env / f"{keep.stem}.kin0").read_text())
    assert tables[0] == tables[1] == tables[2] and len(tables[0].splitlines()) == 1 + 30 * 29 // 2
    from medbatch.cli.genome import keep_entries

    assert keep_entries("F1 N\u00a0A1\r\n\nA\u00a0B\n") == [("F1", "N\u00a0A1"), "A\u00a0B"]
    latin = env / "latin.txt"
    latin.write_bytes(b"F1 Jos\xe9\n")
    argv = ["genome", "compare", "--bfile", str(data), "--metric", "king", "--keep", str(latin)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"medbatch genome compare: --keep: {latin} is not UTF-8 text (byte 7)"
    )


def test_out_that_cannot_be_written_says_where_the_output_stays(tmp_path: Path) -> None:
    """It was a traceback after the whole job had run."""
    from medbatch.cli._common import CliError, copy_out

    source = tmp_path / "neighbours.csv"
    source.write_text("query,hit\n")
    (tmp_path / "file").write_text("")
    with pytest.raises(CliError, match=r"--out: cannot write .*; the output stays at .*neighbours"):
        copy_out(source, tmp_path / "file" / "out.csv")


def test_models_register_of_a_non_model_says_so_once_without_a_traceback(
    env: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """torch.export logged a whole traceback (as a warning) before the one-line refusal; bad
    --params JSON did not name --params."""
    junk = env / "empty.pt"
    junk.write_bytes(b"")
    schema = Path(__file__).resolve().parents[1] / "examples" / "model-schema.json"
    base = ["models", "register", str(junk), "--name", "j", "--version", "1"]
    assert main([*base, "--schema", str(schema)]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "is not a TorchScript archive" in err
    assert main([*base, "--schema", str(schema), "--architecture", "mlp", "--params", "{x"]) == 2
    assert "medbatch models register: --params: not JSON" in capfd.readouterr().err


def test_submit_prints_its_summary_without_httpx_request_lines() -> None:
    import logging

    from medbatch.cli._common import setup_logging
    from medbatch.settings import Settings

    setup_logging(Settings())  # the root logger at INFO (where pytest has not set it first)
    assert logging.getLogger("httpx").level == logging.WARNING


def test_models_evaluate_finds_a_registered_version(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/models.md registers breast-cancer@1.1.0 as a candidate; `models list` showed it but
    `models evaluate` read only the packaged registry: 'unknown model version'."""
    root = Path(__file__).resolve().parents[1]
    weights = root / "models" / "cases" / "artifacts" / "breast-cancer-1.0.0.safetensors"
    assert main([
        "models", "register", str(weights), "--name", "breast-cancer", "--version", "1.1.0",
        "--schema", str(root / "examples" / "model-schema.json"), "--architecture", "mlp",
        "--params", '{"hidden": [32, 16]}',
    ]) == 0  # fmt: skip
    out = env / "report"
    assert main(["models", "evaluate", "breast-cancer@1.1.0", "--out", str(out)]) == 0
    assert "breast-cancer@1.1.0 on 114 held-out cases" in capsys.readouterr().out
    assert (out / "metrics.json").is_file()


def test_an_unmigrated_postgresql_database_says_to_run_db_upgrade(
    cli_env: Callable[..., None], capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's quickstart on a new PostgreSQL database, without `db upgrade`: it was a
    traceback ending in 'relation "tenants" does not exist'."""
    import uuid

    import psycopg

    from tests.conftest import PG_ADMIN_URL, _pg_url

    name = f"medbatch_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        cli_env(MEDBATCH_DATABASE_URL=_pg_url(name))
        assert main(["db", "create-tenant", "quickstart"]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == (
            "medbatch db create-tenant: the database has no medbatch schema, or an older one: "
            "run `medbatch db upgrade`\n"
        )
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("command", ["api", "worker", "sweeper"])
def test_a_service_on_a_postgresql_database_it_cannot_use_refuses_to_start(
    command: str, tmp_path: Path
) -> None:
    """A wrong MEDBATCH_DATABASE_URL (a server that does not answer), a database never
    migrated, or one at an older revision: `api`, `worker` and `sweeper` started anyway, and
    then answered 503s, logged a traceback a task or "sweep failed: OperationalError" every
    interval. Each now stops before it starts, in one line that says what to do."""
    import subprocess
    import sys
    import uuid

    import psycopg

    from db.migrate import upgrade
    from tests.conftest import PG_ADMIN_URL, REDIS_TEST_URL, _pg_url

    def start(url: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ, "MEDBATCH_DATABASE_URL": url, "MEDBATCH_BROKER_URL": REDIS_TEST_URL,
            "MEDBATCH_WORKER_METRICS_PORT": "0",
        }  # fmt: skip
        args = [sys.executable, "-m", "medbatch.cli", command]
        # Without the check a service runs until it is stopped: the timeout fails the test.
        return subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90
        )

    down = start("postgresql://medbatch@127.0.0.1:9/medbatch")
    assert down.returncode == 1, down.stderr
    assert down.stderr.strip().splitlines() == [
        f"medbatch {command}: cannot use the database (MEDBATCH_DATABASE_URL): connection failed: "
        + down.stderr.split("connection failed: ", 1)[1].strip()
    ]
    name = f"medbatch_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        for revision in (None, "0005"):
            if revision:
                upgrade(_pg_url(name), revision)
            result = start(_pg_url(name))
            assert result.returncode == 1, (revision, result.stderr)
            assert result.stderr == (
                f"medbatch {command}: the database has no medbatch schema, or an older one: "
                "run `medbatch db upgrade`\n"
            ), revision
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("api", ["localhost:8000", "http://", "ftp://x", "http://[::1"])
def test_submit_refuses_an_api_that_is_not_an_http_url(
    api: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """'localhost:8000' said 'cannot reach the API … is `medbatch api` running?' (it may well
    be); 'http://[::1' was a traceback."""
    cases = Path(__file__).resolve().parents[1] / "examples" / "cases.json"
    assert main(["submit", str(cases), "--api", api, "--api-key", "k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"medbatch submit: --api: {api}") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_submit_reads_a_cases_file_with_a_byte_order_mark(
    encoding: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cases file saved by a Windows tool was refused: 'cannot read …: Unexpected UTF-8 BOM'.
    Read, it goes on to the next check (here: an --api that is not a URL)."""
    cases = Path(__file__).resolve().parents[1] / "examples" / "cases.json"
    saved = tmp_path / "cases.json"
    saved.write_bytes(cases.read_text(encoding="utf-8").encode(encoding))
    assert main(["submit", str(saved), "--api", "ftp://x", "--api-key", "k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medbatch submit: --api: ftp://x"), err


def test_compounds_tile_rows_counts_query_rows_as_its_help_says(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The help said 'library rows per tile task'; a job is tiled over its queries."""
    from medbatch.cli import build_parser

    library = env / "library.smi"
    library.write_text("CCO ethanol\nc1ccccc1 benzene\nCC(=O)O acetic\n")
    query = env / "query.smi"
    query.write_text("CCO ethanol\n")
    argv = ["--library", str(library), "--query", str(query), "--top-k", "1", "--tile-rows", "2"]
    assert main(["compounds", "search", *argv]) == 0
    assert (
        "1 queries x 3 library molecules (morgan r=2 2048 bits), 1 tiles" in capsys.readouterr().out
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compounds", "search", "--help"])
    assert "query rows per tile task" in " ".join(capsys.readouterr().out.split())


def test_compounds_search_refuses_unreadable_files_and_folders_in_one_line(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A library of no molecule was refused in five lines (RDKit's own explanation of the
    SMILES error); a folder given as the library was "not found"; a folder as --out was "exists;
    add --force", and with --force the job ran, then could not be copied over it."""
    junk = env / "junk.smi"
    junk.write_text("hello world\n")
    good = env / "library.smi"
    good.write_text("CCO ethanol\nc1ccccc1 benzene\n")
    search = ["compounds", "search", "--all-pairs", "--top-k", "1"]
    assert main([*search, "--library", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"medbatch compounds search: --library: {junk}: no molecule")
    assert "line 1 ('hello'): SMILES Parse Error: syntax error while parsing: hello" in err
    assert err.rstrip().endswith("(around position 1)")
    folder = env / "molecules"
    folder.mkdir()
    assert main([*search, "--library", str(folder)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"medbatch compounds search: --library: {folder} is a folder: give a .smi, .sdf or .csv\n"
    )
    for force in ([], ["--force"]):
        assert main([*search, "--library", str(good), "--out", str(folder), *force]) == 2
        captured = capsys.readouterr()
        assert (
            captured.err
            == f"medbatch compounds search: --out: {folder} is a folder; give a file's name (it may be in that folder)\n"
        )
        assert not captured.out  # refused before a job was made
    assert main([*search, "--library", str(good), "--out", str(folder / "n.csv")]) == 0
    capsys.readouterr()
    # Both was "give --query FILE or --all-pairs", as if neither had been given.
    assert main([*search, "--library", str(good), "--query", str(good)]) == 2
    assert capsys.readouterr().err.endswith(": give --query FILE or --all-pairs, not both\n")
    assert main([*search[:2], "--top-k", "1", "--library", str(good)]) == 2
    assert capsys.readouterr().err.endswith(": give --query FILE or --all-pairs\n")
    assert (folder / "n.csv").read_text().startswith("query_id,")


def test_a_broker_that_does_not_answer_is_one_line_and_the_job_is_kept(
    env: Path, cli_env: Callable[..., None], capsys: pytest.CaptureFixture[str]
) -> None:
    """genome compare, compounds search and nightly ended in kombu's traceback."""
    import socket

    from sqlalchemy import create_engine, text

    from medbatch.settings import get_settings

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli_env(MEDBATCH_BROKER_URL=f"redis://127.0.0.1:{port}/0")
    data = Path(__file__).resolve().parent / "data" / "genome" / "hm3_small"
    assert main(["genome", "compare", "--bfile", str(data), "--metric", "king"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("medbatch genome compare: cannot reach the broker (MEDBATCH_BROKER_URL)")
    assert "a sweeper (medbatch sweeper) sends it" in err and len(err.splitlines()) == 1
    engine = create_engine(get_settings().database_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM genome_jobs")).scalars().all() == ["queued"]
    engine.dispose()


@pytest.mark.parametrize(
    "argv",
    [
        ["db", "create-tenant", ""],
        ["db", "create-tenant", "x" * 101],
        ["db", "create-client", "t", " ", "--scopes", "admin"],
        ["db", "create-client", "t", "y" * 101, "--scopes", "admin"],
        ["nightly", "--input", "x", "--tenant", ""],
        ["genome", "compare", "--bfile", "x", "--metric", "king", "--tenant", "z" * 101],
        ["compounds", "search", "--library", "x", "--all-pairs", "--top-k", "1", "--tenant", ""],
    ],
    ids=lambda argv: " ".join(a if len(a) < 20 else f"<{len(a)} chars>" for a in argv),
)
def test_an_empty_or_too_long_tenant_or_client_name_is_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty name made a tenant called ''; one over the column's 100 characters was a
    traceback on PostgreSQL."""
    from medbatch.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "must not be empty" in err or "at most 100 characters" in err


def test_cases_replay_says_why_a_named_case_was_not_re_queued(
    env: Path,
    cli_env: Callable[..., None],
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A case id past bigint was a DataError traceback (an OverflowError on SQLite); a named
    case that is done, failed for its own reason or unknown was only 're-queued 0 …'."""
    from db import repo
    from db.engine import make_engine, make_sessionmaker, session_scope
    from db.tables import Priority
    from medbatch.settings import get_settings

    cli_env(MEDBATCH_BROKER_URL=redis_url)
    engine = make_engine(get_settings().database_url)
    with session_scope(make_sessionmaker(engine)) as s:
        tenant = repo.create_tenant(s, name="t")[0].id
        new = [repo.NewCase(f"c{i}", "m", "1", Priority.bulk, {"x": 1.0}) for i in range(4)]
        done, failed, dead, queued = (a.id for a in repo.add_cases(s, tenant_id=tenant, cases=new))
        repo.settle_cases(s, done=[done], failed={failed: "model produced a non-finite score"})
        repo.claim_cases(s, case_ids=[dead], max_deliveries=0)  # a dead letter
    engine.dispose()

    for bad in ("99999999999999999999", "0", "-3"):
        with pytest.raises(SystemExit) as exit_:
            main(["cases", "replay", "--", bad])
        assert exit_.value.code == 2
        assert "argument case_ids: not a case id" in capsys.readouterr().err

    assert main(["cases", "replay", str(dead), str(done), str(failed), str(queued), "999"]) == 1
    out, err = capsys.readouterr()
    assert out == "re-queued 1 dead-lettered cases\n"
    assert err == (
        f"not re-queued (not dead letters): {done} (done), {failed} (failed), {queued} (queued)"
        "; no such case: 999\n"
    )
    # Cases that exist but are not dead letters are no error; a case that does not exist is.
    assert main(["cases", "replay", str(done)]) == 0
    capsys.readouterr()
    assert main(["cases", "replay", "12345"]) == 1
    assert capsys.readouterr() == ("re-queued 0 dead-lettered cases\n", "no such case: 12345\n")


def test_cases_explain_again_re_queues_failed_explanations_with_a_fresh_count(
    env: Path,
    cli_env: Callable[..., None],
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An explanation that failed (its model could not be loaded through every attempt) had no
    way back: ``cases replay`` takes cases without a score. ``explain-again`` puts it back to
    queued with no attempts and no error, and sends its explain message; the score stands."""
    import redis
    from sqlalchemy import select, update

    from db import explanations, repo
    from db.engine import make_engine, make_sessionmaker, session_scope
    from db.tables import Explanation, JobStatus, Priority
    from medbatch.settings import get_settings
    from worker.queues import EXPLAIN_QUEUE

    cli_env(MEDBATCH_BROKER_URL=redis_url)
    engine = make_engine(get_settings().database_url)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as s:
        tenant = repo.create_tenant(s, name="t")[0].id
        other = repo.create_tenant(s, name="u")[0].id
        new = [repo.NewCase(f"c{i}", "m", "1", Priority.bulk, {"x": 1.0}) for i in range(3)]
        failed, done = (a.id for a in repo.add_cases(s, tenant_id=tenant, cases=new[:2]))
        (theirs,) = (a.id for a in repo.add_cases(s, tenant_id=other, cases=new[2:]))
        ids = [failed, done, theirs]
        rows = [
            {"case_id": i, "model_name": "m", "model_version": "1", "model_sha256": "0" * 64,
             "score": 0.5, "label": "x", "position": 0, "queue_wait_ms": 1.0}
            for i in ids
        ]  # fmt: skip
        explanations.save_scores_asking(s, rows=rows, case_ids=ids)
        repo.settle_cases(s, done=ids)
        s.execute(
            update(Explanation)
            .where(Explanation.case_id.in_([failed, theirs]))
            .values(status=JobStatus.failed, attempts=5, error="model m@1 unavailable: gone")
        )
        s.execute(
            update(Explanation).where(Explanation.case_id == done).values(status=JobStatus.done)
        )
    broker = redis.Redis.from_url(redis_url)
    broker.delete(EXPLAIN_QUEUE)

    assert main(["cases", "explain-again"]) == 2
    assert "say which" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["cases", "explain-again", "--", "-3"])
    assert exit_.value.code == 2
    assert "argument case_ids: not a case id" in capsys.readouterr().err

    # Named: the failed one is re-queued, the done one is not (and says so, exit 1).
    assert main(["cases", "explain-again", "--tenant", "t", str(failed), str(done)]) == 1
    out, err = capsys.readouterr()
    assert out == "re-queued 1 failed explanations\n"
    assert err.startswith("not re-queued (no failed explanation") and f": {done}\n" in err
    with sessions() as s:
        got = {
            r.case_id: (r.status, r.attempts, r.error)
            for r in s.execute(select(Explanation).where(Explanation.case_id.in_(ids))).scalars()
        }
    assert got[failed] == (JobStatus.queued, 0, None)
    assert got[done][0] == JobStatus.done
    assert got[theirs] == (JobStatus.failed, 5, "model m@1 unavailable: gone")  # other tenant
    assert broker.llen(EXPLAIN_QUEUE) == 1
    # --all takes the rest; a second run finds nothing left (no error: none was named).
    assert main(["cases", "explain-again", "--all"]) == 0
    assert capsys.readouterr().out == "re-queued 1 failed explanations\n"
    assert main(["cases", "explain-again", "--all"]) == 0
    assert capsys.readouterr().out == "re-queued 0 failed explanations\n"
    assert broker.llen(EXPLAIN_QUEUE) == 2
    broker.delete(EXPLAIN_QUEUE)
    broker.close()
    engine.dispose()


def test_models_evaluate_ecg_cnn_reads_the_record_where_the_settings_say(
    env: Path,
    cli_env: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """models/reference/ecg.py read MEDBATCH_SHARED_DIR itself, and by default looked for
    shared/ inside the checkout, not beside it as the settings, the docs and the tests do:
    `models train ecg-cnn` and `models evaluate ecg-cnn` failed where the record was; without
    the record, evaluate was a FileNotFoundError traceback."""
    from medbatch.settings import Settings

    cli_env(MEDBATCH_SHARED_DIR=str(env / "nothing-here"))
    assert main(["models", "evaluate", "ecg-cnn", "--out", str(env / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medbatch models evaluate: MIT-BIH record 100 not found at ")
    assert str(env / "nothing-here" / "data" / "ecg") in err and len(err.splitlines()) == 1

    monkeypatch.delenv("MEDBATCH_SHARED_DIR", raising=False)
    cli_env()
    record = Settings().shared_data / "ecg" / "100.hea"
    if not record.is_file():
        pytest.skip(f"shared data not found at {record.parent} (set MEDBATCH_SHARED_DIR)")
    assert main(["models", "evaluate", "ecg-cnn", "--out", str(env / "report")]) == 0
    assert (env / "report" / "metrics.json").is_file()


def test_worker_beat_refuses_an_unknown_nightly_model_at_start(
    env: Path,
    cli_env: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """beat started with MEDBATCH_NIGHTLY_MODEL misspelt and failed at the nightly hour."""
    import worker.app

    started: list[list[str]] = []
    monkeypatch.setattr(worker.app, "run_worker", lambda app, argv: started.append(argv) or 0)
    (env / "drop").mkdir()
    cli_env(MEDBATCH_NIGHTLY_DIR=str(env / "drop"), MEDBATCH_NIGHTLY_MODEL="whas500-mortalty")
    assert main(["worker", "--beat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medbatch worker: MEDBATCH_NIGHTLY_MODEL: not a registered model")
    assert "whas500-mortality" in err and "mortalty" not in err and len(err.splitlines()) == 1
    assert started == []


def test_nightly_reads_an_export_whose_patients_come_in_parts(
    env: Path, cli_env: Callable[..., None], redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server splits a large type into Patient.000.ndjson, Patient.001.ndjson … (which the
    reader reads): the CLI refused such an export, "no Patient.ndjson", and beat skipped it."""
    import json
    import shutil

    from tests.helpers import SHARED_DIR, require_shared

    source = require_shared(SHARED_DIR / "data" / "fhir" / "ndjson" / "x").parent
    export = env / "export"
    shutil.copytree(source, export)
    lines = (export / "Patient.ndjson").read_text().splitlines(keepends=True)
    (export / "Patient.ndjson").unlink()
    (export / "Patient.000.ndjson").write_text("".join(lines[:4]))
    (export / "Patient.001.ndjson").write_text("".join(lines[4:]))
    cli_env(MEDBATCH_BROKER_URL=redis_url)
    argv = ["nightly", "--input", str(export), "--lookback-days", "36500", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["patients_read"] == 9
    assert summary["accepted"] + summary["rejected"] == 9


def test_cases_replay_leaves_the_dead_letters_of_a_retired_version(
    env: Path,
    cli_env: Callable[..., None],
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A retired version scores no case: replay re-queued its dead letters, which only failed
    again (no longer dead letters, so no later replay found them) after "re-queued 2"."""
    from sqlalchemy import select

    from db import repo
    from db.engine import make_engine, make_sessionmaker, session_scope
    from db.tables import Case, Priority
    from medbatch.settings import get_settings
    from tests.helpers import register_breast_cancer

    register_breast_cancer(env / "store", "0.9.0", status="retired")
    cli_env(MEDBATCH_BROKER_URL=redis_url)
    engine = make_engine(get_settings().database_url)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as s:
        tenant = repo.create_tenant(s, name="t")[0].id
        new = [
            repo.NewCase("old", "breast-cancer", "0.9.0", Priority.bulk, {"x": 1.0}),
            repo.NewCase("live", "breast-cancer", "1.0.0", Priority.bulk, {"x": 1.0}),
        ]
        old, live = (a.id for a in repo.add_cases(s, tenant_id=tenant, cases=new))
        repo.claim_cases(s, case_ids=[old, live], max_deliveries=0)  # dead letters
    try:
        assert main(["cases", "replay", "--all"]) == 0
        out, err = capsys.readouterr()
        assert out == "re-queued 1 dead-lettered cases\n"
        assert err == "not re-queued (model version retired): 1 of breast-cancer@0.9.0\n"
        assert main(["cases", "replay", str(old)]) == 0
        out, err = capsys.readouterr()
        assert out == "re-queued 0 dead-lettered cases\n"
        assert err == f"not re-queued (model version retired): {old}\n"
        with sessions() as s:
            dead = dict(s.execute(select(Case.id, Case.dead_letter)).tuples().all())
        assert dead == {old: True, live: False}
    finally:
        engine.dispose()


def test_worker_beat_refuses_a_retired_nightly_model_version_at_start(
    env: Path,
    cli_env: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The start check took any version the registry knows, but the nightly run takes only one
    that scores (worker/tasks/nightly.py): beat pinned to a retired version started, and its
    first night's run failed at its hour, as with a misspelt model."""
    import worker.app
    from tests.helpers import register_breast_cancer

    started: list[list[str]] = []
    monkeypatch.setattr(worker.app, "run_worker", lambda app, argv: started.append(argv) or 0)
    register_breast_cancer(env / "store", "0.9.0", status="retired")
    (env / "drop").mkdir()
    cli_env(MEDBATCH_NIGHTLY_DIR=str(env / "drop"), MEDBATCH_NIGHTLY_MODEL="breast-cancer@0.9.0")
    assert main(["worker", "--beat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medbatch worker: MEDBATCH_NIGHTLY_MODEL: a retired model version")
    assert "breast-cancer@1.0.0" in err and "0.9.0" not in err and len(err.splitlines()) == 1
    assert started == []
