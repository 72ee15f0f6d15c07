"""docker-compose.yml agrees with the CLI, the settings, the Dockerfile and STYLE.md point 12."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from medbatch.cli import build_parser
from medbatch.settings import Settings

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]

# Compose interpolation, as much as this file uses: ${NAME:-default} becomes its default (what a
# bare `docker compose up` gets), ${NAME:?message} (a required secret) a stand-in value, and $$ is
# a literal $.
_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<kind>:-|:\?)(?P<default>[^}]*))?\}")
#: Variables that must be set: compose refuses to start without them (no silent default).
REQUIRED = {"POSTGRES_PASSWORD"}


def _interpolate(match: re.Match[str]) -> str:
    if match.group(0) == "$$":
        return "$"
    if match.group("kind") == ":?":
        assert match.group("name") in REQUIRED, f"{match.group(0)}: not a required secret"
        return "required-secret"
    if match.group("default") is None:
        raise AssertionError(f"{match.group(0)} in docker-compose.yml needs a :-default")
    return match.group("default")


def _load_compose() -> dict[str, Any]:
    text = (ROOT / "docker-compose.yml").read_text()
    return dict(yaml.safe_load(_INTERPOLATION.sub(_interpolate, text)))


COMPOSE = _load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
#: Services that run the medbatch image, whose ``command`` is the argument list of ``medbatch``.
APP_SERVICES = sorted(name for name, svc in SERVICES.items() if "build" in svc)
#: Services others wait on to finish (exit 0) rather than to be healthy.
ONE_SHOT = sorted(
    {
        target
        for svc in SERVICES.values()
        for target, dep in (svc.get("depends_on") or {}).items()
        if isinstance(dep, dict) and dep.get("condition") == "service_completed_successfully"
    }
)
LONG_RUNNING = sorted(set(SERVICES) - set(ONE_SHOT))
LONG_RUNNING_APPS = sorted(set(APP_SERVICES) - set(ONE_SHOT))


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _parse(name: str) -> Any:
    argv = _argv(SERVICES[name]["command"])
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(
            f"service {name}: `medbatch {shlex.join(argv)}` is not a valid medbatch command"
        )


def _environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _settings(name: str) -> Settings:
    env: dict[str, Any] = _environment(SERVICES[name])
    return Settings(
        **{
            k.removeprefix("MEDBATCH_").lower(): v
            for k, v in env.items()
            if k.startswith("MEDBATCH_")
        }
    )


def _healthcheck_command(svc: dict[str, Any]) -> str:
    test = svc["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


def test_there_are_app_services() -> None:
    """The api, the migration and the workers are built from the medbatch image."""
    assert {"api", "migrate", "worker", "beat", "sweeper"} <= set(APP_SERVICES)


def test_dockerfile_entrypoint_is_medbatch() -> None:
    """The image's entrypoint is `medbatch`, so a service's command is medbatch's argument list."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    entrypoints = [line.split(None, 1)[1] for line in lines if line.startswith("ENTRYPOINT")]
    assert [json.loads(e) for e in entrypoints] == [["medbatch"]]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_command_parses(name: str) -> None:
    """Each app service's command is accepted by medbatch's argument parser."""
    _parse(name)


def test_medbatch_env_vars_name_settings_fields() -> None:
    """Every MEDBATCH_* variable in the file names a field of Settings."""
    names = {
        key
        for svc in [
            COMPOSE.get("x-medbatch-env", {}),
            *(_environment(s) for s in SERVICES.values()),
        ]
        for key in svc
        if key.startswith("MEDBATCH_")
    }
    assert names
    unknown = {n for n in names if n.removeprefix("MEDBATCH_").lower() not in Settings.model_fields}
    assert not unknown, f"not Settings fields: {sorted(unknown)}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_env_validates_and_uses_the_compose_services(name: str) -> None:
    """The env makes a valid Settings that uses the compose Redis and PostgreSQL, not defaults."""
    settings = _settings(name)
    db = make_url(settings.database_url)
    assert db.get_backend_name() == "postgresql"
    assert db.host in SERVICES
    assert not settings.embedded_broker
    broker = make_url(settings.broker_url)
    assert broker.drivername == "redis"
    assert broker.host in SERVICES


@pytest.mark.parametrize("name", APP_SERVICES)
def test_database_driver_is_installed(name: str) -> None:
    """The database URL names a SQLAlchemy dialect whose DBAPI driver is installed."""
    dialect = make_url(_settings(name).database_url).get_dialect()
    dialect.import_dbapi()


