"""The declarative FHIR mapping: code-system spellings, UCUM units, the schema checks at load and
at registration, and the rules that keep every sent value accounted for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models.cases.byo import RegistrationError, register
from models.cases.registry import FeatureSpec, RangeRule, Registry, SchemaError, schema_problems
from models.terminology.codes import (
    CODE_SYSTEMS,
    ICD10CM,
    LOINC,
    SNOMED,
    canonical_system,
    coding_key,
)
from models.terminology.ucum import UnitError, convert
from tests.models.test_fhir_features import (
    ADULT,
    AS_OF,
    bp_panel,
    condition,
    encounter,
    features,
    observation,
    patient,
    quantity,
)

# --- code systems -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "uri"),
    [
        ("http://loinc.org", LOINC),
        ("urn:oid:2.16.840.1.113883.6.1", LOINC),
        ("2.16.840.1.113883.6.1", LOINC),
        ("LN", LOINC),
        ("http://loinc.org/", LOINC),
        ("http://www.loinc.org", LOINC),
        ("urn:oid:2.16.840.1.113883.6.96", SNOMED),
        ("SCT", SNOMED),
        ("http://snomed.info/sct/731000124108", SNOMED),  # US edition URI sent as the system
        ("urn:oid:2.16.840.1.113883.6.90", ICD10CM),
        ("I10C", ICD10CM),
        # https:// for the http:// URI, as feeds send it (each was None: a near miss)
        ("https://hl7.org/fhir/sid/icd-10-cm", ICD10CM),
        ("https://www.loinc.org", LOINC),
        ("https://loinc.org/", LOINC),
        ("HTTPS://SNOMED.INFO/SCT", SNOMED),
        ("https://hospital.example/codes", None),
        ("http://hospital.example/codes", None),
        ("", None),
    ],
)
def test_every_spelling_of_a_code_system_is_one_system(spelling: str, uri: str | None) -> None:
    """URI, OID (bare and urn:oid:), HL7 v2 mnemonic and legacy forms all normalise."""
    assert canonical_system(spelling) == uri


def test_the_table_has_one_row_per_system_and_no_spelling_twice() -> None:
    spellings = [
        s.lower() for row in CODE_SYSTEMS for s in (row.uri, row.oid, *row.v2, *row.legacy)
    ]
    duplicated = {s for s in spellings if spellings.count(s) > 1}
    assert duplicated <= {"ucum"}  # UCUM's v2 mnemonic and its legacy name are the same word
    assert coding_key("I10C", "i509") == coding_key(ICD10CM, "I50.9") == (ICD10CM, "I509")


# --- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "unit", ["/min", "{beat}/min", "{beats}/min", "{Beats}/min", "beats per minute", "BPM",
             "bpm", "beats/minute", "1/min"],
)  # fmt: skip
def test_heart_rate_spellings_all_mean_per_minute(unit: str) -> None:
    assert convert(72.0, unit, "/min") == 72.0


def test_units_convert_by_their_ucum_meaning() -> None:
    """kPa → mm[Hg] by UCUM's 133.3220 Pa (not pint's conventional 133.322387), °F → Cel,
    lb/in2 → kg/m2, and display spellings of mm[Hg] and kg/m2."""
    assert convert(16.0, "kPa", "mm[Hg]") == pytest.approx(16000 / 133.3220, rel=1e-12)
    assert convert(98.6, "[degF]", "Cel") == pytest.approx(37.0)
    assert convert(1.0, "[lb_av]/[in_i]2", "kg/m2") == pytest.approx(0.45359237 / 0.0254**2)
    assert convert(120.0, "mmHg", "mm[Hg]") == convert(120.0, "mm Hg", "mm[Hg]") == 120.0
    assert convert(24.2, "kg/m^2", "kg/m2") == 24.2


@pytest.mark.parametrize(
    ("unit", "to", "named"),
    [
        ("kg", "kg/m2", "'kg' ([mass])"),
        ("C", "Cel", "'C' ([current] * [time])"),  # UCUM's C is the coulomb, not Celsius
        ("mm[Hg]", "/min", "'mm[Hg]'"),
        ("beats", "/min", "'beats' is neither a UCUM code nor a known spelling"),
        # An OverflowError (a 500 on POST /v1/fhir) from pint's float of 10**999999.
        ("10*999999/min", "/min", "'10*999999/min' has a factor out of range"),
        # The sender's text is quoted, but not 5,000 characters of it.
        ("x" * 5000, "/min", f"'{'x' * 40}…' is neither"),
    ],
)
def test_incompatible_or_unknown_units_are_refused_by_name(unit: str, to: str, named: str) -> None:
    with pytest.raises(UnitError) as caught:
        convert(1.0, unit, to)
    assert named in str(caught.value)


@pytest.mark.parametrize("annotation", ["{beats}", "{count}", "{#}", "{a}.{b}"])
def test_an_annotation_alone_is_the_unity(annotation: str) -> None:
    """UCUM §12: ``{count}`` alone means 1. ucumvert hands back the bare token for it, which
    was an AttributeError in the conversion: a 500 on POST /v1/fhir for a heart rate in
    ``{beats}``, now a refusal by name."""
    assert convert(3.0, annotation, "1") == 3.0
    assert convert(0.5, annotation, "%") == 50.0
    with pytest.raises(UnitError, match=r"'\{beats\}' \(dimensionless\) cannot be converted"):
        convert(72.0, "{beats}", "/min")
    hr = observation("hr", "8867-4", 72, "{beats}", days_ago=1)
    result = features(ADULT, encounter("adm", 2), hr)
    assert "'{beats}' (dimensionless) cannot be converted" in result.problems["heart_rate"]


@pytest.mark.parametrize("unit", ["Cel", "[degF]", "B", "dB", "Np"])
def test_an_offset_or_log_unit_against_a_molar_mass_is_refused_by_name(unit: str) -> None:
    """A glucose (LOINC 2345-7, which has a molar mass) sent in Cel, [degF], B, dB or Np: pint
    raised OffsetUnitCalculusError multiplying it by mol/g, a 500 on POST /v1/fhir."""
    with pytest.raises(UnitError, match=r"cannot be converted to 'mmol/L'"):
        convert(5.0, unit, "mmol/L", loinc="2345-7")


def test_a_factor_out_of_range_is_refused_through_a_molar_mass_too() -> None:
    with pytest.raises(UnitError, match=r"'10\*999999\.mg/dL' has a factor out of range"):
        convert(1.0, "10*999999.mg/dL", "mmol/L", loinc="2345-7")


# --- schema checks ----------------------------------------------------------------------------


def _condition_feature(name: str, codes: list[dict[str, Any]]) -> FeatureSpec:
    return FeatureSpec(
        name,
        "1",
        source={"resource": "Condition", "codes": codes, "time": "ever"},
        missing=0.0,
        allowed=(0.0, 1.0),
    )


def test_one_code_feeds_one_feature_unless_both_say_so() -> None:
    """The same SNOMED code in two features (even spelt as an OID) is refused, until each
    feature's entry lists the other under also_feeds."""
    a = _condition_feature("a", [{"system": SNOMED, "code": "399211009"}])
    b = _condition_feature("b", [{"system": "urn:oid:2.16.840.1.113883.6.96", "code": "399211009"}])
    problems = schema_problems([a, b])
    assert len(problems) == 2 and all("also feeds" in p for p in problems)
    only_one_side = _condition_feature(
        "a", [{"system": SNOMED, "code": "399211009", "also_feeds": ["b"]}]
    )
    assert len(schema_problems([only_one_side, b])) == 1
    b_too = _condition_feature("b", [{"system": SNOMED, "code": "399211009", "also_feeds": ["a"]}])
    assert schema_problems([only_one_side, b_too]) == []


