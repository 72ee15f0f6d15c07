"""FHIR R4 resources → one model's input features, with the resources each value came from and
every sent value that could not be used.

Two readers and one rule book:

- :func:`parse_bundle` reads a Bundle (transaction, batch, collection or searchset) and groups its
  Patients, Observations, Conditions and Encounters by patient, each with the reference that cites
  it (``Type/id``, else the entry's ``fullUrl``). A Bundle with structural problems is refused
  whole with a :class:`FhirInputError` that lists every problem found, as OperationOutcome issues.
- :func:`iter_ndjson` streams a Bulk Data export folder (``Patient.ndjson``, ``Encounter``,
  ``Observation``, ``Condition``, or ``<Type>.000.ndjson`` parts). Per patient and feature it keeps
  only the resource that wins and the resources that must be reported, so memory grows with
  patients times features, not with the size of the export. A bad line is reported with its file
  and line number and skipped; the rest is still read.
- :func:`features_for` applies a model's mapping (each input's ``source``: codes in any spelling
  of their code system, a time rule, a window, the unit, what to do with a value that cannot be
  read; then ``missing``, ``allowed`` and ``ranges``) at one instant ``as_of``. docs/fhir.md
  states the rules for a clinical reviewer. Nothing is silent: every resource that carries a
  feature's code but cannot be used is listed in :attr:`FeatureResult.ignored` with the reason,
  every imputed value in :attr:`FeatureResult.imputations`, every flagged range in ``flagged``.

Resources are parsed with ``fhir.resources.R4B``: fhir.resources 7+ puts FHIR R5 at the top level,
and R5 refuses R4 data (Synthea's ``Encounter.class`` is a Coding in R4, a list in R5), while R4B is
wire-compatible with R4 for the resources read here. Only Patient, Observation, Condition and
Encounter are validated; other entries (Claim, Provenance, ...) are counted and left alone.
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
from urllib.parse import parse_qsl

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

from models.cases.featurize import rule_flags, rule_problem
from models.cases.registry import FeatureSpec, ModelSpec, source_codes
from models.terminology.codes import (
    UCUM,
    canonical_system,
    coding_key,
    normal_code,
    system_key,
    system_name,
)
from models.terminology.ucum import UnitError, convert

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
    "informational",
]
BundleType = Literal["transaction", "batch", "collection", "searchset"]
BUNDLE_TYPES: tuple[str, ...] = ("transaction", "batch", "collection", "searchset")

#: Resource types whose content can feed a feature; every other entry is counted, not validated.
USED_TYPES = ("Patient", "Observation", "Condition", "Encounter")
#: Observation statuses whose value counts (https://hl7.org/fhir/R4/valueset-observation-status.html).
USABLE_OBSERVATION_STATUS = frozenset({"final", "amended", "corrected", "preliminary"})
#: Statuses by which the record says it holds no result: reported, as if not sent.
VOID_OBSERVATION_STATUS = frozenset({"registered", "cancelled", "entered-in-error"})
#: Condition.clinicalStatus codes meaning "not present now" (when no abatement date says when).
INACTIVE_CLINICAL_STATUS = frozenset({"inactive", "remission", "resolved"})
#: Every Condition.clinicalStatus and verificationStatus code of R4 (required bindings): a code
#: outside them says nothing that can be read.
CLINICAL_STATUS_CODES = frozenset({"active", "recurrence", "relapse"}) | INACTIVE_CLINICAL_STATUS
VERIFICATION_STATUS_CODES = frozenset(
    {"unconfirmed", "provisional", "differential", "confirmed", "refuted", "entered-in-error"}
)
#: Condition.verificationStatus codes meaning "never was": reported, never counted.
VOID_VERIFICATION_STATUS = frozenset({"refuted", "entered-in-error"})
#: verificationStatus codes of a diagnosis not (yet) confirmed: reported, not counted.
UNCONFIRMED_VERIFICATION_STATUS = frozenset({"unconfirmed", "provisional", "differential"})
#: Encounter.class codes (v3 ActCode) of a hospital admission: the encounter a ``window:
#: "encounter"`` feature reads (https://terminology.hl7.org/ValueSet-v3-ActEncounterCode.html).
ADMISSION_CLASSES = frozenset({"IMP", "ACUTE", "NONAC", "EMER", "OBSENC", "SS"})
#: Encounter statuses that never happened.
VOID_ENCOUNTER_STATUS = frozenset({"planned", "cancelled", "entered-in-error"})

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


#: fhir.resources' "value string does not match spec regex", said as the format R4 requires
#: (§2.24.0 Primitive Types), so a sender learns a time lacks its zone without the value quoted.
_FORMATS = {
    "Date value string does not match spec regex.": "not an R4 date: YYYY, YYYY-MM or YYYY-MM-DD",
    "DateTime value string does not match spec regex.": (
        "not an R4 dateTime: YYYY, YYYY-MM, YYYY-MM-DD, or YYYY-MM-DDThh:mm:ss[.sss] with its "
        "time zone (Z or +hh:mm)"
    ),
    "Instant value string does not match spec regex.": (
        "not an R4 instant: YYYY-MM-DDThh:mm:ss[.sss] with its time zone (Z or +hh:mm)"
    ),
    "Time value string does not match spec regex.": "not an R4 time: hh:mm:ss[.sss]",
    # Regular expressions, the first with a raw carriage return, newline and tab: printed in a
    # nightly summary it broke the line and overwrote its start.
    "String should match pattern '[ \r\n\t\\S]+'": (
        "an empty string: an R4 string holds at least one character that is not whitespace "
        "(leave the element out instead)"
    ),
    "String should match pattern '^[^\\s]+(\\s[^\\s]+)*$'": (
        "not an R4 code: empty, or whitespace at either end or twice in a row"
    ),
}

#: What a FHIR element name looks like (camelCase; "_" before a primitive's extensions).
_ELEMENT_NAME = re.compile(r"_?[a-z][A-Za-z0-9]{0,63}")


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
        message = _FORMATS.get(message, message)
        # Any other control character of a message (a pattern) as an escape: one line each.
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        loc = err["loc"]
        if kind == "extra_forbidden" and loc:
            message = "not an element of this FHIR R4 type"
            if not _ELEMENT_NAME.fullmatch(str(loc[-1])):
                # Not shaped like an element name (a misspelt "colour" is shown): the caller's
                # key may be a patient's name or MRN.
                loc = (*loc[:-1], "*")
        issues.append(Issue("error", code, message, _fhirpath(prefix, loc), file=file, line=line))
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
    except (KeyError, TypeError):
        # fhir.resources looks a nested resource's class up by its resourceType and raises
        # KeyError ('R4.ZzzType') or TypeError (a number) past pydantic: a 500 on POST /v1/fhir
        # and the end of a nightly run. Each such resourceType is named by its place.
        message = "resourceType is not a FHIR R4 resource type"
        found = [
            Issue("error", "not-supported", message, where, file, line)
            for where in _unknown_nested_types(raw, prefix)
        ]
        return None, found or [
            Issue("error", "not-supported", f"a nested resource: {message}", prefix, file, line)
        ]


def _unknown_nested_types(raw: dict[str, Any], prefix: str) -> list[str]:
    """Where a resource nested in ``raw`` (contained, a contained Bundle's entries, ...) has a
    resourceType that is not a FHIR R4 type."""
    out = []

    # A key not shaped like an element name is shown as "*": it may be a name or an MRN.
    def step(where: str, key: object) -> str:
        return f"{where}.{key if _ELEMENT_NAME.fullmatch(str(key)) else '*'}"

    stack: list[tuple[str, Any]] = [(step(prefix, k), v) for k, v in raw.items()]
    while stack:
        where, value = stack.pop()
        if isinstance(value, list):
            stack += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, dict):
            rtype = value.get("resourceType")
            if "resourceType" in value and not (isinstance(rtype, str) and _known_type(rtype)):
                out.append(f"{where}.resourceType")
            stack += [(step(where, k), v) for k, v in value.items()]
    return sorted(out)


# --- records ----------------------------------------------------------------------------------


@dataclass
class PatientRecord:
    """One patient's resources: what :func:`features_for` reads."""

    #: How the patient is cited: ``Patient/<id>``, else the entry's ``fullUrl``.
    reference: str
    patient: Patient
    observations: list[Observation] = field(default_factory=list)
    conditions: list[Condition] = field(default_factory=list)
    encounters: list[Encounter] = field(default_factory=list)
    #: ``id(resource)`` → how it is cited: ``Type/<id>``, else its entry's ``fullUrl``, else
    #: ``Bundle.entry[i]`` (shown as text: such a resource cannot be referenced).
    references: dict[int, str] = field(default_factory=dict)
    #: The Patient's ``identifier`` values as ``(system, value)`` (system "" when absent).
    identifiers: list[tuple[str, str]] = field(default_factory=list)

    def cite(self, resource: Resource) -> str:
        """The reference to ``resource`` in a RiskAssessment's ``basis``."""
        found = self.references.get(id(resource))
        if found is not None:
            return found
        rid = getattr(resource, "id", None)
        return f"{resource.get_resource_type()}/{rid}" if rid else resource.get_resource_type()


@dataclass
class ParsedBundle:
    """A Bundle's patients, each with the resources that reference it."""

    type: BundleType
    #: Keyed by :attr:`PatientRecord.reference`, in Bundle order.
    patients: dict[str, PatientRecord]
    #: Warnings only (errors raise :class:`FhirInputError`).
    issues: list[Issue] = field(default_factory=list)
    #: Entries of other resource types, not read: ``{resourceType: count}``.
    ignored: dict[str, int] = field(default_factory=dict)
    #: Patients of a ``batch``/``collection``/``searchset`` refused for their own entries'
    #: validation errors (keyed like :attr:`patients`, which omits them); the others are read.
    refused: dict[str, list[Issue]] = field(default_factory=dict)
    #: Every Patient's key in Bundle order, refused ones included.
    order: list[str] = field(default_factory=list)


def _subject(raw: dict[str, Any]) -> object:
    ref = raw.get("subject") or raw.get("patient")
    return ref.get("reference") if isinstance(ref, dict) else None


#: A JSON escape that may make a NUL or a lone surrogate: only then are a line's strings walked.
_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


def _unstorable(value: Any) -> str | None:
    """Why a parsed line cannot be stored (PostgreSQL refuses NUL in text, UTF-8 cannot encode a
    lone surrogate: an identifier's system holding one ended the whole run), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += list(item.keys()) + list(item.values())
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str):
            if "\x00" in item:
                return "a string holds a NUL character (U+0000), which cannot be stored"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a string holds a lone UTF-16 surrogate, which is not a character"
    return None


def _identifiers(raw: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for ident in raw.get("identifier") or []:
        if isinstance(ident, dict) and isinstance(ident.get("value"), str) and ident["value"]:
            out.append((str(ident.get("system") or ""), ident["value"]))
    return out


def _by_identifier(
    owners: dict[tuple[str, str], set[str]], system: str | None, value: str
) -> list[str]:
    """The Patients (keys) holding identifier ``value`` (under ``system``; any when None)."""
    found: set[str] = set()
    for (has_system, has_value), keys in owners.items():
        if has_value == value and (system is None or has_system == system):
            found |= keys
    return sorted(found)


def _identified_patient(
    subject: object, owners: dict[tuple[str, str], set[str]]
) -> tuple[str | None, str]:
    """A subject that names its Patient by identifier, resolved against the Bundle's Patients:
    ``Patient?identifier=[system|]value`` (a conditional reference, as transaction Bundles send
    it) or a Reference with only an ``identifier``. ``(key, "")``, or ``(None, why)``; ``("",
    "")`` when the subject is neither. The diagnostics never repeat the identifier."""
    if not isinstance(subject, dict):
        return "", ""
    ref = subject.get("reference")
    if isinstance(ref, str):
        if not ref.startswith("Patient?"):
            return "", ""
        params = parse_qsl(ref.partition("?")[2], keep_blank_values=True)
        tokens = [v for k, v in params if k == "identifier"]
        if len(params) != 1 or len(tokens) != 1 or not tokens[0]:
            return None, "a conditional reference to a Patient is resolved by identifier only"
        system, bar, value = tokens[0].rpartition("|")
        matches = _by_identifier(owners, system if bar else None, value)
    elif ref is None and isinstance(ident := subject.get("identifier"), dict):
        named, within = ident.get("value"), ident.get("system")
        if not isinstance(named, str) or not named:
            return "", ""
        matches = _by_identifier(owners, within if isinstance(within, str) else None, named)
    else:
        return "", ""
    if len(matches) == 1:
        return matches[0], ""
    if not matches:
        return None, "the identifier of the subject matches no Patient in the Bundle"
    return None, f"the identifier of the subject matches {len(matches)} Patients in the Bundle"


#: A Patient reference, absolute or relative, with or without its version: FHIR R4 §2.3.0
#: "Resource References" allows ``Patient/23/_history/2`` as well as the server's full URL.
_PATIENT_REFERENCE = re.compile(
    r"^(?:https?://.*/)?(Patient/[A-Za-z0-9\-.]{1,64})(/_history/[A-Za-z0-9\-.]{1,64})?$"
)
_ABSOLUTE_REFERENCE = re.compile(
    r"^https?://.*/([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(/_history/.*)?$"
)
#: A RESTful absolute URL ``[base]/Type/id[/_history/v]``: the server's base is group 1.
_RESTFUL_URL = re.compile(
    r"^https?://(.+?)/[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


def _server(url: str | None) -> str | None:
    """The base of a RESTful absolute URL (host and path, no scheme, case folded), or None."""
    match = _RESTFUL_URL.match(url or "")
    return match.group(1).lower() if match else None


def _patient_key(
    ref: str, alias: dict[str, str], servers: dict[str, str], referrer: str | None
) -> str | None:
    """The key of the Patient ``ref`` reaches: an entry's fullUrl, else ``Patient/<id>`` however
    written (absolute, versioned). R4 §2.36.4.1 (resolving references in Bundles): an absolute
    reference names its server, a relative one the server of the referring entry's RESTful
    fullUrl. When that server is known and the Patient's fullUrl names another, the two are
    different patients who share an id (a Bundle assembled from two EHRs): no match."""
    absolute = ref.startswith(("http://", "https://"))
    if (absolute or ref.startswith("urn:")) and ref in alias:
        return alias[ref]  # an entry's fullUrl, exactly
    match = _PATIENT_REFERENCE.match(ref)
    key = alias.get(match.group(1) if match else ref)
    if key is None:
        return None
    named = _server(ref) if absolute else _server(referrer)
    held = servers.get(key)
    if named is not None and held is not None and named != held:
        return None
    return key


def _contained_unread(raw: dict[str, Any], where: str) -> list[Issue]:
    """A warning for each contained resource of a type that feeds features (a DiagnosticReport's
    contained Observations, as v2-to-FHIR converters send results): only entries are read, so
    their values would otherwise be lost without a word (and imputed)."""
    contained = raw.get("contained")
    if not isinstance(contained, list):
        return []
    out = []
    for j, inner in enumerate(contained):
        rtype = inner.get("resourceType") if isinstance(inner, dict) else None
        if rtype in USED_TYPES:
            diag = f"a contained {rtype} is not read: send it as an entry of the Bundle"
            out.append(Issue("warning", "not-supported", diag, f"{where}.contained[{j}]"))
    return out


def parse_bundle(data: object) -> ParsedBundle:
    """Read a FHIR R4 Bundle (a ``json.loads`` result) into per-patient records.

    References to patients may be relative (``Patient/<id>``), absolute, or point at an entry's
    ``fullUrl`` (``urn:uuid:...`` in transaction Bundles). Raises :class:`FhirInputError` listing
    every problem when the Bundle is not one, is of another type, holds no Patient, has an entry
    failing validation, or has a resource whose patient is not in the Bundle.
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
    parsed: list[tuple[int, Resource, dict[str, Any], str, str | None]] = []
    #: Entries that failed validation (other than Patients): their patient is refused alone.
    invalid: list[tuple[dict[str, Any], list[Issue], str | None]] = []
    #: A Patient's key -> the server its RESTful fullUrl names (``_server``).
    servers: dict[str, str] = {}
    #: ``Type/id`` of every other resource read, to refuse a second version of one.
    versions: set[tuple[str | None, str]] = set()
    #: ``id(issue)`` -> the key of the one patient a validation error belongs to.
    blame: dict[int, str] = {}
    order: list[str] = []
    types_by_url: dict[str, str] = {}
    #: Every way a Patient entry can be referenced -> its key (valid entries or not, so that an
    #: Observation of a Patient that failed validation is not also reported as "not found").
    alias: dict[str, str] = {}
    #: Each Patient identifier ``(system, value)`` -> the keys of the Patients that carry it.
    owners: dict[tuple[str, str], set[str]] = {}
    patients: dict[str, PatientRecord] = {}
    warnings: list[Issue] = []
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
        warnings += _contained_unread(raw, f"{where}.resource")
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
        rid = raw.get("id")
        # basis cites the logical id where there is one, else the entry's fullUrl.
        cite = f"{rtype}/{rid}" if isinstance(rid, str) and rid else full_url or where
        if rtype != "Patient":
            if isinstance(rid, str) and rid and resource is not None:
                version = (_server(full_url), cite)  # two EHRs may share an id
                if version in versions:
                    # Two versions of one resource (a final reading and its correction, sent
                    # as two entries): which is current, the Bundle does not say, and the
                    # choice fell to entry order. Named by place (the id may be an MRN).
                    diag = (
                        f"{rtype}.id repeats an earlier entry's: two versions of one resource, "
                        "and the Bundle does not say which is current"
                    )
                    twice = Issue("error", "duplicate", diag, f"{where}.resource.id")
                    issues.append(twice)
                    invalid.append((raw, [twice], full_url))
                    continue
                versions.add(version)
            if resource is not None:
                if cite == where:
                    diag = f"{rtype} has neither an id nor a fullUrl: cited as text only"
                    warnings.append(Issue("warning", "business-rule", diag, where))
                parsed.append((i, resource, raw, cite, full_url))
            elif problems:
                invalid.append((raw, problems, full_url))
            continue
        if not isinstance(rid, str) and full_url is None:
            diag = "a Patient needs an id or a fullUrl to be referenced"
            issues.append(Issue("error", "required", diag, f"{where}.resource.id"))
            continue
        key = f"Patient/{rid}" if isinstance(rid, str) else str(full_url)
        if key in alias.values():
            # Named by place, not by id (the caller's: it may be an MRN).
            diag = "an earlier entry holds a Patient with this id or fullUrl"
            issues.append(Issue("error", "duplicate", diag, f"{where}.resource.id"))
            continue
        alias[key] = key
        order.append(key)
        blame.update((id(p), key) for p in problems)
        for pair in _identifiers(raw):
            owners.setdefault(pair, set()).add(key)
        if full_url is not None:
            alias[full_url] = key
            if match := _PATIENT_REFERENCE.match(full_url):
                alias.setdefault(match.group(1), key)
            if (server := _server(full_url)) is not None:
                servers[key] = server
        if isinstance(resource, Patient):
            record = PatientRecord(reference=key, patient=resource, identifiers=_identifiers(raw))
            record.references[id(resource)] = key
            patients[key] = record
    if not alias:
        issues.append(Issue("error", "required", "the Bundle holds no Patient", "Bundle.entry"))

    for i, resource, raw, cite, referrer in parsed:
        where = f"Bundle.entry[{i}].resource.subject"
        identified, why = _identified_patient(raw.get("subject") or raw.get("patient"), owners)
        if identified is None:
            issues.append(Issue("error", "not-found", why, where))
            continue
        ref = identified or _subject(raw)
        if not isinstance(ref, str):
            diag = f"{resource.get_resource_type()} has no subject reference"
            issues.append(Issue("error", "required", diag, where))
            continue
        # By identifier (logical or conditional): no server to compare, the identifier decides.
        target_key = identified or _patient_key(ref, alias, servers, referrer)
        if target_key is None:
            absolute = _ABSOLUTE_REFERENCE.match(ref)
            target = types_by_url.get(ref) or (
                absolute.group(1) if absolute else re.split(r"[/?]", ref, maxsplit=1)[0]
            )
            if target == "Patient" or ref.startswith("urn:"):
                diag = "the referenced Patient is not in the Bundle"
                issues.append(Issue("error", "not-found", diag, where))
            elif ref.startswith("#"):
                diag = "subject is a contained resource: its Patient must be an entry of the Bundle"
                issues.append(Issue("error", "not-found", diag, where))
            elif "/" not in ref or not _known_type(target):
                # Not Type/id, a fullUrl or an absolute URL: the text (an MRN?) is not repeated.
                diag = "subject is not a reference to a resource (Type/id or a fullUrl)"
                issues.append(Issue("error", "not-found", diag, where))
            else:
                diag = f"subject is a {target}, not a Patient: not read"
                warnings.append(Issue("warning", "business-rule", diag, where))
            continue
        owner = patients.get(target_key)
        if owner is None:  # the Patient itself failed validation, reported above
            continue
        owner.references[id(resource)] = cite
        if isinstance(resource, Observation):
            owner.observations.append(resource)
        elif isinstance(resource, Condition):
            owner.conditions.append(resource)
        elif isinstance(resource, Encounter):
            owner.encounters.append(resource)

    for raw, problems, referrer in invalid:
        if (owner_key := _owner_key(raw, alias, owners, servers, referrer)) is not None:
            blame.update((id(p), owner_key) for p in problems)
    refused: dict[str, list[Issue]] = {}
    for found in issues:
        if id(found) in blame:
            refused.setdefault(blame[id(found)], []).append(found)
    # A batch is not poisoned by one patient's bad entry: that patient is refused, the others
    # read. A transaction is all or nothing; an error no single patient owns refuses the Bundle.
    unowned = [i for i in issues if id(i) not in blame]
    if issues and (btype == "transaction" or unowned or len(refused) == len(order)):
        raise FhirInputError(issues)
    return ParsedBundle(
        type=cast(BundleType, btype),
        patients={k: r for k, r in patients.items() if k not in refused},
        issues=warnings,
        ignored=dict(ignored),
        refused=refused,
        order=order,
    )


def _owner_key(
    raw: dict[str, Any],
    alias: dict[str, str],
    owners: dict[tuple[str, str], set[str]],
    servers: dict[str, str],
    referrer: str | None,
) -> str | None:
    """The key of the Patient an entry that failed validation is about, if its subject still
    reaches exactly one."""
    identified, _ = _identified_patient(raw.get("subject") or raw.get("patient"), owners)
    if identified is None or identified:
        return identified
    ref = _subject(raw)
    if not isinstance(ref, str):
        return None
    return _patient_key(ref, alias, servers, referrer)


# --- units ------------------------------------------------------------------------------------


def convert_quantity(value: float, unit: str, to: str, *, code: str | None = None) -> float:
    """``value`` in ``unit`` expressed in ``to`` by UCUM's meaning (:func:`models.terminology.ucum.convert`);
    ``code`` (LOINC) supplies a molar mass for mass ↔ substance concentrations."""
    return convert(value, unit, to, loinc=code)


def _quantity_unit(quantity: Quantity) -> str:
    # Quantity.code is the computable unit when the system is UCUM (or unstated); unit is the
    # display. A code in another system is not UCUM: the display is tried instead.
    system = canonical_system(quantity.system) if quantity.system else UCUM
    if quantity.code and system == UCUM:
        return quantity.code
    return quantity.unit or quantity.code or ""


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
        # A leap second, "23:59:60Z" (R4's dateTime and instant allow 60), which Python cannot
        # hold: kept as a string, it read as "no effective time". Its last microsecond before.
        leap = re.fullmatch(
            r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}):60(?:\.\d+)?(Z|[+-]\d{2}:\d{2})", value
        )
        if leap:
            try:
                return datetime.fromisoformat(f"{leap[1]}:59.999999{leap[2]}")
            except ValueError:
                return None
    return None


