"""FHIR R4 resources → one model's input features, with the resources each value came from.

Two readers and one rule book:

- :func:`parse_bundle` reads a Bundle (transaction, batch, collection or searchset) and groups its
  Patients, Observations and Conditions by patient. A Bundle with structural problems is refused
  whole with a :class:`FhirInputError` that lists every problem found, as OperationOutcome issues.
- :func:`iter_ndjson` streams a Bulk Data export folder (``Patient.ndjson``, ``Observation.ndjson``,
  ``Condition.ndjson``, or ``<Type>.000.ndjson`` parts). Patients are indexed first; Observation
  and Condition lines are then read one at a time and only the resource that wins each feature is
  kept, so memory grows with patients times features, not with the size of the export. A bad line is
  reported with its file and line number and skipped; the rest is still read.
- :func:`features_for` applies a model's registry rules (``source``, ``unit``, ``missing``,
  ``allowed``, ``range``) at one instant ``as_of``: the latest Observation value in the look-back
  window (the value itself or the matching ``component`` of a panel, converted to the schema's UCUM
  unit), age in completed years from ``birthDate``, a coded element through the schema's ``map``,
  a Condition's presence (1/0) at ``as_of``; then imputation or rejection of what is missing.

Resources are parsed with ``fhir.resources.R4B``: fhir.resources 7+ puts FHIR R5 at the top level,
and R5 refuses R4 data (Synthea's ``Encounter.class`` is a Coding in R4, a list in R5), while R4B is
wire-compatible with R4 for the resources read here. Only Patient, Observation and Condition are
validated; other entries (Encounter, Claim, ...) are counted and left alone.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, cast

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

from models.featurize import rule_problem
from models.registry import FeatureSpec, ModelSpec

Severity = Literal["fatal", "error", "warning", "information"]
#: FHIR IssueType codes used here (https://hl7.org/fhir/R4/valueset-issue-type.html).
IssueType = Literal[
    "structure",
    "invalid",
    "required",
    "value",
    "code-invalid",
    "not-found",
    "not-supported",
    "duplicate",
    "business-rule",
]
BundleType = Literal["transaction", "batch", "collection", "searchset"]
BUNDLE_TYPES: tuple[str, ...] = ("transaction", "batch", "collection", "searchset")

#: Resource types whose content can feed a feature; every other entry is counted, not validated.
USED_TYPES = ("Patient", "Observation", "Condition")
#: Observation statuses whose value counts (registered, cancelled, entered-in-error, unknown don't).
USABLE_OBSERVATION_STATUS = frozenset({"final", "amended", "corrected", "preliminary"})
#: Condition.clinicalStatus codes meaning "not present now" (when no abatement date says when).
INACTIVE_CLINICAL_STATUS = frozenset({"inactive", "remission", "resolved"})
#: Condition.verificationStatus codes meaning "never was".
VOID_VERIFICATION_STATUS = frozenset({"refuted", "entered-in-error"})

UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"


# --- issues -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issue:
    """One problem with the input, shaped like an OperationOutcome ``issue``.

    ``expression`` is a FHIRPath-like location (``Bundle.entry[3].resource.valueQuantity.value``,
    or ``Observation.subject`` for an NDJSON line); ``file`` and ``line`` (1-based) locate an
    NDJSON line. Diagnostics never quote input values: they may be patient data.
    """

    severity: Severity
    code: IssueType
    diagnostics: str
    expression: str = ""
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: " if self.file is not None else ""
        at = f" (at {self.expression})" if self.expression else ""
        return f"{where}{self.severity} {self.code}: {self.diagnostics}{at}"

    def to_fhir(self) -> dict[str, Any]:
        """This issue as an ``OperationOutcome.issue`` element."""
        out: dict[str, Any] = {"severity": self.severity, "code": self.code}
        where = f"{self.file}:{self.line}: " if self.file is not None else ""
        out["diagnostics"] = where + self.diagnostics
        if self.expression:
            out["expression"] = [self.expression]
        return out


class FhirInputError(ValueError):
    """Input that cannot be read as FHIR; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        self.issues = list(issues)
        first = str(self.issues[0]) if self.issues else "invalid FHIR input"
        more = f" (and {len(self.issues) - 1} more)" if len(self.issues) > 1 else ""
        super().__init__(first + more)

    def to_operation_outcome(self) -> dict[str, Any]:
        return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in self.issues]}


