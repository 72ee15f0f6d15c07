"""Cases for the benchmarks, made from real data where the model has some."""

from __future__ import annotations

import numpy as np

from models.cases.registry import ModelSpec
from models.reference import breast_cancer

#: The naive comparison worker's task and queue (bench/naive_worker.py).
NAIVE_TASK = "bench.score_one_case"
NAIVE_QUEUE = "bench.naive"


def make_cases(spec: ModelSpec, n: int, *, seed: int = 0) -> list[dict]:
    """``n`` feature dicts for ``spec``: the 569 real WDBC cases repeated for breast-cancer,
    synthetic vital-sign series for vitals-gru."""
    if spec.name == "breast-cancer":
        split = breast_cancer.split()
        x = np.concatenate([split.x_train, split.x_test])
        return [
            dict(zip(split.feature_names, map(float, x[i % len(x)]), strict=True)) for i in range(n)
        ]
    if spec.name == "vitals-gru":
        return vitals_series(n, seed=seed, max_length=spec.max_length or 48)
    raise ValueError(f"no benchmark workload for {spec.ref}")


def vitals_series(
    n: int, *, seed: int = 0, min_length: int = 6, max_length: int = 48
) -> list[dict]:
    """Hourly vital-sign series of random length: a random walk around adult norms (synthetic)."""
    rng = np.random.default_rng(seed)
    base = np.array([80.0, 120.0, 75.0, 16.0, 97.0, 37.0])
    step = np.array([3.0, 4.0, 3.0, 1.0, 0.5, 0.1])
    names = ["heart_rate", "systolic_bp", "diastolic_bp", "respiratory_rate", "spo2", "temperature"]
    cases = []
    for _ in range(n):
        length = int(rng.integers(min_length, max_length + 1))
        walk = base + np.cumsum(rng.normal(0, step, size=(length, 6)), axis=0)
        cases.append(
            {name: [round(float(v), 2) for v in walk[:, j]] for j, name in enumerate(names)}
        )
    return cases
