"""The CPU engine for ``grm``, ``king`` and ``ibs``: numpy, numba and BLAS, no torch.

KING and IBS (:mod:`models.genome._bits` explains the counts): the pair kernel counts two popcounts
per pair and 64 variants from each sample's ``het`` and ``hom`` bit planes, reading a missing call
as no copies, and finishes each pair in place: the per-pair corrections that take the missing calls
back out are written into the output slots beforehand, as four uint16 fields (KING) or two uint16
and one uint32 (IBS) in each float64 slot, so no N x N integer array is ever held:

- ``Hc(o→j)``: heterozygous calls of j at o's missing variants;
- ``W(o→j)``: Σ over o's missing variants of ``hom_weight·[x_j = 2] + [x_j = 1]``;
- ``joint``: the (weighted) count of variants both samples miss (IBS).

The corrections are computed per block of 64 samples: the block's planes are transposed to one
64-bit mask per variant, and each owner's missing variants add those masks into bit-sliced
counters (a Harley-Seal carry-save tree: about five logic operations per missing call and
plane, for 64 samples at once).

Rare variants (few carriers of the minor allele; :data:`RARE_COST`) stay out of the planes, as
PLINK 2's "initial scan" keeps them out of its dense pass: each adds a per-sample total and, into
the same correction fields, a term for each pair of its carriers and for each carrier and sample
missing the call (:class:`Rare`). Where those terms could overflow a uint16 field, the caller
retries with every variant in the planes, then with :class:`models.genome._bits.Counter`.

A square result is either a full (N, N) array, computed on and below the diagonal and mirrored,
or a packed lower triangle (N(N+1)/2 float64, half the memory) written out as the square by
:func:`write_square`. Planes come straight from a .bed's bytes (:func:`cohort_from_bed`) or from
sample-major int8 dosages (:func:`cohort_from_dosages`).

GRM: the standardized genotypes of each variant chunk go through BLAS ``dsyrk`` (``dgemm`` for a
rectangle) straight into the float64 numerator, and the variants called in both samples come from
each variant's list of samples missing it. The same arithmetic as the GEMM engine, so KING and IBS
agree with it bit for bit and the GRM to rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numba
import numpy as np
from numba import njit, prange

from models.genome._bits import _BLOCK, WORD, _joint_missing, _pair2, _popcount

#: Variants per chunk when building planes and standardized GRM blocks.
CHUNK = 1024
#: PLINK 2 treats a variant as monomorphic when 2p(1-p) falls below kSmallEpsilon and gives it a
#: zero column (plink2_matrix_calc.cc, ExpandCenteredVarmaj); it still counts in the denominators.
_MONOMORPHIC_VARIANCE = 2.0**-44

_KING, _IBS = 0, 1


class TooManyMissing(ValueError):
    """A sample has more missing calls than the correction fields hold."""


def _uint32_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    """PLINK 1.9's integer weights (their sum is below 2³²) or ones, as uint32."""
    return np.ones(n, np.uint32) if weights is None else weights.astype(np.uint32)


# --- planes ------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _missing_lists(miss):
    """CSR of each sample's missing variants (ascending, int32) from its missing-call plane."""
    n, words = miss.shape
    starts = np.zeros(n + 1, np.int64)
    for i in prange(n):
        k = 0
        for w in range(words):
            k += _popcount(miss[i, w])
        starts[i + 1] = k
    for i in range(n):
        starts[i + 1] += starts[i]
    variants = np.empty(starts[n], np.int32)
    for i in prange(n):
        k = starts[i]
        for w in range(words):
            bits = miss[i, w]
            while bits:
                low = bits & (~bits + np.uint64(1))
                variants[k] = w * WORD + _popcount(low - np.uint64(1))
                k += 1
                bits ^= low
    return starts, variants


@njit(cache=True)
def _by_variant(starts, variants, n_variants):
    """CSR of each variant's missing samples (ascending), from the per-sample lists."""
    n = starts.shape[0] - 1
    v_starts = np.zeros(n_variants + 1, np.int64)
    for t in range(variants.shape[0]):
        v_starts[variants[t] + 1] += 1
    for v in range(n_variants):
        v_starts[v + 1] += v_starts[v]
    fill = v_starts[:-1].copy()
    samples = np.empty(variants.shape[0], np.int32)
    for i in range(n):
        for t in range(starts[i], starts[i + 1]):
            v = variants[t]
            samples[fill[v]] = i
            fill[v] += 1
    return v_starts, samples


@dataclass
class Planes:
    """One side's calls as bit planes, with each sample's missing variants."""

    het: np.ndarray  # (N, words) uint64: one copy of A1
    hom: np.ndarray  # (N, words) uint64: two copies
    n_het: np.ndarray  # (N,) int64
    miss_starts: np.ndarray  # (N + 1,) int64
    miss_variants: np.ndarray  # int32, ascending within each sample
    n_variants: int  # variants in the planes
    #: With rare variants taken out (:func:`cohort_from_bed`): the cohort's index of each variant
    #: in the planes, and the rare ones as lists of carriers.
    variants: np.ndarray | None = None
    rare: Rare | None = None

    @property
    def n(self) -> int:
        return int(self.het.shape[0])

    def max_missing(self) -> int:
        counts = np.diff(self.miss_starts)
        if self.rare is not None:
            counts = counts + self.rare.missing_per_sample(self.n)
        return int(counts.max()) if self.n else 0

    def plane_weights(self, weights: np.ndarray | None) -> np.ndarray | None:
        if weights is None or self.variants is None:
            return weights
        return weights[self.variants]

    def n_missing(self, weights: np.ndarray | None) -> np.ndarray:
        """(N,) float64: missing calls, or the sum of their variants' weights (all variants; the
        weights are integers, so every order of summing gives the same float64)."""
        out = np.zeros(self.n, np.float64)
        ones = np.ones(self.n_variants, np.float64)
        dense = self.plane_weights(weights)
        _owner_sums(self.miss_starts, self.miss_variants, ones if dense is None else dense, out)
        if self.rare is not None:
            r = self.rare
            w = np.ones(len(r.variants)) if weights is None else weights[r.variants]
            _variant_sums(r.m_starts, r.m_samples, w.astype(np.float64), out)
        return out

    def by_variant(self) -> tuple[np.ndarray, np.ndarray]:
        return _by_variant(self.miss_starts, self.miss_variants, self.n_variants)

    def rows(self, start: int, stop: int) -> Planes:
        """The planes of samples ``start…stop`` (views of the planes; the lists re-indexed)."""
        s = self.miss_starts
        return Planes(
            het=self.het[start:stop],
            hom=self.hom[start:stop],
            n_het=self.n_het[start:stop],
            miss_starts=s[start : stop + 1] - s[start],
            miss_variants=self.miss_variants[s[start] : s[stop]],
            n_variants=self.n_variants,
            variants=self.variants,
            rare=None if self.rare is None else self.rare.rows(start, stop),
        )


@njit(cache=True)
def _owner_sums(starts, index, weights, out):
    """``out[o] += Σ weights[index[t]]`` over owner o's entries of a CSR."""
    for o in range(starts.shape[0] - 1):
        total = 0.0
        for t in range(starts[o], starts[o + 1]):
            total += weights[index[t]]
        out[o] += total


@njit(cache=True)
def _variant_sums(starts, samples, weights, out):
    """``out[s] += weights[v]`` for every sample s listed under variant v."""
    for v in range(starts.shape[0] - 1):
        for t in range(starts[v], starts[v + 1]):
            out[samples[t]] += weights[v]


@njit(cache=True)
def _carrier_totals(samples, copies, hom_weight, base, het):
    for t in range(samples.shape[0]):
        if copies[t] == 1:
            base[samples[t]] += 1
            het[samples[t]] += 1
        else:
            base[samples[t]] += hom_weight


