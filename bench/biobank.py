"""Biobank-scale relatedness: medbatch's pairs-only KING job against plink2 (``make bench-biobank``).

One cohort of N samples x M variants with constructed relatives, and on it, side by side:

  medbatch  a pairs-only KING job (``output="pairs"``): 2-D tiles of the upper triangle, run by
            W real worker processes (``medbatch worker --queues genome``, T numba threads each)
            over the embedded broker and a SQLite database, timed from submission to the .kin0
  plink2    ``--make-king-table --king-table-filter 2^-4.5 --threads W·T``

The cohort (cached under var/bench/biobank/): for each of 22 autosomes msprime simulates 10,000
haplotypes (one population that grew from 10,000 to 1,000,000 over the last 400 generations) over a
stretch long enough for the autosome's share of M variants with minor allele frequency ≥ 5 %
(``--min-maf``), as relatedness markers are picked from a genotyping array (UK Biobank estimated
kinship on about 93,000 selected array markers). Each founder haplotype is then a mosaic of tracts
of those (``--tract``: about 2 variants a tract, Li and Stephens' copying model), so that LD holds
between neighbouring markers and founders are not related to one another (one msprime stretch per
autosome spans a few hundred kb: its LD would make all founders look like cousins). Neighbouring
markers' r² then averages 0.08 (measured at 20,000 and 40,000 markers), about what a European
genome shows between array markers tens of kb or more apart; tracts of 8 gave 0.25, three times
that, and at 20,000 markers an estimate 1.4 times as noisy around the realized kinship (SD 0.0059
against 0.0041 on 5,000 samples). Then families built by meiosis over a human genetic map (each
autosome given its sex-averaged length, 35 Morgans in all, crossovers as a Poisson process along
the kept variants): duplicates (0.1 % of calls changed), and two kinds of family: parents A, B with
full siblings C1, C2 and a half-sibling C3 by A and D; and parents A, B with children C1, C2 and a
grandchild G of C1 and E (grandparents and an uncle or aunt: second degree). 1 % of calls are then
set missing at random, and the sample order is shuffled, so relatives land in every tile.

Every constructed pair has a degree: duplicates, parent-offspring and full siblings are KING's
duplicate/MZ and 1st degree; half-siblings, grandparents and avuncular pairs 2nd. A relative is
found when medbatch's table holds the pair in that degree. The simulation also follows, site by
site, which founder haplotype each relative's haplotypes descend from, so each constructed pair
has its realized kinship (the genome it really shares): reported beside the pedigree's degree
are the pairs whose realized kinship falls outside it (meiosis alone does that to some
second-degree pairs), the pairs found in their realized kinship's degree, and the spread of
the estimated kinship around the realized one. Kinships are compared with plink2's
table on the pairs both report (the .kin0 files are also compared byte for byte).

Memory: each worker's peak RSS (VmHWM of its process, start-up included); plink2's from
``/usr/bin/time -v``. The last line is one JSON object. Usage:
python bench/biobank.py [--n 50000] [--m 40000] [--workers 2] [--threads 1] [--seed 1]
[--min-maf 0.05] [--tract 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "var" / "bench" / "biobank"
#: Sex-averaged genetic lengths of the autosomes in Morgans (deCODE map, Kong et al. 2010).
MORGANS = (2.78, 2.63, 2.24, 2.14, 2.04, 1.92, 1.87, 1.70, 1.68, 1.79, 1.59,
           1.74, 1.26, 1.20, 1.41, 1.34, 1.29, 1.20, 1.07, 1.08, 0.62, 0.74)  # fmt: skip
MISSING_RATE = 0.01
MIN_MAF = 0.05
#: KING's third-degree bound: the cut-off of both tables.
CUTOFF = 2.0**-4.5


# --- the cohort -------------------------------------------------------------------------------


#: Haplotypes msprime simulates per autosome; founders copy tracts of them (see below).
POOL = 10_000
#: Mean tract length, in kept variants, of a founder haplotype's copy of one pool haplotype.
TRACT = 2


def pool_haplotypes(want: int, chrom: int, seed: int, min_maf: float) -> np.ndarray:
    """(want, POOL) uint8 haplotypes of one autosome's variants with MAF ≥ min_maf, msprime."""
    import msprime

    demography = msprime.Demography()
    demography.add_population(name="pop", initial_size=1e6, growth_rate=np.log(100) / 400)
    demography.add_population_parameters_change(time=400, growth_rate=0, population="pop")
    # About 1.5 sites per kb with MAF ≥ 1 % (measured); fewer for a higher floor, as ln((1-f)/f)
    # of a neutral spectrum's share between f and 1 - f.
    density = 1.5e-3 * np.log((1 - min_maf) / min_maf) / np.log(99)
    length = max(10_000, int(want / density))
    while True:
        ts = msprime.sim_ancestry(
            samples=POOL // 2, demography=demography, sequence_length=length,
            recombination_rate=1e-8, random_seed=seed * 100 + chrom,
        )  # fmt: skip
        ts = msprime.sim_mutations(
            ts, rate=1e-8, model=msprime.BinaryMutationModel(), discrete_genome=False,
            random_seed=seed * 100 + chrom,
        )  # fmt: skip
        n = ts.num_samples
        common = [
            site.id
            for tree in ts.trees()
            for site in tree.sites()
            if min_maf <= tree.num_samples(site.mutations[0].node) / n <= 1 - min_maf
        ]
        if len(common) >= want:
            break
        length = int(length * 1.5)
    picked = np.array(common)[np.linspace(0, len(common) - 1, want).round().astype(int)]
    drop = np.setdiff1d(np.arange(ts.num_sites), picked)
    return ts.delete_sites(drop).genotype_matrix().astype(np.uint8)


