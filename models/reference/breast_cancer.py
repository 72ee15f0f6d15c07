"""The ``breast-cancer`` reference model: an MLP for malignancy risk on the Wisconsin Diagnostic
Breast Cancer data (569 fine-needle aspirates, 30 nuclear features; shipped inside scikit-learn).

Training is reproducible: a fixed seed, a stratified held-out split, full-batch Adam on the CPU.
The held-out split is the one ``medbatch demo`` submits, so the demo's AUC is an honest one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.cases.registry import FeatureSpec

NAME = "breast-cancer"
VERSION = "1.0.0"
SEED = 20261123
TEST_FRACTION = 0.2
HIDDEN = (32, 16)
DROPOUT = 0.1
EPOCHS = 400
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-3

# WDBC features are measured on a digitized image of the aspirate (Street, Wolberg & Mangasarian
# 1993): lengths in pixels, texture as the standard deviation of grey levels, shape indices unitless.
_UNITS = {
    "radius": "px",
    "texture": "grey-level sd",
    "perimeter": "px",
    "area": "px^2",
    "smoothness": "1",
    "compactness": "1",
    "concavity": "1",
    "concave points": "1",
    "symmetry": "1",
    "fractal dimension": "1",
}


def feature_name(sklearn_name: str) -> str:
    """``"mean concave points"`` → ``"mean_concave_points"``: JSON-friendly feature keys."""
    return sklearn_name.replace(" ", "_")


def input_schema() -> list[FeatureSpec]:
    from sklearn.datasets import load_breast_cancer

    specs = []
    for raw in load_breast_cancer().feature_names:
        stat = "mean" if raw.startswith("mean ") else "worst" if raw.startswith("worst ") else "se"
        measure = raw.removeprefix("mean ").removeprefix("worst ").removesuffix(" error")
        what = {"mean": "mean", "worst": "mean of the three largest", "se": "standard error"}[stat]
        specs.append(
            FeatureSpec(feature_name(raw), _UNITS[measure], f"{what} of nuclear {measure}")
        )
    return specs


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray  # (N_train, 30) float64
    y_train: np.ndarray  # (N_train,) 1 = malignant
    x_test: np.ndarray  # (N_test, 30)
    y_test: np.ndarray  # (N_test,)
    test_index: np.ndarray  # (N_test,) row numbers in load_breast_cancer()
    feature_names: tuple[str, ...]


def split(seed: int = SEED) -> Split:
    """The stratified held-out split used for training, evaluation and the demo.

    scikit-learn codes malignant as 0; here 1 means malignant, so the score is a malignancy risk.
    """
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    y = (data.target == 0).astype(np.int64)
    index = np.arange(len(y))
    train_idx, test_idx = train_test_split(
        index, test_size=TEST_FRACTION, stratify=y, random_state=seed
    )
    return Split(
        x_train=data.data[train_idx],
        y_train=y[train_idx],
        x_test=data.data[test_idx],
        y_test=y[test_idx],
        test_index=test_idx,
        feature_names=tuple(feature_name(n) for n in data.feature_names),
    )


@dataclass(frozen=True)
class TrainResult:
    artifact: Path
    sha256: str
    mlp_auc: float
    baseline_auc: float
    n_train: int
    n_test: int


def train(out: Path, *, seed: int = SEED) -> TrainResult:
    """Train the MLP, save it as safetensors at ``out``, and evaluate it beside a logistic baseline."""
    import torch  # the held-out split (demo, OpenAPI example) needs none of this
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from models.cases.architectures import StandardizedMLP, fit_full_batch, save_weights

    data = split(seed)
    torch.manual_seed(seed)
    model = StandardizedMLP(data.x_train.shape[1], hidden=HIDDEN, dropout=DROPOUT)
    x = torch.tensor(data.x_train, dtype=torch.float32)
    y = torch.tensor(data.y_train, dtype=torch.float32)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def loss() -> torch.Tensor:
        return loss_fn(model(x), y)

    fit_full_batch(model, x, loss, epochs=EPOCHS, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    with torch.inference_mode():
        p_test = torch.sigmoid(model(torch.tensor(data.x_test, dtype=torch.float32))).numpy()

    baseline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    baseline.fit(data.x_train, data.y_train)
    p_base = baseline.predict_proba(data.x_test)[:, 1]

    return TrainResult(
        artifact=out,
        sha256=save_weights(model, out),
        mlp_auc=float(roc_auc_score(data.y_test, p_test)),
        baseline_auc=float(roc_auc_score(data.y_test, p_base)),
        n_train=len(data.y_train),
        n_test=len(data.y_test),
    )


def metrics(result: TrainResult) -> dict[str, float]:
    """Held-out figures of the model beside its baseline, as ``medbatch models train`` prints them."""
    return {
        "mlp_held_out_roc_auc": result.mlp_auc,
        "logistic_regression_held_out_roc_auc": result.baseline_auc,
        "n_train": result.n_train,
        "n_test": result.n_test,
    }


def registry_entry(result: TrainResult, *, artifact: str) -> dict:
    """The registry.json entry describing a trained artifact."""
    return {
        "name": NAME,
        "version": VERSION,
        "default": True,
        "status": "released",
        "architecture": "mlp",
        "params": {"hidden": list(HIDDEN), "dropout": DROPOUT},
        "artifact": artifact,
        "sha256": result.sha256,
        "output": "probability that the aspirated breast mass is malignant",
        "labels": ["benign", "malignant"],
        "threshold": 0.5,
        "inputs": [f.to_json() for f in input_schema()],
        "training": {
            "data": "Wisconsin Diagnostic Breast Cancer (sklearn.datasets.load_breast_cancer)",
            "seed": SEED,
            "test_fraction": TEST_FRACTION,
            "n_train": result.n_train,
            "n_test": result.n_test,
            "held_out_roc_auc": round(result.mlp_auc, 4),
            "baseline": "StandardScaler + LogisticRegression",
            "baseline_held_out_roc_auc": round(result.baseline_auc, 4),
        },
        "clinical_use": "reference model for demonstrations; not validated for clinical use",
    }
