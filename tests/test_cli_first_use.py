"""A new user's first commands: fast help with every option explained, every command in an
empty folder on the embedded defaults, one clear line instead of a traceback, no silent
overwrite."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medbatch.cli import _common, build_parser

DATA = Path(__file__).resolve().parent / "data" / "genome"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "compounds"
HEAVY = ("torch", "numba", "rdkit", "celery", "sqlalchemy", "fastapi", "numpy", "pydantic")


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``medbatch`` as its own process. Kept here, not in tests/helpers.py: this module must
    import nothing heavy, since the help test below imports it in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "medbatch.cli", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _subcommands(child)
    return found


def test_help_of_every_command_imports_nothing_heavy() -> None:
    """Building the parser and every command's help, in a fresh interpreter, imports none of
    torch, numba, RDKit, Celery, SQLAlchemy, FastAPI, numpy, pydantic."""
    code = (
        "import sys, argparse\n"
        "from medbatch.cli import build_parser\n"
        "from tests.test_cli_first_use import _subcommands\n"
        "for p in _subcommands(build_parser()): p.format_help()\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_every_option_has_help_and_shows_its_default() -> None:
    """Each option of each command says what it does; a default, when there is one, is shown."""
    for parser in _subcommands(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, f"{parser.prog} {action.dest}: no help text"
            default = action.default
            if default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                # argparse wraps a long default (a queue list) mid-word: compare without spaces.
                shown = "".join(text.split())
                assert (
                    "default" in (action.help or "")
                    or f"(default:{default})".replace(" ", "") in shown
                ), f"{parser.prog} {action.option_strings[0]}: default {default!r} not shown"


def test_the_cli_s_own_lists_match_the_project_s() -> None:
    """The queue and recipe names the CLI keeps (to stay light) are the worker's and trainer's."""
    from models.reference.train import TRAINABLE
    from worker.queues import ALL_QUEUES

    assert _common.ALL_QUEUES == ALL_QUEUES
    assert tuple(_common.TRAINABLE) == tuple(TRAINABLE)


def test_commands_work_in_an_empty_folder_without_db_upgrade(tmp_path: Path) -> None:
    """The embedded SQLite is migrated on first use: create-tenant, then a genome comparison
    (no `no such table: tenants`)."""
    tenant = run_cli("db", "create-tenant", "first", cwd=tmp_path)
    assert tenant.returncode == 0, tenant.stderr
    assert json.loads(tenant.stdout)["tenant"] == "first"
    assert (tmp_path / "var" / "medbatch.sqlite").is_file()
    result = run_cli(
        "genome", "compare", "--bfile", str(DATA / "hm3_small"), "--metric", "king",
        "--out", "out/small", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for name in ("small.king", "small.king.id", "small.king.npy", "small.kin0"):
        assert (tmp_path / "out" / name).is_file(), name
    lines = result.stdout.splitlines()
    for degree in ("duplicate/MZ twin", "1st", "2nd", "3rd"):
        assert any(line.split()[:-1] == degree.split() for line in lines), degree


def test_genome_out_refuses_to_overwrite_and_names_npy_by_metric(tmp_path: Path) -> None:
    """grm then ibs into one --out keep both matrices; the same metric again needs --force."""
    base = ["genome", "compare", "--bfile", str(DATA / "hm3_small"), "--out", "o/x"]
    assert run_cli(*base, "--metric", "grm", cwd=tmp_path).returncode == 0
    assert run_cli(*base, "--metric", "ibs", cwd=tmp_path).returncode == 0
    import numpy as np

    grm, ibs = (np.load(tmp_path / "o" / f"x.{m}.npy") for m in ("grm", "ibs"))
    assert not np.allclose(grm, ibs)
    again = run_cli(*base, "--metric", "grm", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip().startswith("medbatch genome compare: --out: ")
    assert "add --force" in again.stderr and "Traceback" not in again.stderr
    assert run_cli(*base, "--metric", "grm", "--force", cwd=tmp_path).returncode == 0


def test_genome_query_mode_writes_a_kin0_of_query_cohort_pairs(tmp_path: Path) -> None:
    """New samples against a cohort that holds them: each is its own duplicate, listed in a .kin0
    (query i against cohort i included)."""
    result = run_cli(
        "genome", "compare", "--bfile", str(DATA / "hm3_small"), "--query",
        str(DATA / "hm3_small"), "--metric", "king", "--out", "q/x", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in (tmp_path / "q" / "x.kin0").read_text().splitlines()]
    assert rows[0][0] == "#FID1"
    duplicates = [r for r in rows[1:] if r[1] == r[3]]
    assert len(duplicates) == 60
    assert all(float(r[-1]) > 0.35 for r in duplicates)
    lines = result.stdout.splitlines()
    assert any(line.split() == ["duplicate/MZ", "twin", "60"] for line in lines)


def test_a_plink2_fileset_is_refused_saying_how_to_convert_it(tmp_path: Path) -> None:
    """A biobank engineer's first try with a .pgen fileset: `--pfile` (plink2's option) was
    argparse's "one of the arguments --bfile --vcf is required", and `--bfile cohort` only
    "cohort.bed not found"; both now say to write a PLINK 1 fileset, and how."""
    for ext in (".pgen", ".pvar", ".psam"):
        (tmp_path / f"cohort{ext}").write_bytes(b"")
    for args in (
        ("--pfile", "cohort"),
        ("--bfile", "cohort"),
        ("--bfile", "cohort.pgen"),
        ("--bfile", str(DATA / "hm3_small"), "--query", "cohort"),
    ):
        result = run_cli("genome", "compare", *args, "--metric", "king", cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "`plink2 --pfile PREFIX --make-bed --out PREFIX`" in lines[0], lines[0]
    assert "--pfile" not in run_cli("genome", "compare", "--help", cwd=tmp_path).stdout
    # A PLINK prefix (or any other file) given to --vcf was read as a PLINK prefix.
    vcf = run_cli("genome", "compare", "--vcf", str(DATA / "hm3_small"), "--metric", "king",
                  cwd=tmp_path)  # fmt: skip
    assert vcf.returncode == 2 and len(vcf.stderr.strip().splitlines()) == 1, vcf.stderr
    assert "is not a .vcf, .vcf.gz, .vcf.bgz or .bcf file (a PLINK fileset goes to --bfile)" in (
        vcf.stderr
    )


def test_submit_with_the_api_down_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """No traceback: one line that names the API and what to do."""
    cases = tmp_path / "cases.json"
    cases.write_text("[]")
    result = run_cli(
        "submit", str(cases), "--api", "http://127.0.0.1:9", "--api-key", "k", cwd=tmp_path
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "cannot reach the API at http://127.0.0.1:9" in lines[0]


def test_api_on_a_port_already_taken_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The README's `medbatch api --port 8000` with 8000 taken: it was four uvicorn log lines
    after "Application startup complete", and exit 3."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("api", "--port", str(port), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"medbatch api: --port {port}: already in use")
    assert "--port" in lines[0].split(";")[1]
    unknown = run_cli("api", "--host", "no-such-host.invalid", cwd=tmp_path)
    assert unknown.returncode == 2
    assert len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
    assert "--host no-such-host.invalid: not an address" in unknown.stderr


def test_submit_of_a_fhir_bundle_says_where_a_bundle_goes(tmp_path: Path) -> None:
    """examples/patient-bundle.json given to `submit`: it was six pydantic lines from the API
    (external_id, model, features required; resourceType, type, entry not permitted)."""
    bundle = Path(__file__).resolve().parents[1] / "examples" / "patient-bundle.json"
    result = run_cli(
        "submit", str(bundle), "--api", "http://127.0.0.1:9", "--api-key", "k", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a FHIR resource, not cases" in lines[0], lines
    assert "POST /v1/fhir" in lines[0] and "medbatch nightly" in lines[0]


def test_a_medbatch_variable_that_is_no_setting_is_named_not_ignored_in_silence(
    tmp_path: Path,
) -> None:
    """MEDBATCH_DB_URL or MEDBATCH_REDIS_URL (a typo, another tool's name) were ignored without
    a word, and the command ran on the SQLite file and the embedded broker instead."""
    result = run_cli(
        "models", "list", cwd=tmp_path,
        MEDBATCH_DB_URL="postgresql://secret@h/db", MEDBATCH_REDIS_URL="redis://h:6379/0",
        MEDBATCH_TEST_REDIS="redis://127.0.0.1:6379/11", MEDBATCH_HOST_GENOTYPES="/data",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("medbatch: ")]
    assert warnings == [
        "medbatch: warning: MEDBATCH_DB_URL is not a setting and is ignored "
        "(MEDBATCH_DATABASE_URL?)",
        "medbatch: warning: MEDBATCH_REDIS_URL is not a setting and is ignored "
        "(MEDBATCH_BROKER_URL?)",
    ]
    assert "secret" not in result.stderr


@pytest.mark.parametrize("command", ["worker", "sweeper"])
def test_a_broker_that_does_not_answer_stops_a_worker_or_sweeper_in_one_line(
    command: str, tmp_path: Path
) -> None:
    """MEDBATCH_BROKER_URL set and Redis not running: the worker retried a hundred times, a
    log line and a blank one each, the sweeper logged "broker state unknown" every interval."""
    env = {**os.environ, "MEDBATCH_BROKER_URL": "redis://127.0.0.1:9/0"}
    # Without the check the process keeps trying: the timeout fails the test.
    result = subprocess.run(
        [sys.executable, "-m", "medbatch.cli", command], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"medbatch {command}: cannot reach the broker (MEDBATCH_BROKER_URL)")
    assert lines[0].endswith("start it, or unset MEDBATCH_BROKER_URL for the embedded one")


def test_a_failover_broker_url_is_refused_only_when_no_broker_of_it_answers() -> None:
    """Celery takes failover brokers joined by ';' and connects to the first that answers. The
    start check tried two connections in all: with the first two down and the third up, a
    worker or sweeper that Celery would have run stopped ("cannot reach the broker"). Each is
    tried now; the check refuses only when none answers."""
    from medbatch.settings import Settings
    from tests.conftest import REDIS_TEST_URL

    down = "redis://127.0.0.1:9/0;redis://127.0.0.1:10/0;redis://127.0.0.1:11/0"
    _common.require_broker(Settings(broker_url=f"{down};{REDIS_TEST_URL}"))
    with pytest.raises(_common.CliError, match="cannot reach the broker"):
        _common.require_broker(Settings(broker_url=down))


def test_worker_refuses_an_unknown_queue(tmp_path: Path) -> None:
    result = run_cli("worker", "--queues", "score.stat,gnome", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown queue gnome" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("worker", "--queues", "genome"),
        ("genome", "compare", "--bfile", str(DATA / "hm3_small"), "--metric", "king", "--table"),
    ],
    ids=["worker", "genome-compare"],
)
def test_cuda_without_a_device_is_one_line_and_exit_2(tmp_path: Path, args: tuple) -> None:
    """MEDBATCH_DEVICE=cuda on a machine without one: a worker refuses to start and a job
    refuses to run before its job exists, each in one line (they used to end in a traceback,
    the job after it had failed its first tile)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    result = run_cli(*args, cwd=tmp_path, MEDBATCH_DEVICE="cuda")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"medbatch {args[0]}") and "torch sees no CUDA device" in last
    assert not result.stdout.strip()


