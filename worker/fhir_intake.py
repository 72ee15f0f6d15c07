"""FHIR patients → queued cases, shared by ``POST /v1/fhir`` and ``medbatch nightly``.

A case's external id is ``{subject}|{model}@{version}|{hash of its features}``: the same patient
data for the same model is the same case (resubmitting it, or re-running an interrupted night,
creates nothing), while new data for the patient is a new case.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import CaseStatus, Priority
from models.cases.registry import ModelSpec
from models.fhir.features import (
    FeatureResult,
    PatientRecord,
    deceased_by,
    features_of,
    iter_ndjson,
    ndjson_files,
    unread_files,
)
from worker.progress import progress_bar
from worker.queues import enqueue_cases

log = logging.getLogger(__name__)


def assigned_id(record: PatientRecord) -> str:
    """The id the server gives a Patient sent without one: from its identifiers when it has
    some (the same patient sent again gets the same id, so its case is found again), else from
    the entry's fullUrl. 'mb-' and 32 hex digits: a valid FHIR id."""
    basis = sorted(record.identifiers) if record.identifiers else [("fullUrl", record.reference)]
    return "mb-" + hashlib.sha256(json.dumps(basis).encode()).hexdigest()[:32]


#: A Patient entry's absolute fullUrl (R4 Bundle: ``[base]/Patient/<id>``) names its id.
_FULL_URL_ID = re.compile(r"^https?://.*/Patient/([A-Za-z0-9\-.]{1,64})(/_history/[^/]+)?$")


def sent_id(record: PatientRecord) -> str | None:
    """The Patient's logical id as sent: its ``id``, else the one its absolute fullUrl names."""
    patient_id = getattr(record.patient, "id", None)
    if patient_id:
        return str(patient_id)
    match = _FULL_URL_ID.match(record.reference)
    return match[1] if match else None


def subject_of(record: PatientRecord) -> str:
    """``Patient/<id>``: the logical id sent, else the one :func:`assigned_id` gives."""
    return f"Patient/{sent_id(record) or assigned_id(record)}"


@dataclass
class Intake:
    """What became of one patient: a case, or the problems that refused it; and how its
    features were read (``found``: basis, imputations, ignored values, flags)."""

    subject: str
    case: repo.NewCase | None
    problems: dict[str, str]
    found: FeatureResult | None = None
    #: True when the Patient came without an id and :func:`assigned_id` gave it one.
    assigned: bool = False


def case_from_record(
    spec: ModelSpec,
    record: PatientRecord,
    *,
    as_of: datetime,
    lookback_days: int,
    priority: Priority = Priority.routine,
) -> Intake:
    """The patient's case, or why it cannot be one.

    A patient who died before ``as_of`` is not scored: a risk of death means nothing for them.
    The case's ``context`` keeps how each feature was read (no values: those are ``features``).
    """
    subject = subject_of(record)
    assigned = sent_id(record) is None
    if deceased_by(record.patient, as_of):
        return Intake(subject, None, {"patient": "deceased before as_of"}, assigned=assigned)
    found = features_of(spec, record, as_of=as_of, lookback_days=lookback_days)
    if not found.ok:
        return Intake(subject, None, found.problems, found, assigned)
    digest = hashlib.sha256(json.dumps(found.features, sort_keys=True).encode()).hexdigest()
    context = {
        "source": "fhir",
        "as_of": as_of.isoformat(),
        "lookback_days": lookback_days,
        "patient": record.reference,
        **found.report(),
    }
    if assigned:
        context["assigned_id"] = True
    case = repo.NewCase(
        f"{subject}|{spec.ref}|{digest[:16]}",
        spec.name,
        spec.version,
        priority,
        found.features,
        subject=subject,
        context=context,
    )
    return Intake(subject, case, {}, found, assigned)


@dataclass
class NightlySummary:
    patients: int = 0
    accepted: int = 0
    already_there: int = 0
    #: Patients refused (a patient with two problems counts once here, twice by reason).
    rejected_patients: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    #: Imputed values by feature, and ignored sent values by feature and reason.
    imputed: Counter[str] = field(default_factory=Counter)
    ignored: Counter[str] = field(default_factory=Counter)
    bad_lines: int = 0
    #: Files of the folder that look like export output but are not read (unread_files).
    files_not_read: list[str] = field(default_factory=list)
    #: The first few unreadable lines, as ``Observation.ndjson:12: error structure: …``: where
    #: and why, never a value (issues quote none). A bare count told a newcomer nothing to fix.
    bad_line_examples: list[str] = field(default_factory=list)
    case_ids: list[int] = field(default_factory=list)
    scored: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "patients_read": self.patients,
            "accepted": self.accepted,
            "already_there": self.already_there,
            "rejected": self.rejected_patients,
            "rejected_by_reason": dict(self.rejected),
            "imputed_by_feature": dict(self.imputed),
            "ignored_by_reason": dict(self.ignored),
            "bad_lines": self.bad_lines,
            "files_not_read": self.files_not_read,
            "bad_line_examples": list(self.bad_line_examples),
            "scored": self.scored,
            "failed": self.failed,
        }


