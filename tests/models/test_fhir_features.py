"""FHIR → whas500 features: the shared Synthea bundles and bulk export, each rule on hand-made
resources, and malformed input reported as OperationOutcome issues."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.operationoutcome import OperationOutcome

from models.cases.registry import FeatureSpec, ModelSpec, Registry
from models.fhir.features import (
    FeatureResult,
    FhirInputError,
    Issue,
    PatientRecord,
    UnitError,
    convert_quantity,
    features_for,
    features_of,
    iter_ndjson,
    parse_bundle,
)
from tests.helpers import SHARED_DIR, require_shared

SPEC = Registry.load().resolve("whas500-mortality")
FHIR_DIR = SHARED_DIR / "data" / "fhir"
AS_OF = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"

#: The shared bundles, with their Observation and Condition counts from data/fhir/SOURCE.md.
BUNDLES = {
    "Alva958_Dickinson688_742fc10a-c565-f636-3c05-5dcd28672194.json": (156, 1),
    "Bobbye345_Harris789_52604a6b-c99e-9116-b9a0-937b58032f7c.json": (178, 1),
    "Georgianne697_Jerde200_ebf0d007-a52f-5364-5c32-2ba094b88f16.json": (213, 3),
    "Lanell756_Goodwin327_988f3282-6014-affe-fb17-b051fe0380ee.json": (326, 2),
}
VITALS = ("heart_rate", "systolic_bp", "diastolic_bp", "bmi")


# --- hand-made resources ----------------------------------------------------------------------


def _ago(days: float) -> str:
    return (AS_OF - timedelta(days=days)).isoformat()


def patient(pid: str = "p1", **elements: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, **elements}


def quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}


def observation(
    oid: str,
    code: str,
    value: float | None = None,
    unit: str = "/min",
    *,
    days_ago: float = 1,
    subject: str = "Patient/p1",
    **extra: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": subject},
        "effectiveDateTime": _ago(days_ago),
    }
    if value is not None:
        out["valueQuantity"] = quantity(value, unit)
    return {**out, **extra}


def bp_panel(oid: str, systolic: float, diastolic: float, *, days_ago: float = 1) -> dict[str, Any]:
    components = [
        {"code": {"coding": [{"system": LOINC, "code": c}]}, "valueQuantity": quantity(v, "mm[Hg]")}
        for c, v in (("8480-6", systolic), ("8462-4", diastolic))
    ]
    return observation(oid, "85354-9", days_ago=days_ago, component=components)


def condition(
    cid: str,
    code: str,
    *,
    status: str = "active",
    onset_days_ago: float = 100,
    subject: str = "Patient/p1",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": status,
                }
            ]
        },
        "code": {"coding": [{"system": SNOMED, "code": code}]},
        "subject": {"reference": subject},
        "onsetDateTime": _ago(onset_days_ago),
        **extra,
    }


def bundle(*resources: dict[str, Any], kind: str = "collection") -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [{"resource": r} for r in resources],
    }


ADULT = patient(birthDate="1950-06-15", gender="male")


def features(*resources: dict[str, Any], lookback_days: int = 365, spec: ModelSpec = SPEC):
    """Parse ``resources`` as a Bundle and compute the only patient's features."""
    record = _only(parse_bundle(bundle(*resources)).patients)
    return features_of(spec, record, as_of=AS_OF, lookback_days=lookback_days)


def _only(patients: dict[str, PatientRecord]) -> PatientRecord:
    assert len(patients) == 1
    return next(iter(patients.values()))


def lab_spec(*inputs: FeatureSpec) -> ModelSpec:
    return ModelSpec(
        name="lab-test",
        version="0",
        architecture="none",
        artifact=Path("none"),
        sha256="0" * 64,
        inputs=inputs,
        output="",
        threshold=0.5,
    )


# --- the shared Synthea data ------------------------------------------------------------------


def _independent_age(birth: str, at: date) -> int:
    born = date.fromisoformat(birth)
    return at.year - born.year - (1 if (at.month, at.day) < (born.month, born.day) else 0)


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_every_shared_bundle_parses_and_gives_whas500_features(name: str) -> None:
    """Each Synthea transaction Bundle: one patient, all its resources, a full feature set."""
    raw = json.loads(require_shared(FHIR_DIR / "bundles" / name).read_text())
    parsed = parse_bundle(raw)
    assert parsed.type == "transaction" and parsed.issues == []
    record = _only(parsed.patients)
    assert (len(record.observations), len(record.conditions)) == BUNDLES[name]
    assert parsed.ignored["Claim"] > 0 and "Observation" not in parsed.ignored
    assert "Encounter" not in parsed.ignored and record.encounters  # read for admissions

    as_of = datetime(2021, 10, 15, tzinfo=UTC)  # the bundles were exported then (SOURCE.md)
    result = features_of(SPEC, record, as_of=as_of, lookback_days=3650)
    assert result.ok, result.problems
    assert set(result.features) == SPEC.feature_set
    source = raw["entry"][0]["resource"]
    assert result.features["age"] == _independent_age(source["birthDate"], as_of.date())
    assert result.features["female"] == {"female": 1.0, "male": 0.0}[source["gender"]]
    # These Synthea-HIV bundles code vitals with OpenMRS concept ids ("5085AAAA...") under the
    # LOINC system, so no LOINC vital is there: all four are imputed with the schema's values.
    assert result.imputed == list(VITALS)
    assert all(
        result.features[v] == SPEC.inputs[SPEC.feature_names.index(v)].missing for v in VITALS
    )
    # Each imputation is reported with the schema's source, and nothing was silently dropped:
    # an OpenMRS code under the LOINC system is no LOINC code of the schema, so not a near miss.
    assert [i["feature"] for i in result.imputations] == list(VITALS)
    assert all("training" in i["source"] for i in result.imputations)
    assert result.basis[0] == record.reference


