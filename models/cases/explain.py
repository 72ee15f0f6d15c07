"""Per-case feature attributions: integrated gradients (Captum) on the model's log-odds.

Integrated gradients (Sundararajan, Taly & Yan 2017) attribute f(x) - f(baseline) to the inputs;
the attributions sum to that difference (completeness). We attribute the logit, where a model's
contributions add up.

- tabular inputs, against an average training case (the standardization mean stored in the
  weights file; zeros for a registered model that keeps none, as its ``baseline`` says); for a
  linear model attribution_i = w_i * (x_i - baseline_i) exactly;
- series inputs, against the training mean at every step: attributions per channel (summed over
  the case's steps) and the steps that weigh most (summed over channels);
- token inputs (the built-in Transformer), on the code embeddings against the padding embedding
  (Captum's layer integrated gradients): the positions, with their codes, that weigh most.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from models.cases.inference import LoadedModel, ModelInput

METHOD = "integrated_gradients"


def explainable(model: LoadedModel) -> bool:
    """Built-in and registered tabular models, series models, and token models with an
    ``embed`` layer (the built-in Transformer)."""
    if model.spec.input_kind == "tokens":
        return isinstance(getattr(model.module, "embed", None), torch.nn.Embedding)
    return model.spec.input_kind in ("tabular", "series")


def explain(
    model: LoadedModel, batch: ModelInput, *, top_k: int = 5, n_steps: int = 16
) -> list[dict[str, Any]]:
    """Attributions for each case of ``batch``.

    Returns one dict per case: the ``top_k`` inputs by absolute attribution (log-odds units;
    for sequences, channels and steps), the sum of all attributions, the baseline's logit and
    Captum's convergence delta (how far the sum is from logit(x) - logit(baseline)).
    """
    if not explainable(model):
        raise ValueError(
            f"{model.spec.ref}: no attributions for {model.spec.input_kind} inputs "
            "of a model without an embedding layer"
        )
    kind = model.spec.input_kind
    if kind == "tokens":
        return _explain_tokens(model, batch, top_k=top_k, n_steps=n_steps)
    from captum.attr import IntegratedGradients

    module = model.module
    x = batch.values.to(model.device).float()
    # The built-in architectures keep their training mean; a registered model may not (a
    # hospital's own TorchScript or torch.export module): its baseline is zeros, and says so.
    mean = getattr(module, "mean", None)
    standardized = isinstance(mean, torch.Tensor)
    width = len(model.spec.inputs)
    baseline = (mean if isinstance(mean, torch.Tensor) else torch.zeros(width)).to(x)
    baselines = baseline.expand_as(x)
    extra = None if batch.lengths is None else (batch.lengths.to(model.device),)
    with torch.enable_grad(), _rnn_backward_allowed(model):
        ig = IntegratedGradients(module)
        attributions, delta = ig.attribute(
            x,
            baselines=baselines,
            additional_forward_args=extra,
            n_steps=n_steps,
            return_convergence_delta=True,
        )
        with torch.no_grad():
            base_logits = module(baselines) if extra is None else module(baselines, *extra)
    attributions = attributions.detach().double().cpu()
    names = model.spec.feature_names
    out = []
    for i, (row, d) in enumerate(zip(attributions, delta.detach().cpu().tolist(), strict=True)):
        per_input = row if kind == "tabular" else row.sum(dim=0)  # (F,) or (C,) over steps
        order = torch.argsort(per_input.abs(), descending=True)[:top_k].tolist()
        e: dict[str, Any] = {
            "method": METHOD,
            "target": "log-odds",
            "baseline": ("training mean" if standardized else "zeros")
            + ("" if kind == "tabular" else " at every step"),
            "n_steps": n_steps,
            "top": [{"feature": names[j], "attribution": float(per_input[j])} for j in order],
            "total": float(row.sum()),
            "baseline_logit": float(base_logits.reshape(-1)[i]),
            "convergence_delta": float(d),
        }
        if kind == "series":
            # Only the case's own steps: those past its length pad it to the batch's longest.
            length = None if batch.lengths is None else int(batch.lengths[i])
            e["top_steps"] = _top_steps(row.sum(dim=1)[:length], top_k)
        out.append(e)
    return out


def _explain_tokens(
    model: LoadedModel, batch: ModelInput, *, top_k: int, n_steps: int
) -> list[dict[str, Any]]:
    from captum.attr import LayerIntegratedGradients

    module = model.module
    tokens = batch.values.to(model.device)
    assert batch.lengths is not None
    lengths = batch.lengths.to(model.device)
    padding = torch.zeros_like(tokens)  # code 0: the padding embedding
    with torch.enable_grad():
        lig = LayerIntegratedGradients(module, module.embed)
        attributions, delta = lig.attribute(
            tokens,
            baselines=padding,
            additional_forward_args=(lengths,),
            n_steps=n_steps,
            return_convergence_delta=True,
        )
        with torch.no_grad():
            base_logits = module(padding, lengths)
    per_position = attributions.detach().double().sum(dim=-1).cpu()  # (N, T)
    out = []
    for i, (row, d) in enumerate(zip(per_position, delta.detach().cpu().tolist(), strict=True)):
        steps = _top_steps(row[: int(lengths[i])], top_k)
        for s in steps:
            s["code"] = int(tokens[i, s["step"]])
        out.append(
            {
                "method": "layer_" + METHOD,
                "target": "log-odds",
                "baseline": "padding embedding at every position",
                "n_steps": n_steps,
                "top": [],
                "top_steps": steps,
                "total": float(row.sum()),
                "baseline_logit": float(base_logits[i]),
                "convergence_delta": float(d),
            }
        )
    return out


def _top_steps(per_step: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
    order = torch.argsort(per_step.abs(), descending=True)[:top_k].tolist()
    return [{"step": t, "attribution": float(per_step[t])} for t in order]


def _rnn_backward_allowed(model: LoadedModel) -> contextlib.AbstractContextManager[Any]:
    """cuDNN computes RNN gradients only in training mode; use the native kernels instead."""
    if model.device.type == "cuda" and model.spec.architecture == "rnn":
        return torch.backends.cudnn.flags(enabled=False)
    return contextlib.nullcontext()
