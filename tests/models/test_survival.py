"""The WHAS500 survival model: its loss, baseline hazard and C-index against independent
implementations (scikit-survival), its output formula, its schema, and reproducible training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.cases.architectures import CoxMLP
from models.cases.featurize import check_features
from models.cases.inference import LoadedModel
from models.cases.registry import Registry
from models.reference import survival
from models.reference.train import train
from tests.helpers import assert_retrained_is_packaged

REGISTRY = Registry.load()


@pytest.fixture(scope="module")
def data() -> survival.Split:
    return survival.split()


def _standardized(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / x.std(axis=0)


def test_cox_loss_minimum_is_scikit_survivals_breslow_fit(data: survival.Split) -> None:
    """A linear model fitted on our loss has scikit-survival's Breslow-ties Cox coefficients."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    x = _standardized(data.x_train)
    assert len(np.unique(data.time_train)) < len(data.time_train)  # ties are really there
    reference = CoxPHSurvivalAnalysis(ties="breslow", alpha=0).fit(
        x, Surv.from_arrays(data.event_train, data.time_train)
    )
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    xt, time, event = torch.tensor(x), torch.tensor(data.time_train), torch.tensor(data.event_train)
    optimizer = torch.optim.LBFGS(
        [w],
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = survival.cox_loss(xt @ w, time, event)
        loss.backward()
        return loss

    optimizer.step(closure)
    np.testing.assert_allclose(w.detach().numpy(), reference.coef_, atol=1e-6)


def test_cox_loss_equals_the_textbook_sum() -> None:
    """The vectorised loss equals the partial likelihood written as a loop over deaths."""
    rng = np.random.default_rng(3)
    time = rng.integers(1, 30, size=40).astype(float)  # many ties
    event = rng.random(40) < 0.6
    lhr = rng.normal(size=40)
    expected = (
        -sum(lhr[i] - np.log(np.exp(lhr[time >= time[i]]).sum()) for i in range(40) if event[i])
        / event.sum()
    )
    got = survival.cox_loss(torch.tensor(lhr), torch.tensor(time), torch.tensor(event))
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_breslow_baseline_hazard_matches_scikit_survival(data: survival.Split) -> None:
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    x = _standardized(data.x_train)
    reference = CoxPHSurvivalAnalysis(ties="breslow", alpha=0).fit(
        x, Surv.from_arrays(data.event_train, data.time_train)
    )
    for horizon in (30.0, 365.0, 1000.0):
        ours = survival.breslow_cumhaz(
            x @ reference.coef_, data.time_train, data.event_train, horizon
        )
        assert ours == pytest.approx(float(reference.cum_baseline_hazard_(horizon)), rel=1e-9)


def test_c_index_matches_scikit_survivals_harrell_c(data: survival.Split) -> None:
    from sksurv.metrics import concordance_index_censored

    risk = np.random.default_rng(0).normal(size=len(data.time_test)) + data.x_test[:, 0] / 20
    expected = concordance_index_censored(data.event_test, data.time_test, risk)[0]
    assert survival.c_index(data.time_test, risk, data.event_test) == pytest.approx(expected)


def test_output_is_the_risk_by_the_horizon() -> None:
    """sigmoid(forward) = 1 - exp(-H0 exp(log hazard ratio)), small and large hazards alike."""
    torch.manual_seed(0)
    model = CoxMLP(3, hidden=(4,)).double().eval()
    model.baseline_cumhaz.fill_(0.2)
    x = torch.randn(64, 3, dtype=torch.float64) * 6
    with torch.no_grad():
        lhr = model.log_hazard_ratio(x).numpy()
        p = torch.sigmoid(model(x)).numpy()
    np.testing.assert_allclose(p, 1 - np.exp(-0.2 * np.exp(lhr)), rtol=1e-9, atol=1e-12)


def test_schema_names_fhir_codes_units_and_missing_rules() -> None:
    spec = REGISTRY.resolve("whas500-mortality")
    by_name = {f.name: f for f in spec.inputs}
    assert by_name["heart_rate"].source == {
        "resource": "Observation",
        "codes": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}],
        "time": "first",
        "window": "encounter",
        "unusable": "reject",
    }
    assert by_name["systolic_bp"].unit == "mm[Hg]" and by_name["bmi"].unit == "kg/m2"
    af_codes = {(c["system"], c["code"]) for c in by_name["atrial_fibrillation"].source["codes"]}
    assert ("http://snomed.info/sct", "49436004") in af_codes
    assert ("http://hl7.org/fhir/sid/icd-10-cm", "I48.91") in af_codes
    assert by_name["cardiovascular_history"].source["time"] == "ever"
    assert by_name["heart_failure"].source["time"] == "present"
    assert by_name["age"].missing == "reject" and by_name["female"].missing == "reject"
    assert by_name["heart_failure"].missing == 0.0
    # A vital sign's stated imputation is its training median.
    column = survival.FEATURE_NAMES.index("heart_rate")
    median = float(np.median(survival.split().x_train[:, column]))
    assert by_name["heart_rate"].missing == pytest.approx(median, abs=0.01)
    assert "los" not in by_name  # known only at discharge
    assert (
        by_name["heart_rate"].missing_source and "training" in by_name["heart_rate"].missing_source
    )