def _birth_date(value: object) -> date | None:
    when = _instant(value)
    return when.date() if when is not None else None


def deceased_by(patient: Patient, as_of: datetime) -> bool:
    """Whether ``patient`` had died by ``as_of``: ``deceasedBoolean`` true, or a
    ``deceasedDateTime`` no later than it (a partial one, ``2019`` or ``2019-05``, from the
    start of its period, as a partial birthDate counts)."""
    if patient.deceasedBoolean is True:
        return True
    died = _instant(patient.deceasedDateTime)
    return died is not None and died <= as_of


def completed_years(born: date, at: date) -> int:
    """Age in completed years (the clinical convention: a birthday not yet reached doesn't count)."""
    return at.year - born.year - ((at.month, at.day) < (born.month, born.day))


def _observation_time(obs: Observation) -> datetime | None:
    """The clinically relevant time: effective[x] (a Period counts at its start). ``issued`` is
    when the result was released, not when it was measured, so it is not used."""
    period = obs.effectivePeriod
    return (
        _instant(obs.effectiveDateTime)
        or _instant(obs.effectiveInstant)
        or (_instant(period.start) or _instant(period.end) if period is not None else None)
    )


def _day_or_more_ends(obs: Observation) -> datetime:
    """When the period an Observation's time names ends, if the time is a date (``2024-02-29``)
    or a partial one (``2024``, ``2024-02``): the next day, month or year. Otherwise its start."""
    period = obs.effectivePeriod
    sent = obs.effectiveDateTime or obs.effectiveInstant
    sent = sent or (period.start or period.end if period is not None else None)
    start = _instant(sent) or datetime.min.replace(tzinfo=UTC)
    if isinstance(sent, datetime) or not isinstance(sent, date | str):
        return start
    if isinstance(sent, str) and len(sent) > 7:
        return start  # a leap second's instant, kept as a string
    if isinstance(sent, date):
        return start + timedelta(days=1)
    if len(sent) == 4:
        return start.replace(year=start.year + 1)
    month = start.month % 12 + 1
    return start.replace(year=start.year + (month == 1), month=month)


