"""Evaluation reports: metrics against plain NumPy formulas, real PNG plots, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.cases.inference import LoadedModel
from models.cases.registry import Registry
from models.reference.evaluation import NoEvaluationData, binary_metrics, evaluate, held_out

REGISTRY = Registry.load()


def test_threshold_metrics_equal_counts_by_hand() -> None:
    """accuracy, recall, precision, F1 and Brier equal their textbook formulas."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=200)
    p = np.clip(y * 0.6 + rng.normal(0.2, 0.25, size=200), 0, 1)
    m = binary_metrics(y, p, threshold=0.5)
    predicted = p >= 0.5
    tp = int((predicted & (y == 1)).sum())
    fp = int((predicted & (y == 0)).sum())
    fn = int((~predicted & (y == 1)).sum())
    assert m["accuracy"] == pytest.approx((predicted == y).mean())
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    # ROC AUC as the Mann-Whitney probability that a positive outranks a negative.
    pos, neg = p[y == 1], p[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert m["roc_auc"] == pytest.approx(wins / (len(pos) * len(neg)))


def test_report_folder_holds_metrics_and_three_png_plots(tmp_path: Path) -> None:
    """evaluate() scores the artifact on the held-out split and writes metrics.json + plots."""
    spec = REGISTRY.resolve("breast-cancer")
    report = evaluate(spec, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == report and saved["sha256"] == spec.sha256
    assert saved["metrics"]["n"] == 114
    assert saved["metrics"]["roc_auc"] == pytest.approx(spec.training["held_out_roc_auc"], abs=1e-4)
    data = held_out(spec)
    scores = [r.score for r in LoadedModel(spec, device="cpu").score(data.cases)]
    assert saved["metrics"]["accuracy"] == pytest.approx(
        np.mean((np.array(scores) >= 0.5) == data.labels)
    )
    for name in ("roc.png", "pr.png", "calibration.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_models_without_labelled_data_are_refused() -> None:
    """Benchmark-weight models have nothing to be evaluated on, and say so."""
    with pytest.raises(NoEvaluationData, match=r"vitals-gru@0\.1\.0 has no labelled held-out data"):
        held_out(REGISTRY.resolve("vitals-gru"))
