"""medbatch's PLINK-exact genome comparisons against PLINK itself (``make bench-genome``).

One simulated cohort, each metric computed side by side in one run on the same threads:

  grm   medbatch ``pairwise(metric="grm")``   vs ``plink2 --make-rel square bin``
  king  medbatch ``pairwise(metric="king")``  vs ``plink2 --make-king square bin``
  ibs   medbatch ``pairwise(metric="ibs")``   vs ``plink1.9 --distance square ibs bin``

The cohort is an msprime coalescent simulation (N diploid samples from one population of
Ne = 10,000, mutation and recombination rates 1e-8, infinite sites so every variant is biallelic),
split over five autosomes, M variants in all, with 1% of calls set missing at random; it is
written once as a PLINK 1 fileset under var/bench/ and reused by later runs with the same size
and seed.

Every contender is its own process, timed from start to exit (medbatch's includes the Python and
numba start-up, reading the .bed and writing the float64 matrix, as PLINK's does) with its peak
RSS from ``/usr/bin/time -v``. On the CPU medbatch runs ``models.genome.api.pairwise_bed`` (the .bed
decoded straight into bit planes or standardized blocks; torch is not loaded); with ``--device
cuda`` or ``--tile-rows`` it reads the dosages and runs ``pairwise`` / ``pairwise_block``, as a
worker does. PLINK runs with ``--threads T``; plink2 with
``OPENBLAS_NUM_THREADS=1`` as it threads its own work, and with Debian's OpenBLAS
(``apt-get install libopenblas0-pthread``) put first on its library path: Debian's plink2 links the
generic libblas.so.3, and the reference BLAS makes its GRM about 12x slower. The system-wide BLAS
alternative is left alone (plink2's last digits depend on it; the stored goldens were written
with the reference BLAS). medbatch runs with T numba threads and T BLAS threads. The ratio is PLINK's wall
time over medbatch's, so above 1 means medbatch is faster; the difference is the largest absolute
difference between the two float64 matrices.

The last line is one JSON object. Usage:
python bench/genome.py [--n 4000] [--m 50000] [--seed 1] [--metrics grm,king,ibs] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "var" / "bench" / "genome"
CHROMOSOMES = 5
MISSING_RATE = 0.01
#: Debian's libopenblas0-pthread: its libblas.so.3 / liblapack.so.3, put first for plink2.
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread"
#: PLINK's command and output suffix per metric.
PLINK = {
    "grm": (["plink2", "--make-rel", "square", "bin"], ".rel.bin", "plink2 --make-rel"),
    "king": (["plink2", "--make-king", "square", "bin"], ".king.bin", "plink2 --make-king"),
    "ibs": (["plink1.9", "--distance", "square", "ibs", "bin"], ".mibs.bin", "plink1.9 --distance"),
}
#: PLINK 1 .bed 2-bit code for 0, 1, 2 copies of A1 and (index 3) a missing call.
BED_CODE = np.array([3, 2, 0, 1], dtype=np.uint8)


# --- the cohort -------------------------------------------------------------------------------


def simulate(n: int, m: int, seed: int) -> np.ndarray:
    """(M, N) int8 A1 dosages, -1 for missing: msprime, CHROMOSOMES independent autosomes."""
    import msprime

    rng = np.random.default_rng(seed)
    per_chrom = np.diff(np.linspace(0, m, CHROMOSOMES + 1).astype(int))
    blocks = []
    for chrom, want in enumerate(per_chrom, start=1):
        # About 3.8e-3 segregating sites per bp for 2N = 8,000 haplotypes; simulate a little more
        # than needed and keep the first `want` sites, so the chromosome has realistic LD.
        length = max(1, int(want / 3.0e-3))
        while True:
            ts = msprime.sim_ancestry(
                samples=n,
                population_size=10_000,
                sequence_length=length,
                recombination_rate=1e-8,
                random_seed=seed * 100 + chrom,
            )
            ts = msprime.sim_mutations(
                ts,
                rate=1e-8,
                model=msprime.BinaryMutationModel(),
                discrete_genome=False,
                random_seed=seed * 100 + chrom,
            )
            if ts.num_sites >= want:
                break
            length = int(length * 1.5)
        haplotypes = ts.genotype_matrix()[:want]  # (sites, 2N) 0/1, samples' haplotypes in pairs
        blocks.append((haplotypes[:, 0::2] + haplotypes[:, 1::2]).astype(np.int8))
    dosages = np.concatenate(blocks)
    dosages[rng.random(dosages.shape) < MISSING_RATE] = -1
    return dosages


def write_bed_rows(handle: BinaryIO, dosages: np.ndarray) -> None:
    """Append (c, N) variant-major dosages (-1 missing) as .bed rows."""
    c, n = dosages.shape
    codes = BED_CODE[np.where(dosages < 0, 3, dosages)]
    padded = np.full((c, 4 * ((n + 3) // 4)), 3, dtype=np.uint8)
    padded[:, :n] = codes
    quads = padded.reshape(c, -1, 4)
    packed = quads[..., 0] | quads[..., 1] << 2 | quads[..., 2] << 4 | quads[..., 3] << 6
    handle.write(np.ascontiguousarray(packed, dtype=np.uint8).tobytes())


def write_bed(prefix: Path, dosages: np.ndarray) -> None:
    """A SNP-major PLINK 1 fileset from (M, N) dosages (-1 missing), ``CHROMOSOMES`` autosomes."""
    m, n = dosages.shape
    with open(f"{prefix}.bed", "wb") as handle:
        handle.write(b"\x6c\x1b\x01")
        write_bed_rows(handle, dosages)
    chrom = np.repeat(
        np.arange(1, CHROMOSOMES + 1), np.diff(np.linspace(0, m, CHROMOSOMES + 1).astype(int))
    )
    with open(f"{prefix}.bim", "w") as handle:
        for j in range(m):
            handle.write(f"{chrom[j]}\tsnp{j}\t0\t{1000 * (j + 1)}\tA\tG\n")
    with open(f"{prefix}.fam", "w") as handle:
        for i in range(n):
            handle.write(f"fam{i}\tind{i}\t0\t0\t0\t-9\n")


def simulate_independent(n: int, m: int, seed: int) -> np.ndarray:
    """(M, N) int8 dosages without msprime: independent variants in Hardy-Weinberg equilibrium,
    A1 frequencies from the neutral site-frequency spectrum (density ∝ 1/p on [1/2N, 1/2]),
    1% missing. For machines without msprime (the GPU box); the kernels' time does not depend
    on linkage."""
    rng = np.random.default_rng(seed)
    low = 1.0 / (2 * n)
    p = low * np.exp(rng.random(m) * np.log(0.5 / low))
    dosages = np.empty((m, n), dtype=np.int8)
    for start in range(0, m, 4096):
        stop = min(m, start + 4096)
        dosages[start:stop] = rng.binomial(2, p[start:stop, None], size=(stop - start, n))
    dosages[rng.random(dosages.shape, dtype=np.float32) < MISSING_RATE] = -1
    return dosages


def cohort(n: int, m: int, seed: int, simulator: str = "msprime") -> Path:
    suffix = "" if simulator == "msprime" else f"_{simulator}"
    prefix = CACHE / f"sim_n{n}_m{m}_s{seed}{suffix}"
    if not Path(f"{prefix}.fam").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        dosages = (simulate if simulator == "msprime" else simulate_independent)(n, m, seed)
        write_bed(prefix, dosages)
        missing = float((dosages < 0).mean())
        print(
            f"simulated {n} x {m} with {simulator} in {time.perf_counter() - start:.1f} s "
            f"({missing:.2%} missing) -> {prefix}.bed",
            flush=True,
        )
    return prefix


# --- running and measuring ----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    wall_s: float
    peak_rss_mb: float
    stdout: str


def measured(cmd: list[str], env: dict[str, str]) -> Run:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds and peak RSS of the process."""
    with tempfile.NamedTemporaryFile(suffix=".time") as report:
        start = time.perf_counter()
        done = subprocess.run(
            ["/usr/bin/time", "-v", "-o", report.name, *cmd],
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
        found = re.search(
            r"Maximum resident set size \(kbytes\): (\d+)", Path(report.name).read_text()
        )
    assert found is not None
    return Run(wall, int(found.group(1)) / 1024.0, done.stdout)


def run_plink(metric: str, prefix: Path, out: Path, threads: int) -> tuple[Run, np.ndarray]:
    cmd, suffix, _ = PLINK[metric]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    if Path(OPENBLAS).is_dir():  # OpenBLAS for this run only; the system default stays as it is
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [OPENBLAS, env.get("LD_LIBRARY_PATH")]))
    run = measured(
        [*cmd[:1], "--bfile", str(prefix), *cmd[1:], "--threads", str(threads), "--out", str(out)],
        env,
    )
    return run, np.fromfile(f"{out}{suffix}", dtype="<f8")