def test_shared_bundle_coronary_heart_disease_counts_as_cardiovascular_history() -> None:
    """Lanell's active 53741008 Coronary Heart Disease sets cardiovascular_history, with its id."""
    name = "Lanell756_Goodwin327_988f3282-6014-affe-fb17-b051fe0380ee.json"
    record = _only(
        parse_bundle(json.loads(require_shared(FHIR_DIR / "bundles" / name).read_text())).patients
    )
    chd = [c for c in record.conditions if c.code.coding[0].code == "53741008"]
    result = features_of(SPEC, record, as_of=AS_OF, lookback_days=365)
    assert result.features["cardiovascular_history"] == 1.0
    assert record.cite(chd[0]) in result.basis
    # Before its onset (2001-08-13) it did not count yet.
    before = features_of(SPEC, record, as_of=datetime(2001, 8, 1, tzinfo=UTC), lookback_days=365)
    assert before.features["cardiovascular_history"] == 0.0


def _raw_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _expected_bp_and_bmi(ndjson: Path, ref: str, as_of: datetime, days: int) -> dict[str, float]:
    """An independent reading of the raw JSON under docs/fhir.md's rules: systolic/diastolic
    are the first BP panel components of the latest admission (IMP/EMER/... Encounter begun in
    the look-back), or of the whole look-back when there is none; BMI the latest in the look-back."""
    start = as_of - timedelta(days=days)
    admissions = [
        datetime.fromisoformat(e["period"]["start"])
        for e in _raw_lines(ndjson / "Encounter.ndjson")
        if e["subject"]["reference"] == ref
        and e["class"]["code"] in ("IMP", "ACUTE", "NONAC", "EMER", "OBSENC", "SS")
        and start <= datetime.fromisoformat(e["period"]["start"]) <= as_of
    ]
    bp_start, bp_end = start, as_of
    if admissions:
        began = max(admissions)
        enc = next(
            e
            for e in _raw_lines(ndjson / "Encounter.ndjson")
            if e["subject"]["reference"] == ref
            and datetime.fromisoformat(e["period"]["start"]) == began
        )
        ended = enc["period"].get("end")
        bp_start = began
        bp_end = min(datetime.fromisoformat(ended), as_of) if ended else as_of
    found: dict[str, float] = {}
    chosen: dict[str, datetime] = {}
    for obs in _raw_lines(ndjson / "Observation.ndjson"):
        when = datetime.fromisoformat(obs["effectiveDateTime"])
        if obs["subject"]["reference"] != ref:
            continue
        code = obs["code"]["coding"][0]["code"]
        if code == "55284-4" and bp_start <= when <= bp_end:
            for comp in obs["component"]:
                name = {"8480-6": "systolic_bp", "8462-4": "diastolic_bp"}[
                    comp["code"]["coding"][0]["code"]
                ]
                if name not in chosen or when < chosen[name]:
                    chosen[name], found[name] = when, comp["valueQuantity"]["value"]
        elif (
            code == "39156-5"
            and start <= when <= as_of
            and ("bmi" not in chosen or when > chosen["bmi"])
        ):
            chosen["bmi"], found["bmi"] = when, obs["valueQuantity"]["value"]
    return found


def test_shared_ndjson_export_gives_whas500_features_for_all_nine_patients() -> None:
    """The bulk export: 9 patients, BP from the panel components and BMI as read from the raw
    JSON, no LOINC heart rate anywhere (imputed), and the same result as on every resource."""
    ndjson = require_shared(FHIR_DIR / "ndjson" / "Patient.ndjson").parent
    as_of, days = datetime(2020, 1, 1, tzinfo=UTC), 5 * 365
    export = iter_ndjson(ndjson, SPEC, as_of=as_of, lookback_days=days)
    records = list(export)
    assert export.issues == []
    assert dict(export.lines) == {
        "Patient": 9,
        "Encounter": 217,
        "Observation": 1502,
        "Condition": 71,
    }
    assert len(records) == 9

    everything = parse_bundle(
        bundle(
            *_raw_lines(ndjson / "Patient.ndjson"),
            *_raw_lines(ndjson / "Encounter.ndjson"),
            *_raw_lines(ndjson / "Observation.ndjson"),
            *_raw_lines(ndjson / "Condition.ndjson"),
        )
    ).patients
    with_vitals = 0
    for record in records:
        result = features_of(SPEC, record, as_of=as_of, lookback_days=days)
        assert result.ok, result.problems
        assert set(result.features) == SPEC.feature_set
        assert "heart_rate" in result.imputed
        expected = _expected_bp_and_bmi(ndjson, record.reference, as_of, days)
        for name, value in expected.items():
            assert result.features[name] == pytest.approx(value)
        with_vitals += bool(expected)
        # The export keeps one resource per feature, yet gives what all the resources give.
        assert len(record.observations) <= 2  # the BP panel and BMI (no heart rate)
        reference = features_of(SPEC, everything[record.reference], as_of=as_of, lookback_days=days)
        assert result == reference
    assert with_vitals == 6  # the three others died before 2015


def test_shared_ndjson_history_of_mi_sets_recurrent_mi_only() -> None:
    """399211009 History of myocardial infarction feeds recurrent_mi, and no longer also the
    cardiovascular-history feature (in WHAS500 23 of 171 patients with an earlier MI have cvd 0)."""
    ndjson = require_shared(FHIR_DIR / "ndjson" / "Patient.ndjson").parent
    history = [
        c
        for c in _raw_lines(ndjson / "Condition.ndjson")
        if c["code"]["coding"][0]["code"] == "399211009"
    ]
    assert len(history) == 1
    export = iter_ndjson(ndjson, SPEC, as_of=AS_OF, lookback_days=365)
    record = next(r for r in export if r.reference == history[0]["subject"]["reference"])
    result = features_of(SPEC, record, as_of=AS_OF, lookback_days=365)
    assert result.features["recurrent_mi"] == 1.0
    assert f"Condition/{history[0]['id']}" in result.basis
    alone = features(ADULT, condition("h", "399211009"))
    assert (alone.features["recurrent_mi"], alone.features["cardiovascular_history"]) == (1, 0)


# --- observation rules ------------------------------------------------------------------------