#: Unreadable lines a nightly summary names (the count covers them all).
BAD_LINE_EXAMPLES = 5


def run_nightly(
    directory: Path,
    spec: ModelSpec,
    *,
    sessions: sessionmaker[Session],
    app: Celery | None,
    tenant_id: int,
    as_of: datetime,
    lookback_days: int,
    chunk: int = 500,
    per_message: int = 64,
    progress: bool = False,
) -> NightlySummary:
    """Stream a Bulk Data export into ``score.bulk`` in chunks; safe to run again after an
    interruption (what is there already is neither added nor sent again)."""
    summary = NightlySummary(files_not_read=unread_files(Path(directory)))
    export = iter_ndjson(directory, spec, as_of=as_of, lookback_days=lookback_days)
    pending: list[repo.NewCase] = []
    identifiers: list[tuple[str, list[tuple[str, str]]]] = []

    def flush() -> None:
        if not pending:
            return
        with session_scope(sessions) as session:
            added = repo.add_cases(session, tenant_id=tenant_id, cases=pending)
            for subject, pairs in identifiers:
                repo.add_patient_identifiers(
                    session, tenant_id=tenant_id, subject=subject, identifiers=pairs
                )
        new = [a.id for a in added if a.created]
        summary.accepted += len(new)
        summary.already_there += len(added) - len(new)
        summary.case_ids += [a.id for a in added]
        if app is not None and new:
            enqueue_cases(app, [(i, Priority.bulk) for i in new], per_message=per_message)
        pending.clear()
        identifiers.clear()

    with progress_bar(progress, _count_patients(directory), "patients") as advance:
        for record in export:
            summary.patients += 1
            intake = case_from_record(
                spec, record, as_of=as_of, lookback_days=lookback_days, priority=Priority.bulk
            )
            if intake.found is not None:
                summary.imputed.update(i["feature"] for i in intake.found.imputations)
                summary.ignored.update(
                    f"{i['feature']}: {i['reason']}" for i in intake.found.ignored
                )
            if intake.case is None:
                summary.rejected_patients += 1
                for name, why in intake.problems.items():
                    summary.rejected[f"{name}: {_without_reference(why)}"] += 1
            else:
                pending.append(intake.case)
                if record.identifiers:
                    identifiers.append((intake.subject, record.identifiers))
                if len(pending) >= chunk:
                    flush()
            advance(1)
        flush()
    if summary.files_not_read:
        log.warning(
            "nightly %s: files not read (their names give no resource type, or compressed): %s",
            spec.ref,
            ", ".join(summary.files_not_read),
        )
    # Lines, not issues: one line with three unknown elements is one unreadable line.
    first_issue = {(i.file, i.line): i for i in reversed(export.issues)}
    summary.bad_lines = len(first_issue)
    summary.bad_line_examples = [
        str(i) for i in export.issues if first_issue[(i.file, i.line)] is i
    ][:BAD_LINE_EXAMPLES]
    log.info(
        "nightly %s: %d patients, %d new cases, %d already there, %d rejected",
        spec.ref,
        summary.patients,
        summary.accepted,
        summary.already_there,
        summary.rejected_patients,
    )
    return summary


def _without_reference(why: str) -> str:
    """A reason without the resource it names, so that equal reasons count together."""
    head, sep, rest = why.partition(": ")
    return rest if sep and "/" in head and " " not in head else why


def settle_counts(sessions: sessionmaker[Session], summary: NightlySummary) -> bool:
    """Fill in scored/failed for the run's cases; True once none is still waiting."""
    ids = summary.case_ids
    if not ids:
        return True
    with sessions() as session:
        counts = repo.count_statuses(session, case_ids=ids)
    summary.scored = counts.get(CaseStatus.done, 0)
    summary.failed = counts.get(CaseStatus.failed, 0)
    return summary.scored + summary.failed == len(ids)


def has_patients(directory: Path) -> bool:
    """Whether ``directory`` is an export: it has Patient.ndjson, or its parts Patient.000.ndjson …"""
    return directory.is_dir() and any(p.is_file() for p in ndjson_files(directory, "Patient"))


def _count_patients(directory: Path) -> int | None:
    paths = [p for p in ndjson_files(Path(directory), "Patient") if p.is_file()]
    if not paths:
        return None
    total = 0
    for path in paths:
        with path.open("rb") as fh:
            total += sum(1 for line in fh if line.strip())
    return total