def _validation_issues(
    error: ValidationError, *, prefix: str, file: str | None = None, line: int | None = None
) -> list[Issue]:
    """pydantic's errors as FHIR issues: a location path and a message, no pydantic URLs/inputs."""
    issues = []
    for err in error.errors(include_url=False, include_input=False, include_context=False):
        kind = str(err["type"])
        if "missing" in kind:
            code: IssueType = "required"
        elif kind == "extra_forbidden" or kind.endswith("_type"):
            code = "structure"
        else:
            code = "value"
        message = re.sub(r"^(Value|Assertion) error, ", "", str(err["msg"]))
        issues.append(
            Issue("error", code, message, _fhirpath(prefix, err["loc"]), file=file, line=line)
        )
    return issues


def _fhirpath(prefix: str, loc: Iterable[int | str]) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _known_type(rtype: str) -> bool:
    try:
        get_fhir_model_class(rtype)
    except (ValueError, KeyError):
        return False
    return True


def _validate(
    raw: dict[str, Any], *, prefix: str, file: str | None = None, line: int | None = None
) -> tuple[Resource | None, list[Issue]]:
    rtype = raw.get("resourceType")
    try:
        model = get_fhir_model_class(str(rtype))
    except (ValueError, KeyError):
        message = "resourceType is not a FHIR R4 resource type"
        return None, [
            Issue("error", "not-supported", message, f"{prefix}.resourceType", file, line)
        ]
    try:
        return cast(Resource, model.model_validate(raw)), []
    except ValidationError as exc:
        return None, _validation_issues(exc, prefix=prefix, file=file, line=line)


# --- records ----------------------------------------------------------------------------------


@dataclass
class PatientRecord:
    """One patient's resources: what :func:`features_for` reads."""

    #: How the patient is cited: ``Patient/<id>``, else the entry's ``fullUrl``.
    reference: str
    patient: Patient
    observations: list[Observation] = field(default_factory=list)
    conditions: list[Condition] = field(default_factory=list)


@dataclass
class ParsedBundle:
    """A Bundle's patients, each with the Observations and Conditions that reference it."""

    type: BundleType
    #: Keyed by :attr:`PatientRecord.reference`, in Bundle order.
    patients: dict[str, PatientRecord]
    #: Warnings only (errors raise :class:`FhirInputError`).
    issues: list[Issue] = field(default_factory=list)
    #: Entries of other resource types, not read: ``{resourceType: count}``.
    ignored: dict[str, int] = field(default_factory=dict)


def _reference_of(resource: Resource) -> str:
    return f"{resource.get_resource_type()}/{resource.id or '?'}"


def _subject(raw: dict[str, Any]) -> object:
    ref = raw.get("subject") or raw.get("patient")
    return ref.get("reference") if isinstance(ref, dict) else None


_ABSOLUTE_PATIENT = re.compile(r"^https?://.*/(Patient/[A-Za-z0-9\-.]{1,64})(/_history/.*)?$")


