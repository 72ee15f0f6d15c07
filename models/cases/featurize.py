"""Case features → arrays in the model's input order. NumPy only, so the API can validate cheaply."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import numpy as np

from models.cases.registry import FeatureSpec, ModelSpec


class FeatureError(ValueError):
    """A case whose features do not fit the model's input schema."""


#: The largest finite float32: models compute in 32-bit floats, where anything larger is inf.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _number_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number, got {type(value).__name__}"
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf
    if not math.isfinite(number):
        return "must be a finite number"
    if abs(number) > FLOAT32_MAX:
        return "too large: models compute in 32-bit floats (at most 3.4e38 in magnitude)"
    return None


def check_features(spec: ModelSpec, features: Mapping[str, object]) -> dict[str, str]:
    """Every problem with one case's features, as ``{feature name: message}``; empty if fine."""
    if spec.input_kind == "series":
        return _check_series(spec, features)
    if spec.input_kind == "tokens":
        return _check_tokens(spec, features)
    # The common case first, cheaply: exactly the schema's names, every value a finite number.
    if (
        not spec.constrained
        and features.keys() == spec.feature_set
        and all(type(v) is float and abs(v) <= FLOAT32_MAX for v in features.values())
    ):
        return {}
    problems: dict[str, str] = {}
    for feature in spec.inputs:
        name = feature.name
        if name not in features:
            problems[name] = "missing feature"
        else:
            problem = _number_problem(features[name]) or rule_problem(
                feature, cast(float, features[name])
            )
            if problem is not None:
                problems[name] = problem
    problems.update(_extra(spec, features))
    return problems


def rule_problem(feature: FeatureSpec, value: float) -> str | None:
    """What is wrong with a number for ``feature``'s allowed values or plausible range; the
    message never repeats the value (it may be patient data)."""
    if feature.allowed is not None and value not in feature.allowed:
        return f"expected one of {', '.join(f'{v:g}' for v in feature.allowed)}"
    for bound in feature.reject_ranges:
        if not bound.low <= value <= bound.high:
            return f"outside the plausible range {bound.low:g}..{bound.high:g} {feature.unit}"
    return None


def rule_flags(feature: FeatureSpec, value: float) -> list[str]:
    """The ``flag`` ranges a number lies outside: accepted, and said so (no value repeated)."""
    return [
        f"outside {bound.low:g}..{bound.high:g} {feature.unit} ({bound.source})"
        for bound in feature.flag_ranges
        if not bound.low <= value <= bound.high
    ]


def _extra(spec: ModelSpec, features: Mapping[str, object]) -> dict[str, str]:
    return {
        name: f"unexpected feature: not in the input schema of {spec.ref}"
        for name in sorted(set(features) - spec.feature_set)
    }


def _check_length(spec: ModelSpec, n: int) -> str | None:
    top = spec.max_length if spec.max_length is not None else n
    if not spec.min_length <= n <= top:
        allowed = f"{spec.min_length}" if spec.min_length == top else f"{spec.min_length}..{top}"
        return f"length {n}, expected {allowed}"
    return None


def _sequence(
    spec: ModelSpec, features: Mapping[str, object], name: str, *, missing: str, items: str
) -> list[object] | str:
    """Feature ``name`` as a list of the schema's length, or what is wrong with it (``missing``
    where it is absent; ``items`` says what the list should hold)."""
    values = features.get(name)
    if name not in features:
        return missing
    if not isinstance(values, list):
        return f"expected a list of {items}, got {type(values).__name__}"
    return _check_length(spec, len(values)) or values


def _check_series(spec: ModelSpec, features: Mapping[str, object]) -> dict[str, str]:
    problems: dict[str, str] = {}
    lengths: dict[str, int] = {}
    for name in spec.feature_names:
        values = _sequence(spec, features, name, missing="missing channel", items="numbers")
        if isinstance(values, str):
            problems[name] = values
        else:
            for i, value in enumerate(values):
                if (problem := _number_problem(value)) is not None:
                    problems[name] = f"value {i}: {problem}"
                    break
            else:
                lengths[name] = len(values)
    if len(set(lengths.values())) > 1:
        first = spec.feature_names[0] if spec.feature_names[0] in lengths else next(iter(lengths))
        for name, n in lengths.items():
            if n != lengths[first]:
                problems[name] = (
                    f"length {n}, but {first} has {lengths[first]}: channels must align"
                )
    problems.update(_extra(spec, features))
    return problems


def _check_tokens(spec: ModelSpec, features: Mapping[str, object]) -> dict[str, str]:
    problems: dict[str, str] = {}
    (name,) = spec.feature_names
    codes = _sequence(spec, features, name, missing="missing feature", items="integer codes")
    if isinstance(codes, str):
        problems[name] = codes
    else:
        top = spec.vocab_size or 0
        for i, code in enumerate(codes):
            # The rule and the kind of value, never the value: a code is the patient's data.
            if isinstance(code, bool) or not isinstance(code, int):
                got = type(code).__name__
                problems[name] = f"value {i}: expected an integer code in 1..{top - 1}, got {got}"
                break
            if not 1 <= code < top:
                problems[name] = f"value {i}: integer code outside 1..{top - 1}"
                break
    problems.update(_extra(spec, features))
    return problems


def case_length(spec: ModelSpec, features: Mapping[str, object]) -> int:
    """Steps in a (checked) case: 1 for tabular inputs."""
    if spec.input_kind == "tabular":
        return 1
    return len(features[spec.feature_names[0]])  # type: ignore[arg-type]


def featurize(
    spec: ModelSpec, cases: Sequence[Mapping[str, object]], *, checked: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stack cases' features in schema order, padding sequences to the longest in the batch.

    Returns
    -------
    values : np.ndarray
        tabular: (N, F) float32; series: (N, T, C) float32, zero after each case's length;
        tokens: (N, T) int64, 0 (padding) after each case's length.
    lengths : np.ndarray of shape (N,), int64, or None for tabular inputs.

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
    if spec.input_kind == "tabular":
        rows = [[features[name] for name in names] for features in cases]
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(names)), None
    lengths = np.array([case_length(spec, f) for f in cases], dtype=np.int64)
    steps = int(lengths.max()) if len(cases) else 0
    if spec.input_kind == "series":
        values = np.zeros((len(cases), steps, len(names)), dtype=np.float32)
        for i, features in enumerate(cases):
            values[i, : lengths[i]] = np.asarray([features[n] for n in names], dtype=np.float32).T
        return values, lengths
    tokens = np.zeros((len(cases), steps), dtype=np.int64)
    for i, features in enumerate(cases):
        tokens[i, : lengths[i]] = np.asarray(features[names[0]], dtype=np.int64)
    return tokens, lengths
