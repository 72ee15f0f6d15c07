"""Realistic FHIR feeds from a real cohort: each WHAS500 patient as the Bundle entries an
integration engine would send, with what the model must see and what must be reported.

Every patient gets one choice along each dimension below (seeded, so the feeds are the same on
every run). The variations are the ones hospitals send, from FHIR R4 and US Core:

- codes: LOINC as its URL, its OID (``urn:oid:2.16.840.1.113883.6.1``), the HL7 v2 mnemonic
  ``LN``, a legacy URL, or beside a local coding; conditions as SNOMED CT (URL, OID, a US
  edition URI) or ICD-10-CM (URL; OID with dotless codes);
- units: ``/min``, ``{beats}/min``, ``{Beats}/min``, a display-only ``beats per minute``,
  ``BPM``; blood pressure as separate Observations, a US Core 85354-9 panel, a 55284-4 panel,
  or in kPa;
- references: ids with relative references, Synthea's urn:uuid fullUrls with ids, urn:uuid with
  no ids at all (the Patient then gets a server-assigned id), absolute URLs;
- history: one admission; a noisy record (an earlier admission, later readings, a reading after
  as_of, an entered-in-error first reading); no Encounter at all;
- time: UTC, local offsets, effectivePeriod;
- faults: none; a vital not sent; a heart rate with a dataAbsentReason; a later heart rate in
  kg; an unconfirmed or refuted diagnosis; a resolved atrial fibrillation; and three that must
  refuse the case: a heart rate under an unknown code system, a BMI in kg, no birthDate.

What the model must see is derived here from what was sent, independently of the mapping code:
the WHAS500 row, except imputed vitals (the registry's stated medians) and kPa converted by
UCUM's definition of mm[Hg] (133.3220 Pa).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

AS_OF = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
ADMITTED = AS_OF - timedelta(hours=30)
SEED = 15
MRN_SYSTEM = "http://hospital.example/fhir/sid/mrn"
LOCAL_SYSTEM = "http://hospital.example/fhir/CodeSystem/vitals"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
UCUM = "http://unitsofmeasure.org"
#: UCUM essence: m[Hg] = 133.3220 kPa.
PA_PER_MMHG = 133.3220

#: dimension -> (choice, weight); each patient takes one choice per dimension.
DIMENSIONS: dict[str, list[tuple[str, int]]] = {
    "codes": [("loinc-url", 4), ("loinc-oid", 2), ("loinc-v2-LN", 1), ("loinc-legacy-url", 1),
              ("loinc-beside-local", 1)],
    "condition-codes": [("snomed-url", 3), ("snomed-oid", 1), ("snomed-us-edition", 1),
                        ("icd10cm-url", 2), ("icd10cm-oid-dotless", 1)],
    "hr-unit": [("ucum-/min", 3), ("ucum-{beats}/min", 1), ("ucum-{Beats}/min", 1),
                ("display-beats-per-minute", 1), ("code-BPM", 1)],
    "bp": [("separate", 3), ("panel-85354-9", 2), ("panel-55284-4", 1), ("kPa", 1)],
    "references": [("relative-ids", 3), ("urn-uuid-with-ids", 2), ("urn-uuid-no-ids", 2),
                   ("absolute-urls", 1)],
    "history": [("one-admission", 5), ("noisy-history", 3), ("no-encounter", 1)],
    "time": [("utc", 3), ("offsets", 1), ("effective-period", 1)],
    "fault": [("none", 30), ("hr-not-sent", 2), ("bmi-not-sent", 2), ("hr-data-absent", 2),
              ("hr-later-in-kg", 2), ("unconfirmed-diagnosis", 2), ("refuted-diagnosis", 1),
              ("resolved-af", 2), ("hr-unknown-system", 1), ("bmi-in-kg", 1),
              ("no-birthdate", 1)],
}  # fmt: skip

VITALS = {
    "heart_rate": ("8867-4", "Heart rate"),
    "systolic_bp": ("8480-6", "Systolic blood pressure"),
    "diastolic_bp": ("8462-4", "Diastolic blood pressure"),
    "bmi": ("39156-5", "Body mass index (BMI) [Ratio]"),
}


@dataclass
class PatientFeed:
    """One patient's entries, and what the FHIR path must make of them."""

    index: int
    choices: dict[str, str]
    entries: list[dict[str, Any]]
    #: The identifier every patient carries (MRN).
    identifier: tuple[str, str]
    #: ``Patient/<id>`` when the feed gives one; None when the server must assign it.
    subject: str | None
    #: The features the model must see (None when the case must be refused).
    expected: dict[str, float] | None
    #: (feature, fragment of the reason) when the case must be refused.
    refusal: tuple[str, str] | None = None
    imputed: set[str] = field(default_factory=set)
    #: Citations of the sent resources that must be reported as ignored.
    ignored: set[str] = field(default_factory=set)
    flagged: set[str] = field(default_factory=set)
    #: Every citation of a sent resource (what a basis reference may be).
    citations: set[str] = field(default_factory=set)
    notes: int = 0


