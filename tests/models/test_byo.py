"""`medbatch models register`: a hospital's own artifact, validated, stored, scored; bad ones refused."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from models.cases.byo import RegistrationError, register
from models.cases.inference import LoadedModel
from models.cases.registry import load_registry, sha256_file
from tests.helpers import register_mlp, save_mlp

FEATURES = [{"name": n, "unit": "1"} for n in ("a", "b", "c")]
CASE = {"a": 1.0, "b": -2.0, "c": 0.5}


@pytest.fixture
def schema(tmp_path: Path) -> Path:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"inputs": FEATURES, "output": "risk of X", "threshold": 0.3}))
    return path


def _linear() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(3, 1)).eval()


def _expected(module: torch.nn.Module) -> float:
    with torch.no_grad():
        return torch.sigmoid(module(torch.tensor([[1.0, -2.0, 0.5]]))).item()


def test_torchscript_is_registered_stored_and_scored(tmp_path: Path, schema: Path) -> None:
    """A TorchScript file becomes name@version with its sha256; scores equal the module's."""
    module = _linear()
    path = _script(tmp_path, module, "own.pt")
    store = tmp_path / "store"
    entry = register(path, name="own", version="1.0", schema_path=schema, artifact_dir=store)
    assert entry["architecture"] == "torchscript" and entry["sha256"] == sha256_file(path)
    spec = load_registry(store).resolve("own@1.0")
    assert spec.threshold == 0.3 and spec.feature_names == ("a", "b", "c")
    assert load_registry(store).resolve("breast-cancer").version == "1.0.0"  # packaged ones stay
    (row,) = LoadedModel(spec, device="cpu").score([CASE])
    assert row.score == pytest.approx(_expected(module), abs=1e-6)


def test_torch_export_program_with_a_dynamic_batch_is_registered(
    tmp_path: Path, schema: Path
) -> None:
    """A torch.export program exported with a dynamic batch dimension scores like the module."""
    module = _linear()
    program = torch.export.export(
        module, (torch.zeros(2, 3),), dynamic_shapes={"input": {0: torch.export.Dim("batch")}}
    )
    path = tmp_path / "own.pt2"
    torch.export.save(program, str(path))
    store = tmp_path / "store"
    register(path, name="own", version="2.0", schema_path=schema, artifact_dir=store)
    (row,) = LoadedModel(load_registry(store).resolve("own@2.0"), device="cpu").score([CASE])
    assert row.score == pytest.approx(_expected(module), abs=1e-6)


def test_safetensors_state_dict_of_a_builtin_architecture(tmp_path: Path, schema: Path) -> None:
    """A state dict for the built-in MLP registers with --architecture and its params."""
    path = tmp_path / "own.safetensors"
    mlp = save_mlp(path, 3, hidden=(4,))
    store = tmp_path / "store"
    register_mlp(
        path, name="own", version="3.0", schema_path=schema, artifact_dir=store, hidden=[4]
    )
    (row,) = LoadedModel(load_registry(store).resolve("own@3.0"), device="cpu").score([CASE])
    assert row.score == pytest.approx(_expected(mlp), abs=1e-6)


class _Nan(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1) * float("nan")


class _Wide(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, 2)


def _script(tmp_path: Path, module: torch.nn.Module, name: str) -> Path:
    """A TorchScript file, as hospitals hold them (PyTorch 2.13 deprecates making new ones)."""
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(3, 1).state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (
            lambda d: (d / "x.bin").write_bytes(b"\x00junk" * 40) and d / "x.bin",
            "is not a TorchScript archive",
        ),
        (
            lambda d: _script(d, torch.nn.Linear(29, 1), "w.pt"),
            "dry run on a batch of shape (4, 3) failed",
        ),
        (lambda d: _script(d, _Nan(), "n.pt"), "NaN or infinite"),
        (lambda d: _script(d, _Wide(), "o.pt"), "one logit per case"),
        (lambda d: d / "missing.pt", "no such file"),
        # torch.save() of a module or a state_dict, what a TorchServe user holds: it was only
        # "not a TorchScript archive …", with nothing to do about it.
        (_saved, "it is a torch.save() pickle, which is never loaded"),
    ],
)
def test_bad_artifacts_are_refused_with_the_reason(
    tmp_path: Path, schema: Path, make, fragment
) -> None:  # type: ignore[no-untyped-def]
    """Not a model, the wrong input width, NaN outputs, the wrong output shape, no file."""
    store = tmp_path / "store"
    with pytest.raises(RegistrationError) as err:
        register(make(tmp_path), name="bad", version="1", schema_path=schema, artifact_dir=store)
    assert fragment in str(err.value)
    assert not (store / "registry.json").exists()


