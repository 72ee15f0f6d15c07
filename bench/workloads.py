"""Cases for the benchmarks, made from real data where the model has some."""

from __future__ import annotations

import numpy as np

from models import breast_cancer
from models.registry import ModelSpec

#: The naive comparison worker's task and queue (bench/naive_worker.py).
NAIVE_TASK = "bench.score_one_case"
NAIVE_QUEUE = "bench.naive"


def make_cases(spec: ModelSpec, n: int, *, seed: int = 0) -> list[dict]:
    """``n`` feature dicts for ``spec``: the 569 real WDBC cases repeated for breast-cancer."""
    if spec.name == "breast-cancer":
        split = breast_cancer.split()
        x = np.concatenate([split.x_train, split.x_test])
        return [
            dict(zip(split.feature_names, map(float, x[i % len(x)]), strict=True)) for i in range(n)
        ]
    raise ValueError(f"no benchmark workload for {spec.ref}")