def _pick(rng: random.Random, options: list[tuple[str, int]]) -> str:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


class _Writer:
    """Builds one patient's entries in one reference style."""

    def __init__(self, index: int, style: str, rng: random.Random) -> None:
        self.index, self.style, self.rng = index, style, rng
        self.entries: list[dict[str, Any]] = []
        self.citations: set[str] = set()
        self.patient_ref = ""
        self.count = 0

    def add(self, resource: dict[str, Any], *, kind: str) -> str:
        """Add ``resource``; return how the server must cite it."""
        self.count += 1
        rid = (
            f"p{self.index}"
            if kind == "Patient"
            else f"{kind[:3].lower()}{self.index}-{self.count}"
        )
        urn = f"urn:uuid:{uuid.UUID(int=self.rng.getrandbits(128), version=4)}"
        entry: dict[str, Any] = {"request": {"method": "POST", "url": kind}}
        if self.style == "relative-ids":
            resource["id"], entry["fullUrl"] = rid, urn
            cite, ref = f"{kind}/{rid}", f"{kind}/{rid}"
        elif self.style == "urn-uuid-with-ids":
            resource["id"], entry["fullUrl"] = rid, urn
            cite, ref = f"{kind}/{rid}", urn
        elif self.style == "urn-uuid-no-ids":
            entry["fullUrl"] = urn
            cite, ref = urn, urn
        else:  # absolute-urls
            resource["id"] = rid
            entry["fullUrl"] = f"https://ehr.example/fhir/{kind}/{rid}"
            cite, ref = f"{kind}/{rid}", entry["fullUrl"]
        if kind != "Patient":
            resource["subject"] = {"reference": self.patient_ref}
        entry["resource"] = {"resourceType": kind, **resource}
        self.entries.append(entry)
        self.citations.add(cite)
        if kind == "Patient":
            self.patient_ref = ref
        return cite


def _when(at: datetime, style: str, rng: random.Random) -> dict[str, Any]:
    if style == "effective-period":
        end = at + timedelta(minutes=5)
        return {"effectivePeriod": {"start": at.isoformat(), "end": end.isoformat()}}
    if style == "offsets":
        offset = timedelta(hours=rng.choice([-5, 2, 9]))
        return {"effectiveDateTime": at.astimezone(timezone(offset)).isoformat()}
    return {"effectiveDateTime": at.isoformat()}


def _loinc_coding(code: str, display: str, style: str) -> list[dict[str, Any]]:
    system = {
        "loinc-url": LOINC,
        "loinc-oid": "urn:oid:2.16.840.1.113883.6.1",
        "loinc-v2-LN": "LN",
        "loinc-legacy-url": "http://loinc.org/",
        "loinc-beside-local": LOINC,
    }[style]
    coding = [{"system": system, "code": code, "display": display}]
    if style == "loinc-beside-local":
        coding.insert(0, {"system": LOCAL_SYSTEM, "code": f"V-{code[:4]}", "display": display})
    return coding


