"""medbatch's RDKit-exact fingerprint searches against RDKit and FPSim2 (``make bench-compounds``).

MOSES molecules (the training split shipped in the ``molsets`` wheel), Morgan radius 2, 2,048 bits,
each task computed side by side in one run:

  top10      1,000 queries x 100,000 library, the 10 most similar per query
  thr0.7     the same sets, every pair with Tanimoto >= 0.7
  allpairs   20,000 molecules against themselves, the 10 most similar per molecule (self excluded)

Contenders: medbatch (``models/chem.py``, ``torch.set_num_threads(T)``), RDKit's
``DataStructs.BulkTanimotoSimilarity`` one query at a time on one thread (with numpy selecting the
top 10 or the hits, equal scores by lower index), and FPSim2's in-memory engine with
``n_workers=T`` (its ``top_k`` and ``similarity``) in a process of its own. medbatch and FPSim2 run each task ``--repeat``
times (the median is reported; one warm-up call of medbatch on 8 queries comes first); RDKit,
whose runs take seconds, once. Fingerprints are made once, before any timing;
RDKit gets its ``ExplicitBitVect`` s, FPSim2 its own database built from the same molecules.

Results are checked: medbatch's scores and indices against RDKit's float64 scores exactly (same
top 10 under the tie rule, same hit set); FPSim2's float32 coefficients against medbatch's scores
rounded to float32 and its ids against medbatch's, counting rows where the two differ only in
which of equally scored molecules fill the last places. RDKit on the 20,000 x 20,000 all-pairs
task runs on a sample of rows and is extrapolated (printed as such), as is FPSim2 there.
Throughput is pairs compared / wall seconds (million pairs/s); the ratio is the other tool's time
over medbatch's.

The last line is one JSON object. Usage:
python bench/compounds.py [--queries 1000] [--library 100000] [--all-pairs 20000] [--threads 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import chem  # noqa: E402

K = 10
#: All-pairs rows RDKit and FPSim2 run (set from the command line).
SAMPLES = {"rdkit": 1000, "fpsim2": 5000}
T = TypeVar("T")
THRESHOLD = 0.7


def moses_path() -> Path:
    # Only its data file: importing moses pulls in fcd_torch and more (installed --no-deps).
    from importlib.util import find_spec

    spec = find_spec("moses")
    if spec is None or spec.origin is None:
        sys.exit("molsets is not installed (pip install --no-deps molsets)")
    path = Path(spec.origin).parent / "dataset" / "data" / "train.csv.gz"
    if not path.is_file():
        sys.exit(f"{path} not found (pip install --no-deps molsets)")
    return path


def molecules(n: int) -> chem.Molecules:
    mols = chem.read_csv(moses_path(), smiles_column="SMILES", limit=n)
    if mols.failures:
        print(f"  {len(mols.failures)} MOSES records skipped, first: {mols.failures[0]}")
    return mols


def timed(fn: Callable[[], T], repeat: int = 1) -> tuple[float, T]:
    """Median wall seconds of ``repeat`` calls, and the last call's result."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def rdkit_top_k(
    query_bvs: list[Any], library_bvs: list[Any], k: int, exclude: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """RDKit's scores for each query, then numpy's top k under the tie rule."""
    from rdkit import DataStructs

    index = np.empty((len(query_bvs), k), dtype=np.int64)
    score = np.empty((len(query_bvs), k))
    for row, bv in enumerate(query_bvs):
        s = np.array(DataStructs.BulkTanimotoSimilarity(bv, library_bvs))
        if exclude is not None:
            s[exclude[row]] = -1.0
        kth = -np.partition(-s, k - 1)[k - 1]
        tied = np.flatnonzero(s >= kth)
        best = tied[np.lexsort((tied, -s[tied]))][:k]
        index[row], score[row] = best, s[best]
    return index, score


