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


def test_other_weights_in_out_are_kept_unless_forced(tmp_path: Path, capsys) -> None:
    """A second run with the same bytes is fine; an artifact with other weights (a model someone
    registered under that name) is kept, and the CLI says so, unless --force."""
    from medbatch.cli import main

    first = train("vitals-gru", out_dir=tmp_path)
    assert train("vitals-gru", out_dir=tmp_path).sha256 == first.sha256
    other = b"other weights"
    first.artifact.write_bytes(other)
    with pytest.raises(FileExistsError, match="--force"):
        train("vitals-gru", out_dir=tmp_path)
    assert first.artifact.read_bytes() == other
    assert main(["models", "train", "vitals-gru", "--out", str(tmp_path)]) == 2
    assert "exists with other weights" in capsys.readouterr().err
    assert first.artifact.read_bytes() == other
    assert main(["models", "train", "vitals-gru", "--out", str(tmp_path), "--force"]) == 0
    assert first.artifact.read_bytes() != other
    assert [p.name for p in tmp_path.iterdir()] == [first.artifact.name]  # no partial file left