def encounter(eid: str, start_days_ago: float, end_days_ago: float | None = None, cls: str = "IMP"):
    period = {"start": _ago(start_days_ago)}
    if end_days_ago is not None:
        period["end"] = _ago(end_days_ago)
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "in-progress" if end_days_ago is None else "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": cls},
        "subject": {"reference": "Patient/p1"},
        "period": period,
    }


def test_the_initial_heart_rate_is_the_first_of_the_admission() -> None:
    """heart_rate is 'first' in the admission Encounter: older readings (before it) and later
    ones (in it) do not count; a clinic visit after it is not an admission."""
    readings = (
        observation("hr-before", "8867-4", 60, days_ago=20),
        observation("hr-first", "8867-4", 110, days_ago=3),
        observation("hr-later", "8867-4", 90, days_ago=2),
    )
    result = features(ADULT, encounter("adm", 3.5), encounter("visit", 1, 0.9, "AMB"), *readings)
    assert result.features["heart_rate"] == 110
    assert "Observation/hr-first" in result.basis and "Observation/hr-later" not in result.basis
    assert result.notes == []
    # Without an admission, the look-back window is read instead, and that is said.
    fallback = features(ADULT, *readings)
    assert fallback.features["heart_rate"] == 60
    assert any("look-back window was read instead" in n for n in fallback.notes)


def test_bmi_is_the_latest_in_the_look_back() -> None:
    """bmi is 'latest' in the look-back window, admission or not."""
    result = features(
        ADULT,
        encounter("adm", 3.5),
        observation("bmi-old", "39156-5", 31, "kg/m2", days_ago=200),
        observation("bmi-new", "39156-5", 29, "kg/m2", days_ago=30),
    )
    assert result.features["bmi"] == 29 and "Observation/bmi-new" in result.basis


def test_observations_outside_the_window_are_ignored() -> None:
    """Too old (before the look-back) or after as_of: not used, so the value is imputed."""
    result = features(
        ADULT,
        observation("hr-too-old", "8867-4", 70, days_ago=400),
        observation("hr-future", "8867-4", 100, days_ago=-1),
        lookback_days=365,
    )
    assert result.features["heart_rate"] == 84.5 and "heart_rate" in result.imputed
    assert result.basis == ["Patient/p1"]
    wider = features(
        ADULT, observation("hr-too-old", "8867-4", 70, days_ago=400), lookback_days=500
    )
    assert wider.features["heart_rate"] == 70


def test_unusable_observation_status_is_ignored_and_reported() -> None:
    """An entered-in-error first reading does not count, and is listed with its reason."""
    result = features(
        ADULT,
        encounter("adm", 10),
        observation("hr-error", "8867-4", 150, days_ago=6, status="entered-in-error"),
        observation("hr-final", "8867-4", 70, days_ago=5),
    )
    assert result.features["heart_rate"] == 70 and result.ok
    assert result.ignored == [
        {
            "feature": "heart_rate",
            "resource": "Observation/hr-error",
            "reason": "status entered-in-error: not a result",
        }
    ]


def test_blood_pressure_comes_from_the_panel_components() -> None:
    """Systolic and diastolic are the 8480-6 / 8462-4 components of the admission's first panel."""
    result = features(
        ADULT,
        encounter("adm", 2),
        bp_panel("bp-1", 150, 95, days_ago=30),
        bp_panel("bp-2", 121, 81),
    )
    assert (result.features["systolic_bp"], result.features["diastolic_bp"]) == (121, 81)
    assert result.basis == ["Patient/p1", "Observation/bp-2"]
    standalone = features(ADULT, observation("sbp", "8480-6", 133, "mmHg"))
    assert standalone.features["systolic_bp"] == 133  # mmHg is an alias of mm[Hg]


#: Glucose in mg/dL, from LOINC 2345-7 (serum/plasma) or 14749-6 (its mmol/L code).
GLUCOSE = FeatureSpec(
    "glucose",
    "mg/dL",
    source={"resource": "Observation", "system": LOINC, "codes": ["2345-7", "14749-6"]},
    missing="reject",
)


def test_units_convert_through_the_table() -> None:
    """Glucose mmol/L → mg/dL (x 18.016), °F → Cel, creatinine mg/dL → µmol/L, rate aliases."""
    spec = lab_spec(
        GLUCOSE,
        FeatureSpec(
            "temperature",
            "Cel",
            source={"resource": "Observation", "system": LOINC, "codes": ["8310-5"]},
            missing="reject",
        ),
        FeatureSpec(
            "heart_rate",
            "/min",
            source={"resource": "Observation", "system": LOINC, "codes": ["8867-4"]},
            missing="reject",
        ),
    )
    result = features(
        ADULT,
        observation("glu", "14749-6", 5.5, "mmol/L"),
        observation("temp", "8310-5", 98.6, "[degF]"),
        observation("hr", "8867-4", 72, "{beats}/min"),
        spec=spec,
    )
    assert result.ok, result.problems
    assert result.features["glucose"] == pytest.approx(5.5 * 18.016)
    assert result.features["temperature"] == pytest.approx(37.0)
    assert result.features["heart_rate"] == 72
    assert convert_quantity(1.0, "mg/dL", "umol/L", code="2160-0") == pytest.approx(1e4 / 113.12)
    assert convert_quantity(100.0, "mg/dl", "mmol/L", code="2345-7") == pytest.approx(100 / 18.016)
    assert convert_quantity(37.0, "Cel", "[degF]") == pytest.approx(98.6)
    with pytest.raises(
        UnitError, match=r"'mmol/L' \(\[substance\].*\) cannot be converted to 'mg/dL'"
    ):
        convert_quantity(5.5, "mmol/L", "mg/dL", code="2947-0")  # sodium: no factor known