def run_medbatch(
    metric: str, prefix: Path, out: Path, threads: int, device: str, tile_rows: int, keep: bool
) -> tuple[Run, np.ndarray | None]:
    child = [sys.executable, str(Path(__file__).resolve()), "--engine", metric, str(prefix)]
    child += [str(out), "--threads", str(threads), "--device", device]
    child += ["--tile-rows", str(tile_rows)] + ([] if keep else ["--discard"])
    run = measured(child, dict(os.environ))
    return run, (np.fromfile(out, dtype="<f8") if keep else None)


def engine(
    metric: str, prefix: str, out: str, threads: int, device: str, tile_rows: int, keep: bool
) -> None:
    """The medbatch side, in its own process: read the fileset, compute, write raw float64.

    With ``tile_rows``, the square is computed as the worker's tiles are (row blocks against the
    whole cohort, with the cohort's frequencies), one after the other, each written as it ends.
    """
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    start = time.perf_counter()
    if device == "cpu" and not tile_rows:
        # What a CPU worker runs for a whole cohort: the .bed decoded straight into bit planes
        # or standardized blocks, and the square written to disk as it is assembled.
        from models.genome.api import pairwise_bed

        threadpool_limits(threads)  # the OpenBLAS of numpy and scipy (the GRM's dsyrk)
        read = start
        pairwise_bed(prefix, metric=metric, out=out if keep else os.devnull)  # type: ignore[arg-type]
    else:
        import torch

        from models.genome.api import (
            allele_frequencies,
            pairwise,
            pairwise_block,
            prepare_cohort,
            read_bed,
        )

        torch.set_num_threads(threads)
        genotypes = read_bed(prefix)
        cohort = prepare_cohort(genotypes.dosages)  # as the worker holds it: planes built once
        read = time.perf_counter()
        x = genotypes.dosages
        with open(out, "wb") as sink:
            if tile_rows and tile_rows < len(x):
                p = allele_frequencies(x)
                for row in range(0, len(x), tile_rows):
                    block = pairwise_block(
                        x[row : row + tile_rows],
                        x,
                        metric=metric,  # type: ignore[arg-type]
                        frequencies=p,
                        device=device,  # type: ignore[arg-type]
                        prepared=cohort,
                    )
                    if metric in ("king", "ibs"):  # the diagonal PLINK writes
                        np.fill_diagonal(block[:, row:], 0.5 if metric == "king" else 1.0)
                    if keep:
                        block.tofile(sink)
            else:
                matrix = pairwise(x, metric=metric, device=device)  # type: ignore[arg-type]
                if keep:
                    matrix.tofile(sink)
    done = time.perf_counter()
    print(json.dumps({"read_s": read - start, "compute_s": done - read}))


