"""medbatch's RDKit-exact fingerprint searches against RDKit and FPSim2 (``make bench-compounds``).

MOSES molecules (the training split shipped in the ``molsets`` wheel), Morgan radius 2, 2,048 bits,
each task computed side by side in one run:

  top10      1,000 queries x 100,000 library, the 10 most similar per query
  thr0.7     the same sets, every pair with Tanimoto >= 0.7
  allpairs   20,000 molecules against themselves, the 10 most similar per molecule (self excluded)

It first prints the CPU (model and the flags that decide the engine: AMX, AVX-512 VPOPCNTDQ,
BF16, VNNI) and the engine medbatch's ``auto`` chooses there, with why. Then every engine this
machine has runs every task (``models/compounds/chem.py``, ``engine=``): ``popcount`` (AND + popcount,
numba), the CPU GEMM as it ran before the popcount engine existed (``gemm-bf16`` where the CPU
multiplies bfloat16 in hardware, else int8 or float32), ``gemm-int8`` where the CPU has int8 dot
products (AMX, VNNI), and ``cuda`` where torch sees a GPU. The ``medbatch`` figures are those
of the engine ``auto`` chose; the others are listed beside them.

Other contenders: RDKit's ``DataStructs.BulkTanimotoSimilarity`` one query at a time on one
thread (with numpy selecting the top 10 or the hits, equal scores by lower index), and FPSim2's
in-memory engine with ``n_workers=T`` (its ``top_k`` and ``similarity``) in a process of its own
that never imports torch (bench/fpsim2_child.py), each search call given array views of its own
(FPSim2 0.7.4 changes its arrays' reference counts without the GIL, which with two threads freed
its database under it: see that file); if that process dies, the tasks it had not
finished are reported with FPSim2 absent, and every other figure stands. medbatch's engines and
FPSim2 run each task ``--repeat`` times (the median is reported; each engine first runs each search on 8
queries, a warm-up); RDKit, whose runs take seconds, once. medbatch uses ``T`` threads
(``torch.set_num_threads`` and ``numba.set_num_threads``). Fingerprints are made once, before
any timing; RDKit gets its ``ExplicitBitVect`` s, FPSim2 its own database built from the same
molecules.

Results are checked: every engine's scores and indices against RDKit's float64 scores exactly
(same top 10 under the tie rule, same hit set); FPSim2's float32 coefficients against medbatch's
scores rounded to float32 and its ids against medbatch's, counting rows where the two differ only
in which of equally scored molecules fill the last places. RDKit on the 20,000 x 20,000 all-pairs
task runs on a sample of rows and is extrapolated (printed as such), as is FPSim2 there.
Throughput is pairs compared / wall seconds (million pairs/s); a ratio is the other tool's time
over medbatch's.

The last line is one JSON object: per task the keys of earlier versions (``medbatch_s``,
``medbatch_mpairs_s``, ``ratio_vs_rdkit``, …, for the engine ``auto`` chose) and ``engines``
(each engine's seconds, Mpairs/s, ratios, identity with RDKit); at the top ``cpu``, ``flags``,
``engine`` and ``engine_reason``. Usage:
python bench/compounds.py [--queries 1000] [--library 100000] [--all-pairs 20000] [--threads 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fpsim2_child import timed  # noqa: E402
from models import cpu_features  # noqa: E402
from models.compounds import chem  # noqa: E402

K = 10
THRESHOLD = 0.7
TASKS = ("top10", f"thr{THRESHOLD}", "allpairs")
#: FPSim2's result file of each task (bench/fpsim2_child.py).
FPSIM2_FILES = {"top10": "top10", f"thr{THRESHOLD}": "threshold", "allpairs": "allpairs"}


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
    q_all, lib_all, s_all = np.concatenate(q), np.concatenate(lib), np.concatenate(sc)
    order = np.lexsort((lib_all, -s_all, q_all))
    return q_all[order], lib_all[order], s_all[order]


def same_neighbours(ours: chem.Neighbours, index: np.ndarray, score: np.ndarray) -> bool:
    return bool(np.array_equal(ours.index, index) and np.array_equal(ours.score, score))


def same_hits(ours: chem.Hits, q: np.ndarray, lib: np.ndarray, s: np.ndarray) -> bool:
    return bool(
        np.array_equal(ours.query, q)
        and np.array_equal(ours.library, lib)
        and np.array_equal(ours.score, s)
    )


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

    smiles: list[str]
    bvs: list[Any]
    fps: chem.Fingerprints
    lib_rows: range
    q_rows: range
    ap_rows: range
    #: All-pairs rows RDKit and FPSim2 run (extrapolated to the whole set).
    rdkit_sample: np.ndarray
    fpsim2_sample: np.ndarray


def load_sets(args: argparse.Namespace) -> Sets:
    import csv
    import gzip
    import itertools

    n = args.library + args.queries + args.all_pairs
    with gzip.open(moses_path(), "rt", newline="") as fh:
        rows = [row["SMILES"] for row in itertools.islice(csv.DictReader(fh), n)]
    mols = chem.as_molecules(rows)
    if mols.failures:
        print(f"  {len(mols.failures)} MOSES records skipped, first: {mols.failures[0]}")
    # The SMILES of the molecules read, for FPSim2's process (it reads them again with RDKit).
    smiles = [rows[record - 1] for record in mols.records]
    generator = chem.fingerprint_generator("morgan", radius=2, fp_size=2048)
    bvs = list(generator.GetFingerprints(list(mols.mols), numThreads=1))
    lib_rows = range(0, args.library)
    q_rows = range(args.library, args.library + args.queries)
    ap_rows = range(args.library + args.queries, len(bvs))
    m = len(ap_rows)
    rdkit = np.random.default_rng(0).choice(m, size=min(args.rdkit_sample, m), replace=False)
    fpsim2 = np.random.default_rng(1).choice(m, size=min(args.fpsim2_sample, m), replace=False)
    return Sets(
        smiles,
        bvs,
        chem.Fingerprints.from_bitvects(bvs),
        lib_rows,
        q_rows,
        ap_rows,
        np.sort(rdkit),
        np.sort(fpsim2),
    )


def run_fpsim2(args: argparse.Namespace, sets: Sets) -> tuple[dict[str, dict[str, Any]], str]:
    """FPSim2's results per task it finished, and what became of its process."""
    with tempfile.TemporaryDirectory(prefix="medbatch-bench-compounds-") as tmp:
        folder = Path(tmp)
        (folder / "mols.smi").write_text("\n".join(sets.smiles) + "\n")
        plan = {
            "smiles": str(folder / "mols.smi"),
            "library": [sets.lib_rows.start, sets.lib_rows.stop],
            "queries": [sets.q_rows.start, sets.q_rows.stop],
            "ap": [sets.ap_rows.start, sets.ap_rows.stop],
            "ap_sample": sets.fpsim2_sample.tolist(),
            "threads": args.threads,
            "repeat": args.repeat,
            "k": K,
            "threshold": THRESHOLD,
            "crash_after": args.fpsim2_crash_after,
        }
        (folder / "plan.json").write_text(json.dumps(plan))
        child = Path(__file__).resolve().with_name("fpsim2_child.py")
        done = subprocess.run(
            [sys.executable, str(child), str(folder / "plan.json"), str(folder)],
            capture_output=True,
            text=True,
        )
        print("\n".join("  " + line for line in done.stdout.strip().splitlines()), flush=True)
        if done.returncode == 0:
            status = "ran"
        else:
            how = (
                f"killed by {signal.Signals(-done.returncode).name}"
                if done.returncode < 0
                else f"exit status {done.returncode}"
            )
            status = f"FPSim2's process failed ({how})"
            # Without faulthandler's list of extension modules (1,700 characters), which
            # crowded the Python frames out of the tail printed.
            stderr = "".join(
                line
                for line in done.stderr.splitlines(keepends=True)
                if not line.startswith("Extension modules:")
            )
            print(f"  {status}; its stderr ends:\n{stderr[-3000:]}", flush=True)
        if (folder / "modules.json").is_file():
            imported = json.loads((folder / "modules.json").read_text())
            status += f"; it imported torch: {imported['torch']}"
            drift = imported["refcount_drift"]
            status += f"; its arrays' refcount drift: {drift['library']}, {drift['allpairs']}"
        results = {}
        for task, name in FPSIM2_FILES.items():
            path = folder / f"{name}.npz"
            if path.is_file():
                with np.load(path) as data:
                    results[task] = {key: data[key] for key in data.files}
        return results, status