def test_the_molar_mass_is_the_matched_loinc_codes_wherever_it_is_sent() -> None:
    """Epic sends its own code first and LOINC second; a chemistry panel carries glucose as a
    component. The molar mass comes from the LOINC code that matched, not from the first coding
    of the Observation (a local code, or the panel's)."""
    spec = lab_spec(GLUCOSE)
    local_first = observation("glu", "14749-6", 5.5, "mmol/L")
    local_first["code"]["coding"].insert(0, {"system": "urn:oid:1.2.840.114350", "code": "1558"})
    panel = observation(
        "bmp",
        "51990-0",
        component=[
            {
                "code": {
                    "coding": [{"system": "urn:oid:2.16.840.1.113883.6.1", "code": "14749-6"}]
                },
                "valueQuantity": quantity(5.5, "mmol/L"),
            }
        ],
    )
    for sent in (local_first, panel):
        result = features(ADULT, sent, spec=spec)
        assert result.ok, result.problems
        assert result.features["glucose"] == pytest.approx(5.5 * 18.016)


def test_an_unconvertible_unit_is_a_problem_naming_the_unit() -> None:
    """BMI reported in kg cannot become kg/m2: the feature is rejected, the unit is named."""
    result = features(ADULT, observation("bmi-kg", "39156-5", 80, "kg"))
    assert "bmi" not in result.features and "bmi" not in result.imputed
    assert "'kg'" in result.problems["bmi"] and "'kg/m2'" in result.problems["bmi"]
    assert "Observation/bmi-kg" in result.problems["bmi"]


def test_an_implausible_value_is_a_problem() -> None:
    """A heart rate of 400/min is outside the schema's range 20..300: rejected, not clipped."""
    result = features(ADULT, observation("hr", "8867-4", 400))
    assert "outside the plausible range" in result.problems["heart_rate"]
    assert not result.ok


# --- patient rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("birth", "age"),
    [("1950-01-01", 74), ("1950-01-02", 73), ("1949-12-31", 74), ("1950", 74), ("1950-06", 73)],
)
def test_age_is_completed_years_at_as_of(birth: str, age: int) -> None:
    """Age counts birthdays reached by as_of (2024-01-01); a partial date starts its period."""
    result = features(patient(birthDate=birth, gender="female"))
    assert result.features["age"] == age and result.features["female"] == 1.0


def test_missing_age_rejects_and_missing_vitals_are_imputed() -> None:
    """No birthDate: age is a problem (the schema says reject); no vitals: each one imputed."""
    result = features(patient(gender="female"))
    assert "age" not in result.features
    assert "reject" in result.problems["age"] and "birthDate" in result.problems["age"]
    assert result.imputed == list(VITALS)
    assert result.features["heart_rate"] == 84.5 and result.features["bmi"] == 26.06
    assert result.features["heart_failure"] == 0.0 and "heart_failure" not in result.imputed


def test_gender_without_a_mapping_is_a_problem() -> None:
    """'other' is not in the schema's map {female, male}: rejected, not guessed."""
    result = features(patient(birthDate="1950-01-01", gender="other"))
    assert "no mapping" in result.problems["female"]
    assert "other" not in result.problems["female"]  # the patient's value is not repeated


def test_as_of_must_be_timezone_aware() -> None:
    """A naive as_of is ambiguous against FHIR's offset-carrying times."""
    record = _only(parse_bundle(bundle(ADULT)).patients)
    with pytest.raises(ValueError, match="timezone"):
        features_for(SPEC, record.patient, [], [], as_of=datetime(2024, 1, 1), lookback_days=1)


# --- condition rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "present"),
    [
        ({}, True),
        ({"status": "resolved"}, False),
        ({"status": "resolved", "abatementDateTime": _ago(10)}, False),
        ({"status": "resolved", "abatementDateTime": _ago(-10)}, True),  # resolved after as_of
        ({"status": "inactive"}, False),
        ({"onset_days_ago": -5}, False),  # begins after as_of
        (
            {
                "verificationStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                            "code": "entered-in-error",
                        }
                    ]
                }
            },
            False,
        ),
    ],
)
def test_condition_presence_at_as_of(extra: dict[str, Any], present: bool) -> None:
    """Atrial fibrillation counts if verified, begun and not abated/resolved by as_of."""
    result = features(ADULT, condition("af", "49436004", **extra))
    assert result.features["atrial_fibrillation"] == float(present)
    assert ("Condition/af" in result.basis) is present
    assert "atrial_fibrillation" not in result.imputed


def test_a_condition_with_another_code_does_not_count() -> None:
    """Acute MI 22298006 is none of the whas500 codes (recurrent_mi needs a history code)."""
    result = features(ADULT, condition("mi", "22298006"))
    assert result.features["recurrent_mi"] == 0.0 and result.basis == ["Patient/p1"]


# --- bundles: references and malformed input ------------------------------------------------


def test_transaction_references_by_full_url_and_absolute_url() -> None:
    """urn:uuid fullUrls, relative and absolute references all reach the right patient."""
    data = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:aaa", "resource": patient("a", birthDate="1950-01-01")},
            {"fullUrl": "https://ehr.example/fhir/Patient/b", "resource": patient("b")},
            {"resource": observation("o1", "8867-4", 60, subject="urn:uuid:aaa")},
            {"resource": observation("o2", "8867-4", 61, subject="Patient/a")},
            {
                "resource": observation(
                    "o3", "8867-4", 62, subject="https://ehr.example/fhir/Patient/b"
                )
            },
            {"resource": observation("o4", "8867-4", 63, subject="Patient/b")},
            {"resource": observation("o5", "8867-4", 64, subject="Location/ward-1")},
        ],
    }
    parsed = parse_bundle(data)
    assert [o.id for o in parsed.patients["Patient/a"].observations] == ["o1", "o2"]
    assert [o.id for o in parsed.patients["Patient/b"].observations] == ["o3", "o4"]
    assert [(i.severity, i.expression) for i in parsed.issues] == [
        ("warning", "Bundle.entry[6].resource.subject")
    ]