# --- the mapping ------------------------------------------------------------------------------

TimeRule = Literal["latest", "first", "ever", "present"]


@dataclass(frozen=True)
class FeatureMapping:
    """One feature's ``source``, read once: what to match and how to choose over time."""

    resource: str
    #: ``(canonical system, normal code)`` pairs that feed the feature.
    codes: frozenset[tuple[str, str]]
    #: Code strings alone (as sent and in ICD's dotless form): a coding with one of these under
    #: an unknown system is a near miss, reported rather than dropped.
    bare_codes: frozenset[str]
    systems: tuple[str, ...]
    time: TimeRule
    window: Literal["lookback", "encounter"]
    #: What a matched value that cannot be read (unit, system spelling, no time) does: refuse
    #: the case, or be ignored (reported) so the other values or the missing rule decide.
    unusable: Literal["reject", "ignore"]
    element: str = ""
    value_map: dict[str, Any] | None = None

    def describe(self) -> str:
        codes = ", ".join(sorted(c for _, c in self.codes))
        systems = "/".join(system_name(s) for s in self.systems)
        return f"{self.resource} {systems} {codes}"


def mapping_of(feature: FeatureSpec) -> FeatureMapping | None:
    """The feature's mapping, or None when it has no ``source``."""
    source = feature.source
    if not source:
        return None
    resource = str(source.get("resource", ""))
    keys: set[tuple[str, str]] = set()
    bare: set[str] = set()
    systems: list[str] = []
    for entry in source_codes(source):
        uri = canonical_system(str(entry["system"])) or str(entry["system"])
        code = normal_code(uri, str(entry["code"]))
        keys.add((uri, code))
        bare |= {str(entry["code"]).strip(), code, code.replace(".", "").upper()}
        if uri not in systems:
            systems.append(uri)
    default_time = "latest" if resource == "Observation" else "present"
    mapping = source.get("map")
    return FeatureMapping(
        resource=resource,
        codes=frozenset(keys),
        bare_codes=frozenset(bare),
        systems=tuple(systems),
        time=cast(TimeRule, source.get("time", default_time)),
        window=source.get("window", "lookback"),
        unusable=source.get("unusable", "reject"),
        element=str(source.get("element", "")),
        value_map=mapping if isinstance(mapping, dict) else None,
    )


