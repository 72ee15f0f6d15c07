"""``medbatch models evaluate NAME[@VERSION]``: held-out metrics and plots for a model version.

The report folder holds ``metrics.json`` and ``roc.png``, ``pr.png``, ``calibration.png``.
Metrics come from scikit-learn; plots from matplotlib (Agg, no display needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from models import breast_cancer
from models.registry import ModelSpec, report_dir  # noqa: F401  (re-exported for the CLI)
from models.scoring import LoadedModel

REPORT_FILES = ("metrics.json", "roc.png", "pr.png", "calibration.png")


class NoEvaluationData(LookupError):
    """A model version with no labelled held-out data to evaluate on."""


def held_out(spec: ModelSpec) -> tuple[list[dict[str, float]], np.ndarray]:
    """The labelled held-out cases of ``spec``: feature dicts and 0/1 labels (1 = positive)."""
    if spec.name == "breast-cancer":
        data = breast_cancer.split(int(spec.training.get("seed", breast_cancer.SEED)))
        cases = [dict(zip(data.feature_names, map(float, x), strict=True)) for x in data.x_test]
        return cases, data.y_test
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
        "brier": float(metrics.brier_score_loss(y, p)),
    }


def evaluate(spec: ModelSpec, out_dir: Path) -> dict[str, Any]:
    """Score the held-out cases with the artifact itself, write the report, return the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve, roc_curve

    cases, y = held_out(spec)
    model = LoadedModel(spec, device="cpu")
    p = np.array([r.score for r in model.score(cases)])
    report = {
        "model": spec.name,
        "version": spec.version,
        "sha256": spec.sha256,
        "data": spec.training.get("data", ""),
        "metrics": binary_metrics(y, p, threshold=spec.threshold),
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
