"""The ``whas500-mortality`` reference model: one-year mortality after an acute myocardial
infarction, from an MLP trained with the Cox partial likelihood on the Worcester Heart Attack
Study cohort (WHAS500: 500 patients, 215 deaths, follow-up up to 6.5 years; Hosmer, Lemeshow &
May, *Applied Survival Analysis*, 2nd ed.; shipped inside scikit-survival).

Inputs are what an EHR holds at admission, each named with the FHIR resource and the LOINC or
SNOMED CT codes that carry it, so FHIR data can feed the model. WHAS500's length of stay is left
out: it is known only at discharge, after follow-up has begun.

Training is reproducible: a fixed seed, a held-out split stratified by event, full-batch Adam on
the CPU. The baseline is a Cox proportional-hazards model from lifelines on the same split;
both are compared by Harrell's C-index on the held-out patients.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.cases.architectures import CoxMLP, fit_full_batch, save_weights
from models.cases.registry import FeatureSpec, RangeRule

NAME = "whas500-mortality"
VERSION = "1.0.0"
SEED = 20261123
TEST_FRACTION = 0.3
HORIZON_DAYS = 365.0
# Chosen by 5-fold cross-validated C-index on the training split only (54 settings of width,
# weight decay, epochs and learning rate); the held-out patients played no part.
HIDDEN = (8,)
DROPOUT = 0.1
EPOCHS = 100
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.3

_LOINC = "http://loinc.org"
_SNOMED = "http://snomed.info/sct"
_ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"

#: Where the flag ranges come from; the reject ranges are wider and catch entry or unit errors.
_TRAINING_RANGE = (
    "WHAS500 training split (sksurv.datasets.load_whas500, seed 20261123): smallest and largest "
    "value; outside it the model extrapolates"
)
_NOT_HUMAN = "no sustained human {what} lies outside it: a unit or entry error (project rule)"
_MEDIAN = "median of the 350 training patients (WHAS500 training split, seed 20261123)"


def _observation(code: str, display: str, *, time: str, window: str) -> dict[str, Any]:
    return {
        "resource": "Observation",
        "codes": [{"system": _LOINC, "code": code, "display": display}],
        "time": time,
        "window": window,
        "unusable": "reject",
    }


def _condition(time: str, snomed: dict[str, str], icd10cm: dict[str, str]) -> dict[str, Any]:
    codes = [{"system": _SNOMED, "code": c, "display": d} for c, d in snomed.items()]
    codes += [{"system": _ICD10CM, "code": c, "display": d} for c, d in icd10cm.items()]
    return {"resource": "Condition", "codes": codes, "time": time, "unusable": "ignore"}


def _ranges(reject: tuple[float, float], flag: tuple[float, float], what: str) -> tuple:
    return (
        RangeRule(*reject, policy="reject", source=_NOT_HUMAN.format(what=what)),
        RangeRule(*flag, policy="flag", source=_TRAINING_RANGE),
    )


def _binary(name: str, column: str, description: str, source: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "column": column,
        "unit": "1",
        "description": f"{description} (1 = recorded, 0 = not)",
        "source": source,
        "missing": 0.0,
        "missing_source": "no matching Condition on record counts as not recorded (0)",
        "allowed": (0.0, 1.0),
    }


#: WHAS500 column → feature. ``missing`` for a vital sign is the training median (stated here
#: and in the registry); an absent condition counts as not present; age and sex are required.
#: Vital signs are the *initial* ones of the admission (WHAS500's hr, sysbp, diasbp): the first
#: reading of the encounter. History features (cvd, miord) count whatever was recorded before
#: as_of, resolved or not; the others describe the admission: present at as_of.
_FEATURES: list[dict[str, Any]] = [
    {
        "name": "age",
        "column": "age",
        "unit": "a",
        "description": "age at admission, in years",
        "source": {"resource": "Patient", "element": "birthDate", "time": "present"},
        "missing": "reject",
        "ranges": (
            RangeRule(18.0, 120.0, "reject", "an adult cohort; no verified human age exceeds 120"),
            RangeRule(32.0, 104.0, "flag", _TRAINING_RANGE),
        ),
    },
    {
        "name": "female",
        "column": "gender",
        "unit": "1",
        "description": "administrative sex (1 = female, 0 = male)",
        "source": {
            "resource": "Patient",
            "element": "gender",
            "map": {"female": 1, "male": 0},
            "time": "present",
        },
        "missing": "reject",
        "allowed": (0.0, 1.0),
    },
    {
        "name": "heart_rate",
        "column": "hr",
        "unit": "/min",
        "description": "initial heart rate: the first reading of the admission",
        "source": _observation("8867-4", "Heart rate", time="first", window="encounter"),
        "ranges": _ranges((20.0, 300.0), (35.0, 186.0), "heart rate"),
    },
    {
        "name": "systolic_bp",
        "column": "sysbp",
        "unit": "mm[Hg]",
        "description": "initial systolic blood pressure: the first reading of the admission",
        "source": _observation(
            "8480-6", "Systolic blood pressure", time="first", window="encounter"
        ),
        "ranges": _ranges((40.0, 300.0), (63.0, 244.0), "systolic pressure"),
    },
    {
        "name": "diastolic_bp",
        "column": "diasbp",
        "unit": "mm[Hg]",
        "description": "initial diastolic blood pressure: the first reading of the admission",
        "source": _observation(
            "8462-4", "Diastolic blood pressure", time="first", window="encounter"
        ),
        # WHAS500 holds a diastolic pressure of 6 mmHg (in shock): the reject bound is below it.
        "ranges": _ranges((1.0, 250.0), (6.0, 198.0), "diastolic pressure"),
    },
    {
        "name": "bmi",
        "column": "bmi",
        "unit": "kg/m2",
        "description": "body mass index: the latest in the look-back window",
        "source": _observation(
            "39156-5", "Body mass index (BMI) [Ratio]", time="latest", window="lookback"
        ),
        "ranges": _ranges((10.0, 80.0), (13.04, 44.84), "body mass index"),
    },
    _binary(
        "heart_failure",
        "chf",
        "congestive heart failure",
        _condition(
            "present",
            {
                "42343007": "Congestive heart failure",
                "88805009": "Chronic congestive heart failure",
                "84114007": "Heart failure",
            },
            {
                "I50.1": "Left ventricular failure, unspecified",
                "I50.9": "Heart failure, unspecified",
                "I50.20": "Unspecified systolic (congestive) heart failure",
                "I50.21": "Acute systolic (congestive) heart failure",
                "I50.22": "Chronic systolic (congestive) heart failure",
                "I50.23": "Acute on chronic systolic (congestive) heart failure",
                "I50.30": "Unspecified diastolic (congestive) heart failure",
                "I50.31": "Acute diastolic (congestive) heart failure",
                "I50.32": "Chronic diastolic (congestive) heart failure",
                "I50.33": "Acute on chronic diastolic (congestive) heart failure",
                "I50.40": "Unspecified combined systolic and diastolic heart failure",
                "I50.41": "Acute combined systolic and diastolic heart failure",
                "I50.42": "Chronic combined systolic and diastolic heart failure",
                "I50.43": "Acute on chronic combined systolic and diastolic heart failure",
            },
        ),
    ),
    _binary(
        "atrial_fibrillation",
        "afb",
        "atrial fibrillation",
        _condition(
            "present",
            {"49436004": "Atrial fibrillation"},
            {
                "I48.0": "Paroxysmal atrial fibrillation",
                "I48.1": "Persistent atrial fibrillation (before FY2020)",
                "I48.11": "Longstanding persistent atrial fibrillation",
                "I48.19": "Other persistent atrial fibrillation",
                "I48.2": "Chronic atrial fibrillation (before FY2020)",
                "I48.20": "Chronic atrial fibrillation, unspecified",
                "I48.21": "Permanent atrial fibrillation",
                "I48.91": "Unspecified atrial fibrillation",
            },
        ),
    ),
    _binary(
        "cardiovascular_history",
        "cvd",
        "history of cardiovascular disease",
        # Not "history of myocardial infarction": in WHAS500, 23 of the 171 patients with an
        # earlier MI have cvd = 0, so that code feeds recurrent_mi alone.
        _condition(
            "ever",
            {
                "49601007": "Disorder of cardiovascular system",
                "53741008": "Coronary arteriosclerosis",
                "414545008": "Ischemic heart disease",
                "230690007": "Cerebrovascular accident",
            },
            {
                "I25.10": "Atherosclerotic heart disease of native coronary artery without angina",
                "I25.9": "Chronic ischemic heart disease, unspecified",
                "I63.9": "Cerebral infarction, unspecified",
                "Z86.73": "Personal history of TIA and cerebral infarction without residual deficits",
            },
        ),
    ),
    _binary(
        "complete_heart_block",
        "av3",
        "complete atrioventricular block",
        _condition(
            "present",
            {"27885002": "Complete atrioventricular block"},
            {"I44.2": "Atrioventricular block, complete"},
        ),
    ),
    _binary(
        "cardiogenic_shock",
        "sho",
        "cardiogenic shock",
        _condition("present", {"89138009": "Cardiogenic shock"}, {"R57.0": "Cardiogenic shock"}),
    ),
    _binary(
        "recurrent_mi",
        "miord",
        "recurrent myocardial infarction (an earlier one on record)",
        _condition(
            "ever",
            {
                "399211009": "History of myocardial infarction",
                "1755008": "Old myocardial infarction",
            },
            {"I25.2": "Old myocardial infarction"},
        ),
    ),
    _binary(
        "q_wave_mi",
        "mitype",
        "Q-wave myocardial infarction",
        _condition("present", {"304914007": "Acute Q wave myocardial infarction"}, {}),
    ),
]

FEATURE_NAMES = tuple(f["name"] for f in _FEATURES)


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray  # (N_train, F) float64, in FEATURE_NAMES order
    time_train: np.ndarray  # (N_train,) days from admission to death or last follow-up
    event_train: np.ndarray  # (N_train,) bool, True = died
    x_test: np.ndarray
    time_test: np.ndarray
    event_test: np.ndarray
    medians: dict[str, float]  # training medians of the vital signs (the stated imputations)


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """WHAS500 as (X (500, F) in FEATURE_NAMES order, time in days, event)."""
    from sksurv.datasets import load_whas500

    frame, outcome = load_whas500()
    x = np.column_stack([frame[f["column"]].astype(float).to_numpy() for f in _FEATURES])
    return x, outcome["lenfol"].astype(float), outcome["fstat"].astype(bool)


def split(seed: int = SEED) -> Split:
    """The held-out split (stratified by death) used for training, evaluation and the baseline."""
    from sklearn.model_selection import train_test_split

    x, time, event = load()
    train_idx, test_idx = train_test_split(
        np.arange(len(time)), test_size=TEST_FRACTION, stratify=event, random_state=seed
    )
    medians = {
        f["name"]: float(np.median(x[train_idx, i]))
        for i, f in enumerate(_FEATURES)
        if "missing" not in f
    }
    return Split(
        x[train_idx], time[train_idx], event[train_idx],
        x[test_idx], time[test_idx], event[test_idx],
        medians,
    )  # fmt: skip


def input_schema(medians: dict[str, float]) -> list[FeatureSpec]:
    specs = []
    for f in _FEATURES:
        fields = {k: v for k, v in f.items() if k != "column"}
        if "missing" not in fields:
            fields["missing"] = round(medians[f["name"]], 2)
            fields["missing_source"] = _MEDIAN
        specs.append(FeatureSpec(**fields))
    return specs


def cox_loss(log_hr: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood per event, Breslow's handling of tied times.

    For each death i: log_hr_i - log sum over the risk set {j : time_j >= time_i} of exp(log_hr_j).
    """
    at_risk = time[None, :] >= time[:, None]  # (N, N): row i's risk set
    log_risk = torch.logsumexp(log_hr[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
    return -((log_hr - log_risk)[event]).sum() / event.sum().clamp_min(1)


def breslow_cumhaz(log_hr: np.ndarray, time: np.ndarray, event: np.ndarray, at: float) -> float:
    """Breslow's estimate of the cumulative baseline hazard at time ``at``."""
    risk = np.exp(log_hr)
    deaths = np.unique(time[event & (time <= at)])
    return float(sum(np.sum(event & (time == t)) / risk[time >= t].sum() for t in deaths))


def known_status(time: np.ndarray, event: np.ndarray, horizon: float = HORIZON_DAYS):
    """Who has a known status at the horizon, and that status (1 = died by then).

    Patients censored before the horizon are unknown and left out of horizon metrics.
    """
    died = event & (time <= horizon)
    known = died | (time > horizon) | ((time == horizon) & ~event)
    return known, died.astype(np.int64)


@dataclass(frozen=True)
class TrainResult:
    artifact: Path
    sha256: str
    c_index: float
    baseline_c_index: float
    baseline_cumhaz: float
    threshold: float
    medians: dict[str, float]
    n_train: int
    n_test: int
    events_train: int
    events_test: int


def train(out: Path, *, seed: int = SEED) -> TrainResult:
    """Train the Cox MLP, save it as safetensors at ``out``, evaluate it beside lifelines' CPH."""
    data = split(seed)
    torch.manual_seed(seed)
    model = CoxMLP(len(FEATURE_NAMES), hidden=HIDDEN, dropout=DROPOUT)
    x = torch.tensor(data.x_train, dtype=torch.float32)
    time = torch.tensor(data.time_train, dtype=torch.float32)
    event = torch.tensor(data.event_train)

    def loss() -> torch.Tensor:
        return cox_loss(model.log_hazard_ratio(x), time, event)

    fit_full_batch(model, x, loss, epochs=EPOCHS, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    with torch.inference_mode():
        train_lhr = model.log_hazard_ratio(x).double().numpy()
        test_lhr = model.log_hazard_ratio(torch.tensor(data.x_test, dtype=torch.float32))
    cumhaz = breslow_cumhaz(train_lhr, data.time_train, data.event_train, HORIZON_DAYS)
    model.baseline_cumhaz.fill_(cumhaz)

    return TrainResult(
        artifact=out,
        sha256=save_weights(model, out),
        c_index=c_index(data.time_test, test_lhr.double().numpy(), data.event_test),
        baseline_c_index=c_index(data.time_test, baseline_risk(data), data.event_test),
        baseline_cumhaz=cumhaz,
        threshold=horizon_prevalence(data),
        medians=data.medians,
        n_train=len(data.time_train),
        n_test=len(data.time_test),
        events_train=int(data.event_train.sum()),
        events_test=int(data.event_test.sum()),
    )


def horizon_prevalence(data: Split) -> float:
    """Share of training patients with a known status who died by the horizon: the threshold.

    Flags patients whose predicted risk exceeds the cohort's; 0.5 would flag few, as deaths by one
    year are a minority. Rounded to two places.
    """
    known, died = known_status(data.time_train, data.event_train)
    return round(float(died[known].mean()), 2)


def c_index(time: np.ndarray, risk: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C: the share of comparable pairs in which the higher risk dies first."""
    from lifelines.utils import concordance_index

    # lifelines scores predicted survival times, which run opposite to risk.
    return float(concordance_index(time, -risk, event))


def baseline_risk(data: Split) -> np.ndarray:
    """Held-out log partial hazards of lifelines' Cox proportional-hazards fit on the train split."""
    import pandas as pd
    from lifelines import CoxPHFitter

    train = pd.DataFrame(data.x_train, columns=FEATURE_NAMES)
    train["time"], train["event"] = data.time_train, data.event_train
    fitter = CoxPHFitter().fit(train, duration_col="time", event_col="event")
    test = pd.DataFrame(data.x_test, columns=FEATURE_NAMES)
    return fitter.predict_log_partial_hazard(test).to_numpy()


def held_out(seed: int = SEED) -> tuple[list[dict[str, float]], np.ndarray, np.ndarray]:
    """Held-out cases as feature dicts, with their follow-up time (days) and death indicator."""
    data = split(seed)
    cases = [dict(zip(FEATURE_NAMES, map(float, row), strict=True)) for row in data.x_test]
    return cases, data.time_test, data.event_test


def metrics(result: TrainResult) -> dict[str, float]:
    """Held-out figures of the model beside its baseline, as ``medbatch models train`` prints them."""
    return {
        "cox_mlp_held_out_c_index": result.c_index,
        "lifelines_cph_held_out_c_index": result.baseline_c_index,
        "n_train": result.n_train,
        "n_test": result.n_test,
        "events_test": result.events_test,
    }


def registry_entry(result: TrainResult, *, artifact: str) -> dict[str, Any]:
    """The registry.json entry describing a trained artifact."""
    return {
        "name": NAME,
        "version": VERSION,
        "default": True,
        "status": "released",
        "architecture": "cox-mlp",
        "params": {"hidden": list(HIDDEN), "dropout": DROPOUT},
        "artifact": artifact,
        "sha256": result.sha256,
        "output": (
            "probability of death within 365 days of admission for acute myocardial infarction"
        ),
        "labels": ["survives-1y", "dies-1y"],
        "threshold": result.threshold,
        "inputs": [f.to_json() for f in input_schema(result.medians)],
        "training": {
            "data": "WHAS500, Worcester Heart Attack Study (sksurv.datasets.load_whas500)",
            "seed": SEED,
            "loss": "Cox partial likelihood (Breslow ties)",
            "horizon_days": HORIZON_DAYS,
            "baseline_cumulative_hazard": round(result.baseline_cumhaz, 6),
            "test_fraction": TEST_FRACTION,
            "n_train": result.n_train,
            "n_test": result.n_test,
            "events_train": result.events_train,
            "events_test": result.events_test,
            "held_out_c_index": round(result.c_index, 4),
            "baseline": "lifelines CoxPHFitter on the same features and split",
            "baseline_held_out_c_index": round(result.baseline_c_index, 4),
        },
        "clinical_use": (
            "reference model trained on a 1990s research cohort of 500 patients; "
            "not validated for clinical use"
        ),
    }
