"""models/plots.py: the numbers beside the pictures against independent references, the .kin0
reader against the committed plink2 table, and precise errors for bad shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from models.plots import kinship_plot, read_kin0, score_evaluation, similarity_histogram

DATA = Path(__file__).resolve().parents[1] / "data" / "genome"
PNG = b"\x89PNG\r\n\x1a\n"


def test_score_evaluation_numbers_match_mann_whitney_and_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 300), 0, 1)
    found = score_evaluation(y, p, tmp_path, title="t", threshold=0.5)
    u = mannwhitneyu(p[y == 1], p[y == 0]).statistic
    assert found["roc_auc"] == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()), abs=1e-12)
    assert found["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-12)
    assert found["accuracy"] == pytest.approx(np.mean((p >= 0.5) == (y == 1)))
    assert (found["n"], found["positives"]) == (300, int(y.sum()))
    for path in found["plots"].values():
        assert path.read_bytes().startswith(PNG)


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "both classes"),
        ([0, 1], [0.1, 1.5], "probabilities"),
        ([0, 1], [0.1], "two \\(N,\\) arrays"),
        ([0, 1], [np.nan, 0.5], "probabilities"),
    ],
)
def test_score_evaluation_refuses_bad_input(y, p, message, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        score_evaluation(y, p, tmp_path, title="t")


def test_read_kin0_reads_plink2_s_columns_and_the_plot_is_written(tmp_path: Path) -> None:
    table = read_kin0(DATA / "hm3_relatives_0.0442.kin0")
    rows = [
        line.split() for line in (DATA / "hm3_relatives_0.0442.kin0").read_text().splitlines()[1:]
    ]
    assert table["kinship"].tolist() == [float(r[-1]) for r in rows]
    assert table["ibs0"].tolist() == [float(r[-2]) for r in rows]
    degrees = ["1st"] * len(rows)
    path = kinship_plot(table["kinship"], table["ibs0"], degrees, tmp_path / "k.png", title="t")
    assert path.read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="three \\(P,\\) arrays"):
        kinship_plot(table["kinship"], table["ibs0"][:-1], degrees, tmp_path / "x.png", title="t")
    bad = tmp_path / "bad.kin0"
    bad.write_text("#FID1 IID1 FID2 IID2 KINSHIP\n")
    with pytest.raises(ValueError, match="no IBS0 column"):
        read_kin0(bad)


def test_similarity_histogram_checks_its_input(tmp_path: Path) -> None:
    path = similarity_histogram(
        np.array([0.1, 0.5, 1.0]), tmp_path / "h.png", title="t", metric="tanimoto"
    )
    assert path.read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="finite"):
        similarity_histogram(np.array([np.inf]), tmp_path / "h.png", title="t", metric="tanimoto")
