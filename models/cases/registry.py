"""The model registry: which models exist, what they take, what they answer, and which bytes they are.

The registry is a small JSON file (``models/registry.json``) listing each model version: name,
version, architecture, artifact path and its sha256, the input schema (ordered feature names with
units), what the output means and the decision threshold. Artifacts are verified by sha256 before
any byte of them is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Literal

REGISTRY_PATH = Path(__file__).with_name("registry.json")
#: The shape of a model's name and of its version (a reference is ``name`` or ``name@version``):
#: no '/', '..' or '@', so a name is a folder under models/ and a reference splits one way.
MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
MODEL_VERSION = r"[A-Za-z0-9][A-Za-z0-9.+_-]*"

Status = Literal["released", "candidate", "retired"]
#: tabular: one number per input. series: per input (a channel) a list of numbers, all of one
#: length. tokens: one input, a list of integer codes.
InputKind = Literal["tabular", "series", "tokens"]


class RegistryError(LookupError):
    """A model or version that the registry does not know."""


class SchemaError(ValueError):
    """A model's input schema that breaks a mapping rule; ``problems`` lists every one."""

    def __init__(self, ref: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{ref}: input schema: " + "; ".join(problems))


class RegistryFileError(ValueError):
    """A registry or shadows file in the artifact store that cannot be read as one."""


class ArtifactIntegrityError(RuntimeError):
    """An artifact whose bytes do not hash to the sha256 the registry records (or that is gone).

    The message names the file for the operator; ``reason`` says the same without the server's
    path, for a case's error that clients read.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        #: Set once the worker has logged it (it may raise this same error at later batches).
        self.logged = False


RangePolicy = Literal["reject", "flag"]
#: How a Observation or Condition feature picks its value over time (see docs/fhir.md).
TimeRule = Literal["latest", "first", "ever", "present"]
TIME_RULES: dict[str, tuple[str, ...]] = {
    "Observation": ("latest", "first"),
    "Condition": ("ever", "present"),
    "Patient": ("present",),
}
WINDOWS = ("lookback", "encounter")


@dataclass(frozen=True)
class RangeRule:
    """A ``[low, high]`` bound on a feature's value: ``reject`` refuses a case outside it, ``flag``
    accepts it and says so. ``source`` says where the bound comes from (a reviewer checks it)."""

    low: float
    high: float
    policy: RangePolicy | None = None
    source: str | None = None

    @classmethod
    def from_json(cls, entry: Any) -> RangeRule:
        if isinstance(entry, list | tuple):  # the old form: [low, high], no policy, no source
            return cls(float(entry[0]), float(entry[1]))
        return cls(
            float(entry["low"]), float(entry["high"]), entry.get("policy"), entry.get("source")
        )

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class FeatureSpec:
    """One input of a model: its name, unit (UCUM where one exists) and, optionally, its rules.

    ``source`` says where an EHR holds the value and how it is chosen, e.g. ``{"resource":
    "Observation", "codes": [{"system": "http://loinc.org", "code": "8867-4"}], "time": "first",
    "window": "encounter", "unusable": "reject"}`` (docs/fhir.md); ``missing`` what happens when a
    record lacks it (``"reject"`` the case, or impute the stated number, whose origin
    ``missing_source`` states); ``allowed`` the only values accepted (``[0, 1]`` for a
    condition's presence); ``ranges`` the bounds, each with its policy and source.
    """

    name: str
    unit: str
    description: str = ""
    source: dict[str, Any] | None = None
    missing: float | Literal["reject"] | None = None
    missing_source: str | None = None
    allowed: tuple[float, ...] | None = None
    ranges: tuple[RangeRule, ...] | None = None

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> FeatureSpec:
        allowed = entry.get("allowed")
        ranges = entry.get("ranges")
        if ranges is None and entry.get("range") is not None:
            ranges = [entry["range"]]
        return cls(
            **{k: v for k, v in entry.items() if k not in ("allowed", "range", "ranges")},
            allowed=None if allowed is None else tuple(float(v) for v in allowed),
            ranges=None if ranges is None else tuple(RangeRule.from_json(r) for r in ranges),
        )

    def to_json(self) -> dict[str, Any]:
        """The registry form: rules that are not set are left out."""
        out: dict[str, Any] = {}
        for k, v in vars(self).items():
            if v is None:
                continue
            if k == "ranges":
                out[k] = [r.to_json() for r in v]
            else:
                out[k] = list(v) if isinstance(v, tuple) else v
        return out

    @property
    def constrained(self) -> bool:
        return self.allowed is not None or bool(self.ranges)

    @property
    def reject_ranges(self) -> tuple[RangeRule, ...]:
        """Bounds that refuse a case (a bound without a policy counts as one)."""
        return tuple(r for r in self.ranges or () if r.policy != "flag")

    @property
    def flag_ranges(self) -> tuple[RangeRule, ...]:
        return tuple(r for r in self.ranges or () if r.policy == "flag")


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
        raise ArtifactIntegrityError(
            f"{spec.ref}: artifact {spec.artifact} does not exist",
            reason=f"{spec.ref}: its artifact does not exist",
        )
    actual = sha256_file(spec.artifact)
    if actual != spec.sha256:
        mismatch = f"has sha256 {actual}, the registry expects {spec.sha256}; refusing to load it"
        raise ArtifactIntegrityError(
            f"{spec.ref}: artifact {spec.artifact} {mismatch}",
            reason=f"{spec.ref}: its artifact {mismatch}",
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
        # Sorted once: the API resolves every case of a request (a thousand), and sorting by
        # version number each time cost more than the rest of its check.
        self._ordered = tuple(
            sorted(self._specs.values(), key=lambda s: (s.name, version_key(s.version)))
        )
        #: model name -> the candidate version that shadows its default version
        self.shadows = dict(shadows or {})

    @classmethod
    def load(cls, path: Path = REGISTRY_PATH) -> Registry:
        raw = json.loads(path.read_text())
        specs = [_spec_from_json(entry, base=path.parent) for entry in raw["models"]]
        for spec in specs:
            if problems := schema_problems(spec.inputs, check_units=False):
                raise SchemaError(f"{path}: {spec.ref}", problems)
        return cls(specs, path=path)

    def merged(self, other: Registry) -> Registry:
        """This registry with ``other``'s versions added (a version in both keeps this one's)."""
        return Registry(
            [*other._specs.values(), *self._specs.values()],
            path=self.path,
            shadows={**other.shadows, **self.shadows},
        )

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._ordered)

    def names(self) -> list[str]:
        return sorted({name for name, _ in self._specs})

    def resolve(self, ref: str) -> ModelSpec:
        """Look up ``name`` (its default version) or ``name@version``."""
        name, _, version = ref.partition("@")
        unknown = RegistryError(
            f"unknown model {name!r} (known models: {', '.join(self.names()) or 'none'})"
        )
        if version:
            spec = self._specs.get((name, version))
            if spec is not None:
                return spec
            known = ", ".join(s.ref for s in self if s.name == name)
            if not known:  # was "known versions: none", naming no model
                raise unknown
            raise RegistryError(f"unknown model version {ref!r} (known versions: {known})")
        candidates = [s for s in self if s.name == name and s.status != "retired"]
        if not candidates:
            raise unknown
        # The version marked default, else the newest released one: a candidate registered
        # beside a released version is there to be shadowed, not to take that version's cases.
        return max(
            candidates,
            key=lambda s: (s.default, s.status == "released", version_key(s.version)),
        )

    def resolve_scorable(self, ref: str) -> ModelSpec:
        """``resolve``, refusing a retired version named by ``name@version``: a retired version
        scores no new case (its old scores and its report stay readable through ``resolve``)."""
        spec = self.resolve(ref)
        if spec.status == "retired":
            live = ", ".join(s.ref for s in self if s.name == spec.name and s.status != "retired")
            raise RegistryError(
                f"model version {spec.ref!r} is retired (versions in use: {live or 'none'})"
            )
        return spec

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


@lru_cache(maxsize=4096)
def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """A version's sort key, number by number: ``1.10.0`` comes after ``1.9.0``."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.findall(r"\d+|\D+", version)
    )