def parse_bundle(data: object) -> ParsedBundle:
    """Read a FHIR R4 Bundle (a ``json.loads`` result) into per-patient records.

    References to patients may be relative (``Patient/<id>``), absolute, or point at an entry's
    ``fullUrl`` (``urn:uuid:...`` in transaction Bundles). Raises :class:`FhirInputError` listing
    every problem when the Bundle is not one, is of another type, holds no Patient, has an entry
    failing validation, or has an Observation/Condition whose patient is not in the Bundle.
    """
    if not isinstance(data, dict):
        raise FhirInputError([Issue("fatal", "structure", "expected a JSON object (a Bundle)")])
    if data.get("resourceType") != "Bundle":
        raise FhirInputError(
            [Issue("fatal", "invalid", "expected resourceType 'Bundle'", "resourceType")]
        )
    issues: list[Issue] = []
    btype = data.get("type")
    if btype not in BUNDLE_TYPES:
        diag = f"Bundle.type must be one of {', '.join(BUNDLE_TYPES)}"
        issues.append(Issue("error", "required" if btype is None else "value", diag, "Bundle.type"))
    entries = data.get("entry")
    if not isinstance(entries, list) or not entries:
        code: IssueType = "required" if entries in (None, []) else "structure"
        issues.append(Issue("error", code, "Bundle.entry must be a non-empty list", "Bundle.entry"))
        raise FhirInputError(issues)

    ignored: Counter[str] = Counter()
    parsed: list[tuple[int, Resource, dict[str, Any]]] = []
    types_by_url: dict[str, str] = {}
    #: Every way a Patient entry can be referenced -> its key (valid entries or not, so that an
    #: Observation of a Patient that failed validation is not also reported as "not found").
    alias: dict[str, str] = {}
    patients: dict[str, PatientRecord] = {}
    for i, entry in enumerate(entries):
        where = f"Bundle.entry[{i}]"
        if not isinstance(entry, dict):
            issues.append(Issue("error", "structure", "an entry must be an object", where))
            continue
        full_url = entry.get("fullUrl")
        if full_url is not None and not isinstance(full_url, str):
            issues.append(
                Issue("error", "structure", "fullUrl must be a string", f"{where}.fullUrl")
            )
            full_url = None
        raw = entry.get("resource")
        if not isinstance(raw, dict) or not isinstance(raw.get("resourceType"), str):
            diag = "an entry must hold a resource with a resourceType"
            issues.append(Issue("error", "required", diag, f"{where}.resource"))
            continue
        rtype = raw["resourceType"]
        if full_url is not None:
            if full_url in types_by_url:
                diag = "fullUrl repeats an earlier entry's"
                issues.append(Issue("error", "duplicate", diag, f"{where}.fullUrl"))
            types_by_url[full_url] = rtype
        if rtype not in USED_TYPES:
            if _known_type(rtype):
                ignored[rtype] += 1
            else:  # a misspelt "Observaton" must not vanish into the ignored count
                diag = "resourceType is not a FHIR R4 resource type"
                issues.append(
                    Issue("error", "not-supported", diag, f"{where}.resource.resourceType")
                )
            continue
        resource, problems = _validate(raw, prefix=f"{where}.resource")
        issues += problems
        if rtype != "Patient":
            if resource is not None:
                parsed.append((i, resource, raw))
            continue
        rid = raw.get("id")
        if not isinstance(rid, str) and full_url is None:
            diag = "a Patient needs an id or a fullUrl to be referenced"
            issues.append(Issue("error", "required", diag, f"{where}.resource.id"))
            continue
        key = f"Patient/{rid}" if isinstance(rid, str) else str(full_url)
        if key in alias.values():
            issues.append(
                Issue("error", "duplicate", f"{key} appears twice", f"{where}.resource.id")
            )
            continue
        alias[key] = key
        if full_url is not None:
            alias[full_url] = key
            if match := _ABSOLUTE_PATIENT.match(full_url):
                alias.setdefault(match.group(1), key)
        if isinstance(resource, Patient):
            patients[key] = PatientRecord(reference=key, patient=resource)
    if not alias:
        issues.append(Issue("error", "required", "the Bundle holds no Patient", "Bundle.entry"))

    warnings: list[Issue] = []
    for i, resource, raw in parsed:
        where = f"Bundle.entry[{i}].resource.subject"
        ref = _subject(raw)
        if not isinstance(ref, str):
            diag = f"{resource.get_resource_type()} has no subject reference"
            issues.append(Issue("error", "required", diag, where))
            continue
        target_key = alias.get(ref)
        if target_key is None and (match := _ABSOLUTE_PATIENT.match(ref)):
            target_key = alias.get(match.group(1))
        if target_key is None:
            target = types_by_url.get(ref) or ref.split("/", 1)[0]
            if target == "Patient" or ref.startswith("urn:"):
                diag = "the referenced Patient is not in the Bundle"
                issues.append(Issue("error", "not-found", diag, where))
            else:
                diag = f"subject is a {target}, not a Patient: not read"
                warnings.append(Issue("warning", "business-rule", diag, where))
            continue
        record = patients.get(target_key)
        if record is None:  # the Patient itself failed validation, reported above
            continue
        if isinstance(resource, Observation):
            record.observations.append(resource)
        elif isinstance(resource, Condition):
            record.conditions.append(resource)

    if issues:
        raise FhirInputError(issues)
    return ParsedBundle(
        type=cast(BundleType, btype),
        patients=patients,
        issues=warnings,
        ignored=dict(ignored),
    )


# --- units ------------------------------------------------------------------------------------

