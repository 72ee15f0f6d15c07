"""The sequence reference architectures: batch invariance, an independent GRU reference, and
what their input checks refuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from bench.workloads import vitals_series
from models.cases.featurize import FeatureError, check_features
from models.cases.inference import LoadedModel
from models.cases.registry import Registry

REGISTRY = Registry.load()


def _ecg_windows(n: int) -> list[dict]:
    """Real MIT-BIH record 100 (lead MLII), one-second windows, read with wfdb's format 212."""
    from tests.helpers import mitbih_windows

    return [{"ecg_mlii": w} for w in mitbih_windows(n)]


def _event_sequences(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"events": [int(c) for c in rng.integers(1, 1024, size=int(rng.integers(1, 129)))]}
        for _ in range(n)
    ]


def _beats(n: int) -> list[dict]:
    """Real beats of record 100 as ecg-cnn@1.0.0 takes them (1.0 s before the R peak, 0.5 s after)."""
    from models.reference import ecg
    from tests.helpers import ECG_RECORD, require_shared

    cases, _ = ecg.held_out(require_shared(ECG_RECORD).parent)
    return cases[:n]


CASES = {
    "vitals-gru": lambda n: vitals_series(n, seed=3, min_length=1),
    "ecg-cnn@0.1.0": _ecg_windows,
    "ecg-cnn@1.0.0": _beats,
    "events-transformer": _event_sequences,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_case_alone_and_in_a_padded_batch_of_32_agree(name: str) -> None:
    """Scores do not depend on batch company or padding (to 1e-5)."""
    model = LoadedModel(REGISTRY.resolve(name), device="cpu")
    cases = CASES[name](32)
    for case in cases:
        assert check_features(model.spec, case) == {}
    batched = [r.score for r in model.score(cases)]
    alone = [model.score([c])[0].score for c in cases]
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    if not name.startswith("ecg-cnn"):  # really variable length, really padded
        assert len({len(next(iter(c.values()))) for c in cases}) > 10


def test_gru_equals_a_numpy_recurrence_over_each_case_own_steps() -> None:
    """vitals-gru scores equal a hand-written float64 GRU (PyTorch's gate equations) run over
    exactly each case's steps: padding and packing change nothing."""
    spec = REGISTRY.resolve("vitals-gru")
    model = LoadedModel(spec, device="cpu")
    w = {k: v.astype(np.float64) for k, v in load_file(str(spec.artifact)).items()}
    hidden = w["rnn.weight_hh_l0"].shape[1]

    def sigmoid(x: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-x))

    def reference(case: dict) -> float:
        x = (np.array([case[n] for n in spec.feature_names]).T - w["mean"]) / w["std"]
        h = np.zeros(hidden)
        for xt in x:
            gi = w["rnn.weight_ih_l0"] @ xt + w["rnn.bias_ih_l0"]
            gh = w["rnn.weight_hh_l0"] @ h + w["rnn.bias_hh_l0"]
            r = sigmoid(gi[:hidden] + gh[:hidden])
            z = sigmoid(gi[hidden : 2 * hidden] + gh[hidden : 2 * hidden])
            n = np.tanh(gi[2 * hidden :] + r * gh[2 * hidden :])
            h = (1 - z) * n + z * h
        return float(sigmoid(w["head.weight"] @ h + w["head.bias"])[0])

    cases = vitals_series(40, seed=5, min_length=1)
    np.testing.assert_allclose(
        [r.score for r in model.score(cases)], [reference(c) for c in cases], atol=1e-5
    )


def test_transformer_ignores_what_follows_the_length() -> None:
    """Tokens past a case's length (padding) cannot change its score."""
    model = LoadedModel(REGISTRY.resolve("events-transformer"), device="cpu")
    batch = model.featurize(_event_sequences(8))
    clean = model.predict(batch)
    noisy_values = batch.values.clone()
    assert batch.lengths is not None
    for i, n in enumerate(batch.lengths.tolist()):
        noisy_values[i, n:] = 7
    noisy = model.predict(type(batch)(noisy_values, batch.lengths))
    torch.testing.assert_close(noisy, clean, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("name", "features", "field", "fragment"),
    [
        ("vitals-gru", lambda c: {**c, "spo2": c["spo2"][:-1]}, "spo2", "channels must align"),
        ("vitals-gru", lambda c: {k: v * 10 for k, v in c.items()}, "heart_rate", "expected 1..48"),
        (
            "vitals-gru",
            lambda c: {**c, "spo2": [*c["spo2"][:-1], "97"]},
            "spo2",
            "expected a number",
        ),
        ("vitals-gru", lambda c: {**c, "spo2": [float("nan")] * len(c["spo2"])}, "spo2", "finite"),
        (
            "vitals-gru",
            lambda c: {k: v for k, v in c.items() if k != "temperature"},
            "temperature",
            "missing channel",
        ),
        ("vitals-gru", lambda c: {**c, "heart_rate": 80.0}, "heart_rate", "expected a list"),
        ("vitals-gru", lambda c: {**c, "lactate": [1.0]}, "lactate", "unexpected feature"),
        (
            "ecg-cnn@0.1.0",
            lambda c: {"ecg_mlii": c["ecg_mlii"][:300]},
            "ecg_mlii",
            "length 300, expected 360",
        ),
        (
            "ecg-cnn@1.0.0",
            lambda c: {"ecg_mlii": c["ecg_mlii"][:360]},
            "ecg_mlii",
            "length 360, expected 540",
        ),
        ("events-transformer", lambda c: {"events": [*c["events"], 1024]}, "events", "1..1023"),
        ("events-transformer", lambda c: {"events": [0]}, "events", "1..1023"),
        ("events-transformer", lambda c: {"events": [1.0]}, "events", "integer code"),
        ("events-transformer", lambda c: {"events": [True]}, "events", "integer code"),
        ("events-transformer", lambda c: {"events": []}, "events", "length 0, expected 1..128"),
    ],
)
def test_inputs_that_do_not_fit_are_named(name, features, field, fragment) -> None:  # type: ignore[no-untyped-def]
    """Each malformed series or code list is refused, naming the input and the problem."""
    model = LoadedModel(REGISTRY.resolve(name), device="cpu")
    case = features(CASES[name](1)[0])
    problems = check_features(model.spec, case)
    assert field in problems and fragment in problems[field], problems
    with pytest.raises(FeatureError, match=field):
        model.featurize([case])


def test_registry_marks_benchmark_weights_not_for_clinical_use() -> None:
    """Untrained reference models are candidates and say so."""
    for name in CASES:
        spec = REGISTRY.resolve(name)
        assert spec.status == "candidate"
        assert "NOT FOR CLINICAL USE" in spec.clinical_use


def test_the_ecg_decoder_reproduces_the_record_header() -> None:
    """First samples and 16-bit checksums of record 100 equal those its .hea file states."""
    from tests.helpers import ECG_RECORD, read_mitbih_212

    samples = read_mitbih_212()
    header = ECG_RECORD.with_suffix(".hea").read_text().splitlines()
    assert len(header) > 2
    signals = [line.split() for line in header if line.startswith("100.dat")]
    assert samples.shape == (650_000, 2)
    for lead, fields in enumerate(signals):
        first, checksum = int(fields[5]), int(fields[6])
        assert samples[0, lead] == first
        total = int(samples[:, lead].astype(np.int64).sum()) & 0xFFFF
        assert (total - 0x10000 if total >= 0x8000 else total) == checksum
