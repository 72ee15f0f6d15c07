"""The inference contract: ``featurize(cases) -> batch``, ``predict(batch) -> outputs``,
``to_rows(outputs) -> result rows``, with the model loaded once and the device chosen once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from safetensors.torch import load_file

from models.architectures import build
from models.featurize import featurize
from models.registry import ModelSpec, verify_artifact

Device = Literal["auto", "cpu", "cuda"]
Autocast = Literal["off", "bf16", "fp16"]
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ScoreRow:
    score: float
    label: str


def resolve_device(device: Device = "auto") -> torch.device:
    """``auto`` means CUDA when a CUDA device is present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("MEDBATCH_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(device)


class LoadedModel:
    """One model version on one device, ready to score batches.

    Load once per process; every call after that is a forward pass.
    """

    def __init__(
        self, spec: ModelSpec, *, device: Device = "auto", autocast: Autocast = "off"
    ) -> None:
        self.spec = spec
        self.device = resolve_device(device)
        # Mixed precision only where it pays: tensor cores on CUDA. On the CPU, float32 throughout.
        self.autocast_dtype = _AUTOCAST_DTYPES.get(autocast) if self.device.type == "cuda" else None
        path = verify_artifact(spec)
        module = build(spec.architecture, n_features=len(spec.inputs), params=spec.params)
        module.load_state_dict(load_file(path))
        self.module = module.to(self.device).eval()

    @property
    def sha256(self) -> str:
        return self.spec.sha256

    def featurize(
        self, cases: Sequence[Mapping[str, object]], *, checked: bool = False
    ) -> torch.Tensor:
        """Cases' features as a float32 tensor of shape (N, F); see :func:`models.featurize.featurize`."""
        return torch.from_numpy(featurize(self.spec, cases, checked=checked))

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Probabilities of shape (N,) for a feature batch of shape (N, F)."""
        if batch.ndim != 2 or batch.shape[1] != len(self.spec.inputs):
            raise ValueError(
                f"{self.spec.ref} expects a batch of shape (N, {len(self.spec.inputs)}), "
                f"got {tuple(batch.shape)}"
            )
        if self.device.type == "cuda":
            # Page-locked host memory lets the copy overlap with work already queued on the GPU.
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            logits = self.module(batch)
        return torch.sigmoid(logits.float()).cpu()

    def warm_up(self, batch_size: int = 8) -> None:
        """One forward pass on zeros, so the first real batch pays no lazy initialisation."""
        self.predict(torch.zeros(batch_size, len(self.spec.inputs)))

    def to_rows(self, probabilities: torch.Tensor) -> list[ScoreRow]:
        negative, positive = self.spec.labels
        return [
            ScoreRow(score=p, label=positive if p >= self.spec.threshold else negative)
            for p in probabilities.double().tolist()
        ]

    def score(self, cases: Sequence[Mapping[str, object]]) -> list[ScoreRow]:
        """featurize → predict → to_rows in one call."""
        return self.to_rows(self.predict(self.featurize(cases)))
