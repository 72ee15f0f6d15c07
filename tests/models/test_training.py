"""`medbatch models train breast-cancer` is reproducible and beats nothing it should not claim to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from models.cases.registry import Registry
from models.reference.train import train


@pytest.mark.slow
def test_training_reproduces_the_packaged_model(tmp_path: Path) -> None:
    """Retraining with the fixed seed gives the packaged weights and the recorded held-out AUCs."""
    report = train("breast-cancer", out_dir=tmp_path)
    spec = Registry.load().resolve("breast-cancer")
    fresh, packaged = load_file(str(report.artifact)), load_file(str(spec.artifact))
    assert fresh.keys() == packaged.keys()
    for key in fresh:
        np.testing.assert_allclose(fresh[key], packaged[key], atol=1e-4, err_msg=key)
    assert report.metrics["mlp_held_out_roc_auc"] == pytest.approx(
        spec.training["held_out_roc_auc"], abs=1e-3
    )
    assert report.metrics["logistic_regression_held_out_roc_auc"] == pytest.approx(
        spec.training["baseline_held_out_roc_auc"], abs=1e-3
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