def rdkit_threshold(
    query_bvs: list[Any], library_bvs: list[Any], t: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from rdkit import DataStructs

    q, lib, sc = [], [], []
    for row, bv in enumerate(query_bvs):
        s = np.array(DataStructs.BulkTanimotoSimilarity(bv, library_bvs))
        hit = np.flatnonzero(s >= t)
        q.append(np.full(hit.size, row))
        lib.append(hit)
        sc.append(s[hit])
    return np.concatenate(q), np.concatenate(lib), np.concatenate(sc)


def fpsim2_engine(mols: chem.Molecules, rows: range, directory: Path) -> Any:
    from FPSim2 import FPSim2Engine
    from FPSim2.io import create_db_file
    from FPSim2.io.backends import pytables

    # FPSim2 0.7.4 finds each popcount's rows with one PyTables query per possible popcount
    # (17 s for 3,000 molecules here); the same bins from the sorted column, for building only.
    def popcount_bins(table: Any, fp_length: int) -> list[tuple[int, tuple[int, int]]]:
        counts = table.col("popcnt")
        values, first = np.unique(counts, return_index=True)
        ends = [*first[1:].tolist(), len(counts)]
        return [(int(v), (int(f), int(e))) for v, f, e in zip(values, first, ends, strict=True)]

    pytables.calc_popcnt_bins_pytables = popcount_bins
    path = directory / f"fpsim2_{rows.start}_{rows.stop}.h5"
    create_db_file(
        [(mols.mols[i], i - rows.start) for i in rows],
        str(path),
        mol_format="rdkit",
        fp_type="Morgan",
        fp_params={"radius": 2, "fpSize": 2048},
    )
    return FPSim2Engine(str(path))


def fpsim2_top_k(
    engine: Any, query_bvs: list[Any], k: int, threads: int, self_ids: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(query_bvs), k), -1, dtype=np.int64)
    coeff = np.full((len(query_bvs), k), np.nan, dtype=np.float32)
    for row, bv in enumerate(query_bvs):
        want = k + (self_ids is not None)
        found = engine.top_k(bv, k=want, threshold=0.0, n_workers=threads)
        got_ids = found["mol_id"].astype(np.int64)
        got = found["coeff"]
        if self_ids is not None:
            keep = got_ids != self_ids[row]
            got_ids, got = got_ids[keep][:k], got[keep][:k]
        ids[row, : got_ids.size], coeff[row, : got.size] = got_ids, got
    return ids, coeff


def fpsim2_threshold(
    engine: Any, query_bvs: list[Any], t: float, threads: int
) -> set[tuple[int, int]]:
    pairs: set[tuple[int, int]] = set()
    for row, bv in enumerate(query_bvs):
        found = engine.similarity(bv, t, n_workers=threads)
        pairs.update((row, int(i)) for i in found["mol_id"])
    return pairs


def compare_top_k(ours: chem.Neighbours, index: np.ndarray, score: np.ndarray) -> bool:
    return bool(np.array_equal(ours.index, index) and np.array_equal(ours.score, score))


def compare_fpsim2(ours: chem.Neighbours, ids: np.ndarray, coeff: np.ndarray) -> dict[str, object]:
    """FPSim2's float32 coefficients against medbatch's scores rounded to float32, and its ids,
    telling rows that differ only in which equally scored molecules fill the last places."""
    ours32 = ours.score.astype(np.float32)
    same_scores = bool(np.array_equal(ours32, coeff))
    differ = np.flatnonzero(~np.all(ours.index == ids, axis=1))
    tie_only = 0
    for row in differ:
        fixed = ours32[row] > ours32[row, -1]  # places above the last score hold fixed molecules
        same_row = np.array_equal(ours32[row], coeff[row])
        if same_row and set(ours.index[row, fixed]) == set(ids[row, fixed]):
            tie_only += 1
    return {
        "fpsim2_float32_scores_identical": same_scores,
        "fpsim2_rows_same_ids": int(len(ids) - differ.size),
        "fpsim2_rows_ids_differ_only_among_equal_scores": tie_only,
        "fpsim2_rows_ids_differ_otherwise": int(differ.size - tie_only),
    }