def _quantity(value: float, unit_style: str) -> dict[str, Any]:
    if unit_style == "display-beats-per-minute":
        return {"value": value, "unit": "beats per minute"}
    if unit_style == "code-BPM":
        return {"value": value, "unit": "BPM", "system": UCUM, "code": "BPM"}
    code = unit_style.removeprefix("ucum-")
    return {"value": value, "unit": "beats/minute", "system": UCUM, "code": code}


def _ucum(value: float, code: str, display: str | None = None) -> dict[str, Any]:
    return {"value": value, "unit": display or code, "system": UCUM, "code": code}


def feed(
    index: int,
    row: dict[str, float],
    *,
    spec: Any,
    flag_bounds: dict[str, tuple[float, float]],
    force_ids: bool = False,
) -> PatientFeed:
    """The entries for WHAS500 patient ``index`` (``row``: its features by name)."""
    rng = random.Random(SEED * 1_000_003 + index)
    choices = {dim: _pick(rng, opts) for dim, opts in DIMENSIONS.items()}
    if force_ids:
        choices["references"] = "relative-ids"
    if choices["fault"] == "resolved-af" and row["atrial_fibrillation"] == 1:
        choices["fault"] = "none"
    if choices["fault"] == "unconfirmed-diagnosis" and row["heart_failure"] == 1:
        choices["fault"] = "none"
    if choices["fault"] == "refuted-diagnosis" and row["cardiogenic_shock"] == 1:
        choices["fault"] = "none"
    fault, history, time_style = choices["fault"], choices["history"], choices["time"]
    missing = {f.name: f.missing for f in spec.inputs}
    w = _Writer(index, choices["references"], rng)
    expected = dict(row)
    out = PatientFeed(index, choices, w.entries, (MRN_SYSTEM, f"MRN{100000 + index}"), None, None)

    # Patient: birthDate k days before the age-th anniversary, so completed years = age.
    age = int(row["age"])
    born = date(AS_OF.year - age, AS_OF.month, AS_OF.day) - timedelta(days=rng.randint(1, 360))
    patient: dict[str, Any] = {
        "identifier": [{"system": MRN_SYSTEM, "value": out.identifier[1]}],
        "gender": "female" if row["female"] == 1 else "male",
    }
    if fault != "no-birthdate":
        patient["birthDate"] = born.isoformat()
    else:
        out.refusal = ("age", "Patient.birthDate is absent; the model rejects a missing value")
    w.add(patient, kind="Patient")
    if choices["references"] != "urn-uuid-no-ids":
        out.subject = f"Patient/p{index}"

    # Encounters.
    if history != "no-encounter":
        w.add(
            {
                "status": "in-progress",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                          "code": rng.choice(["IMP", "EMER"])},
                "period": {"start": ADMITTED.isoformat()},
            },
            kind="Encounter",
        )  # fmt: skip
    else:
        out.notes = 3  # heart rate, systolic, diastolic read the look-back instead
    if history == "noisy-history":
        earlier = ADMITTED - timedelta(days=200)
        w.add(
            {
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                          "code": "IMP"},
                "period": {"start": earlier.isoformat(),
                           "end": (earlier + timedelta(days=4)).isoformat()},
            },
            kind="Encounter",
        )  # fmt: skip

    def observation(code_name: str, at: datetime, value: dict[str, Any], **extra: Any) -> str:
        code, display = VITALS[code_name]
        coding = _loinc_coding(code, display, choices["codes"])
        if fault == "hr-unknown-system" and code_name == "heart_rate":
            coding = [{"system": LOCAL_SYSTEM, "code": code, "display": display}]
        resource = {
            "status": extra.pop("status", "final"),
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": coding},
            **_when(at, time_style, rng),
            **value,
            **extra,
        }  # fmt: skip
        return w.add(resource, kind="Observation")

    first = ADMITTED + timedelta(minutes=20)
    hr_sent = fault not in ("hr-not-sent", "hr-data-absent")

    # Heart rate: the first reading of the admission is the row's value.
    if history == "noisy-history":
        observation(
            "heart_rate", first - timedelta(days=200), {"valueQuantity": _quantity(71, "ucum-/min")}
        )
        cite = observation(
            "heart_rate", first - timedelta(minutes=15),
            {"valueQuantity": _quantity(250, "ucum-/min")}, status="entered-in-error",
        )  # fmt: skip
        out.ignored.add(cite)
    if hr_sent:
        hr = observation(
            "heart_rate", first, {"valueQuantity": _quantity(row["heart_rate"], choices["hr-unit"])}
        )
        if fault == "hr-unknown-system":
            out.ignored.add(hr)
            out.refusal = ("heart_rate", f"'{LOCAL_SYSTEM}', not a known spelling of LOINC")
    if fault == "hr-data-absent":
        cite = observation(
            "heart_rate", first,
            {"dataAbsentReason": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                                              "code": "not-performed"}]}},
        )  # fmt: skip
        out.ignored.add(cite)
    if fault == "hr-later-in-kg":
        out.ignored.add(
            observation(
                "heart_rate", first + timedelta(hours=6), {"valueQuantity": _ucum(70, "kg")}
            )
        )
    if history == "noisy-history":
        later = observation("heart_rate", first + timedelta(hours=3), {"valueQuantity": _quantity(row["heart_rate"] + 7, "ucum-/min")})  # fmt: skip
        observation(
            "heart_rate", AS_OF + timedelta(hours=2), {"valueQuantity": _quantity(99, "ucum-/min")}
        )
        if fault == "hr-unknown-system":
            out.ignored.add(later)
    if not hr_sent:
        if history == "noisy-history":  # what was sent: the admission's first usable reading
            expected["heart_rate"] = row["heart_rate"] + 7
        else:
            expected["heart_rate"] = float(missing["heart_rate"])
            out.imputed.add("heart_rate")

    # Blood pressure.
    def bp(at: datetime, systolic: float, diastolic: float) -> None:
        if choices["bp"] == "kPa":
            sent = {"systolic_bp": round(systolic * PA_PER_MMHG / 1000, 4),
                    "diastolic_bp": round(diastolic * PA_PER_MMHG / 1000, 4)}  # fmt: skip
            for name in sent:
                observation(name, at, {"valueQuantity": _ucum(sent[name], "kPa")})
            if at == first:
                for name in sent:
                    expected[name] = sent[name] * 1000 / PA_PER_MMHG
            return
        if choices["bp"] == "separate":
            observation("systolic_bp", at, {"valueQuantity": _ucum(systolic, "mm[Hg]", "mmHg")})
            observation("diastolic_bp", at, {"valueQuantity": _ucum(diastolic, "mm[Hg]", "mmHg")})
            return
        panel = choices["bp"].removeprefix("panel-")
        components = [
            {"code": {"coding": _loinc_coding(*VITALS[name], choices["codes"])},
             "valueQuantity": _ucum(value, "mm[Hg]", "mmHg")}
            for name, value in (("systolic_bp", systolic), ("diastolic_bp", diastolic))
        ]  # fmt: skip
        resource = {
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": panel, "display": "Blood pressure panel"}]},
            **_when(at, time_style, rng),
            "component": components,
        }  # fmt: skip
        w.add(resource, kind="Observation")

    if history == "noisy-history":
        bp(first - timedelta(days=200), 118, 72)
    bp(first, row["systolic_bp"], row["diastolic_bp"])
    if history == "noisy-history":
        bp(first + timedelta(hours=4), row["systolic_bp"] - 9, row["diastolic_bp"] - 4)

    # BMI: the latest in the look-back.
    if history == "noisy-history":
        observation(
            "bmi", first - timedelta(days=200), {"valueQuantity": _ucum(row["bmi"] + 1.5, "kg/m2")}
        )
        observation(
            "bmi", AS_OF + timedelta(days=1), {"valueQuantity": _ucum(row["bmi"] - 2, "kg/m2")}
        )
    if fault == "bmi-not-sent":
        if history == "noisy-history":  # the latest sent is the earlier admission's
            expected["bmi"] = row["bmi"] + 1.5
        else:
            expected["bmi"] = float(missing["bmi"])
            out.imputed.add("bmi")
    elif fault == "bmi-in-kg":
        out.ignored.add(
            observation(
                "bmi", first + timedelta(minutes=40), {"valueQuantity": _ucum(row["bmi"] * 3, "kg")}
            )
        )
        out.refusal = ("bmi", "unit 'kg' ([mass]) cannot be converted to 'kg/m2'")
    else:
        observation(
            "bmi",
            first + timedelta(minutes=40),
            {"valueQuantity": _ucum(row["bmi"], "kg/m2", "kg/m^2")},
        )

    # Conditions.
    ver = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
    clin = "http://terminology.hl7.org/CodeSystem/condition-clinical"

    def condition(name: str, *, status: str = "active", verification: str = "confirmed",
                  abated: datetime | None = None, onset: datetime | None = None) -> str:  # fmt: skip
        source = next(f.source for f in spec.inputs if f.name == name)
        codes = source["codes"]
        style = choices["condition-codes"]
        icd = [c for c in codes if c["system"] == ICD10CM]
        if style.startswith("icd10cm") and icd:
            chosen = rng.choice(icd)
            system = ICD10CM if style == "icd10cm-url" else "urn:oid:2.16.840.1.113883.6.90"
            code = chosen["code"] if style == "icd10cm-url" else chosen["code"].replace(".", "")
        else:
            chosen = rng.choice([c for c in codes if c["system"] == SNOMED])
            system = {"snomed-oid": "urn:oid:2.16.840.1.113883.6.96",
                      "snomed-us-edition": "http://snomed.info/sct/731000124108"}.get(style, SNOMED)  # fmt: skip
            code = chosen["code"]
        resource: dict[str, Any] = {
            "clinicalStatus": {"coding": [{"system": clin, "code": status}]},
            "verificationStatus": {"coding": [{"system": ver, "code": verification}]},
            "code": {"coding": [{"system": system, "code": code, "display": chosen["display"]}]},
            "onsetDateTime": (onset or ADMITTED - timedelta(days=rng.randint(0, 3000))).isoformat(),
        }
        if abated is not None:
            resource["abatementDateTime"] = abated.isoformat()
        return w.add(resource, kind="Condition")

    for name in ("heart_failure", "atrial_fibrillation", "complete_heart_block",
                 "cardiogenic_shock", "q_wave_mi"):  # fmt: skip
        if row[name] == 1:
            condition(name, onset=ADMITTED + timedelta(hours=rng.randint(0, 20)))
    for name in ("cardiovascular_history", "recurrent_mi"):
        if row[name] == 1:
            # History counts resolved or not ("ever").
            if rng.random() < 0.5:
                onset = ADMITTED - timedelta(days=rng.randint(400, 4000))
                condition(name, status="resolved", onset=onset, abated=onset + timedelta(days=30))
            else:
                condition(name)
    if fault == "resolved-af":
        onset = ADMITTED - timedelta(days=800)
        condition(
            "atrial_fibrillation", status="resolved", onset=onset, abated=onset + timedelta(days=9)
        )
    if fault == "unconfirmed-diagnosis":
        out.ignored.add(condition("heart_failure", verification="provisional"))
    if fault == "refuted-diagnosis":
        out.ignored.add(condition("cardiogenic_shock", verification="refuted"))

    if out.refusal is None:
        out.expected = expected
        for name, (low, high) in flag_bounds.items():
            if name not in out.imputed and not low <= expected[name] <= high:
                out.flagged.add(name)
    out.citations = set(w.citations)
    return out
