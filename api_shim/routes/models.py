"""The model registry over HTTP: which models exist, what they take and what they answer."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel

from api_shim.deps import RegistryDep, SettingsDep, TenantDep
from api_shim.errors import model_problem
from models.cases.registry import ModelSpec, Registry, RegistryError, report_dir

router = APIRouter(prefix="/v1", tags=["models"])


class InputPublic(BaseModel):
    name: str
    unit: str
    description: str
    #: Where an EHR holds it and how it is chosen (FHIR resource, codes with their systems,
    #: time rule, window, what an unreadable value does): docs/fhir.md.
    source: dict[str, Any] | None = None
    #: "reject", or the value imputed when a record lacks it, and where that value comes from.
    missing: float | str | None = None
    missing_source: str | None = None
    allowed: list[float] | None = None
    #: Bounds, each {"low", "high", "policy": "reject" | "flag", "source"}.
    ranges: list[dict[str, Any]] | None = None


class ModelVersionPublic(BaseModel):
    version: str
    status: str
    default: bool
    architecture: str
    input_kind: str
    inputs: list[InputPublic]
    min_length: int | None
    max_length: int | None
    vocab_size: int | None
    output: str
    labels: list[str]
    threshold: float
    sha256: str
    clinical_use: str


class ModelPublic(BaseModel):
    name: str
    default_version: str | None
    versions: list[ModelVersionPublic]


class ModelsPublic(BaseModel):
    models: list[ModelPublic]


def _version(spec: ModelSpec) -> ModelVersionPublic:
    sequence = spec.input_kind != "tabular"
    return ModelVersionPublic(
        version=spec.version,
        status=spec.status,
        default=spec.default,
        architecture=spec.architecture,
        input_kind=spec.input_kind,
        inputs=[InputPublic.model_validate(f.to_json()) for f in spec.inputs],
        min_length=spec.min_length if sequence else None,
        max_length=spec.max_length if sequence else None,
        vocab_size=spec.vocab_size,
        output=spec.output,
        labels=list(spec.labels),
        threshold=spec.threshold,
        sha256=spec.sha256,
        clinical_use=spec.clinical_use,
    )


def _model(registry: Registry, name: str) -> ModelPublic:
    specs = [s for s in registry if s.name == name]
    try:
        default = registry.resolve(name).version
    except RegistryError:
        default = None  # every version retired
    return ModelPublic(name=name, default_version=default, versions=[_version(s) for s in specs])


@router.get("/models", response_model=ModelsPublic)
def list_models(registry: RegistryDep, _: TenantDep) -> ModelsPublic:
    """Every model with its versions, input schema, output meaning, threshold and status."""
    return ModelsPublic(models=[_model(registry, name) for name in registry.names()])


@router.get("/models/{name}/{version}/report", responses={404: {}})
def read_report(
    name: str, version: str, registry: RegistryDep, settings: SettingsDep, _: TenantDep
) -> dict[str, Any]:
    """The held-out evaluation metrics of a model version (written by `medbatch models evaluate`)."""
    try:
        spec = registry.resolve(f"{name}@{version}")
    except RegistryError:
        ref = f"{name}@{version}"
        raise HTTPException(status.HTTP_404_NOT_FOUND, model_problem(registry, ref)) from None
    path = report_dir(settings.artifact_dir, spec) / "metrics.json"
    if not path.is_file():
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"no evaluation report for {spec.ref} yet: run `medbatch models evaluate {spec.ref}`",
        )
    report: dict[str, Any] = json.loads(path.read_text())
    return report


@router.get("/models/{name}", response_model=ModelPublic, responses={404: {}})
def read_model(name: str, registry: RegistryDep, _: TenantDep) -> ModelPublic:
    """One model and its versions."""
    if name not in registry.names():
        raise HTTPException(status.HTTP_404_NOT_FOUND, model_problem(registry, name))
    return _model(registry, name)