def _match(concept: CodeableConcept | None, mapping: FeatureMapping) -> str | bool | None:
    """True when a coding matches; a reason (str) for a near miss; None when unrelated.

    A near miss carries one of the feature's codes under a system that is none of the known
    spellings of the feature's code systems (or under no system at all).
    """
    codings = (concept.coding or []) if concept is not None else []
    for coding in codings:
        if coding_key(coding.system, coding.code) in mapping.codes:
            return True
    for coding in codings:
        code = (coding.code or "").strip()
        if code and (
            code in mapping.bare_codes or code.replace(".", "").upper() in mapping.bare_codes
        ):
            expected = " or ".join(system_name(s) for s in mapping.systems)
            if not coding.system:
                return f"code {code} has no system (expected {expected})"
            return f"code {code} under system {coding.system!r}, not a known spelling of {expected}"
    return None


#: The HL7 code systems of Condition.clinicalStatus and verificationStatus (R4, required
#: bindings) and of dataAbsentReason.
CLINICAL_STATUS_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION_STATUS_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
DATA_ABSENT_SYSTEM = "http://terminology.hl7.org/CodeSystem/data-absent-reason"


def _status_code(concept: CodeableConcept | None, system: str) -> str | None:
    """The code of ``concept`` in the HL7 code system ``system``; else its first code.

    Feeds send a status with the EHR's own coding beside (often before) the HL7 one
    (``[{system: local, code: "A"}, {system: condition-clinical, code: "resolved"}]``): the first
    code alone read a resolved or entered-in-error diagnosis as present and confirmed."""
    codings = [c for c in (concept.coding or []) if c.code] if concept is not None else []
    wanted = system_key(system)
    for coding in codings:
        if coding.system and system_key(coding.system) == wanted:
            return coding.code
    return codings[0].code if codings else None