@pytest.mark.parametrize("name", APP_SERVICES)
def test_artifact_dir_is_a_shared_named_volume(name: str) -> None:
    """MEDBATCH_ARTIFACT_DIR is a named volume, the same one in every app service."""
    target = str(_settings(name).artifact_dir)
    mounts = [
        tuple(v.split(":")[:2]) if isinstance(v, str) else (v.get("source"), v.get("target"))
        for v in SERVICES[name].get("volumes", [])
    ]
    sources = {source for source, mounted_at in mounts if mounted_at == target}
    assert len(sources) == 1
    assert sources <= set(COMPOSE.get("volumes") or {})


def test_redis_keeps_messages() -> None:
    """Redis keeps an append-only file and refuses writes rather than evict queued messages."""
    argv = _argv(SERVICES["redis"]["command"])
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert options.get("--appendonly") == "yes"
    assert options.get("--maxmemory-policy") == "noeviction"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_service_has_healthcheck(name: str) -> None:
    """Every service that keeps running has an enabled healthcheck."""
    healthcheck = SERVICES[name].get("healthcheck") or {}
    assert healthcheck.get("test") and not healthcheck.get("disable")


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_service_restarts(name: str) -> None:
    """Every service that keeps running is restarted when it stops (a worker that stops on an
    error exits non-zero, so even an on-failure policy would restart it)."""
    assert SERVICES[name].get("restart") in {"always", "unless-stopped", "on-failure"}


def test_the_sweeper_runs_apart_from_the_workers() -> None:
    """A service of its own runs `medbatch sweeper`, so no queue backlog and no worker's death
    stops the safety net."""
    sweepers = [name for name in APP_SERVICES if _parse(name).command == "sweeper"]
    assert sweepers and all(name not in ("worker", "beat") for name in sweepers)


@pytest.mark.parametrize("name", ONE_SHOT)
def test_one_shot_service_does_not_restart(name: str) -> None:
    """A service waited on to complete is never restarted."""
    assert SERVICES[name].get("restart", "no") == "no"


@pytest.mark.parametrize("name", sorted(n for n, s in SERVICES.items() if s.get("depends_on")))
def test_depends_on_uses_conditions(name: str) -> None:
    """Each dependency waits on health (or on completion) of a service that can report it."""
    depends_on = SERVICES[name]["depends_on"]
    assert isinstance(depends_on, dict), "the list form of depends_on waits for nothing"
    for target, dep in depends_on.items():
        assert target in SERVICES
        condition = dep.get("condition")
        assert condition in {"service_healthy", "service_completed_successfully"}, target
        if condition == "service_healthy":
            assert "healthcheck" in SERVICES[target], target


@pytest.mark.parametrize("name", LONG_RUNNING_APPS)
def test_app_waits_for_migrations(name: str) -> None:
    """The api and the workers start only after `medbatch db upgrade` exited successfully."""
    migrate = SERVICES[name]["depends_on"]["migrate"]
    assert migrate["condition"] == "service_completed_successfully"
    args = _parse("migrate")
    assert (args.command, args.db_command) == ("db", "upgrade")


def test_exactly_one_beat() -> None:
    """Exactly one service embeds beat, and it runs as a single replica."""
    beats = [name for name in APP_SERVICES if getattr(_parse(name), "beat", False)]
    assert len(beats) == 1
    assert SERVICES[beats[0]].get("deploy", {}).get("replicas") == 1


@pytest.mark.parametrize(
    "name", [n for n in LONG_RUNNING_APPS if _argv(SERVICES[n]["command"])[0] == "worker"]
)
def test_worker_healthcheck_pings_its_own_node(name: str) -> None:
    """A worker's healthcheck pings the Celery node name that its command gives it."""
    hostname = _parse(name).hostname or "celery@%h"
    node = hostname.replace("%h", "$HOSTNAME")
    assert f'-d "{node}"' in _healthcheck_command(SERVICES[name])


def test_numba_caches_the_genome_kernels_where_the_image_user_can_write(tmp_path) -> None:
    """The image's site-packages are read-only to its user, so NUMBA_CACHE_DIR points into
    /app/var (which the image hands to that user), and numba does write the kernels there."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    envs = dict(
        line.split(None, 1)[1].split("=", 1) for line in lines if line.startswith("ENV NUMBA_")
    )
    assert envs["NUMBA_CACHE_DIR"].startswith("/app/var/")
    assert any("chown medbatch:medbatch /app/var" in line for line in lines)
    code = (
        "import numpy as np\n"
        "from models.genome import _cpu as genome_cpu\n"
        "genome_cpu.dosage_counts(np.zeros((3, 5), np.int8))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    assert list(tmp_path.rglob("*.nbi")), "numba wrote no kernel index there"


def test_required_secrets_have_no_default() -> None:
    """A missing POSTGRES_PASSWORD stops compose with a message; no fallback password."""
    text = (ROOT / "docker-compose.yml").read_text()
    for name in REQUIRED:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?") and len(u) > 2 for u in uses), uses


def test_the_image_is_cpu_torch_with_the_reference_extras() -> None:
    """CPU wheels by default (a CUDA index for the GPU image); train and evaluate work inside."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"' in dockerfile
    assert '--index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"' in dockerfile
    assert '".[reference]"' in dockerfile
    for name in APP_SERVICES:
        args = SERVICES[name]["build"]["args"]
        assert args["TORCH_INDEX_URL"].endswith("/whl/cpu"), name


