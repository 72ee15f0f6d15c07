"""KING-robust kinship as a table of related pairs, from 2-D tiles: relatedness at biobank scale.

``plink2 --make-king-table --king-table-filter K`` writes every pair of samples whose KING-robust
kinship is at least ``K``, and never the N x N square. This module computes the same table in
tiles: the upper triangle of the N x N square is cut into (row block x column block) rectangles
(:func:`triangle_tiles`; query samples against a cohort: :func:`rectangle_tiles`), and a tile
needs only its two blocks of samples:

- :class:`BedSamples` reads a block of samples from a PLINK 1 .bed, a chunk of variants at a time
  through a memory map, touching only the bytes that hold those samples (a SNP-major .bed keeps
  4 samples a byte in each variant's row, so a contiguous block is a contiguous byte range of each
  row), and packs them into bit planes (:mod:`models.genome._cpu`);
- :func:`king_tile` runs the CPU engine's pair kernel on the two blocks' planes, PLINK-exact
  (integer counts, one float64 division);
- :func:`tile_pairs` keeps the pairs at or above the cut-off, and their NSNP / HETHET / IBS0
  counts (plink2's default ``.kin0`` columns) are counted from those samples' calls alone.

What a tile holds is in proportion to its block sizes times the variants: the planes of two blocks
(2 bits per call), the block's kinships (B_r x B_c float64) and a chunk of the .bed's rows
(:data:`READ_BYTES`), whatever the cohort's size. Every block splits its variants into dense
planes and rare-variant lists (:class:`models.genome._cpu.Rare`) by the whole cohort's counts
(:meth:`BedSamples.split`, one pass over the .bed), so that any two blocks meet; the counts, and
so the kinships, do not depend on the split, only the speed does.

The CUDA tile kernel is :mod:`models.genome._pairs_gpu`.
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from numba import njit, prange

from models.genome import _cpu as genome_cpu
from models.genome import api as genome
from models.genome.io.output import (
    DUPLICATE_MIN_KINSHIP,
    FIRST_DEGREE_MIN_KINSHIP,
    SECOND_DEGREE_MIN_KINSHIP,
    THIRD_DEGREE_MIN_KINSHIP,
    king_pair_counts,
    kinship_degree,
)

# The tile plan is part of this module's API (re-exported; planning itself loads no kernel).
from models.genome.plan import BLOCK_PLANE_BYTES as BLOCK_PLANE_BYTES
from models.genome.plan import DEGREES as DEGREES
from models.genome.plan import MAX_BLOCK as MAX_BLOCK
from models.genome.plan import MIN_BLOCK as MIN_BLOCK
from models.genome.plan import Tile as Tile
from models.genome.plan import default_block as default_block
from models.genome.plan import rectangle_tiles as rectangle_tiles
from models.genome.plan import triangle_tiles as triangle_tiles

#: The default cut-off: third degree or closer (KING's 2^(-9/2) ≈ 0.0442).
DEFAULT_CUTOFF = THIRD_DEGREE_MIN_KINSHIP
#: .bed bytes mapped at once when reading a block (a chunk of variants' rows).
READ_BYTES = 64 * 2**20
#: Blocks' planes a :class:`BedSamples` keeps for the next tiles (a worker's tiles share blocks).
CACHED_BLOCKS = 3


# --- reading blocks of samples ------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _gather_bed(raw, idx, out):
    """``out[v]``: the 2-bit .bed codes of samples ``idx`` of ``raw[v]``, packed 4 to a byte."""
    k = idx.shape[0]
    for v in prange(raw.shape[0]):
        row = raw[v]
        for b in range((k + 3) // 4):
            byte = 0
            for t in range(min(4, k - 4 * b)):
                i = idx[4 * b + t]
                byte |= ((np.int64(row[i >> 2]) >> ((i & 3) << 1)) & 3) << (2 * t)
            out[v, b] = byte


@njit(parallel=True, cache=True)
def _transpose_into(src, out, col0):
    """``out[:, col0:col0 + V] = src.T`` for a (V, K) ``src``, in 64 x 64 tiles, threads over
    blocks of samples: numpy's strided copy of a (M, B) int8 block into sample-major rows was
    ~95 % of reading a block of dosages (2.2 s of 2.3 for 8,192 samples x 20,000 variants)."""
    v_count, k_count = src.shape
    for kb in prange((k_count + 63) // 64):
        k0 = kb * 64
        k1 = min(k_count, k0 + 64)
        for v0 in range(0, v_count, 64):
            v1 = min(v_count, v0 + 64)
            for k in range(k0, k1):
                for v in range(v0, v1):
                    out[k, col0 + v] = src[v, k]


class Samples(Protocol):
    """One side of a tile: samples by position, over the same variants as the other side."""

    @property
    def n(self) -> int: ...

    @property
    def n_variants(self) -> int: ...

    def planes(self, start: int, stop: int, split: Split, rare: bool = True) -> genome_cpu.Planes:
        """The bit planes of samples ``start:stop``."""
        ...

    def codes(self, positions: np.ndarray) -> np.ndarray:
        """(k, M) int8 dosages (-1 missing) of the samples at ``positions``."""
        ...


#: Per variant: (rare, flip), from :func:`models.genome._cpu.classify` over the whole cohort.
Split = tuple[np.ndarray, np.ndarray]


class BedSamples:
    """A PLINK 1 .bed read by blocks of samples, never whole.

    Parameters
    ----------
    bed_path
        The .bed (SNP-major, checked by the caller: :func:`models.genome.api.inspect_bed`).
    n_samples, n_variants
        Samples and variants in the file (.fam and .bim lines).
    samples
        Rows of the file to use, ascending (``plink --keep``); None for all.
    variants
        Variants of the file to use, ascending (``plink --maf``); None for all.
    """

    def __init__(
        self,
        bed_path: str | Path,
        n_samples: int,
        n_variants: int,
        *,
        samples: np.ndarray | None = None,
        variants: np.ndarray | None = None,
    ) -> None:
        self.path = Path(bed_path)
        self.file_samples = n_samples
        self.file_variants = n_variants
        self.samples = None if samples is None else np.asarray(samples, dtype=np.int64)
        self.variants = None if variants is None else np.asarray(variants, dtype=np.int64)
        self._cache: OrderedDict[tuple[int, int, bool], genome_cpu.Planes] = OrderedDict()
        self._split: Split | None = None

    @property
    def n(self) -> int:
        return self.file_samples if self.samples is None else len(self.samples)

    @property
    def n_variants(self) -> int:
        return self.file_variants if self.variants is None else len(self.variants)

    def with_variants(self, variants: np.ndarray) -> BedSamples:
        """The same samples over the file's variants ``variants`` (ascending)."""
        return BedSamples(
            self.path, self.file_samples, self.file_variants, samples=self.samples,
            variants=variants,
        )  # fmt: skip

    def _rows(self, positions: np.ndarray) -> np.ndarray:
        return positions if self.samples is None else self.samples[positions]

    def _chunks(self, positions: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, packed)``: .bed-coded rows of the samples at ``positions`` only, (c,
        ceil(k/4)) uint8, for chunks of the used variants (``start`` counts used variants)."""
        rows = self._rows(np.asarray(positions, dtype=np.int64))
        k = len(rows)
        per_variant = (self.file_samples + 3) // 4
        # A run of samples starting on a byte boundary is a byte range of every row.
        contiguous = k > 0 and rows[0] % 4 == 0 and bool(np.all(np.diff(rows) == 1))
        b0, b1 = (int(rows[0]) // 4, (int(rows[-1]) + 4) // 4) if contiguous else (0, 0)
        chunk = max(1, min(self.file_variants, READ_BYTES // max(per_variant, 1)))
        page = mmap.ALLOCATIONGRANULARITY
        done = 0
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for v0 in range(0, self.file_variants, chunk):
                v1 = min(v0 + chunk, self.file_variants)
                if self.variants is None:
                    picked = None
                else:
                    lo, hi = np.searchsorted(self.variants, [v0, v1])
                    if lo == hi:
                        continue
                    picked = self.variants[lo:hi] - v0
                offset = 3 + v0 * per_variant
                base = offset - offset % page
                length = offset - base + (v1 - v0) * per_variant
                with mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=base) as mapped:
                    view = np.frombuffer(mapped, np.uint8, (v1 - v0) * per_variant, offset - base)
                    raw = view.reshape(v1 - v0, per_variant)
                    if picked is not None:
                        raw = raw[picked]  # a copy of the used rows
                    if contiguous:
                        packed = raw[:, b0:b1].copy()
                    else:
                        packed = np.empty((raw.shape[0], (k + 3) // 4), np.uint8)
                        _gather_bed(np.ascontiguousarray(raw), rows, packed)
                    del view, raw  # the map closes only once no array looks into it
                yield done, packed
                done += packed.shape[0]
        finally:
            os.close(fd)

    def counts(self) -> np.ndarray:
        """(M, 4) int64 per used variant over the used samples: two copies of A1, missing, het,
        none (:func:`models.genome._cpu.bed_genotype_counts`), in one pass over the .bed."""
        out = np.zeros((self.n_variants, 4), np.int64)
        for start, packed in self._chunks(np.arange(self.n)):
            genome_cpu._bed_genotype_counts(
                packed, self.n, genome_cpu._BED_COUNT_TABLE, out[start : start + packed.shape[0]]
            )
        return out

    def split(self) -> Split:
        """(rare, flip) per used variant by the whole cohort's counts; computed once."""
        if self._split is None:
            self._split = genome_cpu.classify(self.counts(), self.n)
        return self._split

    def planes(self, start: int, stop: int, split: Split, rare: bool = True) -> genome_cpu.Planes:
        """The planes of samples ``start:stop``; the last :data:`CACHED_BLOCKS` are kept."""
        key = (start, stop, rare)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        positions = np.arange(start, stop)
        planes = genome_cpu.planes_from_raw(self._chunks(positions), stop - start, split, rare)
        self._cache[key] = planes
        while len(self._cache) > CACHED_BLOCKS:
            self._cache.popitem(last=False)
        return planes

    def codes(self, positions: np.ndarray) -> np.ndarray:
        """(k, M) int8 dosages of A1, -1 missing, of the samples at ``positions``."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.n_variants), np.int8)
        for start, packed in self._chunks(positions):
            decoded = np.empty((packed.shape[0], len(positions)), np.int8)
            genome_cpu._decode_bed(packed, genome_cpu._BED_TABLE, len(positions), decoded)
            _transpose_into(decoded, out, start)
        return out


@dataclass
class DosageSamples:
    """Samples already in memory as (N, M) dosages (query samples read from a VCF or a .bed)."""

    dosages: np.ndarray  # (N, M) int8, negative = missing
    _cache: dict[tuple[int, int, bool], genome_cpu.Planes] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.dosages.shape[0])

    @property
    def n_variants(self) -> int:
        return int(self.dosages.shape[1])

    def planes(self, start: int, stop: int, split: Split, rare: bool = True) -> genome_cpu.Planes:
        key = (start, stop, rare)
        if key not in self._cache:
            block = genome._int8_codes(self.dosages[start:stop], "query")
            self._cache.clear()
            self._cache[key] = genome_cpu.cohort_from_dosages(block, split if rare else None)
        return self._cache[key]

    def codes(self, positions: np.ndarray) -> np.ndarray:
        return np.maximum(self.dosages[np.asarray(positions, dtype=np.int64)], -1)


# --- a tile -----------------------------------------------------------------------------------


def king_tile(rows: genome_cpu.Planes, cols: genome_cpu.Planes | None) -> np.ndarray:
    """KING-robust kinship of every row sample against every column sample.

    Parameters
    ----------
    rows, cols
        The two blocks' planes, split alike; ``cols=None`` for a block against itself.

    Returns
    -------
    np.ndarray
        (B_r, B_c) float64, as ``plink2 --make-king`` computes it (0.5 on a block's own diagonal).

    Raises
    ------
    models.genome._cpu.TooManyMissing
        A sample misses more calls than the kernel's 16-bit corrections hold.
    """
    return genome_cpu.counts_metric("king", rows, cols)


def _king_counter(rows: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
    """KING with int32 counters (:class:`models.genome._bits.Counter`), for samples with more
    missing calls than :func:`king_tile` holds; ``cols=None`` for a block against itself."""
    against = rows if cols is None else cols
    chunk = genome.DEFAULT_VARIANT_CHUNK
    out = genome._pairwise_counter("king", rows, against, None, chunk)
    if cols is None:
        np.fill_diagonal(out, 0.5)
    return out


def pair_degrees(kinship: np.ndarray) -> list[str]:
    """Each pair's KING degree (:func:`models.genome.io.output.kinship_degree`): "unrelated"
    below third degree, "unknown" for a NaN kinship (no heterozygous call to judge by)."""
    k = np.asarray(kinship, np.float64)
    names = kinship_degree(k).tolist()
    return [
        d or ("unknown" if nan else "unrelated")
        for d, nan in zip(names, np.isnan(k).tolist(), strict=True)
    ]


@dataclass
class PairTable:
    """Pairs of samples with their KING kinship and plink2's ``.kin0`` counts.

    ``row`` and ``col`` are sample positions (row side, column side: the same cohort for all
    pairs, with ``row < col``; query samples against the cohort in query mode).
    """

    row: np.ndarray  # (P,) int64
    col: np.ndarray  # (P,) int64
    kinship: np.ndarray  # (P,) float64
    counts: np.ndarray  # (P, 3) int64: NSNP, HETHET, IBS0 (counts, not yet proportions)

    @classmethod
    def empty(cls) -> PairTable:
        return cls(
            np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 3), np.int64)
        )

    @classmethod
    def concat(cls, tables: Sequence[PairTable]) -> PairTable:
        if not tables:
            return cls.empty()
        return cls(
            np.concatenate([t.row for t in tables]),
            np.concatenate([t.col for t in tables]),
            np.concatenate([t.kinship for t in tables]),
            np.concatenate([t.counts for t in tables]).reshape(-1, 3),
        )

    def __len__(self) -> int:
        return len(self.row)

    def degrees(self) -> list[str]:
        """Each pair's KING degree (:func:`pair_degrees`)."""
        return pair_degrees(self.kinship)

    def sorted(self, *, query: bool = False) -> PairTable:
        """In plink2's ``.kin0`` order: by the later sample, then the earlier (all pairs); by
        query sample, then cohort sample (query mode)."""
        order = np.lexsort((self.row, self.col) if not query else (self.col, self.row))
        return PairTable(self.row[order], self.col[order], self.kinship[order], self.counts[order])


def kept(kinship: np.ndarray, cutoff: float) -> np.ndarray:
    """The pairs ``--king-table-filter cutoff`` writes: kinship ≥ the cut-off, and NaN.

    A pair's KING-robust kinship is NaN (0/0) where neither sample has a heterozygous call among
    the variants both call (no such variant at all, or no heterozygote): plink2 drops a pair only
    when ``kinship < filter``, which a NaN never is, so it writes the pair with ``nan``."""
    return (kinship >= cutoff) | np.isnan(kinship)


def degree_counts(kinship: np.ndarray | Sequence[str]) -> dict[str, int]:
    """How many pairs fall in each KING degree (:data:`DEGREES`), from kinships or degree names."""
    names = pair_degrees(kinship) if isinstance(kinship, np.ndarray) else list(kinship)
    return {d: names.count(d) for d in DEGREES}


def tile_pairs(
    rows: Samples,
    cols: Samples,
    tile: Tile,
    split: Split,
    *,
    cutoff: float = DEFAULT_CUTOFF,
    all_pairs: bool = True,
    device: str = "cpu",
) -> PairTable:
    """The pairs of one tile with kinship ≥ ``cutoff`` or NaN (plink2's ``--king-table-filter``:
    :func:`kept`).

    Parameters
    ----------
    rows, cols
        The row and column samples (the same object for all pairs of one cohort).
    tile
        Positions of its row and column blocks.
    split
        (rare, flip) per variant, the same for both sides (:meth:`BedSamples.split`).
    all_pairs
        The tile is part of a cohort's triangle: on a diagonal tile keep only row < column.
    device
        ``"cpu"``: the bit-plane kernel (:func:`king_tile`); ``"cuda"``: the blocks' dosages
        through integer GEMMs on the GPU (:func:`models.genome._pairs_gpu.king_tile_gemm`).

    Returns
    -------
    PairTable
        With global positions, in row-major order of the tile.
    """
    r0, r1, c0, c1 = tile.row_start, tile.row_end, tile.col_start, tile.col_end
    diagonal = all_pairs and tile.diagonal
    block = None
    if device != "cpu":
        from models.genome._pairs_gpu import king_tile_pairs_gemm  # torch, for this engine only

        q = rows.codes(np.arange(r0, r1))
        a = None if diagonal else cols.codes(np.arange(c0, c1))
        r, c, kinship = king_tile_pairs_gemm(q, a, cutoff=cutoff, device=device)
        row, col = r.astype(np.int64) + r0, c.astype(np.int64) + c0
        return PairTable(row, col, kinship, pair_counts(rows, cols, row, col))
    for rare in (True, False):  # as models.genome.api._pairwise_cpu: lists, then dense planes only
        p_rows = rows.planes(r0, r1, split, rare)
        p_cols = None if diagonal else cols.planes(c0, c1, split, rare)
        try:
            block = king_tile(p_rows, p_cols)
            break
        except genome_cpu.TooManyMissing:
            del p_rows, p_cols
    if block is None:  # past the 16-bit fields: int32 counters over the blocks' dosages
        q = rows.codes(np.arange(r0, r1))
        block = _king_counter(q, None if diagonal else cols.codes(np.arange(c0, c1)))
    keep = kept(block, cutoff)
    if diagonal:
        keep = np.triu(keep, k=1)
    r, c = np.nonzero(keep)
    kinship = block[r, c]
    del block, keep
    row, col = r.astype(np.int64) + r0, c.astype(np.int64) + c0
    return PairTable(row, col, kinship, pair_counts(rows, cols, row, col))


def pair_counts(rows: Samples, cols: Samples, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """(P, 3) NSNP, HETHET, IBS0 of the pairs (``row[p]``, ``col[p]``), from those samples' calls
    only (:func:`models.genome.io.output.king_pair_counts`)."""
    if not len(row):
        return np.zeros((0, 3), np.int64)
    row_ids, row_at = np.unique(row, return_inverse=True)
    col_ids, col_at = np.unique(col, return_inverse=True)
    codes = np.concatenate([rows.codes(row_ids), cols.codes(col_ids)])
    pairs = np.stack([row_at, col_at + len(row_ids)], axis=1)
    return king_pair_counts(codes, pairs.tolist())


def king_pairs(
    cohort: Samples,
    *,
    query: Samples | None = None,
    cutoff: float = DEFAULT_CUTOFF,
    block: int | None = None,
    split: Split | None = None,
) -> PairTable:
    """Every pair with kinship ≥ ``cutoff`` (or NaN: :func:`kept`), tile by tile in this process.

    Parameters
    ----------
    cohort
        The cohort (:class:`BedSamples`, or :class:`DosageSamples`).
    query
        New samples to compare against the cohort only (query mode); None for all pairs.
    cutoff
        Keep kinship ≥ this (``--king-table-filter``).
    block
        Samples per block (default :func:`default_block`).
    split
        (rare, flip) per variant; by default the cohort's (:meth:`BedSamples.split`).

    Returns
    -------
    PairTable
        In ``.kin0`` order (:meth:`PairTable.sorted`).
    """
    block = block or default_block(cohort.n_variants)
    if split is None:
        if isinstance(cohort, BedSamples):
            split = cohort.split()
        else:
            x = genome._int8_codes(cohort.codes(np.arange(cohort.n)), "cohort")
            split = genome_cpu.classify(genome_cpu.dosage_counts(x), cohort.n)
    rows = cohort if query is None else query
    tiles = (
        triangle_tiles(cohort.n, block)
        if query is None
        else rectangle_tiles(query.n, cohort.n, block)
    )
    found = [
        tile_pairs(rows, cohort, t, split, cutoff=cutoff, all_pairs=query is None) for t in tiles
    ]
    return PairTable.concat(found).sorted(query=query is not None)


def bed_samples(
    prefix: str | Path,
    *,
    keep: Sequence[str | tuple[str, str]] | None = None,
    min_maf: float | None = None,
) -> tuple[BedSamples, genome.FilesetInfo]:
    """A fileset as :class:`BedSamples` with ``keep`` samples and the variants plink2's KING
    uses: those on an autosome (:func:`models.genome.cohort.autosomal`) of at least ``min_maf``
    (as :func:`models.genome.api.read_bed`, without reading the genotypes), and its ids."""
    from models.genome.cohort import autosomal, keep_rows
    from models.genome.io.plink import maf_columns

    info = genome.inspect_bed(prefix)
    bed = genome._plink_paths(prefix)[0]
    rows = None if keep is None else np.asarray(keep_rows(info.fid, info.iid, keep), np.int64)
    source = BedSamples(bed, len(info.iid), info.n_variants, samples=rows)
    used = np.arange(info.n_variants, dtype=np.int64)
    if info.chrom and not (on := autosomal(info.chrom)).all():
        used = np.flatnonzero(on).astype(np.int64)
        source = source.with_variants(used)
    kept = np.arange(len(info.iid), dtype=np.int64) if rows is None else rows
    founders = kept[np.array(info.founder, dtype=bool)[kept]] if info.founder else kept
    if min_maf is not None and len(founders):  # over the kept founders, as plink2 --maf
        counting = BedSamples(bed, len(info.iid), info.n_variants, samples=founders, variants=used)
        counts = counting.counts()
        with np.errstate(invalid="ignore", divide="ignore"):
            p = (2 * counts[:, 0] + counts[:, 2]) / (2.0 * (counting.n - counts[:, 1]))
        source = source.with_variants(used[maf_columns(p, min_maf)])
    return source, info


__all__ = [
    "DEFAULT_CUTOFF",
    "DUPLICATE_MIN_KINSHIP",
    "FIRST_DEGREE_MIN_KINSHIP",
    "SECOND_DEGREE_MIN_KINSHIP",
    "THIRD_DEGREE_MIN_KINSHIP",
    "BedSamples",
    "DosageSamples",
    "PairTable",
    "Tile",
    "bed_samples",
    "default_block",
    "degree_counts",
    "kept",
    "king_pairs",
    "king_tile",
    "pair_degrees",
    "rectangle_tiles",
    "tile_pairs",
    "triangle_tiles",
]