def user_registry_path(artifact_dir: Path) -> Path:
    """Models registered with ``medbatch models register`` are listed here, in the store."""
    return artifact_dir / "registry.json"


def load_registry(artifact_dir: Path | None) -> Registry:
    """The packaged registry plus the models registered into ``artifact_dir``."""
    registry = Registry.load(REGISTRY_PATH)
    if artifact_dir is None:
        return registry
    # Files in the store may be edited by hand: one that does not read is named, not a traceback.
    path = user_registry_path(artifact_dir)
    if path.is_file():
        try:
            registry = registry.merged(Registry.load(path))
        except SchemaError as exc:
            raise RegistryFileError(str(exc)) from None
        except (ValueError, LookupError, TypeError, AttributeError) as exc:
            raise RegistryFileError(
                f"{path}: not a model registry ({type(exc).__name__}: {exc})"
            ) from None
    path = shadows_path(artifact_dir)
    if path.is_file():
        try:
            shadows = json.loads(path.read_text())
        except ValueError as exc:
            raise RegistryFileError(f"{path}: not JSON ({exc})") from None
        if not isinstance(shadows, dict) or not all(isinstance(v, str) for v in shadows.values()):
            raise RegistryFileError(f'{path}: expected {{"model name": "candidate version", ...}}')
        registry.shadows = shadows
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


