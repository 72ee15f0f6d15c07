"""Bad input to the newer entry points: CLI commands exit 2 naming the option; malformed task
messages are rejected (not retried) before they touch anything."""

from __future__ import annotations

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
    (env / "Patient.ndjson").write_text("")
    assert main(["nightly", "--input", str(env), "--as-of", "2020-01-01T00:00:00"]) == 2
    assert "--as-of needs a time zone" in capsys.readouterr().err
    assert main(["nightly", "--input", str(env), "--model", "nope"]) == 2
    assert "--model: unknown model 'nope'" in capsys.readouterr().err


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