def test_the_nightly_drop_folder_is_mounted_where_the_setting_points() -> None:
    """Every service that reads score.routine (where beat sends the nightly run) sees the folder."""
    readers = [
        n for n in LONG_RUNNING_APPS if "score.routine" in (getattr(_parse(n), "queues", "") or "")
    ]
    assert "beat" in readers
    for name in readers:
        folder = _settings(name).nightly_dir
        assert folder is not None, name
        mounts = [v.split(":")[1] for v in SERVICES[name]["volumes"] if isinstance(v, str)]
        assert str(folder) in mounts, name


def test_the_nightly_drop_folder_is_writable_where_beat_marks_each_export_done() -> None:
    """beat marks each export it scored with a .medbatch-done.json in the export's folder
    (worker/tasks/nightly.py), so that it is run once. The folder was mounted read-only: the
    marker's write failed (read-only file system) after the first export was scored, the task
    stopped there, and every night after read that export again and never reached the newer
    ones."""
    import inspect

    from worker.tasks.nightly import run_drop

    assert "(export / MARKER).write_text" in inspect.getsource(run_drop)
    for name in LONG_RUNNING_APPS:
        folder = _settings(name).nightly_dir
        if folder is None:
            continue
        (mount,) = [
            v
            for v in SERVICES[name]["volumes"]
            if isinstance(v, str) and v.split(":")[1] == str(folder)
        ]
        options = ",".join(mount.split(":")[2:]).split(",")
        assert "ro" not in options, f"{name} mounts the nightly drop folder read-only"


def test_worker_metrics_are_exposed_on_the_compose_network() -> None:
    default = Settings().worker_metrics_port
    for name in LONG_RUNNING_APPS:
        if _argv(SERVICES[name]["command"])[0] != "worker":
            continue
        assert _settings(name).worker_metrics_host == "0.0.0.0", name
        assert str(default) in [str(p) for p in SERVICES[name].get("expose", [])], name
        assert "ports" not in SERVICES[name], f"{name} publishes a port to the host"


def test_the_gpu_file_gives_each_worker_its_own_gpu_genome_workers_included() -> None:
    """device_ids, never count (every replica would get the same GPU); two GPUs, each with a
    scoring and a genome worker, on the CUDA image."""
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    per_gpu: dict[str, set[str]] = {}
    for name, svc in gpu["services"].items():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device and device["capabilities"] == ["gpu"], name
        (gpu_id,) = device["device_ids"]
        base = svc.get("extends", {}).get("service", name)
        queues = _argv(SERVICES[base]["command"])
        per_gpu.setdefault(gpu_id, set()).add("genome" if "genome,chem" in queues else "score")
        assert svc["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[1].startswith("cu"), name
        assert svc["environment"]["MEDBATCH_DEVICE"] == "cuda", name
    assert per_gpu == {"0": {"score", "genome"}, "1": {"score", "genome"}}


def test_the_demo_finds_its_examples_in_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pip install .` puts medbatch in site-packages, where no examples/ lies beside it:
    `medbatch demo` failed in the image. The image names its copy of the source's."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert "COPY . /app" in lines
    envs = dict(
        line.split(None, 1)[1].split("=", 1) for line in lines if line.startswith("ENV MEDBATCH_")
    )
    folder = envs["MEDBATCH_EXAMPLES_DIR"]
    assert folder.startswith("/app/")
    relative = folder.removeprefix("/app/")
    for part in ("compounds", "genotypes", "nightly"):
        assert (ROOT / relative / part).is_dir(), part
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert relative not in ignored and f"{relative}/" not in ignored
    monkeypatch.setenv("MEDBATCH_EXAMPLES_DIR", str(ROOT / relative))
    assert Settings().examples == ROOT / relative


def test_the_demo_without_its_examples_says_where_it_looked(tmp_path: Path) -> None:
    """One line naming the folder and the setting, not a traceback from deep in the demo."""
    from tests.test_cli_first_use import run_cli

    done = run_cli(
        "demo",
        cwd=tmp_path,
        PYTHONPATH=str(ROOT),
        MEDBATCH_EXAMPLES_DIR=str(tmp_path / "none"),
        MEDBATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'demo.db'}",
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"medbatch demo: {tmp_path / 'none'}: no examples/ folder there; set MEDBATCH_EXAMPLES_DIR"
    ]