@dataclass(frozen=True)
class Window:
    """The time span a ``latest``/``first`` feature reads, and how it was set."""

    start: datetime
    end: datetime
    #: Set when a ``window: encounter`` feature found no admission and read the look-back.
    note: str = ""


def index_encounter(
    encounters: Iterable[Encounter], *, start: datetime, as_of: datetime
) -> Encounter | None:
    """The admission a ``window: encounter`` feature reads: of the Encounters of an admission
    class (:data:`ADMISSION_CLASSES`) that began in ``[start, as_of]``, the latest to begin."""
    best: tuple[datetime, Encounter] | None = None
    for enc in encounters:
        if enc.status in VOID_ENCOUNTER_STATUS or enc.period is None:
            continue
        cls = enc.class_fhir
        if cls is None or cls.code not in ADMISSION_CLASSES:
            continue
        began = _instant(enc.period.start)
        if began is None or not start <= began <= as_of:
            continue
        if best is None or began > best[0]:
            best = (began, enc)
    return None if best is None else best[1]


def window_for(
    mapping: FeatureMapping,
    encounters: Sequence[Encounter],
    *,
    as_of: datetime,
    lookback_days: int,
) -> Window:
    start = as_of - timedelta(days=lookback_days)
    if mapping.window != "encounter":
        return Window(start, as_of)
    enc = index_encounter(encounters, start=start, as_of=as_of)
    if enc is None:
        note = (
            f"no admission Encounter began within {lookback_days} days before as_of: "
            "the look-back window was read instead"
        )
        return Window(start, as_of, note)
    assert enc.period is not None
    began = _instant(enc.period.start) or start
    ended = _instant(enc.period.end)
    return Window(began, min(ended, as_of) if ended is not None else as_of)


# --- one resource against one feature ---------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """A usable value for a feature: in the schema's unit, with when it was taken."""

    when: datetime
    value: float
    resource: Resource


@dataclass(frozen=True)
class Unusable:
    """A resource that carries the feature's code but whose value is not used, and why.

    ``void`` ones say themselves that they are no value (entered-in-error, cancelled, a
    dataAbsentReason, a refuted diagnosis): reported, never a reason to refuse. The others (a
    unit, a system spelling, a missing time, an unconfirmed diagnosis) follow the feature's
    ``unusable`` rule. ``when`` is their time where known: one that would have won the time rule
    is what a ``reject`` rule refuses.
    """

    reason: str
    resource: Resource
    void: bool
    when: datetime | None = None


def classify_observation(
    obs: Observation, feature: FeatureSpec, mapping: FeatureMapping, window: Window
) -> Reading | Unusable | None:
    """What ``obs`` is to ``feature``: a reading, an unusable match, or nothing (no code of the
    feature, or taken outside the window)."""
    # The Observation's own value, else the first matching component's (a panel such as
    # 85354-9 blood pressure carries systolic 8480-6 and diastolic 8462-4 as components).
    parts: list[tuple[CodeableConcept | None, Any]] = [(obs.code, obs)]
    parts += [(c.code, c) for c in obs.component or []]
    near: str | None = None
    found: list[Reading | Unusable | None] = []
    for concept, holder in parts:
        matched = _match(concept, mapping)
        if matched is True:
            found.append(_observation_value(obs, holder, feature, window, concept))
        elif isinstance(matched, str) and near is None:
            near = matched
    readings = {r.value for r in found if isinstance(r, Reading)}
    voids = [r for r in found if isinstance(r, Unusable) and r.void]
    if len(found) > 1 and not (
        (len(readings) == 1 and all(isinstance(r, Reading) for r in found))
        or len(voids) == len(found)  # an entered-in-error panel: void in every part
        or all(r is None for r in found)  # outside the window: every part alike
    ):
        # Two systolic components (both arms, two cuff readings) in one panel: the first was
        # read, whichever it was. Which one the feature means cannot be read.
        reason = (
            f"{len(found)} parts of the Observation carry the feature's code, not with one "
            "value: which is meant cannot be read"
        )
        return Unusable(reason, obs, void=False, when=_observation_time(obs))
    if found:
        return found[0]
    if near is None:
        return None
    when = _observation_time(obs)
    if when is not None and not window.start <= when <= window.end:
        return None
    return Unusable(near, obs, void=False, when=when)


#: Observation.value[x] (and component.value[x]) types other than Quantity (R4).
_OTHER_VALUES = (
    "CodeableConcept",
    "String",
    "Boolean",
    "Integer",
    "Range",
    "Ratio",
    "SampledData",
    "Time",
    "DateTime",
    "Period",
)