#: Spellings seen in EHR feeds for one UCUM unit → the UCUM code. Covers blood pressure
#: (``mmHg``), rates (``{beats}/min``, ``beats/minute``, ``bpm``), BMI (``kg/m^2``), temperature
#: (``°C``, ``°F``), glucose/creatinine concentrations (case and micro-sign variants) and years.
#: Plain ``C`` is left out on purpose: in UCUM it is the coulomb.
UNIT_ALIASES: dict[str, str] = {
    "mmHg": "mm[Hg]",
    "mm Hg": "mm[Hg]",
    "{beats}/min": "/min",
    "{beat}/min": "/min",
    "beats/min": "/min",
    "beats/minute": "/min",
    "bpm": "/min",
    "1/min": "/min",
    "kg/m^2": "kg/m2",
    "kg/m²": "kg/m2",
    "°C": "Cel",
    "degC": "Cel",
    "°F": "[degF]",
    "degF": "[degF]",
    "mg/dl": "mg/dL",
    "mmol/l": "mmol/L",
    "µmol/L": "umol/L",
    "μmol/L": "umol/L",
    "umol/l": "umol/L",
    "yr": "a",
    "years": "a",
}

#: Unit changes that hold for any quantity: ``to = from * scale + offset``.
LINEAR_CONVERSIONS: dict[tuple[str, str], tuple[float, float]] = {
    ("[degF]", "Cel"): (5 / 9, -32 * 5 / 9),
    ("Cel", "[degF]"): (9 / 5, 32.0),
}

#: Molar ↔ mass concentration depends on the analyte: ``to = from * factor``. Glucose: 1 mmol/L
#: = 18.016 mg/dL (molar mass 180.16 g/mol); creatinine: 1 mg/dL = 88.42 µmol/L (113.12 g/mol).
ANALYTE_CONVERSIONS: dict[str, dict[tuple[str, str], float]] = {
    "glucose": {("mmol/L", "mg/dL"): 18.016, ("mg/dL", "mmol/L"): 1 / 18.016},
    "creatinine": {("mg/dL", "umol/L"): 88.42, ("umol/L", "mg/dL"): 1 / 88.42},
}

#: The analyte an Observation's LOINC code measures (mass and molar codes alike).
ANALYTE_BY_LOINC: dict[str, str] = {
    "2339-0": "glucose",  # Glucose [Mass/volume] in Blood
    "2345-7": "glucose",  # Glucose [Mass/volume] in Serum or Plasma
    "15074-8": "glucose",  # Glucose [Moles/volume] in Blood
    "14749-6": "glucose",  # Glucose [Moles/volume] in Serum or Plasma
    "2160-0": "creatinine",  # Creatinine [Mass/volume] in Serum or Plasma
    "38483-4": "creatinine",  # Creatinine [Mass/volume] in Blood
    "14682-9": "creatinine",  # Creatinine [Moles/volume] in Serum or Plasma
    "59826-8": "creatinine",  # Creatinine [Moles/volume] in Blood
}


class UnitError(ValueError):
    """A quantity whose unit cannot be converted to the one a model expects."""


def normalize_unit(unit: str) -> str:
    """The UCUM code for a unit spelling in :data:`UNIT_ALIASES` (others pass unchanged)."""
    unit = unit.strip()
    return UNIT_ALIASES.get(unit, unit)


def convert_quantity(value: float, unit: str, to: str, *, code: str | None = None) -> float:
    """``value`` in ``unit`` expressed in ``to``; ``code`` (LOINC) picks an analyte's factor.

    Raises :class:`UnitError` naming both units when :data:`UNIT_ALIASES`,
    :data:`LINEAR_CONVERSIONS` and :data:`ANALYTE_CONVERSIONS` hold no way between them.
    """
    source, target = normalize_unit(unit), normalize_unit(to)
    if source == target:
        return value
    if (source, target) in LINEAR_CONVERSIONS:
        scale, offset = LINEAR_CONVERSIONS[(source, target)]
        return value * scale + offset
    analyte = ANALYTE_BY_LOINC.get(code or "")
    factor = ANALYTE_CONVERSIONS.get(analyte or "", {}).get((source, target))
    if factor is not None:
        return value * factor
    about = f" for {analyte}" if analyte else ""
    raise UnitError(f"unit {unit!r} cannot be converted to {to!r}{about}")


# --- time -------------------------------------------------------------------------------------


