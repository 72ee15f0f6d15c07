"""The registry: lookups, and sha256 verification before any byte of an artifact is loaded."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from models.cases.inference import LoadedModel
from models.cases.registry import ArtifactIntegrityError, Registry, RegistryError, sha256_file


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load()


def test_default_and_pinned_versions_resolve(registry: Registry) -> None:
    """`name` gives the default version; `name@version` gives that version."""
    assert registry.resolve("breast-cancer").ref == "breast-cancer@1.0.0"
    assert registry.resolve("breast-cancer@1.0.0").version == "1.0.0"


def test_unknown_model_and_version_say_what_exists(registry: Registry) -> None:
    """Errors name the known models or versions."""
    with pytest.raises(RegistryError, match=r"unknown model 'nope'.*breast-cancer"):
        registry.resolve("nope")
    with pytest.raises(RegistryError, match=r"unknown model version 'breast-cancer@9\.9'.*1\.0\.0"):
        registry.resolve("breast-cancer@9.9")
    # An unknown name with a version (`models shadow sepsis@1.0` before registering it) was
    # "known versions: none", naming no model.
    with pytest.raises(RegistryError, match=r"^unknown model 'nope' \(known models: breast-"):
        registry.resolve("nope@1.0")


def test_packaged_artifact_matches_its_recorded_sha256(registry: Registry) -> None:
    """The committed weights file hashes to the sha256 in registry.json."""
    spec = registry.resolve("breast-cancer")
    assert sha256_file(spec.artifact) == spec.sha256


def test_input_schema_is_ordered_named_and_has_units(registry: Registry) -> None:
    """30 WDBC features in sklearn's order, each with a unit."""
    from sklearn.datasets import load_breast_cancer

    spec = registry.resolve("breast-cancer")
    expected = [n.replace(" ", "_") for n in load_breast_cancer().feature_names]
    assert list(spec.feature_names) == expected
    assert all(f.unit for f in spec.inputs)
    assert spec.labels == ("benign", "malignant")


def test_tampered_artifact_is_refused(registry: Registry, tmp_path: Path) -> None:
    """One flipped byte in the weights file and the model refuses to load."""
    spec = registry.resolve("breast-cancer")
    copy = tmp_path / "tampered.safetensors"
    shutil.copyfile(spec.artifact, copy)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="refusing to load"):
        LoadedModel(dataclasses.replace(spec, artifact=copy), device="cpu")


def test_missing_artifact_is_refused(registry: Registry, tmp_path: Path) -> None:
    """An artifact path that does not exist is a clear error, not a crash in torch."""
    spec = dataclasses.replace(registry.resolve("breast-cancer"), artifact=tmp_path / "gone")
    with pytest.raises(ArtifactIntegrityError, match="does not exist"):
        LoadedModel(spec, device="cpu")


def test_resolving_a_requests_cases_does_not_sort_the_registry_for_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The API resolves each case of a request (up to a thousand): since versions sort number
    by number, every unpinned case sorted every version again, parsing each version string,
    about eight times the cost of the lookup before. Each version is parsed once now."""
    import re
    import types

    import models.cases.registry as module

    parsed: list[str] = []

    def findall(pattern: str, text: str) -> list[str]:
        parsed.append(text)
        return re.findall(pattern, text)

    monkeypatch.setattr(module, "re", types.SimpleNamespace(findall=findall))
    if hasattr(module.version_key, "cache_clear"):  # parsed from the start
        module.version_key.cache_clear()
    registry = Registry.load()
    for _ in range(1000):
        assert registry.resolve_scorable("breast-cancer").ref == "breast-cancer@1.0.0"
    assert len(parsed) <= len(list(registry))
