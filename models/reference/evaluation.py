"""``medbatch models evaluate NAME[@VERSION]``: held-out metrics and plots for a model version.

The report folder holds ``metrics.json`` and ``roc.png``, ``pr.png``, ``calibration.png``.
Metrics come from scikit-learn; plots from matplotlib (Agg, no display needed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.cases.inference import LoadedModel
from models.cases.registry import ModelSpec, report_dir  # noqa: F401  (re-exported for the CLI)
from models.reference import breast_cancer, ecg, survival

REPORT_FILES = ("metrics.json", "roc.png", "pr.png", "calibration.png")


class NoEvaluationData(LookupError):
    """A model version with no labelled held-out data to evaluate on."""


@dataclass(frozen=True)
class HeldOut:
    """Labelled held-out cases: feature dicts and 0/1 labels (1 = positive).

    For a survival model, ``time`` and ``event`` are every case's follow-up; ``labels`` (status at
    the horizon) are known only where ``known``.
    """

    cases: list[dict[str, Any]]
    labels: np.ndarray
    known: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None


def held_out(spec: ModelSpec, *, ecg_dir: Path | None = None) -> HeldOut:
    """The labelled held-out cases of ``spec`` (ecg-cnn's from the MIT-BIH record in ``ecg_dir``)."""
    seed = spec.training.get("seed")
    if spec.name == breast_cancer.NAME:
        data = breast_cancer.split(int(seed or breast_cancer.SEED))
        cases = [dict(zip(data.feature_names, map(float, x), strict=True)) for x in data.x_test]
        return HeldOut(cases, data.y_test)
    if spec.name == survival.NAME:
        cases, time, event = survival.held_out(int(seed or survival.SEED))
        horizon = float(spec.training.get("horizon_days", survival.HORIZON_DAYS))
        known, died = survival.known_status(time, event, horizon)
        return HeldOut(cases, died, known, time, event)
    if spec.name == ecg.NAME and spec.training.get("data", "none") != "none":
        if ecg_dir is None:
            raise NoEvaluationData(f"{spec.ref} is evaluated on the MIT-BIH record: give ecg_dir")
        beats, labels = ecg.held_out(ecg_dir)
        return HeldOut(list(beats), labels)
    raise NoEvaluationData(
        f"{spec.ref} has no labelled held-out data to evaluate on ({spec.clinical_use or 'no data'})"
    )


def binary_metrics(y: np.ndarray, p: np.ndarray, *, threshold: float) -> dict[str, float]:
    """Discrimination, threshold and calibration metrics of probabilities ``p`` (N,) for ``y`` (N,)."""
    from sklearn import metrics

    predicted = (p >= threshold).astype(int)
    return {
        "n": len(y),
        "positives": int(y.sum()),
        "threshold": threshold,
        "roc_auc": float(metrics.roc_auc_score(y, p)),
        "pr_auc": float(metrics.average_precision_score(y, p)),
        "accuracy": float(metrics.accuracy_score(y, predicted)),
        "recall": float(metrics.recall_score(y, predicted)),
        "precision": float(metrics.precision_score(y, predicted, zero_division=0)),
        "f1": float(metrics.f1_score(y, predicted)),
        # The negative class too: per-class figures matter where it is the large one (beats).
        "specificity": float(metrics.recall_score(y, predicted, pos_label=0)),
        "f1_negative": float(metrics.f1_score(y, predicted, pos_label=0)),
        "brier": float(metrics.brier_score_loss(y, p)),
    }


def evaluate(spec: ModelSpec, out_dir: Path, *, ecg_dir: Path | None = None) -> dict[str, Any]:
    """Score the held-out cases with the artifact itself, write the report, return the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve, roc_curve

    data = held_out(spec, ecg_dir=ecg_dir)
    model = LoadedModel(spec, device="cpu")
    p = np.array([r.score for r in model.score(data.cases)])
    y = data.labels
    metrics: dict[str, Any] = {}
    if data.time is not None and data.event is not None and data.known is not None:
        # Harrell's C over every held-out patient; the horizon metrics over those whose status
        # at the horizon is known (censored earlier: unknown, left out).
        metrics = {
            "c_index": survival.c_index(data.time, p, data.event),
            "horizon_days": spec.training.get("horizon_days"),
            "censored_before_horizon": int((~data.known).sum()),
        }
        y, p = y[data.known], p[data.known]
    report = {
        "model": spec.name,
        "version": spec.version,
        "sha256": spec.sha256,
        "data": spec.training.get("data", ""),
        "metrics": {**metrics, **binary_metrics(y, p, threshold=spec.threshold)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")

    fpr, tpr, _ = roc_curve(y, p)
    precision, recall, _ = precision_recall_curve(y, p)
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="quantile")
    m = report["metrics"]
    plots = {
        "roc.png": (
            fpr,
            tpr,
            "false positive rate",
            "true positive rate",
            f"ROC AUC {m['roc_auc']:.3f}",
        ),
        "pr.png": (recall, precision, "recall", "precision", f"PR AUC {m['pr_auc']:.3f}"),
        "calibration.png": (
            predicted,
            observed,
            "mean predicted probability",
            "observed fraction",
            f"Brier {m['brier']:.3f}",
        ),
    }
    for filename, (xs, ys, xlabel, ylabel, label) in plots.items():
        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
        ax.plot(xs, ys, marker="o" if filename == "calibration.png" else None, label=label)
        if filename != "pr.png":
            ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
        ax.set(
            xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02), title=f"{spec.ref}, held out"
        )
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out_dir / filename)
        plt.close(fig)
    return report
