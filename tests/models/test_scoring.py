"""The inference contract, checked against a plain-NumPy forward pass and the true labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from models.cases.featurize import FeatureError, check_features
from models.cases.inference import LoadedModel
from models.cases.registry import Registry
from models.device import resolve_device
from models.reference import breast_cancer


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return LoadedModel(Registry.load().resolve("breast-cancer"), device="cpu")


def numpy_reference(weights_path: str, x: np.ndarray) -> np.ndarray:
    """The MLP written out by hand in float64: standardize, (Linear, ReLU)*, Linear, sigmoid."""
    w = {k: v.astype(np.float64) for k, v in load_file(weights_path).items()}
    h = (x - w["mean"]) / w["std"]
    layers = sorted({k.split(".")[1] for k in w if k.startswith("net.")}, key=int)
    for i, layer in enumerate(layers):
        h = h @ w[f"net.{layer}.weight"].T + w[f"net.{layer}.bias"]
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return 1.0 / (1.0 + np.exp(-h[:, 0]))


def _cases(x: np.ndarray) -> list[dict[str, float]]:
    names = breast_cancer.split().feature_names
    return [dict(zip(names, map(float, row), strict=True)) for row in x]


def test_scores_match_a_numpy_forward_pass(model: LoadedModel) -> None:
    """Every held-out score equals an independent float64 NumPy evaluation to 1e-5."""
    split = breast_cancer.split()
    rows = model.score(_cases(split.x_test))
    expected = numpy_reference(str(model.spec.artifact), split.x_test)
    np.testing.assert_allclose([r.score for r in rows], expected, atol=1e-5)


def test_held_out_auc_is_what_the_registry_records(model: LoadedModel) -> None:
    """Held-out ROC AUC, recomputed through the inference contract, equals the recorded one."""
    from sklearn.metrics import roc_auc_score

    split = breast_cancer.split()
    scores = [r.score for r in model.score(_cases(split.x_test))]
    auc = roc_auc_score(split.y_test, scores)
    assert auc == pytest.approx(model.spec.training["held_out_roc_auc"], abs=1e-4)
    assert auc > 0.98


def test_labels_follow_the_threshold(model: LoadedModel) -> None:
    """label is the positive label exactly when score >= threshold."""
    rows = model.score(_cases(breast_cancer.split().x_test))
    for r in rows:
        assert r.label == ("malignant" if r.score >= model.spec.threshold else "benign")
    assert {r.label for r in rows} == {"benign", "malignant"}


def test_a_case_alone_and_in_a_batch_agree(model: LoadedModel) -> None:
    """Batching does not change a case's score (to 1e-6)."""
    cases = _cases(breast_cancer.split().x_test[:32])
    batched = [r.score for r in model.score(cases)]
    alone = [model.score([c])[0].score for c in cases]
    np.testing.assert_allclose(batched, alone, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda f: f.pop("mean_radius"), {"mean_radius": "missing feature"}),
        (lambda f: f.update(shoe_size=42.0), {"shoe_size": "unexpected feature"}),
        (lambda f: f.update(mean_area=float("nan")), {"mean_area": "finite"}),
        (lambda f: f.update(mean_area=float("inf")), {"mean_area": "finite"}),
        (lambda f: f.update(mean_area="12.5"), {"mean_area": "expected a number, got str"}),
        (lambda f: f.update(mean_area=True), {"mean_area": "expected a number, got bool"}),
    ],
)
def test_features_that_do_not_fit_are_named(model: LoadedModel, change, problem) -> None:  # type: ignore[no-untyped-def]
    """check_features names the feature and the problem; featurize refuses the batch."""
    features = _cases(breast_cancer.split().x_test[:1])[0]
    change(features)
    found = check_features(model.spec, features)
    ((name, fragment),) = problem.items()
    assert set(found) == {name}
    assert fragment in found[name]
    with pytest.raises(FeatureError, match=name):
        model.featurize([features])


def test_wrong_batch_shape_is_refused(model: LoadedModel) -> None:
    """predict says what shape it expected and what came."""
    with pytest.raises(ValueError, match=r"expects a batch of shape \(N, 30\), got \(4, 29\)"):
        model.predict(torch.zeros(4, 29))


def test_auto_device_is_cuda_only_when_present() -> None:
    """auto → cuda when torch sees a GPU, else cpu; asking for cuda without one is an error."""
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")
