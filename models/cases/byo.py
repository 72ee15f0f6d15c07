"""``medbatch models register``: a hospital's own model into the artifact store and registry.

Accepted: a TorchScript archive (``torch.jit.save``), a ``torch.export`` program
(``torch.export.save``), or a safetensors state dict of a built-in architecture. The artifact must
map a float32 batch of shape (N, F) to one logit per case, (N,) or (N, 1). It is validated by a dry
forward pass on the schema's shape before it is copied into the store; its sha256 is recorded in
``$MEDBATCH_ARTIFACT_DIR/registry.json``, which the worker and the API read beside the packaged one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, get_args

import torch

from models.cases.registry import (
    MODEL_NAME,
    MODEL_VERSION,
    FeatureSpec,
    Status,
    load_registry,
    schema_problems,
    sha256_file,
    user_registry_path,
)

FORMATS = {"torchscript": ".pt", "torch-export": ".pt2", "safetensors": ".safetensors"}


class RegistrationError(ValueError):
    """An artifact or schema that cannot be registered, with the reason."""


def _schema(path: Path) -> dict[str, Any]:
    try:
        schema = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegistrationError(f"schema {path}: not readable JSON ({exc})") from None
    inputs = schema.get("inputs") if isinstance(schema, dict) else None
    if (
        not isinstance(inputs, list)
        or not inputs
        or not all(
            isinstance(i, dict)
            and isinstance(i.get("name"), str)
            and isinstance(i.get("unit"), str)
            for i in inputs
        )
    ):
        raise RegistrationError(
            f'schema {path}: \'inputs\' must be a non-empty list of {{"name", "unit"}} objects'
        )
    if len({i["name"] for i in inputs}) != len(inputs):
        raise RegistrationError(f"schema {path}: input names must be unique")
    try:
        specs = [FeatureSpec.from_json(_input_entry(i)) for i in inputs]
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise RegistrationError(f"schema {path}: an input is malformed ({exc})") from None
    if problems := schema_problems(specs):
        raise RegistrationError(f"schema {path}: " + "; ".join(problems))
    output = schema.get("output")
    if not isinstance(output, str) or not output.strip():
        raise RegistrationError(f"schema {path}: 'output' (what the score means) is required")
    threshold = schema.get("threshold", 0.5)
    if isinstance(threshold, bool) or not (
        isinstance(threshold, int | float) and 0 <= threshold <= 1
    ):
        raise RegistrationError(f"schema {path}: 'threshold' must be a probability in [0, 1]")
    # Checked here, not when a case is scored: labels other than two strings fail every case,
    # a status or default of another type silently changes which version a case gets.
    labels = schema.get("labels", ["negative", "positive"])
    if not (
        isinstance(labels, list)
        and len(labels) == 2
        and all(isinstance(label, str) and label for label in labels)
        and labels[0] != labels[1]
    ):
        raise RegistrationError(
            f"schema {path}: 'labels' must be two different names, [negative, positive]"
        )
    if schema.get("status", "candidate") not in get_args(Status):
        raise RegistrationError(
            f"schema {path}: 'status' must be one of {', '.join(get_args(Status))}"
        )
    if not isinstance(schema.get("default", False), bool):
        raise RegistrationError(f"schema {path}: 'default' must be true or false")
    if not isinstance(schema.get("clinical_use", ""), str):
        raise RegistrationError(f"schema {path}: 'clinical_use' must be a string")
    return schema


#: What an input of a registered schema may state: its mapping from FHIR and its rules.
INPUT_FIELDS = (
    "name", "unit", "description", "source", "missing", "missing_source", "allowed", "ranges",
)  # fmt: skip


def _input_entry(entry: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(entry) - set(INPUT_FIELDS) - {"range"})
    if unknown:
        raise ValueError(f"{entry.get('name')}: unknown fields {', '.join(unknown)}")
    return {k: v for k, v in entry.items() if k in INPUT_FIELDS or k == "range"}


def _load_any(path: Path) -> tuple[str, torch.nn.Module]:
    """Open the artifact as whichever accepted format it is; say so when it is none."""
    with path.open("rb") as fh:
        head = fh.read(16)
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
        return "safetensors", torch.nn.Module()
    errors = []
    try:
        return "torchscript", load_torchscript(path, "cpu")
    except Exception as exc:
        errors.append(f"TorchScript: {type(exc).__name__}")
    # torch.export logs a failed load as a warning with a whole traceback before it raises;
    # a file that is not a program is said once, below.
    quiet = logging.getLogger("torch.export")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return "torch-export", torch.export.load(str(path)).module()
    except Exception as exc:
        errors.append(f"torch.export: {type(exc).__name__}")
    finally:
        quiet.setLevel(level)
    hint = ""
    if _is_torch_save(path):
        # TorchServe's and most training scripts' artifact; a pickle runs code when loaded.
        hint = (
            "; it is a torch.save() pickle, which is never loaded (it can run code): save the "
            "model with torch.jit.script(model).save(), torch.export.save(), or its state_dict "
            "with safetensors.torch.save_file() and --architecture"
        )
    raise RegistrationError(
        f"{path} is not a TorchScript archive, a torch.export program or a safetensors file "
        f"({'; '.join(errors)}){hint}"
    )


def _is_torch_save(path: Path) -> bool:
    """Whether ``path`` is ``torch.save``'s zip: a ``data.pkl`` with no TorchScript code."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/data.pkl") for n in names) and not any("/code/" in n for n in names)