def test_ranges_need_a_policy_and_a_source_and_imputations_an_origin() -> None:
    hr = FeatureSpec(
        "hr",
        "/min",
        source={"resource": "Observation", "codes": [{"system": LOINC, "code": "8867-4"}]},
        missing=80.0,
        ranges=(RangeRule(20, 300), RangeRule(300, 20, "flag", "x")),
    )
    problems = schema_problems([hr])
    assert "hr: each range needs a policy, 'reject' or 'flag'" in problems
    assert any("needs a source" in p for p in problems)
    assert any("low 300 is above high 20" in p for p in problems)
    assert any("missing_source" in p for p in problems)


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ({"resource": "Observation", "codes": [{"system": LOINC, "code": "1"}], "time": "ever"},
         "time 'ever' is not one of latest or first"),
        ({"resource": "Condition", "codes": [{"system": SNOMED, "code": "1"}], "time": "first"},
         "time 'first' is not one of ever or present"),
        ({"resource": "Observation", "codes": []}, "lists its codes"),
        ({"resource": "Procedure", "codes": []}, "source resource must be one of"),
        ({"resource": "Observation", "codes": [{"system": LOINC, "code": "1"}],
          "window": "shift"}, "window must be"),
    ],
)  # fmt: skip
def test_malformed_sources_are_named(source: dict[str, Any], fragment: str) -> None:
    assert any(fragment in p for p in schema_problems([FeatureSpec("x", "1", source=source)]))