def test_a_conditional_or_logical_reference_reaches_the_patient_with_that_identifier() -> None:
    """Transaction Bundles reference by identifier (``Patient?identifier=system|value``, or a
    Reference with only an ``identifier``): resolved against the Bundle's Patients, not
    dropped as if the reading were about something else."""
    mrn = {"system": "urn:oid:1.2.3.4", "value": "MRN-0042"}
    data = bundle(
        patient("a", birthDate="1950-01-01", identifier=[mrn]),
        patient("b", birthDate="1960-01-01", identifier=[{"value": "MRN-0099"}]),
        observation("o1", "8867-4", 60, subject="Patient?identifier=urn:oid:1.2.3.4|MRN-0042"),
        observation("o2", "8867-4", 61, subject="Patient?identifier=MRN-0099"),
        observation("o3", "8867-4", 62) | {"subject": {"identifier": mrn}},
    )
    parsed = parse_bundle(data)
    assert [o.id for o in parsed.patients["Patient/a"].observations] == ["o1", "o3"]
    assert [o.id for o in parsed.patients["Patient/b"].observations] == ["o2"]
    assert parsed.issues == []


@pytest.mark.parametrize(
    ("subject", "fragment"),
    [
        ({"reference": "Patient?identifier=urn:oid:1.2.3.4|MRN-SECRET"}, "no Patient"),
        ({"reference": "Patient?identifier=MRN-TWICE"}, "2 Patients"),
        ({"reference": "Patient?name=SECRETNAME"}, "by identifier only"),
        ({"identifier": {"value": "MRN-SECRET"}}, "no Patient"),
        ({"reference": "MRN-SECRET"}, "not a reference"),
    ],
)
def test_a_subject_reference_that_reaches_no_single_patient_is_refused_without_its_value(
    subject: dict[str, Any], fragment: str
) -> None:
    """An Observation meant for a patient that cannot be found is an error, not a warning the
    sender never sees; the reference (an MRN, a name) is not repeated."""
    twice = [{"value": "MRN-TWICE"}]
    data = bundle(
        patient("a", identifier=twice),
        patient("b", identifier=twice),
        observation("o1", "8867-4", 60) | {"subject": subject},
    )
    [issue] = _issues(data)
    assert issue.severity == "error" and issue.expression == "Bundle.entry[2].resource.subject"
    assert fragment in issue.diagnostics
    assert "SECRET" not in str(issue) and "TWICE" not in str(issue)


def _issues(data: object) -> list[Issue]:
    with pytest.raises(FhirInputError) as caught:
        parse_bundle(data)
    outcome = OperationOutcome.model_validate(caught.value.to_operation_outcome())
    assert len(outcome.issue) == len(caught.value.issues)  # a valid R4 OperationOutcome
    return caught.value.issues


@pytest.mark.parametrize("data", [[{"resourceType": "Bundle"}], "Bundle", None, 3])
def test_input_that_is_not_a_json_object_is_refused(data: object) -> None:
    """Lists, strings, null: one structure issue."""
    [issue] = _issues(data)
    assert issue.code == "structure"


def test_a_resource_that_is_not_a_bundle_is_refused() -> None:
    """A bare Patient where a Bundle belongs: an invalid issue on resourceType."""
    [issue] = _issues(ADULT)
    assert (issue.code, issue.expression) == ("invalid", "resourceType")


def test_an_unsupported_bundle_type_and_missing_entries_are_reported_together() -> None:
    """type 'document' and no entry: both issues, at their paths."""
    issues = _issues({"resourceType": "Bundle", "type": "document"})
    assert [(i.code, i.expression) for i in issues] == [
        ("value", "Bundle.type"),
        ("required", "Bundle.entry"),
    ]


def test_a_bundle_without_a_patient_is_refused() -> None:
    """Observations alone cannot be scored: 'no Patient', and their subject is not found."""
    issues = _issues(bundle(observation("o1", "8867-4", 70)))
    assert ("required", "Bundle.entry") in [(i.code, i.expression) for i in issues]
    assert any("no Patient" in i.diagnostics for i in issues)
    assert ("not-found", "Bundle.entry[0].resource.subject") in [
        (i.code, i.expression) for i in issues
    ]


def test_a_resource_failing_validation_is_an_issue_with_its_location() -> None:
    """fhir.resources' errors become issues at entry paths, without pydantic's text or inputs."""
    bad = observation("o1", "8867-4", 70)
    bad["valueQuantity"]["value"] = "seventy"
    bad["colour"] = "blue"
    no_status = observation("o2", "8867-4", 70)
    del no_status["status"]
    issues = _issues(bundle(ADULT, bad, patient("p2", birthDate="1950-13-01"), no_status))
    located = {(i.code, i.expression) for i in issues}
    assert ("value", "Bundle.entry[1].resource.valueQuantity.value") in located
    assert ("structure", "Bundle.entry[1].resource.colour") in located
    assert ("value", "Bundle.entry[2].resource.birthDate") in located
    # fhir.resources checks required elements after the element types, so only here:
    assert ("required", "Bundle.entry[3].resource.status") in located
    text = " ".join(i.diagnostics for i in issues)
    assert "pydantic" not in text and "seventy" not in text and "Value error" not in text


def test_unknown_resource_types_and_dangling_references_are_refused() -> None:
    """A misspelt resourceType and a reference to an absent patient both fail the Bundle."""
    typo = {**observation("o1", "8867-4", 70), "resourceType": "Observaton"}
    dangling = observation("o2", "8867-4", 70, subject="Patient/nobody")
    issues = _issues(bundle(ADULT, typo, dangling))
    assert [(i.code, i.expression) for i in issues] == [
        ("not-supported", "Bundle.entry[1].resource.resourceType"),
        ("not-found", "Bundle.entry[2].resource.subject"),
    ]


# --- NDJSON -----------------------------------------------------------------------------------


def _write(path: Path, lines: list[object]) -> None:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )


def test_bad_ndjson_lines_are_reported_by_line_and_the_rest_is_read(tmp_path: Path) -> None:
    """Broken JSON, an invalid resource, an unknown patient: skipped with file:line issues."""
    _write(tmp_path / "Patient.ndjson", [ADULT, "{not json", patient("p2", birthDate="1960-01-01")])
    invalid = observation("bad", "8867-4", 70)
    invalid["valueQuantity"]["value"] = "fast"
    _write(
        tmp_path / "Observation.000.ndjson",
        [
            observation("hr-1", "8867-4", 71),
            "",
            invalid,
            observation("hr-x", "8867-4", 72, subject="Patient/nobody"),
            observation("pain", "72514-3", 3, "{score}"),  # no code the model reads
        ],
    )
    _write(
        tmp_path / "Observation.001.ndjson",
        [observation("hr-2", "8867-4", 66, subject="Patient/p2")],
    )
    _write(tmp_path / "Condition.ndjson", [condition("af", "49436004"), ADULT])

    export = iter_ndjson(tmp_path, SPEC, as_of=AS_OF, lookback_days=30)
    records = {r.reference: r for r in export}
    assert [(i.file, i.line, i.code) for i in export.issues] == [
        ("Patient.ndjson", 2, "structure"),
        ("Observation.000.ndjson", 3, "value"),
        ("Observation.000.ndjson", 4, "not-found"),
        ("Condition.ndjson", 2, "invalid"),
    ]
    assert export.issues[1].expression == "Observation.valueQuantity.value"
    assert "Observation.000.ndjson:3:" in export.issues[1].to_fhir()["diagnostics"]

    def heart_rate(ref: str) -> FeatureResult:
        r = records[ref]
        return features_for(
            SPEC, r.patient, r.observations, r.conditions, as_of=AS_OF, lookback_days=30
        )

    assert heart_rate("Patient/p1").features["heart_rate"] == 71
    assert heart_rate("Patient/p1").features["atrial_fibrillation"] == 1.0
    assert heart_rate("Patient/p2").features["heart_rate"] == 66


def test_a_line_that_is_not_utf8_is_reported_and_the_rest_is_read(tmp_path: Path) -> None:
    """One Latin-1 name in a Patient line stopped the whole export with a UnicodeDecodeError
    traceback (the nightly run, and beat's drop folder, queued nothing after it)."""
    latin1 = json.dumps(patient("p2", birthDate="1960-01-01")).replace("p2", "Jos\xe9")
    lines = [json.dumps(ADULT).encode(), latin1.encode("latin-1"), b"", b"\xff\xfe{"]
    (tmp_path / "Patient.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    obs = [json.dumps(observation("hr-1", "8867-4", 71)).encode(), b'{"id": "\x80"}']
    (tmp_path / "Observation.ndjson").write_bytes(b"\n".join(obs) + b"\n")

    export = iter_ndjson(tmp_path, SPEC, as_of=AS_OF, lookback_days=30)
    assert [r.reference for r in export] == ["Patient/p1"]
    assert [(i.file, i.line, i.code) for i in export.issues] == [
        ("Patient.ndjson", 2, "structure"),
        ("Patient.ndjson", 4, "structure"),
        ("Observation.ndjson", 2, "structure"),
    ]
    column = latin1.encode("latin-1").index(b"\xe9") + 1
    assert export.issues[0].diagnostics == f"not UTF-8 at byte {column}"
    assert export.lines["Patient"] == 3


def test_ndjson_keeps_one_observation_per_feature(tmp_path: Path) -> None:
    """A year of daily heart rates and BP panels: only the winner of each is held per patient."""
    _write(tmp_path / "Patient.ndjson", [ADULT])
    _write(
        tmp_path / "Observation.ndjson",
        [observation(f"hr-{d}", "8867-4", 60 + d % 30, days_ago=d) for d in range(365, 0, -1)]
        + [bp_panel(f"bp-{d}", 120 + d % 20, 80, days_ago=d + 0.5) for d in range(365)],
    )
    [record] = list(iter_ndjson(tmp_path, SPEC, as_of=AS_OF, lookback_days=30))
    # No admission Encounter: the first of each in the 30-day look-back.
    assert sorted(o.id for o in record.observations) == ["bp-29", "hr-30"]
    result = features_for(
        SPEC, record.patient, record.observations, record.conditions, as_of=AS_OF, lookback_days=30
    )
    assert result.features["heart_rate"] == 60 and result.features["systolic_bp"] == 129


def test_an_export_without_patients_is_refused(tmp_path: Path) -> None:
    """A folder with no Patient.ndjson cannot be read for scoring."""
    ndjson = FHIR_DIR / "ndjson" / "Observation.ndjson"
    if ndjson.is_file():
        shutil.copy(ndjson, tmp_path / "Observation.ndjson")
    with pytest.raises(FhirInputError, match=r"no Patient\.ndjson"):
        list(iter_ndjson(tmp_path, SPEC, as_of=AS_OF, lookback_days=30))


def test_a_versioned_or_absolute_patient_reference_reaches_the_patient(tmp_path: Path) -> None:
    """``Patient/p1/_history/2`` (R4 §2.3.0 allows a version) was refused as a Patient not in
    the Bundle, and an export's absolute or versioned subject as not in Patient.ndjson."""
    subjects = ["Patient/p1/_history/2", "https://ehr.example/fhir/Patient/p1/_history/7"]
    observations = [
        observation(f"hr-{n}", "8867-4", 70 + n, days_ago=n + 1, subject=s)
        for n, s in enumerate([*subjects, "https://ehr.example/fhir/Patient/p1"])
    ]
    parsed = parse_bundle(bundle(ADULT, *observations))
    assert [o.id for o in parsed.patients["Patient/p1"].observations] == ["hr-0", "hr-1", "hr-2"]

    _write(tmp_path / "Patient.ndjson", [ADULT])
    _write(tmp_path / "Observation.ndjson", observations)
    export = iter_ndjson(tmp_path, SPEC, as_of=AS_OF, lookback_days=30)
    [record] = list(export)
    assert export.issues == []
    result = features_of(SPEC, record, as_of=AS_OF, lookback_days=30)
    assert result.features["heart_rate"] == 72  # the first of the three, sent absolute


def test_a_reference_to_another_servers_patient_with_the_same_id_is_not_ours() -> None:
    """A Bundle assembled from two EHRs: our Patient p1 has the fullUrl
    https://ehr-a.example/fhir/Patient/p1, and an Observation is about another hospital's p1,
    named absolutely (https://ehr-b.example/...) or relatively from an entry of that server. R4
    §2.36.4.1 resolves both against ehr-b: they were read as our patient's heart rate. Same
    server (whatever the case of its host, http or https), a version, or a Patient with no
    RESTful fullUrl still match, as before."""
    ours = "https://ehr-a.example/fhir"

    def sent(*entries: tuple[dict[str, Any], str | None]) -> dict[str, Any]:
        listed = [{"resource": r, **({"fullUrl": u} if u else {})} for r, u in entries]
        return {"resourceType": "Bundle", "type": "searchset", "entry": listed}

    hr = observation(
        "hr", "8867-4", 120, days_ago=1, subject="https://ehr-b.example/fhir/Patient/p1"
    )
    with pytest.raises(FhirInputError, match="the referenced Patient is not in the Bundle"):
        parse_bundle(sent((ADULT, f"{ours}/Patient/p1"), (hr, None)))
    relative = observation("hr", "8867-4", 120, days_ago=1)  # Patient/p1, from ehr-b's entry
    with pytest.raises(FhirInputError, match="the referenced Patient is not in the Bundle"):
        parse_bundle(
            sent(
                (ADULT, f"{ours}/Patient/p1"),
                (relative, "https://ehr-b.example/fhir/Observation/hr"),
            )
        )
    for subject, entry_url, patient_url in [
        ("Patient/p1", f"{ours}/Observation/hr", f"{ours}/Patient/p1"),
        ("Patient/p1", "http://EHR-A.example/fhir/Observation/hr", f"{ours}/Patient/p1"),
        (f"{ours}/Patient/p1/_history/3", None, f"{ours}/Patient/p1"),
        (
            "https://ehr-b.example/fhir/Patient/p1",
            None,
            "urn:uuid:0b7e4f52-8d1c-4c1e-9a35-1d2f3a4b5c6d",
        ),
    ]:
        read = observation("hr", "8867-4", 120, days_ago=1, subject=subject)
        parsed = parse_bundle(sent((ADULT, patient_url), (read, entry_url)))
        assert [o.id for o in parsed.patients["Patient/p1"].observations] == ["hr"], subject


def test_a_subject_named_by_identifier_reaches_its_patient_from_any_servers_entry() -> None:
    """A logical reference (a Reference with only an identifier) and a conditional one
    (Patient?identifier=…) name no server: R4 resolves them by the identifier, which is how a
    Bundle assembled from two EHRs links one's readings to the other's Patient. The server
    check of literal references (ehr-b's entry, ehr-a's Patient) refused both as "the
    referenced Patient is not in the Bundle"."""
    mrn = {"system": "urn:hospital:mrn", "value": "MRN-4471"}
    ours = {**ADULT, "identifier": [mrn]}
    for subject in (
        {"identifier": mrn},
        {"reference": f"Patient?identifier={mrn['system']}|{mrn['value']}"},
    ):
        hr = {**observation("hr", "8867-4", 120, days_ago=1), "subject": subject}
        sent = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"fullUrl": "https://ehr-a.example/fhir/Patient/p1", "resource": ours},
                {"fullUrl": "https://ehr-b.example/fhir/Observation/hr", "resource": hr},
            ],
        }
        parsed = parse_bundle(sent)
        assert [o.id for o in parsed.patients["Patient/p1"].observations] == ["hr"], subject