def load_torchscript(path: Path, device: torch.device | str) -> torch.nn.Module:
    """Open a TorchScript archive. PyTorch 2.13 deprecates TorchScript, but hospitals hold such
    files; reading them stays supported here, without a warning on every load."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location=device)


def dry_run(module: torch.nn.Module, n_features: int) -> None:
    """A forward pass on zeros of the schema's shape must give one finite logit per case."""
    x = torch.zeros(4, n_features)
    try:
        with torch.inference_mode():
            out = module(x)
    except Exception as exc:
        hint = (
            " (a torch.export program needs a dynamic batch dimension: export with "
            "dynamic_shapes={...: {0: torch.export.Dim('batch')}})"
            if "Guard failed" in str(exc)
            else ""
        )
        raise RegistrationError(
            f"dry run on a batch of shape (4, {n_features}) failed: "
            f"{type(exc).__name__}: {exc}{hint}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.reshape(-1).shape != (4,) or out.shape[0] != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RegistrationError(
            f"dry run: expected one logit per case, shape (4,) or (4, 1), got {shape}"
        )
    if not torch.isfinite(out).all():
        raise RegistrationError("dry run: the model produced NaN or infinite outputs on zeros")


def register(
    artifact: Path,
    *,
    name: str,
    version: str,
    schema_path: Path,
    artifact_dir: Path,
    architecture: str | None = None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate ``artifact`` and register it as ``name@version``; return its registry entry."""
    from models.cases.architectures import build

    # As the API takes a model reference and the columns hold it: a name with '/' or '..' was
    # copied outside models/, one with '@' could not be named again.
    if not (len(name) <= 100 and re.fullmatch(MODEL_NAME, name)):
        raise RegistrationError(
            f"--name: {name!r} must be letters, digits, '.', '_' or '-' (at most 100, "
            "starting with a letter or digit)"
        )
    if not (len(version) <= 50 and re.fullmatch(MODEL_VERSION, version)):
        raise RegistrationError(
            f"--version: {version!r} must be letters, digits, '.', '+', '_' or '-' (at most 50, "
            "starting with a letter or digit)"
        )
    if not artifact.is_file():
        raise RegistrationError(f"{artifact}: no such file")
    schema = _schema(schema_path)
    registry = load_registry(artifact_dir)
    if any(s.name == name and s.version == version for s in registry):
        raise RegistrationError(f"{name}@{version} is registered already; give a new version")
    kind, module = _load_any(artifact)
    n_features = len(schema["inputs"])
    if kind == "safetensors":
        if architecture is None:
            raise RegistrationError("a safetensors state dict needs --architecture (e.g. mlp)")
        from safetensors.torch import load_file

        try:
            module = build(architecture, n_features=n_features, params=params or {})
            module.load_state_dict(load_file(str(artifact)))
        except Exception as exc:
            raise RegistrationError(
                f"state dict does not fit {architecture} with {n_features} inputs: {exc}"
            ) from None
        stored_architecture = architecture
    else:
        stored_architecture = kind
    dry_run(module if kind == "torch-export" else module.eval(), n_features)

    # A folder per name: "a-1" + "2" and "a" + "1-2" were both models/a-1-2.pt, the second
    # registration overwriting the first's artifact (which then failed its sha256 check).
    target = artifact_dir / "models" / name / f"{version}{FORMATS[kind]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(artifact, target)
    entry = {
        "name": name,
        "version": version,
        "default": bool(schema.get("default", False)),
        "status": schema.get("status", "candidate"),
        "architecture": stored_architecture,
        "params": params or {},
        "artifact": str(target.relative_to(artifact_dir)),
        "sha256": sha256_file(target),
        "inputs": [
            {"description": "", **FeatureSpec.from_json(_input_entry(i)).to_json()}
            for i in schema["inputs"]
        ],
        "output": schema["output"],
        "labels": schema.get("labels", ["negative", "positive"]),
        "threshold": float(schema.get("threshold", 0.5)),
        "clinical_use": schema.get("clinical_use", ""),
        "training": {"registered_from": artifact.name, "format": kind},
    }
    path = user_registry_path(artifact_dir)
    current = json.loads(path.read_text()) if path.is_file() else {"models": []}
    current["models"].append(entry)
    # Beside it, then renamed over it: written in place, a crash or a full disk mid-write left
    # a truncated registry.json that every later command (and every worker) refused to read.
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(json.dumps(current, indent=2) + "\n")
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise RegistrationError(f"{path}: not written ({exc.strerror or exc})") from None
    return entry
