"""``medbatch models``: the registry; train, register, evaluate, shadow and compare versions."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medbatch.cli._common import TRAINABLE, command, group, transaction

if TYPE_CHECKING:
    from medbatch.settings import Settings


def add_parsers(sub: Any) -> None:
    models, msub = group(sub, "models", "the model registry")
    command(msub, "list", "list registered model versions")
    train = command(msub, "train", "train a reference model reproducibly")
    train.add_argument("name", help=f"the recipe, one of: {', '.join(TRAINABLE)}")
    train.add_argument(
        "--out", type=Path, default=None, help="folder (default: MEDBATCH_ARTIFACT_DIR)"
    )
    train.add_argument(
        "--install", action="store_true", help="replace the packaged artifact and registry entry"
    )
    train.add_argument("--force", action="store_true", help="replace other weights found in --out")
    reg = command(msub, "register", "validate and register your own model artifact")
    reg.add_argument("path", type=Path, help="TorchScript, torch.export program or safetensors")
    reg.add_argument("--name", required=True, help="model name")
    reg.add_argument("--version", required=True, help="version, e.g. 1.0.0")
    reg.add_argument(
        "--schema",
        type=Path,
        required=True,
        help="JSON: inputs, output, threshold (examples/model-schema.json)",
    )
    reg.add_argument(
        "--architecture",
        help="for a safetensors state dict: a built-in (mlp) (default: none, the file is a program)",
    )
    reg.add_argument("--params", help="JSON hyper-parameters of --architecture (default: none)")
    shadow = command(
        msub, "shadow", "let a candidate version also score the released version's cases"
    )
    shadow.add_argument("ref", help="NAME@VERSION of a candidate (with --off: NAME)")
    shadow.add_argument("--off", action="store_true", help="stop shadowing NAME")
    drift = command(msub, "drift", "compare a shadowing candidate with the released version")
    drift.add_argument("name", help="model name")
    drift.add_argument("--candidate", help="version (default: the current shadow)")
    drift.add_argument("--released", help="version (default: the default version)")
    drift.add_argument("--json", action="store_true", help="one JSON object")
    evaluate = command(msub, "evaluate", "held-out metrics and plots of a model version")
    evaluate.add_argument("ref", help="NAME or NAME@VERSION")
    evaluate.add_argument(
        "--out", type=Path, default=None, help="folder (default: MEDBATCH_ARTIFACT_DIR/reports/…)"
    )
    models.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.models_command == "list":
        from models.cases.registry import RegistryError, load_registry

        registry = load_registry(settings.artifact_dir)
        defaults = set()
        for name in registry.names():
            with contextlib.suppress(RegistryError):  # every version retired: none
                defaults.add(registry.resolve(name).ref)
        for spec in registry:
            default = " (default)" if spec.ref in defaults else ""
            print(
                f"{spec.ref}{default}\t{spec.status}\t{spec.architecture}\t"
                f"{len(spec.inputs)} {spec.input_kind} inputs\tthreshold {spec.threshold}\t"
                f"sha256 {spec.sha256}"
            )
            print(f"    output: {spec.output}")
            if spec.clinical_use:
                print(f"    clinical use: {spec.clinical_use}")
        return 0
    if args.models_command == "register":
        from models.cases.byo import RegistrationError, register

        try:
            params = json.loads(args.params) if args.params else None
        except ValueError as exc:
            print(f"medbatch models register: --params: not JSON ({exc})", file=sys.stderr)
            return 2
        try:
            entry = register(
                args.path,
                name=args.name,
                version=args.version,
                schema_path=args.schema,
                artifact_dir=settings.artifact_dir,
                architecture=args.architecture,
                params=params,
            )
        except (RegistrationError, ValueError) as exc:
            print(f"medbatch models register: {exc}", file=sys.stderr)
            return 2
        print(f"registered {entry['name']}@{entry['version']} ({entry['architecture']})")
        print(f"  artifact {settings.artifact_dir / entry['artifact']}")
        print(f"  sha256 {entry['sha256']}")
        return 0
    if args.models_command == "evaluate":
        from models.cases.registry import RegistryError, load_registry
        from models.reference.evaluation import NoEvaluationData, evaluate, report_dir

        try:
            spec = load_registry(settings.artifact_dir).resolve(args.ref)
            out = args.out or report_dir(settings.artifact_dir, spec)
            evaluation = evaluate(spec, out, ecg_dir=settings.shared_data / "ecg")
        except (RegistryError, NoEvaluationData, FileNotFoundError) as exc:
            print(f"medbatch models evaluate: {exc.args[0]}", file=sys.stderr)
            return 2
        metrics = evaluation["metrics"]
        print(f"{spec.ref} on {metrics['n']} held-out cases -> {out}")
        for key in (
            "c_index",
            "roc_auc",
            "pr_auc",
            "accuracy",
            "recall",
            "precision",
            "f1",
            "specificity",
            "f1_negative",
        ):
            if key in metrics:
                print(f"  {key:10} {metrics[key]:.4f}")
        print(f"  {'brier':10} {metrics['brier']:.4f}")
        for picture in sorted(Path(out).glob("*.png")):
            print(f"  picture {picture}")
        return 0
    if args.models_command == "shadow":
        from models.cases.shadow import ShadowError, clear_shadow, set_shadow

        if args.off:
            previous = clear_shadow(settings.artifact_dir, args.ref.partition("@")[0])
            print(f"{args.ref}: no shadow" + (f" (was {previous})" if previous else ""))
            return 0
        try:
            released, candidate = set_shadow(settings.artifact_dir, args.ref)
        except ShadowError as exc:
            print(f"medbatch models shadow: {exc}", file=sys.stderr)
            return 2
        print(f"{candidate.ref} shadows {released.ref} (workers pick it up when they start)")
        return 0
    if args.models_command == "drift":
        return _drift(args, settings)
    if args.models_command == "train":
        from models.reference.train import train

        try:
            report = train(
                args.name,
                out_dir=args.out or settings.artifact_dir,
                ecg_dir=settings.shared_data / "ecg",
                install=args.install,
                force=args.force,
            )
        except (ValueError, FileNotFoundError, FileExistsError) as exc:
            print(f"medbatch models train: {exc}", file=sys.stderr)
            return 2
        m = report.metrics
        print(f"trained {report.name}@{report.version} -> {report.artifact}")
        print(f"  sha256 {report.sha256}")
        if not m:
            print("  benchmark weights (seeded initialisation, untrained): not for clinical use")
            return 0
        if report.committed_sha256 and not args.install:
            same = "identical to" if report.sha256 == report.committed_sha256 else "differs from"
            print(f"  {same} the packaged artifact ({report.committed_sha256[:12]}…)")
        for key, value in m.items():
            print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
        return 0
    raise AssertionError(args.models_command)


def _drift(args: argparse.Namespace, settings: Settings) -> int:
    from db import repo
    from models.cases.registry import RegistryError, load_registry
    from models.cases.shadow import ShadowError, drift

    registry = load_registry(settings.artifact_dir)
    try:
        released = registry.resolve(f"{args.name}@{args.released}" if args.released else args.name)
        version = args.candidate or registry.shadows.get(args.name)
        if version is None:
            raise ShadowError(f"{args.name} has no shadow; name one with --candidate VERSION")
        candidate = registry.resolve(f"{args.name}@{version}")
        with transaction(settings) as session:
            pairs = repo.shadow_pairs(
                session, name=args.name, released=released.version, candidate=candidate.version
            )
        result = drift(released, candidate, pairs)
    except (RegistryError, ShadowError) as exc:
        print(f"medbatch models drift: {exc.args[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_dict(), allow_nan=False))
        return 0
    print(f"{result.candidate} against {result.released} on {result.cases} cases scored by both")
    print(f"  mean |difference|      {result.mean_abs_diff:.4f} (max {result.max_abs_diff:.4f})")
    print(f"  Spearman rank corr.    {result.spearman:.4f}")
    print(
        f"  flips at the threshold {result.flips} ({result.flips / result.cases:.1%}): "
        f"{result.flips_up} up, {result.flips_down} down"
    )
    return 0
