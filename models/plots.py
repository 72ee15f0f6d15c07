"""Pictures of results: ROC and calibration of stored scores, KING's kinship plot, a similarity
histogram. Pure compute: arrays in, PNG files out (matplotlib's Agg backend, no display).

The CLI's demo and the API's plot routes draw with these same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: KING's degrees in drawing order, with their colours (unrelated first, under the others).
DEGREE_COLOURS = {
    "unrelated": "#b0b0b0",
    "3rd": "#4c9be8",
    "2nd": "#2ca02c",
    "1st": "#ff7f0e",
    "duplicate/MZ twin": "#d62728",
}


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5, 4.5), dpi=100)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def score_evaluation(
    y_true: Sequence[int] | np.ndarray,
    y_score: Sequence[float] | np.ndarray,
    out_dir: Path,
    *,
    title: str,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """ROC and calibration pictures of scores against true labels, and their numbers.

    Parameters
    ----------
    y_true
        (N,) 0/1 labels; both classes must occur.
    y_score
        (N,) probabilities in [0, 1].
    out_dir
        Folder for ``roc.png`` and ``calibration.png``.

    Returns
    -------
    dict
        ``n``, ``positives``, ``roc_auc``, ``brier``, ``accuracy`` (at ``threshold``) and the
        paths of the two pictures under ``plots``.
    """
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or y.shape != p.shape:
        raise ValueError(
            f"y_true and y_score: expected two (N,) arrays, got {y.shape} and {p.shape}"
        )
    if not set(np.unique(y).tolist()) == {0, 1}:
        raise ValueError("y_true: expected both classes, 0 and 1")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("y_score: expected probabilities in [0, 1]")
    auc = float(roc_auc_score(y, p))
    brier = float(brier_score_loss(y, p))
    fpr, tpr, _ = roc_curve(y, p)
    bins = max(2, min(10, len(y) // 10))
    observed, predicted = calibration_curve(y, p, n_bins=bins, strategy="quantile")
    fig, ax = _figure()
    ax.plot(fpr, tpr, label=f"ROC AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title}: ROC")
    ax.legend(loc="lower right")
    roc = _save(fig, out_dir / "roc.png")
    fig, ax = _figure()
    ax.plot(predicted, observed, marker="o", label=f"Brier {brier:.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set(
        xlabel="mean predicted probability",
        ylabel="observed fraction",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"{title}: calibration",
    )
    ax.legend(loc="lower right")
    calibration = _save(fig, out_dir / "calibration.png")
    return {
        "n": len(y),
        "positives": int(y.sum()),
        "roc_auc": auc,
        "brier": brier,
        "accuracy": float(np.mean((p >= threshold) == (y == 1))),
        "plots": {"roc": roc, "calibration": calibration},
    }


def read_kin0(path: Path) -> dict[str, np.ndarray]:
    """The KINSHIP and IBS0 columns of a plink2 ``.kin0`` (default columns), as (P,) arrays."""
    lines = Path(path).read_text().splitlines()
    if not lines or not lines[0].startswith("#"):
        raise ValueError(f"{path}: not a .kin0 (no header line)")
    header = lines[0].lstrip("#").split()
    for column in ("KINSHIP", "IBS0"):
        if column not in header:
            raise ValueError(f"{path}: no {column} column (header: {' '.join(header)})")
    rows = [line.split() for line in lines[1:] if line.strip()]
    at = {name: header.index(name) for name in ("KINSHIP", "IBS0")}
    return {
        name.lower(): np.array([float(r[i]) for r in rows], dtype=np.float64)
        for name, i in at.items()
    }


def kinship_plot(
    kinship: np.ndarray, ibs0: np.ndarray, degrees: Sequence[str], path: Path, *, title: str
) -> Path:
    """IBS0 against kinship, one dot a pair, coloured by inferred degree: the plot of Manichaikul
    et al. (2010, Bioinformatics 26:2867, fig. 2) that KING's users read relatives from.

    Parameters
    ----------
    kinship, ibs0
        (P,) kinship coefficients and IBS0 proportions of the pairs.
    degrees
        (P,) degree names (:data:`DEGREE_COLOURS`).
    """
    kinship, ibs0 = np.asarray(kinship, np.float64), np.asarray(ibs0, np.float64)
    names = np.asarray(list(degrees), dtype=object)
    if not (kinship.shape == ibs0.shape == names.shape) or kinship.ndim != 1:
        raise ValueError(
            f"kinship, ibs0, degrees: expected three (P,) arrays, got {kinship.shape}, "
            f"{ibs0.shape}, {names.shape}"
        )
    fig, ax = _figure()
    for degree, colour in DEGREE_COLOURS.items():
        chosen = names == degree
        if chosen.any():
            ax.scatter(
                ibs0[chosen], kinship[chosen], s=8, color=colour, label=f"{degree} ({chosen.sum()})"
            )
    # KING's inference bounds (2^-1.5, 2^-2.5, 2^-3.5, 2^-4.5).
    for bound in (2**-1.5, 2**-2.5, 2**-3.5, 2**-4.5):
        ax.axhline(bound, color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="proportion of IBS0 (no allele shared)", ylabel="kinship coefficient")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def similarity_histogram(similarity: np.ndarray, path: Path, *, title: str, metric: str) -> Path:
    """A histogram of similarities in [0, 1] (e.g. the neighbours a compound search found)."""
    values = np.asarray(similarity, dtype=np.float64)
    if values.ndim != 1 or not np.all(np.isfinite(values)):
        raise ValueError(f"similarity: expected a (P,) array of finite values, got {values.shape}")
    fig, ax = _figure()
    ax.hist(values, bins=np.linspace(0, 1, 21), color="#4c9be8", edgecolor="white")
    ax.set(xlabel=f"{metric} similarity", ylabel="pairs", xlim=(0, 1), title=title)
    return _save(fig, path)
