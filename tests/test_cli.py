"""The `medbatch` command line: its database, model and submit commands, and their bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from medbatch.cli import build_parser, main
from medbatch.cli._common import CliError, copy_out
from medbatch.settings import get_settings
from tests.helpers import save_mlp
from tests.test_cli_first_use import run_cli


def test_db_upgrade_then_create_tenant_prints_a_key_once(tmp_path: Path) -> None:
    """`db upgrade` builds the schema; `db create-tenant` prints the tenant and its new key."""
    env = {"MEDBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite'}"}
    assert run_cli("db", "upgrade", cwd=tmp_path, **env).returncode == 0
    result = run_cli("db", "create-tenant", "hospital-a", cwd=tmp_path, **env)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["tenant"] == "hospital-a" and printed["api_key"].startswith("mbk_")
    again = run_cli("db", "create-tenant", "hospital-a", cwd=tmp_path, **env)
    assert again.returncode == 1
    assert (
        again.stderr.strip().splitlines()[-1]
        == "medbatch db create-tenant: tenant 'hospital-a' already exists; a new key for it "
        "(printed the same way): medbatch db rotate-key hospital-a"
    )
    rotated = run_cli("db", "rotate-key", "hospital-a", cwd=tmp_path, **env)
    assert json.loads(rotated.stdout)["api_key"].startswith("mbk_")
    assert printed["api_key"] not in again.stderr


def test_models_list_shows_version_schema_size_and_sha256(tmp_path: Path) -> None:
    """`models list` names each version with its sha256."""
    result = run_cli("models", "list", cwd=tmp_path)
    assert result.returncode == 0
    assert "breast-cancer@1.0.0 (default)" in result.stdout
    assert "30 tabular inputs" in result.stdout
    assert "vitals-gru@0.1.0 (default)\tcandidate" in result.stdout
    assert "NOT FOR CLINICAL USE" in result.stdout


@pytest.mark.parametrize(
    ("name", "text", "said"),
    [
        ("shadows.json", '{"breast-cancer": ', "not JSON"),
        ("shadows.json", "[1, 2]", 'expected {"model name": "candidate version", ...}'),
        ("registry.json", "garbage", "not a model registry (JSONDecodeError"),
        ("registry.json", '{"models": [{"name": "x"}]}', "not a model registry (KeyError"),
    ],
)
def test_a_store_file_edited_badly_is_one_line_naming_it(
    tmp_path: Path,
    name: str,
    text: str,
    said: str,
    cli_env: Callable[..., None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A hand-edited registry or shadow assignment that does not read: every `models` command
    says which file, in one line, where each was a JSON traceback."""
    store = tmp_path / "store"
    store.mkdir()
    (store / name).write_text(text)
    cli_env(MEDBATCH_ARTIFACT_DIR=str(store))
    for command in (["list"], ["shadow", "breast-cancer", "--off"], ["drift", "breast-cancer"]):
        assert main(["models", *command]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"medbatch models {command[0]}: {store / name}: {said}"), line


def test_submit_with_an_unreadable_file_says_so(tmp_path: Path) -> None:
    """`submit` with a missing or non-JSON file exits 2 naming the file; nothing is sent."""
    missing = run_cli("submit", str(tmp_path / "nope.json"), "--api-key", "k", cwd=tmp_path)
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = run_cli("submit", str(bad), "--api-key", "k", cwd=tmp_path)
    assert result.returncode == 2 and "bad.json" in result.stderr


def test_an_unknown_model_to_train_exits_2_naming_the_trainable_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["models", "train", "nope"]) == 2
    get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "no training recipe for 'nope'" in err and "whas500-mortality" in err
    assert "ecg-cnn@0.1.0" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["worker", "--nope"],
        ["db"],
        ["api", "--port", "eighty"],
        ["submit", "cases.json"],
        ["sweeper", "--every", "5"],
        ["genome", "compare", "--metric", "king"],
        ["submit"],
        ["genome", "status", "99999999999999999999999"],
        ["genome", "status", "0"],
    ],
    ids=" ".join,
)
def test_bad_arguments_exit_2_with_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse refuses unknown choices, flags and types, and missing required arguments, with a
    usage line (a job id beyond a bigint was an OverflowError traceback from the database)."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "usage: medbatch" in capsys.readouterr().err