def test_a_nested_resource_of_no_r4_type_is_an_issue_not_a_crash(tmp_path: Path) -> None:
    """fhir.resources raises KeyError ('R4.observationType') or TypeError past pydantic for a
    contained resource whose resourceType is not an R4 type: a 500 on POST /v1/fhir, and the
    end of a nightly run at that line. It is now an issue at its place; in a batch only that
    patient is refused, and in an export only that line is skipped."""
    bad = observation("hr", "8867-4", 72, contained=[{"resourceType": "observation"}])
    with pytest.raises(FhirInputError) as caught:
        parse_bundle(bundle(ADULT, bad))
    assert [(i.code, i.expression) for i in caught.value.issues] == [
        ("not-supported", "Bundle.entry[1].resource.contained[0].resourceType")
    ]
    other = {**ADULT, "id": "p2", "contained": [{"resourceType": 5}]}
    parsed = parse_bundle(bundle(ADULT, other, kind="batch"))
    assert list(parsed.patients) == ["Patient/p1"]
    assert [i.expression for i in parsed.refused["Patient/p2"]] == [
        "Bundle.entry[1].resource.contained[0].resourceType"
    ]
    nested = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": {"Smith": 1, "resourceType": "Zzz"}}],
    }
    deep = {
        **ADULT,
        "contained": [nested],
        "extension": [{"url": "http://x", "Smith": {"resourceType": "Zzz"}}],
    }
    with pytest.raises(FhirInputError) as caught:
        parse_bundle(bundle(deep))
    assert "Smith" not in str(caught.value.to_operation_outcome())

    _write(tmp_path / "Patient.ndjson", [ADULT, other])
    _write(tmp_path / "Observation.ndjson", [bad, observation("hr-2", "8867-4", 80)])
    export = iter_ndjson(tmp_path, SPEC, as_of=AS_OF, lookback_days=30)
    assert [r.reference for r in export] == ["Patient/p1"]
    assert sorted((i.file, i.line) for i in export.issues) == [
        ("Observation.ndjson", 1),
        ("Patient.ndjson", 2),
    ]


def test_two_versions_of_one_observation_are_refused_not_chosen_by_entry_order() -> None:
    """A final heart rate and its correction sent as two entries with one id: the value read
    was whichever entry came first (72 or 140), and the basis cited Observation/hr-1 either
    way. It is now refused at the second entry's place; in a batch, only its patient. Two
    EHRs' resources that share an id (their fullUrls on two servers) are two resources."""
    final = observation("hr-1", "8867-4", 72, days_ago=1)
    corrected = observation("hr-1", "8867-4", 140, days_ago=1, status="corrected")
    for first, second in ((final, corrected), (corrected, final)):
        with pytest.raises(FhirInputError) as caught:
            parse_bundle(bundle(ADULT, first, second))
        assert [(i.code, i.expression) for i in caught.value.issues] == [
            ("duplicate", "Bundle.entry[2].resource.id")
        ]
    other = {**ADULT, "id": "p2"}
    theirs = observation("hr-2", "8867-4", 90, days_ago=1, subject="Patient/p2")
    again = observation("hr-2", "8867-4", 95, days_ago=1, subject="Patient/p2")
    parsed = parse_bundle(bundle(ADULT, final, other, theirs, again, kind="batch"))
    assert list(parsed.patients) == ["Patient/p1"] and list(parsed.refused) == ["Patient/p2"]

    def at(server: str, resource: dict[str, Any]) -> dict[str, Any]:
        kind = resource["resourceType"]
        return {"fullUrl": f"https://{server}/fhir/{kind}/{resource['id']}", "resource": resource}

    sent = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            at("ehr-a", ADULT),
            at("ehr-a", final),
            at("ehr-b", {**other, "id": "p2"}),
            at("ehr-b", observation("hr-1", "8867-4", 90, days_ago=1, subject="Patient/p2")),
        ],
    }
    parsed = parse_bundle(sent)
    assert [len(r.observations) for r in parsed.patients.values()] == [1, 1]


