"""Per-case feature attributions: integrated gradients (Captum) on the model's log-odds.

Integrated gradients (Sundararajan, Taly & Yan 2017) attribute f(x) - f(baseline) to the inputs;
the attributions sum to that difference (completeness). We attribute the logit, where a model's
contributions add up, against the baseline of an average training case (the standardization mean
stored in the weights file); for a linear model attribution_i = w_i * (x_i - baseline_i) exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from models.scoring import LoadedModel, ModelInput

METHOD = "integrated_gradients"


def explainable(model: LoadedModel) -> bool:
    """Attributions are computed for numeric (tabular) inputs; sequences get none yet."""
    return model.spec.input_kind == "tabular"


def explain(
    model: LoadedModel, batch: ModelInput, *, top_k: int = 5, n_steps: int = 32
) -> list[dict[str, Any]]:
    """Attributions for each case of a tabular ``batch`` of shape (N, F).

    Returns one dict per case: the ``top_k`` features by absolute attribution (log-odds units),
    the sum of all F attributions, the baseline's logit and Captum's convergence delta.
    """
    from captum.attr import IntegratedGradients

    if not explainable(model):
        raise ValueError(f"{model.spec.ref}: no attributions for {model.spec.input_kind} inputs")
    module = model.module
    x = batch.values.to(model.device)
    mean = getattr(module, "mean", None)
    baseline = (mean if isinstance(mean, torch.Tensor) else torch.zeros(x.shape[1])).to(x)
    baselines = baseline.expand_as(x)
    with torch.enable_grad():
        ig = IntegratedGradients(lambda inputs: module(inputs))
        attributions, delta = ig.attribute(
            x, baselines=baselines, n_steps=n_steps, return_convergence_delta=True
        )
        with torch.no_grad():
            baseline_logit = module(baseline[None]).squeeze().item()
    attributions = attributions.detach().double().cpu()
    names = model.spec.feature_names
    out = []
    for row, d in zip(attributions, delta.detach().cpu().tolist(), strict=True):
        order = torch.argsort(row.abs(), descending=True)[:top_k].tolist()
        out.append(
            {
                "method": METHOD,
                "target": "log-odds",
                "baseline": "training mean",
                "n_steps": n_steps,
                "top": [{"feature": names[i], "attribution": float(row[i])} for i in order],
                "total": float(row.sum()),
                "baseline_logit": baseline_logit,
                "convergence_delta": float(d),
            }
        )
    return out