def founder_haplotypes(
    pool: np.ndarray, n_haplotypes: int, rng: np.random.Generator, tract: float
) -> np.ndarray:
    """(sites, n_haplotypes) mosaics of the pool (Li and Stephens' copying model): each founder
    haplotype copies one pool haplotype for a tract of about ``tract`` variants, then another. The
    pool's LD holds within a tract; two founders share a pool haplotype only by chance, at
    1/POOL of their tracts, so founders are not relatives of one another."""
    sites = pool.shape[0]
    out = np.empty((sites, n_haplotypes), np.uint8)
    for c0 in range(0, n_haplotypes, 8192):
        c1 = min(n_haplotypes, c0 + 8192)
        which = np.cumsum(rng.random((sites, c1 - c0)) < 1.0 / tract, axis=0, dtype=np.int32)
        source = rng.integers(0, pool.shape[1], (int(which.max()) + 1, c1 - c0), dtype=np.int32)
        copied = np.take_along_axis(source, which, axis=0)
        out[:, c0:c1] = np.take_along_axis(pool, copied, axis=1)
    return out


@dataclass
class Pedigree:
    """Who descends from whom: each relative's parents (indices into all samples), and the
    constructed pairs with their KING degree."""

    parents: list[tuple[int, int]]  # per relative: (mother, father), or (source, -1) for a copy
    names: list[str]
    pairs: list[tuple[int, int, str]]


