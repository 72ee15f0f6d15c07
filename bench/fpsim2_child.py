"""FPSim2's side of ``make bench-compounds``, in a process of its own that never imports torch.

FPSim2's threaded C++ search crashed the benchmark's process twice in seven runs (heap corruption
seen later in numpy calls), and this process, with SIGSEGV, in some full runs. The cause is in
FPSim2 0.7.4, not in the CPU: its search functions (``GenericSearch``, bound with
``py::call_guard<py::gil_scoped_release>``) take their numpy arrays by value and copy them on,
so they change the arrays' reference counts without holding the GIL. With ``n_workers`` >= 2
every worker thread passes the same database array (and query), and an increment or decrement
is lost now and then: the count of the engine's fingerprint array drifts (+3 over 100,000 top-k
searches of 2,000 molecules at ``n_workers=2``; never at ``n_workers=1``), and a lost increment
frees the array while the engine still reads it. :func:`guard_refcounts` gives each search call
views of its own (same memory, no copy), so the unlocked counting touches objects no other
thread holds; FPSim2's own ``top_k`` and ``similarity``, chunking, thread pool and sorting run
unchanged. The process still runs apart from torch, numba and medbatch (RDKit, numpy and
FPSim2 only), and each task's results go to their own file as soon as the task ends, so a crash
loses only the tasks after it; the parent reports what is missing as absent.

Usage (the parent, bench/compounds.py, writes the plan): python bench/fpsim2_child.py PLAN OUT_DIR
"""

from __future__ import annotations

import faulthandler
import functools
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def timed(fn: Callable[[], T], repeat: int = 1) -> tuple[float, T]:
    """Median wall seconds of ``repeat`` calls, and the last call's result (bench/compounds.py
    times its own contenders with this too: this module imports nothing but numpy)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def guard_refcounts() -> None:
    """Make FPSim2's search calls hand its C++ arrays no other thread holds (module docstring).

    FPSim2 looks ``GenericSearch`` up in its module each search, for the threaded and the
    single-thread path alike; the wrapper runs in the worker thread, under the GIL, and passes
    fresh views of the query and of the database rows (``ndarray.view``: no copy, a few
    microseconds per chunk, against milliseconds of search).
    """
    import FPSim2.FPSim2 as engine_module

    search = engine_module.GenericSearch
    if getattr(search, "_own_views", False):
        return

    @functools.wraps(search)
    def own_views(query: np.ndarray, db: np.ndarray, *args: Any) -> Any:
        return search(query.view(), db.view(), *args)

    own_views._own_views = True  # type: ignore[attr-defined]
    engine_module.GenericSearch = own_views


def build_engine(mols: list[Any], rows: range, directory: Path) -> Any:
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
        [(mols[i], i - rows.start) for i in rows],
        str(path),
        mol_format="rdkit",
        fp_type="Morgan",
        fp_params={"radius": 2, "fpSize": 2048},
    )
    return FPSim2Engine(str(path))


def top_k(
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


def threshold(engine: Any, query_bvs: list[Any], t: float, threads: int) -> np.ndarray:
    pairs: set[tuple[int, int]] = set()
    for row, bv in enumerate(query_bvs):
        found = engine.similarity(bv, t, n_workers=threads)
        pairs.update((row, int(i)) for i in found["mol_id"])
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def main() -> None:
    faulthandler.enable()  # a crash inside RDKit or FPSim2 says where
    guard_refcounts()
    plan = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    mols = [Chem.MolFromSmiles(s) for s in Path(plan["smiles"]).read_text().splitlines()]
    if any(m is None for m in mols):
        sys.exit("a SMILES the parent read could not be read again")
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    lib_rows, q_rows, ap_rows = (range(*plan[name]) for name in ("library", "queries", "ap"))
    q_bvs = [generator.GetFingerprint(mols[i]) for i in q_rows]
    ap_bvs = [generator.GetFingerprint(mols[i]) for i in ap_rows]
    sample = plan["ap_sample"]
    threads, repeat, k, t = plan["threads"], plan["repeat"], plan["k"], plan["threshold"]

    def done(task: str) -> None:
        if plan.get("crash_after") == task:  # --fpsim2-crash-after: the parent must survive this
            os.kill(os.getpid(), signal.SIGSEGV)

    with tempfile.TemporaryDirectory(prefix="medbatch-bench-fpsim2-") as tmp:
        start = time.perf_counter()
        engine_lib = build_engine(mols, lib_rows, Path(tmp))
        engine_ap = build_engine(mols, ap_rows, Path(tmp))
        print(f"FPSim2 databases built in {time.perf_counter() - start:.1f} s", flush=True)
        # The fingerprint arrays' reference counts before and after the searches: equal unless
        # some search changed them without the GIL (guard_refcounts).
        counts = {
            name: sys.getrefcount(e.fps)
            for name, e in (("library", engine_lib), ("allpairs", engine_ap))
        }
        seconds, (ids, coeff) = timed(lambda: top_k(engine_lib, q_bvs, k, threads), repeat)
        np.savez(out / "top10.npz", seconds=seconds, ids=ids, coeff=coeff)
        done("top10")
        seconds, pairs = timed(lambda: threshold(engine_lib, q_bvs, t, threads), repeat)
        np.savez(out / "threshold.npz", seconds=seconds, pairs=pairs)
        done("threshold")
        seconds, (ids, coeff) = timed(
            lambda: top_k(engine_ap, [ap_bvs[i] for i in sample], k, threads, sample), repeat
        )
        np.savez(out / "allpairs.npz", seconds=seconds, ids=ids, coeff=coeff)
        done("allpairs")
        drift = {
            name: sys.getrefcount(e.fps) - counts[name]
            for name, e in (("library", engine_lib), ("allpairs", engine_ap))
        }
    # What this process is for: FPSim2 apart from torch (and numba, and medbatch).
    apart = {name: name in sys.modules for name in ("torch", "numba", "models")}
    (out / "modules.json").write_text(json.dumps({**apart, "refcount_drift": drift}))
    print(f"FPSim2's process imported: {apart}; its arrays' refcount drift: {drift}", flush=True)


if __name__ == "__main__":
    main()
