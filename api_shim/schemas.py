"""Request and response bodies of the HTTP shim."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from db.tables import CaseStatus, Priority


class CaseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    external_id: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)
    ]
    model: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=160)
    ] = Field(description="`name` (its default version) or `name@version`")
    priority: Priority = Priority.routine
    #: Checked against the model's input schema (numbers, series or codes), feature by feature.
    features: dict[str, Any]


class CaseAccepted(BaseModel):
    id: int
    external_id: str
    model: str
    status: CaseStatus
    created: bool = Field(description="false when this exact case had been submitted before")


class CasesAccepted(BaseModel):
    count: int
    enqueued: bool = Field(
        description="false if the broker was unreachable; the cases are stored and the "
        "sweeper enqueues them when it is back"
    )
    cases: list[CaseAccepted]


class ScorePublic(BaseModel):
    model: str
    model_version: str
    model_sha256: str
    score: float
    label: str
    created_at: datetime
    explanation: dict[str, Any] | None = Field(
        default=None,
        description="top feature attributions (integrated gradients on the log-odds)",
    )


class CasePublic(BaseModel):
    id: int
    external_id: str
    model: str
    model_version: str
    priority: Priority
    status: CaseStatus
    delivery_count: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    scores: list[ScorePublic]
    fhir: dict[str, Any] | None = Field(
        default=None,
        description="for a case built from FHIR: how its features were read — the resources "
        "used (basis), each imputed value and why, each sent value ignored and why, values "
        "outside a flag range, and the as_of and look-back",
    )


class ResultPublic(BaseModel):
    case_id: int
    external_id: str
    model: str
    model_version: str
    status: CaseStatus
    score: float | None
    label: str | None
    model_sha256: str | None
    last_error: str | None
    updated_at: datetime


class ResultsPublic(BaseModel):
    items: list[ResultPublic]
    next_cursor: str | None
