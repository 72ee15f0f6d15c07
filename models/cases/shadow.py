"""Shadow scoring: a ``candidate`` version scores the released version's cases too, its scores
kept beside the results (never as them), and ``medbatch models drift`` compares the two.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.cases.registry import (
    ArtifactIntegrityError,
    ModelSpec,
    RegistryError,
    load_registry,
    shadows_path,
    verify_artifact,
)


class ShadowError(ValueError):
    """A shadow assignment that cannot work (unknown version, not a candidate, other inputs)."""


def set_shadow(artifact_dir: Path, ref: str) -> tuple[ModelSpec, ModelSpec]:
    """Let the candidate ``name@version`` shadow ``name``'s default; return (released, candidate).

    Workers read the assignment when they start.
    """
    name, _, version = ref.partition("@")
    if not version:
        raise ShadowError(f"name the candidate's version: {name}@VERSION")
    registry = load_registry(artifact_dir)
    try:
        candidate = registry.resolve(ref)
        released = registry.resolve(name)
    except RegistryError as exc:
        raise ShadowError(exc.args[0]) from None
    if candidate.status != "candidate":
        raise ShadowError(f"{candidate.ref} is {candidate.status}; only a candidate can shadow")
    if candidate.version == released.version:
        raise ShadowError(f"{candidate.ref} is {name}'s default version; it cannot shadow itself")
    if (candidate.input_kind, candidate.feature_names) != (
        released.input_kind,
        released.feature_names,
    ):
        raise ShadowError(
            f"{candidate.ref} takes other inputs than {released.ref}: "
            f"{candidate.input_kind} {list(candidate.feature_names)} vs "
            f"{released.input_kind} {list(released.feature_names)}"
        )
    # The candidate is fed the released version's batch: the same names in other units, or
    # series of another length, would be scored without an error and mean nothing.
    differences = [
        f"{f.name} in {f.unit!r} vs {g.unit!r}"
        for f, g in zip(candidate.inputs, released.inputs, strict=True)
        if f.unit != g.unit
    ]
    for what in (
        ("min_length", "max_length", "vocab_size") if released.input_kind != "tabular" else ()
    ):
        new, old = getattr(candidate, what), getattr(released, what)
        if new != old:
            differences.append(f"{what} {new} vs {old}")
    if differences:
        raise ShadowError(
            f"{candidate.ref} takes other inputs than {released.ref}: " + "; ".join(differences)
        )
    try:
        verify_artifact(candidate)
    except ArtifactIntegrityError as exc:  # workers would skip it, with a warning in their log
        raise ShadowError(f"{exc}; workers could not load it") from None
    _write(artifact_dir, {**registry.shadows, name: candidate.version})
    return released, candidate


def clear_shadow(artifact_dir: Path, name: str) -> str | None:
    """Stop shadowing ``name``; return the version that was shadowing, if any."""
    shadows = load_registry(artifact_dir).shadows
    previous = shadows.pop(name, None)
    _write(artifact_dir, shadows)
    return previous


def _write(artifact_dir: Path, shadows: dict[str, str]) -> None:
    artifact_dir.mkdir(parents=True, exist_ok=True)
    path = shadows_path(artifact_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(shadows, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


@dataclass(frozen=True)
class Drift:
    released: str
    candidate: str
    cases: int
    mean_abs_diff: float
    max_abs_diff: float
    spearman: float
    flips: int
    flips_up: int  # released below its threshold, candidate at or above its own
    flips_down: int

    def as_dict(self) -> dict[str, object]:
        """The fields, a rank correlation that does not exist (one case, constant scores) as
        None: ``--json`` must stay JSON, which has no NaN."""
        out = asdict(self)
        if not np.isfinite(self.spearman):
            out["spearman"] = None
        return out


def drift(released: ModelSpec, candidate: ModelSpec, pairs: list[tuple[float, float]]) -> Drift:
    """Compare both versions' scores of the same cases; each label uses its own threshold."""
    from scipy.stats import spearmanr

    if not pairs:
        raise ShadowError(f"no case has been scored by both {released.ref} and {candidate.ref}")
    a, b = np.asarray(pairs, dtype=np.float64).T
    diff = np.abs(a - b)
    up = (a < released.threshold) & (b >= candidate.threshold)
    down = (a >= released.threshold) & (b < candidate.threshold)
    with warnings.catch_warnings():  # constant scores: no rank correlation, said as NaN
        warnings.simplefilter("ignore")
        rho = float(spearmanr(a, b).statistic) if len(a) > 1 else float("nan")
    return Drift(
        released=released.ref,
        candidate=candidate.ref,
        cases=len(a),
        mean_abs_diff=float(diff.mean()),
        max_abs_diff=float(diff.max()),
        spearman=rho,
        flips=int(up.sum() + down.sum()),
        flips_up=int(up.sum()),
        flips_down=int(down.sum()),
    )