def test_registry_schema_is_what_training_writes() -> None:
    """registry.json's inputs are survival.input_schema on the training medians, so a retrain
    reproduces the reviewed mapping."""
    spec = REGISTRY.resolve("whas500-mortality")
    written = survival.input_schema(survival.split().medians)
    assert [f.to_json() for f in spec.inputs] == [f.to_json() for f in written]


def test_every_whas500_patient_passes_its_own_ranges() -> None:
    """The reference model's reject ranges hold its whole cohort (training and held out), and
    its flag ranges hold the training split: a case from its own data is never refused."""
    from models.cases.featurize import rule_flags, rule_problem

    spec = REGISTRY.resolve("whas500-mortality")
    x, _, _ = survival.load()
    for row in x:
        for feature, value in zip(spec.inputs, row, strict=True):
            assert rule_problem(feature, float(value)) is None, feature.name
    for row in survival.split().x_train:
        for feature, value in zip(spec.inputs, row, strict=True):
            assert rule_flags(feature, float(value)) == [], feature.name
    assert min(x[:, survival.FEATURE_NAMES.index("diastolic_bp")]) == 6.0  # the old rule's victim


def _case(**overrides: float) -> dict[str, float]:
    x, _, _ = survival.load()
    return {**dict(zip(survival.FEATURE_NAMES, map(float, x[0]), strict=True)), **overrides}


def test_implausible_or_non_binary_values_are_named() -> None:
    spec = REGISTRY.resolve("whas500-mortality")
    assert check_features(spec, _case()) == {}
    problems = check_features(spec, _case(female=2.0, heart_rate=900.0))
    assert problems == {
        "female": "expected one of 0, 1",
        "heart_rate": "outside the plausible range 20..300 /min",
    }


def test_packaged_model_scores_the_held_out_patients_as_recorded() -> None:
    spec = REGISTRY.resolve("whas500-mortality")
    cases, time, event = survival.held_out()
    p = np.array([r.score for r in LoadedModel(spec, device="cpu").score(cases)])
    assert ((p > 0) & (p < 1)).all()
    c = survival.c_index(time, p, event)
    assert c == pytest.approx(spec.training["held_out_c_index"], abs=1e-4)


@pytest.mark.slow
def test_training_is_deterministic_and_reproduces_the_packaged_model(tmp_path: Path) -> None:
    first = train("whas500-mortality", out_dir=tmp_path / "a")
    second = train("whas500-mortality", out_dir=tmp_path / "b")
    assert first.sha256 == second.sha256
    assert_retrained_is_packaged(
        first,
        REGISTRY.resolve("whas500-mortality"),
        {
            "cox_mlp_held_out_c_index": "held_out_c_index",
            "lifelines_cph_held_out_c_index": "baseline_held_out_c_index",
        },
    )