# --- schema checks ----------------------------------------------------------------------------


def source_codes(source: dict[str, Any]) -> list[dict[str, Any]]:
    """A source's code entries as ``{"system", "code", ...}`` dicts (the old form, one
    ``system`` and a list of code strings, is read as such entries)."""
    codes = source.get("codes") or []
    if "system" in source:
        display = source.get("display")
        return [
            {
                "system": source["system"],
                "code": str(c),
                **({"display": display.get(str(c))} if isinstance(display, dict) else {}),
            }
            for c in codes
        ]
    return [c for c in codes if isinstance(c, dict)]


def schema_problems(
    inputs: tuple[FeatureSpec, ...] | list[FeatureSpec], *, check_units: bool = True
) -> list[str]:
    """Every broken mapping rule of an input schema (empty when it is sound).

    Checked: each source names a supported resource, codes with a system, a time rule the
    resource allows (and a window); one code feeds one feature unless both features list each
    other under the code's ``also_feeds``; each range has ``low <= high``, a policy (``reject``
    or ``flag``) and a source; an imputed value states its origin (``missing_source``);
    ``map`` values are among ``allowed``; a sourced Observation feature's unit is UCUM
    (``check_units``: parsing units loads the UCUM tables, about half a second, so a registry
    load leaves it to registration and the tests).
    """
    from models.terminology.codes import canonical_system, normal_code

    problems: list[str] = []
    names = {f.name for f in inputs}
    fed_by: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for f in inputs:
        for r in f.ranges or ():
            if not r.low <= r.high:
                problems.append(f"{f.name}: range low {r.low:g} is above high {r.high:g}")
            if r.policy not in ("reject", "flag"):
                problems.append(f"{f.name}: each range needs a policy, 'reject' or 'flag'")
            if not isinstance(r.source, str) or not r.source.strip():
                problems.append(f"{f.name}: each range needs a source (where its bounds come from)")
        if f.missing is not None and not (
            f.missing == "reject" or isinstance(f.missing, int | float)
        ):
            problems.append(f"{f.name}: missing must be 'reject' or a number")
        source = f.source
        if source is None:
            continue
        resource = source.get("resource")
        if resource not in TIME_RULES:
            problems.append(f"{f.name}: source resource must be one of {', '.join(TIME_RULES)}")
            continue
        time_rule = source.get("time", "present" if resource != "Observation" else "latest")
        if time_rule not in TIME_RULES[resource]:
            allowed = " or ".join(TIME_RULES[resource])
            problems.append(
                f"{f.name}: time {time_rule!r} is not one of {allowed} for a {resource}"
            )
        if source.get("window", "lookback") not in WINDOWS:
            problems.append(f"{f.name}: window must be 'lookback' or 'encounter'")
        if source.get("unusable", "reject") not in ("reject", "ignore"):
            problems.append(f"{f.name}: unusable must be 'reject' or 'ignore'")
        if isinstance(f.missing, int | float) and resource != "Condition" and not f.missing_source:
            problems.append(f"{f.name}: an imputed value needs missing_source (its origin)")
        mapping = source.get("map")
        if isinstance(mapping, dict) and f.allowed is not None:
            for key, value in mapping.items():
                if float(value) not in f.allowed:
                    problems.append(f"{f.name}: map value for {key!r} is not among allowed")
        if resource == "Patient":
            if not isinstance(source.get("element"), str):
                problems.append(f"{f.name}: a Patient source names its element")
            continue
        codes = source_codes(source)
        if not codes:
            problems.append(f"{f.name}: a {resource} source lists its codes")
        for entry in codes:
            system, code = entry.get("system"), entry.get("code")
            if not isinstance(system, str) or not isinstance(code, str) or not code:
                problems.append(f"{f.name}: each code needs a system and a code")
                continue
            uri = canonical_system(system) or system
            fed_by.setdefault((uri, normal_code(uri, code)), []).append((f.name, entry))
            for other in entry.get("also_feeds", []):
                if other not in names or other == f.name:
                    problems.append(f"{f.name}: code {code}: also_feeds names no other feature")
        if resource == "Observation" and check_units:
            from models.terminology.ucum import UnitError, parse_unit

            try:
                parse_unit(f.unit)
            except UnitError as exc:
                problems.append(f"{f.name}: {exc}")
    for (uri, code), users in fed_by.items():
        features = sorted({name for name, _ in users})
        if len(features) < 2:
            continue
        for name, entry in users:
            missing = [o for o in features if o != name and o not in entry.get("also_feeds", [])]
            if missing:
                problems.append(
                    f"{name}: code {code} of {uri} also feeds {', '.join(missing)}; list them "
                    "under that code's also_feeds if it is meant to"
                )
    return problems