def test_models_evaluate_writes_a_report_and_refuses_unknown_or_unlabelled(tmp_path: Path) -> None:
    """`models evaluate` prints the metrics and writes the folder; bad refs exit 2 with a reason."""
    env = {"MEDBATCH_ARTIFACT_DIR": str(tmp_path / "artifacts")}
    result = run_cli("models", "evaluate", "breast-cancer@1.0.0", cwd=tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert "roc_auc    0.9997" in result.stdout
    assert (tmp_path / "artifacts" / "reports" / "breast-cancer-1.0.0" / "roc.png").is_file()
    unknown = run_cli("models", "evaluate", "breast-cancer@9.9.9", cwd=tmp_path, **env)
    assert unknown.returncode == 2 and "unknown model version" in unknown.stderr
    unlabelled = run_cli("models", "evaluate", "vitals-gru", cwd=tmp_path, **env)
    assert unlabelled.returncode == 2 and "no labelled held-out data" in unlabelled.stderr


def test_models_register_then_list_and_bad_input_exits_2(tmp_path: Path) -> None:
    """`models register` stores a safetensors MLP and lists it; a bad file or schema exits 2."""
    import torch

    weights = tmp_path / "mine.safetensors"
    mlp = save_mlp(weights, 2, hidden=())
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps(
            {"inputs": [{"name": "x", "unit": "1"}, {"name": "y", "unit": "1"}], "output": "risk"}
        )
    )
    env = {"MEDBATCH_ARTIFACT_DIR": str(tmp_path / "store")}
    args = [
        "models",
        "register",
        str(weights),
        "--name",
        "mine",
        "--version",
        "1",
        "--schema",
        str(schema),
    ]
    ok = run_cli(*args, "--architecture", "mlp", "--params", '{"hidden": []}', cwd=tmp_path, **env)
    assert ok.returncode == 0, ok.stderr
    assert "registered mine@1 (mlp)" in ok.stdout
    assert (
        "mine@1 (default)\tcandidate\tmlp" in run_cli("models", "list", cwd=tmp_path, **env).stdout
    )
    no_arch = run_cli(*args[:-2], "--version", "2", "--schema", str(schema), cwd=tmp_path, **env)
    assert no_arch.returncode == 2 and "needs --architecture" in no_arch.stderr
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"junk" * 100)
    bad = run_cli(
        "models",
        "register",
        str(junk),
        "--name",
        "j",
        "--version",
        "1",
        "--schema",
        str(schema),
        cwd=tmp_path,
        **env,
    )
    assert bad.returncode == 2 and "is not a TorchScript archive" in bad.stderr
    assert torch.isfinite(mlp.mean).all()


def test_genome_compare_table_writes_the_kin0_and_counts_per_degree(tmp_path: Path) -> None:
    """`genome compare --table` in an empty folder: plink2's .kin0 and a count per degree; a
    square-only metric with --table exits 2 naming the option."""
    data = Path(__file__).resolve().parent / "data" / "genome"
    env = {"MEDBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite'}"}
    assert run_cli("db", "upgrade", cwd=tmp_path, **env).returncode == 0
    result = run_cli(
        "genome", "compare", "--bfile", str(data / "hm3_relatives"), "--metric", "king",
        "--table", "--block", "48", "--threshold", "0.0442", "--out", "out/cohort",
        cwd=tmp_path, **env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pairs only, 96 x 96 samples, 14079 variants, 3 tiles" in result.stdout
    assert (tmp_path / "out" / "cohort.kin0").read_text() == (
        data / "hm3_relatives_0.0442.kin0"
    ).read_text()
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["64", "pairs", "with", "kinship", ">=", "0.0442"] in lines
    for degree, count in (("duplicate/MZ", "4"), ("1st", "36"), ("2nd", "20"), ("3rd", "4")):
        assert any(line[:1] == [degree] and line[-1] == count for line in lines), result.stdout
    bad = run_cli(
        "genome", "compare", "--bfile", str(data / "hm3_relatives"), "--metric", "grm",
        "--table", cwd=tmp_path, **env,
    )  # fmt: skip
    assert bad.returncode == 2 and "--table" in bad.stderr and "king" in bad.stderr


def test_sweeper_runs_in_an_empty_folder_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """`medbatch sweeper` with the embedded defaults: it migrates the new SQLite file first, so
    its sweeps succeed; it marks itself alive, and exits 0 on SIGTERM."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "medbatch.cli", "sweeper"],
        cwd=tmp_path,
        env={**os.environ, "MEDBATCH_SWEEP_INTERVAL_S": "0.2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    alive = tmp_path / "var" / "sweeper.alive"
    deadline = time.monotonic() + 90
    while not alive.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert alive.exists()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "sweep failed" not in out and "Traceback" not in out, out


def test_an_output_is_copied_to_out_whole_or_not_at_all(tmp_path: Path) -> None:
    """``--out`` gets the job's table by a rename: a copy that fails leaves the old file as it
    was and no partial file beside it."""
    source = tmp_path / "king.kin0"
    source.write_text("#FID1\tIID1\n" + "a\tb\n" * 1000)
    target = tmp_path / "out" / "table.kin0"
    copy_out(source, target)
    assert target.read_bytes() == source.read_bytes()
    with pytest.raises(CliError, match="--out: cannot write"):
        copy_out(tmp_path / "gone.kin0", target)
    assert target.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.kin0"]
