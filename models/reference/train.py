"""``medbatch models train NAME``: reproducible training of the reference models."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from models.cases.registry import REGISTRY_PATH
from models.reference import breast_cancer, ecg, survival
from models.reference import recipes as reference

#: Models trained on real data. Each module has NAME, VERSION, train(out) -> result,
#: registry_entry(result, artifact=...) and metrics(result): the held-out figures beside the
#: baseline's.
TRAINED: dict[str, ModuleType] = {m.NAME: m for m in (breast_cancer, survival, ecg)}
#: What ``medbatch models train`` takes: a name, or name@version where versions differ in recipe.
TRAINABLE = (
    *TRAINED,
    *(n if n not in TRAINED else f"{n}@{r.version}" for n, r in reference.RECIPES.items()),
)


R = TypeVar("R")


@dataclass(frozen=True)
class TrainReport:
    name: str
    version: str
    artifact: Path
    sha256: str
    committed_sha256: str | None
    metrics: dict[str, float]


def train(
    name: str,
    *,
    out_dir: Path,
    ecg_dir: Path | None = None,
    install: bool = False,
    force: bool = False,
) -> TrainReport:
    """Train ``name`` into ``out_dir``; with ``install``, replace the packaged artifact and entry.
    ``ecg_dir`` holds the MIT-BIH record ecg-cnn trains on (``$MEDBATCH_SHARED_DIR/data/ecg``).

    An artifact already in ``out_dir`` with other bytes is kept, and :class:`FileExistsError`
    raised, unless ``force`` (a registered model's artifact is checked by its sha256: replacing
    it would stop that model from loading). The same bytes again are fine."""
    base, _, version = name.partition("@")
    module = TRAINED.get(base)
    if module is None or version not in ("", module.VERSION):
        recipe = reference.RECIPES.get(base)
        if recipe is None or version not in ("", recipe.version):
            raise ValueError(f"no training recipe for {name!r} (trainable: {', '.join(TRAINABLE)})")
        return _benchmark_weights(base, out_dir=out_dir, install=install, force=force)
    filename = f"{module.NAME}-{module.VERSION}.safetensors"
    target = (REGISTRY_PATH.parent / "artifacts" if install else out_dir) / filename
    write = module.train
    if module is ecg:
        if ecg_dir is None:
            raise ValueError(f"{name} trains on the MIT-BIH record: give ecg_dir")
        write = functools.partial(ecg.train, directory=ecg_dir)
    result = _place(write, target, replace=install or force)
    registry = json.loads(REGISTRY_PATH.read_text())
    committed = _committed_sha256(registry, module.NAME, module.VERSION)
    if install:
        _install(registry, module.registry_entry(result, artifact=f"artifacts/{filename}"))
    return TrainReport(
        name=module.NAME,
        version=module.VERSION,
        artifact=target,
        sha256=result.sha256,
        committed_sha256=committed,
        metrics=module.metrics(result),
    )


def _place(write: Callable[[Path], R], target: Path, *, replace: bool) -> R:
    """``write(path)`` beside ``target``, then moved onto it: unless ``replace``, only where
    nothing with other bytes is there (a refusal leaves the old file as it was)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        result = write(partial)
        if target.exists() and not replace and _sha256(target) != _sha256(partial):
            raise FileExistsError(
                f"{target} exists with other weights; pass --force to replace it, "
                "or --out another folder"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return result


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


def _benchmark_weights(name: str, *, out_dir: Path, install: bool, force: bool) -> TrainReport:
    recipe = reference.RECIPES[name]
    filename = f"{recipe.name}-{recipe.version}.safetensors"
    target = (REGISTRY_PATH.parent / "artifacts" if install else out_dir) / filename
    _, entry = _place(lambda out: reference.write(recipe, out), target, replace=install or force)
    registry = json.loads(REGISTRY_PATH.read_text())
    committed = _committed_sha256(registry, recipe.name, recipe.version)
    if install:
        _install(registry, {**entry, "artifact": f"artifacts/{filename}"})
    return TrainReport(recipe.name, recipe.version, target, entry["sha256"], committed, {})
