"""PyTorch architectures of the reference models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class StandardizedMLP(nn.Module):
    """A multilayer perceptron over raw features, with the training set's standardization inside.

    Keeping ``mean`` and ``std`` as buffers puts them in the weights file, so the artifact whose
    sha256 the registry records is everything needed to go from raw features to a logit.

    Parameters
    ----------
    n_features
        Width of the input, F.
    hidden
        Widths of the hidden layers.
    dropout
        Dropout after each hidden layer (inactive in ``eval()``).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_features: int, hidden: Sequence[int] = (32, 16), dropout: float = 0.1):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw features of shape (N, F) to logits of shape (N,)."""
        z = (x - self.mean) / self.std
        return self.net(z).squeeze(-1)


def build(architecture: str, *, n_features: int, params: dict) -> nn.Module:
    """Instantiate a registry entry's architecture with its hyper-parameters."""
    if architecture == "mlp":
        return StandardizedMLP(n_features, **params)
    raise ValueError(f"unknown architecture {architecture!r} (known: mlp)")