def test_every_packaged_schema_passes_every_check() -> None:
    """Including the UCUM check on units that a registry load leaves out (it is slow)."""
    for spec in Registry.load():
        assert schema_problems(spec.inputs) == [], spec.ref


def test_an_observation_unit_must_be_ucum() -> None:
    source = {"resource": "Observation", "codes": [{"system": LOINC, "code": "8867-4"}]}
    problems = schema_problems([FeatureSpec("hr", "beats", source=source, missing="reject")])
    assert problems == ["hr: unit 'beats' is neither a UCUM code nor a known spelling of one"]


def test_the_registry_refuses_to_load_a_schema_that_breaks_a_rule(tmp_path: Path) -> None:
    raw = json.loads(Path("models/cases/registry.json").read_text())
    whas = next(m for m in raw["models"] if m["name"] == "whas500-mortality")
    cvd = next(i for i in whas["inputs"] if i["name"] == "cardiovascular_history")
    cvd["source"]["codes"].append({"system": SNOMED, "code": "399211009"})  # the old overlap
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SchemaError, match=r"code 399211009 .* also feeds recurrent_mi"):
        Registry.load(path)


def test_registration_checks_the_mapping_and_keeps_it(tmp_path: Path) -> None:
    """A hospital's schema may carry a mapping; registration refuses a broken one (a range
    without policy) before copying anything, and keeps a sound one in the store's registry."""
    from safetensors.torch import save_file

    from models.cases.architectures import StandardizedMLP

    mlp = StandardizedMLP(1, hidden=(2,)).eval()
    artifact = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(artifact))
    kw: dict[str, Any] = {"architecture": "mlp", "params": {"hidden": [2]}}
    source = {"resource": "Observation", "codes": [{"system": "LN", "code": "8867-4"}]}
    bad = {"output": "risk", "inputs": [{"name": "hr", "unit": "/min", "source": source,
                                         "missing": "reject", "range": [20, 300]}]}  # fmt: skip
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(bad))
    store = tmp_path / "store"
    with pytest.raises(RegistrationError, match="each range needs a policy"):
        register(
            artifact, name="hr-model", version="1", schema_path=schema, artifact_dir=store, **kw
        )
    assert not (store / "models").exists()
    good = {**bad, "inputs": [{**bad["inputs"][0], "range": None,
            "ranges": [{"low": 20, "high": 300, "policy": "reject", "source": "ours"}]}]}  # fmt: skip
    del good["inputs"][0]["range"]
    schema.write_text(json.dumps(good))
    entry = register(
        artifact, name="hr-model", version="1", schema_path=schema, artifact_dir=store, **kw
    )
    assert entry["inputs"][0]["source"] == source and entry["inputs"][0]["ranges"][0]["policy"]
    spec = Registry.load(store / "registry.json").resolve("hr-model")
    hr = features(ADULT, observation("hr", "8867-4", 72, "BPM"), spec=spec)
    assert hr.features == {"hr": 72.0}


# --- never silent -----------------------------------------------------------------------------


def _coded_hr(oid: str, system: str, value: float = 72, days_ago: float = 1) -> dict[str, Any]:
    obs = observation(oid, "8867-4", value, days_ago=days_ago)
    obs["code"]["coding"][0]["system"] = system
    return obs


