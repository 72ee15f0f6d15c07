"""Request and response bodies of the HTTP shim."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StringConstraints, WrapValidator

from api_shim.deps import MODEL_REF, TEXT, TRIMMED_TEXT
from api_shim.errors import keys_hidden
from db.tables import CaseStatus, Priority


def _names_by_pattern(schema: dict[str, Any]) -> None:
    """Pydantic writes a key pattern as patternProperties, which lets other keys through; the
    rule is on every name (propertyNames)."""
    patterns = schema.pop("patternProperties", None)
    if patterns:
        schema.setdefault("propertyNames", {})["pattern"] = next(iter(patterns))


#: Most features one case may carry (the largest input schema has a few dozen).
MAX_FEATURES = 1024


class CaseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    external_id: Annotated[
        str, StringConstraints(min_length=1, max_length=200, pattern=TRIMMED_TEXT)
    ] = Field(description="the sender's id of the case; no control characters or edge spaces")
    model: Annotated[str, StringConstraints(min_length=1, max_length=160, pattern=MODEL_REF)] = (
        Field(description="`name` (its default version) or `name@version`")
    )
    priority: Priority = Priority.routine
    #: Checked against the model's input schema (numbers, series or codes), feature by feature.
    features: Annotated[
        dict[Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=TEXT)], Any],
        WrapValidator(keys_hidden),
    ] = Field(
        max_length=MAX_FEATURES,
        description="feature name to value, as GET /v1/models lists",
        json_schema_extra=_names_by_pattern,
    )


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


#: Attributions come after the score: ``pending`` until the explain stage stored them.
ExplanationStatus = Literal["pending", "done", "failed"]
_EXPLANATION_STATUS = (
    "the score's attributions: pending (the score is final; they follow), done (in "
    "scores[].explanation), failed (see explanation_error); absent when none were asked for"
)


class ScorePublic(BaseModel):
    #: Read from a score row's ``model_name``.
    model: str = Field(validation_alias=AliasChoices("model", "model_name"))
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
    detail: str | None = Field(
        default=None,
        description="while queued, or while its explanation is pending: why it may wait, e.g. "
        "that no live worker listens on its queue (or on the explain queue)",
    )
    explanation_status: ExplanationStatus | None = Field(
        default=None, description=_EXPLANATION_STATUS
    )
    explanation_error: str | None = Field(
        default=None, description="why the explanation failed (the score stands)"
    )
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
    explanation_status: ExplanationStatus | None = Field(
        default=None, description=_EXPLANATION_STATUS
    )
    explanation: dict[str, Any] | None = Field(
        default=None, description="top feature attributions, once explanation_status is done"
    )
    explanation_error: str | None = Field(
        default=None, description="why the explanation failed (the score stands)"
    )


class ResultsPublic(BaseModel):
    items: list[ResultPublic]
    next_cursor: str | None
    next_since: datetime = Field(
        description="`since` of the next poll, once the last page is read (and `until` of the "
        "next page): every change stamped before it is committed and was listed by this poll "
        "or an earlier one; changes stamped at or after it may be listed again"
    )
