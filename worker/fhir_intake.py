"""FHIR patients → queued cases, shared by ``POST /v1/fhir`` and ``medbatch nightly``.

A case's external id is ``{subject}|{model}@{version}|{hash of its features}``: the same patient
data for the same model is the same case (resubmitting it, or re-running an interrupted night,
creates nothing), while new data for the patient is a new case.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import session_scope
from db.tables import Case, CaseStatus, Priority
from models.fhir_features import PatientRecord, features_for, iter_ndjson
from models.registry import ModelSpec
from worker.progress import progress_bar
from worker.queues import enqueue_cases

log = logging.getLogger(__name__)


def subject_of(record: PatientRecord) -> str:
    patient_id = getattr(record.patient, "id", None)
    return f"Patient/{patient_id}" if patient_id else record.reference


def case_from_record(
    spec: ModelSpec,
    record: PatientRecord,
    *,
    as_of: datetime,
    lookback_days: int,
    priority: Priority = Priority.routine,
) -> tuple[str, repo.NewCase | None, dict[str, str]]:
    """``(subject, the case, {})``, or ``(subject, None, {feature: why})`` when it cannot be.

    A patient who died before ``as_of`` is not scored: a risk of death means nothing for them.
    """
    subject = subject_of(record)
    if _deceased_by(record.patient, as_of):
        return subject, None, {"patient": "deceased before as_of"}
    found = features_for(
        spec,
        record.patient,
        record.observations,
        record.conditions,
        as_of=as_of,
        lookback_days=lookback_days,
    )
    if not found.ok:
        return subject, None, found.problems
    digest = hashlib.sha256(json.dumps(found.features, sort_keys=True).encode()).hexdigest()
    context = {
        "source": "fhir",
        "as_of": as_of.isoformat(),
        "lookback_days": lookback_days,
        "basis": found.basis,
        "imputed": found.imputed,
    }
    case = repo.NewCase(
        f"{subject}|{spec.ref}|{digest[:16]}",
        spec.name,
        spec.version,
        priority,
        found.features,
        subject=subject,
        context=context,
    )
    return subject, case, {}


def _deceased_by(patient: Any, as_of: datetime) -> bool:
    if getattr(patient, "deceasedBoolean", None) is True:
        return True
    died = getattr(patient, "deceasedDateTime", None)
    if died is None:
        return False
    when = died if isinstance(died, datetime) else datetime.fromisoformat(str(died))
    if when.tzinfo is None:
        when = when.replace(tzinfo=as_of.tzinfo)
    return bool(when <= as_of)


@dataclass
class NightlySummary:
    patients: int = 0
    accepted: int = 0
    already_there: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    bad_lines: int = 0
    case_ids: list[int] = field(default_factory=list)
    scored: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "patients_read": self.patients,
            "accepted": self.accepted,
            "already_there": self.already_there,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(self.rejected),
            "bad_lines": self.bad_lines,
            "scored": self.scored,
            "failed": self.failed,
        }


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
    summary = NightlySummary()
    export = iter_ndjson(directory, spec, as_of=as_of, lookback_days=lookback_days)
    pending: list[repo.NewCase] = []

    def flush() -> None:
        if not pending:
            return
        with session_scope(sessions) as session:
            added = repo.add_cases(session, tenant_id=tenant_id, cases=pending)
        new = [a.id for a in added if a.created]
        summary.accepted += len(new)
        summary.already_there += len(added) - len(new)
        summary.case_ids += [a.id for a in added]
        if app is not None and new:
            enqueue_cases(app, [(i, Priority.bulk) for i in new], per_message=per_message)
        pending.clear()

    with progress_bar(progress, _count_patients(directory), "patients") as advance:
        for record in export:
            summary.patients += 1
            _, case, problems = case_from_record(
                spec, record, as_of=as_of, lookback_days=lookback_days, priority=Priority.bulk
            )
            if case is None:
                for name, why in problems.items():
                    summary.rejected[f"{name}: {why}"] += 1
            else:
                pending.append(case)
                if len(pending) >= chunk:
                    flush()
            advance(1)
        flush()
    summary.bad_lines = len(export.issues)
    log.info(
        "nightly %s: %d patients, %d new cases, %d already there, %d rejected",
        spec.ref,
        summary.patients,
        summary.accepted,
        summary.already_there,
        sum(summary.rejected.values()),
    )
    return summary


def settle_counts(sessions: sessionmaker[Session], summary: NightlySummary) -> bool:
    """Fill in scored/failed for the run's cases; True once none is still waiting."""
    ids = summary.case_ids
    if not ids:
        return True
    with sessions() as session:
        rows = session.execute(
            select(Case.status, func.count()).where(Case.id.in_(ids)).group_by(Case.status)
        )
        counts = {case_status: n for case_status, n in rows}
    summary.scored = counts.get(CaseStatus.done, 0)
    summary.failed = counts.get(CaseStatus.failed, 0)
    return summary.scored + summary.failed == len(ids)


def _count_patients(directory: Path) -> int | None:
    path = Path(directory) / "Patient.ndjson"
    if not path.is_file():
        return None
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())