def test_a_heart_rate_coded_with_loincs_oid_is_used() -> None:
    """urn:oid:2.16.840.1.113883.6.1 is LOINC: the value sent is used, nothing imputed."""
    result = features(
        ADULT,
        encounter("adm", 2),
        _coded_hr("hr", "urn:oid:2.16.840.1.113883.6.1", 104, days_ago=1.5),
    )
    assert result.features["heart_rate"] == 104 and "heart_rate" not in result.imputed
    assert result.ignored == [] and "Observation/hr" in result.basis


def test_a_heart_rate_under_an_unknown_system_refuses_the_case_by_name() -> None:
    """8867-4 under a local system is a near miss: reported, and heart_rate's 'unusable:
    reject' refuses the case rather than impute over a value that was sent."""
    result = features(ADULT, encounter("adm", 2), _coded_hr("hr", "http://hospital.example/v"))
    assert "heart_rate" not in result.features and "heart_rate" not in result.imputed
    assert "Observation/hr" in result.problems["heart_rate"]
    assert (
        "'http://hospital.example/v', not a known spelling of LOINC"
        in result.problems["heart_rate"]
    )
    assert result.ignored[0]["resource"] == "Observation/hr"
    # Beside a LOINC coding of the same concept, the local coding is simply another name.
    both = _coded_hr("hr2", LOINC, 80)
    both["code"]["coding"].append({"system": "http://hospital.example/v", "code": "HR"})
    assert features(ADULT, encounter("adm", 2), both).features["heart_rate"] == 80


def test_a_later_unreadable_reading_is_reported_but_does_not_refuse() -> None:
    """The first reading decides the initial heart rate; a later one in kg is listed, no more."""
    result = features(
        ADULT,
        encounter("adm", 3),
        observation("hr-1", "8867-4", 90, days_ago=2),
        observation("hr-2", "8867-4", 91, "kg", days_ago=1),
    )
    assert result.ok and result.features["heart_rate"] == 90
    assert result.ignored == [
        {
            "feature": "heart_rate",
            "resource": "Observation/hr-2",
            "reason": "unit 'kg' ([mass]) cannot be converted to '/min' (1 / [time])",
        }
    ]


def test_a_value_absent_for_a_reason_is_imputed_and_both_are_reported() -> None:
    """US Core lets a vital sign carry dataAbsentReason instead of a value: the reading is
    listed as ignored, and the imputation says what was used and why."""
    hr = observation("hr", "8867-4", days_ago=1)
    hr["dataAbsentReason"] = {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                "code": "not-performed",
            }
        ]
    }
    result = features(ADULT, encounter("adm", 2), hr)
    assert result.ok and result.features["heart_rate"] == 84.5
    assert result.ignored == [
        {
            "feature": "heart_rate",
            "resource": "Observation/hr",
            "reason": "no value (dataAbsentReason not-performed)",
        }
    ]
    (imputation,) = [i for i in result.imputations if i["feature"] == "heart_rate"]
    assert imputation["value"] == 84.5 and "median" in imputation["source"]
    assert "1 sent but ignored" in imputation["why"]


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ("F", "status is not an R4 Observation status code (final, amended, ...; lower case)"),
        ("FINAL", "status is not an R4 Observation status code (final, amended, ...; lower case)"),
        ("unknown", "status unknown: the source does not know whether it is a result"),
    ],
)
def test_a_status_that_may_be_a_result_is_unreadable_not_void(status: str, reason: str) -> None:
    """An HL7 v2 converter copies OBX-11 "F" (final) into Observation.status; fhir.resources
    does not check the value set. Any status but final/amended/corrected/preliminary was read
    as "the record says it is no value": the heart rate sent was replaced by the median, with
    only a note. Outside R4's codes, or "unknown", the value may be a final result: it is
    unreadable, and heart_rate's 'unusable: reject' refuses the case by name. The sent code is
    not quoted. entered-in-error, cancelled and registered stay void."""
    hr = observation("hr", "8867-4", 131, days_ago=1, status=status)
    result = features(ADULT, encounter("adm", 2), hr)
    assert "heart_rate" not in result.features
    assert result.problems["heart_rate"].startswith(f"Observation/hr: {reason}")
    assert result.ignored == [
        {"feature": "heart_rate", "resource": "Observation/hr", "reason": reason}
    ]
    void = observation("hr", "8867-4", 131, days_ago=1, status="cancelled")
    result = features(ADULT, encounter("adm", 2), void)
    assert result.ok and result.features["heart_rate"] == 84.5


