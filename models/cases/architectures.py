"""PyTorch architectures of the reference models."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from models.cases.registry import ModelSpec, sha256_file

#: How SignalCNN's head reads the last feature map (see its docstring).
Pool = Literal["mean", "flatten"]


class _Standardized(nn.Module):
    """A model that standardizes its raw inputs with the training set's per-feature ``mean`` and
    ``std``, kept as buffers: they go into the weights file, so the artifact whose sha256 the
    registry records is everything needed to go from raw inputs to a logit."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs (..., F) to standardized ones, same shape."""
        return (x - self.mean) / self.std


def fit_full_batch(
    model: StandardizedMLP,
    x: torch.Tensor,
    loss: Callable[[], torch.Tensor],
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
) -> None:
    """Set ``model``'s standardization from the training features ``x`` (N, F), then run
    ``epochs`` full-batch Adam steps on ``loss()``; the model is left in ``eval()``."""
    model.mean.copy_(x.mean(dim=0))
    model.std.copy_(x.std(dim=0).clamp_min(1e-8))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    model.eval()


class StandardizedMLP(_Standardized):
    """A multilayer perceptron over raw features, with the training set's standardization inside.

    Parameters
    ----------
    n_features
        Width of the input, F.
    hidden
        Widths of the hidden layers.
    dropout
        Dropout after each hidden layer (inactive in ``eval()``).
    """

    def __init__(self, n_features: int, hidden: Sequence[int] = (32, 16), dropout: float = 0.1):
        super().__init__(n_features)
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw features of shape (N, F) to logits of shape (N,)."""
        return self.net(self.standardize(x)).squeeze(-1)


class CoxMLP(StandardizedMLP):
    """An MLP whose output is a log hazard ratio, trained with the Cox partial likelihood.

    ``forward`` turns it into the logit of the risk of the event by the model's horizon, so the
    scoring contract (a sigmoid of the output is a probability) holds unchanged: with the
    training set's Breslow cumulative baseline hazard at the horizon, ``H0``,
    ``P(T <= horizon | x) = 1 - exp(-H0 * exp(log_hazard_ratio(x)))``.
    """

    baseline_cumhaz: torch.Tensor

    def __init__(self, n_features: int, hidden: Sequence[int] = (16,), dropout: float = 0.1):
        super().__init__(n_features, hidden, dropout)
        self.register_buffer("baseline_cumhaz", torch.ones(()))

    def log_hazard_ratio(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features (N, F) to log hazard ratios (N,), the quantity the Cox loss fits."""
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features (N, F) to logits of the risk by the horizon (N,)."""
        cumhaz = self.baseline_cumhaz * torch.exp(self.log_hazard_ratio(x))
        # logit(1 - exp(-H)) = log(1 - exp(-H)) + H, with expm1 for precision at small H.
        return torch.log(-torch.expm1(-cumhaz)) + cumhaz


class VitalsRNN(_Standardized):
    """A GRU (or LSTM) over variable-length multichannel series, e.g. hourly vital signs.

    Padded steps never reach the recurrence: the batch is packed by length
    (``pack_padded_sequence``), so a case scores the same alone or in a padded batch.

    Parameters
    ----------
    n_channels
        C, the channels per step.
    hidden
        Width of the recurrent state.
    cell
        ``"gru"`` or ``"lstm"``.
    """

    def __init__(self, n_channels: int, hidden: int = 64, layers: int = 1, cell: str = "gru"):
        super().__init__(n_channels)
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn(n_channels, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Series of shape (N, T, C) with valid lengths (N,) to logits of shape (N,)."""
        packed = nn.utils.rnn.pack_padded_sequence(
            self.standardize(x), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        _, state = self.rnn(packed)
        h = state[0] if isinstance(state, tuple) else state  # LSTM returns (h, c)
        return self.head(h[-1]).squeeze(-1)


class SignalCNN(_Standardized):
    """A 1-D CNN over fixed-length signal windows, e.g. one second of an ECG lead.

    Parameters
    ----------
    n_channels
        C, the leads.
    widths
        Output channels of the convolution blocks (each halves the length).
    kernel
        Convolution width in samples.
    pool
        How the head reads the last feature map, of shape (N, widths[-1], T // 2**len(widths)).
        ``"mean"`` averages it over time, so the head cannot tell where in the window a wave
        lies; ``"flatten"`` hands the head every step, so it can (e.g. how long before the
        centred R peak the previous beat came, which is what makes a beat premature).
    length
        T, the window length; ``"flatten"`` needs it to size the head, and windows of any other
        length are refused.
    """

    def __init__(
        self,
        n_channels: int,
        widths: Sequence[int] = (16, 32, 64),
        kernel: int = 7,
        pool: Pool = "mean",
        length: int | None = None,
    ):
        super().__init__(n_channels)
        blocks: list[nn.Module] = []
        width = n_channels
        for w in widths:
            blocks += [
                nn.Conv1d(width, w, kernel, padding=kernel // 2),
                nn.BatchNorm1d(w),
                nn.ReLU(),
                nn.MaxPool1d(2),
            ]
            width = w
        self.features = nn.Sequential(*blocks)
        self.pool = pool
        self.length = length
        self.head = nn.Linear(width * _pooled_steps(pool, length, len(widths)), 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Windows of shape (N, T, C) (all of the schema's one length) to logits of shape (N,)."""
        if self.length is not None and x.shape[1] != self.length:
            raise ValueError(
                f"SignalCNN expects windows of shape (N, {self.length}, C), got {tuple(x.shape)}"
            )
        h = self.features(self.standardize(x).transpose(1, 2))
        return self.head(h.mean(dim=-1) if self.pool == "mean" else h.flatten(1)).squeeze(-1)


def _pooled_steps(pool: str, length: int | None, blocks: int) -> int:
    """Steps per channel that reach SignalCNN's head: 1 after mean pooling, else T // 2**blocks."""
    if pool == "mean":
        return 1
    if pool != "flatten":
        raise ValueError(f"pool must be 'mean' or 'flatten', got {pool!r}")
    if length is None:
        raise ValueError("pool='flatten' needs the window length (length=T)")
    steps = length // 2**blocks
    if steps < 1:
        raise ValueError(f"a window of {length} steps does not survive {blocks} halvings")
    return steps


class EventTransformer(nn.Module):
    """A small Transformer encoder over sequences of coded clinical events.

    Padding (token 0) is masked out of attention and out of the mean pooling.

    Parameters
    ----------
    vocab_size
        Codes are 1 .. vocab_size - 1; 0 is padding.
    max_length
        Longest sequence, for the learned positions.
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff: int = 128,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.position = nn.Embedding(max_length, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.1, batch_first=True)
        # No nested-tensor fast path: padded and unpadded batches take the same arithmetic.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Codes of shape (N, T) with valid lengths (N,) to logits of shape (N,)."""
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        padding = steps[None, :] >= lengths[:, None]
        h = self.embed(tokens) + self.position(steps)[None]
        h = self.encoder(h, src_key_padding_mask=padding)
        h = h.masked_fill(padding[..., None], 0.0).sum(dim=1) / lengths[:, None].to(h.dtype)
        return self.head(h).squeeze(-1)


#: Architectures whose forward takes ``(x, lengths)``.
SEQUENCE_ARCHITECTURES = frozenset({"rnn", "cnn1d", "transformer"})


def build_for(spec: ModelSpec) -> nn.Module:
    """The untrained module a registry entry describes (its weights are loaded after)."""
    if spec.architecture in ("torchscript", "torch-export"):
        raise ValueError(f"{spec.ref} is a whole {spec.architecture} artifact, not an architecture")
    params = dict(spec.params)
    if spec.architecture == "transformer":
        params.update(vocab_size=spec.vocab_size, max_length=spec.max_length)
    return build(spec.architecture, n_features=len(spec.inputs), params=params)


def build(architecture: str, *, n_features: int, params: dict) -> nn.Module:
    """Instantiate an architecture with its hyper-parameters."""
    if architecture == "mlp":
        return StandardizedMLP(n_features, **params)
    if architecture == "cox-mlp":
        return CoxMLP(n_features, **params)
    if architecture == "rnn":
        return VitalsRNN(n_features, **params)
    if architecture == "cnn1d":
        return SignalCNN(n_features, **params)
    if architecture == "transformer":
        return EventTransformer(**params)
    raise ValueError(
        f"unknown architecture {architecture!r} (known: mlp, cox-mlp, rnn, cnn1d, transformer)"
    )


def save_weights(module: nn.Module, out: Path) -> str:
    """Write ``module``'s state dict to ``out`` as safetensors (world-readable); return its sha256.

    No metadata: safetensors writes its metadata map in hash order, which would change the file's
    sha256 from run to run; name, version and seed live in the registry entry instead.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(out))
    out.chmod(0o644)
    return sha256_file(out)
