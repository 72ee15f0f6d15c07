"""The inference contract: ``featurize(cases) -> batch``, ``predict(batch) -> outputs``,
``to_rows(outputs) -> result rows``, with the model loaded once and the device chosen once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from safetensors.torch import load_file

from models.cases.architectures import build_for
from models.cases.featurize import featurize
from models.cases.registry import ModelSpec, verify_artifact
from models.device import Device, resolve_device

Autocast = Literal["off", "bf16", "fp16"]
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ModelOutputError(ValueError):
    """A model answered something other than one logit per case. Its message is medbatch's own
    (shapes and the model's name, never an input value), so a failed case may show it."""


@dataclass(frozen=True)
class ScoreRow:
    score: float
    label: str


@dataclass(frozen=True)
class ModelInput:
    """A featurized batch: ``values`` and, for sequence inputs, each case's valid ``lengths``.

    Slicing keeps cases together with their lengths and trims padding no case in the slice needs.
    """

    values: torch.Tensor  # (N, F) | (N, T, C) | (N, T)
    lengths: torch.Tensor | None = None  # (N,) int64

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __getitem__(self, index: slice) -> ModelInput:
        if self.lengths is None:
            return ModelInput(self.values[index])
        lengths = self.lengths[index]
        steps = int(lengths.max()) if len(lengths) else 0
        return ModelInput(self.values[index][:, :steps], lengths)


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
        if spec.architecture == "torchscript":
            from models.cases.byo import load_torchscript

            module = load_torchscript(path, self.device)
        elif spec.architecture == "torch-export":
            # An exported graph is already in inference form and lives where it was exported.
            module = torch.export.load(str(path)).module()
        else:
            module = build_for(spec)
            module.load_state_dict(load_file(path))
        if spec.architecture != "torch-export":
            module = module.to(self.device).eval()
        self.module = module

    @property
    def sha256(self) -> str:
        return self.spec.sha256

    def featurize(
        self, cases: Sequence[Mapping[str, object]], *, checked: bool = False
    ) -> ModelInput:
        """Cases' features as tensors; see :func:`models.cases.featurize.featurize` for the shapes."""
        values, lengths = featurize(self.spec, cases, checked=checked)
        return ModelInput(
            torch.from_numpy(values), None if lengths is None else torch.from_numpy(lengths)
        )

    def _check_shape(self, batch: ModelInput) -> None:
        kind, width = self.spec.input_kind, len(self.spec.inputs)
        x = batch.values
        expected = {"tabular": f"(N, {width})", "series": f"(N, T, {width})", "tokens": "(N, T)"}
        ok = {
            "tabular": x.ndim == 2 and x.shape[1] == width,
            "series": x.ndim == 3 and x.shape[2] == width and batch.lengths is not None,
            "tokens": x.ndim == 2 and batch.lengths is not None,
        }[kind]
        if not ok:
            raise ValueError(
                f"{self.spec.ref} expects a batch of shape {expected[kind]}"
                f"{'' if kind == 'tabular' else ' with lengths'}, got {tuple(x.shape)}"
            )

    @torch.inference_mode()
    def predict(self, batch: ModelInput | torch.Tensor) -> torch.Tensor:
        """Probabilities of shape (N,) for a featurized batch."""
        if isinstance(batch, torch.Tensor):
            batch = ModelInput(batch)
        self._check_shape(batch)
        x, lengths = batch.values, batch.lengths
        if self.device.type == "cuda":
            # Page-locked host memory lets the copy overlap with work already queued on the GPU.
            x = x.pin_memory().to(self.device, non_blocking=True)
            if lengths is not None:
                lengths = lengths.to(self.device, non_blocking=True)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            logits = self.module(x) if lengths is None else self.module(x, lengths)
        if logits.ndim == 2 and logits.shape[1] == 1:  # registered models may answer (N, 1)
            logits = logits[:, 0]
        if tuple(logits.shape) != (len(batch),):
            # Said here, where a caller isolates a failing pass: a registered model that passed
            # its dry run on 4 cases may still answer another shape for another batch size.
            raise ModelOutputError(
                f"{self.spec.ref} answered shape {tuple(logits.shape)} for a batch of "
                f"{len(batch)}; expected one logit per case"
            )
        return torch.sigmoid(logits.float()).cpu()

    def dummy_batch(self, batch_size: int = 8) -> ModelInput:
        """A batch of the model's input shape holding no case (zeros; ones for tokens)."""
        width, steps = len(self.spec.inputs), self.spec.max_length or 1
        lengths = torch.full((batch_size,), steps, dtype=torch.int64)
        if self.spec.input_kind == "series":
            return ModelInput(torch.zeros(batch_size, steps, width), lengths)
        if self.spec.input_kind == "tokens":
            return ModelInput(torch.ones(batch_size, steps, dtype=torch.int64), lengths)
        return ModelInput(torch.zeros(batch_size, width))

    def warm_up(self, batch_size: int = 8) -> None:
        """One forward pass on a dummy batch, so the first real case pays no lazy initialisation."""
        self.predict(self.dummy_batch(batch_size))

    def to_rows(self, probabilities: torch.Tensor) -> list[ScoreRow]:
        negative, positive = self.spec.labels
        return [
            ScoreRow(score=p, label=positive if p >= self.spec.threshold else negative)
            for p in probabilities.double().tolist()
        ]

    def score(self, cases: Sequence[Mapping[str, object]]) -> list[ScoreRow]:
        """featurize → predict → to_rows in one call."""
        return self.to_rows(self.predict(self.featurize(cases)))