def test_a_panel_with_two_values_for_one_feature_is_unreadable_not_its_first() -> None:
    """A blood pressure panel with two systolic components (both arms): the first component was
    read, whichever arm it was. Now it is unreadable (systolic_bp's 'unusable: reject' refuses
    the case by name); the panel's diastolic is still read. Two parts that agree, or a panel
    entered in error in every part, are read as before."""
    panel = bp_panel("bp", 150, 80)
    right_arm = {**panel["component"][0], "valueQuantity": quantity(118, "mm[Hg]")}
    panel["component"].append(right_arm)
    result = features(ADULT, encounter("adm", 2), panel)
    assert "systolic_bp" not in result.features and result.features["diastolic_bp"] == 80
    reason = (
        "2 parts of the Observation carry the feature's code, not with one value: which is "
        "meant cannot be read"
    )
    assert result.ignored == [
        {"feature": "systolic_bp", "resource": "Observation/bp", "reason": reason}
    ]
    assert reason in result.problems["systolic_bp"]
    panel["component"][-1] = {**right_arm, "valueQuantity": quantity(150, "mm[Hg]")}
    assert features(ADULT, encounter("adm", 2), panel).features["systolic_bp"] == 150
    panel["status"] = "entered-in-error"
    voided = features(ADULT, encounter("adm", 2), panel)
    assert voided.ok and "systolic_bp" in voided.imputed


def test_a_reading_at_a_leap_second_is_placed_in_time() -> None:
    """R4 lets a dateTime's seconds be 60. fhir.resources keeps such a time as a string, which
    read as "no effective time" and refused the case (heart_rate: unusable reject). It is read
    as the last microsecond before, whatever the offset; a leap second just before the window
    is outside it, not "a date without a time"."""
    hr = observation("hr", "8867-4", 97, days_ago=1)
    hr["effectiveDateTime"] = "2023-12-31T23:59:60Z"
    result = features(ADULT, encounter("adm", 2), hr)
    assert result.ok and result.features["heart_rate"] == 97
    hr["effectiveDateTime"] = "2023-12-30T18:59:60.5-05:00"
    assert features(ADULT, encounter("adm", 2), hr).features["heart_rate"] == 97
    hr["effectiveDateTime"] = "2023-12-29T23:59:60Z"  # before the admission (2 days ago)
    before = features(ADULT, encounter("adm", 2), hr)
    assert before.ok and before.ignored == [] and "heart_rate" in before.imputed


def test_a_data_absent_reason_given_as_text_only_is_still_no_value() -> None:
    """R4 lets dataAbsentReason be a CodeableConcept with text only (a free-text reason from an
    HL7 v2 NTE): the sender says there is no value, as a coded reason does. It was read as an
    unreadable value, and heart_rate's 'unusable: reject' refused the case; the text (the
    sender's words) is not repeated."""
    hr = observation("hr", "8867-4", days_ago=1)
    hr["dataAbsentReason"] = {"text": "pt refused, see nursing note"}
    result = features(ADULT, encounter("adm", 2), hr)
    assert result.ok and result.features["heart_rate"] == 84.5
    assert result.ignored == [
        {
            "feature": "heart_rate",
            "resource": "Observation/hr",
            "reason": "no value (dataAbsentReason given as text)",
        }
    ]
    # A panel's component absent the same way: the panel's other value is still read.
    panel = bp_panel("bp", 120, 80)
    del panel["component"][0]["valueQuantity"]
    panel["component"][0]["dataAbsentReason"] = {"text": "cuff too small"}
    result = features(ADULT, encounter("adm", 2), panel)
    assert result.ok and result.features["diastolic_bp"] == 80
    assert "systolic_bp" in result.imputed