def available_engines(fps: chem.Fingerprints) -> list[tuple[str, chem.Engine]]:
    """(label, engine) of each engine this machine runs, the CPU GEMM as it runs by default."""
    import torch

    engines: list[tuple[str, chem.Engine]] = [("popcount", "popcount")]
    gemm = chem.engine_name(fps, fps, engine="gemm")
    engines.append((gemm, "gemm"))
    if cpu_features.fast_int8_gemm() and gemm != "gemm-int8":
        engines.append(("gemm-int8", "gemm-int8"))
    if torch.cuda.is_available():
        engines.append((chem.engine_name(fps, fps, engine="cuda"), "cuda"))
    return engines


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
    parser.add_argument(
        "--fpsim2-crash-after",
        choices=["top10", "threshold", "allpairs"],
        help="make FPSim2's process die of SIGSEGV after this task (checks the report survives)",
    )
    args = parser.parse_args()
    faulthandler.enable()  # a crash inside RDKit or torch says where

    import numba
    import torch

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
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
    choice = chem.choose_engine()
    auto = chem.engine_name(query, library)
    engines = available_engines(library)
    print(f"CPU: {cpu_features.cpu_model()}", flush=True)
    print(f"flags: {' '.join(cpu_features.engine_flags()) or '(none of the engine flags)'}")
    print(f"engine (auto): {auto}: {choice.describe()}", flush=True)
    print(f"engines measured: {', '.join(label for label, _ in engines)}", flush=True)
    if auto not in {label for label, _ in engines}:
        sys.exit(f"auto chose {auto}, which is not among the engines measured")

    n = len(pairs_set)
    pairs = {"top10": len(query) * len(library), TASKS[1]: len(query) * len(library)}
    pairs["allpairs"] = n * (n - 1)

    # --- RDKit, one query at a time, one thread
    rdkit_s: dict[str, float] = {}
    rdkit_s["top10"], (r_index, r_score) = timed(lambda: rdkit_top_k(q_bvs, lib_bvs, K))
    rdkit_s[TASKS[1]], (rq, rl, rs) = timed(lambda: rdkit_threshold(q_bvs, lib_bvs, THRESHOLD))
    sample = sets.rdkit_sample
    t_sample, (ri, rsc) = timed(
        lambda: rdkit_top_k([ap_bvs[i] for i in sample], ap_bvs, K, exclude=sample.tolist())
    )
    rdkit_s["allpairs"] = t_sample * n / sample.size
    print(f"  RDKit: {len(rq)} hits at {THRESHOLD}", flush=True)

    # --- every medbatch engine
    seconds: dict[str, dict[str, float]] = {task: {} for task in TASKS}
    exact: dict[str, dict[str, bool]] = {task: {} for task in TASKS}
    results: dict[str, dict[str, Any]] = {task: {} for task in TASKS}
    for label, engine in engines:
        # Warm-up: numba loads (or compiles) its kernels, oneDNN builds its GEMM kernels.
        chem.top_k(query.take(range(8)), library, K, engine=engine)
        chem.threshold_search(query.take(range(8)), library, THRESHOLD, engine=engine)
        chem.top_k_all_pairs(pairs_set.take(range(64)), K, engine=engine)
        t, ours = timed(lambda e=engine: chem.top_k(query, library, K, engine=e), args.repeat)
        seconds["top10"][label], results["top10"][label] = t, ours
        exact["top10"][label] = same_neighbours(ours, r_index, r_score)
        t, hits = timed(
            lambda e=engine: chem.threshold_search(query, library, THRESHOLD, engine=e),
            args.repeat,
        )
        seconds[TASKS[1]][label], results[TASKS[1]][label] = t, hits
        exact[TASKS[1]][label] = same_hits(hits, rq, rl, rs)
        t, ours_ap = timed(
            lambda e=engine: chem.top_k_all_pairs(pairs_set, K, engine=e), args.repeat
        )
        seconds["allpairs"][label], results["allpairs"][label] = t, ours_ap
        exact["allpairs"][label] = same_neighbours(
            chem.Neighbours(ours_ap.index[sample], ours_ap.score[sample]), ri, rsc
        )
        print(
            f"  {label}: identical to RDKit: "
            + ", ".join(f"{task} {exact[task][label]}" for task in TASKS),
            flush=True,
        )
    first = engines[0][0]
    engines_agree = all(
        same_neighbours(
            results[task][label], results[task][first].index, results[task][first].score
        )
        for task in ("top10", "allpairs")
        for label, _ in engines
    ) and all(
        same_hits(
            results[TASKS[1]][label],
            results[TASKS[1]][first].query,
            results[TASKS[1]][first].library,
            results[TASKS[1]][first].score,
        )
        for label, _ in engines
    )
    print(f"  every engine gives the same results on every row: {engines_agree}", flush=True)

    # --- FPSim2 in its own process, without torch
    fp, fp_status = run_fpsim2(args, sets)
    fpsim2_s: dict[str, float | None] = {task: None for task in TASKS}
    checks: dict[str, dict[str, object]] = {task: {} for task in TASKS}
    if "top10" in fp:
        fpsim2_s["top10"] = float(fp["top10"]["seconds"])
        checks["top10"] = compare_fpsim2(
            results["top10"][auto], fp["top10"]["ids"], fp["top10"]["coeff"]
        )
    if TASKS[1] in fp:
        fpsim2_s[TASKS[1]] = float(fp[TASKS[1]]["seconds"])
        hits = results[TASKS[1]][auto]
        ours_set = set(zip(hits.query.tolist(), hits.library.tolist(), strict=True))
        f_pairs = {(int(q), int(lib)) for q, lib in fp[TASKS[1]]["pairs"]}
        checks[TASKS[1]] = {"fpsim2_same_hits": ours_set == f_pairs}
    f_sample = sets.fpsim2_sample
    if "allpairs" in fp:
        fpsim2_s["allpairs"] = float(fp["allpairs"]["seconds"]) * n / f_sample.size
        ours_ap = results["allpairs"][auto]
        checks["allpairs"] = compare_fpsim2(
            chem.Neighbours(ours_ap.index[f_sample], ours_ap.score[f_sample]),
            fp["allpairs"]["ids"],
            fp["allpairs"]["coeff"],
        )
    for task in TASKS:
        print(f"  FPSim2 {task}: {checks[task] or 'absent'}", flush=True)

    # --- the report
    result: dict[str, Any] = {
        "molecules": len(fps),
        "threads": args.threads,
        "rdkit": __import__("rdkit").__version__,
        "cpu": cpu_features.cpu_model(),
        "flags": cpu_features.engine_flags(),
        "engine": auto,
        "engine_reason": choice.describe(),
        "engines_identical": engines_agree,
        "fpsim2": fp_status,
    }
    labels = [label for label, _ in engines]

    def rate(task: str, t: float | None) -> float | None:
        return None if t is None else pairs[task] / t / 1e6

    def ratio(other: float | None, ours: float) -> float | None:
        return None if other is None else other / ours

    def fmt(x: float | None, spec: str, unit: str = "") -> str:
        return "absent" if x is None else format(x, spec) + unit

    header = f"{'task':9} {'pairs':>13} {'RDKit':>7} {'FPSim2':>7}"
    header += "".join(f" {label:>11}" for label in labels)
    print(f"\nMpairs/s ({auto} is what auto runs here); ratios: the other tool's time over ours")
    print(header)
    for task in TASKS:
        line = f"{task:9} {pairs[task]:13,} {fmt(rate(task, rdkit_s[task]), '7.1f')} "
        line += f"{fmt(rate(task, fpsim2_s[task]), '7.1f')}"
        line += "".join(f" {rate(task, seconds[task][label]):11.0f}" for label in labels)
        print(line)
    for task in TASKS:
        line = f"{task:9} vs RDKit " + "".join(
            f" {label} {fmt(ratio(rdkit_s[task], seconds[task][label]), '.1f', 'x')}"
            for label in labels
        )
        line += " | vs FPSim2 " + "".join(
            f" {label} {fmt(ratio(fpsim2_s[task], seconds[task][label]), '.1f', 'x')}"
            for label in labels
        )
        print(line)
    print(
        f"all-pairs: RDKit extrapolated from {sample.size} of {n} rows, "
        f"FPSim2 from {f_sample.size} of {n} rows"
    )

    for task in TASKS:
        ours_t = seconds[task][auto]
        entry: dict[str, Any] = {}
        if task == "allpairs":
            entry["identical_to_rdkit_on_sampled_rows"] = exact[task][auto]
            entry["rdkit_sampled_rows"] = int(sample.size)
            entry["fpsim2_sampled_rows"] = int(f_sample.size)
        else:
            entry["identical_to_rdkit"] = exact[task][auto]
        if task == TASKS[1]:
            entry["hits"] = len(results[task][auto])
        entry.update(checks[task])
        entry.update(
            {
                "medbatch_s": round(ours_t, 3),
                "rdkit_s": round(rdkit_s[task], 3),
                "fpsim2_s": None if fpsim2_s[task] is None else round(fpsim2_s[task], 3),
                "medbatch_mpairs_s": round(pairs[task] / ours_t / 1e6, 1),
                "rdkit_mpairs_s": round(pairs[task] / rdkit_s[task] / 1e6, 2),
                "fpsim2_mpairs_s": _round(rate(task, fpsim2_s[task]), 2),
                "ratio_vs_rdkit": round(rdkit_s[task] / ours_t, 2),
                "ratio_vs_fpsim2": _round(ratio(fpsim2_s[task], ours_t), 2),
                "engines": {
                    label: {
                        "s": round(seconds[task][label], 3),
                        "mpairs_s": round(pairs[task] / seconds[task][label] / 1e6, 1),
                        "ratio_vs_rdkit": round(rdkit_s[task] / seconds[task][label], 2),
                        "ratio_vs_fpsim2": _round(ratio(fpsim2_s[task], seconds[task][label]), 2),
                        "identical_to_rdkit": exact[task][label],
                    }
                    for label in labels
                },
            }
        )
        result[task] = entry
    print(json.dumps(result))


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


if __name__ == "__main__":
    main()
