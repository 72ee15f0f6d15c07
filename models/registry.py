"""The model registry: which models exist, what they take, what they answer, and which bytes they are.

The registry is a small JSON file (``models/registry.json``) listing each model version: name,
version, architecture, artifact path and its sha256, the input schema (ordered feature names with
units), what the output means and the decision threshold. Artifacts are verified by sha256 before
any byte of them is loaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

REGISTRY_PATH = Path(__file__).with_name("registry.json")

Status = Literal["released", "candidate", "retired"]
#: tabular: one number per input. series: per input (a channel) a list of numbers, all of one
#: length. tokens: one input, a list of integer codes.
InputKind = Literal["tabular", "series", "tokens"]


class RegistryError(LookupError):
    """A model or version that the registry does not know."""


class ArtifactIntegrityError(RuntimeError):
    """An artifact whose bytes do not hash to the sha256 the registry records."""


@dataclass(frozen=True)
class FeatureSpec:
    """One input of a model: its name, unit (UCUM where one exists) and, optionally, its rules.

    ``source`` says where an EHR holds the value, e.g. ``{"resource": "Observation", "system":
    "http://loinc.org", "codes": ["8867-4"]}``; ``missing`` what happens when a record lacks it
    (``"reject"`` the case, or impute the stated number); ``allowed`` the only values accepted
    (``[0, 1]`` for a condition's presence); ``range`` the plausible ``[low, high]``.
    """

    name: str
    unit: str
    description: str = ""
    source: dict[str, Any] | None = None
    missing: float | Literal["reject"] | None = None
    allowed: tuple[float, ...] | None = None
    range: tuple[float, float] | None = None

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> FeatureSpec:
        allowed, range_ = entry.get("allowed"), entry.get("range")
        return cls(
            **{k: v for k, v in entry.items() if k not in ("allowed", "range")},
            allowed=None if allowed is None else tuple(float(v) for v in allowed),
            range=None if range_ is None else (float(range_[0]), float(range_[1])),
        )

    def to_json(self) -> dict[str, Any]:
        """The registry form: rules that are not set are left out."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in vars(self).items()
            if v is not None
        }

    @property
    def constrained(self) -> bool:
        return self.allowed is not None or self.range is not None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    architecture: str
    artifact: Path
    sha256: str
    inputs: tuple[FeatureSpec, ...]
    output: str
    threshold: float
    labels: tuple[str, str] = ("negative", "positive")
    status: Status = "released"
    default: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    clinical_use: str = ""
    input_kind: InputKind = "tabular"
    #: Allowed sequence lengths (series and tokens).
    min_length: int = 1
    max_length: int | None = None
    #: Codes are 1 .. vocab_size - 1 (tokens).
    vocab_size: int | None = None

    @property
    def ref(self) -> str:
        """``name@version``, the form submissions may pin."""
        return f"{self.name}@{self.version}"

    @cached_property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.inputs)

    @cached_property
    def feature_set(self) -> frozenset[str]:
        return frozenset(self.feature_names)

    @cached_property
    def constrained(self) -> bool:
        """Whether any input has allowed values or a plausible range to check."""
        return any(f.constrained for f in self.inputs)


def report_dir(artifact_dir: Path, spec: ModelSpec) -> Path:
    """Where ``medbatch models evaluate`` writes a version's report in the artifact store."""
    return artifact_dir / "reports" / f"{spec.name}-{spec.version}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_artifact(spec: ModelSpec) -> Path:
    """Return the artifact path once its sha256 matches the registry; raise otherwise."""
    if not spec.artifact.is_file():
        raise ArtifactIntegrityError(f"{spec.ref}: artifact {spec.artifact} does not exist")
    actual = sha256_file(spec.artifact)
    if actual != spec.sha256:
        raise ArtifactIntegrityError(
            f"{spec.ref}: artifact {spec.artifact} has sha256 {actual}, "
            f"the registry expects {spec.sha256}; refusing to load it"
        )
    return spec.artifact