def pedigree(n: int, seed: int) -> tuple[int, Pedigree]:
    """Founders first, then the relatives: 1.5 % of N in families of 3 new samples, 0.2 %
    duplicates. Returns the number of founders and the pedigree."""
    rng = np.random.default_rng(seed)
    families = max(2, n // 200)
    duplicates = max(1, n // 500)
    relatives = 3 * families + duplicates
    founders = n - relatives
    unused = iter(rng.permutation(founders).tolist())
    names = [f"F{i}" for i in range(founders)]
    parents: list[tuple[int, int]] = []
    pairs: list[tuple[int, int, str]] = []

    def child(mother: int, father: int, name: str) -> int:
        parents.append((mother, father))
        names.append(name)
        return len(names) - 1

    for f in range(families):
        a, b, e = next(unused), next(unused), next(unused)
        c1, c2 = child(a, b, f"FAM{f}_C1"), child(a, b, f"FAM{f}_C2")
        pairs += [(a, c1, "1st"), (b, c1, "1st"), (a, c2, "1st"), (b, c2, "1st"), (c1, c2, "1st")]
        if f % 2 == 0:  # a half-sibling by A and D
            d = e
            c3 = child(a, d, f"FAM{f}_C3")
            pairs += [(a, c3, "1st"), (d, c3, "1st"), (c1, c3, "2nd"), (c2, c3, "2nd")]
        else:  # a grandchild of A and B through C1 and E
            g = child(c1, e, f"FAM{f}_G")
            pairs += [(c1, g, "1st"), (e, g, "1st"), (a, g, "2nd"), (b, g, "2nd"), (c2, g, "2nd")]
    for k in range(duplicates):
        source = next(unused)
        parents.append((source, -1))
        names.append(f"DUP{k}_{names[source]}")
        pairs.append((source, len(names) - 1, "duplicate/MZ twin"))
    assert len(names) == n
    return founders, Pedigree(parents, names, pairs)


def meiosis(sites: int, morgans: float, rng: np.random.Generator) -> np.ndarray:
    """Which parental haplotype (0 or 1) a gamete carries at each of ``sites`` sites sitting
    evenly along ``morgans``: Poisson crossovers."""
    crossings = np.sort(rng.uniform(0, morgans, rng.poisson(morgans)))
    switch = np.zeros(sites, np.int64)
    cut = np.searchsorted(np.linspace(0, morgans, sites), crossings)
    np.add.at(switch, cut[cut < sites], 1)
    return (np.cumsum(switch) + rng.integers(2)) % 2


def founder_labels(labels: dict[int, np.ndarray], sample: int, sites: int) -> np.ndarray:
    """(2, sites) founder haplotypes a sample's two haplotypes descend from: a relative's from
    ``labels``, a founder's its own (haplotypes 2·sample and 2·sample + 1)."""
    if sample in labels:
        return labels[sample]
    return np.repeat(np.array([[2 * sample], [2 * sample + 1]]), sites, axis=1)


def realized_kinship(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per site, the kinship of two samples from the founder haplotype each of their two
    haplotypes descends from ((2, sites) labels each): the chance that an allele drawn from
    each is identical by descent, 1/4 of the matching label pairs (0.5 for a duplicate, 0.25
    for a parent and child at every site)."""
    return sum((a[i] == b[j]).astype(np.float64) for i in (0, 1) for j in (0, 1)) / 4


@dataclass(frozen=True)
class Relative:
    """A constructed pair: its degree by the pedigree, and its realized kinship (the share of
    the genome the two samples' haplotypes inherited from the same founder haplotypes)."""

    iid1: str
    iid2: str
    degree: str
    realized: float


def cohort(n: int, m: int, seed: int, min_maf: float, tract: float) -> tuple[Path, list[Relative]]:
    """The fileset (written once, then reused) and its constructed pairs."""
    from bench.genome import write_bed_rows

    # No dot in the name (MAF in percent, tract in tenths): the files are named by with_suffix.
    prefix = CACHE / f"n{n}_m{m}_s{seed}_maf{min_maf * 100:g}pct_t{tract * 10:g}_v2"
    pairs_file = prefix.with_suffix(".relatives.tsv")
    if not pairs_file.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        founders, ped = pedigree(n, seed)
        rng = np.random.default_rng(seed)
        order = rng.permutation(n)  # file row of each sample
        per_chrom = np.diff(np.round(np.cumsum([0, *MORGANS]) / sum(MORGANS) * m).astype(int))
        shared = np.zeros(len(ped.pairs))  # Σ over sites of each pair's realized kinship
        bed, bim = prefix.with_suffix(".bed.part"), prefix.with_suffix(".bim")
        with open(bed, "wb") as out, open(bim, "w") as bim_out:
            out.write(b"\x6c\x1b\x01")
            for chrom, want in enumerate(per_chrom, start=1):
                t0 = time.perf_counter()
                haps = founder_haplotypes(
                    pool_haplotypes(int(want), chrom, seed, min_maf), 2 * founders, rng, tract
                )
                morgans = MORGANS[chrom - 1]
                h = np.empty((int(want), 2 * n), np.uint8)
                h[:, : 2 * founders] = haps
                del haps
                # Each relative's haplotypes as labels of the founder haplotypes they descend
                # from, site by site: the realized kinship of every constructed pair.
                labels: dict[int, np.ndarray] = {}
                sites = int(want)
                for r, (mother, father) in enumerate(ped.parents):
                    s = founders + r
                    if father < 0:  # a duplicate: the same haplotypes
                        h[:, 2 * s], h[:, 2 * s + 1] = h[:, 2 * mother], h[:, 2 * mother + 1]
                        labels[s] = founder_labels(labels, mother, sites)
                        continue
                    labels[s] = np.empty((2, sites), np.int64)
                    for k, parent in enumerate((mother, father)):
                        strand = meiosis(sites, morgans, rng)
                        h[:, 2 * s + k] = np.where(
                            strand == 1, h[:, 2 * parent + 1], h[:, 2 * parent]
                        )
                        of = founder_labels(labels, parent, sites)
                        labels[s][k] = np.where(strand == 1, of[1], of[0])
                for i, (a, b, _) in enumerate(ped.pairs):
                    shared[i] += realized_kinship(
                        founder_labels(labels, a, sites), founder_labels(labels, b, sites)
                    ).sum()
                del labels
                x = (h[:, 0::2] + h[:, 1::2]).astype(np.int8)
                del h
                for _, dup in ((p, s) for p, s, d in ped.pairs if d == "duplicate/MZ twin"):
                    changed = rng.random(len(x)) < 0.001
                    x[changed, dup] = np.where(x[changed, dup] == 2, 1, x[changed, dup] + 1)
                x[rng.random(x.shape) < MISSING_RATE] = -1
                rows = np.empty_like(x)
                rows[:, order] = x
                write_bed_rows(out, rows)
                del x, rows
                positions = np.linspace(1, 10_000_000 * morgans, int(want)).round().astype(int)
                bim_out.writelines(
                    f"{chrom}\tchr{chrom}_{i}\t{100 * morgans * i / want:.6f}\t{pos}\tT\tC\n"
                    for i, pos in enumerate(positions)
                )
                print(f"  chromosome {chrom}: {want} variants, {time.perf_counter() - t0:.1f} s",
                      flush=True)  # fmt: skip
        by_row = sorted(range(n), key=lambda s: order[s])
        prefix.with_suffix(".fam").write_text(
            "".join(f"{ped.names[s]}\t{ped.names[s]}\t0\t0\t0\t-9\n" for s in by_row)
        )
        bed.replace(prefix.with_suffix(".bed"))
        pairs_file.write_text(
            "".join(
                f"{ped.names[a]}\t{ped.names[b]}\t{d}\t{k / m:.6f}\n"
                for (a, b, d), k in zip(ped.pairs, shared, strict=True)
            )
        )
    pairs = []
    for line in pairs_file.read_text().splitlines():
        iid1, iid2, degree, realized = line.split("\t")
        pairs.append(Relative(iid1, iid2, degree, float(realized)))
    return prefix, pairs


# --- the contenders ---------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's name (family and model too) and the flags the tile kernels care about."""
    from models.cpu_features import cpu_flags, cpu_model

    flags = cpu_flags()
    extras = [f for f in ("avx2", "avx512f", "avx512_vpopcntdq", "amx_int8") if f in flags]
    return f"{cpu_model()} ({os.cpu_count()} cores seen; {', '.join(extras)})"


def run_plink2(prefix: Path, out: Path, threads: int) -> tuple[float, float]:
    """plink2's pair table: wall seconds and peak RSS (MB), from ``/usr/bin/time -v``."""
    from bench.genome import measured

    cmd = ["plink2", "--bfile", str(prefix), "--make-king-table", "--king-table-filter",
           repr(CUTOFF), "--threads", str(threads), "--out", str(out)]  # fmt: skip
    run = measured(cmd, dict(os.environ))
    return run.wall_s, run.peak_rss_mb


@dataclass
class MedbatchRun:
    wall_s: float
    tiles: int
    peak_rss_mb: list[float]
    kin0: Path
    degree_counts: dict[str, int]


def peak_rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmHWM:\s+(\d+) kB", text)
    assert found is not None
    return int(found.group(1)) / 1024


def run_medbatch(
    prefix: Path, workdir: Path, workers: int, threads: int, block: int
) -> MedbatchRun:
    """Start W workers on the embedded broker, submit the pairs-only job, wait for its .kin0."""
    from sqlalchemy import select

    from db.engine import make_engine, make_sessionmaker, session_scope
    from db.migrate import upgrade
    from db.repo import create_tenant
    from db.tables import GenomeJob
    from medbatch.settings import Settings
    from worker.app import create_app
    from worker.broker import embedded_broker_url, shutdown_embedded_brokers
    from worker.tasks import genome as tasks

    database = f"sqlite:///{workdir / 'medbatch.sqlite'}"
    upgrade(database)
    broker = embedded_broker_url(workdir / "var")
    env = {
        **os.environ,
        "MEDBATCH_DATABASE_URL": database,
        "MEDBATCH_BROKER_URL": broker,
        "MEDBATCH_ARTIFACT_DIR": str(workdir / "store"),
        "MEDBATCH_DEVICE": "cpu",
        "MEDBATCH_LOG_LEVEL": "WARNING",
        "NUMBA_NUM_THREADS": str(threads),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    procs = []
    for k in range(workers):
        log = (workdir / f"worker{k}.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "medbatch.cli", "worker", "--queues", "genome",
             "--hostname", f"biobank{k}@%h"],
            env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
        ))  # fmt: skip
        log.close()
    settings = Settings(database_url=database, broker_url=broker, artifact_dir=workdir / "store")
    sessions = make_sessionmaker(make_engine(database))
    app = create_app(settings, include_tasks=False)
    try:
        time.sleep(5)  # the workers connect (they would be running already in a deployment)
        with session_scope(sessions) as s:
            tenant = create_tenant(s, name="biobank")[0].id
        start = time.perf_counter()
        job = tasks.submit(
            sessions, app, tenant_id=tenant, metric="king", bfile=prefix, threshold=CUTOFF,
            output="pairs", block=block, artifact_dir=workdir / "store",
        )  # fmt: skip
        last = 0.0
        status = select(GenomeJob.status, GenomeJob.tiles_done).where(GenomeJob.id == job["id"])
        while True:
            # One light query a second: the poller must not take CPU from the workers.
            with sessions() as s:
                state, tiles_done = s.execute(status).one()
            if state in ("done", "failed"):
                break
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a worker exited; see {workdir}/worker*.log")
            if time.perf_counter() - last > 60:
                last = time.perf_counter()
                print(f"  medbatch: {tiles_done}/{job['tiles_total']} tiles, "
                      f"{last - start:.0f} s", flush=True)  # fmt: skip
            time.sleep(1.0)
        wall = time.perf_counter() - start
        summary = tasks.describe_id(sessions, job["id"])
        if summary["status"] != "done":
            raise RuntimeError(f"medbatch job failed: {summary['error']}")
        rss = [peak_rss_mb(p.pid) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutdown_embedded_brokers()
    kin0 = next(Path(p) for p in summary["outputs"] if p.endswith(".kin0"))
    return MedbatchRun(wall, job["tiles_total"], rss, kin0, summary["degree_counts"])


def read_kin0(path: Path) -> dict[frozenset[str], tuple[str, float]]:
    """Pair → (kinship as printed, kinship)."""
    out = {}
    for line in path.read_text().splitlines()[1:]:
        f = line.split("\t")
        out[frozenset((f[1], f[3]))] = (f[-1], float(f[-1]))
    return out


# --- the run ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="samples")
    parser.add_argument("--m", type=int, default=40_000, help="variants")
    parser.add_argument("--workers", type=int, default=2, help="medbatch worker processes")
    parser.add_argument("--threads", type=int, default=1, help="numba threads per worker")
    parser.add_argument("--block", type=int, default=0, help="samples per tile side")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tract", type=float, default=TRACT, help="mean tract, in variants")
    parser.add_argument("--min-maf", type=float, default=MIN_MAF, help="markers' minimum MAF")
    args = parser.parse_args()
    # Stopped from outside: unwind, so that the workers and the broker are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from models.genome.io.output import kinship_degree
    from models.genome.pairs import default_block

    print(f"CPU: {cpu_name()}")
    print(f"cohort: {args.n} samples x {args.m} variants (seed {args.seed})", flush=True)
    t0 = time.perf_counter()
    prefix, constructed = cohort(args.n, args.m, args.seed, args.min_maf, args.tract)
    print(f"  ready in {time.perf_counter() - t0:.0f} s: {prefix}", flush=True)
    block = args.block or default_block(args.m)
    threads = args.workers * args.threads
    workdir = CACHE / f"run-{prefix.name}"  # kept: logs and both tables
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    print(f"medbatch: pairs-only KING, {args.workers} workers x {args.threads} thread(s), "
          f"blocks of {block}", flush=True)  # fmt: skip
    ours = run_medbatch(prefix, workdir, args.workers, args.threads, block)
    print(f"  {ours.wall_s:.1f} s, {ours.tiles} tiles", flush=True)
    print(f"plink2 --make-king-table --king-table-filter {CUTOFF:.6g} --threads {threads}",
          flush=True)  # fmt: skip
    plink_s, plink_rss = run_plink2(prefix, workdir / "plink2", threads)
    print(f"  {plink_s:.1f} s", flush=True)
    mine, theirs = read_kin0(ours.kin0), read_kin0(workdir / "plink2.kin0")
    identical = ours.kin0.read_bytes() == (workdir / "plink2.kin0").read_bytes()
    both = mine.keys() & theirs.keys()
    diff = max((abs(mine[p][1] - theirs[p][1]) for p in both), default=0.0)
    estimated = {r: mine.get(frozenset((r.iid1, r.iid2)), (None, float("nan")))[1]
                 for r in constructed}  # fmt: skip
    found = sum(1 for r in constructed if kinship_degree(estimated[r]) == r.degree)
    # The pedigree's degree against the genome's: meiosis alone moves some second-degree pairs
    # out of their band. What any estimator can be asked for is the realized kinship's degree.
    realized_off = [r for r in constructed if kinship_degree(r.realized) != r.degree]
    found_realized = sum(
        1 for r in constructed if kinship_degree(estimated[r]) == kinship_degree(r.realized)
    )
    error = np.array([estimated[r] - r.realized for r in constructed])
    misses = [r for r in constructed if kinship_degree(estimated[r]) != r.degree]
    pairs_total = args.n * (args.n - 1) // 2
    rate = pairs_total / ours.wall_s / threads
    rows = [
        ("pairs (all)", f"{pairs_total:,}", ""),
        ("tiles", f"{ours.tiles:,} of {block} x {block}", ""),
        ("wall s", f"{ours.wall_s:.1f}", f"{plink_s:.1f}"),
        ("pairs / s / thread", f"{rate:,.0f}", f"{pairs_total / plink_s / threads:,.0f}"),
        ("peak RSS MB", " / ".join(f"{r:.0f}" for r in ours.peak_rss_mb), f"{plink_rss:.0f}"),
        ("pairs reported", f"{len(mine):,}", f"{len(theirs):,}"),
        (".kin0 identical", "yes" if identical else "no", ""),
        ("constructed found (pedigree degree)", f"{found} of {len(constructed)}", ""),
        ("constructed found (realized degree)", f"{found_realized} of {len(constructed)}", ""),
    ]
    print(f"\n| N = {args.n:,}, M = {args.m:,} | medbatch | plink2 |\n| --- | ---: | ---: |")
    for name, a, b in rows:
        print(f"| {name} | {a} | {b} |")
    print(f"degrees (medbatch): {ours.degree_counts}")
    print(f"constructed pairs whose realized kinship lies outside their pedigree degree: "
          f"{len(realized_off)}; estimated - realized kinship: mean {np.nanmean(error):+.4f}, "
          f"SD {np.nanstd(error):.4f}")  # fmt: skip
    for r in misses:
        print(f"  not in its pedigree degree: {r.degree:<18} realized {r.realized:.4f} "
              f"({kinship_degree(r.realized)}), estimated {estimated[r]:.4f}")  # fmt: skip
    print(json.dumps({
        "n": args.n,
        "m": args.m,
        "workers": args.workers,
        "tiles": ours.tiles,
        "peak_rss_mb_per_worker": round(max(ours.peak_rss_mb), 1),
        "medbatch_s": round(ours.wall_s, 2),
        "plink2_s": round(plink_s, 2),
        "ratio_vs_plink2": round(plink_s / ours.wall_s, 3),
        "relatives_expected": len(constructed),
        "relatives_found": found,
        "relatives_realized_outside_pedigree_degree": len(realized_off),
        "relatives_found_realized_degree": found_realized,
        "kinship_minus_realized_sd": round(float(np.nanstd(error)), 5),
        "pairs_medbatch": len(mine),
        "pairs_plink2": len(theirs),
        "kinship_max_abs_diff": diff,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