def _observation_value(
    obs: Observation,
    holder: Any,
    feature: FeatureSpec,
    window: Window,
    concept: CodeableConcept | None,
) -> Reading | Unusable | None:
    when = _observation_time(obs)
    if obs.status not in USABLE_OBSERVATION_STATUS:
        if when is not None and not window.start <= when <= window.end:
            return None
        if obs.status in VOID_OBSERVATION_STATUS:
            return Unusable(f"status {obs.status}: not a result", obs, void=True, when=when)
        # "unknown" (R4: the source does not know which status applies), or a code outside
        # R4's required value set ("F" or "FINAL" from an HL7 v2 OBX-11 copied as it came):
        # the value may well be a final result, so it is unreadable, not void, and the
        # feature's unusable rule decides (it was void: imputed over a value that was sent).
        reason = (
            "status unknown: the source does not know whether it is a result"
            if obs.status == "unknown"
            else "status is not an R4 Observation status code (final, amended, ...; lower case)"
        )
        return Unusable(reason, obs, void=False, when=when)
    if when is None:
        return Unusable("no effective time: cannot be placed in the window", obs, void=False)
    if not window.start <= when <= window.end:
        if when < window.start < _day_or_more_ends(obs):
            # "2024-02-29" (US Core lets vital signs be dated by day) on the day an admission
            # began at 06:10: before or in the admission, no one can say. Not dropped unsaid.
            reason = "effective time is a date without a time: cannot be placed in the window"
            return Unusable(reason, obs, void=False, when=when)
        return None
    quantity = holder.valueQuantity
    if quantity is None or quantity.value is None:
        if holder.dataAbsentReason is not None:
            # A reason given as text only (R4 allows it) says as much as a coded one; the text
            # is the sender's and is not repeated.
            absent = _status_code(holder.dataAbsentReason, DATA_ABSENT_SYSTEM) or "given as text"
            return Unusable(f"no value (dataAbsentReason {absent})", obs, void=True, when=when)
        kind = next(
            (k for k in _OTHER_VALUES if getattr(holder, f"value{k}", None) is not None), ""
        )
        what = f"{'an' if kind[:1] in 'AEIOU' else 'a'} {kind}" if kind else "no value"
        return Unusable(f"{what} where a Quantity in {feature.unit!r} is needed", obs, False, when)
    if quantity.comparator is not None:
        # "<30" bounds the value; reading it as 30 would score a number that was not measured.
        reason = f"value has comparator {quantity.comparator!r}: not an exact value"
        return Unusable(reason, obs, void=False, when=when)
    unit = _quantity_unit(quantity)
    # The molar mass is the analyte's: the LOINC code of the concept that matched (the
    # component's in a panel), wherever it stands among the codings.
    codings = (concept.coding or []) if concept is not None else []
    code = next((c.code for c in codings if c.code and canonical_system(c.system) == LOINC), None)
    try:
        value = convert_quantity(float(quantity.value), unit, feature.unit, code=code)
    except UnitError as exc:
        return Unusable(str(exc), obs, void=False, when=when)
    if not math.isfinite(value):
        return Unusable("the value is not a finite number", obs, void=False, when=when)
    return Reading(when, value, obs)


def _condition_onset(cond: Condition) -> datetime | None:
    period = cond.onsetPeriod
    return (
        _instant(cond.onsetDateTime)
        or (_instant(period.start) if period is not None else None)
        or _instant(cond.recordedDate)
    )


def _condition_present(cond: Condition, as_of: datetime) -> bool | None:
    """Whether ``cond`` held at ``as_of``: begun and not abated by then.

    An abatement date decides when there is one (a condition resolved after ``as_of`` was still
    present at ``as_of``); without one, ``clinicalStatus`` inactive/remission/resolved means absent.
    None when the clinicalStatus is a code outside R4's (``Resolved``, ``A``): it cannot be read.
    """
    period = cond.abatementPeriod
    abated = _instant(cond.abatementDateTime) or (
        _instant(period.end or period.start) if period is not None else None
    )
    if abated is not None:
        return abated > as_of
    clinical = _status_code(cond.clinicalStatus, CLINICAL_STATUS_SYSTEM)
    if clinical is not None and clinical not in CLINICAL_STATUS_CODES:
        return None
    return clinical not in INACTIVE_CLINICAL_STATUS


def classify_condition(
    cond: Condition, mapping: FeatureMapping, as_of: datetime
) -> Reading | Unusable | None:
    """A Condition that counts (a Reading of 1), an unusable match, or nothing.

    ``ever``: recorded with an onset (else ``recordedDate``; unknown counts as before) no later
    than ``as_of``, resolved or not. ``present``: the same, and not abated or inactive at as_of.
    """
    matched = _match(cond.code, mapping)
    if matched is None:
        return None
    onset = _condition_onset(cond)
    if onset is not None and onset > as_of:
        return None
    if isinstance(matched, str):
        return Unusable(matched, cond, void=False, when=onset)
    verification = _status_code(cond.verificationStatus, VERIFICATION_STATUS_SYSTEM)
    if verification in VOID_VERIFICATION_STATUS:
        return Unusable(f"verificationStatus {verification}", cond, void=True, when=onset)
    if verification in UNCONFIRMED_VERIFICATION_STATUS:
        reason = f"verificationStatus {verification}: not a confirmed diagnosis"
        return Unusable(reason, cond, void=False, when=onset)
    if verification is not None and verification not in VERIFICATION_STATUS_CODES:
        # "Confirmed", "C": a code outside R4's. Not quoted; not read as confirmed either.
        reason = "verificationStatus is not an R4 code (confirmed, provisional, ...; lower case)"
        return Unusable(reason, cond, void=False, when=onset)
    if mapping.time == "present":
        present = _condition_present(cond, as_of)
        if present is None:
            reason = "clinicalStatus is not an R4 code (active, resolved, ...; lower case)"
            return Unusable(reason, cond, void=False, when=onset)
        if not present:
            return None
    return Reading(onset or datetime.min.replace(tzinfo=UTC), 1.0, cond)


def _order(item: Reading | Unusable) -> tuple[datetime, str]:
    return (item.when or datetime.min.replace(tzinfo=UTC), str(item.resource.id or ""))


def better(rule: TimeRule, new: Reading | Unusable, old: Reading | None) -> bool:
    """Whether ``new`` wins over ``old`` under ``rule``: the first or the latest in time (ties:
    the smaller or larger id); ``ever`` and ``present`` cite the latest onset."""
    if old is None:
        return True
    if rule == "first":
        return _order(new) < _order(old)
    return _order(new) > _order(old)


# --- features ---------------------------------------------------------------------------------


@dataclass
class FeatureResult:
    """One patient's features for one model, and how each was obtained."""

    #: Feature values in the schema's units, for every feature without a problem.
    features: dict[str, float] = field(default_factory=dict)
    #: References of the resources used (``Patient/1``, ``Observation/abc``, ``urn:uuid:...``).
    basis: list[str] = field(default_factory=list)
    #: Features that were missing and took the schema's stated value.
    imputed: list[str] = field(default_factory=list)
    #: Each imputation: ``{"feature", "value", "unit", "source", "why"}`` (value: the schema's).
    imputations: list[dict[str, Any]] = field(default_factory=list)
    #: Each sent resource that matched a feature's code but was not used:
    #: ``{"feature", "resource", "reason"}``. Reasons name units and statuses, never values.
    ignored: list[dict[str, str]] = field(default_factory=list)
    #: Values accepted outside a ``flag`` range: ``{"feature", "reason"}``.
    flagged: list[dict[str, str]] = field(default_factory=list)
    #: How a rule was applied where it needed saying (an encounter window that fell back).
    notes: list[str] = field(default_factory=list)
    #: Features that could not be set, with the reason; the case should not be scored.
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> dict[str, Any]:
        """What a case record keeps of how its features were read (no patient values)."""
        return {
            "basis": self.basis,
            "imputed": self.imputed,
            "imputations": self.imputations,
            "ignored": self.ignored,
            "flagged": self.flagged,
            "notes": self.notes,
        }


