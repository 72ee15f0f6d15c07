"""Reference architectures with *benchmark weights*: seeded initialisation, no training data yet.

They exist so that the batching worker, the registry and the benchmarks are exercised on the
model families clinical ML uses (recurrent nets over vital signs, 1-D CNNs over ECG, Transformers
over coded events). Their scores mean nothing clinically; the registry says so and marks them
``candidate``. Each is reproducible with ``medbatch models train NAME``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.cases.architectures import build_for, save_weights
from models.cases.registry import FeatureSpec, ModelSpec

NOT_FOR_CLINICAL_USE = "benchmark weights (seeded initialisation, untrained): NOT FOR CLINICAL USE"

# Hourly vital signs; LOINC codes as an EHR's Observations carry them. mean/std: typical adult
# inpatient values, the standardization inside the weights file.
_VITALS = [
    ("heart_rate", "/min", "heart rate (LOINC 8867-4)", 80.0, 15.0),
    ("systolic_bp", "mm[Hg]", "systolic blood pressure (LOINC 8480-6)", 120.0, 20.0),
    ("diastolic_bp", "mm[Hg]", "diastolic blood pressure (LOINC 8462-4)", 75.0, 12.0),
    ("respiratory_rate", "/min", "respiratory rate (LOINC 9279-1)", 16.0, 4.0),
    ("spo2", "%", "oxygen saturation (LOINC 59408-5)", 97.0, 2.0),
    ("temperature", "Cel", "body temperature (LOINC 8310-5)", 37.0, 0.7),
]


@dataclass(frozen=True)
class Recipe:
    name: str
    version: str
    architecture: str
    entry: dict[str, Any]
    buffers: dict[str, list[float]]
    seed: int
    #: False where a version trained on real data has taken over as the default.
    default: bool = True


RECIPES = {
    "vitals-gru": Recipe(
        name="vitals-gru",
        version="0.1.0",
        architecture="rnn",
        seed=7,
        buffers={"mean": [v[3] for v in _VITALS], "std": [v[4] for v in _VITALS]},
        entry={
            "input_kind": "series",
            "min_length": 1,
            "max_length": 48,
            "params": {"hidden": 64, "layers": 1, "cell": "gru"},
            "inputs": [{"name": n, "unit": u, "description": d} for n, u, d, _, _ in _VITALS],
            "output": "probability of clinical deterioration within 24 h (benchmark weights)",
            "labels": ["stable", "deteriorating"],
        },
    ),
    "ecg-cnn": Recipe(
        name="ecg-cnn",
        version="0.1.0",
        architecture="cnn1d",
        seed=11,
        default=False,
        buffers={"mean": [0.0], "std": [0.5]},
        entry={
            "input_kind": "series",
            "min_length": 360,
            "max_length": 360,
            "params": {"widths": [16, 32, 64], "kernel": 7},
            "inputs": [
                {
                    "name": "ecg_mlii",
                    "unit": "mV",
                    "description": "1 s of lead MLII at 360 Hz, centred on an R peak",
                }
            ],
            "output": "probability that the beat is not normal (benchmark weights)",
            "labels": ["normal", "abnormal"],
        },
    ),
    "events-transformer": Recipe(
        name="events-transformer",
        version="0.1.0",
        architecture="transformer",
        seed=13,
        buffers={},
        entry={
            "input_kind": "tokens",
            "min_length": 1,
            "max_length": 128,
            "vocab_size": 1024,
            "params": {"d_model": 64, "heads": 4, "layers": 2, "ff": 128},
            "inputs": [
                {
                    "name": "events",
                    "unit": "code",
                    "description": "coded events in time order (a site's code book, 1..1023)",
                }
            ],
            "output": "probability of 30-day readmission (benchmark weights)",
            "labels": ["no-readmission", "readmission"],
        },
    ),
}


def write(recipe: Recipe, out: Path) -> tuple[ModelSpec, dict[str, Any]]:
    """Write the recipe's weights to ``out``; return its spec and registry entry."""
    torch.manual_seed(recipe.seed)
    entry: dict[str, Any] = {
        "name": recipe.name,
        "version": recipe.version,
        "default": recipe.default,
        "status": "candidate",
        "architecture": recipe.architecture,
        **recipe.entry,
        "threshold": 0.5,
        "clinical_use": NOT_FOR_CLINICAL_USE,
        "training": {"data": "none", "seed": recipe.seed},
    }
    spec = ModelSpec(
        name=recipe.name,
        version=recipe.version,
        architecture=recipe.architecture,
        artifact=out,
        sha256="",
        inputs=tuple(FeatureSpec(**f) for f in entry["inputs"]),
        output=entry["output"],
        threshold=0.5,
        params=entry["params"],
        input_kind=entry["input_kind"],
        min_length=entry["min_length"],
        max_length=entry.get("max_length"),
        vocab_size=entry.get("vocab_size"),
    )
    module = build_for(spec).eval()
    with torch.no_grad():
        for name, values in recipe.buffers.items():
            getattr(module, name).copy_(torch.tensor(values))
    entry["sha256"] = save_weights(module, out)
    return spec, entry