def test_a_contained_observation_is_named_not_silently_lost() -> None:
    """A DiagnosticReport carrying its results as contained Observations (as v2 ORU converters
    send them): the heart rate in it was dropped without a word and the median imputed."""
    hr = observation("hr", "8867-4", 71)
    report = {
        "resourceType": "DiagnosticReport",
        "id": "dr-1",
        "status": "final",
        "code": {"text": "vital signs"},
        "subject": {"reference": "Patient/p1"},
        "contained": [hr, {"resourceType": "Practitioner", "id": "pr"}],
        "result": [{"reference": "#hr"}],
    }
    panel = observation("vs", "85353-1", contained=[hr], hasMember=[{"reference": "#hr"}])
    parsed = parse_bundle(bundle(ADULT, report, panel))
    assert [(i.severity, i.expression) for i in parsed.issues] == [
        ("warning", "Bundle.entry[1].resource.contained[0]"),
        ("warning", "Bundle.entry[2].resource.contained[0]"),
    ]
    assert all("contained Observation is not read" in i.diagnostics for i in parsed.issues)


def test_a_bad_entry_refuses_its_own_patient_only_in_a_batch() -> None:
    """One Observation with a time without its zone (invalid R4) refused a whole batch of
    patients; now that patient is refused, with the entry's place, and the others are read."""
    zoneless = observation("hr-2", "8867-4", 70, subject="Patient/p2")
    zoneless["effectiveDateTime"] = "2024-02-29T08:00:00"
    resources = [
        ADULT,
        observation("hr-1", "8867-4", 71),
        patient("p2", birthDate="1950-01-01"),
        zoneless,
        patient("p3", birthDate="1950-13-01"),
    ]
    parsed = parse_bundle(bundle(*resources, kind="batch"))
    assert list(parsed.patients) == ["Patient/p1"]
    assert [o.id for o in parsed.patients["Patient/p1"].observations] == ["hr-1"]
    assert parsed.order == ["Patient/p1", "Patient/p2", "Patient/p3"]
    assert {k: [i.expression for i in v] for k, v in parsed.refused.items()} == {
        "Patient/p2": ["Bundle.entry[3].resource.effectiveDateTime"],
        "Patient/p3": ["Bundle.entry[4].resource.birthDate"],
    }
    # A transaction is all or nothing; an error no one patient owns refuses the batch too.
    assert len(_issues(bundle(*resources, kind="transaction"))) == 2
    orphan = zoneless | {"subject": {"reference": "Patient/nobody"}}
    assert len(_issues(bundle(*resources, orphan, kind="batch"))) == 3
    assert len(_issues(bundle(*resources[2:], kind="batch"))) == 2  # every patient refused


@pytest.mark.parametrize(
    ("element", "value", "says"),
    [
        ("effectiveDateTime", "2024-02-29T08:00:00", "with its time zone"),
        ("effectiveDateTime", "2024-02-29T08:00Z", "YYYY-MM-DDThh:mm:ss"),
        ("effectiveInstant", "2024-02-29", "not an R4 instant"),
    ],
)
def test_a_malformed_time_says_the_format_r4_requires(element: str, value: str, says: str) -> None:
    """'DateTime value string does not match spec regex.' did not tell a sender that the
    time lacked its zone (or its seconds)."""
    sent = observation("hr-1", "8867-4", 70)
    del sent["effectiveDateTime"]
    [issue] = _issues(bundle(ADULT, sent | {element: value}))
    assert issue.expression == f"Bundle.entry[1].resource.{element}"
    assert says in issue.diagnostics and value not in issue.diagnostics


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ({"valueInteger": 71}, "an Integer where a Quantity"),
        ({"valueSampledData": {"origin": {"value": 0}, "period": 1000, "dimensions": 1}}, "a Sam"),
        ({"valueDateTime": "2024-01-01"}, "a DateTime where a Quantity"),
    ],
)
def test_a_value_of_another_type_is_named(value: dict[str, Any], said: str) -> None:
    """A SampledData heart rate (a monitor's waveform) was reported as 'no value'."""
    result = features(ADULT, observation("hr-1", "8867-4") | value)
    assert said in result.problems["heart_rate"]


def test_a_reading_dated_by_day_on_the_admission_day_is_reported_not_dropped() -> None:
    """US Core lets a vital sign be dated by day. One dated the day an admission began at
    06:00 may be before or in it: it was dropped without a word and the next reading used."""
    admission = encounter("enc", 0.25)  # 2024-01-01T06:00Z
    by_day = observation("hr-day", "8867-4", 120) | {"effectiveDateTime": "2024-01-01"}
    timed = observation("hr-timed", "8867-4", 80, days_ago=0.1)
    result = features(ADULT, admission, by_day, timed)
    assert "hr-day: effective time is a date without a time" in result.problems["heart_rate"]
    assert [i["resource"] for i in result.ignored] == ["Observation/hr-day"]
    # A day wholly before the admission is outside it; wholly inside (no admission), read.
    before = by_day | {"effectiveDateTime": "2023-12-31"}
    assert features(ADULT, admission, before, timed).features["heart_rate"] == 80
    assert features(ADULT, by_day).features["heart_rate"] == 120