def _instant(value: object) -> datetime | None:
    """A FHIR date/dateTime/instant as an aware datetime; partial dates start their period, UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime.combine(value, time(), tzinfo=UTC)
    if isinstance(value, str):  # fhir.resources keeps "2020" and "2020-01" as strings
        match = re.fullmatch(r"(\d{4})(?:-(\d{2}))?", value)
        if match:
            return datetime(int(match[1]), int(match[2] or 1), 1, tzinfo=UTC)
    return None


def _birth_date(value: object) -> date | None:
    when = _instant(value)
    return when.date() if when is not None else None


def completed_years(born: date, at: date) -> int:
    """Age in completed years (the clinical convention: a birthday not yet reached doesn't count)."""
    return at.year - born.year - ((at.month, at.day) < (born.month, born.day))


def _observation_time(obs: Observation) -> datetime | None:
    period = obs.effectivePeriod
    return (
        _instant(obs.effectiveDateTime)
        or _instant(obs.effectiveInstant)
        or (_instant(period.end) or _instant(period.start) if period is not None else None)
        or _instant(obs.issued)
    )


# --- codes ------------------------------------------------------------------------------------


def _codes(source: dict[str, Any]) -> frozenset[tuple[str, str]]:
    system = str(source.get("system", ""))
    return frozenset((system, str(c)) for c in source.get("codes", ()))


def _matching_code(
    concept: CodeableConcept | None, codes: frozenset[tuple[str, str]]
) -> str | None:
    for coding in (concept.coding or []) if concept is not None else []:
        if (coding.system or "", coding.code or "") in codes:
            return coding.code
    return None


def _status_code(concept: CodeableConcept | None) -> str | None:
    for coding in (concept.coding or []) if concept is not None else []:
        if coding.code:
            return coding.code
    return None


# --- observations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reading:
    """One Observation value that could feed a feature."""

    #: Orders readings: latest effective time, then latest issued, then id (for determinism).
    key: tuple[datetime, datetime, str]
    value: float
    unit: str
    code: str
    observation: Observation


def _reading(
    obs: Observation,
    codes: frozenset[tuple[str, str]],
    *,
    start: datetime,
    end: datetime,
) -> _Reading | None:
    """The value of ``obs`` for ``codes`` if it was taken in ``[start, end]`` and counts."""
    if obs.status not in USABLE_OBSERVATION_STATUS:
        return None
    when = _observation_time(obs)
    if when is None or not start <= when <= end:
        return None
    # The Observation's own value, else the first matching component's (a panel such as
    # 85354-9 blood pressure carries systolic 8480-6 and diastolic 8462-4 as components).
    candidates = [(obs.code, obs.valueQuantity)]
    candidates += [(c.code, c.valueQuantity) for c in obs.component or []]
    for concept, quantity in candidates:
        code = _matching_code(concept, codes)
        if code is not None and quantity is not None and quantity.value is not None:
            key = (when, _instant(obs.issued) or when, obs.id or "")
            return _Reading(key, float(quantity.value), _quantity_unit(quantity), code, obs)
    return None


def _latest(readings: Iterable[_Reading | None]) -> _Reading | None:
    best: _Reading | None = None
    for reading in readings:
        if reading is not None and (best is None or reading.key > best.key):
            best = reading
    return best


def _quantity_unit(quantity: Quantity) -> str:
    # Quantity.code is the machine unit when the system is UCUM (or unstated); unit is display.
    if quantity.code and quantity.system in (None, UCUM):
        return quantity.code
    return quantity.unit or quantity.code or ""


# --- conditions -------------------------------------------------------------------------------


def _condition_onset(cond: Condition) -> datetime | None:
    period = cond.onsetPeriod
    return (
        _instant(cond.onsetDateTime)
        or (_instant(period.start) if period is not None else None)
        or _instant(cond.recordedDate)
    )


def _condition_present(cond: Condition, as_of: datetime) -> bool:
    """Whether ``cond`` held at ``as_of``: verified, begun, and not abated by then.

    An abatement date decides when there is one (a condition resolved after ``as_of`` was still
    present at ``as_of``); without one, ``clinicalStatus`` inactive/remission/resolved means absent.
    Onset is ``onset[x]`` (dateTime or Period.start), else ``recordedDate``; unknown counts as begun.
    """
    if _status_code(cond.verificationStatus) in VOID_VERIFICATION_STATUS:
        return False
    onset = _condition_onset(cond)
    if onset is not None and onset > as_of:
        return False
    period = cond.abatementPeriod
    abated = _instant(cond.abatementDateTime) or (
        _instant(period.end or period.start) if period is not None else None
    )
    if abated is not None:
        return abated > as_of
    return _status_code(cond.clinicalStatus) not in INACTIVE_CLINICAL_STATUS


def _condition_key(cond: Condition) -> tuple[datetime, str]:
    return (_condition_onset(cond) or datetime.min.replace(tzinfo=UTC), cond.id or "")


def _present_condition(
    conditions: Iterable[Condition], codes: frozenset[tuple[str, str]], as_of: datetime
) -> Condition | None:
    """The matching condition present at ``as_of`` with the latest onset, if any."""
    best: Condition | None = None
    for cond in conditions:
        if _matching_code(cond.code, codes) is None or not _condition_present(cond, as_of):
            continue
        if best is None or _condition_key(cond) > _condition_key(best):
            best = cond
    return best


# --- features ---------------------------------------------------------------------------------


@dataclass
class FeatureResult:
    """One patient's features for one model, and how each was obtained."""

    #: Feature values in the schema's units, for every feature without a problem.
    features: dict[str, float] = field(default_factory=dict)
    #: References of the resources used (``Patient/1``, ``Observation/abc``), in schema order.
    basis: list[str] = field(default_factory=list)
    #: Features that were missing and took the schema's stated value.
    imputed: list[str] = field(default_factory=list)
    #: Features that could not be set, with the reason; the case should not be scored.
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _rule_problem(feature: FeatureSpec, value: float) -> str | None:
    if not math.isfinite(value):
        return "is not a finite number"
    return rule_problem(feature, value)


def _describe(source: dict[str, Any]) -> str:
    codes = ", ".join(str(c) for c in source.get("codes", ()))
    system = {LOINC: "LOINC", "http://snomed.info/sct": "SNOMED CT"}.get(
        str(source.get("system")), str(source.get("system"))
    )
    display = source.get("display")
    label = f" ({display})" if isinstance(display, str) else ""
    return f"{source.get('resource')} {system} {codes}{label}"


def _patient_value(feature: FeatureSpec, patient: Patient, as_of: datetime) -> float | str | None:
    """The value, a problem (str), or None when the element is absent."""
    source = feature.source or {}
    element = str(source.get("element", ""))
    if element == "birthDate":
        born = _birth_date(patient.birthDate)
        if born is None:
            return None
        if normalize_unit(feature.unit) != "a":
            return f"age is computed in years ('a'), the schema asks for {feature.unit!r}"
        if born > as_of.date():
            return "birthDate is after as_of"
        return float(completed_years(born, as_of.date()))
    raw = getattr(patient, element, None) if element in type(patient).model_fields else None
    if raw is None:
        return None
    mapping = source.get("map")
    if isinstance(mapping, dict):
        if str(raw) not in mapping:
            known = ", ".join(map(str, mapping))
            return f"Patient.{element} {raw!r} has no mapping (known: {known})"
        return float(mapping[str(raw)])
    if isinstance(raw, int | float | Decimal) and not isinstance(raw, bool):
        return float(raw)
    return f"Patient.{element} is not a number and the schema gives no map"


def features_for(
    spec: ModelSpec,
    patient: Patient,
    observations: Iterable[Observation],
    conditions: Iterable[Condition],
    *,
    as_of: datetime,
    lookback_days: int,
) -> FeatureResult:
    """One patient's features for ``spec``, as they stood at ``as_of``.

    Parameters
    ----------
    spec
        The model; each input's ``source`` says where its value is (inputs without one are
        treated as missing).
    patient, observations, conditions
        One patient's resources (a :class:`PatientRecord`'s fields).
    as_of
        The scoring instant (timezone-aware). Nothing dated after it is used.
    lookback_days
        Observations older than ``as_of - lookback_days`` are ignored.

    Returns
    -------
    FeatureResult
        ``features`` holds a value for each input except those in ``problems``.
    """
    if as_of.tzinfo is None:
        raise ValueError("as_of must be timezone-aware")
    if lookback_days < 0:
        raise ValueError("lookback_days must be >= 0")
    start = as_of - timedelta(days=lookback_days)
    observations, conditions = list(observations), list(conditions)
    result = FeatureResult()
    patient_ref = _reference_of(patient)

    for feature in spec.inputs:
        name, source = feature.name, feature.source or {}
        resource = source.get("resource")
        value: float | str | None = None
        absent = "the registry gives no FHIR source"
        if resource == "Patient":
            value = _patient_value(feature, patient, as_of)
            absent = f"Patient.{source.get('element')} is absent"
            if value is not None:
                result.basis.append(patient_ref)
        elif resource == "Observation":
            codes = _codes(source)
            best = _latest(_reading(o, codes, start=start, end=as_of) for o in observations)
            absent = f"no {_describe(source)} within {lookback_days} days before as_of"
            if best is not None:
                try:
                    value = convert_quantity(best.value, best.unit, feature.unit, code=best.code)
                except UnitError as exc:
                    value = f"{_reference_of(best.observation)}: {exc}"
                result.basis.append(_reference_of(best.observation))
        elif resource == "Condition":
            present = _present_condition(conditions, _codes(source), as_of)
            value = 0.0 if present is None else 1.0
            if present is not None:
                result.basis.append(_reference_of(present))
        elif resource is not None:
            absent = f"source resource {resource!r} is not supported"

        if isinstance(value, str):
            result.problems[name] = value
        elif value is None:
            if isinstance(feature.missing, int | float):
                result.features[name] = float(feature.missing)
                result.imputed.append(name)
            elif feature.missing == "reject":
                result.problems[name] = f"{absent}; the model rejects a missing value"
            else:
                result.problems[name] = f"{absent}; the registry states no value to impute"
        elif (problem := _rule_problem(feature, value)) is not None:
            result.problems[name] = problem
        else:
            result.features[name] = value

    result.basis = list(dict.fromkeys(result.basis))
    return result


# --- NDJSON bulk export -----------------------------------------------------------------------


def _ndjson_files(directory: Path, rtype: str) -> list[Path]:
    return sorted({*directory.glob(f"{rtype}.ndjson"), *directory.glob(f"{rtype}.*.ndjson")})


def _raw_codes(raw: dict[str, Any]) -> set[tuple[str, str]] | None:
    """(system, code) pairs of ``code`` and ``component[].code``; None when oddly shaped."""
    out: set[tuple[str, str]] = set()
    concepts = [raw.get("code")]
    components = raw.get("component", [])
    if not isinstance(components, list):
        return None
    concepts += [c.get("code") if isinstance(c, dict) else None for c in components]
    for concept in concepts:
        if concept is None:
            continue
        codings = concept.get("coding", []) if isinstance(concept, dict) else None
        if not isinstance(codings, list):
            return None
        for coding in codings:
            if not isinstance(coding, dict):
                return None
            out.add((str(coding.get("system", "")), str(coding.get("code", ""))))
    return out


class NdjsonExport:
    """A Bulk Data export folder read for one model: iterate for :class:`PatientRecord`\\ s.

    Each record holds the patient's ``id``, ``birthDate``, ``gender`` and ``deceased[x]`` and, per
    feature, only the Observation that wins it (latest in the window) and the Condition that makes
    it present:
    :func:`features_for` on a record gives what it would give on all the patient's resources.
    Lines that cannot matter (no code the model reads) are not validated. ``issues`` lists the
    lines skipped, with file and line number; it is complete once iteration has ended.
    """

    def __init__(
        self, directory: Path, spec: ModelSpec, *, as_of: datetime, lookback_days: int
    ) -> None:
        if as_of.tzinfo is None:
            raise ValueError("as_of must be timezone-aware")
        self.directory = Path(directory)
        self.spec = spec
        self.as_of = as_of
        self.lookback_days = lookback_days
        self.issues: list[Issue] = []
        #: Lines read per resource type.
        self.lines: Counter[str] = Counter()

    def __iter__(self) -> Iterator[PatientRecord]:
        self.issues, self.lines = [], Counter()
        if not _ndjson_files(self.directory, "Patient"):
            raise FhirInputError(
                [Issue("fatal", "not-found", f"no Patient.ndjson in {self.directory}")]
            )
        patients = self._index_patients()
        start = self.as_of - timedelta(days=self.lookback_days)
        observed = [
            (f.name, _codes(f.source or {}))
            for f in self.spec.inputs
            if (f.source or {}).get("resource") == "Observation"
        ]
        coded = [
            (f.name, _codes(f.source or {}))
            for f in self.spec.inputs
            if (f.source or {}).get("resource") == "Condition"
        ]
        best_obs: dict[tuple[str, str], _Reading] = {}
        best_cond: dict[tuple[str, str], Condition] = {}

        for resource, subject in self._relevant(patients, "Observation", observed):
            assert isinstance(resource, Observation)
            for name, codes in observed:
                reading = _reading(resource, codes, start=start, end=self.as_of)
                slot = (subject, name)
                if reading is not None and (
                    slot not in best_obs or reading.key > best_obs[slot].key
                ):
                    best_obs[slot] = reading
        for resource, subject in self._relevant(patients, "Condition", coded):
            assert isinstance(resource, Condition)
            for name, codes in coded:
                slot = (subject, name)
                current = [best_cond[slot]] if slot in best_cond else []
                chosen = _present_condition([*current, resource], codes, self.as_of)
                if chosen is not None:
                    best_cond[slot] = chosen

        for ref, patient in patients.items():
            record = PatientRecord(reference=ref, patient=patient)
            for name, _ in observed:
                if (ref, name) in best_obs:
                    obs = best_obs[(ref, name)].observation
                    if all(o is not obs for o in record.observations):
                        record.observations.append(obs)
            for name, _ in coded:
                if (ref, name) in best_cond:
                    cond = best_cond[(ref, name)]
                    if all(c is not cond for c in record.conditions):
                        record.conditions.append(cond)
            yield record

    def _lines(self, rtype: str) -> Iterator[tuple[dict[str, Any], int, str]]:
        """JSON objects of ``rtype`` files, with line number and file name; bad lines reported."""
        for path in _ndjson_files(self.directory, rtype):
            with path.open(encoding="utf-8") as fh:
                for number, text in enumerate(fh, start=1):
                    if not text.strip():
                        continue
                    self.lines[rtype] += 1
                    try:
                        raw = json.loads(text)
                    except json.JSONDecodeError as exc:
                        diag = f"not JSON: {exc.msg} at column {exc.colno}"
                        self.issues.append(Issue("error", "structure", diag, "", path.name, number))
                        continue
                    if not isinstance(raw, dict) or raw.get("resourceType") != rtype:
                        diag = f"expected a {rtype} resource in {path.name}"
                        self.issues.append(
                            Issue("error", "invalid", diag, "resourceType", path.name, number)
                        )
                        continue
                    yield raw, number, path.name

    def _index_patients(self) -> dict[str, Patient]:
        keep = {
            "resourceType",
            "id",
            "birthDate",
            "gender",
            "deceasedBoolean",
            "deceasedDateTime",
        } | {
            str((f.source or {}).get("element"))
            for f in self.spec.inputs
            if (f.source or {}).get("resource") == "Patient"
        }
        patients: dict[str, Patient] = {}
        for raw, number, file in self._lines("Patient"):
            resource, problems = _validate(raw, prefix="Patient", file=file, line=number)
            self.issues += problems
            if not isinstance(resource, Patient):
                continue
            if not resource.id:
                self.issues.append(
                    Issue("error", "required", "a Patient needs an id", "Patient.id", file, number)
                )
                continue
            ref = f"Patient/{resource.id}"
            if ref in patients:
                diag = f"{ref} appears twice; the first is kept"
                self.issues.append(Issue("error", "duplicate", diag, "Patient.id", file, number))
                continue
            # Only the elements the model reads are kept: memory stays per patient, not per line.
            patients[ref] = Patient.model_validate({k: v for k, v in raw.items() if k in keep})
        return patients

    def _relevant(
        self,
        patients: dict[str, Patient],
        rtype: str,
        wanted: Sequence[tuple[str, frozenset[tuple[str, str]]]],
    ) -> Iterator[tuple[Resource, str]]:
        """Validated ``rtype`` resources that carry a wanted code and point at a known patient."""
        codes = frozenset().union(*(c for _, c in wanted)) if wanted else frozenset()
        for raw, number, file in self._lines(rtype):
            found = _raw_codes(raw)
            if found is not None and not found & codes:
                continue
            resource, problems = _validate(raw, prefix=rtype, file=file, line=number)
            self.issues += problems
            if resource is None:
                continue
            ref = _subject(raw)
            if not isinstance(ref, str) or ref not in patients:
                diag = (
                    f"{rtype} has no subject reference"
                    if not isinstance(ref, str)
                    else "the referenced Patient is not in Patient.ndjson"
                )
                code: IssueType = "required" if not isinstance(ref, str) else "not-found"
                self.issues.append(Issue("error", code, diag, f"{rtype}.subject", file, number))
                continue
            yield resource, ref


def iter_ndjson(
    directory: Path | str, spec: ModelSpec, *, as_of: datetime, lookback_days: int
) -> NdjsonExport:
    """Stream a Bulk Data export folder for ``spec``; see :class:`NdjsonExport`.

    >>> export = iter_ndjson(folder, spec, as_of=now, lookback_days=365)  # doctest: +SKIP
    >>> for record in export:  # doctest: +SKIP
    ...     features_for(spec, record.patient, record.observations, record.conditions, ...)
    >>> export.issues  # doctest: +SKIP
    """
    return NdjsonExport(Path(directory), spec, as_of=as_of, lookback_days=lookback_days)