@dataclass
class Rare:
    """Variants with few carriers of their minor allele, as lists: PLINK 2's "initial scan".

    A pair meets at such a variant only if one of them carries the minor allele, so its
    contribution to the pair's distance is a per-sample total plus a term for each pair of carriers
    (and of carrier and missing call): Σ k² work for k carriers, where the planes would cost N²/64.
    Genotypes are counted in minor-allele copies (1 het, 2 hom); KING and IBS do not change when
    a variant's alleles are swapped.
    """

    variants: np.ndarray  # (R,) the cohort's index of each rare variant
    c_starts: np.ndarray  # (R + 1,) int64
    c_samples: np.ndarray  # int32, ascending within each variant: the carriers
    c_copies: np.ndarray  # int8: 1 or 2 copies of the minor allele
    m_starts: np.ndarray  # (R + 1,) int64
    m_samples: np.ndarray  # int32, ascending: the samples missing the call

    def rows(self, start: int, stop: int) -> Rare:
        """The carriers and missing calls of samples ``start…stop``, renumbered from 0."""

        def part(starts: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            keep = (samples >= start) & (samples < stop)
            kept = np.concatenate([[0], np.cumsum(keep)])[starts]  # kept entries before each start
            return kept.astype(np.int64), keep

        c_starts, c_keep = part(self.c_starts, self.c_samples)
        m_starts, m_keep = part(self.m_starts, self.m_samples)
        return Rare(
            variants=self.variants,
            c_starts=c_starts,
            c_samples=(self.c_samples[c_keep] - start).astype(np.int32),
            c_copies=self.c_copies[c_keep],
            m_starts=m_starts,
            m_samples=(self.m_samples[m_keep] - start).astype(np.int32),
        )

    def missing_per_sample(self, n: int) -> np.ndarray:
        return np.bincount(self.m_samples, minlength=n)

    def totals(self, n: int, hom_weight: int) -> tuple[np.ndarray, np.ndarray]:
        """(Σ over rare variants carried of hom_weight·[hom] + [het], heterozygous calls)."""
        base = np.zeros(n, np.int64)
        het = np.zeros(n, np.int64)
        _carrier_totals(self.c_samples, self.c_copies, hom_weight, base, het)
        return base, het

    def carried(self, n: int) -> np.ndarray:
        return np.bincount(self.c_samples, minlength=n)


class PlaneBuilder:
    """Fills :class:`Planes` chunk by chunk (chunks start at multiples of 64 variants)."""

    def __init__(self, n: int, n_variants: int) -> None:
        words = max(1, -(-n_variants // WORD))
        self.n_variants = n_variants
        self.het = np.zeros((n, words), np.uint64)
        self.hom = np.zeros((n, words), np.uint64)
        self.miss = np.zeros((n, words), np.uint64)
        self._rows: np.ndarray | None = None

    def add_bed(self, raw: np.ndarray, start: int) -> None:
        """(c, ceil(N/4)) uint8 rows of a SNP-major .bed."""
        n = self.het.shape[0]
        words = 2 * -(-n // WORD)  # 16 bytes per 64 samples
        if self._rows is None or self._rows.shape[0] < raw.shape[0]:
            self._rows = np.zeros((raw.shape[0], words), np.uint64)
        rows = self._rows[: raw.shape[0]]
        rows.view(np.uint8)[:, : raw.shape[1]] = raw
        _pack_bed(rows, n, self.het, self.hom, self.miss, start // WORD)

    def finish(self) -> Planes:
        starts, variants = _missing_lists(self.miss)
        del self.miss
        self._rows = None
        n_het = _row_popcounts(self.het)
        return Planes(self.het, self.hom, n_het, starts, variants, self.n_variants)


#: A variant is "rare" (left out of the planes, see :class:`Rare`) when its k carriers of the minor
#: allele and m missing calls make at most N² / this pair updates (k(k-1)/2 + k·m), each a random
#: read-modify-write of a slot: measured on a 2-core AVX2 EPYC at N = 4,000, one costs about as
#: much as 1/4,096 of a variant's N²/128 pair-words in the planes (48% of 50,000 msprime variants
#: then go to the lists, and the KING pair work drops from 2.7 s to 1.9 s).
RARE_COST = 4096


def classify(counts: np.ndarray, n: int, rare: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(rare, flip) per variant from its (two copies, missing, het, no copies) counts: ``flip``
    where A1 is the major allele (its minor allele is then A2)."""
    hom2, missing, het, hom0 = counts[:, 0], counts[:, 1], counts[:, 2], counts[:, 3]
    flip = hom2 > hom0
    if not rare:
        return np.zeros(len(counts), np.bool_), flip
    k = het + np.minimum(hom2, hom0)
    return k * (k - 1) // 2 + k * missing <= n * n // RARE_COST, flip


@njit(inline="always")
def _bed_code(row, i):
    return (row[i >> 2] >> ((i & 3) << 1)) & 3


@njit(inline="always")
def _bed_rare_row(row, n, flip, fill, c_samples, c_copies, m_samples, k, t):
    """Carriers and missing samples of one rare variant's .bed row, skipping the bytes whose four
    samples all hold the major homozygote (0x00 where A1 is the major allele, else 0xFF). With
    ``fill`` they are written from ``c_samples[k]``/``c_copies[k]`` and ``m_samples[t]`` on;
    either way the ends (k, t) come back, so a pass without ``fill`` counts them."""
    full = n // 4
    major = np.uint8(0x00) if flip else np.uint8(0xFF)
    hom_major = 0 if flip else 3
    for b in range(full + (n % 4 > 0)):
        if b < full and row[b] == major:
            continue
        for i in range(4 * b, min(n, 4 * b + 4)):
            code = _bed_code(row, i)
            if code == 1:
                if fill:
                    m_samples[t] = i
                t += 1
            elif code != hom_major:
                if fill:
                    c_samples[k] = i
                    # het (10) is one copy; the minor homozygote two
                    c_copies[k] = 1 if code == 2 else 2
                k += 1
    return k, t


@njit(parallel=True, cache=True)
def _rare_lists_bed(raw, n, flip):
    """Carriers (sample, minor-allele copies) and missing samples of each rare variant, straight
    from .bed rows (:func:`_bed_rare_row`): counted, then written."""
    r = raw.shape[0]
    c_counts = np.zeros(r, np.int64)
    m_counts = np.zeros(r, np.int64)
    no_samples = np.empty(0, np.int32)
    no_copies = np.empty(0, np.int8)
    for v in prange(r):
        c_counts[v], m_counts[v] = _bed_rare_row(
            raw[v], n, flip[v], False, no_samples, no_copies, no_samples, 0, 0
        )
    c_starts = np.zeros(r + 1, np.int64)
    m_starts = np.zeros(r + 1, np.int64)
    for v in range(r):
        c_starts[v + 1] = c_starts[v] + c_counts[v]
        m_starts[v + 1] = m_starts[v] + m_counts[v]
    c_samples = np.empty(c_starts[r], np.int32)
    c_copies = np.empty(c_starts[r], np.int8)
    m_samples = np.empty(m_starts[r], np.int32)
    for v in prange(r):
        _bed_rare_row(
            raw[v], n, flip[v], True, c_samples, c_copies, m_samples, c_starts[v], m_starts[v]
        )
    return c_counts, c_samples, c_copies, m_counts, m_samples


# --- sample-major int8 dosages (what read_bed returns; any negative value is a missing call) ----


@njit(parallel=True, cache=True)
def _first_above_two(x):
    """The first value above 2 in an int8 matrix, or 0 when there is none."""
    n = x.shape[0]
    found = np.zeros(n, np.int8)
    for i in prange(n):
        for v in range(x.shape[1]):
            if x[i, v] > 2:
                found[i] = x[i, v]
                break
    for i in range(n):
        if found[i]:
            return found[i]
    return np.int8(0)


@njit(parallel=True, cache=True)
def _sm_counts(x, threads, out):
    """(M, 4) per variant: two copies, missing, het, none; rows read in order, per-thread
    counts over interleaved row stripes, added up at the end."""
    n, m = x.shape
    parts = np.zeros((threads, m, 4), np.int64)
    for part in prange(threads):
        for i in range(part, n, threads):
            row = x[i]
            for v in range(m):
                c = row[v]
                if c < 0:
                    parts[part, v, 1] += 1
                elif c == 2:
                    parts[part, v, 0] += 1
                elif c == 1:
                    parts[part, v, 2] += 1
                else:
                    parts[part, v, 3] += 1
    for part in range(threads):
        out += parts[part]


@njit(parallel=True, cache=True)
def _pack_columns(x, cols, het, hom, miss):
    """Planes of the variants ``cols`` (in that order) of sample-major int8 dosages."""
    n = x.shape[0]
    k = cols.shape[0]
    for i in prange(n):
        row = x[i]
        for w in range((k + WORD - 1) // WORD):
            h = np.uint64(0)
            a = np.uint64(0)
            m = np.uint64(0)
            for b in range(min(WORD, k - w * WORD)):
                c = row[cols[w * WORD + b]]
                shift = np.uint64(b)
                h |= np.uint64(c == 1) << shift
                a |= np.uint64(c == 2) << shift
                m |= np.uint64(c < 0) << shift
            het[i, w] = h
            hom[i, w] = a
            miss[i, w] = m


@njit(inline="always")
def _columns_rare_rows(x, cols, flip, i0, i1, fill, c_samples, c_copies, m_samples, c_at, m_at):
    """Carriers and missing samples among rows i0..i1 of sample-major int8 dosages, for the
    variants ``cols``: variant k's go from ``c_at[k]``/``m_at[k]`` on (written with ``fill``),
    which are left at their ends, so a pass without ``fill`` from zeros counts them."""
    for i in range(i0, i1):
        row = x[i]
        for k in range(cols.shape[0]):
            c = row[cols[k]]
            if c < 0:
                if fill:
                    m_samples[m_at[k]] = i
                m_at[k] += 1
            else:
                copies = 2 - c if flip[k] else c
                if copies > 0:
                    if fill:
                        c_samples[c_at[k]] = i
                        c_copies[c_at[k]] = copies
                    c_at[k] += 1


@njit(parallel=True, cache=True)
def _rare_lists_columns(x, cols, flip, threads):
    """Carriers (sample, minor-allele copies) and missing samples of the variants ``cols`` of
    sample-major int8 dosages (:func:`_columns_rare_rows`: counted, then written). Threads take
    stripes of rows in order, so each variant's samples come out ascending: thread t's go after
    those of threads before it."""
    n = x.shape[0]
    r = cols.shape[0]
    stripe = (n + threads - 1) // threads
    c_counts = np.zeros((threads, r), np.int64)
    m_counts = np.zeros((threads, r), np.int64)
    no_samples = np.empty(0, np.int32)
    no_copies = np.empty(0, np.int8)
    for part in prange(threads):
        i0, i1 = part * stripe, min(n, (part + 1) * stripe)
        c_at, m_at = c_counts[part], m_counts[part]
        _columns_rare_rows(
            x, cols, flip, i0, i1, False, no_samples, no_copies, no_samples, c_at, m_at
        )
    c_next = np.zeros((threads, r), np.int64)
    m_next = np.zeros((threads, r), np.int64)
    c_total = 0
    m_total = 0
    for k in range(r):
        for part in range(threads):
            c_next[part, k] = c_total
            m_next[part, k] = m_total
            c_total += c_counts[part, k]
            m_total += m_counts[part, k]
    c_samples = np.empty(c_total, np.int32)
    c_copies = np.empty(c_total, np.int8)
    m_samples = np.empty(m_total, np.int32)
    for part in prange(threads):
        i0, i1 = part * stripe, min(n, (part + 1) * stripe)
        c_at, m_at = c_next[part], m_next[part]
        _columns_rare_rows(x, cols, flip, i0, i1, True, c_samples, c_copies, m_samples, c_at, m_at)
    return c_counts.sum(axis=0), c_samples, c_copies, m_counts.sum(axis=0), m_samples


def dosage_counts(x: np.ndarray) -> np.ndarray:
    """(M, 4) int64 of sample-major int8 dosages: two copies, missing, het, none."""
    threads = numba.get_num_threads()
    out = np.zeros((x.shape[1], 4), np.int64)
    _sm_counts(x, threads, out)
    return out


def cohort_from_dosages(x: np.ndarray, split: tuple[np.ndarray, np.ndarray] | None) -> Planes:
    """Planes of sample-major int8 dosages (negative: missing); with a ``split`` (rare, flip) per
    variant (:func:`classify`), of the common variants only, the rare ones as lists."""
    n, m = x.shape
    dense = np.arange(m) if split is None else np.flatnonzero(~split[0])
    builder = PlaneBuilder(n, len(dense))
    _pack_columns(x, dense, builder.het, builder.hom, builder.miss)
    planes = builder.finish()
    if split is not None:
        is_rare, flip = split
        rare = np.flatnonzero(is_rare)
        rares = RareBuilder()
        if len(rare):
            lists = _rare_lists_columns(x, rare, flip[rare], numba.get_num_threads())
            rares.parts.append((rare, *lists))
        planes.variants, planes.rare = dense, rares.finish()
    return planes


class RareBuilder:
    """Collects :class:`Rare` from variant-major int8 code rows, in the cohort's variant order."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add_bed(self, raw: np.ndarray, n: int, variants: np.ndarray, flip: np.ndarray) -> None:
        """(r, ceil(n/4)) .bed rows of the rare variants ``variants``."""
        if len(variants):
            self.parts.append((variants, *_rare_lists_bed(raw, n, flip)))

    def finish(self) -> Rare:
        def cat(k: int, dtype: type) -> np.ndarray:
            return np.concatenate([p[k] for p in self.parts]) if self.parts else np.zeros(0, dtype)

        variants, c_counts, m_counts = cat(0, np.int64), cat(1, np.int64), cat(4, np.int64)
        return Rare(
            variants=variants,
            c_starts=np.concatenate([[0], np.cumsum(c_counts)]).astype(np.int64),
            c_samples=cat(2, np.int32),
            c_copies=cat(3, np.int8),
            m_starts=np.concatenate([[0], np.cumsum(m_counts)]).astype(np.int64),
            m_samples=cat(5, np.int32),
        )


@njit(parallel=True, cache=True)
def _row_popcounts(planes):
    out = np.zeros(planes.shape[0], np.int64)
    for i in prange(planes.shape[0]):
        k = np.uint64(0)
        for w in range(planes.shape[1]):
            k += _popcount(planes[i, w])
        out[i] = k
    return out


# --- the .bed, decoded -------------------------------------------------------------------------


def _bed_table() -> np.ndarray:
    """Byte → 4 int8 codes (A1 dosage, -1 missing): .bed 00 = 2 copies, 10 = 1, 11 = 0, 01 = -1."""
    code = np.array([2, -1, 1, 0], dtype=np.int8)
    byte = np.arange(256)
    return np.stack([code[(byte >> (2 * k)) & 3] for k in range(4)], axis=1).astype(np.int8)


_BED_TABLE = _bed_table()


@njit(parallel=True, cache=True)
def _decode_bed(raw, table, n, out):
    """``out[v, :n]`` = the codes of variant v from its ``ceil(n/4)`` .bed bytes."""
    for v in prange(raw.shape[0]):
        row = raw[v]
        for b in range(n // 4):
            t = table[row[b]]
            out[v, 4 * b] = t[0]
            out[v, 4 * b + 1] = t[1]
            out[v, 4 * b + 2] = t[2]
            out[v, 4 * b + 3] = t[3]
        for i in range(4 * (n // 4), n):
            out[v, i] = table[row[i // 4], i % 4]


def iter_bed_raw(
    bed_path: str | Path, n: int, n_variants: int, chunk: int = CHUNK
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, raw)``: the (c, ceil(n/4)) uint8 rows of a SNP-major .bed, chunk by chunk,
    read straight from the file (the whole matrix is never held)."""
    per_variant = (n + 3) // 4
    with open(bed_path, "rb") as handle:
        handle.seek(3)
        for start in range(0, n_variants, chunk):
            c = min(chunk, n_variants - start)
            raw = np.frombuffer(handle.read(c * per_variant), np.uint8)
            if raw.size != c * per_variant:
                raise ValueError(f"{bed_path}: truncated at variant {start}")
            yield start, raw.reshape(c, per_variant)


def iter_bed(
    bed_path: str | Path, n: int, n_variants: int, chunk: int = CHUNK
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, codes)``: variant-major int8 codes (c, n), -1 missing, chunk by chunk."""
    out = np.empty((chunk, n), np.int8)
    for start, raw in iter_bed_raw(bed_path, n, n_variants, chunk):
        _decode_bed(raw, _BED_TABLE, n, out)
        yield start, out[: raw.shape[0]]


@njit(inline="always")
def _even_bits(x):
    """The 32 even-position bits of ``x``, packed into the low half (a software pext)."""
    x &= np.uint64(0x5555555555555555)
    x = (x | (x >> np.uint64(1))) & np.uint64(0x3333333333333333)
    x = (x | (x >> np.uint64(2))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    x = (x | (x >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x | (x >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    return (x | (x >> np.uint64(16))) & np.uint64(0x00000000FFFFFFFF)


@njit(parallel=True, cache=True)
def _pack_bed(rows, n, het, hom, miss, word0):
    """Planes straight from .bed rows, as uint64 words (c, 2·ceil(n/64)): two words hold 64
    samples' 2-bit codes (00 two copies of A1, 10 one, 11 none, 01 missing). Each variant gives
    one 64-sample mask per plane; 64 of them are transposed into the samples' plane words."""
    c = rows.shape[0]
    low = np.uint64(0x5555555555555555)
    for block in prange((n + WORD - 1) // WORD):
        i0 = block * WORD
        lanes = min(WORD, n - i0)
        keep = (
            np.uint64(0xFFFFFFFFFFFFFFFF)
            if lanes == WORD
            else ((np.uint64(1) << np.uint64(lanes)) - np.uint64(1))
        )
        th = np.zeros(WORD, np.uint64)
        ta = np.zeros(WORD, np.uint64)
        tm = np.zeros(WORD, np.uint64)
        for w in range((c + WORD - 1) // WORD):
            th[:] = 0
            ta[:] = 0
            tm[:] = 0
            v0 = w * WORD
            for b in range(min(WORD, c - v0)):
                x0 = rows[v0 + b, 2 * block]
                x1 = rows[v0 + b, 2 * block + 1]
                lo0, hi0 = x0 & low, (x0 >> np.uint64(1)) & low
                lo1, hi1 = x1 & low, (x1 >> np.uint64(1)) & low
                th[b] = (_even_bits(hi0 & ~lo0) | (_even_bits(hi1 & ~lo1) << np.uint64(32))) & keep
                ta[b] = (
                    _even_bits(~(hi0 | lo0)) | (_even_bits(~(hi1 | lo1)) << np.uint64(32))
                ) & keep
                tm[b] = (_even_bits(lo0 & ~hi0) | (_even_bits(lo1 & ~hi1) << np.uint64(32))) & keep
            _transpose64(th)
            _transpose64(ta)
            _transpose64(tm)
            for lane in range(lanes):
                het[i0 + lane, word0 + w] = th[lane]
                hom[i0 + lane, word0 + w] = ta[lane]
                miss[i0 + lane, word0 + w] = tm[lane]


# --- corrections -------------------------------------------------------------------------------


@njit(inline="always")
def _transpose64(a):
    """In place: bit c of row r ↔ bit r of row c (Hacker's Delight, 7-3, for 64 bits)."""
    j = 32
    m = np.uint64(0x00000000FFFFFFFF)
    while j != 0:
        k = 0
        while k < 64:
            t = ((a[k] >> np.uint64(j)) ^ a[k + j]) & m
            a[k + j] ^= t
            a[k] ^= t << np.uint64(j)
            k = (k + j + 1) & ~j
        j >>= 1
        m ^= m << np.uint64(j)


@njit(inline="always")
def _csa(a, b, c):
    """Carry-save adder of three bit vectors: (carry, sum)."""
    u = a ^ b
    return (a & b) | (u & c), u ^ c


@njit(inline="always")
def _ripple(levels, x, k):
    while x:
        t = levels[k] & x
        levels[k] ^= x
        x = t
        k += 1


@njit(inline="always")
def _csa8(masks, variants, t, ones, twos, fours):
    """Eight masks into the carry-save counters: (eights, ones, twos, fours)."""
    c_a, ones = _csa(ones, masks[variants[t]], masks[variants[t + 1]])
    c_b, ones = _csa(ones, masks[variants[t + 2]], masks[variants[t + 3]])
    f_a, twos = _csa(twos, c_a, c_b)
    c_a, ones = _csa(ones, masks[variants[t + 4]], masks[variants[t + 5]])
    c_b, ones = _csa(ones, masks[variants[t + 6]], masks[variants[t + 7]])
    f_b, twos = _csa(twos, c_a, c_b)
    eights, fours = _csa(fours, f_a, f_b)
    return eights, ones, twos, fours


@njit(inline="always")
def _count_masks(hv, av, variants, lo, hi, lh, la):
    """Bit-sliced per-lane counts of ``hv[variants[lo:hi]]`` into ``lh`` and of ``av[…]`` into
    ``la`` (both zeroed): a carry-save tree of 8 inputs per step, the eights rippled on."""
    z = np.uint64(0)
    h1, h2, h4, a1, a2, a4 = z, z, z, z, z, z
    t = lo
    while t + 8 <= hi:
        eights, h1, h2, h4 = _csa8(hv, variants, t, h1, h2, h4)
        _ripple(lh, eights, 3)
        eights, a1, a2, a4 = _csa8(av, variants, t, a1, a2, a4)
        _ripple(la, eights, 3)
        t += 8
    lh[0], lh[1], lh[2] = h1, h2, h4
    la[0], la[1], la[2] = a1, a2, a4
    while t < hi:
        _ripple(lh, hv[variants[t]], 0)
        _ripple(la, av[variants[t]], 0)
        t += 1


@njit(inline="always")
def _lane_values(levels, out):
    """Each lane's count from the bit-sliced levels."""
    top = levels.shape[0]
    while top > 0 and levels[top - 1] == 0:
        top -= 1
    out[:] = 0
    for k in range(top):
        word = levels[k]
        for lane in range(WORD):
            out[lane] |= np.int64((word >> np.uint64(lane)) & np.uint64(1)) << k


@njit(inline="always")
def _slot(r, c, n_cols, packed):
    if packed:
        return r * (r + 1) // 2 + c
    return r * n_cols + c


@njit(parallel=True, cache=True)
def _corrections(
    own_starts, own_vars, blk_het, blk_hom, hom_weight, hc, w_field, mode, n_cols, packed, fields
):
    """Write ``W(o→j)`` (and ``Hc(o→j)`` when ``hc``) for every owner o and block-side sample j.

    ``mode`` 0: one cohort against itself, slot (max, min), owner = row → fields 0/2, else 1/3
    (IBS: W in field ``w_field`` + 0/1). ``mode`` 1: owners are the query rows (slot (o, j),
    owner fields 0/2); ``mode`` 2: owners are the cohort columns (slot (j, o), fields 1/3).
    """
    n_owners = own_starts.shape[0] - 1
    n_blk, words = blk_het.shape
    for block in prange((n_blk + WORD - 1) // WORD):
        j0 = block * WORD
        lanes = min(WORD, n_blk - j0)
        hv = np.zeros(words * WORD, np.uint64)
        av = np.zeros(words * WORD, np.uint64)
        tile = np.zeros(WORD, np.uint64)
        for w in range(words):
            tile[:] = 0
            for lane in range(lanes):
                tile[lane] = blk_het[j0 + lane, w]
            _transpose64(tile)
            hv[w * WORD : (w + 1) * WORD] = tile
            tile[:] = 0
            for lane in range(lanes):
                tile[lane] = blk_hom[j0 + lane, w]
            _transpose64(tile)
            av[w * WORD : (w + 1) * WORD] = tile
        lh = np.zeros(24, np.uint64)
        la = np.zeros(24, np.uint64)
        vh = np.zeros(WORD, np.int64)
        va = np.zeros(WORD, np.int64)
        for o in range(n_owners):
            lo = own_starts[o]
            hi = own_starts[o + 1]
            if lo == hi:
                continue
            lh[:] = 0
            la[:] = 0
            _count_masks(hv, av, own_vars, lo, hi, lh, la)
            _lane_values(lh, vh)
            _lane_values(la, va)
            for lane in range(lanes):
                j = j0 + lane
                if mode == 0:
                    if j == o:
                        continue
                    row_owner = o > j
                    slot = _slot(max(o, j), min(o, j), n_cols, packed)
                    side = 0 if row_owner else 1
                elif mode == 1:
                    slot = _slot(o, j, n_cols, False)
                    side = 0
                else:
                    slot = _slot(j, o, n_cols, False)
                    side = 1
                if hc:
                    fields[4 * slot + side] = vh[lane]
                fields[4 * slot + w_field + side] = hom_weight * va[lane] + vh[lane]


@njit(parallel=True, cache=True)
def _joint_counts(q_starts, q_samples, a_starts, a_samples, weights, symmetric, packed, n_cols,
                  threads, out):  # fmt: skip
    """``out[slot(i, j)] += weight[v]`` for every variant v both i and j miss (i > j when
    ``symmetric``). Threads own interleaved rows, so no two write the same slot."""
    for part in prange(threads):
        for v in range(q_starts.shape[0] - 1):
            w = weights[v]
            for t in range(q_starts[v], q_starts[v + 1]):
                i = q_samples[t]
                if i % threads != part:
                    continue
                if symmetric:
                    for u in range(q_starts[v], t):
                        out[_slot(i, q_samples[u], n_cols, packed)] += w
                else:
                    for u in range(a_starts[v], a_starts[v + 1]):
                        out[_slot(i, a_samples[u], n_cols, False)] += w


# --- the pair kernel, finished in place --------------------------------------------------------


@njit(inline="always", error_model="numpy")
def _finish(metric, ibs0, hethet, b_i, b_j, nh_i, nh_j, f16, f32, slot, own_i, nm_i, nm_j, total,
            n_var):  # fmt: skip
    """The metric of one pair from its counts, its slot's correction fields (``own_i``: the field
    index of owner i; owner j's is ``1 - own_i``), each sample's distance base ``b`` (its het calls
    in the planes, plus its rare variants' total) and heterozygous calls ``nh``."""
    if metric == _KING:
        d = 4 * ibs0 - 2 * hethet + b_i + b_j - f16[4 * slot + 2] - f16[4 * slot + 3]
        het_ij = nh_i - np.int64(f16[4 * slot + 1 - own_i])  # i's hets where j is called
        het_ji = nh_j - np.int64(f16[4 * slot + own_i])
        return 0.5 - np.float64(d) / (4.0 * np.float64(min(het_ij, het_ji)))
    d = 2 * ibs0 - 2 * hethet + b_i + b_j - f16[4 * slot] - f16[4 * slot + 1]
    den = (total - (nm_i + nm_j)) + np.float64(f32[2 * slot + 1])
    return 1.0 - np.float64(d) * (total / den) / (2.0 * n_var)


@njit(parallel=True, cache=True, error_model="numpy")
def _pairs_square(metric, het, hom, base, n_het, n_miss, total, n_var, packed, out, f16, f32):
    """Every pair i < j of one cohort, finished into slot (j, i); blocks of cohort rows j run in
    parallel and meet each earlier row i two at a time."""
    n = het.shape[0]
    for block in prange((n + _BLOCK - 1) // _BLOCK):
        j0 = block * _BLOCK
        j1 = min(n, j0 + _BLOCK)
        for i in range(j1 - 1):
            hi = het[i]
            ai = hom[i]
            for j in range(max(j0, i + 1), j1, 2):
                k = min(j + 1, j1 - 1)
                ibs0_j, hh_j, ibs0_k, hh_k = _pair2(hi, ai, het[j], hom[j], het[k], hom[k])
                s = _slot(j, i, n, packed)
                value = _finish(metric, ibs0_j, hh_j, base[i], base[j], n_het[i], n_het[j], f16,
                                f32, s, 1, n_miss[i], n_miss[j], total, n_var)  # fmt: skip
                out[s] = value
                if k != j:
                    s = _slot(k, i, n, packed)
                    value = _finish(metric, ibs0_k, hh_k, base[i], base[k], n_het[i], n_het[k],
                                    f16, f32, s, 1, n_miss[i], n_miss[k], total, n_var)  # fmt: skip
                    out[s] = value


@njit(parallel=True, cache=True, error_model="numpy")
def _pairs_rect(metric, het_q, hom_q, het_a, hom_a, b_q, b_a, nh_q, nh_a, nm_q, nm_a, total, n_var,
                out, f16, f32):  # fmt: skip
    """Every query row i against every cohort column j, finished into slot (i, j)."""
    n_q = het_q.shape[0]
    n_a = het_a.shape[0]
    for block in prange((n_a + _BLOCK - 1) // _BLOCK):
        j0 = block * _BLOCK
        j1 = min(n_a, j0 + _BLOCK)
        for i in range(n_q):
            hi = het_q[i]
            ai = hom_q[i]
            for j in range(j0, j1, 2):
                k = min(j + 1, j1 - 1)
                ibs0_j, hh_j, ibs0_k, hh_k = _pair2(hi, ai, het_a[j], hom_a[j], het_a[k], hom_a[k])
                s = i * n_a + j
                out[s] = _finish(metric, ibs0_j, hh_j, b_q[i], b_a[j], nh_q[i], nh_a[j], f16,
                                 f32, s, 0, nm_q[i], nm_a[j], total, n_var)  # fmt: skip
                if k != j:
                    s = i * n_a + k
                    out[s] = _finish(metric, ibs0_k, hh_k, b_q[i], b_a[k], nh_q[i], nh_a[k],
                                     f16, f32, s, 0, nm_q[i], nm_a[k], total, n_var)  # fmt: skip


@njit(parallel=True, cache=True)
def _rare_pairs(c_starts, c_samples, c_copies, m_starts, m_samples, king, w_field, packed, n,
                threads, f16):  # fmt: skip
    """The pair terms of the rare variants, into the square's correction fields: for two carriers
    ``2·x_i·x_j`` (KING) or ``2·min(x_i, x_j)`` (IBS) into the row owner's W field; for a carrier
    i and a sample o missing the call, ``W(o→i) += hom_weight·[x_i=2] + [x_i=1]`` and, for KING,
    ``Hc(o→i) += [x_i=1]``. Threads own interleaved slot rows, so no two write the same slot."""
    for part in prange(threads):
        for v in range(c_starts.shape[0] - 1):
            c0 = c_starts[v]
            c1 = c_starts[v + 1]
            for t in range(c0, c1):
                i = c_samples[t]
                xi = np.int64(c_copies[t])
                if i % threads == part:  # pairs (i, j < i): slot row i
                    for u in range(c0, t):
                        xj = np.int64(c_copies[u])
                        slot = _slot(i, c_samples[u], n, packed)
                        f16[4 * slot + w_field] += 2 * (xi * xj if king else min(xi, xj))
                value = xi * xi if king else xi
                for u in range(m_starts[v], m_starts[v + 1]):
                    o = m_samples[u]
                    row = max(o, i)
                    if row % threads != part:
                        continue
                    slot = _slot(row, min(o, i), n, packed)
                    side = 0 if o > i else 1  # the owner o's fields
                    f16[4 * slot + w_field + side] += value
                    if king and xi == 1:
                        f16[4 * slot + side] += 1


@njit(parallel=True, cache=True)
def _rare_pairs_rect(q_cs, q_c, q_x, q_ms, q_m, a_cs, a_c, a_x, a_ms, a_m, king, w_field, n_a,
                     threads, f16):  # fmt: skip
    """:func:`_rare_pairs` between query rows and cohort columns, slot (i, j) = i·N_a + j, with
    the query owner's fields 0/2 and the cohort owner's 1/3; threads own interleaved query rows."""
    for part in prange(threads):
        for v in range(q_cs.shape[0] - 1):
            for t in range(q_cs[v], q_cs[v + 1]):  # query carriers
                i = q_c[t]
                if i % threads != part:
                    continue
                xi = np.int64(q_x[t])
                for u in range(a_cs[v], a_cs[v + 1]):  # against cohort carriers
                    xj = np.int64(a_x[u])
                    slot = i * n_a + a_c[u]
                    f16[4 * slot + w_field] += 2 * (xi * xj if king else min(xi, xj))
                value = xi * xi if king else xi
                for u in range(a_ms[v], a_ms[v + 1]):  # cohort samples missing: owner o
                    slot = i * n_a + a_m[u]
                    f16[4 * slot + w_field + 1] += value
                    if king and xi == 1:
                        f16[4 * slot + 1] += 1
            for t in range(q_ms[v], q_ms[v + 1]):  # query samples missing: owner i
                i = q_m[t]
                if i % threads != part:
                    continue
                for u in range(a_cs[v], a_cs[v + 1]):
                    xj = np.int64(a_x[u])
                    slot = i * n_a + a_c[u]
                    f16[4 * slot + w_field] += xj * xj if king else xj
                    if king and xj == 1:
                        f16[4 * slot] += 1


@njit(parallel=True, cache=True)
def _set_diagonal(out, n, packed, value):
    for i in prange(n):
        out[_slot(i, i, n, packed)] = value


@njit(parallel=True, cache=True)
def _mirror_lower(out):
    """Copy the lower triangle of a square C-order array onto its upper one, in tiles."""
    n = out.shape[0]
    for block in prange((n + 63) // 64):
        r0 = block * 64
        for c0 in range(0, r0 + 64, 64):
            for r in range(r0, min(n, r0 + 64)):
                for c in range(c0, min(r, c0 + 64)):
                    out[c, r] = out[r, c]


def counts_metric(
    metric: str,
    query: Planes,
    against: Planes | None,
    *,
    weights: np.ndarray | None = None,
    packed: bool = False,
) -> np.ndarray:
    """KING or IBS (``metric``) from planes: ``against=None`` for a cohort against itself.

    Returns (N_q, N_a) float64, or with ``packed`` (square only) the lower triangle, row by row.
    Raises :class:`TooManyMissing` when a sample has more missing calls than the uint16 fields
    hold (the caller then takes :class:`models.genome._bits.Counter`).
    """
    code = _KING if metric == "king" else _IBS
    hom_weight = 4 if code == _KING else 2
    limit = 2**16 - 1
    sides = [query] if against is None else [query, against]
    bound = max(int(hom_weight * side.max_missing()) for side in sides)
    carried = [int(side.rare.carried(side.n).max(initial=0)) for side in sides if side.rare]
    if carried:  # and the terms of two carriers (a query row's own, in a rectangle)
        bound += 2 * hom_weight * max(carried)
    if bound > limit:
        raise TooManyMissing(f"correction fields would reach {bound} (uint16)")
    n_var = query.n_variants
    if query.rare is not None:
        n_var += len(query.rare.variants)
    total = float(n_var) if weights is None else float(weights.sum())
    threads = numba.get_num_threads()
    if against is None:
        n = query.n
        king = code == _KING
        w_field = 2 if king else 0
        nm = query.n_missing(weights)  # the per-sample sums first: they do not add to the peak
        base, n_het = query.n_het, query.n_het
        rare = query.rare
        if rare is not None:
            r_base, r_het = rare.totals(n, hom_weight)
            base, n_het = base + r_base, n_het + r_het
        out = np.zeros(n * (n + 1) // 2 if packed else n * n, np.float64)
        f16, f32 = out.view(np.uint16), out.view(np.uint32)
        _corrections(query.miss_starts, query.miss_variants, query.het, query.hom, hom_weight,
                     king, w_field, 0, n, packed, f16)  # fmt: skip
        if rare is not None:
            _rare_pairs(rare.c_starts, rare.c_samples, rare.c_copies, rare.m_starts,
                        rare.m_samples, king, w_field, packed, n, threads, f16)  # fmt: skip
        if code == _IBS:
            joint = f32[1::2]
            v_starts, v_samples = query.by_variant()
            w = _uint32_weights(query.plane_weights(weights), query.n_variants)
            _joint_counts(v_starts, v_samples, v_starts, v_samples, w, True, packed, n, threads,
                          joint)  # fmt: skip
            if rare is not None:
                w = _uint32_weights(None if weights is None else weights[rare.variants],
                                    len(rare.variants))  # fmt: skip
                _joint_counts(rare.m_starts, rare.m_samples, rare.m_starts, rare.m_samples, w,
                              True, packed, n, threads, joint)  # fmt: skip
        _pairs_square(code, query.het, query.hom, base, n_het, nm, total, float(n_var), packed,
                      out, f16, f32)  # fmt: skip
        _set_diagonal(out, n, packed, 0.5 if code == _KING else 1.0)
        if packed:
            return out
        square = out.reshape(n, n)
        _mirror_lower(square)
        return square
    if (query.rare is None) != (against.rare is None) or (
        query.variants is not None
        and (against.variants is None or not np.array_equal(query.variants, against.variants))
    ):
        raise ValueError("query and against must split the variants the same way")
    w = _uint32_weights(weights, n_var)
    n_q, n_a = query.n, against.n
    is_king = code == _KING
    w_field = 2 if is_king else 0
    nm_q, nm_a = query.n_missing(weights), against.n_missing(weights)
    b_q, nh_q, b_a, nh_a = query.n_het, query.n_het, against.n_het, against.n_het
    rq, ra = query.rare, against.rare
    if rq is not None and ra is not None:
        (rb_q, rh_q), (rb_a, rh_a) = rq.totals(n_q, hom_weight), ra.totals(n_a, hom_weight)
        b_q, nh_q, b_a, nh_a = b_q + rb_q, nh_q + rh_q, b_a + rb_a, nh_a + rh_a
    out = np.zeros(n_q * n_a, np.float64)
    f16, f32 = out.view(np.uint16), out.view(np.uint32)
    _corrections(query.miss_starts, query.miss_variants, against.het, against.hom, hom_weight,
                 is_king, w_field, 1, n_a, False, f16)  # fmt: skip
    _corrections(against.miss_starts, against.miss_variants, query.het, query.hom, hom_weight,
                 is_king, w_field, 2, n_a, False, f16)  # fmt: skip
    if rq is not None and ra is not None:
        _rare_pairs_rect(rq.c_starts, rq.c_samples, rq.c_copies, rq.m_starts, rq.m_samples,
                         ra.c_starts, ra.c_samples, ra.c_copies, ra.m_starts, ra.m_samples,
                         is_king, w_field, n_a, threads, f16)  # fmt: skip
    if code == _IBS:
        joint = f32[1::2]
        q_starts, q_samples = query.by_variant()
        a_starts, a_samples = against.by_variant()
        w_dense = _uint32_weights(query.plane_weights(weights), query.n_variants)
        _joint_counts(q_starts, q_samples, a_starts, a_samples, w_dense, False, False, n_a,
                      threads, joint)  # fmt: skip
        if rq is not None and ra is not None:
            w_rare = _uint32_weights(None if weights is None else weights[rq.variants],
                                     len(rq.variants))  # fmt: skip
            _joint_counts(rq.m_starts, rq.m_samples, ra.m_starts, ra.m_samples, w_rare, False,
                          False, n_a, threads, joint)  # fmt: skip
    _pairs_rect(code, query.het, query.hom, against.het, against.hom, b_q, b_a, nh_q, nh_a, nm_q,
                nm_a, total, float(n_var), out, f16, f32)  # fmt: skip
    return out.reshape(n_q, n_a)


# --- the GRM -----------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _variant_counts(codes, called, alt):
    """Per variant of one chunk of sample-major codes (N, c): called samples and A1 copies."""
    n, c = codes.shape
    for v in prange(c):
        k = 0
        s = 0
        for i in range(n):
            x = codes[i, v]
            if x >= 0:
                k += 1
                s += x
        called[v] = k
        alt[v] = s


def _bed_count_table() -> np.ndarray:
    """Byte → how many of its 4 samples have each 2-bit code (00, 01, 10, 11)."""
    byte = np.arange(256)
    return np.stack([sum(((byte >> (2 * k)) & 3) == code for k in range(4)) for code in range(4)],
                    axis=1).astype(np.int64)  # fmt: skip


_BED_COUNT_TABLE = _bed_count_table()


@njit(parallel=True, cache=True)
def _bed_genotype_counts(raw, n, table, out):
    """Per variant of .bed rows: samples with two copies of A1 (00), missing (01), het (10),
    none (11); the padding of the last byte is not counted."""
    full = n // 4
    for v in prange(raw.shape[0]):
        row = raw[v]
        c0 = 0
        c1 = 0
        c2 = 0
        c3 = 0
        for b in range(full):
            t = table[row[b]]
            c0 += t[0]
            c1 += t[1]
            c2 += t[2]
            c3 += t[3]
        for i in range(4 * full, n):
            code = (row[i >> 2] >> ((i & 3) << 1)) & 3
            c0 += code == 0
            c1 += code == 1
            c2 += code == 2
            c3 += code == 3
        out[v, 0] = c0
        out[v, 1] = c1
        out[v, 2] = c2
        out[v, 3] = c3


def bed_genotype_counts(bed_path: str | Path, n: int, n_variants: int) -> np.ndarray:
    """(M, 4) int64: per variant, samples with two copies of A1, missing, het, none."""
    counts = np.zeros((n_variants, 4), np.int64)
    for start, raw in iter_bed_raw(bed_path, n, n_variants):
        _bed_genotype_counts(raw, n, _BED_COUNT_TABLE, counts[start : start + raw.shape[0]])
    return counts


def founder_counts(
    bed_path: str | Path, n: int, n_variants: int, counts: np.ndarray, founder: np.ndarray
) -> np.ndarray:
    """:func:`bed_genotype_counts` over the founders only: ``counts`` (every sample's) less the
    non-founders' calls, which are read sample by sample (a cohort's non-founders are few)."""
    out = counts.copy()
    others = np.flatnonzero(~founder)
    if not len(others):
        return out
    byte, shift = others >> 2, (2 * (others & 3)).astype(np.uint8)
    for start, raw in iter_bed_raw(bed_path, n, n_variants):
        codes = (raw[:, byte] >> shift) & 3
        for code in range(4):
            out[start : start + raw.shape[0], code] -= (codes == code).sum(1)
    return out


def frequencies(counts: np.ndarray, n: int) -> np.ndarray:
    """A1 frequency over observed calls (NaN without calls) from :func:`bed_genotype_counts`."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (2 * counts[:, 0] + counts[:, 2]) / (2.0 * (n - counts[:, 1]))


def cohort_from_bed(
    bed_path: str | Path, n: int, n_variants: int, counts: np.ndarray, *, rare: bool = True
) -> Planes:
    """The planes of a .bed's common variants and the lists of its rare ones (:class:`Rare`)."""
    return planes_from_raw(
        iter_bed_raw(bed_path, n, n_variants), n, classify(counts, n, rare), rare
    )


def planes_from_raw(
    chunks: Iterator[tuple[int, np.ndarray]],
    n: int,
    split: tuple[np.ndarray, np.ndarray],
    rare: bool = True,
) -> Planes:
    """Planes (and, with ``rare``, the rare variants' lists) from ``(start, raw)`` chunks of
    .bed-coded rows of ``n`` samples, (c, ceil(n/4)) uint8, in variant order, with the
    (rare, flip) ``split`` of every variant (:func:`classify`; from the whole cohort's counts
    when these rows are a block of its samples, so that every block splits alike)."""
    is_rare, flip = split
    if not rare:
        is_rare = np.zeros_like(is_rare)
    dense = np.flatnonzero(~is_rare)
    builder = PlaneBuilder(n, len(dense))
    rares = RareBuilder()
    per_variant = (n + 3) // 4
    buffer = np.empty((CHUNK, per_variant), np.uint8)
    filled = 0
    done = 0  # dense variants already in the planes
    for start, raw in chunks:
        chunk_rare = is_rare[start : start + raw.shape[0]]
        picked = raw[~chunk_rare]
        while len(picked):
            take = min(CHUNK - filled, len(picked))
            buffer[filled : filled + take] = picked[:take]
            filled += take
            picked = picked[take:]
            if filled == CHUNK:
                builder.add_bed(buffer, done)
                done += CHUNK
                filled = 0
        if chunk_rare.any():
            index = start + np.flatnonzero(chunk_rare)
            rares.add_bed(raw[chunk_rare], n, index, flip[index])
    if filled:
        builder.add_bed(buffer[:filled], done)
    planes = builder.finish()
    if rare:
        planes.variants = dense
        planes.rare = rares.finish()
    return planes


@njit(parallel=True, cache=True)
def _standardize(codes, variant_major, mean2, scale, zt, missing):
    """``zt[v, i] = (x - 2p)·scale`` for called x, 0 for missing (``missing[v, i]`` set)."""
    c = zt.shape[0]
    n = zt.shape[1]
    if variant_major:
        for v in prange(c):
            for i in range(n):
                x = codes[v, i]
                zt[v, i] = (np.float64(x) - mean2[v]) * scale[v] if x >= 0 else 0.0
                missing[v, i] = x < 0
    else:
        for i0 in prange((n + 63) // 64):
            for v0 in range(0, c, 64):
                for i in range(i0 * 64, min(n, i0 * 64 + 64)):
                    for v in range(v0, min(c, v0 + 64)):
                        x = codes[i, v]
                        zt[v, i] = (np.float64(x) - mean2[v]) * scale[v] if x >= 0 else 0.0
                        missing[v, i] = x < 0


@njit(cache=True)
def _missing_csr(missing):
    """CSR of each variant's missing samples from a (c, N) bool matrix."""
    c, n = missing.shape
    starts = np.zeros(c + 1, np.int64)
    for v in range(c):
        starts[v + 1] = starts[v] + missing[v].sum()
    samples = np.empty(starts[c], np.int32)
    for v in range(c):
        k = starts[v]
        for i in range(n):
            if missing[v, i]:
                samples[k] = i
                k += 1
    return starts, samples


@njit(parallel=True, cache=True)
def _joint_upper(starts, samples, threads, out):
    """``out[i, j] += 1`` (i < j) for every variant both miss; threads own interleaved rows."""
    for part in prange(threads):
        for v in range(starts.shape[0] - 1):
            for t in range(starts[v], starts[v + 1]):
                i = samples[t]
                if i % threads != part:
                    continue
                for u in range(t + 1, starts[v + 1]):
                    out[i, samples[u]] += 1.0


@njit(parallel=True, cache=True)
def _grm_finish_square(out, n_missing, total):
    """Numerator below the diagonal, joint-missing counts above: the GRM, mirrored."""
    n = out.shape[0]
    for r in prange(n):
        for c in range(r):
            den = (total - (n_missing[r] + n_missing[c])) + out[c, r]
            value = out[r, c] / den
            out[r, c] = value
            out[c, r] = value
        out[r, r] = out[r, r] / ((total - (n_missing[r] + n_missing[r])) + n_missing[r])


def _standardizer(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(2p, 1/sqrt(2p(1-p)) or 0 where monomorphic), as the GEMM engine computes them."""
    variance = 2.0 * p * (1.0 - p)
    with np.errstate(invalid="ignore", divide="ignore"):
        usable = variance >= _MONOMORPHIC_VARIANCE
        scale = np.where(usable, 1.0 / np.sqrt(np.where(usable, variance, 1.0)), 0.0)
    return 2.0 * p, scale


def check_monomorphic(codes: np.ndarray, p: np.ndarray, offset: int, variant_major: bool) -> None:
    """PLINK 2 stops on a variant its frequencies call monomorphic whose calls vary."""
    flat = np.flatnonzero(2.0 * p * (1.0 - p) < _MONOMORPHIC_VARIANCE)
    if not flat.size:
        return
    calls = codes[flat] if variant_major else codes[:, flat].T
    expected = np.round(2.0 * p[flat]).astype(np.int8)[:, None]
    wrong = ((calls >= 0) & (calls != expected)).any(axis=1)
    if wrong.any():
        j = offset + int(flat[np.flatnonzero(wrong)[0]])
        raise ValueError(f"variant {j}: the frequencies call it monomorphic but its calls vary")


def grm_square(
    chunks: Iterator[tuple[int, np.ndarray]],
    n: int,
    p: np.ndarray,
    *,
    variant_major: bool,
) -> np.ndarray:
    """plink2 --make-rel square from chunks of codes ((c, N) when ``variant_major``, else (N, c)):
    ``dsyrk`` into the lower triangle, jointly missing counts in the upper, then divided."""
    from scipy.linalg import blas  # loaded for the GRM only (17 MB resident)

    out = np.zeros((n, n), np.float64)
    n_missing = np.zeros(n, np.float64)
    threads = numba.get_num_threads()
    for start, codes in chunks:
        c = codes.shape[0] if variant_major else codes.shape[1]
        pc = p[start : start + c]
        check_monomorphic(codes, pc, start, variant_major)
        mean2, scale = _standardizer(pc)
        zt = np.empty((c, n), np.float64)
        missing = np.empty((c, n), np.bool_)
        _standardize(codes, variant_major, mean2, scale, zt, missing)
        # out.T is Fortran-ordered: its upper triangle is out's lower one.
        blas.dsyrk(1.0, zt.T, beta=1.0, c=out.T, trans=0, lower=0, overwrite_c=1)
        del zt
        starts, samples = _missing_csr(missing)
        n_missing += missing.sum(axis=0)
        _joint_upper(starts, samples, threads, out)
    _grm_finish_square(out, n_missing, float(len(p)))
    return out


def grm_block(
    query: Iterator[tuple[int, np.ndarray]],
    against: Iterator[tuple[int, np.ndarray]],
    n_q: int,
    n_a: int,
    p: np.ndarray,
) -> np.ndarray:
    """The GRM between two sample sets from aligned chunks of sample-major codes: ``dgemm``."""
    from scipy.linalg import blas

    num = np.zeros((n_q, n_a), np.float64)
    joint = np.zeros((n_q, n_a), np.float64)
    miss_q = np.zeros(n_q, np.float64)
    miss_a = np.zeros(n_a, np.float64)
    for (start, q), (_, a) in zip(query, against, strict=True):
        c = q.shape[1]
        pc = p[start : start + c]
        check_monomorphic(q, pc, start, False)
        check_monomorphic(a, pc, start, False)
        mean2, scale = _standardizer(pc)
        zq, mq = np.empty((c, n_q)), np.empty((c, n_q), np.bool_)
        za, ma = np.empty((c, n_a)), np.empty((c, n_a), np.bool_)
        _standardize(q, False, mean2, scale, zq, mq)
        _standardize(a, False, mean2, scale, za, ma)
        # num.T (Fortran) += Z_a Z_qᵀ
        blas.dgemm(1.0, za.T, zq.T, beta=1.0, c=num.T, trans_b=1, overwrite_c=1)
        miss_q += mq.sum(axis=0)
        miss_a += ma.sum(axis=0)
        q_starts, q_samples = _missing_csr(mq)
        a_starts, a_samples = _missing_csr(ma)
        threads = numba.get_num_threads()
        _joint_missing(q_starts, q_samples, a_starts, a_samples, np.ones(c), threads, joint)
    total = float(len(p))
    with np.errstate(divide="ignore", invalid="ignore"):
        den = total - (miss_q[:, None] + miss_a[None, :])
        den += joint
        return num / den


# --- writing -----------------------------------------------------------------------------------


def write_square_by_rows(
    metric: str,
    planes: Planes,
    sink: BinaryIO,
    *,
    weights: np.ndarray | None = None,
    rows: int = 256,
) -> None:
    """KING or IBS over a cohort, written as the square row block by row block (little-endian
    float64): each block of ``rows`` samples against the whole cohort, so only that block is held
    (8 MB at N = 4,000, where the triangle is 64 MB), for twice the pair work of the triangle.
    Raises :class:`TooManyMissing` as :func:`counts_metric` does, before anything is written."""
    n = planes.n
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = counts_metric(metric, planes.rows(start, stop), planes, weights=weights)
        block[np.arange(stop - start), np.arange(start, stop)] = 0.5 if metric == "king" else 1.0
        sink.write(block.data)


@njit(parallel=True, cache=True)
def _rows_from_packed(tri, n, r0, buf):
    for r in prange(r0, r0 + buf.shape[0]):
        row = buf[r - r0]
        base = r * (r + 1) // 2
        for c in range(r + 1):
            row[c] = tri[base + c]
        for c in range(r + 1, n):
            row[c] = tri[c * (c + 1) // 2 + r]


def write_square(tri: np.ndarray, n: int, sink: BinaryIO, rows: int = 256) -> None:
    """Write a packed lower triangle as the full square, little-endian float64, row by row."""
    buf = np.empty((min(rows, max(n, 1)), n), np.float64)
    for r0 in range(0, n, rows):
        part = buf[: min(rows, n - r0)]
        _rows_from_packed(tri, n, r0, part)
        sink.write(part.astype("<f8", copy=False).data)  # a view: no copy
