"""The schema: tenants, their cases, and the scores written for them. Same on PostgreSQL and SQLite."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")

# Stable constraint names, so Alembic migrations name the same things on every database.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone; we store UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar = {datetime: UTCDateTime(), dict[str, Any]: JSON}


class CaseStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class Priority(enum.StrEnum):
    stat = "stat"
    routine = "routine"
    bulk = "bulk"


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    #: The sha256 of the key made with this row. Authentication reads :class:`ApiKey` (which
    #: holds this key too, and any later ones); the column stays because SQLite cannot drop a
    #: UNIQUE column without rebuilding a table that others reference (migration 0011).
    api_key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Case(Base):
    __tablename__ = "cases"
    __table_args__ = (
        UniqueConstraint("tenant_id", "external_id", name="uq_cases_tenant_external"),
        Index("ix_cases_status_enqueued_at", "status", "enqueued_at"),
        Index("ix_cases_tenant_model", "tenant_id", "model_name"),
        Index("ix_cases_tenant_subject", "tenant_id", "subject"),
        Index("ix_cases_status_lease_expires_at", "status", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"))
    external_id: Mapped[str] = mapped_column(String(200))
    model_name: Mapped[str] = mapped_column(String(100))
    #: Resolved at submission, so a case is always scored by the version it was accepted for.
    model_version: Mapped[str] = mapped_column(String(50))
    priority: Mapped[Priority] = mapped_column(
        Enum(Priority, native_enum=False, create_constraint=True, name="priority", length=10)
    )
    features: Mapped[dict[str, Any]]
    status: Mapped[CaseStatus] = mapped_column(
        Enum(CaseStatus, native_enum=False, create_constraint=True, name="status", length=10),
        default=CaseStatus.queued,
    )
    #: How many times a scoring message for this case reached a worker.
    delivery_count: Mapped[int] = mapped_column(default=0)
    #: Failed because it was delivered too often without finishing (``medbatch cases replay``).
    dead_letter: Mapped[bool] = mapped_column(default=False, server_default=false())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    #: When the last scoring message for this case was sent; the sweeper re-sends stale ones.
    #: Empty while a case waits for a message (the broker was down when it was accepted).
    enqueued_at: Mapped[datetime | None]
    #: The worker process that holds the case (``host:pid:token``) and until when: renewed while
    #: its batch runs; an expired lease is handed back by the sweeper (worker/sweeper.py).
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    #: The FHIR patient the case was built from (``Patient/<id>``), for cases that came as FHIR.
    subject: Mapped[str | None] = mapped_column(String(200))
    #: How the features were obtained from FHIR: the resources used (``basis``), the imputed
    #: features, the ``as_of`` time. No values: those are in ``features``.
    context: Mapped[dict[str, Any] | None]

    scores: Mapped[list[Score]] = relationship(back_populates="case", order_by="Score.id")


class Batch(Base):
    """One forward pass: which model on which device scored how many cases, and how fast."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    queue: Mapped[str] = mapped_column(String(50))
    model_name: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str] = mapped_column(String(50))
    model_sha256: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(20))
    size: Mapped[int]
    inference_ms: Mapped[float] = mapped_column(Float(precision=53))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Score(Base):
    __tablename__ = "scores"
    __table_args__ = (
        # A redelivered message can never add a second row for one case and model version.
        UniqueConstraint("case_id", "model_name", "model_version", name="uq_scores_case_model"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str] = mapped_column(String(50))
    model_sha256: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float(precision=53))
    label: Mapped[str] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    #: The forward pass that produced this score (empty only for scores written before batches).
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id", ondelete="SET NULL"))
    #: Row of this case in that forward pass.
    position: Mapped[int | None]
    #: From the case's last enqueue to the start of its forward pass.
    queue_wait_ms: Mapped[float | None] = mapped_column(Float(precision=53))
    #: Top feature attributions (models/cases/explain.py), or empty where none were computed.
    explanation: Mapped[dict[str, Any] | None]
    #: Written by a candidate version shadowing the released one: kept for drift, never the result.
    shadow: Mapped[bool] = mapped_column(default=False, server_default=false())

    case: Mapped[Case] = relationship(back_populates="scores")
    batch: Mapped[Batch | None] = relationship()


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class Explanation(Base):
    """The explain stage's ledger: one row per released score that attributions were asked for.

    The score commits first (its case is ``done``); the explain stage computes the attributions
    later, batched, on its own low-priority queue, and writes them into ``Score.explanation``.
    ``status`` is ``queued`` (a message was sent at ``enqueued_at``; None: not yet sent),
    ``running`` (a worker holds the lease), ``done`` or ``failed`` (``error`` says why). The API
    shows queued and running as ``pending``. The sweeper re-sends stranded rows as it does cases.
    A ``queued`` row with an ``error`` was given back because its model could not be loaded for
    now (db/explanations.py ``defer_explanations``); the API shows that error only once failed.
    """

    __tablename__ = "explanations"
    __table_args__ = (Index("ix_explanations_status_enqueued_at", "status", "enqueued_at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    #: A case has one released score, so one explanation: the explain messages carry case ids.
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), unique=True)
    score_id: Mapped[int] = mapped_column(ForeignKey("scores.id", ondelete="CASCADE"))
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=10), default=JobStatus.queued
    )
    #: How many times an explain message for it reached a worker (a poison case ends ``failed``).
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)
    enqueued_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class TiledJob:
    """The columns every tiled job kind shares (worker/tiled.py): who asked, the status, the spec,
    and the tile count; a kind's own table adds what it reports (sizes, where its outputs go)."""

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"))
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=10), default=JobStatus.queued
    )
    #: The inputs and options, as the kind's submission checked them.
    spec: Mapped[dict[str, Any]]
    tiles_total: Mapped[int]
    tiles_done: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]