def test_history_counts_resolved_conditions_and_icd10cm_codes() -> None:
    """A resolved stroke is a history of cardiovascular disease ('ever'); a resolved atrial
    fibrillation is not present; ICD-10-CM codes count, with or without their dot."""
    icd = condition("old-mi", "I252", status="resolved")
    icd["code"]["coding"][0]["system"] = "http://hl7.org/fhir/sid/icd-10-cm"
    result = features(
        ADULT,
        condition("stroke", "230690007", status="resolved", abatementDateTime="2015-01-01"),
        condition("af", "49436004", status="resolved", abatementDateTime="2015-01-01"),
        icd,
    )
    assert result.features["cardiovascular_history"] == 1.0
    assert result.features["atrial_fibrillation"] == 0.0
    assert result.features["recurrent_mi"] == 1.0 and "Condition/old-mi" in result.basis


def test_unconfirmed_and_refuted_diagnoses_are_reported_not_counted() -> None:
    def verified(cid: str, code: str, status: str) -> dict[str, Any]:
        system = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
        return condition(
            cid, code, verificationStatus={"coding": [{"system": system, "code": status}]}
        )

    result = features(
        ADULT, verified("chf", "42343007", "provisional"), verified("af", "49436004", "refuted")
    )
    assert result.ok
    assert (result.features["heart_failure"], result.features["atrial_fibrillation"]) == (0, 0)
    assert {(i["resource"], i["reason"]) for i in result.ignored} == {
        ("Condition/chf", "verificationStatus provisional: not a confirmed diagnosis"),
        ("Condition/af", "verificationStatus refuted"),
    }


def test_a_status_is_read_from_its_hl7_coding_beside_the_ehrs_own() -> None:
    """EHRs send Condition statuses with their own coding beside (here before) the HL7 one. The
    first coding was read: a resolved heart failure counted as present and an entered-in-error
    atrial fibrillation as confirmed. A status with no HL7 coding still reads its first code."""
    hl7 = "https://terminology.hl7.org/CodeSystem/"  # https, as some feeds spell it

    def statuses(clinical: str, verification: str) -> dict[str, Any]:
        return {
            "clinicalStatus": {
                "coding": [
                    {"system": "http://ehr.example/status", "code": "A"},
                    {"system": f"{hl7}condition-clinical", "code": clinical},
                ]
            },
            "verificationStatus": {
                "coding": [
                    {"system": "http://ehr.example/verif", "code": "C"},
                    {"system": f"{hl7}condition-ver-status", "code": verification},
                ]
            },
        }

    chf = condition("chf", "42343007", **statuses("resolved", "confirmed"))
    af = condition("af", "49436004", **statuses("active", "entered-in-error"))
    block = condition("block", "27885002", **statuses("active", "confirmed"))
    block["clinicalStatus"]["coding"][0]["code"] = "active"  # no HL7 coding: its first code
    block["clinicalStatus"]["coding"].pop()
    result = features(ADULT, chf, af, block)
    assert result.ok
    assert result.features["heart_failure"] == 0
    assert result.features["atrial_fibrillation"] == 0
    assert result.features["complete_heart_block"] == 1
    assert result.ignored == [
        {
            "feature": "atrial_fibrillation",
            "resource": "Condition/af",
            "reason": "verificationStatus entered-in-error",
        }
    ]


def test_a_condition_status_outside_r4s_codes_is_unreadable_not_read_as_present() -> None:
    """clinicalStatus "Resolved" (capitalised) or "A", verificationStatus "Confirmed": codes
    outside R4's required value sets. "Resolved" was not among the inactive codes, so a
    resolved heart failure counted as present, silently. Now each is reported as unreadable
    (the sent code not quoted) and, under the conditions' 'unusable: ignore', not counted."""
    chf = condition("chf", "42343007", status="Resolved")
    af = condition("af", "49436004", status="A")
    block = condition("block", "27885002", verificationStatus={"coding": [{"code": "Confirmed"}]})
    result = features(ADULT, chf, af, block)
    assert result.ok
    assert (
        result.features["heart_failure"],
        result.features["atrial_fibrillation"],
        result.features["complete_heart_block"],
    ) == (0, 0, 0)
    clinical = "clinicalStatus is not an R4 code (active, resolved, ...; lower case)"
    verification = "verificationStatus is not an R4 code (confirmed, provisional, ...; lower case)"
    assert {(i["resource"], i["reason"]) for i in result.ignored} == {
        ("Condition/chf", clinical),
        ("Condition/af", clinical),
        ("Condition/block", verification),
    }
    # 'ever' does not read the clinical status: a history stays a history.
    old_mi = condition("mi", "399211009", status="Resolved")
    assert features(ADULT, old_mi).features["recurrent_mi"] == 1