@pytest.mark.parametrize(
    "args",
    [
        ("worker", "--queues", "chem"),
        (
            "compounds",
            "search",
            "--library",
            str(EXAMPLES / "library.smi"),
            "--all-pairs",
            "--top-k",
            "1",
        ),
    ],
    ids=["worker", "compounds-search"],
)
def test_a_cuda_chem_engine_without_a_device_is_one_line_and_exit_2(
    tmp_path: Path, args: tuple
) -> None:
    """MEDBATCH_CHEM_ENGINE=cuda on a machine without one: a chem worker started and failed
    every tile; a search made its job, failed its tile and exited 1."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    result = run_cli(*args, cwd=tmp_path, MEDBATCH_CHEM_ENGINE="cuda")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"medbatch {args[0]}") and "torch sees no CUDA device" in last
    assert not result.stdout.strip()


def test_nightly_wait_on_the_embedded_broker_really_scores(tmp_path: Path) -> None:
    """No worker listens: `nightly --wait` says so, runs one for the run, and every case is
    scored (it used to print `scored: 0` at once); `rejected` counts patients."""
    examples = Path(__file__).resolve().parents[1] / "examples" / "nightly"
    result = run_cli(
        "nightly", "--input", str(examples), "--as-of", "2020-01-01T00:00:00Z", "--wait",
        "--json", cwd=tmp_path, MEDBATCH_WORKER_METRICS_PORT="0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert (summary["patients_read"], summary["accepted"], summary["rejected"]) == (3, 2, 1)
    assert summary["scored"] == 2 and summary["failed"] == 0
    assert sum(summary["rejected_by_reason"].values()) >= summary["rejected"]
    assert "no worker is listening on queue score.bulk" in result.stderr
    assert not (tmp_path / "var" / "broker.sock").exists()


def test_compounds_search_wait_and_status_on_the_embedded_defaults(tmp_path: Path) -> None:
    """`compounds search --wait` in an empty folder computes here with the tiles' progress and
    prints the output; `compounds status` shows the job; a job that is not there, or an id that
    is no id, is one line and exit 2."""
    search = run_cli(
        "compounds", "search", "--library", str(EXAMPLES / "library.sdf"), "--query",
        str(EXAMPLES / "hits.smi"), "--top-k", "2", "--tile-rows", "2", "--wait", cwd=tmp_path,
    )  # fmt: skip
    assert search.returncode == 0, search.stderr
    assert "compound search 1: 5 queries x 40 library molecules" in search.stdout
    assert "tiles" in search.stdout and "3/3" in search.stdout
    output = Path(search.stdout.splitlines()[-1].strip())
    assert output.name == "neighbours.csv"
    assert len(output.read_text().splitlines()) == 1 + 5 * 2
    status = run_cli("compounds", "status", "1", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert (shown["status"], shown["tiles_done"], shown["output"]) == ("done", 3, str(output))
    for job_id, message in (("2", "no job 2"), ("0", "not a job id: 0"), ("x", "not a job id")):
        missing = run_cli("compounds", "status", job_id, cwd=tmp_path)
        assert missing.returncode == 2, missing.stderr
        assert message in missing.stderr.strip().splitlines()[-1]
        assert "Traceback" not in missing.stderr and not missing.stdout


def test_a_setting_that_does_not_validate_is_named_in_one_line_without_its_value(
    tmp_path: Path,
) -> None:
    """A bad MEDBATCH_* variable: exit 2 and one line per bad setting, naming the variable and
    what is wrong, never its value (a URL may hold a password); it used to be a traceback."""
    result = run_cli(
        "db", "upgrade", cwd=tmp_path,
        MEDBATCH_TORCH_THREADS="-1", MEDBATCH_DEVICE="tpu-secret-value",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "secret" not in result.stderr
    lines = sorted(result.stderr.strip().splitlines())
    assert len(lines) == 2, lines
    assert lines[0].startswith("medbatch: MEDBATCH_DEVICE: ")
    assert lines[1].startswith("medbatch: MEDBATCH_TORCH_THREADS: ")
    assert "greater than or equal to 0" in lines[1]
    assert not (tmp_path / "var").exists()  # nothing was started or written