#: Runs every CPU kernel once on a small cohort, so that numba's on-disk cache holds them.
_WARM_UP = """
import time, numpy as np
import os
from models.genome.api import pairwise, pairwise_bed
start = time.perf_counter()
x = np.random.default_rng(0).integers(-1, 3, size=(40, 700)).astype(np.int8)
for metric in ("grm", "king", "ibs"):
    pairwise(x, metric=metric, device="cpu")
    pairwise_bed("tests/data/genome/hm3_small", metric=metric, out=os.devnull)
pairwise(x, metric="ibs", ibs_missing="flat", device="cpu")
print(f"{time.perf_counter() - start:.1f} s")
"""


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores seen)"


# --- the run ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="samples")
    parser.add_argument("--m", type=int, default=50_000, help="variants")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--metrics", default="grm,king,ibs", help="comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="medbatch's")
    parser.add_argument(
        "--tile-rows", type=int, default=0, help="medbatch computes row tiles of this many samples"
    )
    parser.add_argument(
        "--simulator", choices=["msprime", "independent"], default="msprime", help="the cohort"
    )
    parser.add_argument(
        "--no-plink", action="store_true", help="time medbatch alone (its matrix is not kept)"
    )
    parser.add_argument("--discard", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--engine", nargs=3, metavar=("METRIC", "PREFIX", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.engine:
        metric, prefix, out = args.engine
        engine(metric, prefix, out, args.threads, args.device, args.tile_rows, not args.discard)
        return
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(PLINK))
    if unknown:
        parser.error(f"unknown metrics {unknown}; choose from {sorted(PLINK)}")
    for tool in set() if args.no_plink else {PLINK[m][0][0] for m in metrics}:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not on PATH (apt-get install plink2 plink1.9)")
    prefix = cohort(args.n, args.m, args.seed, args.simulator)
    print(
        f"cohort {args.n} samples x {args.m} variants ({args.simulator}), seed {args.seed}, "
        f"{args.threads} threads, medbatch on {_device_name(args.device)}",
        flush=True,
    )
    result: dict[str, object] = {
        "n": args.n,
        "m": args.m,
        "seed": args.seed,
        "threads": args.threads,
        "device": _device_name(args.device),
        "simulator": args.simulator,
    }
    if args.device == "cpu":  # numba compiles the bit-plane kernels once per install
        warm = subprocess.run([sys.executable, "-c", _WARM_UP], cwd=ROOT, capture_output=True)
        if warm.returncode != 0:
            sys.exit(f"warm-up failed:\n{warm.stderr.decode()}")
        print(f"numba kernels compiled or loaded from cache: {warm.stdout.decode().strip()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="medbatch-bench-genome-") as tmp:
        for metric in metrics:
            ours_run, ours = run_medbatch(
                metric, prefix, Path(tmp) / f"ours_{metric}.bin", args.threads, args.device,
                args.tile_rows, keep=not args.no_plink,
            )  # fmt: skip
            phases = json.loads(ours_run.stdout.strip().splitlines()[-1])
            result.update(
                {
                    f"{metric}_medbatch_s": round(ours_run.wall_s, 3),
                    f"{metric}_medbatch_compute_s": round(phases["compute_s"], 3),
                    f"{metric}_medbatch_rss_mb": round(ours_run.peak_rss_mb, 1),
                }
            )
            if args.no_plink:
                print(
                    f"  {metric}: medbatch {ours_run.wall_s:.2f} s (read {phases['read_s']:.2f} "
                    f"s, compute {phases['compute_s']:.2f} s) {ours_run.peak_rss_mb:.0f} MB",
                    flush=True,
                )
                continue
            assert ours is not None
            plink, theirs = run_plink(metric, prefix, Path(tmp) / f"plink_{metric}", args.threads)
            diff = np.abs(ours - theirs)
            same_nan = bool(np.array_equal(np.isnan(ours), np.isnan(theirs)))
            max_diff = float(np.nanmax(diff)) if diff.size else 0.0
            ratio = plink.wall_s / ours_run.wall_s
            print(
                f"  {metric}: {PLINK[metric][2]} {plink.wall_s:.2f} s {plink.peak_rss_mb:.0f} MB; "
                f"medbatch {ours_run.wall_s:.2f} s (read {phases['read_s']:.2f} s, compute "
                f"{phases['compute_s']:.2f} s) {ours_run.peak_rss_mb:.0f} MB; x{ratio:.2f}; "
                f"max |diff| {max_diff:.2e}",
                flush=True,
            )
            rows.append((metric, plink, ours_run, ratio, max_diff))
            result.update(
                {
                    f"{metric}_ratio": round(ratio, 3),
                    f"{metric}_max_abs_diff": max_diff,
                    f"{metric}_nan_agree": same_nan,
                    f"{metric}_plink_s": round(plink.wall_s, 3),
                    f"{metric}_plink_rss_mb": round(plink.peak_rss_mb, 1),
                }
            )
            del ours, theirs, diff
    print(
        f"\n{'metric':6} {'PLINK command':22} {'PLINK s':>8} {'PLINK MB':>9} "
        f"{'medbatch s':>11} {'medbatch MB':>12} {'PLINK/medbatch':>15} {'max |diff|':>11}"
    )
    for metric, plink, ours_run, ratio, max_diff in rows:
        print(
            f"{metric:6} {PLINK[metric][2]:22} {plink.wall_s:8.2f} {plink.peak_rss_mb:9.0f} "
            f"{ours_run.wall_s:11.2f} {ours_run.peak_rss_mb:12.0f} {ratio:15.2f} {max_diff:11.1e}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
