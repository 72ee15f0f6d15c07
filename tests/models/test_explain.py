"""Integrated-gradient attributions: exact on a linear model, complete on the MLP."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bench.workloads import make_cases
from models.cases.architectures import StandardizedMLP
from models.cases.explain import explain
from models.cases.inference import LoadedModel
from models.cases.registry import Registry, sha256_file

SPEC = Registry.load().resolve("breast-cancer")


def test_linear_model_attributions_are_weight_times_input_minus_baseline(tmp_path: Path) -> None:
    """For logit = w·((x - mean) / std) + b: attribution_i = w_i / std_i · (x_i - mean_i), and they
    sum to logit(x) - logit(baseline)."""
    torch.manual_seed(0)
    x_train = np.array([[c[n] for n in SPEC.feature_names] for c in make_cases(SPEC, 200)])
    linear = StandardizedMLP(30, hidden=())
    linear.mean.copy_(torch.tensor(x_train.mean(axis=0)))
    linear.std.copy_(torch.tensor(x_train.std(axis=0)))
    path = tmp_path / "linear.safetensors"
    save_file({k: v.contiguous() for k, v in linear.state_dict().items()}, str(path))
    spec = dataclasses.replace(
        SPEC, artifact=path, sha256=sha256_file(path), params={"hidden": [], "dropout": 0.0}
    )
    model = LoadedModel(spec, device="cpu")
    cases = make_cases(SPEC, 16)
    batch = model.featurize(cases)
    found = explain(model, batch, top_k=30, n_steps=8)
    w = (linear.net[0].weight[0] / linear.std).detach().double().numpy()
    logits = model.module(batch.values).detach().double().numpy()
    for case, e, logit in zip(cases, found, logits, strict=True):
        x = np.array([case[n] for n in SPEC.feature_names])
        expected = w * (x - linear.mean.double().numpy())
        got = {a["feature"]: a["attribution"] for a in e["top"]}
        np.testing.assert_allclose(
            [got[n] for n in SPEC.feature_names], expected, rtol=1e-4, atol=1e-5
        )
        assert e["total"] == pytest.approx(logit - e["baseline_logit"], abs=1e-4)


def test_a_registered_model_without_a_training_mean_is_explained_against_zeros_saying_so(
    tmp_path: Path,
) -> None:
    """A hospital's own TorchScript model keeps no training mean: its attributions are against
    zeros (w_i * x_i for a linear one), and its explanation says so, where it said "training
    mean". The built-in models still say "training mean"."""
    import json
    import warnings

    from models.cases.byo import register
    from models.cases.registry import load_registry

    torch.manual_seed(3)
    linear = torch.nn.Linear(3, 1).eval()
    path = tmp_path / "own.pt"
    with warnings.catch_warnings():  # PyTorch deprecates making new TorchScript files
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(linear), str(path))
    schema = tmp_path / "own.json"
    inputs = [{"name": n, "unit": "1"} for n in "abc"]
    schema.write_text(json.dumps({"inputs": inputs, "output": "risk of X", "status": "released"}))
    store = tmp_path / "store"
    register(path, name="own", version="1.0", schema_path=schema, artifact_dir=store)
    model = LoadedModel(load_registry(store).resolve("own@1.0"), device="cpu")
    cases = [{"a": 1.5, "b": -2.0, "c": 0.25}, {"a": 0.0, "b": 3.0, "c": -1.0}]
    found = explain(model, model.featurize(cases), top_k=3, n_steps=8)
    w = linear.weight[0].detach().double().numpy()
    for case, e in zip(cases, found, strict=True):
        assert e["baseline"] == "zeros"
        got = {a["feature"]: a["attribution"] for a in e["top"]}
        x = np.array([case[n] for n in "abc"])
        np.testing.assert_allclose([got[n] for n in "abc"], w * x, rtol=1e-4, atol=1e-6)
        assert e["baseline_logit"] == pytest.approx(float(linear.bias.detach()[0]), abs=1e-6)
    builtin = LoadedModel(SPEC, device="cpu")
    (e,) = explain(builtin, builtin.featurize(make_cases(SPEC, 1)), top_k=1, n_steps=4)
    assert e["baseline"] == "training mean"