@dataclass(frozen=True)
class Sets:
    """The molecules and their fingerprints, split into library, queries and the all-pairs set."""

    mols: chem.Molecules
    bvs: list[Any]
    fps: chem.Fingerprints
    lib_rows: range
    q_rows: range
    ap_rows: range

    @property
    def ap_samples(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the all-pairs set RDKit and FPSim2 run (the same in every process)."""
        n = len(self.ap_rows)
        rdkit = np.random.default_rng(0).choice(n, size=min(SAMPLES["rdkit"], n), replace=False)
        fpsim2 = np.random.default_rng(1).choice(n, size=min(SAMPLES["fpsim2"], n), replace=False)
        return np.sort(rdkit), np.sort(fpsim2)


def load_sets(args: argparse.Namespace) -> Sets:
    SAMPLES.update(rdkit=args.rdkit_sample, fpsim2=args.fpsim2_sample)
    mols = molecules(args.library + args.queries + args.all_pairs)
    generator = chem.fingerprint_generator("morgan", radius=2, fp_size=2048)
    bvs = list(generator.GetFingerprints(list(mols.mols), numThreads=1))
    lib_rows = range(0, args.library)
    q_rows = range(args.library, args.library + args.queries)
    ap_rows = range(args.library + args.queries, len(bvs))
    return Sets(mols, bvs, chem.Fingerprints.from_bitvects(bvs), lib_rows, q_rows, ap_rows)


def fpsim2_child(args: argparse.Namespace, out: str) -> None:
    """FPSim2's side, in its own process (its threaded C++ search crashed this benchmark's
    process twice in seven runs, inside later numpy calls: heap corruption), results to ``out``."""
    sets = load_sets(args)
    q_bvs = sets.bvs[sets.q_rows.start : sets.q_rows.stop]
    ap_bvs = sets.bvs[sets.ap_rows.start :]
    _, sample = sets.ap_samples
    with tempfile.TemporaryDirectory(prefix="medbatch-bench-fpsim2-") as tmp:
        start = time.perf_counter()
        engine_lib = fpsim2_engine(sets.mols, sets.lib_rows, Path(tmp))
        engine_ap = fpsim2_engine(sets.mols, sets.ap_rows, Path(tmp))
        print(f"FPSim2 databases built in {time.perf_counter() - start:.1f} s", flush=True)
        t_top, (ids, coeff) = timed(
            lambda: fpsim2_top_k(engine_lib, q_bvs, K, args.threads), args.repeat
        )
        t_thr, pairs = timed(
            lambda: fpsim2_threshold(engine_lib, q_bvs, THRESHOLD, args.threads), args.repeat
        )
        t_ap, (ap_ids, ap_coeff) = timed(
            lambda: fpsim2_top_k(
                engine_ap, [ap_bvs[i] for i in sample], K, args.threads, sample.tolist()
            ),
            args.repeat,
        )
    np.savez(
        out,
        times=np.array([t_top, t_thr, t_ap]),
        ids=ids,
        coeff=coeff,
        pairs=np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2),
        ap_ids=ap_ids,
        ap_coeff=ap_coeff,
    )


def run_fpsim2(args: argparse.Namespace) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="medbatch-bench-compounds-") as tmp:
        out = str(Path(tmp) / "fpsim2.npz")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--fpsim2-child", out]
        for name in ("queries", "library", "all_pairs", "rdkit_sample", "fpsim2_sample"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        cmd += ["--threads", str(args.threads), "--repeat", str(args.repeat)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"FPSim2 run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        print("\n".join("  " + line for line in done.stdout.strip().splitlines()), flush=True)
        with np.load(out) as data:
            return {name: data[name] for name in data.files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--library", type=int, default=100_000)
    parser.add_argument("--all-pairs", type=int, default=20_000)
    parser.add_argument("--rdkit-sample", type=int, default=1000, help="all-pairs rows RDKit runs")
    parser.add_argument(
        "--fpsim2-sample", type=int, default=5000, help="all-pairs rows FPSim2 runs"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeat", type=int, default=3, help="medbatch and FPSim2 runs per task (median)"
    )
    parser.add_argument("--fpsim2-child", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    faulthandler.enable()  # a crash inside RDKit, FPSim2 or torch says where
    if args.fpsim2_child:
        fpsim2_child(args, args.fpsim2_child)
        return

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    sets = load_sets(args)
    fps = sets.fps
    library, query = fps.take(sets.lib_rows), fps.take(sets.q_rows)
    pairs_set = fps.take(sets.ap_rows)
    lib_bvs = sets.bvs[: sets.lib_rows.stop]
    q_bvs = sets.bvs[sets.q_rows.start : sets.q_rows.stop]
    ap_bvs = sets.bvs[sets.ap_rows.start :]
    print(
        f"MOSES {len(fps)} molecules (Morgan r=2, 2048 bits, median popcount "
        f"{int(np.median(fps.popcounts))}) in {time.perf_counter() - start:.1f} s; "
        f"{args.threads} threads for medbatch and FPSim2, 1 for RDKit",
        flush=True,
    )
    rows: list[tuple[str, int, dict[str, float], dict[str, str]]] = []
    result: dict[str, object] = {
        "molecules": len(fps),
        "threads": args.threads,
        "rdkit": __import__("rdkit").__version__,
    }

    # --- medbatch and RDKit in this process
    chem.top_k(query.take(range(8)), library, K)  # warm-up (oneDNN kernels)
    t_ours, ours = timed(lambda: chem.top_k(query, library, K), args.repeat)
    t_rdkit, (r_index, r_score) = timed(lambda: rdkit_top_k(q_bvs, lib_bvs, K))
    exact = compare_top_k(ours, r_index, r_score)
    print(f"  top10: identical to RDKit: {exact}", flush=True)

    t_ours_h, hits = timed(lambda: chem.threshold_search(query, library, THRESHOLD), args.repeat)
    t_rdkit_h, (rq, rl, rs) = timed(lambda: rdkit_threshold(q_bvs, lib_bvs, THRESHOLD))
    order = np.lexsort((rl, -rs, rq))
    exact_h = bool(
        np.array_equal(hits.query, rq[order])
        and np.array_equal(hits.library, rl[order])
        and np.array_equal(hits.score, rs[order])
    )
    print(f"  thr{THRESHOLD}: {len(hits)} hits; identical to RDKit: {exact_h}", flush=True)

    n = len(pairs_set)
    pairs_ap = n * (n - 1)
    t_ours_ap, ours_ap = timed(lambda: chem.top_k_all_pairs(pairs_set, K), args.repeat)
    sample, f_sample = sets.ap_samples
    t_rdkit_s, (ri, rsc) = timed(
        lambda: rdkit_top_k([ap_bvs[i] for i in sample], ap_bvs, K, exclude=sample.tolist())
    )
    t_rdkit_ap = t_rdkit_s * n / sample.size
    exact_ap = compare_top_k(chem.Neighbours(ours_ap.index[sample], ours_ap.score[sample]), ri, rsc)
    print(f"  allpairs: identical to RDKit on {sample.size} sampled rows: {exact_ap}", flush=True)

    # --- FPSim2 in its own process
    fp = run_fpsim2(args)
    t_fp, t_fp_h, t_fp_s = (float(t) for t in fp["times"])
    t_fp_ap = t_fp_s * n / f_sample.size
    f_check = compare_fpsim2(ours, fp["ids"], fp["coeff"])
    f_pairs = {(int(q), int(lib)) for q, lib in fp["pairs"]}
    ours_set = set(zip(hits.query.tolist(), hits.library.tolist(), strict=True))
    f_sub = chem.Neighbours(ours_ap.index[f_sample], ours_ap.score[f_sample])
    f_check_ap = compare_fpsim2(f_sub, fp["ap_ids"], fp["ap_coeff"])
    print(f"  FPSim2 top10: {f_check}", flush=True)
    print(f"  FPSim2 thr{THRESHOLD}: same hits: {ours_set == f_pairs}", flush=True)
    print(f"  FPSim2 allpairs: {f_check_ap}", flush=True)

    rows.append(
        (
            "top10",
            len(query) * len(library),
            {"medbatch": t_ours, "rdkit": t_rdkit, "fpsim2": t_fp},
            {},
        )
    )
    result["top10"] = {"identical_to_rdkit": exact, **f_check}
    rows.append(
        (
            f"thr{THRESHOLD}",
            len(query) * len(library),
            {"medbatch": t_ours_h, "rdkit": t_rdkit_h, "fpsim2": t_fp_h},
            {},
        )
    )
    result[f"thr{THRESHOLD}"] = {
        "hits": len(hits),
        "identical_to_rdkit": exact_h,
        "fpsim2_same_hits": ours_set == f_pairs,
    }
    notes = {
        "rdkit": f"{sample.size} of {n} rows, x{n / sample.size:.0f}",
        "fpsim2": f"{f_sample.size} of {n} rows, x{n / f_sample.size:.0f}",
    }
    rows.append(
        (
            "allpairs",
            pairs_ap,
            {"medbatch": t_ours_ap, "rdkit": t_rdkit_ap, "fpsim2": t_fp_ap},
            notes,
        )
    )
    result["allpairs"] = {
        "identical_to_rdkit_on_sampled_rows": exact_ap,
        "rdkit_sampled_rows": int(sample.size),
        "fpsim2_sampled_rows": int(f_sample.size),
        **f_check_ap,
    }

    print(
        f"\n{'task':9} {'pairs':>14} {'medbatch Mp/s':>14} {'RDKit Mp/s':>11} {'FPSim2 Mp/s':>12} "
        f"{'vs RDKit':>9} {'vs FPSim2':>10}  notes"
    )
    for name, n_pairs, times, notes in rows:
        rate = {tool: n_pairs / t / 1e6 for tool, t in times.items()}
        vs_rdkit = times["rdkit"] / times["medbatch"]
        vs_fpsim2 = times["fpsim2"] / times["medbatch"]
        note = "; ".join(f"{tool} extrapolated from {text}" for tool, text in notes.items())
        print(
            f"{name:9} {n_pairs:14,} {rate['medbatch']:14.0f} {rate['rdkit']:11.1f} "
            f"{rate['fpsim2']:12.1f} {vs_rdkit:9.1f} {vs_fpsim2:10.1f}  {note}"
        )
        entry = result.setdefault(name, {})
        assert isinstance(entry, dict)
        entry.update(
            {
                "medbatch_s": round(times["medbatch"], 3),
                "rdkit_s": round(times["rdkit"], 3),
                "fpsim2_s": round(times["fpsim2"], 3),
                "medbatch_mpairs_s": round(rate["medbatch"], 1),
                "rdkit_mpairs_s": round(rate["rdkit"], 2),
                "fpsim2_mpairs_s": round(rate["fpsim2"], 2),
                "ratio_vs_rdkit": round(vs_rdkit, 2),
                "ratio_vs_fpsim2": round(vs_fpsim2, 2),
            }
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