def _patient_value(
    feature: FeatureSpec, mapping: FeatureMapping, patient: Patient, as_of: datetime
) -> float | str | None:
    """The value, a problem (str), or None when the element is absent."""
    element = mapping.element
    if element == "birthDate":
        born = _birth_date(patient.birthDate)
        if born is None:
            return None
        try:
            years = convert(1.0, "a", feature.unit)
        except UnitError as exc:
            return f"age is computed in years ('a'): {exc}"
        if born > as_of.date():
            return "birthDate is after as_of"
        return float(completed_years(born, as_of.date())) * years
    raw = getattr(patient, element, None) if element in type(patient).model_fields else None
    if raw is None:
        return None
    if mapping.value_map is not None:
        if str(raw) not in mapping.value_map:
            known = ", ".join(map(str, mapping.value_map))
            return f"Patient.{element} has a value with no mapping (known: {known})"
        return float(mapping.value_map[str(raw)])
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
    encounters: Iterable[Encounter] = (),
    record: PatientRecord | None = None,
) -> FeatureResult:
    """One patient's features for ``spec``, as they stood at ``as_of``.

    Parameters
    ----------
    spec
        The model; each input's ``source`` says where its value is and how it is chosen (inputs
        without one are treated as missing).
    patient, observations, conditions, encounters
        One patient's resources (a :class:`PatientRecord`'s fields).
    as_of
        The scoring instant (timezone-aware). Nothing dated after it is used.
    lookback_days
        The look-back window: ``latest``/``first`` features read ``[as_of - lookback_days,
        as_of]`` (or the admission within it, for ``window: encounter``).
    record
        Where the resources came from, to cite them (``Type/id``, else the entry's fullUrl).

    Returns
    -------
    FeatureResult
        ``features`` holds a value for each input except those in ``problems``.
    """
    if as_of.tzinfo is None:
        raise ValueError("as_of must be timezone-aware")
    if lookback_days < 0:
        raise ValueError("lookback_days must be >= 0")
    observations, conditions = list(observations), list(conditions)
    encounters = list(encounters)
    result = FeatureResult()

    def cite(resource: Resource) -> str:
        if record is not None:
            return record.cite(resource)
        rid = getattr(resource, "id", None)
        return f"{resource.get_resource_type()}/{rid}" if rid else resource.get_resource_type()

    for feature in spec.inputs:
        name, mapping = feature.name, mapping_of(feature)
        value: float | str | None = None
        absent = "the registry gives no FHIR source"
        winner: Reading | None = None
        unusable: list[Unusable] = []
        if mapping is None:
            pass
        elif mapping.resource == "Patient":
            value = _patient_value(feature, mapping, patient, as_of)
            absent = f"Patient.{mapping.element} is absent"
            if value is not None:
                result.basis.append(cite(patient))
        elif mapping.resource in ("Observation", "Condition"):
            if mapping.resource == "Observation":
                window = window_for(mapping, encounters, as_of=as_of, lookback_days=lookback_days)
                if window.note:
                    result.notes.append(f"{name}: {window.note}")
                items = [classify_observation(o, feature, mapping, window) for o in observations]
                where = (
                    f"within {lookback_days} days before as_of"
                    if mapping.window == "lookback" or window.note
                    else "in the admission Encounter"
                )
            else:
                items = [classify_condition(c, mapping, as_of) for c in conditions]
                where = "before as_of" if mapping.time == "ever" else "present at as_of"
            for item in items:
                if isinstance(item, Reading):
                    if better(mapping.time, item, winner):
                        winner = item
                elif isinstance(item, Unusable):
                    unusable.append(item)
            unusable.sort(key=lambda u: (cite(u.resource), u.reason))
            for u in unusable:
                result.ignored.append(
                    {"feature": name, "resource": cite(u.resource), "reason": u.reason}
                )
            blocking = _blocking(mapping, winner, unusable)
            if blocking is not None:
                value = (
                    f"{cite(blocking.resource)}: {blocking.reason}; the schema refuses a "
                    "value it cannot read (unusable: reject)"
                )
            elif winner is not None:
                value = winner.value
                result.basis.append(cite(winner.resource))
            elif mapping.resource == "Condition":
                absent = f"no {mapping.describe()} {where}"
            else:
                absent = f"no usable {mapping.describe()} {where}"
                if unusable:
                    absent += f" ({len(unusable)} sent but ignored, listed under ignored)"
        else:
            absent = f"source resource {mapping.resource!r} is not supported"

        if isinstance(value, str):
            result.problems[name] = value
        elif value is None:
            if isinstance(feature.missing, int | float):
                result.features[name] = float(feature.missing)
                if mapping is None or mapping.resource != "Condition":
                    result.imputed.append(name)
                    result.imputations.append(
                        {
                            "feature": name,
                            "value": float(feature.missing),
                            "unit": feature.unit,
                            "source": feature.missing_source or "the registry's stated value",
                            "why": absent,
                        }
                    )
            elif feature.missing == "reject":
                result.problems[name] = f"{absent}; the model rejects a missing value"
            else:
                result.problems[name] = f"{absent}; the registry states no value to impute"
        elif (problem := _rule_problem(feature, value)) is not None:
            result.problems[name] = problem
        else:
            result.features[name] = value
            result.flagged += [{"feature": name, "reason": r} for r in rule_flags(feature, value)]

    result.basis = list(dict.fromkeys(result.basis))
    return result


def features_of(
    spec: ModelSpec, record: PatientRecord, *, as_of: datetime, lookback_days: int
) -> FeatureResult:
    """:func:`features_for` on a :class:`PatientRecord`, citing its resources as they came."""
    return features_for(
        spec,
        record.patient,
        record.observations,
        record.conditions,
        encounters=record.encounters,
        as_of=as_of,
        lookback_days=lookback_days,
        record=record,
    )


def _blocking(
    mapping: FeatureMapping, winner: Reading | None, unusable: Sequence[Unusable]
) -> Unusable | None:
    """The unreadable value a ``reject`` rule refuses the case for: one that would have won
    the time rule (or whose time is unknown), or any when nothing usable was sent."""
    if mapping.unusable != "reject":
        return None
    for u in unusable:
        if u.void:
            continue
        if winner is None:
            return u
        if mapping.resource == "Observation" and (
            u.when is None or better(mapping.time, u, winner)
        ):
            return u
    return None


def _rule_problem(feature: FeatureSpec, value: float) -> str | None:
    if not math.isfinite(value):
        return "is not a finite number"
    return rule_problem(feature, value)


# --- NDJSON bulk export -----------------------------------------------------------------------


#: A Bulk Data output file's name: ``<Type>.ndjson``, its parts ``<Type>.000.ndjson`` (servers
#: split a large type), or ``1.<Type>.ndjson``, ``2.<Type>.ndjson`` (the standard file names of
#: the SMART bulk-data-client, option forceStandardFileNames). Group 1 is the type.
_EXPORT_FILE = re.compile(r"^(?:\d+\.)?([A-Z][A-Za-z]+)(?:\.[^.]+)?\.ndjson$")


def export_file_type(name: str) -> str | None:
    """The resource type a Bulk Data file's name gives, or None."""
    match = _EXPORT_FILE.match(name)
    return match.group(1) if match else None


def ndjson_files(directory: Path, rtype: str) -> list[Path]:
    """The export's files of resource type ``rtype`` (:data:`_EXPORT_FILE`)."""
    if not directory.is_dir():
        return []
    # Not only files: a folder so named is an export that cannot be read, and says so.
    return sorted(p for p in directory.iterdir() if export_file_type(p.name) == rtype)


