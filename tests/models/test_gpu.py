"""The CUDA path agrees with the CPU path (runs only where torch sees a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.cases.inference import LoadedModel
from models.cases.registry import Registry
from models.reference import breast_cancer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_scores_equal_cpu_scores() -> None:
    """The held-out cases score the same on CUDA as on the CPU (to 1e-5)."""
    spec = Registry.load().resolve("breast-cancer")
    split = breast_cancer.split()
    cases = [dict(zip(split.feature_names, map(float, x), strict=True)) for x in split.x_test]
    cpu = LoadedModel(spec, device="cpu").score(cases)
    cuda = LoadedModel(spec, device="cuda")
    assert cuda.device.type == "cuda"
    np.testing.assert_allclose(
        [r.score for r in cuda.score(cases)], [r.score for r in cpu], atol=1e-5
    )
