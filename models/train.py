"""``medbatch models train NAME``: reproducible training of the reference models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from models import breast_cancer, reference
from models.registry import REGISTRY_PATH

TRAINABLE = ("breast-cancer", *reference.RECIPES)


@dataclass(frozen=True)
class TrainReport:
    name: str
    version: str
    artifact: Path
    sha256: str
    committed_sha256: str | None
    metrics: dict[str, float]


def train(name: str, *, out_dir: Path, install: bool = False) -> TrainReport:
    """Train ``name`` into ``out_dir``; with ``install``, replace the packaged artifact and entry."""
    if name in reference.RECIPES:
        return _benchmark_weights(name, out_dir=out_dir, install=install)
    if name != "breast-cancer":
        raise ValueError(f"no training recipe for {name!r} (trainable: {', '.join(TRAINABLE)})")
    filename = f"{breast_cancer.NAME}-{breast_cancer.VERSION}.safetensors"
    target = (REGISTRY_PATH.parent / "artifacts" if install else out_dir) / filename
    result = breast_cancer.train(target)
    registry = json.loads(REGISTRY_PATH.read_text()) if REGISTRY_PATH.exists() else {"models": []}
    committed = next(
        (
            m["sha256"]
            for m in registry["models"]
            if (m["name"], m["version"]) == (breast_cancer.NAME, breast_cancer.VERSION)
        ),
        None,
    )
    if install:
        entry = breast_cancer.registry_entry(result, artifact=f"artifacts/{filename}")
        others = [
            m
            for m in registry["models"]
            if (m["name"], m["version"]) != (breast_cancer.NAME, breast_cancer.VERSION)
        ]
        registry["models"] = [*others, entry]
        REGISTRY_PATH.write_text(json.dumps(registry, indent=2) + "\n")
    return TrainReport(
        name=breast_cancer.NAME,
        version=breast_cancer.VERSION,
        artifact=target,
        sha256=result.sha256,
        committed_sha256=committed,
        metrics={
            "mlp_held_out_roc_auc": result.mlp_auc,
            "logistic_regression_held_out_roc_auc": result.baseline_auc,
            "n_train": result.n_train,
            "n_test": result.n_test,
        },
    )


def _committed_sha256(registry: dict, name: str, version: str) -> str | None:
    return next(
        (m["sha256"] for m in registry["models"] if (m["name"], m["version"]) == (name, version)),
        None,
    )


def _install(registry: dict, entry: dict) -> None:
    key = (entry["name"], entry["version"])
    registry["models"] = [
        *(m for m in registry["models"] if (m["name"], m["version"]) != key),
        entry,
    ]
    REGISTRY_PATH.write_text(json.dumps(registry, indent=2) + "\n")


def _benchmark_weights(name: str, *, out_dir: Path, install: bool) -> TrainReport:
    recipe = reference.RECIPES[name]
    filename = f"{recipe.name}-{recipe.version}.safetensors"
    target = (REGISTRY_PATH.parent / "artifacts" if install else out_dir) / filename
    _, entry = reference.write(recipe, target)
    registry = json.loads(REGISTRY_PATH.read_text())
    committed = _committed_sha256(registry, recipe.name, recipe.version)
    if install:
        _install(registry, {**entry, "artifact": f"artifacts/{filename}"})
    return TrainReport(recipe.name, recipe.version, target, entry["sha256"], committed, {})