def test_bad_schema_and_duplicate_versions_are_refused(tmp_path: Path, schema: Path) -> None:
    """A schema without output or with repeated inputs, and an existing name@version, are refused."""
    path = _script(tmp_path, _linear(), "ok.pt")
    store = tmp_path / "store"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"inputs": FEATURES}))
    with pytest.raises(RegistrationError, match="'output'"):
        register(path, name="own", version="1", schema_path=broken, artifact_dir=store)
    broken.write_text(json.dumps({"inputs": FEATURES + FEATURES[:1], "output": "x"}))
    with pytest.raises(RegistrationError, match="unique"):
        register(path, name="own", version="1", schema_path=broken, artifact_dir=store)
    register(path, name="own", version="1", schema_path=schema, artifact_dir=store)
    with pytest.raises(RegistrationError, match="registered already"):
        register(path, name="own", version="1", schema_path=schema, artifact_dir=store)
    with pytest.raises(RegistrationError, match="registered already"):
        register(
            path, name="breast-cancer", version="1.0.0", schema_path=schema, artifact_dir=store
        )


@pytest.mark.parametrize(
    ("name", "version", "refused"),
    [
        ("../evil", "1", "--name"),
        ("a@b", "1", "--name"),
        ("", "1", "--name"),
        ("own", "", "--version"),
        ("own", "1/2", "--version"),
        ("own", "1@2", "--version"),
    ],
)
def test_a_name_or_version_the_api_could_not_name_is_refused_before_anything_is_written(
    tmp_path: Path, schema: Path, name: str, version: str, refused: str
) -> None:
    """'../evil' was copied to the artifact folder's parent of models/, 'a@b' registered as
    'a@b@1', version '1/2' made a subfolder: none of them a reference POST /v1/cases takes."""
    path = _script(tmp_path, _linear(), "own.pt")
    store = tmp_path / "store"
    with pytest.raises(RegistrationError, match=f"^{refused}: "):
        register(path, name=name, version=version, schema_path=schema, artifact_dir=store)
    assert not store.exists()


@pytest.mark.parametrize(
    ("field", "value", "refused"),
    [
        ("labels", ["low", "mid", "high"], "'labels' must be two different names"),
        ("labels", "no", "'labels' must be two different names"),
        ("labels", ["same", "same"], "'labels' must be two different names"),
        ("status", "Released", "'status' must be one of released, candidate, retired"),
        ("default", "no", "'default' must be true or false"),
        ("clinical_use", 5, "'clinical_use' must be a string"),
        ("threshold", True, "'threshold' must be a probability"),
        ("output", "", "'output'"),
    ],
)
def test_a_schema_field_that_would_break_scoring_or_listing_is_refused(
    tmp_path: Path, field: str, value: object, refused: str
) -> None:
    """Three labels failed every case at scoring, "no" became labels 'n' and 'o', a default of
    "no" made the version the default, clinical_use 5 broke GET /v1/models: refused instead."""
    path = _script(tmp_path, _linear(), "own.pt")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"inputs": FEATURES, "output": "risk of X", field: value}))
    store = tmp_path / "store"
    with pytest.raises(RegistrationError, match=refused):
        register(path, name="own", version="1", schema_path=bad, artifact_dir=store)
    assert not store.exists()


def test_names_and_versions_that_join_alike_keep_their_own_artifacts(tmp_path: Path) -> None:
    """own@1-2 and own-1@2 were both stored as models/own-1-2.pt: registering the second
    replaced the first's file, and the first then failed its sha256 check on every case."""
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"inputs": FEATURES, "output": "x", "status": "released"}))
    store = tmp_path / "store"
    first, second = _linear(), torch.nn.Sequential(torch.nn.Linear(3, 1)).eval()
    for path, name, version in (
        (_script(tmp_path, first, "a.pt"), "own", "1-2"),
        (_script(tmp_path, second, "b.pt"), "own-1", "2"),
    ):
        register(path, name=name, version=version, schema_path=schema, artifact_dir=store)
    registry = load_registry(store)
    for ref, module in (("own@1-2", first), ("own-1@2", second)):
        (row,) = LoadedModel(registry.resolve(ref), device="cpu").score([CASE])
        assert row.score == pytest.approx(_expected(module), abs=1e-6)


def test_a_failed_registry_write_leaves_the_registry_as_it_was(
    tmp_path: Path, schema: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """registry.json was rewritten in place: a full disk (here a file-size limit, reached as
    the new registry is written) left it truncated, and every later command refused it."""
    import resource
    import signal

    import models.cases.byo as byo

    store = tmp_path / "store"
    path = _script(tmp_path, _linear(), "own.pt")
    register(path, name="own", version="1.0", schema_path=schema, artifact_dir=store)
    registry = store / "registry.json"
    before = registry.read_bytes()

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    real_sha256 = byo.sha256_file

    def sha256_then_fill_the_disk(target: Path) -> str:
        # After the artifact's copy, before the registry's write: the registry may grow by
        # a few bytes only, as on a disk with that little room left.
        digest = real_sha256(target)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 16, limits[1]))
        return digest

    monkeypatch.setattr(byo, "sha256_file", sha256_then_fill_the_disk)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    try:
        with pytest.raises(RegistrationError, match="not written"):
            register(path, name="own", version="2.0", schema_path=schema, artifact_dir=store)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert registry.read_bytes() == before
    assert [s.ref for s in load_registry(store) if s.name == "own"] == ["own@1.0"]
    assert sorted(p.name for p in store.iterdir() if "registry" in p.name) == ["registry.json"]