def test_a_value_outside_a_flag_range_is_accepted_and_flagged() -> None:
    """A heart rate of 190/min is plausible (reject bounds 20..300) but above every training
    patient's (flag bounds 35..186): scored, and flagged with the range's source."""
    result = features(ADULT, encounter("adm", 2), observation("hr", "8867-4", 190, days_ago=1))
    assert result.ok and result.features["heart_rate"] == 190
    (flag,) = result.flagged
    assert flag["feature"] == "heart_rate" and "training" in flag["reason"]
    assert "190" not in flag["reason"]


def test_basis_cites_the_id_else_the_full_url() -> None:
    """Entries without an id are cited by their urn:uuid fullUrl, never 'Observation/?'."""
    from models.fhir.features import features_of, parse_bundle

    pid, oid = (
        "urn:uuid:6a1f0c1e-0000-4000-8000-000000000001",
        "urn:uuid:6a1f0c1e-0000-4000-8000-000000000002",
    )
    hr = observation("x", "8867-4", 77, subject=pid)
    del hr["id"]
    data = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": pid, "resource": {k: v for k, v in ADULT.items() if k != "id"}},
            {"fullUrl": oid, "resource": hr},
            {"fullUrl": "urn:uuid:6a1f0c1e-0000-4000-8000-000000000003",
             "resource": observation("named", "39156-5", 27, "kg/m2", subject=pid)},
        ],
    }  # fmt: skip
    (record,) = parse_bundle(data).patients.values()
    assert record.reference == pid
    spec = Registry.load().resolve("whas500-mortality")
    result = features_of(spec, record, as_of=AS_OF, lookback_days=30)
    assert result.basis == [pid, oid, "Observation/named"]
    assert all("?" not in b for b in result.basis)


def test_a_quantity_without_a_ucum_code_is_read_from_its_display_unit() -> None:
    hr = observation("hr", "8867-4", days_ago=1)
    hr["valueQuantity"] = {"value": 66, "unit": "beats per minute"}
    kpa = observation("sbp", "8480-6", days_ago=1)
    kpa["valueQuantity"] = quantity(16.0, "kPa")
    result = features(ADULT, encounter("adm", 2), hr, kpa)
    assert result.features["heart_rate"] == 66
    assert result.features["systolic_bp"] == pytest.approx(16000 / 133.3220, rel=1e-12)


def test_partial_patient_is_still_refused_for_age() -> None:
    assert "age" in features(patient(gender="male")).problems


@pytest.mark.parametrize("comparator", ["<", "<=", ">=", ">"])
def test_a_value_with_a_comparator_is_not_read_as_exact(comparator: str) -> None:
    """valueQuantity.comparator ("<30", ">=50") bounds the value; it is not the value. Such a
    reading is reported and follows the unusable rule, never scored as the bound itself; a
    later exact reading of a ``first`` feature does not replace it silently either."""
    hr = observation("hr-bound", "8867-4", 30, days_ago=2)
    hr["valueQuantity"]["comparator"] = comparator
    refused = features(ADULT, encounter("adm", 3), hr)
    assert "heart_rate" in refused.problems and "heart_rate" not in refused.features
    reason = f"value has comparator {comparator!r}: not an exact value"
    assert refused.ignored == [
        {"feature": "heart_rate", "resource": "Observation/hr-bound", "reason": reason}
    ]
    bmi = observation("bmi-bound", "39156-5", 50, "kg/m2", days_ago=2)
    bmi["valueQuantity"]["comparator"] = comparator
    later = observation("bmi-exact", "39156-5", 31, "kg/m2", days_ago=1)
    kept = features(ADULT, bmi, later)  # latest: the exact one wins, the bound is reported
    assert kept.ok and kept.features["bmi"] == 31
    assert [i["resource"] for i in kept.ignored] == ["Observation/bmi-bound"]
