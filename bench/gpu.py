"""The GPU paths beside the CPU's, in one run: the KING pairs tile kernel and the scoring models.

    python bench/gpu.py            # make bench-gpu

1. **KING pairs tiles** (:mod:`models.genome._pairs_gpu`, the GPU worker's engine for pairs-only
   jobs): two blocks of B samples x M variants of realistic dosages (allele frequencies 1-50 %,
   1 % of calls missing). On CUDA: one tile of B = 2,048 and one of B = 16,384, blocks shipped from
   host memory each time, only the pairs over the cut-off coming back. On the CPU: the bit-plane
   kernel (:func:`models.genome.api.pairwise_block`, what a CPU worker runs) on a 2,048 tile with
   every core. Before any timing, the CUDA tile is checked equal, bit for bit, to the CPU's on a
   1,024 x 1,024 corner. Then the host's part of a GPU tile: decoding a block of B samples from a
   .bed into int8 dosages (:class:`models.genome.pairs.BedSamples`).
2. **Scoring** (featurize + batched forward pass, then attributions) of the MLP and the GRU, on
   the GPU and the CPU, in batches of 256.

Without a CUDA device it measures the CPU side only and says so. The last line is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import make_cases
from models.cases.explain import explain
from models.cases.inference import LoadedModel
from models.cases.registry import Registry
from models.cpu_features import cpu_model
from models.genome._pairs_gpu import king_tile_gemm, king_tile_pairs_gemm
from models.genome.api import pairwise_block
from models.genome.pairs import DEFAULT_CUTOFF, BedSamples

M = int(os.environ.get("MEDBATCH_BENCH_GPU_VARIANTS", "20000"))
CPU_BLOCK = 2_048
GPU_BLOCKS = (2_048, 16_384)
SCORING_CASES = 20_000
EXPLAIN_CASES = 4_096
BATCH = 256


def cohort(n: int, m: int, seed: int) -> np.ndarray:
    """(n, m) int8 dosages, -1 missing: Hardy-Weinberg genotypes at frequencies of 1-50 %."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.5, size=m).astype(np.float32)
    out = np.empty((n, m), np.int8)
    for start in range(0, n, 1024):
        u = rng.random((min(1024, n - start), m), dtype=np.float32)
        block = (u < p * p).astype(np.int8) + (u < 1 - (1 - p) ** 2).astype(np.int8)
        block[rng.random(block.shape, dtype=np.float32) < 0.01] = -1
        out[start : start + len(block)] = block
    return out


def best_of(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    """Least wall time of ``repeats`` calls after one warm-up (CUDA synchronized)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def genome_tiles(cuda: bool) -> dict[str, object]:
    out: dict[str, object] = {"m": M, "cutoff": DEFAULT_CUTOFF}
    big = max(GPU_BLOCKS) if cuda else CPU_BLOCK
    rows, cols = cohort(big, M, seed=1), cohort(big, M, seed=2)
    # Two identical samples across the blocks, so the pairs path returns something to check.
    cols[5] = rows[7]

    cpu_s = best_of(
        lambda: pairwise_block(rows[:CPU_BLOCK], cols[:CPU_BLOCK], metric="king", device="cpu"), 1
    )
    out["cpu_tile_block"] = CPU_BLOCK
    out["cpu_tile_s"] = round(cpu_s, 3)
    out["cpu_pairs_per_s"] = round(CPU_BLOCK**2 / cpu_s)
    out["cpu_threads"] = torch.get_num_threads()
    if cuda:
        corner = slice(0, 1024)
        expected = pairwise_block(rows[corner], cols[corner], metric="king", device="cpu")
        got = king_tile_gemm(rows[corner], cols[corner], device="cuda")
        out["cuda_equals_cpu_bits"] = bool(np.array_equal(got, expected, equal_nan=True))
        r, c, k = king_tile_pairs_gemm(rows, cols, cutoff=DEFAULT_CUTOFF, device="cuda")
        out["pairs_found_16384"] = len(k)
        out["planted_duplicate_found"] = bool(np.any((r == 7) & (c == 5)))
        for b in GPU_BLOCKS:
            s = best_of(
                lambda b=b: king_tile_pairs_gemm(
                    rows[:b], cols[:b], cutoff=DEFAULT_CUTOFF, device="cuda"
                )
            )
            out[f"cuda_tile_{b}_s"] = round(s, 4)
            out[f"cuda_pairs_per_s_{b}"] = round(b * b / s)
        out["cuda_vs_cpu_pairs_per_s"] = round(
            out[f"cuda_pairs_per_s_{max(GPU_BLOCKS)}"] / out["cpu_pairs_per_s"],
            1,  # type: ignore[operator]
        )
    out.update(decode(rows[:big]))
    return out


def decode(block: np.ndarray) -> dict[str, object]:
    """Seconds to read ``block``'s samples back from a .bed as int8 dosages (one process)."""
    from bed_reader import to_bed

    n = len(block)
    with tempfile.TemporaryDirectory() as tmp:
        bed = Path(tmp) / "block.bed"
        val = block.astype(np.float32)
        val[block < 0] = np.nan
        to_bed(bed, val, properties={"iid": [f"s{i}" for i in range(n)]})
        source = BedSamples(bed, n, M)
        positions = np.arange(n)
        s = best_of(lambda: source.codes(positions), 1)
        same = bool(np.array_equal(source.codes(positions), np.maximum(block, -1)))
    return {"decode_block": n, "decode_s": round(s, 3), "decode_roundtrip_exact": same}


def scoring(cuda: bool) -> dict[str, object]:
    out: dict[str, object] = {}
    registry = Registry.load()
    for ref in ("breast-cancer", "vitals-gru"):
        spec = registry.resolve(ref)
        cases = make_cases(spec, SCORING_CASES)
        key = spec.name.replace("-", "_")
        for device in ("cpu", "cuda") if cuda else ("cpu",):
            model = LoadedModel(spec, device=device)
            model.warm_up(BATCH)

            def forward(model: LoadedModel = model, cases: list[dict] = cases) -> None:
                for i in range(0, SCORING_CASES, BATCH):
                    model.to_rows(model.predict(model.featurize(cases[i : i + BATCH])))

            def attributions(model: LoadedModel = model, cases: list[dict] = cases) -> None:
                for i in range(0, EXPLAIN_CASES, BATCH):
                    explain(model, model.featurize(cases[i : i + BATCH]))

            out[f"{key}_{device}_cases_per_s"] = round(SCORING_CASES / best_of(forward, 1))
            out[f"{key}_{device}_explanations_per_s"] = round(
                EXPLAIN_CASES / best_of(attributions, 1)
            )
    return out


def main() -> None:
    cuda = torch.cuda.is_available()
    head = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }
    print(f"CPU: {head['cpu']} ({head['cpu_cores']} cores), torch {head['torch']}")
    print(f"GPU: {head['gpu'] or 'none: CUDA figures left out, the CPU side measured alone'}")
    result = {**head, **genome_tiles(cuda), **scoring(cuda)}
    print()
    for key, value in result.items():
        if key not in head:
            print(f"  {key:<42} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