class Registry:
    """All model versions listed in one registry file."""

    def __init__(
        self,
        specs: list[ModelSpec],
        *,
        path: Path | None = None,
        shadows: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self._specs = {(s.name, s.version): s for s in specs}
        #: model name -> the candidate version that shadows its default version
        self.shadows = dict(shadows or {})

    @classmethod
    def load(cls, path: Path = REGISTRY_PATH) -> Registry:
        raw = json.loads(path.read_text())
        specs = [_spec_from_json(entry, base=path.parent) for entry in raw["models"]]
        return cls(specs, path=path)

    def merged(self, other: Registry) -> Registry:
        """This registry with ``other``'s versions added (a version in both keeps this one's)."""
        return Registry(
            [*other._specs.values(), *self._specs.values()],
            path=self.path,
            shadows={**other.shadows, **self.shadows},
        )

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(sorted(self._specs.values(), key=lambda s: (s.name, s.version)))

    def names(self) -> list[str]:
        return sorted({name for name, _ in self._specs})

    def resolve(self, ref: str) -> ModelSpec:
        """Look up ``name`` (its default version) or ``name@version``."""
        name, _, version = ref.partition("@")
        if version:
            spec = self._specs.get((name, version))
            if spec is None:
                known = ", ".join(s.ref for s in self if s.name == name) or "none"
                raise RegistryError(f"unknown model version {ref!r} (known versions: {known})")
            return spec
        candidates = [s for s in self if s.name == name and s.status != "retired"]
        if not candidates:
            raise RegistryError(
                f"unknown model {name!r} (known models: {', '.join(self.names()) or 'none'})"
            )
        defaults = [s for s in candidates if s.default]
        return defaults[0] if defaults else candidates[-1]

    def shadow_for(self, name: str, version: str) -> ModelSpec | None:
        """The candidate that also scores cases of ``name@version``, if that is the default."""
        candidate = self.shadows.get(name)
        if candidate is None or candidate == version:
            return None
        try:
            if self.resolve(name).version != version:
                return None
        except RegistryError:
            return None
        return self._specs.get((name, candidate))


def user_registry_path(artifact_dir: Path) -> Path:
    """Models registered with ``medbatch models register`` are listed here, in the store."""
    return artifact_dir / "registry.json"


def load_registry(artifact_dir: Path | None) -> Registry:
    """The packaged registry plus the models registered into ``artifact_dir``."""
    registry = Registry.load(REGISTRY_PATH)
    if artifact_dir is not None and user_registry_path(artifact_dir).is_file():
        registry = registry.merged(Registry.load(user_registry_path(artifact_dir)))
    if artifact_dir is not None and shadows_path(artifact_dir).is_file():
        registry.shadows = json.loads(shadows_path(artifact_dir).read_text())
    return registry


def shadows_path(artifact_dir: Path) -> Path:
    """Which candidate shadows which model (``medbatch models shadow``), in the store."""
    return artifact_dir / "shadows.json"


def _spec_from_json(entry: dict[str, Any], *, base: Path) -> ModelSpec:
    return ModelSpec(
        name=entry["name"],
        version=entry["version"],
        architecture=entry["architecture"],
        artifact=(base / entry["artifact"]).resolve(),
        sha256=entry["sha256"],
        inputs=tuple(FeatureSpec.from_json(f) for f in entry["inputs"]),
        output=entry["output"],
        threshold=float(entry["threshold"]),
        labels=tuple(entry.get("labels", ("negative", "positive"))),
        status=entry.get("status", "released"),
        default=bool(entry.get("default", False)),
        params=entry.get("params", {}),
        training=entry.get("training", {}),
        clinical_use=entry.get("clinical_use", ""),
        input_kind=entry.get("input_kind", "tabular"),
        min_length=int(entry.get("min_length", 1)),
        max_length=entry.get("max_length"),
        vocab_size=entry.get("vocab_size"),
    )