def test_mlp_attributions_are_complete_and_ranked() -> None:
    """On the real MLP the attributions sum to the logit difference (to Captum's reported delta),
    and the top-k are the largest by magnitude."""
    model = LoadedModel(SPEC, device="cpu")
    cases = make_cases(SPEC, 32)
    batch = model.featurize(cases)
    found = explain(model, batch, top_k=5, n_steps=64)
    logits = model.module(batch.values).detach().double().numpy()
    for e, logit in zip(found, logits, strict=True):
        assert e["total"] - e["convergence_delta"] == pytest.approx(
            logit - e["baseline_logit"], abs=1e-3
        )
        assert abs(e["convergence_delta"]) < 0.05 * max(1.0, abs(logit - e["baseline_logit"]))
        magnitudes = [abs(a["attribution"]) for a in e["top"]]
        assert magnitudes == sorted(magnitudes, reverse=True) and len(magnitudes) == 5


@pytest.mark.parametrize("name", ["vitals-gru", "ecg-cnn@1.0.0", "events-transformer"])
def test_sequence_attributions_are_complete(name: str) -> None:
    """Series and token models: the attributions (over the case's own steps) sum to
    logit(x) - logit(baseline) up to Captum's reported delta, which stays small."""
    from bench.workloads import vitals_series

    model = LoadedModel(Registry.load().resolve(name), device="cpu")
    if name == "vitals-gru":
        cases = vitals_series(12, seed=2, min_length=1)
    elif name == "events-transformer":
        rng = np.random.default_rng(1)
        cases = [{"events": [int(c) for c in rng.integers(1, 1024, size=n)]} for n in (3, 40, 128)]
    else:
        from models.reference import ecg
        from tests.helpers import ECG_RECORD, require_shared

        beats, labels = ecg.held_out(require_shared(ECG_RECORD).parent)
        cases = [beats[i] for i in np.flatnonzero(labels)[:4]] + beats[:4]
    batch = model.featurize(cases)
    found = explain(model, batch, top_k=3, n_steps=64)
    with torch.no_grad():
        logits = model.module(batch.values, batch.lengths).double().numpy()
    for case, e, logit in zip(cases, found, logits, strict=True):
        difference = logit - e["baseline_logit"]
        assert e["total"] - e["convergence_delta"] == pytest.approx(difference, abs=1e-3)
        assert abs(e["convergence_delta"]) < 0.05 * max(1.0, abs(difference))
        steps = len(next(iter(case.values())))
        assert all(0 <= s["step"] < steps for s in e["top_steps"]) and len(e["top_steps"]) == 3
        magnitudes = [abs(s["attribution"]) for s in e["top_steps"]]
        assert magnitudes == sorted(magnitudes, reverse=True)
        if name == "events-transformer":
            assert [s["code"] for s in e["top_steps"]] == [
                case["events"][s["step"]] for s in e["top_steps"]
            ]
        else:
            assert {a["feature"] for a in e["top"]} <= set(model.spec.feature_names)


def test_padding_gets_no_attribution() -> None:
    """A short series padded into a batch with a long one: its steps past its length are not
    named (they are not the patient's), and its attributions are those it gets alone."""
    from bench.workloads import vitals_series

    model = LoadedModel(Registry.load().resolve("vitals-gru"), device="cpu")
    short, long = vitals_series(2, seed=4, min_length=1)
    short = {k: v[:3] for k, v in short.items()}
    long = {k: (v * 48)[:48] for k, v in long.items()}
    found = explain(model, model.featurize([short, long]), top_k=48, n_steps=16)
    assert sorted(s["step"] for s in found[0]["top_steps"]) == [0, 1, 2]
    alone = explain(model, model.featurize([short]), top_k=48, n_steps=16)[0]
    assert [s["step"] for s in found[0]["top_steps"]] == [s["step"] for s in alone["top_steps"]]
    assert [s["attribution"] for s in found[0]["top_steps"]] == pytest.approx(
        [s["attribution"] for s in alone["top_steps"]], abs=1e-6
    )
