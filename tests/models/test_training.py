"""`medbatch models train breast-cancer` is reproducible and beats nothing it should not claim to."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.cases.registry import Registry
from models.reference.train import train
from tests.helpers import assert_retrained_is_packaged


@pytest.mark.slow
def test_training_reproduces_the_packaged_model(tmp_path: Path) -> None:
    """Retraining with the fixed seed gives the packaged weights and the recorded held-out AUCs."""
    report = train("breast-cancer", out_dir=tmp_path)
    assert_retrained_is_packaged(
        report,
        Registry.load().resolve("breast-cancer"),
        {
            "mlp_held_out_roc_auc": "held_out_roc_auc",
            "logistic_regression_held_out_roc_auc": "baseline_held_out_roc_auc",
        },
    )
    assert report.metrics["n_test"] == 114


def test_unknown_recipe_is_refused(tmp_path: Path) -> None:
    """Only models with a recipe can be trained."""
    with pytest.raises(ValueError, match=r"no training recipe for 'nope'.*vitals-gru"):
        train("nope", out_dir=tmp_path)
