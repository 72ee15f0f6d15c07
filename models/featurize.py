"""Case features → arrays in the model's input order. NumPy only, so the API can validate cheaply."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from models.registry import ModelSpec


class FeatureError(ValueError):
    """A case whose features do not fit the model's input schema."""


def check_features(spec: ModelSpec, features: Mapping[str, object]) -> dict[str, str]:
    """Every problem with one case's features, as ``{feature name: message}``; empty if fine."""
    # The common case first, cheaply: exactly the schema's names, every value a finite number.
    if features.keys() == spec.feature_set and all(
        type(v) is float and math.isfinite(v) for v in features.values()
    ):
        return {}
    problems: dict[str, str] = {}
    for name in spec.feature_names:
        if name not in features:
            problems[name] = "missing feature"
            continue
        value = features[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems[name] = f"expected a number, got {type(value).__name__}"
        elif not math.isfinite(value):
            problems[name] = "must be a finite number"
    for name in sorted(set(features) - set(spec.feature_names)):
        problems[name] = f"unexpected feature: not in the input schema of {spec.ref}"
    return problems


def featurize(
    spec: ModelSpec, cases: Sequence[Mapping[str, object]], *, checked: bool = False
) -> np.ndarray:
    """Stack cases' features in schema order.

    Returns
    -------
    np.ndarray of shape (N, F), float32, F = ``len(spec.inputs)``.

    Raises
    ------
    FeatureError
        naming the first case that does not fit the schema and each of its problems (unless
        ``checked``: the caller has run :func:`check_features` on every case already).
    """
    names = spec.feature_names
    if not checked:
        for i, features in enumerate(cases):
            problems = check_features(spec, features)
            if problems:
                detail = "; ".join(f"{k}: {v}" for k, v in problems.items())
                raise FeatureError(f"case {i}: {detail}")
    rows = [[features[name] for name in names] for features in cases]
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(names))