class GenomeJob(TiledJob, Base):
    """A genome comparison: one cohort (or query samples against it), one metric, tiled.

    ``spec``: where the genotypes are (PLINK prefixes) and the options (threshold, ibs_missing).
    """

    __tablename__ = "genome_jobs"
    __table_args__ = (Index("ix_genome_jobs_tenant", "tenant_id", "id"),)

    metric: Mapped[str] = mapped_column(String(10))
    n_samples: Mapped[int]
    #: Rows of the result: the query samples, or every sample for an all-pairs job.
    n_rows: Mapped[int]
    n_variants: Mapped[int]
    #: The artifact store's folder of this job; outputs are ``{output_prefix}.rel`` and so on.
    output_prefix: Mapped[str] = mapped_column(String(500))


class JobTile(Base):
    """One tile of a tiled job of any kind: rows ``row_start:row_end`` of its result (and, for a
    2-D tile, the columns ``col_start:col_end``); one Celery task, counted on its job once.

    ``(kind, job_id)`` names the job in the kind's own table (worker/tiled.py), so there is no
    foreign key; a job's tiles are written with it and never deleted apart from it.
    """

    __tablename__ = "job_tiles"
    __table_args__ = (
        UniqueConstraint("kind", "job_id", "index", name="uq_job_tiles_kind_job_index"),
        Index("ix_job_tiles_status_lease_expires_at", "status", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    #: The job kind: ``genome``, ``chem``, ... (the key of worker/tiled.py's ``KINDS``).
    kind: Mapped[str] = mapped_column(String(20))
    job_id: Mapped[int] = mapped_column(Id)
    index: Mapped[int]
    row_start: Mapped[int]
    row_end: Mapped[int]
    #: 2-D tiles: the tile's column block (None: the rows against every column).
    col_start: Mapped[int | None]
    col_end: Mapped[int | None]
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=10), default=JobStatus.queued
    )
    attempts: Mapped[int] = mapped_column(default=0)
    #: The worker process computing the tile and until when (see ``Case.lease_owner``).
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class RelatedPair(Base):
    """A pair of samples above a job's kinship threshold, with the inferred degree."""

    __tablename__ = "genome_pairs"
    __table_args__ = (
        UniqueConstraint("job_id", "row", "col", name="uq_genome_pairs_job_row_col"),
        Index("ix_genome_pairs_job_kinship", "job_id", "kinship"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("genome_jobs.id", ondelete="CASCADE"))
    #: Indices into the job's row samples and its cohort samples.
    row: Mapped[int]
    col: Mapped[int]
    fid1: Mapped[str] = mapped_column(String(100))
    iid1: Mapped[str] = mapped_column(String(100))
    fid2: Mapped[str] = mapped_column(String(100))
    iid2: Mapped[str] = mapped_column(String(100))
    #: NULL for a NaN kinship (no heterozygous call where both samples are called), which a
    #: pairs-only job keeps as plink2's --king-table-filter keeps it.
    kinship: Mapped[float | None] = mapped_column(Float(precision=53))
    degree: Mapped[str] = mapped_column(String(30))
    #: plink2's .kin0 counts (pairs-only jobs): variants called in both, both heterozygous,
    #: opposite homozygotes.
    nsnp: Mapped[int | None]
    hethet: Mapped[int | None]
    ibs0: Mapped[int | None]


class IdempotencyKey(Base):
    """A POST made with an ``Idempotency-Key`` header, and the response it got.

    IETF httpapi draft "The Idempotency-Key HTTP Header Field": the same key with the same request
    gets the first response again; with another request, 422; while the first is running, 409.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("client_sha256", "key", name="uq_idempotency_keys_client_key"),
        Index("ix_idempotency_keys_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    #: Keys are scoped per API client: the sha256 of the API key the request came with.
    client_sha256: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    #: sha256 of the method, path, query and body of the first request.
    fingerprint: Mapped[str] = mapped_column(String(64))
    #: None while the first request is being processed.
    response_status: Mapped[int | None]
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary)
    response_content_type: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


#: What an API client may do. A tenant's own key (made with the tenant) holds every scope.
SCOPES = ("cases:submit", "results:read", "genome:submit", "compounds:submit", "admin")


class ApiClient(Base):
    """A system that calls the API for a tenant (an integration engine, a nightly job), with the
    scopes it holds. Its keys are :class:`ApiKey` rows."""

    __tablename__ = "api_clients"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    #: The sha256 of the key made with this row. Authentication reads :class:`ApiKey` (which
    #: holds this key too, and any later ones); the column stays because SQLite cannot drop a
    #: UNIQUE column without rebuilding a table that others reference (migration 0011).
    api_key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Set by ``medbatch db revoke-client``: every key of the client stops working at once.
    revoked_at: Mapped[datetime | None]


class ApiKey(Base):
    """An API key of a tenant (``client_id`` None: the tenant's own key, every scope) or of one of
    its clients. Only its sha256 is stored; the key itself is shown once.

    Rotation adds a key and gives the holder's older keys an ``expires_at`` at the end of the
    overlap window, so callers can switch over without a gap."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_tenant_client", "tenant_id", "client_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    client_id: Mapped[int | None] = mapped_column(ForeignKey("api_clients.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: None: never (keys made before expiry existed; or a lifetime of 0 days, on purpose).
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    #: When a request last authenticated with it (to the minute: touched at most once a minute).
    last_used_at: Mapped[datetime | None]


class AuditEvent(Base):
    """One API request, allowed or denied: who, what, which record, when, with what outcome.

    Never a patient identifier or a feature value: records are named by internal ids.
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_tenant_at", "tenant_id", "at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="SET NULL"))
    #: None for a tenant's own key, or for a request without a valid key.
    client_id: Mapped[int | None] = mapped_column(ForeignKey("api_clients.id", ondelete="SET NULL"))
    #: e.g. ``POST /v1/cases``, ``GET /v1/cases/{case_id}``.
    action: Mapped[str] = mapped_column(String(100))
    #: The record asked for, by internal id (``case_id=12``), or empty; a FHIR search's every
    #: ``subject`` (text: an identifier search may answer for many patients).
    resource: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[int]
    #: ``ok``, ``denied`` (401/403), ``not_found``, ``invalid`` (other 4xx) or ``error`` (5xx).
    outcome: Mapped[str] = mapped_column(String(20))


class CompoundJob(TiledJob, Base):
    """A compound-similarity search: queries against a library (or a set against itself), by
    top-k neighbours or a similarity threshold, in tiles of query rows.

    ``spec``: query, library, fingerprint kind/radius/size, metric, k or threshold, all_pairs;
    and the records RDKit could not read (reported, skipped).
    """

    __tablename__ = "compound_jobs"
    __table_args__ = (Index("ix_compound_jobs_tenant", "tenant_id", "id"),)

    n_query: Mapped[int]
    n_library: Mapped[int]
    #: The artifact store's folder of this job.
    output_dir: Mapped[str] = mapped_column(String(500))


class Neighbour(Base):
    """One (query, library) pair a compound job found, with its similarity and rank."""

    __tablename__ = "compound_neighbours"
    __table_args__ = (
        UniqueConstraint("job_id", "query_index", "library_index", name="uq_neighbours_pair"),
        Index("ix_compound_neighbours_job_query", "job_id", "query_index", "rank"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("compound_jobs.id", ondelete="CASCADE"))
    query_index: Mapped[int]
    library_index: Mapped[int]
    query_id: Mapped[str] = mapped_column(String(200))
    library_id: Mapped[str] = mapped_column(String(200))
    similarity: Mapped[float] = mapped_column(Float(precision=53))
    #: 1 = most similar for its query (ties: lower library index first).
    rank: Mapped[int]


class PatientIdentifier(Base):
    """A FHIR Patient.identifier of a case's subject, so that ``subject:identifier`` searches
    find the patient. The value is kept only as its sha256 (a medical record number need not be
    readable here to be matched); the system is a URI, not patient data."""

    __tablename__ = "patient_identifiers"
    __table_args__ = (
        UniqueConstraint(
            "tenant_id", "subject", "system", "value_sha256", name="uq_patient_identifiers"
        ),
        Index("ix_patient_identifiers_lookup", "tenant_id", "value_sha256"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"))
    #: ``Patient/<id>``, as in ``cases.subject``.
    subject: Mapped[str] = mapped_column(String(200))
    #: ``Identifier.system`` ("" when the feed sent none).
    system: Mapped[str] = mapped_column(String(300))
    value_sha256: Mapped[str] = mapped_column(String(64))
