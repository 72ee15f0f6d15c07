"""The ``ecg-cnn`` 1.0.0 model: a 1-D CNN that flags beats other than normal in lead MLII,
trained on real data, MIT-BIH Arrhythmia Database record 100 (PhysioNet; 30 min of one patient).

Each beat is a window of lead MLII in mV around its annotated R peak, 1.0 s before it and 0.5 s
after (540 samples at 360 Hz). The 1.0 s before holds the previous R peak whenever the heart
rate is above 60/min (in record 100 all but 8 of the 2271 beats used, and every atrial
premature beat, whose coupling interval is shorter than the prevailing RR). An atrial
premature beat looks much like a normal one and is told apart mainly by coming early, so the
network must see where the previous beat is: its head reads the flattened feature map, not
its time average.
The 0.5 s after covers the QRS complex and the T wave (QT is about 0.4 s) but, at the usual
rate, not the next beat.

The split is by time, not shuffled: neighbouring beats of one patient are near copies, so a
shuffled split would test on beats the model has all but seen. The baseline is the classic
one for this task, a logistic regression on RR intervals (de Chazal, O'Dwyer & Reilly 2004,
IEEE Trans Biomed Eng 51(7):1196-1206), scored on the same held-out beats.

Training is reproducible: a fixed seed for the initial weights and for the mini-batch order,
deterministic algorithms on one CPU thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.cases.architectures import Pool, SignalCNN, save_weights

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

NAME = "ecg-cnn"
VERSION = "1.0.0"
SEED = 20261124
RECORD = "100"
LEAD = "MLII"
FS = 360
#: Samples kept before and after each R peak: 1.0 s and 0.5 s at 360 Hz.
BEFORE = 360
AFTER = 180
WINDOW = BEFORE + AFTER
TRAIN_FRACTION = 0.7
WIDTHS = (16, 32, 64)
KERNEL = 7
POOL: Pool = "flatten"
#: Chosen on the last quarter of the training period held out from a first fit; the test
#: beats were scored once, with this fixed.
EPOCHS = 25
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-3
THRESHOLD = 0.5
#: RR intervals in the local mean that the pre-RR interval is compared with.
LOCAL_RR_INTERVALS = 10
RR_FEATURES = ("pre_rr_s", "post_rr_s", "pre_rr_over_local_mean", "post_rr_over_pre_rr")
#: Annotation codes that mark a beat (PhysioNet's table of WFDB annotation codes); the others
#: (rhythm changes '+', noise '~', comments '"', ...) annotate the record, not a beat.
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")
NORMAL = "N"
BASELINE = (
    "StandardScaler + LogisticRegression(class_weight='balanced') on RR intervals: pre-RR, "
    "post-RR, pre-RR / mean of the last 10 RR intervals, post-RR / pre-RR (de Chazal et al. 2004)"
)


@dataclass(frozen=True)
class Record:
    signal: np.ndarray  # (T,) float64, lead MLII in mV
    fs: float
    samples: np.ndarray  # (B,) int64, the beats' annotated R peaks, increasing
    symbols: np.ndarray  # (B,) str, the beats' annotation codes


def load_record(directory: Path) -> Record:
    """Lead MLII of record 100 in mV and its beat annotations (non-beat annotations dropped).

    Raises
    ------
    FileNotFoundError
        when the record is not in ``directory`` (``$MEDBATCH_SHARED_DIR/data/ecg``, from
        the settings' ``shared_data``, for the CLI).
    ValueError
        when the record is not sampled at :data:`FS` or has no MLII lead.
    """
    import wfdb

    path = directory / RECORD
    if not path.with_suffix(".hea").is_file():
        raise FileNotFoundError(
            f"MIT-BIH record {RECORD} not found at {directory} (set MEDBATCH_SHARED_DIR to the "
            "folder that holds data/ecg/100.hea, .dat and .atr)"
        )
    record = wfdb.rdrecord(str(path))
    if record.fs != FS or LEAD not in record.sig_name:
        raise ValueError(
            f"{path}: expected lead {LEAD} at {FS} Hz, got {record.sig_name} at {record.fs} Hz"
        )
    annotation = wfdb.rdann(str(path), "atr")
    symbols = np.asarray(annotation.symbol)
    is_beat = np.isin(symbols, sorted(BEAT_SYMBOLS))
    return Record(
        signal=record.p_signal[:, record.sig_name.index(LEAD)].astype(np.float64),
        fs=float(record.fs),
        samples=np.asarray(annotation.sample, dtype=np.int64)[is_beat],
        symbols=symbols[is_beat],
    )


def usable(record: Record) -> np.ndarray:
    """(B,) bool: beats whose window lies inside the record and that have a beat on each side
    (so both RR intervals exist)."""
    index = np.arange(len(record.samples))
    return (
        (record.samples - BEFORE >= 0)
        & (record.samples + AFTER <= len(record.signal))
        & (index > 0)
        & (index < len(record.samples) - 1)
    )


def beats(record: Record) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The usable beats as windows around their R peaks.

    Returns
    -------
    windows : np.ndarray of shape (N, WINDOW), float32
        Lead MLII in mV; the R peak is at column :data:`BEFORE`.
    labels : np.ndarray of shape (N,), int64
        1 for any beat not annotated normal (A, V, ...), 0 for normal (N).
    positions : np.ndarray of shape (N,), int64
        The R peaks' sample numbers in the record.
    """
    keep = usable(record)
    positions = record.samples[keep]
    windows = record.signal[(positions - BEFORE)[:, None] + np.arange(WINDOW)]
    labels = (record.symbols[keep] != NORMAL).astype(np.int64)
    return windows.astype(np.float32), labels, positions


def rr_features(samples: np.ndarray, fs: float) -> np.ndarray:
    """RR-interval features of each beat, the columns :data:`RR_FEATURES`.

    Parameters
    ----------
    samples : np.ndarray of shape (B,)
        R peaks of consecutive beats, in samples.

    Returns
    -------
    np.ndarray of shape (B, 4), float64
        pre-RR and post-RR in seconds, pre-RR over the mean of the last
        :data:`LOCAL_RR_INTERVALS` RR intervals up to this beat (its pre-RR included; fewer at
        the start of the record), and post-RR over pre-RR. NaN for the first beat (no pre-RR)
        and the last (no post-RR).
    """
    rr = np.diff(samples).astype(np.float64) / fs
    pre = np.concatenate([[np.nan], rr])
    post = np.concatenate([rr, [np.nan]])
    index = np.arange(len(samples))
    first = np.maximum(index - LOCAL_RR_INTERVALS, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        local = (samples - samples[first]) / fs / (index - first)
        return np.stack([pre, post, pre / local, post / pre], axis=1)


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray  # (N_train, WINDOW) float32, lead MLII in mV
    y_train: np.ndarray  # (N_train,) int64, 1 = not a normal beat
    x_test: np.ndarray  # (N_test, WINDOW)
    y_test: np.ndarray  # (N_test,)
    train_positions: np.ndarray  # (N_train,) R peaks, in samples
    test_positions: np.ndarray  # (N_test,)
    rr_train: np.ndarray  # (N_train, 4) rr_features
    rr_test: np.ndarray  # (N_test, 4)
    boundary: int  # first sample of the test period


def split(directory: Path) -> Split:
    """The split by time used for training and evaluation.

    Beats whose windows end by the boundary (the first :data:`TRAIN_FRACTION` of the record)
    train; beats whose windows start at or after it test; the few whose windows straddle it are
    dropped, so no sample of the signal is in both.
    """
    record = load_record(directory)
    windows, labels, positions = beats(record)
    rr = rr_features(record.samples, record.fs)[usable(record)]
    boundary = int(TRAIN_FRACTION * len(record.signal))
    train = positions + AFTER <= boundary
    test = positions - BEFORE >= boundary
    return Split(
        x_train=windows[train],
        y_train=labels[train],
        x_test=windows[test],
        y_test=labels[test],
        train_positions=positions[train],
        test_positions=positions[test],
        rr_train=rr[train],
        rr_test=rr[test],
        boundary=boundary,
    )


@dataclass(frozen=True)
class HeldOutMetrics:
    recall_normal: float
    f1_normal: float
    recall_abnormal: float
    f1_abnormal: float
    roc_auc: float
    pr_auc: float  # average precision


def held_out_metrics(
    y: np.ndarray, p: np.ndarray, *, threshold: float = THRESHOLD
) -> HeldOutMetrics:
    """Per-class recall and F1 at ``threshold`` and the threshold-free AUCs, for labels ``y``
    (N,) and probabilities ``p`` (N,) of the abnormal class."""
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    predicted = (p >= threshold).astype(np.int64)
    _, recall, f1, _ = precision_recall_fscore_support(y, predicted, labels=[0, 1], zero_division=0)
    return HeldOutMetrics(
        recall_normal=float(recall[0]),
        f1_normal=float(f1[0]),
        recall_abnormal=float(recall[1]),
        f1_abnormal=float(f1[1]),
        roc_auc=float(roc_auc_score(y, p)),
        pr_auc=float(average_precision_score(y, p)),
    )


@dataclass(frozen=True)
class TrainResult:
    artifact: Path
    sha256: str
    seed: int
    model: HeldOutMetrics
    baseline: HeldOutMetrics
    n_train: int
    n_test: int
    positives_train: int
    positives_test: int
    y_test: np.ndarray  # (N_test,)
    p_model: np.ndarray  # (N_test,) the CNN's held-out probabilities
    p_baseline: np.ndarray  # (N_test,) the baseline's


def fit_cnn(x: np.ndarray, y: np.ndarray, *, seed: int = SEED) -> SignalCNN:
    """Train the CNN on windows ``x`` (N, WINDOW) in mV with labels ``y`` (N,); returned in eval mode."""
    torch.manual_seed(seed)
    model = SignalCNN(1, widths=WIDTHS, kernel=KERNEL, pool=POOL, length=WINDOW)
    windows = torch.from_numpy(x)[..., None]
    target = torch.from_numpy(y).float()
    model.mean.fill_(float(x.mean(dtype=np.float64)))
    model.std.fill_(float(x.std(dtype=np.float64)))
    positives = float(target.sum())
    # pos_weight = negatives / positives: each class carries the same total weight in the loss.
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(len(y) / positives - 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    order = torch.Generator().manual_seed(seed)
    lengths = torch.full((len(y),), WINDOW, dtype=torch.int64)
    model.train()
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(y), generator=order).split(BATCH_SIZE):
            optimizer.zero_grad()
            loss = loss_fn(model(windows[batch], lengths[batch]), target[batch])
            loss.backward()
            optimizer.step()
    return model.eval()


def predict(model: SignalCNN, x: np.ndarray) -> np.ndarray:
    """Probabilities (N,) that the windows ``x`` (N, WINDOW) hold a beat other than normal."""
    with torch.inference_mode():
        lengths = torch.full((len(x),), x.shape[1], dtype=torch.int64)
        return torch.sigmoid(model(torch.from_numpy(x)[..., None], lengths)).numpy()


def fit_baseline(rr: np.ndarray, y: np.ndarray) -> Pipeline:
    """The RR-interval logistic regression (:data:`BASELINE`), fitted on ``rr`` (N, 4)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    baseline = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
    return baseline.fit(rr, y)


@contextmanager
def _reproducible() -> Iterator[None]:
    """Deterministic algorithms on one CPU thread, for the block only.

    The thread count matters: a multithreaded reduction adds its partial sums in an order that
    depends on the number of threads, and the trained weights (so the artifact's sha256) with it.
    """
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train(out: Path, *, directory: Path, seed: int = SEED) -> TrainResult:
    """Train the CNN, save it as safetensors at ``out``, and evaluate it beside the RR baseline
    on the held-out (later) beats."""
    data = split(directory)
    with _reproducible():
        model = fit_cnn(data.x_train, data.y_train, seed=seed)
    p_model = predict(model, data.x_test)
    p_baseline = fit_baseline(data.rr_train, data.y_train).predict_proba(data.rr_test)[:, 1]

    return TrainResult(
        artifact=out,
        sha256=save_weights(model, out),
        seed=seed,
        model=held_out_metrics(data.y_test, p_model),
        baseline=held_out_metrics(data.y_test, p_baseline),
        n_train=len(data.y_train),
        n_test=len(data.y_test),
        positives_train=int(data.y_train.sum()),
        positives_test=int(data.y_test.sum()),
        y_test=data.y_test,
        p_model=p_model,
        p_baseline=p_baseline,
    )


def held_out(directory: Path) -> tuple[list[dict[str, list[float]]], np.ndarray]:
    """The held-out beats as cases for the model (``{"ecg_mlii": [540 values in mV]}``) and
    their labels (N,), 1 = not a normal beat."""
    data = split(directory)
    return [{"ecg_mlii": [float(v) for v in x]} for x in data.x_test], data.y_test


def _rounded(metrics: HeldOutMetrics) -> dict[str, float]:
    return {k: round(v, 4) for k, v in asdict(metrics).items()}


def metrics(result: TrainResult) -> dict[str, float]:
    """Held-out figures of the model beside its baseline, as ``medbatch models train`` prints them."""
    return {
        **{f"cnn_{k}": v for k, v in asdict(result.model).items()},
        **{f"rr_baseline_{k}": v for k, v in asdict(result.baseline).items()},
        "n_train": result.n_train,
        "n_test": result.n_test,
        "abnormal_test": result.positives_test,
    }


def registry_entry(result: TrainResult, *, artifact: str) -> dict:
    """The registry.json entry describing a trained artifact."""
    return {
        "name": NAME,
        "version": VERSION,
        "default": True,
        "status": "candidate",
        "architecture": "cnn1d",
        "input_kind": "series",
        "min_length": WINDOW,
        "max_length": WINDOW,
        "params": {"widths": list(WIDTHS), "kernel": KERNEL, "pool": POOL, "length": WINDOW},
        "artifact": artifact,
        "sha256": result.sha256,
        "output": "probability that the beat whose R peak is 1.0 s into the window is not normal",
        "labels": ["normal", "abnormal"],
        "threshold": THRESHOLD,
        "inputs": [
            {
                "name": "ecg_mlii",
                "unit": "mV",
                "description": (
                    f"lead MLII at {FS} Hz from 1.0 s before an R peak to 0.5 s after it "
                    f"({WINDOW} samples)"
                ),
            }
        ],
        "training": {
            "data": (
                f"MIT-BIH Arrhythmia Database record {RECORD} (PhysioNet), lead {LEAD}, "
                "reference beat annotations; abnormal = any beat not annotated N"
            ),
            "seed": result.seed,
            "split": (
                f"by time: beats whose windows end in the first {TRAIN_FRACTION:.0%} of the "
                "record train, beats whose windows start after it test, beats straddling the "
                "boundary are dropped"
            ),
            "n_train": result.n_train,
            "n_test": result.n_test,
            "positives_train": result.positives_train,
            "positives_test": result.positives_test,
            "epochs": EPOCHS,
            "held_out": _rounded(result.model),
            "baseline": BASELINE,
            "baseline_held_out": _rounded(result.baseline),
        },
        "clinical_use": (
            f"trained on ONE 30-minute record of ONE patient (MIT-BIH {RECORD}), with "
            f"{result.positives_train} abnormal training beats; a demonstration of the pipeline "
            "on real data, NOT FOR CLINICAL USE"
        ),
    }