def unread_files(directory: Path) -> list[str]:
    """Files of the folder that look like export output but are not read: an NDJSON file whose
    name gives no FHIR resource type (``observations.ndjson``), or a compressed one
    (``Observation.ndjson.gz``). Listed so that their resources are not missed unsaid (the
    features they hold would otherwise be imputed)."""
    if not directory.is_dir():
        return []
    out = []
    for path in sorted(directory.iterdir()):
        name = path.name
        if not path.is_file() or ".ndjson" not in name.lower():
            continue
        rtype = export_file_type(name)
        if rtype is None or not _known_type(rtype):
            out.append(name)
    return out


def _raw_codes(raw: dict[str, Any]) -> set[str] | None:
    """Code strings of ``code`` and ``component[].code`` (as sent and dotless, upper case);
    None when oddly shaped (then the line is validated, and the validator says what is wrong)."""
    out: set[str] = set()
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
            code = str(coding.get("code", "")).strip()
            out |= {code, code.replace(".", "").upper()}
    return out


@dataclass
class _Slot:
    """What one patient's export holds for one feature: the winner and what must be reported."""

    winner: Reading | None = None
    reported: list[Unusable] = field(default_factory=list)


class NdjsonExport:
    """A Bulk Data export folder read for one model: iterate for :class:`PatientRecord`\\ s.

    Each record holds the patient's ``id``, ``birthDate``, ``gender``, ``deceased[x]`` and
    ``identifier``, the admission Encounters, and per feature only the resource that wins it
    under its time rule plus every resource that carries its code but cannot be used (those are
    reported): :func:`features_of` on a record gives what it would give on all the patient's
    resources. Lines that cannot matter (no code the model reads) are not validated. ``issues``
    lists the lines skipped, with file and line number; it is complete once iteration has ended.
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
        if not ndjson_files(self.directory, "Patient"):
            raise FhirInputError(
                [Issue("fatal", "not-found", f"no Patient.ndjson in {self.directory}")]
            )
        records = self._index_patients()
        mapped = [(f, m) for f in self.spec.inputs if (m := mapping_of(f)) is not None]
        observed = [(f, m) for f, m in mapped if m.resource == "Observation"]
        coded = [(f, m) for f, m in mapped if m.resource == "Condition"]
        if any(m.window == "encounter" for _, m in observed):
            for resource, subject in self._relevant(records, "Encounter", None):
                assert isinstance(resource, Encounter)
                cls = resource.class_fhir
                if cls is not None and cls.code in ADMISSION_CLASSES:
                    records[subject].encounters.append(resource)
        windows = {
            (ref, f.name): window_for(
                m, record.encounters, as_of=self.as_of, lookback_days=self.lookback_days
            )
            for ref, record in records.items()
            for f, m in observed
        }
        slots: dict[tuple[str, str], _Slot] = {}

        def keep(subject: str, name: str, rule: TimeRule, item: Reading | Unusable | None) -> None:
            if item is None:
                return
            slot = slots.setdefault((subject, name), _Slot())
            if isinstance(item, Unusable):
                slot.reported.append(item)
            elif better(rule, item, slot.winner):
                slot.winner = item

        wanted = frozenset().union(*(m.bare_codes for _, m in observed)) if observed else None
        for resource, subject in self._relevant(records, "Observation", wanted or frozenset()):
            assert isinstance(resource, Observation)
            for f, m in observed:
                item = classify_observation(resource, f, m, windows[(subject, f.name)])
                keep(subject, f.name, m.time, item)
        wanted = frozenset().union(*(m.bare_codes for _, m in coded)) if coded else None
        for resource, subject in self._relevant(records, "Condition", wanted or frozenset()):
            assert isinstance(resource, Condition)
            for f, m in coded:
                keep(subject, f.name, m.time, classify_condition(resource, m, self.as_of))

        for ref, record in records.items():
            kept: dict[int, Resource] = {}
            for f, _ in mapped:
                slot = slots.get((ref, f.name))
                if slot is None:
                    continue
                chosen: list[Reading | Unusable] = [slot.winner] if slot.winner else []
                for item in [*chosen, *slot.reported]:
                    kept.setdefault(id(item.resource), item.resource)
            for resource in kept.values():
                if isinstance(resource, Observation):
                    record.observations.append(resource)
                elif isinstance(resource, Condition):
                    record.conditions.append(resource)
            yield record

    def _lines(self, rtype: str) -> Iterator[tuple[dict[str, Any], int, str]]:
        """JSON objects of ``rtype`` files, with line number and file name; bad lines reported."""
        for path in ndjson_files(self.directory, rtype):
            # Read as bytes and decode line by line: one undecodable byte is that line's
            # problem, not a UnicodeDecodeError that ends the whole export.
            with path.open("rb") as fh:
                for number, data in enumerate(fh, start=1):
                    if not data.strip():
                        continue
                    self.lines[rtype] += 1
                    try:
                        # utf-8-sig: a byte order mark before the first line (Windows tools
                        # write one) cost that line, and so its patient, as "not JSON".
                        text = data.decode("utf-8-sig")
                    except UnicodeDecodeError as exc:
                        diag = f"not UTF-8 at byte {exc.start + 1}"
                        self.issues.append(Issue("error", "structure", diag, "", path.name, number))
                        continue
                    try:
                        raw = json.loads(text)
                    except json.JSONDecodeError as exc:
                        diag = f"not JSON: {exc.msg} at column {exc.colno}"
                        self.issues.append(Issue("error", "structure", diag, "", path.name, number))
                        continue
                    if _ESCAPE.search(text) and (why := _unstorable(raw)):
                        self.issues.append(Issue("error", "structure", why, "", path.name, number))
                        continue
                    if not isinstance(raw, dict) or raw.get("resourceType") != rtype:
                        diag = f"expected a {rtype} resource in {path.name}"
                        self.issues.append(
                            Issue("error", "invalid", diag, "resourceType", path.name, number)
                        )
                        continue
                    yield raw, number, path.name

    def _index_patients(self) -> dict[str, PatientRecord]:
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
        records: dict[str, PatientRecord] = {}
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
            if ref in records:
                diag = "an earlier line holds a Patient with this id; the first is kept"
                self.issues.append(Issue("error", "duplicate", diag, "Patient.id", file, number))
                continue
            # Only the elements the model reads are kept: memory stays per patient, not per line.
            patient = Patient.model_validate({k: v for k, v in raw.items() if k in keep})
            records[ref] = PatientRecord(
                reference=ref, patient=patient, identifiers=_identifiers(raw)
            )
        return records

    def _relevant(
        self,
        records: dict[str, PatientRecord],
        rtype: str,
        codes: frozenset[str] | None,
    ) -> Iterator[tuple[Resource, str]]:
        """Validated ``rtype`` resources that carry a wanted code (any, when ``codes`` is None)
        and point at a known patient."""
        for raw, number, file in self._lines(rtype):
            if codes is not None:
                found = _raw_codes(raw)
                if found is not None and not found & codes:
                    continue
            resource, problems = _validate(raw, prefix=rtype, file=file, line=number)
            self.issues += problems
            if resource is None:
                continue
            ref = _subject(raw)
            if isinstance(ref, str) and (match := _PATIENT_REFERENCE.match(ref)):
                ref = match.group(1)  # the server's URL or a version: the same patient
            if not isinstance(ref, str) or ref not in records:
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
    ...     features_of(spec, record, as_of=now, lookback_days=365)
    >>> export.issues  # doctest: +SKIP
    """
    return NdjsonExport(Path(directory), spec, as_of=as_of, lookback_days=lookback_days)
